"""On the real MNIST files beside the repo (../shared/data), when they are there: the scripts end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_DATA

from mnist_lit.cli import main

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
