"""scripts/train.py end to end on small IDX files: what an initial run leaves, the full stage going on from it,
resume, which checkpoint a bare name means, run_all.sh, TensorBoard's record of both."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    INITIAL,
    ROOT,
    epoch_lines,
    event_scalar_tags,
    hparams_in_events,
    net_weights,
    quiet_trainer,
    resolved_config,
    run,
    same_tensors,
)

from mnist_lit.data import MNISTDataModule, normalize
from mnist_lit.errors import UserError
from mnist_lit.evaluate import read_scalars, run_chain
from mnist_lit.loss import nll_loss
from mnist_lit.module import MNISTLitModule
from mnist_lit.runs import resolve_ckpt, run_dirs


def test_initial_run_writes_checkpoints_logs_and_code(initial_run):
    _, _, run_dir = initial_run
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["002.ckpt", "004.ckpt", "last.ckpt"]
    assert same_tensors(net_weights(ckpts / "004.ckpt"), net_weights(ckpts / "last.ckpt"))
    lines = epoch_lines(run_dir)
    assert [line.split()[:4] for line in lines] == [
        ["epoch", "1", "lr", "0.05"],
        ["epoch", "2", "lr", "0.05"],
        ["epoch", "3", "lr", "0.005"],
        ["epoch", "4", "lr", "0.0005"],
    ]
    assert all("val " in line and "/32 (" in line for line in lines)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["stage"] == "initial" and config["model"]["milestones"] == [2, 3]
    assert (config["data"]["batch_size"], config["trainer"]["max_epochs"], config["recipe"]) == (64, 4, "seed")
    assert "--milestones 2 3" in (run_dir / "command.txt").read_text()
    assert (run_dir / "code" / "mnist_lit" / "data.py").is_file()
    assert (run_dir / "code" / "mnist_lit" / "experiments" / "sweep.py").is_file()  # sub-packages too
    assert (run_dir / "code" / "scripts" / "train.py").is_file()
    assert (run_dir / "code" / "scripts" / "run_all.sh").is_file()
    # TensorBoard: metric-first tags (its pages open on acc and loss), one point per epoch; no epoch or count chart
    assert event_scalar_tags(run_dir) == {"acc/train", "acc/val", "acc/val_best", "loss/train", "loss/val", "lr"}
    scalars = read_scalars([run_dir])
    assert all(len(points) == 4 for points in scalars.values())
    assert scalars["lr"][min(scalars["lr"])] == pytest.approx(0.05)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["split"] == "val" and results["count"] == 32 and results["epoch"] == 4
    assert results["acc"] > 0.5  # the fake digits are easy: the pipeline really learns


def test_last_ckpt_is_written_every_epoch_even_without_numbered_saves(shared_data_dir, tmp_path):
    assert (
        run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", "2", "--save-freq", "5", "--quiet") == 0
    )
    ckpts = tmp_path / "initial" / "version_0" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1  # 0-based: the 2nd epoch


def test_checkpoint_loads_safely_with_the_runs_best_accuracy(initial_run):
    """weights_only; the best validation accuracy so far comes back with it (a resumed run goes on from it)."""
    _, _, run_dir = initial_run
    model = MNISTLitModule.load_from_checkpoint(run_dir / "checkpoints" / "002.ckpt", weights_only=True)
    assert model.hparams.milestones == [2, 3] and model.hparams.lr == 0.05
    first_two = [acc for step, acc in sorted(read_scalars([run_dir])["acc/val"].items())][:2]
    assert model.val_acc_best.compute().item() == pytest.approx(max(first_two))


def test_full_stage_continues_from_the_initial_checkpoint(initial_run, capsys):
    """The original's spellings (--train-full 1 --resume last.ckpt); epochs 5..7 at lr 1e-4 on all images,
    evaluated on the test set; the weights equal a plain loop from the initial weights with a fresh SGD."""
    data_dir, save_dir, initial_dir = initial_run
    argv = ["--train-full", "1", "--resume", "last.ckpt", "--epochs", "7", "--save-freq", "3"]
    assert run(*argv, "--data-dir", data_dir, "--save-dir", save_dir, "--quiet") == 0
    assert f"-> {initial_dir / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    run_dir = save_dir / "full" / "version_0"
    lines = epoch_lines(run_dir)
    assert [int(line.split()[1]) for line in lines] == [5, 6, 7]
    assert all(line.split()[3] == "0.0001" and " test " in line and "/120 (" in line for line in lines)
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["split"], results["count"], results["epoch"]) == ("test", 120, 7)
    scalars = read_scalars([run_dir])
    assert len(scalars["acc/test"]) == 3 and "acc/val" not in scalars  # one test evaluation per epoch
    assert scalars["acc/test"][max(scalars["acc/test"])] == pytest.approx(results["acc"])
    # Lightning's own test loop (trainer.test, as a user would call it) on the final checkpoint: the same figure.
    final = MNISTLitModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    tester = quiet_trainer()
    tester.test(final, datamodule=MNISTDataModule(str(data_dir), stage="full"), verbose=False)
    assert float(tester.callback_metrics["test/acc"]) == pytest.approx(results["acc"])
    assert int(tester.callback_metrics["test/count"]) == 120
    assert results["ckpt_from"] == str((initial_dir / "checkpoints" / "last.ckpt").resolve())  # from any folder
    initial = torch.load(initial_dir / "checkpoints" / "last.ckpt", weights_only=True)
    full = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == initial["global_step"] + 3 * 5  # TensorBoard's step axis continues
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["006.ckpt", "last.ckpt"]

    # The same 3 epochs as a plain PyTorch loop: fresh SGD, lr 1e-4, momentum 0.5, same batches.
    model = MNISTLitModule.load_from_checkpoint(initial_dir / "checkpoints" / "last.ckpt", weights_only=True)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=1e-4, momentum=0.5)
    data = MNISTDataModule(str(data_dir), stage="full")
    data.setup()
    loader = data.train_dataloader()
    for epoch in range(4, 7):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            optimizer.zero_grad()
            nll_loss(model.net(normalize(images, data.mean, data.std)), labels).backward()
            optimizer.step()
    expected = {f"net.{k}": v for k, v in model.net.state_dict().items()}
    assert same_tensors(expected, net_weights(run_dir / "checkpoints" / "last.ckpt"))


def test_full_stage_takes_the_runs_settings_then_full_yaml_and_20_more_epochs(initial_run, capsys):
    data_dir, save_dir, initial_dir = initial_run
    last, full_runs = initial_dir / "checkpoints" / "last.ckpt", run_dirs(save_dir, "full")
    config = resolved_config(capsys, "--stage", "full", "--ckpt", last, "--save-dir", save_dir)
    assert (config["trainer"]["max_epochs"], config["full_epochs"]) == (4 + 20, 20)  # from configs/full.yaml
    shorter = resolved_config(capsys, "--stage", "full", "--ckpt", last, "--full_epochs", "3")
    assert shorter["trainer"]["max_epochs"] == 4 + 3
    assert (config["model"]["lr"], config["model"]["milestones"], config["model"]["momentum"]) == (1e-4, [], 0.5)
    assert config["seed_everything"] == 0 and config["data"]["batch_size"] == 64  # inherited from the initial run
    assert config["data"]["data_dir"] == "data"  # paths come from the command line (or defaults), not the checkpoint
    assert config["ckpt"] == str(last.resolve())
    assert run_dirs(save_dir, "full") == full_runs  # printing the settings starts no run
    assert run("--ckpt", last, "--save-dir", save_dir, "--quiet") == 2  # a resume keeps the run's last epoch: done
    assert resolved_config(capsys, "--ckpt", last, "--epochs", "6")["trainer"]["max_epochs"] == 6


def test_resume_of_an_interrupted_run_gives_the_same_weights(initial_run, tmp_path):
    data_dir, _, uninterrupted = initial_run
    common = ["--data-dir", data_dir, "--save-dir", tmp_path, *INITIAL]
    assert run(*common[: -len(INITIAL)], *INITIAL[2:], "--epochs", "2") == 0  # stops after epoch 2 of 4
    assert run(*common, "--ckpt", "last.ckpt") == 0  # resumes it into version_1 and trains epochs 3-4
    resumed = tmp_path / "initial" / "version_1"
    assert [line.split()[1] for line in epoch_lines(resumed)] == ["3", "4"]
    assert (tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt").is_file()  # nothing overwritten
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert same_tensors(a["state_dict"], b["state_dict"])
    momentum = [{k: s["momentum_buffer"] for k, s in c["optimizer_states"][0]["state"].items()} for c in (a, b)]
    assert same_tensors(*momentum)


def test_resolve_ckpt(tmp_path):
    with pytest.raises(UserError, match="no such file, and no run under"):
        resolve_ckpt("last.ckpt", tmp_path)
    for version in (0, 1):
        (tmp_path / "initial" / f"version_{version}" / "checkpoints").mkdir(parents=True)
        (tmp_path / "initial" / f"version_{version}" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    newest = tmp_path / "initial" / "version_1" / "checkpoints" / "last.ckpt"
    assert resolve_ckpt("last.ckpt", tmp_path) == newest
    assert resolve_ckpt(str(newest.parents[2] / "version_0" / "checkpoints" / "last.ckpt"), tmp_path).is_file()
    with pytest.raises(UserError, match="020.ckpt not found: the newest initial run .*version_1 has none"):
        resolve_ckpt("020.ckpt", tmp_path)
    (tmp_path / "initial" / "version_2").mkdir()  # a run killed before its first checkpoint
    with pytest.raises(UserError, match="version_2 has none"):
        resolve_ckpt("last.ckpt", tmp_path)
    with pytest.raises(UserError, match="not found"):
        resolve_ckpt(str(tmp_path / "nowhere" / "last.ckpt"), tmp_path)


def test_resolve_ckpt_for_the_full_stage(tmp_path):
    initial = tmp_path / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    full = tmp_path / "full" / "version_0" / "checkpoints" / "last.ckpt"
    for path in (initial, full):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert resolve_ckpt("last.ckpt", tmp_path, "full") == full  # unfinished full run: resume it
    assert resolve_ckpt("last.ckpt", tmp_path, "initial") == initial
    (full.parents[1] / "results.json").write_text("{}")
    assert resolve_ckpt("last.ckpt", tmp_path, "full") == initial  # it finished: a new full stage


@pytest.mark.slow
def test_run_all_goes_on_from_the_initial_runs_last_checkpoint(shared_data_dir, tmp_path):
    """scripts/run_all.sh with a recipe-like change of --epochs: the full stage starts from that run's
    last.ckpt (there is no 020.ckpt), and the summary names both stages. Relative paths are taken from the
    folder it is run in."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    data = os.path.relpath(shared_data_dir, tmp_path)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_all.sh"), data, "runs", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    full = json.loads((tmp_path / "runs" / "full" / "version_0" / "results.json").read_text())
    initial_last = tmp_path / "runs" / "initial" / "version_0" / "checkpoints" / "last.ckpt"
    assert full["ckpt_from"] == str(initial_last.resolve()) and full["epoch"] == 22
    assert "initial  epoch  2" in proc.stdout and "full     epoch 22" in proc.stdout


def test_runs_compare_by_their_settings_in_tensorboards_hparams_tab(initial_run, tmp_path):
    """HPARAMS: the settings that describe the experiment, no paths or switches; its metric columns are the runs'
    own curves (their last points: the final accuracy), so there is no one-point hp/ chart."""
    data_dir, save_dir, initial_dir = initial_run
    settings = hparams_in_events(initial_dir)
    assert settings["model/lr"] == 0.05 and settings["data/batch_size"] == 64 and settings["recipe"] == "seed"
    assert settings["trainer/max_epochs"] == 4 and settings["stage"] == "initial"
    assert not {"ckpt", "save_dir", "save_freq", "quiet", "data/data_dir", "data/download"} & settings.keys()
    assert not [name for name in settings if "progress_bar" in name or "hp/" in name]
    assert not [tag for tag in event_scalar_tags(initial_dir) if tag.startswith("hp")]
    scalars = read_scalars([initial_dir])
    final = json.loads((initial_dir / "results.json").read_text())["acc"]
    assert scalars["acc/val"][max(scalars["acc/val"])] == pytest.approx(final)
    last = initial_dir / "checkpoints" / "last.ckpt"
    full = ["--stage", "full", "--ckpt", last, "--epochs", "5", "--data-dir", data_dir, "--save-dir", tmp_path]
    assert run(*full, "--quiet") == 0
    full_dir = tmp_path / "full" / "version_0"
    settings = hparams_in_events(full_dir)
    assert settings["model/lr"] == 0.0001 and settings["stage"] == "full" and "ckpt" not in settings


def test_a_run_stopped_by_early_stopping_says_when_and_why(shared_data_dir, tmp_path, capsys):
    stop_at_once = [
        "--trainer.callbacks+=EarlyStopping",
        "--trainer.callbacks.monitor=val/acc",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.patience=0",
        "--trainer.callbacks.min_delta=2",
    ]
    assert run("--data-dir", shared_data_dir, "--save-dir", tmp_path, "--epochs", 5, *stop_at_once) == 0
    run_dir = tmp_path / "initial" / "version_0"
    stopped = json.loads((run_dir / "results.json").read_text())["stopped_early"]
    assert stopped["epoch"] == 2 and stopped["by"].startswith("EarlyStopping: Monitored metric val/acc")
    assert "stopped early after epoch 2 of 5: EarlyStopping" in (run_dir / "log.txt").read_text()
    out = capsys.readouterr().out
    assert "v_num" not in out and "Epoch 2/5" in out  # the progress bar counts from 1 and shows no v_num


def test_a_logger_from_the_command_line_numbers_its_versions_as_the_run_folders(shared_data_dir, tmp_path):
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path / "runs", "--epochs", 1, "--quiet"]
    assert run(*argv) == 0  # version_0, without the CSV logger
    assert run(*argv, "--trainer.logger+=CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'csv'}") == 0
    assert (tmp_path / "runs" / "initial" / "version_1").is_dir()
    assert [p.name for p in (tmp_path / "csv" / "lightning_logs").iterdir()] == ["version_1"]
    with open(tmp_path / "csv" / "lightning_logs" / "version_1" / "metrics.csv") as rows:
        assert {row["epoch"] for row in csv.DictReader(rows) if row["epoch"]} == {"1"}  # from 1, as log.txt


def test_every_checkpoint_a_run_reads_is_read_weights_only(initial_run, tmp_path, monkeypatch):
    """A resume and a full stage read the checkpoint twice (its settings, then Lightning's restore of ckpt_path):
    both with weights_only=True, so a checkpoint from elsewhere cannot run code."""
    data_dir, _, initial_dir = initial_run
    real_load, reads = torch.load, []

    def recording_load(*args, **kwargs):
        reads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    last = initial_dir / "checkpoints" / "last.ckpt"
    for argv in (["--ckpt", last, "--epochs", "5"], ["--stage", "full", "--ckpt", last, "--full_epochs", "1"]):
        reads.clear()
        assert run(*argv, "--data-dir", data_dir, "--save-dir", tmp_path, "--quiet") == 0
        assert len(reads) >= 2 and all(weights_only is True for weights_only in reads), (argv, reads)


def test_results_count_the_correct_answers_exactly(shared_data_dir, tmp_path, monkeypatch):
    """A model right on exactly 7 of its 40 validation images: results.json and the epoch line say 7/40, though
    the float32 accuracy times 40 is 6.99999... (a count is rounded, never cut)."""
    data = MNISTDataModule(str(shared_data_dir), val_fraction=0.125)
    data.setup()
    images, labels = data.val_set
    answers = {
        image.numpy().tobytes(): int(label) if i < 7 else (int(label) + 1) % 10
        for i, (image, label) in enumerate(zip(images, labels))
    }
    real_preprocess, real_classify = MNISTLitModule.preprocess, MNISTLitModule.classify

    def preprocess(self, pixels):
        self.seen = pixels.reshape(-1, 28, 28)
        return real_preprocess(self, pixels)

    def classify(self, inputs):  # the validation images' answers as above; training goes on as ever
        log_probs = real_classify(self, inputs)
        chosen = [answers.get(image.numpy().tobytes()) for image in self.seen]
        if None in chosen:
            return log_probs
        return (log_probs * 0 + 20 * torch.nn.functional.one_hot(torch.tensor(chosen), 10)).log_softmax(1)

    monkeypatch.setattr(MNISTLitModule, "preprocess", preprocess)
    monkeypatch.setattr(MNISTLitModule, "classify", classify)
    argv = ["--data-dir", shared_data_dir, "--save-dir", tmp_path, "--val-fraction", "0.125", "--epochs", "1"]
    assert run(*argv, "--quiet") == 0
    run_dir = tmp_path / "initial" / "version_0"
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["correct"], results["count"], results["acc"]) == (7, 40, pytest.approx(7 / 40))
    assert epoch_lines(run_dir)[-1].endswith("val 7/40 (17.50%)")


def test_ckpt_from_is_absolute_from_any_folder_and_chains_the_stages_oldest_first(initial_run, tmp_path, monkeypatch):
    """results.json names the checkpoint a run went on from, absolute: evaluate.py's curves follow that chain."""
    data_dir, _, initial_dir = initial_run
    monkeypatch.chdir(initial_dir)
    argv = ["--stage", "full", "--ckpt", "checkpoints/last.ckpt", "--full_epochs", "1", "--data-dir", data_dir]
    assert run(*argv, "--save-dir", tmp_path, "--quiet") == 0
    full_dir = tmp_path / "full" / "version_0"
    results = json.loads((full_dir / "results.json").read_text())
    assert results["ckpt_from"] == str((initial_dir / "checkpoints" / "last.ckpt").resolve())
    assert [path.resolve() for path in run_chain(full_dir)] == [initial_dir.resolve(), full_dir.resolve()]
