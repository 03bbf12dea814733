"""Shared fixtures: small MNIST-format IDX files written by the tests themselves (no network, no real data)."""

import gzip
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mnist_lit.idx import FILES, raw_dir

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic 0x0800 + ndim, big-endian dimensions, then the bytes."""
    header = (0x800 + array.dim()).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: label k lights a 6x6 block at a fixed place of its own, over faint noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = 2 + 5 * (label // 5) * 2, 2 + 5 * (label % 5)
        images[i, row : row + 6, col : col + 6] = 255
    return images, labels


def loss_before_and_after_one_step(model, batch, precision="32-true") -> tuple[float, float]:
    """The model's training-mode loss on ``batch`` (pixels 0..255, labels) before and after one step of
    training_step, run by a minimal Trainer."""

    def loss() -> float:
        model.train()
        with torch.no_grad():
            return F.nll_loss(model(batch[0]), batch[1]).item()

    before = loss()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(*batch), batch_size=len(batch[1])))
    assert trainer.global_step == 1
    return before, loss()


def write_mnist(data_dir: Path, n_train: int = 320, n_test: int = 120, gz: bool = False, dataset="mnist") -> Path:
    """Write the four IDX files (optionally as .gz) under data_dir/<dataset folder>/raw; returns data_dir."""
    raw = raw_dir(data_dir, dataset)
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = digits(n, seed)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return data_dir


def previous_version_checkpoint(ckpt: dict) -> dict:
    """A checkpoint as the version before models took raw pixels wrote it: the pixel statistics as a float32
    buffer ``pixel_stats`` among the weights (that model took normalised images), no eval_split or pixel_stats
    among the hyperparameters."""
    old = {**ckpt, "hyper_parameters": dict(ckpt["hyper_parameters"]), "state_dict": dict(ckpt["state_dict"])}
    old["state_dict"]["pixel_stats"] = torch.tensor(old["hyper_parameters"].pop("pixel_stats"))
    del old["hyper_parameters"]["eval_split"]
    return old


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A fresh small dataset for tests that may change it."""
    return write_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """A small dataset shared by the tests that only read it."""
    return write_mnist(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    """Point torchvision's mirrors at a closed local port: a download attempt fails at once, offline."""
    try:
        from torchvision import datasets
    except ImportError:  # without torchvision nothing can download anyway
        return

    for name in ("MNIST", "FashionMNIST", "KMNIST"):
        monkeypatch.setattr(getattr(datasets, name), "mirrors", ["http://127.0.0.1:9/"])


@pytest.fixture(scope="session")
def trained_ckpt(shared_data_dir, tmp_path_factory) -> Path:
    """A tiny model trained for 3 epochs on the small IDX files: the last.ckpt of its initial-stage run."""
    from mnist_lit.cli import main

    save_dir = tmp_path_factory.mktemp("trained")
    argv = ["--data-dir", shared_data_dir, "--save-dir", save_dir, "--epochs", "3", "--lr", "0.05", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt"
