"""scripts/tune.py: two worker processes, each in a folder of its own, on one study (sqlite, PostgreSQL) run its 3
trials between them, each exactly once; the trial given a hopeless lr is pruned after its first epoch
(--prune-below); best.yaml is a config train.py takes as it is; bad space files."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from mnist_lit.experiments import tune
from mnist_lit.train import main as train

TUNE = Path(__file__).resolve().parents[1] / "scripts" / "tune.py"
SPACE = """
model.lr: {type: float, low: 0.03, high: 0.1, log: true}
data.batch_size: {type: categorical, choices: [16, 32]}
"""
HOPELESS = {"model.lr": 1e-9, "data.batch_size": 16}  # learns nothing: below --prune-below after epoch 1


@pytest.fixture(scope="module")
def tuned(new_database, shared_data_dir, tmp_path_factory):
    """The two workers' study, their outputs, their save dirs."""
    root, storage = tmp_path_factory.mktemp("tune"), new_database()
    optuna.create_study(study_name="t", storage=storage, direction="maximize").enqueue_trial(HOPELESS)
    (root / "space.yaml").write_text(SPACE)
    command = [
        sys.executable,
        str(TUNE),
        "--space",
        str(root / "space.yaml"),
        "--trials",
        "3",
        "--storage",
        storage,
        "--study",
        "t",
        "--epochs",
        "1",
        "--prune-below",
        "0.3",
        "--data-dir",
        str(shared_data_dir),
        "--quiet",
    ]
    save_dirs = [root / f"worker{seed}" for seed in (0, 1)]
    workers = [
        subprocess.Popen(
            [*command, "--seed", str(seed), "--save-dir", str(save_dir)],
            cwd=root,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed, save_dir in enumerate(save_dirs)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, out[-3000:] + err[-3000:]
    return optuna.load_study(study_name="t", storage=storage), outputs, save_dirs


@pytest.mark.slow
def test_two_workers_run_each_trial_once_and_prune_the_hopeless_one(tuned):
    study, outputs, save_dirs = tuned
    trials = study.get_trials()
    surplus = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]  # both workers took the last slot
    assert [t.number for t in surplus] in ([], [3]) and all("run_dir" not in t.user_attrs for t in surplus)
    trials = [t for t in trials if t.state != optuna.trial.TrialState.FAIL]
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] + [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].params == HOPELESS and trials[0].intermediate_values[1] < 0.3
    assert all(0.03 <= t.params["model.lr"] <= 0.1 and t.value == t.intermediate_values[1] for t in trials[1:])
    runs = sorted(p.parent for save_dir in save_dirs for p in (save_dir / "initial").glob("version_*/results.json"))
    assert sorted(Path(t.user_attrs["run_dir"]) for t in trials) == runs  # one run per trial, none twice
    assert {"started": 2, "ran": 3} == {
        "started": sum("study t:" in out for out, _ in outputs),
        "ran": sum(out.count("+ train.py") for out, _ in outputs),
    }


@pytest.mark.slow
def test_best_yaml_is_a_config_train_py_takes(tuned, capsys):
    study, _, save_dirs = tuned
    written = [save_dir / "best.yaml" for save_dir in save_dirs if (save_dir / "best.yaml").exists()]
    path = next(p for p in written if f", trial {study.best_trial.number}," in p.read_text())  # the last to finish's
    best = yaml.safe_load(path.read_text())
    assert best["model"]["lr"] == study.best_params["model.lr"] and best["recipe"] == "seed-tuned"
    capsys.readouterr()
    assert train(["--config", str(path), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["lr"] == study.best_params["model.lr"]
    assert config["data"]["batch_size"] == study.best_params["data.batch_size"]
    assert config["trainer"]["max_epochs"] == 1 and config["recipe"] == "seed-tuned"


@pytest.mark.parametrize(
    "space, message",
    [
        (None, "no-such.yaml: No such file or directory"),
        ("[1, 2]", "a mapping of settings to ranges"),
        ("model.lr: {type: float, low: 0.1, high: 0.01}", "model.lr: give a train.py setting"),
        ("lr: {type: float, low: 0.01, high: 0.1}", "lr: give a train.py setting"),
        ("model.net: {type: categorical, choices: []}", "model.net: give a train.py setting"),
        ("model.lr: {type: float, low: 0, high: 0.1, log: true}", "model.lr: give a train.py setting"),
    ],
)
def test_bad_space_is_one_line_and_exit_2(space, message, tmp_path, capsys):
    path = tmp_path / ("no-such.yaml" if space is None else "space.yaml")
    if space is not None:
        path.write_text(space)
    assert tune.main(["--space", str(path), "--trials", "2", "--save-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --space {path}") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists()


def test_the_search_keeps_the_most_accurate_trial(shared_data_dir, tmp_path, monkeypatch):
    """A search between a learning rate that learns and one that learns nothing: best.yaml is the one that learns
    (train.py runs in-process here, as the search would start it)."""
    from mnist_lit.experiments import launch

    def run_train_here(argv, jobs):
        if train(argv) != 0:
            raise launch.RunFailed(f"train.py {argv}")

    monkeypatch.setattr(launch, "run_train", run_train_here)
    (tmp_path / "space.yaml").write_text("model.lr: {type: categorical, choices: [1.0e-9, 0.05]}\n")
    argv = ["--space", tmp_path / "space.yaml", "--trials", "3", "--epochs", "1", "--quiet"]  # 3: none pruned
    assert tune.main([str(a) for a in [*argv, "--data-dir", shared_data_dir, "--save-dir", tmp_path / "t"]]) == 0
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 't' / 'tune.db'}")
    values = {trial.params["model.lr"]: trial.value for trial in study.trials}
    assert set(values) == {1e-9, 0.05} and values[0.05] > values[1e-9]  # both were tried (the sampler's seed 0)
    assert yaml.safe_load((tmp_path / "t" / "best.yaml").read_text())["model"]["lr"] == 0.05
