"""Crashes and divergence: a run killed at any moment resumes to the same weights; NaN stops cleanly."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_lit import module
from mnist_lit.train import main

HERE = Path(__file__).resolve().parent
# 320 training images -> 288 train / 32 val, batch 64 -> 5 steps per epoch; 4 epochs = global steps 0..19.
ARGS = ["--epochs", "4", "--lr", "0.05", "--milestones", "2", "3", "--deterministic", "--quiet"]


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(shared_data_dir, tmp_path_factory):
    """The final weights of an uninterrupted run."""
    save_dir = tmp_path_factory.mktemp("reference")
    assert main(["--data-dir", str(shared_data_dir), "--save-dir", str(save_dir), *ARGS]) == 0
    return last_weights(save_dir / "initial" / "version_0")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that breaks off leaves the previous file whole: the bytes go to a .part file first."""
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    from mnist_lit.checkpoint_io import RunCheckpointIO

    def breaks_off(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", breaks_off)
    with pytest.raises(OSError, match="disk full"):
        RunCheckpointIO().save_checkpoint({"epoch": 1}, target)
    assert target.read_bytes() == b"the previous checkpoint"
    monkeypatch.undo()
    RunCheckpointIO().save_checkpoint({"epoch": 2}, target)
    assert torch.load(target, weights_only=True) == {"epoch": 2} and not list(tmp_path.glob("*.part"))


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["train-step-12", "validation-epoch-3", "ckpt-write-3"])
def test_killed_run_resumes_to_identical_weights(moment, reference, shared_data_dir, tmp_path):
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), *ARGS]
    killed = subprocess.run(
        [sys.executable, str(HERE / "kill_at.py"), moment, *common], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    killed_dir = tmp_path / "initial" / "version_0"
    # Killed during epoch 3 (or while writing its checkpoint): last.ckpt is the complete one of epoch 2.
    assert torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    assert main([*common, "--ckpt", "last.ckpt"]) == 0  # resumes into version_1
    resumed = last_weights(tmp_path / "initial" / "version_1")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # bit for bit
    assert (killed_dir / "checkpoints" / "last.ckpt").is_file()  # the killed run's files are kept


def test_a_nan_or_infinite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    shared_data_dir, tmp_path, monkeypatch, capsys
):
    real_loss = module.nll_loss
    # From global step 12 (epoch 3, 3rd batch): a NaN loss, or an infinite one whose gradients stay finite (the
    # weights stay finite, the epoch's mean loss is inf, not NaN).
    for name, broken in (("nan", lambda loss: loss * float("nan")), ("inf", lambda loss: loss + float("inf"))):
        calls = []

        def loss_that_breaks(log_probs, targets, label_smoothing=0.0, calls=calls, broken=broken):
            if torch.is_grad_enabled():  # training steps only
                calls.append(1)
            loss = real_loss(log_probs, targets, label_smoothing)
            return broken(loss) if len(calls) > 12 else loss

        monkeypatch.setattr(module, "nll_loss", loss_that_breaks)
        save_dir = tmp_path / name
        assert main(["--data-dir", str(shared_data_dir), "--save-dir", str(save_dir), *ARGS]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the loss is not finite in epoch 3; stopped before saving" in err, err
        run_dir = save_dir / "initial" / "version_0"
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["epoch"] == 1  # epoch 2's checkpoint, not overwritten by the broken epoch 3
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
        assert not (run_dir / "results.json").exists(), name


@pytest.mark.slow
def test_killed_full_stage_is_resumed_not_restarted(shared_data_dir, tmp_path, capsys):
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), "--deterministic", "--quiet"]
    assert main([*common, "--epochs", "2", "--lr", "0.05"]) == 0
    full = [*common, "--stage", "full", "--epochs", "4"]
    assert main([*full, "--ckpt", "last.ckpt"]) == 0  # uninterrupted: full/version_0
    # The same again, killed in epoch 4 (global steps 15-19: 5 steps per epoch on all 320 images).
    initial_last = tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    killed = subprocess.run(
        [sys.executable, str(HERE / "kill_at.py"), "train-step-17", *full, "--ckpt", str(initial_last)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    capsys.readouterr()
    assert main([*full, "--ckpt", "last.ckpt"]) == 0  # resolves to the unfinished full/version_1: a resume
    assert "full/version_1/checkpoints/last.ckpt (that full-stage run did not finish" in capsys.readouterr().out
    lines = (tmp_path / "full" / "version_2" / "log.txt").read_text()
    assert "resuming" in lines and "epoch 4 " in lines and "epoch 3 " not in lines
    a, b = last_weights(tmp_path / "full" / "version_0"), last_weights(tmp_path / "full" / "version_2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_folder(shared_data_dir, tmp_path, monkeypatch):
    """Nothing in it to resume or use, and an empty newest run would break `--ckpt last.ckpt`."""
    real_loss = module.nll_loss
    monkeypatch.setattr(module, "nll_loss", lambda *args: real_loss(*args) * float("nan"))
    csv = ["--trainer.logger+=CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'csv'}"]  # logs at once
    assert main(["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), *ARGS, *csv]) == 2
    assert not (tmp_path / "initial").exists()  # no run folder, and no empty stage folder either
    assert not (tmp_path / "csv" / "lightning_logs").exists()  # nor a stray folder of the added logger
