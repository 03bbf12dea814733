"""scripts/train.py's settings: short and original spellings, configs that train a run again, Trainer options,
callbacks and loggers from the command line, what is kept on resume."""

import json

import pytest
import torch
import yaml
from helpers import epoch_lines, resolved_config, run, same_tensors

from mnist_lit.errors import UserError
from mnist_lit.evaluate import read_scalars
from mnist_lit.flags import expand_short_flags, recipe_names
from mnist_lit.module import MNISTLitModule


def test_original_and_short_spellings_are_the_full_names():
    old = expand_short_flags(["--train-full", "1", "--resume", "x.ckpt", "--epochs", "30", "--milestones", "2", "4"])
    assert old == ["--stage", "full", "--ckpt", "x.ckpt", "--trainer.max_epochs", "30", "--model.milestones=[2, 4]"]
    assert expand_short_flags(["--train-full", "0"]) == ["--stage", "initial"]
    assert expand_short_flags(["--lr=0.1", "--quiet", "--deterministic", "--milestones"]) == [
        "--model.lr",
        "0.1",
        "--quiet=true",
        "--trainer.deterministic=true",
        "--model.milestones=[]",
    ]
    assert expand_short_flags(["--recipe", "fast"])[1].endswith("configs/fast.yaml")
    with pytest.raises(UserError, match="contradicts"):
        expand_short_flags(["--train-full", "1", "--stage", "initial"])
    with pytest.raises(UserError, match=f"unknown --recipe 'slow': choose one of {', '.join(recipe_names())} "):
        expand_short_flags(["--recipe", "slow"])


def test_every_short_flag_sets_its_full_setting(capsys):
    """The short flags (README), written out here: each expands to its full name, which sets that setting."""
    spellings = {  # short flag: (full name, a value)
        "--dataset": ("--data.dataset", "kmnist"),
        "--batch-size": ("--data.batch_size", 32),
        "--eval-batch-size": ("--data.eval_batch_size", 100),
        "--val-fraction": ("--data.val_fraction", 0.2),
        "--net": ("--model.net", "slim"),
        "--lr": ("--model.lr", 0.02),
        "--momentum": ("--model.momentum", 0.7),
        "--epochs": ("--trainer.max_epochs", 7),
        "--precision": ("--trainer.precision", "bf16-mixed"),
        "--accelerator": ("--trainer.accelerator", "cpu"),
        "--devices": ("--trainer.devices", "1"),
        "--strategy": ("--trainer.strategy", "ddp"),
        "--num-nodes": ("--trainer.num_nodes", 2),
        "--seed": ("--seed_everything", 3),
        "--save-freq": ("--save_freq", 4),
    }
    short = [str(part) for flag, (_, value) in spellings.items() for part in (flag, value)]
    assert expand_short_flags(short) == [str(part) for full, value in spellings.values() for part in (full, value)]
    config = resolved_config(capsys, *short)
    for full, value in spellings.values():
        section, _, key = full[2:].rpartition(".")
        assert (config[section] if section else config)[key] == value, full


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_lightnings_banners(quiet, shared_data_dir, tmp_path, caplog):
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "1", "--precision", "bf16-mixed"]
    assert run(*argv, *(["--quiet"] if quiet else [])) == 0
    lightning = [r.getMessage() for r in caplog.records if r.name.startswith(("pytorch_lightning", "lightning_fabric"))]
    assert any("GPU available" in m for m in lightning) != quiet
    assert any("Automatic Mixed Precision" in m for m in lightning) != quiet
    assert len(epoch_lines(tmp_path / "initial" / "version_0")) == 1  # our own lines stay


def test_speed_options_are_recorded_kept_on_resume_and_given_to_the_trainer(shared_data_dir, tmp_path, monkeypatch):
    from mnist_lit.cli import MNISTCLI

    instantiate_trainer = MNISTCLI.instantiate_trainer
    precisions = []  # what each run's Trainer really got

    def recording(self, **kwargs):
        trainer = instantiate_trainer(self, **kwargs)
        precisions.append(trainer.precision)
        return trainer

    monkeypatch.setattr(MNISTCLI, "instantiate_trainer", recording)
    common = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--quiet"]
    assert run(*common, "--epochs", "2", "--precision", "bf16-mixed", "--channels-last") == 0
    config = yaml.safe_load((tmp_path / "initial" / "version_0" / "config.yaml").read_text())
    assert (config["trainer"]["precision"], config["model"]["channels_last"]) == ("bf16-mixed", True)
    assert run(*common, "--ckpt", "last.ckpt", "--epochs", "3", "--precision", "32-true") == 2
    assert run(*common, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3") == 0
    full = yaml.safe_load((tmp_path / "full" / "version_0" / "config.yaml").read_text())
    assert (full["trainer"]["precision"], full["model"]["channels_last"]) == ("bf16-mixed", True)
    assert precisions == ["bf16-mixed", "bf16-mixed"]  # the initial and the full stage's Trainers


def test_a_runs_config_yaml_trains_it_again_to_identical_weights(shared_data_dir, tmp_path):
    """config.yaml holds every setting: run from it alone, into a new folder, the weights are bit-identical."""
    assert (
        run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--recipe", "fast", "--lr", "0.02", "--quiet") == 0
    )
    first = tmp_path / "initial" / "version_0"
    assert run("--config", first / "config.yaml") == 0
    again = tmp_path / "initial" / "version_1"
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (first, again))
    assert same_tensors(a["state_dict"], b["state_dict"]) and a["global_step"] == b["global_step"] > 0
    assert a["config"] == (first / "config.yaml").read_text()  # the checkpoint carries it too


def test_gradient_clipping_and_accumulation_from_the_command_line(shared_data_dir, tmp_path):
    """Lightning's own options: 5 batches an epoch, accumulated by 2, are 3 optimizer steps; a tiny clipping
    norm keeps the weights where they started."""
    common = ["--data-dir", shared_data_dir, "--epochs", "1", "--lr", "0.05", "--quiet"]
    moved = {}
    for name, extra in (
        ("plain", []),
        ("accumulated", ["--trainer.accumulate_grad_batches", "2"]),
        ("clipped", ["--trainer.gradient_clip_val", "1e-6"]),
    ):
        assert run(*common, "--save-dir", tmp_path / name, *extra) == 0
        ckpt = torch.load(tmp_path / name / "initial" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        torch.manual_seed(0)
        start = {f"net.{k}": v for k, v in MNISTLitModule().net.state_dict().items()}
        moved[name] = max((ckpt["state_dict"][k] - v).abs().max().item() for k, v in start.items())
        moved[name + "_steps"] = ckpt["global_step"]
    assert (moved["plain_steps"], moved["accumulated_steps"], moved["clipped_steps"]) == (5, 3, 5)
    assert moved["plain"] > 1e-3 and moved["clipped"] < 1e-6


def test_trainer_options_callbacks_and_loggers_from_the_command_line(shared_data_dir, tmp_path):
    common = ["--data-dir", shared_data_dir, "--quiet", "--epochs", "2"]
    assert run(*common, "--save-dir", tmp_path / "limited", "--trainer.limit_train_batches", "2") == 0
    ckpt = tmp_path / "limited" / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    assert run(*common, "--save-dir", tmp_path / "dev", "--trainer.fast_dev_run", "true") == 0
    assert json.loads((tmp_path / "dev" / "initial" / "version_0" / "results.json").read_text())["epoch"] == 1
    extra = [  # stop as soon as val/acc reaches 0.01, i.e. after the first epoch; log to CSV too
        "--trainer.callbacks+=pytorch_lightning.callbacks.EarlyStopping",
        "--trainer.callbacks.monitor=val/acc",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.stopping_threshold=0.01",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'csv'}",
    ]
    assert run(*common, "--save-dir", tmp_path / "extra", *extra) == 0
    run_dir = tmp_path / "extra" / "initial" / "version_0"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["callbacks"][0]["class_path"] == "pytorch_lightning.callbacks.EarlyStopping"
    assert json.loads((run_dir / "results.json").read_text())["epoch"] == 1  # stopped by the extra callback
    assert "val/acc" in (next((tmp_path / "csv").rglob("metrics.csv"))).read_text()  # the second logger wrote
    assert len(read_scalars([run_dir])["acc/val"]) == 1  # and TensorBoard still has the run's curves


def test_a_run_leaves_the_loggers_as_it_found_them(shared_data_dir, tmp_path):
    import logging

    ours, lightning = logging.getLogger("mnist_lit"), logging.getLogger("pytorch_lightning")
    before = (ours.level, ours.propagate, lightning.level, list(ours.handlers))
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "1", "--quiet") == 0
    assert (ours.level, ours.propagate, lightning.level, list(ours.handlers)) == before


def test_the_runs_seed_reaches_the_data_and_the_models_random_draws(shared_data_dir, tmp_path):
    """--seed (seed_everything) decides the split and data order (data.seed) and augmentation and dropout draws
    (model.seed); the checkpoint records both."""
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--seed", "3", "--epochs", "1", "--quiet") == 0
    ckpt = torch.load(tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["seed"] == ckpt["datamodule_hyper_parameters"]["seed"] == 3
