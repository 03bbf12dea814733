"""The runs a table is made of, as records: read from run folders (what a run left: config.yaml, results.json,
checkpoints/last.ckpt), or recorded in a study's trials by a sweep or search and read back from its database.

Status: ``finished`` (results.json), ``unfinished`` (checkpoints/last.ckpt but no results.json: resumable with
``--ckpt``), ``failed`` (neither), ``broken: <why>`` (config.yaml or results.json unreadable or cut short). A run
still going shows as failed until its first epoch ends, then as unfinished."""

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mnist_lit.errors import UserError
from mnist_lit.runs import run_dirs, run_version
from mnist_lit.schema import SchemaError, plain_yaml

STAGES = ("initial", "full")
# What a readable file holds; config.yaml's recipe is its last key, so a file cut short at a line lacks it.
CONFIG_KEYS = ("seed_everything", "trainer", "model", "data", "stage", "recipe")
RESULT_KEYS = ("epoch", "split", "correct", "count", "acc", "wall_s")  # all numbers but split (null: no evaluation)


@dataclass
class Run:
    """One run folder: its status, its settings as dotted keys with text values, its results.json (or None)."""

    path: Path
    stage: str
    version: int
    status: str = "failed"
    settings: dict[str, str] = field(default_factory=dict)
    results: dict | None = None
    where: str = ""  # its save dir (HOST:SAVE_DIR from a study whose runs were on several hosts)

    def value(self, key: str) -> str | None:
        """A row's value of a fixed key or a setting, as text (None: this run has no such setting)."""
        if key in ("stage", "version", "status"):
            return str(getattr(self, key))
        if key == "recipe" and key not in self.settings and self.results:
            return text(self.results.get("recipe"))
        return self.settings.get(key)

    def accuracy(self) -> float | None:
        """The final accuracy in percent; None unless the run finished (or stopped early) with an evaluation."""
        acc = self.results.get("acc") if self.results and self.status == status_of(self.results) else None
        return None if acc is None else 100 * acc


def status_of(results: dict) -> str:
    """A run's status from its results.json: ``finished``, or ``stopped early at epoch N`` (by a callback such as
    EarlyStopping; results.json and log.txt say which and why)."""
    stopped = results.get("stopped_early")
    if isinstance(stopped, dict) and "epoch" in stopped:
        return f"stopped early at epoch {stopped['epoch']}"
    return "finished"


def text(value) -> str:
    """A setting's value as text, in YAML's spelling; a class (callbacks, loggers) by its name only."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict) and "class_path" in value:
        return str(value["class_path"]).rsplit(".", 1)[-1]
    if isinstance(value, list):
        inner = ", ".join(text(v) for v in value)
        return inner if value and all(isinstance(v, dict) and "class_path" in v for v in value) else f"[{inner}]"
    return str(value)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A config as dotted keys (``model.lr``) with text values."""
    flat = {}
    for key, value in config.items():
        if key == "net_options" and value is None:  # a net without options: no column of its own
            continue
        if isinstance(value, dict) and "class_path" not in value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = text(value)
    return flat


def load(path: Path, parse, required: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """A run file's mapping, or None and why it cannot be used (None, None: there is no such file)."""
    kind = "YAML" if path.suffix == ".yaml" else "JSON"
    try:
        data = parse(path.read_text())
    except FileNotFoundError:
        return None, None
    except SchemaError as err:  # a config.yaml that would cost more work than its size (plain_yaml)
        return None, f"{path.name} is refused: {err.problem}"
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None, f"{path.name} is not valid {kind}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a {kind} mapping"
    missing = [key for key in required if key not in data]
    if missing:
        return None, f"{path.name} lacks {missing[0]} (cut short?)"
    return data, None


def read_config(path: Path) -> tuple[dict | None, str | None]:
    """A run folder's config.yaml as plain data, or None and why it cannot be used (None, None: there is none)."""
    return load(path / "config.yaml", plain_yaml, CONFIG_KEYS)


def read_run(path: Path) -> Run:
    """One run folder as a Run; a folder whose files cannot be read is a run with status ``broken: ...``."""
    run = Run(path, path.parent.name, run_version(path))
    config, config_problem = read_config(path)
    results, results_problem = load(path / "results.json", json.loads, RESULT_KEYS)
    bad = [k for k in RESULT_KEYS if k != "split" and results and type(results[k]) not in (int, float, type(None))]
    if bad:
        results, results_problem = None, f"results.json has a bad {bad[0]}"
    run.settings, run.results = flatten(config) if config else {}, results
    if config_problem or results_problem:
        run.status = f"broken: {config_problem or results_problem}"
    elif results or (path / "checkpoints" / "last.ckpt").is_file():
        run.status = status_of(results) if results else "unfinished"
        if config is None:
            run.status = "broken: no config.yaml"
    return run


def read_runs(save_dir) -> list[Run]:
    """Every run folder under SAVE_DIR/initial and SAVE_DIR/full, initial first, oldest first."""
    if not Path(save_dir).is_dir():
        raise UserError(f"{save_dir}: no such folder (the runs' --save-dir; they are in its initial/ and full/)")
    runs = [read_run(p) for stage in STAGES for p in reversed(run_dirs(save_dir, stage)) if p.is_dir()]
    for run in runs:
        run.where = str(save_dir)
    return runs


def attr_names(stage: str) -> tuple[str, str, str]:
    """A trial's user attrs that record its run of a stage: the folder, the settings, results.json."""
    prefix = "" if stage == "initial" else f"{stage}_"
    return f"{prefix}run_dir", f"{prefix}settings", f"{prefix}results"


def record_run(trial, run: Path) -> None:
    """Keep what the runs table needs of a finished run in the trial's user attrs (and the host it ran on)."""
    found = read_run(run)
    for name, value in zip(attr_names(found.stage), (str(run), found.settings, found.results)):
        trial.set_user_attr(name, value)
    trial.set_user_attr("host", socket.gethostname())


def study_runs(url: str, name: str | None) -> list[Run]:
    """The finished runs the study's trials recorded (each once), ordered as read_runs orders each save dir's."""
    from mnist_lit.experiments.launch import open_storage, shown

    storage = open_storage(url, create=False)
    names = sorted(study.study_name for study in storage.get_all_studies())
    if name not in names:
        if name is not None or len(names) != 1:
            what = f"no study {name!r} in" if name else "give --study NAME: there is more than one in"
            raise UserError(f"{what} {shown(url)} (its studies: {', '.join(names) or 'none'})")
        name = names[0]
    records: dict[tuple[str, str], tuple[dict, dict]] = {}
    for trial in storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False):
        attrs = trial.user_attrs
        for stage in STAGES:
            folder, settings, results = attr_names(stage)
            if {folder, settings, results} <= attrs.keys():  # a trial that reused a run records it again
                records.setdefault((attrs.get("host", ""), attrs[folder]), (attrs[settings], attrs[results]))
    hosts = len({host for host, _ in records}) > 1
    runs = []
    for (host, folder), (settings, results) in records.items():
        path = Path(folder)
        where = f"{host}:{path.parent.parent}" if hosts else str(path.parent.parent)
        runs.append(Run(path, path.parent.name, run_version(path), status_of(results), settings, results, where))
    return sorted(runs, key=lambda run: (run.where, STAGES.index(run.stage), run.version))
