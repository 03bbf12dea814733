"""mnist_lit.experiments.table (and .records) and scripts/runs.py: run folders made by hand (finished, unfinished,
failed, broken) as rows, the differing settings as columns, groups, filters, the three formats, errors; one real
tiny run."""

import copy
import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import OVERSIZED_YAML

from mnist_lit.experiments import records, table
from mnist_lit.train import main as train

ROOT = Path(__file__).resolve().parents[1]
BASE = {  # config.yaml's layout (RunConfig writes the resolved LightningCLI config), fewer of the defaults
    "seed_everything": 0,
    "trainer": {"accelerator": "auto", "precision": None, "max_epochs": 20, "callbacks": None, "logger": None},
    "model": {"net": "lenet", "optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "milestones": [2, 10]},
    "data": {"data_dir": "/data/a", "dataset": "mnist", "batch_size": 64, "download": True},
    "stage": "initial",
    "ckpt": None,
    "save_dir": "logs",
    "save_freq": 5,
    "quiet": False,
    "recipe": "seed",
}
EMA = {"class_path": "mnist_lit.callbacks.EMAWithFreshBatchNorm", "init_args": {"decay": 0.999}}
SEED_ACCS = [0.99, 0.991, 0.992]  # initial/version_0-2: the seed recipe, seeds 0, 1, 2
FULL_ACC = 0.9925


def config(**changes) -> dict:
    """BASE with dotted keys changed: config(**{"model.lr": 0.1})."""
    result = copy.deepcopy(BASE)
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = result
        for section in sections:
            node = node[section]
        node[name] = value
    return result


def results(stage: str, acc: float, epoch: int) -> dict:
    split, count = ("val", 6000) if stage == "initial" else ("test", 10000)
    return {
        "stage": stage,
        "recipe": "seed",
        "run_dir": "/somewhere",
        "ckpt_from": None,
        "epoch": epoch,
        "split": split,
        "correct": round(acc * count),
        "count": count,
        "acc": acc,
        "loss": 0.03,
        "processes": 1,
        "wall_s": 123.4,
    }


def make_run(save_dir: Path, stage: str, version: int, settings=None, result=None, last_ckpt=False) -> Path:
    """A run folder as train.py leaves it; settings/result: a dict to write as YAML/JSON, or raw text."""
    run = save_dir / stage / f"version_{version}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "log.txt").write_text("")
    if settings is not None:
        text = settings if isinstance(settings, str) else yaml.safe_dump(settings, sort_keys=False)
        (run / "config.yaml").write_text(text)
    if result is not None:
        (run / "results.json").write_text(result if isinstance(result, str) else json.dumps(result, indent=2))
    if last_ckpt or result is not None:
        (run / "checkpoints" / "last.ckpt").write_bytes(b"not read")
    return run


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("table") / "logs"
    for version, (seed, acc) in enumerate(zip([0, 1, 2], SEED_ACCS)):
        where = {"data.data_dir": "/data/b", "quiet": True} if version == 1 else {}  # never columns
        make_run(logs, "initial", version, config(seed_everything=seed, **where), results("initial", acc, 20))
    fast = {"recipe": "fast", "model.net": "slim", "trainer.max_epochs": 2, "trainer.precision": "bf16-mixed"}
    make_run(logs, "initial", 3, config(**fast, **{"trainer.callbacks": [EMA]}), results("initial", 0.985, 2))
    make_run(logs, "initial", 4, config(seed_everything=3), last_ckpt=True)  # unfinished
    make_run(logs, "initial", 5, config(seed_everything=4))  # failed
    cut = yaml.safe_dump(config(), sort_keys=False)
    make_run(logs, "initial", 6, cut[: cut.index("  lr:") + 4])  # cut short mid-line: not valid YAML
    full = {"stage": "full", "model.lr": 0.0001, "model.milestones": [], "trainer.max_epochs": 40, "ckpt": "/x.ckpt"}
    make_run(logs, "full", 0, config(**full), '{"stage": "full", "epoch": 4')  # half-written JSON
    make_run(logs, "full", 1, config(**full), results("full", FULL_ACC, 40))
    (logs / "full" / "version_x").mkdir()  # not a run folder: left out, as run_dirs does
    return logs


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = table.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def part(row: dict, *keys: str) -> dict:
    return {key: row[key] for key in keys}


def test_statuses(save_dir):
    status = {(run.stage, run.version): run.status for run in records.read_runs(save_dir)}
    assert status == {
        ("initial", 0): "finished",
        ("initial", 1): "finished",
        ("initial", 2): "finished",
        ("initial", 3): "finished",
        ("initial", 4): "unfinished",
        ("initial", 5): "failed",
        ("initial", 6): "broken: config.yaml is not valid YAML",
        ("full", 0): "broken: results.json is not valid JSON",
        ("full", 1): "finished",
    }


@pytest.mark.parametrize(
    "settings, result, status",
    [
        (
            yaml.safe_dump(config(), sort_keys=False).split("recipe:")[0],
            None,
            "broken: config.yaml lacks recipe (cut short?)",
        ),
        ("", None, "broken: config.yaml is not a YAML mapping"),
        ("\x00\xff: [", None, "broken: config.yaml is not valid YAML"),
        (config(), "[]", "broken: results.json is not a JSON mapping"),
        (config(), json.dumps({**results("initial", 0.9, 1), "acc": "high"}), "broken: results.json has a bad acc"),
        (config(), json.dumps({"epoch": 3}), "broken: results.json lacks split (cut short?)"),
        (None, json.dumps(results("initial", 0.9, 1)), "broken: no config.yaml"),
        (None, None, "failed"),  # killed before config.yaml was written
    ],
)
def test_broken_folders_are_rows_not_crashes(tmp_path, capsys, settings, result, status):
    make_run(tmp_path, "initial", 0, settings, result)
    make_run(tmp_path, "initial", 1, config(), results("initial", 0.9, 1))
    assert [run.status for run in records.read_runs(tmp_path)] == [status, "finished"]
    code, out, _ = run_main(capsys, tmp_path, "--group-by", "recipe")
    assert code == 0 and "seed" in out


@pytest.mark.parametrize("case", OVERSIZED_YAML)
def test_a_config_yaml_out_of_proportion_is_a_broken_row_unparsed(tmp_path, monkeypatch, case):
    make_run(tmp_path, "initial", 0, OVERSIZED_YAML[case], results("initial", 0.9, 1))
    monkeypatch.setattr(yaml, "safe_load", lambda text: pytest.fail("parsed into data: the alias bomb never ends"))
    [run] = records.read_runs(tmp_path)
    assert run.status.startswith("broken: config.yaml is refused: ") and run.settings == {}


def test_rows_show_only_the_settings_that_differ(save_dir):
    header, rows = table.runs_table(records.read_runs(save_dir))
    settings = header[3 : header.index("epoch")]
    assert settings == [
        "seed_everything",
        "model.net",
        "model.lr",
        "model.milestones",
        "trainer.precision",
        "trainer.max_epochs",
        "trainer.callbacks",
    ]
    rows = [dict(zip(header, row)) for row in rows]
    assert rows[3]["trainer.callbacks"] == "EMAWithFreshBatchNorm" and rows[0]["trainer.callbacks"] == "null"
    assert (rows[0]["model.milestones"], rows[8]["model.milestones"], rows[8]["model.lr"]) == (
        "[2, 10]",
        "[]",
        "0.0001",
    )
    first = {
        "stage": "initial",
        "version": "0",
        "recipe": "seed",
        "seed_everything": "0",
        "epoch": "20",
        "split": "val",
        "correct/count": "5940/6000",
        "acc %": "99.00",
        "wall s": "123.4",
        "status": "finished",
    }
    assert part(rows[0], *first) == first
    assert rows[8]["correct/count"] == "9925/10000" and rows[8]["acc %"] == "99.25"
    assert [rows[i]["epoch"] for i in (4, 5, 6)] == ["-", "-", "-"]
    assert rows[6]["recipe"] == "-" and rows[6]["model.lr"] == "-"  # its config.yaml cannot be read
    # Among the initial runs alone, the full stage's lr and milestones are the same everywhere: no columns.
    initial = table.runs_table([run for run in records.read_runs(save_dir) if run.stage == "initial"])[0]
    assert "model.lr" not in initial and "model.milestones" not in initial and "seed_everything" in initial


def test_group_by_recipe_mean_and_sample_sd(save_dir, capsys):
    code, out, _ = run_main(capsys, save_dir, "--group-by", "recipe", "--format", "csv")
    assert code == 0
    groups = {(r["stage"], r["recipe"]): r for r in csv.DictReader(io.StringIO(out))}
    percent = [100 * acc for acc in SEED_ACCS]
    seed = groups["initial", "seed"]
    assert seed["acc % mean"] == f"{statistics.mean(percent):.2f}" == "99.10"
    assert seed["sd"] == f"{statistics.stdev(percent):.2f}" == "0.10"
    assert (seed["n"], seed["other runs"]) == ("3", "2")  # the unfinished and the failed run count apart
    assert (groups["initial", "fast"]["n"], groups["initial", "fast"]["sd"]) == ("1", "-")
    assert part(groups["initial", "-"], "n", "acc % mean", "other runs") == {
        "n": "0",
        "acc % mean": "-",
        "other runs": "1",
    }
    full = groups["full", "seed"]  # stage is always a group key: val and test accuracies are never mixed
    assert (full["n"], full["acc % mean"], full["sd"], full["other runs"]) == ("1", "99.25", "-", "1")


def test_group_by_seed_and_filter(save_dir, capsys):
    argv = [save_dir, "--filter", "recipe=seed", "--filter", "status=finished", "--format", "csv"]
    code, out, _ = run_main(capsys, *argv, "--group-by", "seed_everything")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["stage"], r["seed_everything"], r["n"], r["sd"]) for r in rows] == [
        ("initial", "0", "1", "-"),
        ("initial", "1", "1", "-"),
        ("initial", "2", "1", "-"),
        ("full", "0", "1", "-"),
    ]
    assert [r["acc % mean"] for r in rows] == [f"{100 * acc:.2f}" for acc in [*SEED_ACCS, FULL_ACC]]


@pytest.mark.parametrize(
    "filters, expected",
    [
        (["stage=full"], [("full", "0"), ("full", "1")]),
        (["model.lr=1e-4"], [("full", "0"), ("full", "1")]),  # numbers compare as numbers: 0.0001
        (["status=broken"], [("initial", "6"), ("full", "0")]),
        (["status=unfinished"], [("initial", "4")]),
        (["recipe=fast", "trainer.callbacks=EMAWithFreshBatchNorm"], [("initial", "3")]),
        (["data.data_dir=/data/b"], [("initial", "1")]),  # a location key: no column, but a filter
        (["recipe=fast", "stage=full"], []),
    ],
)
def test_filter(save_dir, capsys, filters, expected):
    code, out, err = run_main(capsys, save_dir, *(a for f in filters for a in ("--filter", f)), "--format", "csv")
    assert code == 0 and [(r["stage"], r["version"]) for r in csv.DictReader(io.StringIO(out))] == expected
    assert ("no run matches" in err) == (not expected)


def test_formats(save_dir, capsys):
    header, rows = table.runs_table(records.read_runs(save_dir))
    _, out, _ = run_main(capsys, save_dir, "--format", "csv")
    assert list(csv.reader(io.StringIO(out))) == [header, *rows]
    _, out, _ = run_main(capsys, save_dir, "--format", "markdown")
    lines = out.splitlines()
    assert len(lines) == 2 + len(rows) and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert lines[0] == f"| {' | '.join(header)} |" and "---:" in lines[1] and "| 99.25 |" in lines[-1]
    _, out, _ = run_main(capsys, save_dir)  # the default: aligned plain text, status last
    lines = out.splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].split() == " ".join(header).split()
    column = lines[0].index("status")
    assert [line[column:] for line in lines[1:]] == [row[-1] for row in rows]
    right = lines[0].index("acc %") + len("acc %")  # numbers are right-aligned under their heading
    assert {line[right - 5 : right] for line in lines[1:]} == {"99.00", "99.10", "99.20", "98.50", "    -", "99.25"}


def test_errors_are_one_line(tmp_path, save_dir, capsys):
    for argv, message in [
        ([tmp_path / "missing"], "no such folder"),
        ([save_dir, "--group-by", "model.lrr"], "unknown key for --group-by: model.lrr; did you mean model.lr"),
        ([save_dir, "--filter", "nothing.like.it=1"], "unknown key for --filter: nothing.like.it; keys are"),
        ([save_dir, "--filter", "recipe"], "--filter takes KEY=VALUE"),
        (["--group-by", "recipe", save_dir], "a folder, not a key (SAVE_DIR goes before --group-by)"),
        ([save_dir, "--format", "html"], "invalid choice"),
    ]:
        code, out, err = run_main(capsys, *argv)
        assert (code, out, err.count("\n")) == (2, "", 1) and err.startswith("error: ") and message in err, argv
    (tmp_path / "empty").mkdir()
    code, out, err = run_main(capsys, tmp_path / "empty", "--filter", "model.lr=1")
    assert code == 0 and out == "  ".join(table.runs_table([])[0]) + "\n" and "no runs under" in err


def test_script_default_save_dir_and_no_torch(tmp_path):
    make_run(tmp_path / "lightning_logs", "initial", 0, config(), results("initial", 0.99, 20))
    code = "sys.argv = sys.argv[1:]; import runpy; runpy.run_path(sys.argv[0], run_name='__main__')"
    check = "; assert 'torch' not in sys.modules, 'mnist_lit.experiments.table imports torch'"
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, mnist_lit.experiments.table{check}; {code}", ROOT / "scripts" / "runs.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split() == [
        "initial",
        "0",
        "seed",
        "20",
        "val",
        "5940/6000",
        "99.00",
        "123.4",
        "finished",
    ]


def test_a_real_run_is_a_finished_row(shared_data_dir, tmp_path, capsys):
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "1", "--quiet"]
    assert train([str(a) for a in argv]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "initial" / "version_0" / "results.json").read_text())
    (run,) = records.read_runs(tmp_path)
    assert (run.stage, run.version, run.status, run.value("recipe")) == ("initial", 0, "finished", "seed")
    assert run.settings["trainer.max_epochs"] == "1" and run.settings["data.data_dir"] == str(shared_data_dir)
    code, out, _ = run_main(capsys, tmp_path, "--format", "csv")
    (row,) = csv.DictReader(io.StringIO(out))
    assert code == 0 and row == {
        "stage": "initial",
        "version": "0",
        "recipe": "seed",
        "epoch": "1",
        "split": "val",
        "correct/count": f"{written['correct']}/{written['count']}",
        "acc %": f"{100 * written['acc']:.2f}",
        "wall s": f"{written['wall_s']:.1f}",
        "status": "finished",
    }


def test_group_by_settings_averages_only_runs_that_differ_in_their_seed(tmp_path, capsys):
    """A recipe with one setting changed (lr 0.02, still recorded as seed) is its own group, not averaged with the
    recipe; where a run went (its data_dir, quiet) does not split a group."""
    accs = {(0.01, 0): 0.99, (0.01, 1): 0.991, (0.01, 2): 0.992, (0.02, 0): 0.98, (0.02, 1): 0.982}
    for version, ((lr, seed), acc) in enumerate(accs.items()):
        where = {"data.data_dir": "/elsewhere", "quiet": True} if version == 2 else {}
        make_run(
            tmp_path,
            "initial",
            version,
            config(seed_everything=seed, **{"model.lr": lr}, **where),
            results("initial", acc, 20),
        )
    fast = config(recipe="fast", **{"model.net": "slim", "model.lr": 0.04})
    make_run(tmp_path, "initial", 5, fast, results("initial", 0.985, 2))
    make_run(tmp_path, "initial", 6, config(seed_everything=7, **{"model.lr": 0.02}), last_ckpt=True)  # unfinished
    code, out, _ = run_main(capsys, tmp_path, "--group-by", "settings", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(rows[0]) == [
        "stage",
        "recipe",
        "model.net",
        "model.lr",
        "n",
        "acc % mean",
        "sd",
        "other runs",
    ]
    by_lr = {(r["recipe"], r["model.net"], r["model.lr"]): r for r in rows}
    assert set(by_lr) == {("seed", "lenet", "0.01"), ("seed", "lenet", "0.02"), ("fast", "slim", "0.04")}
    for lr, other in (("0.01", "0"), ("0.02", "1")):
        percent = [100 * acc for (rate, _), acc in accs.items() if str(rate) == lr]
        group = by_lr["seed", "lenet", lr]
        assert (group["n"], group["other runs"]) == (str(len(percent)), other)
        assert (group["acc % mean"], group["sd"]) == (
            f"{statistics.mean(percent):.2f}",
            f"{statistics.stdev(percent):.2f}",
        )
    _, out, _ = run_main(capsys, tmp_path, "--group-by", "recipe", "--format", "csv")
    assert {r["recipe"]: r["n"] for r in csv.DictReader(io.StringIO(out))} == {"seed": "5", "fast": "1"}  # mixed
    _, settings, _ = run_main(capsys, tmp_path, "--group-by", "settings", "--format", "csv")
    _, same, _ = run_main(capsys, tmp_path, "--group-by", "stage", "settings", "model.lr", "--format", "csv")
    assert same == settings  # keys named twice count once
    code, _, err = run_main(capsys, tmp_path, "--filter", "settings=x")
    assert code == 2 and "unknown key for --filter: settings" in err


def test_a_run_stopped_early_says_so_and_still_counts(tmp_path):
    logs = tmp_path / "logs"
    stopped = {**results("initial", 0.5, 7), "stopped_early": {"epoch": 7, "by": "EarlyStopping: no improvement"}}
    make_run(logs, "initial", 0, config(), stopped)
    make_run(logs, "initial", 1, config(), results("initial", 0.7, 20))
    runs = records.read_runs(logs)
    assert [run.status for run in runs] == ["stopped early at epoch 7", "finished"]
    assert [run.accuracy() for run in runs] == [50.0, 70.0]


def test_each_net_option_is_a_column_empty_where_the_net_has_none(tmp_path):
    logs = tmp_path / "logs"
    make_run(logs, "initial", 0, config(**{"model.net_options": None}), results("initial", 0.99, 20))
    make_run(logs, "initial", 1, config(**{"model.net_options": {"dropout": 0.3}}), results("initial", 0.99, 20))
    header, rows = table.runs_table(records.read_runs(logs))
    assert "model.net_options" not in header and "model.net_options.dropout" in header
    column = header.index("model.net_options.dropout")
    assert sorted(row[column] for row in rows) == ["", "0.3"]


def test_a_finished_run_with_accuracy_0_counts_in_its_groups_mean_and_sd(tmp_path, capsys):
    accs = [0.0, 0.5, 0.9]  # a run that learnt nothing is a result, not a missing one
    for version, acc in enumerate(accs):
        make_run(tmp_path, "initial", version, config(seed_everything=version), results("initial", acc, 20))
    make_run(tmp_path, "initial", len(accs), config(seed_everything=9), last_ckpt=True)  # unfinished: not counted
    code, out, _ = run_main(capsys, tmp_path, "--group-by", "recipe", "--format", "csv")
    (group,) = csv.DictReader(io.StringIO(out))
    percent = [100 * acc for acc in accs]
    assert code == 0 and (group["n"], group["other runs"]) == ("3", "1")
    assert (group["acc % mean"], group["sd"]) == (f"{statistics.mean(percent):.2f}", f"{statistics.stdev(percent):.2f}")
    code, out, _ = run_main(capsys, tmp_path, "--format", "csv")
    first = next(csv.DictReader(io.StringIO(out)))
    assert (first["correct/count"], first["acc %"], first["status"]) == ("0/6000", "0.00", "finished")
