"""Using a trained model outside training: rebuild the model from a checkpoint (read safely by
``checkpoint_config.load_checkpoint``), classify pixels; several checkpoints as one ensemble, and test-time
augmentation."""

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mnist_lit.augment import TTA_VIEWS, tta_view
from mnist_lit.checkpoint_config import load_checkpoint, run_settings
from mnist_lit.errors import UserError
from mnist_lit.idx import dataset_spec
from mnist_lit.module import MNISTLitModule


@dataclass
class Trained:
    """What a checkpoint holds, ready to use."""

    module: MNISTLitModule  # in eval mode; takes pixels 0..255, normalises them itself
    dataset: str
    classes: tuple[str, ...]
    ckpt: dict
    path: Path

    @property
    def stage(self) -> str:
        return run_settings(self.ckpt)["stage"]

    @property
    def run_dir(self) -> Path | None:
        """The run directory the checkpoint was written in (``<run>/checkpoints/<name>.ckpt``); None for a
        checkpoint kept elsewhere (a copy, a download)."""
        folder = self.path.resolve().parent
        return folder.parent if folder.name == "checkpoints" and (folder.parent / "command.txt").is_file() else None


def module_from_checkpoint(ckpt: dict, path) -> MNISTLitModule:
    """The LightningModule a checkpoint describes, with its weights loaded; UserError if they do not fit."""
    hparams = ckpt["hyper_parameters"]
    # Only the model's own settings: mnist_lit 0.1 also kept run settings (stage, epochs, precision, ...) there.
    known = inspect.signature(MNISTLitModule).parameters
    try:
        module = MNISTLitModule(**{k: v for k, v in hparams.items() if k in known})
    except TypeError as err:
        raise UserError(f"{path}: settings this version does not know ({err})") from None
    ckpt = {**ckpt, "state_dict": dict(ckpt["state_dict"])}  # the hook may change it: the caller's is kept
    module.on_load_checkpoint(ckpt)  # as Lightning's loading does: reads checkpoints of earlier versions
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:  # name the missing / unexpected weights: the first line alone says nothing
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[1:])[:300]
        raise UserError(f"{path}: its weights do not fit the {hparams.get('net')} architecture: {detail}") from None
    return module


def load_trained(path, dataset: str | None = None) -> Trained:
    """Rebuild the model of a checkpoint in eval mode; ``dataset``, if given, must be the one it was trained on."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    trained_on = run_settings(ckpt).get("dataset", "mnist")
    if dataset is not None and dataset != trained_on:
        raise UserError(f"{path} was trained on {trained_on}, not {dataset}")
    module = module_from_checkpoint(ckpt, path).eval()
    return Trained(module, trained_on, dataset_spec(trained_on).classes, ckpt, path)


@torch.no_grad()
def classify(model, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Log-probabilities of pixel images (N x 28 x 28, any dtype, 0..255) from ``model`` (an MNISTLitModule in
    eval mode, or any callable with an export's contract), fed as float32 N x 1 x 28 x 28 in batches."""
    return torch.cat([model(batch.reshape(-1, 1, *batch.shape[-2:]).float()) for batch in images.split(batch_size)])


def load_members(paths: Sequence, dataset: str | None = None) -> list[Trained]:
    """The models of one or more checkpoints (an ensemble's members), which must agree on the dataset (and so on
    the classes); their nets may differ."""
    paths = [Path(path) for path in paths]
    resolved = [path.resolve() for path in paths]
    twice = next((path for i, path in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if twice:
        raise UserError(f"{twice} is given twice: each checkpoint counts once in an ensemble")
    members = [load_trained(path, dataset) for path in paths]
    if len({member.dataset for member in members}) > 1:
        found = ", ".join(f"{member.path}: {member.dataset}" for member in members)
        raise UserError(f"the checkpoints were trained on different datasets ({found}); an ensemble needs one")
    return members


def mean_probability(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The log of the mean of the probabilities of K models: K tensors of N x C log-probabilities -> N x C."""
    return torch.stack(list(log_probs)).logsumexp(0) - math.log(len(log_probs))


class Ensemble(nn.Module):
    """Models as one: the mean of their class probabilities, each model seeing the first ``views`` test-time
    views of the images (``augment.TTA_VIEWS``). Takes pixels and returns log-probabilities, as one model does."""

    def __init__(self, models: Sequence[nn.Module], views: int = 1):
        super().__init__()
        if not 1 <= views <= len(TTA_VIEWS):
            raise UserError(f"--tta must be between 1 (off) and {len(TTA_VIEWS)} views (got {views})")
        self.members = nn.ModuleList(models)
        self.views = TTA_VIEWS[:views]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_probs = [member(tta_view(images, view)) for member in self.members for view in self.views]
        return mean_probability(log_probs)


def predictor(members: Sequence[Trained], tta: int = 1) -> nn.Module:
    """What classifies: a checkpoint's own model, or an Ensemble of several, or with test-time augmentation."""
    if len(members) == 1 and tta == 1:
        return members[0].module
    return Ensemble([member.module for member in members], tta).eval()
