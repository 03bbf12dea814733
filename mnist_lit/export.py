"""Export a checkpoint's model (its normalisation inside), or an ensemble of several, to ONNX or TorchScript, with
its input contract.

Every export is checked against the checkpoint on the whole test set of its dataset before it is kept:
it is written as ``FILE.part`` and only renamed to ``FILE`` (with the contract in ``FILE.json``) if all
predictions agree and the outputs differ by at most ``MAX_ABS_DIFF``.
"""

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.idx import (
    DATA_DIR,
    DATASETS,
    IMAGE_SIZE,
    NUM_CLASSES,
    dataset_spec,
    ensure_raw_files,
    load_split,
    raw_dir,
)
from mnist_lit.inference import Ensemble, Trained, classify, load_members, predictor
from mnist_lit.members import add_checkpoint_arguments, checkpoints_of
from mnist_lit.module import MNISTLitModule
from mnist_lit.threads import adapt_threads

INPUT_NAME, OUTPUT_NAME = "pixels", "log_probs"
CONTRACT_KEY = "mnist_lit.contract"  # ONNX metadata_props key, and the name of the file inside a TorchScript archive
MAX_ABS_DIFF = 1e-4
BATCH_SIZE = 1000

Run = Callable[[torch.Tensor], torch.Tensor]  # float pixels (N, 1, 28, 28) -> log-probabilities (N, 10)


class Traced(nn.Module):
    """What is exported: the model's own forward (its preprocessing and net; an ensemble's mean over its members),
    with only the nets as submodules; tracing a LightningModule whole would also walk its metrics and ask for its
    Trainer."""

    def __init__(self, model: MNISTLitModule | Ensemble):
        super().__init__()
        members = model.members if isinstance(model, Ensemble) else [model]
        self.nets = nn.ModuleList(member.net for member in members)  # the weights are shared with the model
        self.run = model.forward  # a bound method is no submodule

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.run(pixels)


def contract_path(out: Path) -> Path:
    """Where the contract of the export ``out`` is written: ``out`` + ``.json``."""
    return out.with_name(out.name + ".json")


def build_contract(members: list[Trained], export_format: str) -> dict:
    """What a user of the exported file must know: input, output, classes, where it came from. For an ensemble,
    the members' statistics, nets and checkpoints are lists."""
    trained = members[0]
    folder = dataset_spec(trained.dataset).folder

    def each(value_of):
        return value_of(trained) if len(members) == 1 else [value_of(member) for member in members]

    return {
        "format": export_format,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, IMAGE_SIZE, IMAGE_SIZE],
            "dtype": "float32",
            "range": [0, 255],
            "content": f"grey levels as in the {folder} files: white (255) figure on black (0) background, "
            "28x28; MNIST digits are size-normalised and centred by their centre of mass",
            "normalisation": {
                "inside": True,
                "mean": each(lambda member: member.module.pixel_stats[0]),
                "std": each(lambda member: member.module.pixel_stats[1]),
                "formula": "(pixels / 255 - mean) / std",
            },
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", NUM_CLASSES],
            "dtype": "float32",
            "content": "log-probabilities: exp() gives the class probabilities, argmax the predicted class"
            + ("; of the members' mean probability" if len(members) > 1 else ""),
        },
        "classes": list(trained.classes),
        "dataset": trained.dataset,
        "net": each(lambda member: member.ckpt["hyper_parameters"].get("net")),
        "checkpoint": each(lambda member: str(member.path.resolve())),
    }


@contextlib.contextmanager
def _quiet_torchscript():
    # torch 2.13/2.14 warn that torch.jit is deprecated (DeprecationWarning/FutureWarning) on every trace/save/load;
    # the format is still what was asked for, and the help of --format says it is deprecated.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        yield


def _example_input() -> torch.Tensor:
    # Batch 2, not 1: a tracer may treat a size-1 dimension as a constant.
    return torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)


def save_onnx(model: Traced, path: Path, contract_text: str) -> None:
    # torch.export-based exporter (dynamo=True), torch 2.14's default: the TorchScript-based one is deprecated.
    # It puts the weights in a side file PATH.data unless external_data=False; the model is small, so one file.
    program = torch.onnx.export(
        model,
        (_example_input(),),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props[CONTRACT_KEY] = contract_text
    program.save(path, external_data=False)


def load_onnx(path: Path) -> Run:
    import onnxruntime  # imported only when needed: the TorchScript path does not use it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda pixels: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0])


def save_torchscript(model: Traced, path: Path, contract_text: str) -> None:
    with _quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(model, _example_input())
        traced.save(str(path), _extra_files={CONTRACT_KEY: contract_text})


def load_torchscript(path: Path) -> Run:
    with _quiet_torchscript():
        return torch.jit.load(str(path), map_location="cpu").eval()


FORMATS: dict[str, tuple[Callable[[Traced, Path, str], None], Callable[[Path], Run]]] = {
    "onnx": (save_onnx, load_onnx),
    "torchscript": (save_torchscript, load_torchscript),
}


def compare(reference: torch.Tensor, exported: torch.Tensor) -> tuple[int, float]:
    """Number of rows whose argmax differs, and the largest absolute difference of the outputs."""
    differing = int((reference.argmax(1) != exported.argmax(1)).sum())
    return differing, float((reference - exported).abs().max())


def export(args: argparse.Namespace) -> dict:
    """Export, verify on the test set, then keep the file and its contract; returns the figures."""
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the file to write")
    existing = [path for path in (out, contract_path(out)) if path.exists()]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists; pass --force to replace it")
    members = load_members(checkpoints_of(args.ckpt, args.members), args.dataset)
    trained, model = members[0], predictor(members)
    ensure_raw_files(args.data_dir, trained.dataset)
    images, labels = load_split(raw_dir(args.data_dir, trained.dataset), "test", trained.dataset)
    contract = build_contract(members, args.format)
    contract_text = json.dumps(contract, indent=2) + "\n"
    save, load = FORMATS[args.format]
    partial = out.with_name(out.name + ".part")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            save(Traced(model).eval(), partial, contract_text)
        except OSError as err:
            raise UserError(f"cannot write {partial}: {err.strerror or err}") from None
        reference = classify(model, images, BATCH_SIZE)
        exported = classify(load(partial), images, BATCH_SIZE)
        differing, max_abs_diff = compare(reference, exported)
        correct = int((exported.argmax(1) == labels).sum())
        print(
            f"checked on {len(labels)} {trained.dataset} test images: {differing} predictions differ, "
            f"max abs diff {max_abs_diff:.2e} (allowed {MAX_ABS_DIFF:.0e}); export accuracy "
            f"{correct}/{len(labels)} ({100 * correct / len(labels):.2f}%)"
        )
        if differing or not max_abs_diff <= MAX_ABS_DIFF:  # written so that a NaN fails too
            raise UserError(
                f"the {args.format} export does not match the checkpoint ({differing} predictions differ, "
                f"max abs diff {max_abs_diff:.2e}); it was deleted, {out} not written"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    contract_path(out).write_text(contract_text)
    print(f"wrote {out} ({args.format}, {out.stat().st_size / 1e6:.1f} MB) and its contract {contract_path(out)}")
    return {"out": str(out), "images": len(labels), "differing": differing, "max_abs_diff": max_abs_diff}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="export.py",
        description="Export a checkpoint, or the ensemble of several, to ONNX or TorchScript, checked against it "
        "on the full test set.",
    )
    add_checkpoint_arguments(
        p,
        "the checkpoint to export; several: one graph of their ensemble (mean of the probabilities)",
    )
    p.add_argument("--format", required=True, choices=list(FORMATS), help="onnx, or torchscript (deprecated by torch)")
    p.add_argument("--out", required=True, metavar="FILE", help="the exported model; its contract goes to FILE.json")
    p.add_argument(
        "--data-dir", default=DATA_DIR, help="holds <dataset>/raw/ with the test files (default: %(default)s)"
    )
    p.add_argument("--dataset", choices=list(DATASETS), help="fail unless the checkpoint was trained on this")
    p.add_argument("--force", action="store_true", help="replace FILE and FILE.json if they exist")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line of scripts/export.py: errors meant for the user become one line and exit code 2."""
    adapt_threads()  # the first measurement of the load starts: by the first batch it is known
    argv = sys.argv[1:] if argv is None else argv
    return exit_code(lambda: export(build_parser().parse_args(argv)))
