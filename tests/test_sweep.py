"""scripts/sweep.py: a sweep whose processes are SIGKILLed mid-run, given again, completes with every grid point run
once (the interrupted run resumed from its last.ckpt) and prints the grouped table (its study on sqlite and on
PostgreSQL); bad options."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import ALIAS_BOMB

from mnist_lit.errors import UserError
from mnist_lit.experiments import sweep
from mnist_lit.experiments.records import CONFIG_KEYS

HERE = Path(__file__).resolve().parent
SWEEP = HERE.parent / "scripts" / "sweep.py"
# A sitecustomize module (imported by every Python process at start-up) that arms the second new train.py run of
# the sweep (GridSampler's order) to SIGKILL its process group, the sweep and itself, in the validation of epoch 2,
# after epoch 1's last.ckpt: a crash of the whole sweep at a known moment, after its first run finished and before
# its third started.
HOOK = f"""
import os, signal, sys
if sys.argv[0].endswith("train.py") and "--ckpt" not in sys.argv:
    with open(os.environ["SWEEP_TEST_STARTED"], "a") as started:  # one byte per run started
        started.write("x")
    if os.path.getsize(os.environ["SWEEP_TEST_STARTED"]) == 2:
        sys.path.insert(0, {str(HERE)!r})
        import kill_at
        kill_at.die = lambda: os.killpg(0, signal.SIGKILL)
        kill_at.arm("validation-epoch-2")
"""


def finished_runs(save_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (save_dir / "initial").glob("version_*/results.json"))


@pytest.mark.slow
def test_killed_sweep_given_again_runs_each_point_once_and_resumes(new_database, shared_data_dir, tmp_path):
    save_dir, hook = tmp_path / "sweep", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    grid = ["--seeds", "0-2", "--set", "model.lr=0.05", "--epochs", "2", "--quiet", "--heartbeat", "1"]
    grid += ["--storage", new_database()]
    command = [sys.executable, str(SWEEP), *grid, "--data-dir", str(shared_data_dir), "--save-dir", str(save_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    env["SWEEP_TEST_STARTED"] = str(hook / "started")
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert len(finished_runs(save_dir)) == 1
    interrupted = [p.parent.parent for p in (save_dir / "initial").glob("version_*/checkpoints/last.ckpt")]
    interrupted = [run for run in interrupted if not (run / "results.json").exists()]
    assert len(interrupted) == 1

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = finished_runs(save_dir)
    points = []
    for run in runs:
        args = shlex.split((run / "command.txt").read_text())
        points.append((args[args.index("--seed_everything") + 1], args[args.index("--model.lr") + 1]))
        assert json.loads((run / "results.json").read_text())["epoch"] == 2
    assert sorted(points) == [("0", "0.05"), ("1", "0.05"), ("2", "0.05")]  # each point once
    resumed = [run for run in runs if "--ckpt" in (run / "command.txt").read_text()]
    assert len(resumed) == 1 and json.loads((resumed[0] / "results.json").read_text())["ckpt_from"] == str(
        interrupted[0] / "checkpoints" / "last.ckpt"
    )
    lines = again.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "model.lr"]) :]
    assert table[0].split() == ["stage", "model.lr", "n", "acc", "%", "mean", "sd", "other", "runs"]
    groups = {row.split()[1]: (row.split()[0], row.split()[2], row.split()[-1]) for row in table[1:]}
    assert groups == {"0.05": ("initial", "3", "0")}  # n, others: the study's finished runs

    once_more = subprocess.run(command, capture_output=True, text=True, timeout=300)  # done: nothing runs again
    assert once_more.returncode == 0 and "+ train.py" not in once_more.stdout and len(finished_runs(save_dir)) == 3


@pytest.mark.slow
def test_then_full_goes_on_from_each_points_last_checkpoint(shared_data_dir, tmp_path, capsys):
    save_dir = tmp_path / "s"
    argv = ["--seeds", "3", "--then-full", "--epochs", "1", "--full-epochs", "1", "--quiet"]
    assert sweep.main([*argv, "--data-dir", str(shared_data_dir), "--save-dir", str(save_dir)]) == 0
    initial, full = (json.loads((save_dir / s / "version_0" / "results.json").read_text()) for s in ("initial", "full"))
    assert full["split"] == "test" and full["epoch"] == 2
    assert full["ckpt_from"] == str(save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt")
    trial = optuna.load_study(study_name=None, storage=f"sqlite:///{save_dir / 'sweep.db'}").trials[0]
    assert trial.value == initial["acc"] and trial.user_attrs["test_acc"] == full["acc"]  # recorded only
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    start = rows.index(["stage", "recipe", "n", "acc", "%", "mean", "sd", "other", "runs"]) + 1
    assert [row[:3] for row in rows[start:]] == [["initial", "seed", "1"], ["full", "seed", "1"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "4-2"], "--seeds takes seeds and ranges such as 0-4 or 0,2,5 (got '4-2')"),
        (["--seeds", "0,x"], "--seeds takes seeds and ranges such as 0-4 or 0,2,5 (got '0,x')"),
        (["--set", "lr=0.1"], "--set takes KEY=V1,V2,... with KEY a full train.py name such as model.lr (got 'lr"),
        (["--set", "model.lr=0.1,"], "--set takes KEY=V1,V2,... with KEY a full train.py name such as model.lr"),
        (["--recipe", "nope", "--seeds", "0"], "argument --recipe: unknown recipe 'nope': choose one of"),
        (["--seeds", "0"], "the following arguments are required: --save-dir"),
        ([], "nothing to sweep: give --seeds and/or --set KEY=V1,V2"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    save = [] if "--save-dir" in message else ["--save-dir", str(tmp_path / "s")]
    assert sweep.main([*args, *save]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()  # nothing made


def test_a_sweep_whose_database_is_lost_or_new_does_not_train_finished_points_again(
    shared_data_dir, tmp_path, monkeypatch
):
    """The runs on disk are the record: a point whose run finished in this --save-dir is not run again, whatever
    the study's database holds (train.py runs in-process here, as the sweep would start it)."""
    from mnist_lit.train import main as train

    started = []

    def run_train_here(argv, jobs):
        started.append(argv)
        if train(argv) != 0:
            raise sweep.RunFailed(f"train.py {argv}")

    monkeypatch.setattr(sweep, "run_train", run_train_here)
    save_dir = tmp_path / "s"
    argv = ["--seeds", "0", "--epochs", "1", "--quiet", "--data-dir", str(shared_data_dir), "--save-dir", str(save_dir)]
    assert sweep.main(argv) == 0 and len(started) == 1 and len(finished_runs(save_dir)) == 1
    (save_dir / "sweep.db").unlink()  # lost: the default database is made again, empty
    for database in ([], ["--storage", f"sqlite:///{tmp_path / 'new.db'}"]):
        assert sweep.main([*argv, *database]) == 0
        assert len(started) == 1 and len(finished_runs(save_dir)) == 1, database


def test_seeds_are_listed_and_ranges_include_both_ends():
    for text, seeds in (("3", [3]), ("0-2", [0, 1, 2]), ("0-2,5,7-8", [0, 1, 2, 5, 7, 8]), ("4-4", [4])):
        assert sweep.parse_seeds(text) == seeds, text


@pytest.mark.parametrize(
    "text, why",
    [
        (ALIAS_BOMB, "it uses YAML anchors or aliases"),
        (yaml.safe_dump({**dict.fromkeys(CONFIG_KEYS), "trainer": {"max_epochs": "10"}}), "no whole number"),
        ("- a list", "not a YAML mapping"),
    ],
)
def test_a_run_whose_config_yaml_cannot_be_read_is_not_resumed_blindly(tmp_path, text, why):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not read")
    (run_dir / "config.yaml").write_text(text)
    with pytest.raises(UserError, match=f"{why}.*cannot tell whether it can go on"):
        sweep.resumable(run_dir)
