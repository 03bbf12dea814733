"""On the real MNIST files beside the repo (../shared/data), when they are there: the scripts end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import REAL_DATA
from torch.utils.data import DataLoader, TensorDataset

from mnist_lit import evaluate
from mnist_lit.data import MNISTDataModule
from mnist_lit.idx import load_split, raw_dir
from mnist_lit.module import MNISTLitModule
from mnist_lit.train import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="no real MNIST files beside the repo"),
]


def test_prepare_data_checks_the_official_files():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--data-dir", str(REAL_DATA)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 60000 images of 28x28" in proc.stdout and "test: 10000 images of 28x28" in proc.stdout


def test_the_seed_recipe_learns_on_the_real_images(tmp_path):
    argv = ["--data-dir", str(REAL_DATA), "--save-dir", str(tmp_path), "--epochs", "1", "--quiet"]
    assert main([*argv, "--trainer.limit_train_batches", "250"]) == 0  # about a quarter of the first epoch
    results = json.loads((tmp_path / "initial" / "version_0" / "results.json").read_text())
    assert results["count"] == 6000  # the 10 % validation split of the 60k training images
    assert results["acc"] > 0.88  # 250 steps of the original recipe reach 90.6 % (400: 94 %, an epoch: 96 %)


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory) -> list[Path]:
    """Two short runs of the fast recipe, seeds 0 and 1: 100 steps of its one-epoch schedule (in float32: its bf16
    runs ~7x slower on CPUs without AVX-512: configs/fast.yaml); their run folders."""
    save_dir = tmp_path_factory.mktemp("fast")
    fast = ["--recipe", "fast", "--epochs", "1", "--trainer.limit_train_batches", "100", "--precision", "32-true"]
    fast += ["--data-dir", str(REAL_DATA), "--quiet"]
    for seed in (0, 1):
        assert main([*fast, "--seed", str(seed), "--save-dir", str(save_dir / str(seed))]) == 0
    return [save_dir / str(seed) / "initial" / "version_0" for seed in (0, 1)]


def test_a_loaded_model_takes_the_test_images_as_mnist_stores_them(fast_runs):
    """The model loaded as the README shows, fed the uint8 test images, counts what evaluate.py and trainer.predict
    count; Lightning's validation of it with the run's precision and no data statistics given counts what the run
    counted."""
    run_dir = fast_runs[0]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    model = MNISTLitModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    images, labels = load_split(raw_dir(REAL_DATA), "test")
    assert images.dtype == torch.uint8 and images.shape == (10000, 28, 28)
    log_probs = model(images)
    correct = int((log_probs.argmax(1) == labels).sum())
    assert correct > 9700  # 100 steps of the fast recipe reach about 98.2 %
    assert evaluate.main(["--ckpt", str(ckpt), "--data-dir", str(REAL_DATA)]) == 0
    assert json.loads((run_dir / "evaluation" / "last-test" / "metrics.json").read_text())["correct"] == correct
    quiet = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    predicted = torch.cat(pl.Trainer(**quiet).predict(model, DataLoader(TensorDataset(images), batch_size=1000)))
    assert int((predicted.argmax(1) == labels).sum()) == correct
    precision = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["precision"]
    validator = pl.Trainer(precision=precision, **quiet)  # the run's: it validated under it
    validator.validate(model, datamodule=MNISTDataModule(str(REAL_DATA)), verbose=False)
    results = json.loads((run_dir / "results.json").read_text())
    count = int(validator.callback_metrics["val/count"])
    assert (round(float(validator.callback_metrics["val/acc"]) * count), count) == (results["correct"], 6000)


def test_an_ensemble_of_two_real_checkpoints_counts_what_their_averaged_softmax_counts(fast_runs, tmp_path, capsys):
    ckpts = [run_dir / "checkpoints" / "last.ckpt" for run_dir in fast_runs]
    out = tmp_path / "ensemble"
    assert evaluate.main(["--ckpt", *map(str, ckpts), "--data-dir", str(REAL_DATA), "--out", str(out)]) == 0
    images, labels = load_split(raw_dir(REAL_DATA), "test")
    with torch.no_grad():
        probs = [MNISTLitModule.load_from_checkpoint(c, weights_only=True).eval()(images).softmax(1) for c in ckpts]
    by_hand = [int((p.argmax(1) == labels).sum()) for p in (*probs, (probs[0] + probs[1]) / 2)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["correct"] for m in metrics["members"]] + [metrics["correct"]] == by_hand
    assert metrics["count"] == 10000 and by_hand[2] > 9700
    table = capsys.readouterr().out
    for row, correct in zip(("1 ", "2 ", "ensemble "), by_hand):
        assert any(line.split()[:3] == [row.strip(), "10000", str(correct)] for line in table.splitlines() if line)
