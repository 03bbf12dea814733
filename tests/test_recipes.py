"""mnist_lit.recipes: each recipe builds, trains a step, records itself, and goes on into the full stage."""

import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import digits, loss_before_and_after_one_step

from mnist_lit.data import MNISTDataModule, normalize
from mnist_lit.errors import UserError
from mnist_lit.inference import load_checkpoint, module_from_checkpoint
from mnist_lit.loss import nll_loss
from mnist_lit.module import MNISTLitModule
from mnist_lit.net import SlimNet
from mnist_lit.recipes import DATA_ONLY, RECIPES
from mnist_lit.training import choose_settings, main, parse_args

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_builds_and_a_training_step_lowers_the_loss(recipe):
    settings = {k: v for k, v in RECIPES[recipe].items() if k not in DATA_ONLY}
    torch.manual_seed(0)
    model = MNISTLitModule(**{**settings, "schedule": "multistep"})  # onecycle warms up from lr/25: tested below
    images, labels = digits(64, seed=0)
    before, after = loss_before_and_after_one_step(model, (normalize(images), labels.long()), settings["precision"])
    assert after < before


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_both_stages_and_is_recorded(recipe, shared_data_dir, tmp_path):
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), "--quiet"]
    assert main([*common, "--recipe", recipe, "--epochs", "2"]) == 0
    hparams = yaml.safe_load((tmp_path / "initial" / "version_0" / "hparams.yaml").read_text())
    assert hparams["recipe"] == recipe and hparams["net"] == RECIPES[recipe]["net"]
    assert hparams["optimizer"] == RECIPES[recipe]["optimizer"]
    assert main([*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3"]) == 0
    full = yaml.safe_load((tmp_path / "full" / "version_0" / "hparams.yaml").read_text())
    assert (full["recipe"], full["net"], full["lr"], full["schedule"]) == (recipe, hparams["net"], 1e-4, "multistep")


def test_recipe_settings_can_be_overridden_but_not_on_a_checkpoint():
    settings, epochs = choose_settings(parse_args(["--recipe", "fast", "--lr", "0.002"]), None, resume=False)
    assert settings["lr"] == 0.002 and settings["net"] == "slim" and epochs == RECIPES["fast"]["epochs"]
    settings, _ = choose_settings(parse_args(["--recipe", "strong", "--ema-decay", "0.9995"]), None, resume=False)
    assert settings["ema_decay"] == 0.9995 and settings["net"] == "wide"
    fast_ckpt = {"hyper_parameters": {**RECIPES["fast"], "stage": "initial"}, "epoch": 0}
    with pytest.raises(UserError, match="--recipe strong differs from the checkpoint's fast"):
        choose_settings(parse_args(["--recipe", "strong"]), fast_ckpt, resume=True)
    settings, _ = choose_settings(parse_args(["--recipe", "fast"]), fast_ckpt, resume=True)  # the same command
    assert settings["net"] == "slim"


def test_seed_recipe_is_the_original_protocol():
    settings, epochs = choose_settings(parse_args([]), None, resume=False)
    assert (settings["milestones"], settings["lr"], settings["momentum"], epochs) == ([2, 10], 0.01, 0.5, 20)
    assert (settings["batch_size"], settings["eval_batch_size"], settings["val_fraction"]) == (64, 1000, 0.1)


def test_onecycle_peaks_at_lr_and_anneals():
    module = MNISTLitModule(**{k: v for k, v in RECIPES["fast"].items() if k not in DATA_ONLY})
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=200)  # what configure_optimizers reads
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(200):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = RECIPES["fast"]["lr"]
    assert lrs[0] == pytest.approx(lr / 25)  # OneCycle's warm-up start
    assert max(lrs) == pytest.approx(lr) and 50 <= lrs.index(max(lrs)) <= 70  # the peak, at ~30 % of the steps
    assert lrs[-1] < lr * 1e-4  # annealed to ~0 by the stage's last step


def test_slim_net_and_label_smoothing():
    assert SlimNet()(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    log_probs = torch.log(torch.tensor([[0.9, 0.1]]))
    target = torch.tensor([0])
    smoothed = nll_loss(log_probs, target, label_smoothing=0.2)  # target 0.9 / 0.1 after smoothing
    assert smoothed.item() == pytest.approx(-(0.9 * torch.log(torch.tensor(0.9)) + 0.1 * torch.log(torch.tensor(0.1))))
    assert nll_loss(log_probs, target).item() == pytest.approx(-torch.log(torch.tensor(0.9)).item())


def test_strong_recipe_resumes_exactly_with_augmentation_and_ema(shared_data_dir, tmp_path):
    """Augmentation draws depend on (seed, step) and Lightning's EMA callback keeps its state in checkpoints:
    a strong-recipe run killed in epoch 2 resumes to the same weights as an uninterrupted one."""
    common = ["--data-dir", str(shared_data_dir), "--quiet", "--recipe", "strong", "--epochs", "3"]
    assert main([*common, "--save-dir", str(tmp_path / "a")]) == 0
    # 288 training images, batch 128: 3 steps per epoch; step 4 is in epoch 2.
    killed = subprocess.run(
        [sys.executable, str(HERE / "kill_at.py"), "train-step-4", *common, "--save-dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resume = ["--data-dir", str(shared_data_dir), "--quiet", "--save-dir", str(tmp_path / "b"), "--ckpt", "last.ckpt"]
    assert main([*resume, "--epochs", "4"]) == 2  # a onecycle schedule is fixed by its epochs
    assert main(resume) == 0
    a = torch.load(tmp_path / "a" / "initial" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "initial" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):  # the averaged weights and the trained ones
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_strong_recipe_saves_batchnorm_statistics_recomputed_for_the_averaged_weights(shared_data_dir, tmp_path):
    """The EMA's running statistics are averages over steps; the final checkpoint's are those of the training
    images under the averaged weights (recomputed before the last validation)."""
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), "--quiet"]
    assert main([*common, "--recipe", "strong", "--epochs", "2"]) == 0
    path = tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(path)
    model = module_from_checkpoint(ckpt, path)
    datamodule = MNISTDataModule(shared_data_dir, val_fraction=RECIPES["strong"]["val_fraction"])
    datamodule.setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.recompute_batchnorm_stats(datamodule.train_set[0])
    stats = [k for k in ckpt["state_dict"] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        torch.testing.assert_close(model.state_dict()[key], ckpt["state_dict"][key], msg=key)
