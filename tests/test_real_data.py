"""On the real MNIST files beside the repo (../shared/data), when they are there: the scripts end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import REAL_DATA
from torch.utils.data import DataLoader, TensorDataset

from mnist_lit import evaluate
from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule
from mnist_lit.idx import load_split, raw_dir
from mnist_lit.module import MNISTLitModule

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


def test_one_real_epoch_learns(tmp_path):
    assert main(["--data-dir", str(REAL_DATA), "--save-dir", str(tmp_path), "--epochs", "1", "--quiet"]) == 0
    results = json.loads((tmp_path / "initial" / "version_0" / "results.json").read_text())
    assert results["count"] == 6000  # the 10 % validation split of the 60k training images
    assert results["acc"] > 0.95  # one epoch of the original recipe reaches about 96 %


def test_a_loaded_model_takes_the_test_images_as_mnist_stores_them(tmp_path):
    """One epoch of the fast recipe; then the model loaded as the README shows, fed the uint8 test images, counts
    what evaluate.py and trainer.predict count; Lightning's validation of it with the run's precision and no data
    statistics given counts what the run counted."""
    assert main(["--recipe", "fast", "--epochs", "1", "--data-dir", str(REAL_DATA), "--save-dir", str(tmp_path),
                 "--quiet"]) == 0  # fmt: skip
    run_dir = tmp_path / "initial" / "version_0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    model = MNISTLitModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    images, labels = load_split(raw_dir(REAL_DATA), "test")
    assert images.dtype == torch.uint8 and images.shape == (10000, 28, 28)
    log_probs = model(images)
    correct = int((log_probs.argmax(1) == labels).sum())
    assert correct > 9700  # one epoch of the fast recipe reaches about 98.8 %
    assert evaluate.main(["--ckpt", str(ckpt), "--data-dir", str(REAL_DATA)]) == 0
    assert json.loads((run_dir / "evaluation" / "last-test" / "metrics.json").read_text())["correct"] == correct
    quiet = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    predicted = torch.cat(pl.Trainer(**quiet).predict(model, DataLoader(TensorDataset(images), batch_size=1000)))
    assert int((predicted.argmax(1) == labels).sum()) == correct
    precision = yaml.safe_load((ROOT / "configs" / "fast.yaml").read_text())["trainer"]["precision"]
    validator = pl.Trainer(precision=precision, **quiet)  # the recipe's: the run validated under it
    validator.validate(model, datamodule=MNISTDataModule(str(REAL_DATA)), verbose=False)
    results = json.loads((run_dir / "results.json").read_text())
    count = int(validator.callback_metrics["val/count"])
    assert (round(float(validator.callback_metrics["val/acc"]) * count), count) == (results["correct"], 6000)
