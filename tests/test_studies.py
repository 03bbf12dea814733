"""Studies across machines: sweep.py workers that share only a database URL (a sqlite file, or a real PostgreSQL
server on the loopback: the tests' `postgres` variants), each in a working folder and --save-dir of its own, as
on separate machines. Every grid point runs once; the trial of a worker killed with SIGKILL is run again by
another; scripts/runs.py reads the same table from the database as from the folders; optuna-dashboard serves the
study; a database that cannot be opened is one line and exit code 2."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from mnist_lit.experiments import sweep, table, tune

HERE = Path(__file__).resolve().parent
SWEEP = HERE.parent / "scripts" / "sweep.py"
GRID = ["--seeds", "0-1", "--set", "model.lr=0.02,0.05", "--epochs", "1", "--quiet", "--heartbeat", "2"]
POINTS = [(seed, lr) for seed in ("0", "1") for lr in ("0.02", "0.05")]  # a point per worker
# A sitecustomize module (imported by every Python process at start-up): the first train.py run of all the workers
# SIGKILLs its process group, its worker and itself, in the validation of its epoch 1, before it has a result.
HOOK = f"""
import os, signal, sys
if sys.argv[0].endswith("train.py"):
    try:
        os.close(os.open(os.environ["SWEEP_TEST_KILLED"], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:
        sys.path.insert(0, {str(HERE)!r})
        import kill_at
        kill_at.die = lambda: os.killpg(0, signal.SIGKILL)
        kill_at.arm("validation-epoch-1")
"""


def point_of(args: list[str]) -> tuple[str, str]:
    return args[args.index("--seed_everything") + 1], args[args.index("--model.lr") + 1]


def finished_runs(save_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (save_dir / "initial").glob("version_*/results.json"))


@pytest.fixture(scope="module")
def four_workers(new_database, shared_data_dir, tmp_path_factory):
    """Four sweep.py workers on one grid of 4 points, each in its own folder; the worker whose train.py started
    first is killed mid-run. Their database URL, the workers' save dirs, their outputs (killed one first)."""
    url, root = new_database(), tmp_path_factory.mktemp("workers")
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "SWEEP_TEST_KILLED": str(root / "killed")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "hook"), os.environ.get("PYTHONPATH")]))
    workers, save_dirs = [], [root / f"machine{i}" / "runs" for i in range(4)]
    for save_dir in save_dirs:
        save_dir.parent.mkdir()
        command = [
            sys.executable,
            str(SWEEP),
            *GRID,
            "--storage",
            url,
            "--data-dir",
            str(shared_data_dir),
            "--save-dir",
            str(save_dir),
        ]
        workers.append(
            subprocess.Popen(
                command,
                cwd=save_dir.parent,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    codes = [worker.returncode for worker in workers]
    assert sorted(codes) == [-signal.SIGKILL, 0, 0, 0], "\n".join(
        out[-3000:] for out, code in zip(outputs, codes) if code != 0
    )
    order = sorted(range(4), key=lambda i: codes[i] != -signal.SIGKILL)
    return url, [save_dirs[i] for i in order], [outputs[i] for i in order]


@pytest.mark.slow
def test_four_workers_run_each_grid_point_once(four_workers):
    _, save_dirs, outputs = four_workers
    finished = [run for save_dir in save_dirs for run in finished_runs(save_dir)]
    points = [point_of(shlex.split((run / "command.txt").read_text())) for run in finished]
    assert sorted(points) == POINTS  # each point finished once, in one of the workers' folders
    started = [
        point_of(shlex.split(line)) for out in outputs for line in out.splitlines() if line.startswith("+ train.py ")
    ]
    assert len(started) == len(POINTS) + 1  # the killed run and no other run twice
    assert all(json.loads((run / "results.json").read_text())["epoch"] == 1 for run in finished)


@pytest.mark.slow
def test_a_killed_workers_trial_is_run_again_once_by_another(four_workers):
    url, save_dirs, outputs = four_workers
    (killed_line,) = [line for line in outputs[0].splitlines() if line.startswith("+ train.py ")]
    killed = point_of(shlex.split(killed_line))
    assert not finished_runs(save_dirs[0])  # it died before its run finished
    again = [out for out in outputs[1:] if f"--seed_everything {killed[0]} --model.lr {killed[1]}" in out]
    assert len(again) == 1 and again[0].count(f"--seed_everything {killed[0]} --model.lr {killed[1]} ") == 1
    study = optuna.load_study(study_name=None, storage=url)
    trials = [t for t in study.trials if (str(t.params["seed_everything"]), t.params["model.lr"]) == killed]
    states = [t.state for t in trials]
    assert states[0] == optuna.trial.TrialState.FAIL  # failed as stale, then run by another worker
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "run_dir" in t.user_attrs]
    assert len(ran) == 1 and Path(ran[0].user_attrs["run_dir"]).parent.parent in save_dirs[1:]
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)


@pytest.mark.slow
def test_runs_py_reads_from_the_database_what_the_folders_hold(four_workers):
    url, save_dirs, _ = four_workers
    folders = sorted(map(str, save_dirs))
    for view in ([], ["--group-by", "model.lr"], ["--format", "csv"]):
        finished = ["--filter", "status=finished", *view]  # the killed run left a failed folder, not a trial
        assert table.report(["--storage", url, *finished]) == table.report([*folders, *finished])
    rows = table.report([*folders, "--format", "csv"]).splitlines()[1:]
    assert len(rows) == len(POINTS) + 1 and sum(row.endswith(",failed") for row in rows) == 1
    header, *rows = table.report(["--storage", url, "--study", optuna.get_all_study_names(url)[0]]).splitlines()
    assert header.split()[:3] == ["save", "dir", "stage"] and len(rows) == len(POINTS)


def test_runs_py_from_a_study_shows_each_run_once_and_tells_hosts_apart(new_database):
    url = new_database()
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for host, seed, correct in (("a", 0, 90), ("a", 0, 90), ("b", 1, 80)):  # the second: a trial that reused a run
        trial = study.ask()
        trial.set_user_attr("host", host)
        trial.set_user_attr("run_dir", "/runs/initial/version_0")
        trial.set_user_attr("settings", {"seed_everything": str(seed), "stage": "initial", "recipe": "seed"})
        trial.set_user_attr(
            "results",
            {"epoch": 1, "split": "val", "correct": correct, "count": 100, "acc": correct / 100, "wall_s": 1.5},
        )
        study.tell(trial, correct / 100)
    assert table.report(["--storage", url, "--format", "csv"]).splitlines() == [
        "save dir,stage,version,recipe,seed_everything,epoch,split,correct/count,acc %,wall s,status",
        "a:/runs,initial,0,seed,0,1,val,90/100,90.00,1.5,finished",
        "b:/runs,initial,0,seed,1,1,val,80/100,80.00,1.5,finished",
    ]


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(script: str, url: str, tmp_path: Path) -> tuple:
    """A script's main and arguments that open the database at `url` first of all."""
    (tmp_path / "space.yaml").write_text("model.lr: {type: float, low: 0.01, high: 0.1}")
    save = ["--storage", url, "--save-dir", str(tmp_path / "s")]
    return {
        "sweep": (sweep.main, ["--seeds", "0", *save]),
        "tune": (tune.main, ["--space", str(tmp_path / "space.yaml"), "--trials", "1", *save]),
        "runs": (table.main, ["--storage", url]),
    }[script]


def one_line_and_exit_2(capsys, main, argv, message: str) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("script", ["sweep", "tune", "runs"])
def test_a_database_server_that_is_down_is_one_line_and_exit_2(script, tmp_path, capsys):
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install -e '.[postgres]'")
    url = f"postgresql://mnist:secret@127.0.0.1:{closed_port()}/studies"
    err = one_line_and_exit_2(capsys, *command(script, url, tmp_path), "cannot open the database postgresql://mnist:")
    assert "refused" in err and "secret" not in err and not (tmp_path / "s").exists()  # nothing made


@pytest.mark.parametrize("script", ["sweep", "tune", "runs"])
def test_a_wrong_postgres_password_is_one_line_and_exit_2(script, postgres_server, tmp_path, capsys):
    url = postgres_server.replace("postgresql://mnist:", "postgresql://mnist:wrong")
    err = one_line_and_exit_2(capsys, *command(script, url, tmp_path), "cannot open the database postgresql://mnist:")
    assert "password authentication failed" in err and "wrong" not in err and not (tmp_path / "s").exists()


def test_runs_py_an_unknown_study_or_database_is_one_line_and_exit_2(new_database, tmp_path, capsys):
    url = new_database()
    optuna.create_study(study_name="a", storage=url)
    optuna.create_study(study_name="b", storage=url)
    one_line_and_exit_2(capsys, table.main, ["--storage", url, "--study", "c"], "no study 'c' in ")
    one_line_and_exit_2(capsys, table.main, ["--storage", url], "give --study NAME: there is more than one in ")
    assert capsys.readouterr().err == ""
    missing = tmp_path / "missing.db"
    one_line_and_exit_2(capsys, table.main, ["--storage", f"sqlite:///{missing}"], "cannot open the database")
    assert not missing.exists()  # not made by looking


def test_the_dashboard_serves_the_study(new_database, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="no optuna-dashboard: pip install -e '.[dashboard]'")
    url = new_database()
    study = optuna.create_study(study_name="lr", storage=url, direction="maximize")
    trial = study.ask({"model.lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    trial.set_user_attr("run_dir", "/runs/initial/version_0")
    study.tell(trial, 0.97)
    port = closed_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):  # until it answers (a few seconds)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    studies = json.load(answer)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.communicate()[0][-2000:]
                time.sleep(0.1)
        else:
            pytest.fail("optuna-dashboard did not answer within 30 s")
        (summary,) = studies
        assert summary["study_name"] == "lr"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}") as answer:
            (shown,) = json.load(answer)["trials"]
        assert (
            shown["values"] == [0.97] and {"key": "run_dir", "value": "/runs/initial/version_0"} in shown["user_attrs"]
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard") as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
