"""configs/*.yaml: each recipe loads, builds, trains a step, records itself, and goes on into the full stage."""

import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import digits, loss_before_and_after_one_step

from mnist_lit.checkpoint_file import load_checkpoint
from mnist_lit.data import MNISTDataModule
from mnist_lit.flags import CONFIGS, recipe_names
from mnist_lit.inference import module_from_checkpoint
from mnist_lit.loss import nll_loss
from mnist_lit.module import MNISTLitModule
from mnist_lit.net import SlimNet
from mnist_lit.train import main

HERE = Path(__file__).resolve().parent
# The strong recipe's bf16 autocast runs ~7x slower on CPUs without AVX-512 (configs/strong.yaml): the tests of what it
# does besides (EMA, augmentation, recomputed BatchNorm statistics) run it in float32. bf16 itself is tested where
# it is the subject (test_cli_settings.py, the fast recipe below).
STRONG_IN_FLOAT32 = ["--recipe", "strong", "--precision", "32-true"]


def resolved(capsys, *argv) -> dict:
    """The settings --print_config resolves for these options."""
    capsys.readouterr()
    assert main([*map(str, argv), "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_recipe_file_is_found_and_names_itself():
    assert recipe_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "full")
    assert "seed" in recipe_names()  # always read first
    for name in recipe_names():
        assert yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["recipe"] == name


@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_resolves_to_its_files_settings_over_the_defaults(recipe, capsys):
    config = resolved(capsys, "--recipe", recipe)
    assert config == resolved(capsys, "--config", CONFIGS / f"{recipe}.yaml")  # --recipe is the short form
    own = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    for section in ("model", "data", "trainer"):
        for key, value in own.get(section, {}).items():
            if key != "callbacks":
                assert config[section][key] == value, (section, key)
    assert config["recipe"] == recipe and config["seed_everything"] == 0
    defaults = resolved(capsys)  # the seed recipe: the classes' defaults
    untouched = set(defaults["model"]) - set(own.get("model", {}))
    assert all(config["model"][key] == defaults["model"][key] for key in untouched)


def test_the_seed_recipe_is_the_original_protocol(capsys):
    config = resolved(capsys)
    model, data = config["model"], config["data"]
    assert (model["net"], model["optimizer"], model["lr"], model["momentum"]) == ("lenet", "sgd", 0.01, 0.5)
    assert (model["schedule"], model["milestones"], model["gamma"]) == ("multistep", [2, 10], 0.1)
    assert (data["batch_size"], data["eval_batch_size"], data["val_fraction"]) == (64, 250, 0.1)
    assert (config["trainer"]["max_epochs"], config["recipe"], config["stage"]) == (20, "seed", "initial")


def test_config_files_stack_the_later_wins(capsys, tmp_path):
    (tmp_path / "mine.yaml").write_text("model:\n  lr: 0.002\n")
    config = resolved(capsys, "--recipe", "fast", "--config", tmp_path / "mine.yaml")
    assert config["model"]["lr"] == 0.002 and config["model"]["net"] == "slim"
    assert resolved(capsys, "--config", tmp_path / "mine.yaml", "--recipe", "fast")["model"]["lr"] == 0.04
    assert resolved(capsys, "--recipe", "fast", "--lr", "0.003")["model"]["lr"] == 0.003  # the command line last


def model_of(recipe: str) -> MNISTLitModule:
    settings = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text()).get("model", {})
    return MNISTLitModule(**settings)


@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_builds_and_a_training_step_lowers_the_loss(recipe):
    config = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    torch.manual_seed(0)
    model = model_of(recipe)
    if model.hparams.schedule == "onecycle":  # a one-step run is too short for it: take its first step's lr
        model.hparams.lr /= 25  # OneCycleLR starts at max_lr / div_factor (25); the schedule is tested below
    model.hparams.schedule = "multistep"
    images, labels = digits(64, seed=0)
    precision = config.get("trainer", {}).get("precision", "32-true")
    before, after = loss_before_and_after_one_step(model, (images, labels.long()), precision)
    assert after < before


@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_runs_both_stages_and_is_recorded(recipe, shared_data_dir, tmp_path):
    common = ["--data-dir", str(shared_data_dir), "--save-dir", str(tmp_path), "--quiet"]
    assert main([*common, "--recipe", recipe, "--epochs", "2"]) == 0
    config = yaml.safe_load((tmp_path / "initial" / "version_0" / "config.yaml").read_text())
    model = model_of(recipe).hparams
    assert config["recipe"] == recipe and config["model"]["net"] == model.net
    assert config["model"]["optimizer"] == model.optimizer
    assert main([*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3"]) == 0
    full = yaml.safe_load((tmp_path / "full" / "version_0" / "config.yaml").read_text())
    assert (full["recipe"], full["model"]["net"], full["model"]["optimizer"]) == (recipe, model.net, model.optimizer)
    assert (full["model"]["lr"], full["model"]["schedule"], full["model"]["milestones"]) == (1e-4, "multistep", [])
    assert full["trainer"]["callbacks"] == config["trainer"]["callbacks"]  # the EMA goes on with the strong recipe


def test_onecycle_peaks_at_lr_and_anneals():
    module = model_of("fast")
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=200)  # what configure_optimizers reads
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(200):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = module.hparams.lr
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
    common = ["--data-dir", str(shared_data_dir), "--quiet", *STRONG_IN_FLOAT32, "--epochs", "3"]
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
    assert main([*common, *STRONG_IN_FLOAT32, "--epochs", "2"]) == 0
    path = tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(path)
    model = module_from_checkpoint(ckpt, path)
    data = yaml.safe_load((CONFIGS / "strong.yaml").read_text())["data"]
    datamodule = MNISTDataModule(shared_data_dir, val_fraction=data["val_fraction"])
    datamodule.setup()
    model.recompute_batchnorm_stats(datamodule.train_set[0], datamodule.hparams.eval_batch_size)
    stats = [k for k in ckpt["state_dict"] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        torch.testing.assert_close(model.state_dict()[key], ckpt["state_dict"][key], msg=key)
