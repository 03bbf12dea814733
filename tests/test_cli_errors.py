"""scripts/train.py on bad input: bad options, checkpoints, data and settings give one error line, exit 2, and
no run folder."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run

from mnist_lit.runs import run_dirs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stage", "full"], "--stage full needs --ckpt"),
        (["--ckpt", "missing.ckpt"], "missing.ckpt not found"),
        (["--lr", "-1"], "model.lr must be > 0"),
        (["--lr", "abc"], 'Parser key "model.lr": Expected a'),
        (["--batch-size", "0"], "data.batch_size and data.eval_batch_size must be >= 1"),
        (["--val-fraction", "1"], "data.val_fraction must be between 0 and 1"),
        (["--milestones", "10", "2"], "model.milestones must be increasing"),
        (["--model.optimizer", "rmsprop"], 'Parser key "model.optimizer"'),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--stage", "half"], 'Parser key "stage"'),
        (["--no-such-option"], "unrecognized arguments"),
        (["--config", "nowhere.yaml"], "nowhere.yaml"),
        (["--epochs", "3", "--trainer.check_val_every_n_epoch", "2"], "skips the evaluation of the last epoch (3)"),
    ],
)
def test_bad_options_give_one_error_line(argv, message, shared_data_dir, tmp_path, capsys):
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "initial").exists()  # no run directory for a run that never started


class RunsCode:
    """Unpickling this would call os.system: a checkpoint holding it must be refused, not loaded."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_bad_checkpoints_are_refused(initial_run, tmp_path, capsys):
    data_dir, save_dir, initial_dir = initial_run
    last = initial_dir / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:5000])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    other_net = tmp_path / "other_net.ckpt"
    changed = torch.load(last, weights_only=True)
    changed["state_dict"]["net.fc1.weight"] = torch.zeros(300, 800)  # another architecture's layer
    torch.save(changed, other_net)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"stage": "initial"}, "payload": RunsCode()}, evil)
    cases = [
        (["--ckpt", truncated], "not a readable checkpoint"),
        (["--ckpt", text], "not a readable checkpoint"),
        (["--ckpt", foreign], "not an mnist_lit checkpoint"),
        (["--ckpt", evil], "refused, it asks to load posix.system"),
        (["--ckpt", other_net], "its weights do not fit the lenet architecture"),
        (["--ckpt", last, "--epochs", "4"], "not beyond the checkpoint's epoch 4"),
        (["--ckpt", last, "--lr", "0.1"], "model.lr 0.1 differs from the checkpoint's 0.05"),
        (["--ckpt", last, "--dataset", "kmnist"], "data.dataset kmnist differs from the checkpoint's mnist"),
        (["--ckpt", last, "--recipe", "fast"], "differs from the checkpoint's"),
        (["--stage", "full", "--ckpt", last, "--net", "slim"], "weights: model.net slim differs from its lenet"),
        (["--ckpt", tmp_path], "a folder, not a checkpoint file"),
        (["--stage", "full", "--ckpt", last, "--trainer.check_val_every_n_epoch", "5"], "last epoch (24)"),
        (["--stage", "full", "--ckpt", last, "--full_epochs", "0"], "--full_epochs must be an integer >= 1 (got 0)"),
    ]
    for argv, message in cases:
        assert run("--data-dir", data_dir, "--save-dir", tmp_path / "logs", "--quiet", *argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "logs").exists()  # none of them made a run directory


def test_corrupt_data_fails_before_a_run_directory_is_made(data_dir, tmp_path, capsys):
    images = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    assert run("--data-dir", data_dir, "--save-dir", tmp_path / "logs", "--quiet") == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "logs" / "initial").exists()


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert run("--data-dir", tmp_path / "data", "--save-dir", tmp_path / "logs", "--quiet") == 2
    assert "mnist files missing in" in capsys.readouterr().err


def test_missing_data_offline(tmp_path, capsys):
    assert run("--data-dir", tmp_path / "nothing", "--save-dir", tmp_path / "logs", "--quiet") == 2
    err = capsys.readouterr().err
    assert "mnist files missing" in err and "train-images-idx3-ubyte" in err and err.count("\n") == 1
    assert not (tmp_path / "logs" / "initial").exists()
    assert not (tmp_path / "nothing").exists()  # the failed download leaves no empty folders


@pytest.mark.parametrize(
    "argv",
    [
        ["--strategy", "no_such_strategy"],
        ["--num-nodes", "0"],
        pytest.param(
            ["--accelerator", "gpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_options_the_trainer_refuses_leave_no_run_directory(argv, shared_data_dir, tmp_path, capsys):
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Trainer refused the options: ") and err.count("\n") == 1, err
    assert run_dirs(tmp_path, "initial") == []  # so `--ckpt last.ckpt` still finds the last real run


@pytest.mark.parametrize(
    "argv, patch, message",
    [
        (["--trainer.callbacks+=ModelCheckpoint"], None, "the Trainer refused the options: Found more than one"),
        (
            ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=x", "--trainer.callbacks.mode=bad"],
            None,
            "the settings could not be built: `mode` can be min, max, got bad",
        ),
        (
            ["--trainer.callbacks+=DeviceStatsMonitor"],
            "psutil missing",
            "the run could not start: `DeviceStatsMonitor` cannot log CPU stats as `psutil` is not installed",
        ),
    ],
)
def test_settings_the_trainer_cannot_use_give_one_line_and_no_run_folder(
    argv, patch, message, shared_data_dir, tmp_path, capsys, monkeypatch
):
    if patch == "psutil missing":
        monkeypatch.setattr("pytorch_lightning.callbacks.device_stats_monitor._PSUTIL_AVAILABLE", False)
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet", "--epochs", "1", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert run_dirs(tmp_path, "initial") == []


def test_save_dir_that_is_a_file(shared_data_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path / "afile", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot make the run folder under ") and err.count("\n") == 1, err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_script_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--stage", "full", "--save-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: --stage full needs --ckpt: the initial stage's checkpoint to go on from (e.g. last.ckpt)"
    ]
