"""``scripts/tune.py``: a search for the best VALIDATION accuracy of an initial-stage run over the settings a space
file declares, by Optuna's TPE sampler (seeded); the test images are never looked at. Each trial is one train.py
process (a run in --save-dir like any other) that reports its validation accuracy after every epoch to its trial
(the callback in ``pruning.py``, given on its command line); the study's pruner stops the runs that fall behind (the
median of the earlier trials at that epoch, or --prune-below ACC) and the trial is marked PRUNED. At the end:
SAVE_DIR/best.yaml, the base config with the best trial's settings, for ``train.py --config``.

Several workers on one study: --jobs N runs N trials at a time from this process (each in its train.py process);
the same command on other machines with a database that all reach (``--storage postgresql://...``, or a sqlite
file on a shared disk) and the same ``--study NAME`` adds workers there, each with a --save-dir of its own (each
trial keeps its run's settings, results, folder and host in the database: ``scripts/runs.py --storage``). Give
each worker its own --seed, or their first trials repeat each other. --trials N counts the study's trials
(complete, pruned, running), whoever runs them.

Space file (YAML), one entry per setting, by train.py's full name::

    model.lr: {type: float, low: 1e-4, high: 1e-1, log: true}
    data.batch_size: {type: categorical, choices: [64, 128, 256]}
    trainer.max_epochs: {type: int, low: 2, high: 8}
"""

import json
import os
from pathlib import Path

import optuna
import yaml

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.experiments import launch, records, sweep
from mnist_lit.flags import CONFIGS

FIELDS = {"float": {"low", "high"}, "int": {"low", "high"}, "categorical": {"choices"}}  # besides type (and log)
TRIAL_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)


class Surplus(Exception):
    """A trial beyond --trials (another worker took the last one at the same moment): failed before it runs."""


def load_space(path: str) -> dict[str, dict]:
    """The space file's settings and their ranges, checked; an error names the entry."""
    try:
        space = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"--space {path}: {getattr(err, 'strerror', None) or 'not valid YAML'}") from None
    if not isinstance(space, dict) or not space:
        raise UserError(
            f"--space {path}: a mapping of settings to ranges, e.g. model.lr: {{type: float, low: 1e-4, "
            "high: 0.1, log: true}"
        )
    for key, spec in space.items():
        if not valid(key, spec):
            raise UserError(
                f"--space {path}: {key}: give a train.py setting (such as model.lr) and {{type: float "
                "or int, low: L, high: H (L < H), log: true or false} or {type: categorical, choices: "
                "[...]}"
            )
    return space


def valid(key, spec) -> bool:
    """Whether a space entry is well formed; its low and high as numbers (YAML reads 1e-4, without a dot, as text)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if not sweep.KEY.fullmatch(str(key)) or kind not in FIELDS or set(spec) - {"type", "log"} != FIELDS[kind]:
        return False
    if kind == "categorical":
        return isinstance(spec["choices"], list) and bool(spec["choices"])
    number = float if kind == "float" else int
    try:
        spec["low"], spec["high"] = number(spec["low"]), number(spec["high"])
    except (TypeError, ValueError):
        return False
    return spec["low"] < spec["high"] and not (spec.get("log") and spec["low"] <= 0)


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict:
    """The trial's value of each setting."""
    params = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        else:
            how = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
            params[key] = how(key, spec["low"], spec["high"], log=bool(spec.get("log")))
    return params


def make_pruner(prune_below: float | None) -> optuna.pruners.BasePruner:
    """The study's pruner (the trial's train.py process makes the same one to ask it)."""
    if prune_below is not None:
        return optuna.pruners.ThresholdPruner(lower=prune_below)
    return optuna.pruners.MedianPruner(n_startup_trials=3)


def best_config(base: list[str], epochs: int | None, params: dict) -> dict:
    """The base config files merged, with --epochs and the tuned settings on top, as nested YAML settings."""

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    config: dict = {}
    for flag, value in zip(base[::2], base[1::2]):
        merge(config, yaml.safe_load((CONFIGS / f"{value}.yaml" if flag == "--recipe" else Path(value)).read_text()))
    for key, value in {**({"trainer.max_epochs": epochs} if epochs else {}), **params}.items():
        for part in reversed(key.split(".")):
            value = {part: value}
        merge(config, value)
    config["recipe"] = f"{config.get('recipe') or 'seed'}-tuned"  # runs from it are not the base recipe's
    return config


def tune(args, space: dict[str, dict]) -> int:
    name = args.study or launch.study_name("tune", args.base, args.epochs, space, args.prune_below)
    study = optuna.create_study(
        study_name=name,
        storage=launch.study_storage(args, launch.HEARTBEAT_S),
        sampler=optuna.samplers.TPESampler(seed=args.seed),
        pruner=make_pruner(args.prune_below),
        direction="maximize",
        load_if_exists=True,
    )

    def counted(below: float = float("inf")) -> int:
        return sum(t.number < below and t.state in TRIAL_STATES for t in study.get_trials(deepcopy=False))

    def objective(trial: optuna.Trial) -> float:
        if counted(below=trial.number) >= args.trials:  # the earlier trials fill --trials
            study.stop()
            raise Surplus(f"trial {trial.number} is beyond --trials {args.trials}")
        params = [
            a for k, v in suggest(trial, space).items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))
        ]
        pruning = [
            f"--trainer.callbacks.{k}={v}"
            for k, v in (
                ("storage", args.storage),
                ("study", name),
                ("trial", trial.number),
                ("prune_below", args.prune_below),
            )
            if v is not None
        ]
        callback = "--trainer.callbacks+=mnist_lit.experiments.pruning.OptunaPruning"
        launch.run_train([*args.settings, *params, callback, *pruning, *args.where], args.jobs)
        attrs = study.get_trials(deepcopy=False)[trial.number].user_attrs  # as the train.py process left them
        results = launch.results_of(Path(attrs["run_dir"])) if "run_dir" in attrs else None
        if results is None or results["acc"] is None:
            raise launch.RunFailed(f"trial {trial.number}: its run left no validation accuracy")
        records.record_run(trial, Path(attrs["run_dir"]))
        if "pruned_at_epoch" in attrs:
            raise optuna.TrialPruned(f"val acc {100 * results['acc']:.2f} % at epoch {attrs['pruned_at_epoch']}")
        return results["acc"]

    def stop_at_trials(study: optuna.Study, _) -> None:
        if counted() >= args.trials:
            study.stop()

    if counted() < args.trials:
        study.optimize(
            objective,
            n_trials=args.trials - counted(),
            n_jobs=args.jobs,
            catch=(launch.RunFailed, Surplus),
            callbacks=[stop_at_trials],
        )
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials]
    print(f"study {name}: " + ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))))
    if "complete" not in states:
        print("no trial completed" + (" yet (running in other workers)" if "running" in states else ""))
        return 0 if "running" in states else 1
    best, path = study.best_trial, args.save_dir / "best.yaml"
    head = f"# scripts/tune.py: study {name}, trial {best.number}, val acc {100 * best.value:.2f} % (initial stage)\n"
    part = path.with_name(f"best.yaml.{os.getpid()}")  # workers finishing together: each replaces it whole
    part.write_text(head + yaml.safe_dump(best_config(args.base, args.epochs, best.params), sort_keys=False))
    part.replace(path)
    print(
        f"best: trial {best.number}, val acc {100 * best.value:.2f} %, {best.params}; its settings: {path} "
        f"(python scripts/train.py --config {path})"
    )
    return 0


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="tune.py", description=__doc__.split("\n\n")[0].replace("``", ""))
    launch.add_run_options(p)
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="the settings to search and their ranges")
    p.add_argument("--trials", type=int, required=True, help="the study's number of trials")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0; one per worker)")
    p.add_argument(
        "--prune-below",
        type=float,
        metavar="ACC",
        help="prune a trial whose val accuracy (0-1) falls "
        "below ACC at an epoch (default: below the median of the earlier trials at that epoch)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/tune.py: bad options or a bad space file are one line and exit code 2; 1 if no trial completed."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.trials < 1:
            raise UserError("--trials must be >= 1")
        space = load_space(args.space)
        launch.check_run_options(args, "tune")
        return tune(args, space)

    return exit_code(body)
