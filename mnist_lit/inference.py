"""Using a trained model outside training: rebuild the model from a checkpoint (read safely by
``checkpoint_file.load_checkpoint``), classify pixels; several checkpoints as one ensemble, and test-time
augmentation."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mnist_lit.augment import TTA_VIEWS, tta_view
from mnist_lit.checkpoint_config import check_model_settings, data_types, model_types
from mnist_lit.checkpoint_file import load_checkpoint, run_settings
from mnist_lit.errors import UserError
from mnist_lit.idx import dataset_spec
from mnist_lit.module import MNISTLitModule
from mnist_lit.schema import SchemaError, check_mapping
from mnist_lit.threads import adapt_threads


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


def model_settings(ckpt: dict, path) -> dict:
    """The model's settings a checkpoint records, checked against their declared types (UserError naming the
    first that is not plain data of its type); the data's are checked too, as evaluate.py rebuilds a split from
    them. Settings of mnist_lit 0.1 that this version does not know are left out."""
    known, data_known = model_types(linked=True), data_types(linked=True)
    model = {k: v for k, v in ckpt["hyper_parameters"].items() if k in known}
    data = {k: v for k, v in run_settings(ckpt).items() if k in data_known and k not in known}
    try:
        check_model_settings(model, "hyper_parameters", linked=True)
        check_mapping(data, data_known, "datamodule_hyper_parameters")
    except SchemaError as err:
        raise UserError(f"{path}: not a usable checkpoint: {err}") from None
    return model


def build_module(settings: dict, path) -> MNISTLitModule:
    try:
        return MNISTLitModule(**settings)
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a net option out of its range
        raise UserError(f"{path}: settings this version cannot build ({err})") from None


def check_weights(ckpt: dict, path, settings: dict | None = None) -> None:
    """UserError unless the checkpoint's weights (and an EMA's trained weights beside them) have exactly the
    names, shapes and dtypes of the model its settings (or ``settings``) describe. The model is built on the meta
    device (no memory): a small file can never make a large net."""
    with torch.device("meta"):
        expected = build_module(settings or model_settings(ckpt, path), path).state_dict()
    for key in ("state_dict", "current_model_state"):
        weights = ckpt.get(key)
        if weights is None and key == "current_model_state":
            continue
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise UserError(f"{path}: not a usable checkpoint: its {key} is not a mapping of tensors")
        weights = {k: v for k, v in weights.items() if k != "pixel_stats"}  # earlier versions' buffer: read apart
        net = (settings or ckpt["hyper_parameters"]).get("net")
        unexpected = sorted(set(weights) ^ set(expected))
        if unexpected:
            problem = f"missing or unexpected {', '.join(unexpected[:3])}"
            raise UserError(f"{path}: its weights do not fit the {net} architecture: {problem}")
        for name, tensor in weights.items():
            if (tensor.shape, tensor.dtype) != (expected[name].shape, expected[name].dtype):
                problem = f"{name} is {tuple(tensor.shape)} {tensor.dtype}, the net's {tuple(expected[name].shape)}"
                raise UserError(f"{path}: its weights do not fit the {net} architecture: {problem}")


def module_from_checkpoint(ckpt: dict, path) -> MNISTLitModule:
    """The LightningModule a checkpoint describes, with its weights loaded; UserError if they do not fit."""
    settings = model_settings(ckpt, path)
    check_weights(ckpt, path, settings)
    module = build_module(settings, path)
    ckpt = {**ckpt, "state_dict": dict(ckpt["state_dict"])}  # the hook may change it: the caller's is kept
    module.on_load_checkpoint(ckpt)  # as Lightning's loading does: reads checkpoints of earlier versions
    module.load_state_dict(ckpt["state_dict"])  # strict: check_weights made sure every weight is there
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
    eval mode, or any callable with an export's contract), fed as float32 N x 1 x 28 x 28 in batches; torch's
    threads follow the free cores between batches (``mnist_lit.threads``)."""
    outputs = []
    for batch in images.split(batch_size):
        adapt_threads()
        outputs.append(model(batch.reshape(-1, 1, *batch.shape[-2:]).float()))
    return torch.cat(outputs)


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
