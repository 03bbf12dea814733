"""A checkpoint file read as data (torch only, no Lightning): tensors and plain values, its work bounded by its
size, the bookkeeping Lightning restores checked; and the run settings it records.

A checkpoint may come from elsewhere, so reading it must not do more than its size: the file must be a zip of
stored (uncompressed) records, ``torch.load(weights_only=True)`` reads it (no pickled code), every tensor must be
dense (no zero-stride view that claims more elements than its bytes), the containers are walked once each
(a pickle can share one list a thousand times), and the counters Lightning resumes from must agree with the
epoch. What the weights must look like is checked where the net is known (``inference.check_weights``).
"""

import pickle
import re
import zipfile
from pathlib import Path

import torch

from mnist_lit.errors import UserError
from mnist_lit.schema import SchemaError, check, shown

MAX_ITEMS = 1_000_000  # values in one checkpoint; ours hold ~2,000 (a wide net with its optimizer: ~200)
MAX_DEPTH = 32  # nesting; ours go 6 deep
VERSION = re.compile(r"\d+\.\d+\.\d+([.+-]?\w+)*")  # a pytorch-lightning_version Lightning's Version() parses


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely and check it is one of ours: UserError (one line) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:  # the pickle names a function or class: loading it could run code
            raise UserError(f"{path}: refused, it asks to load {found[1]} (only tensors and plain data)") from None
        raise UserError(f"{path}: not a readable checkpoint (not a torch file)") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError ... for truncated or foreign files
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or not a torch file: {type(err).__name__})"
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "stage" not in run_settings(ckpt) or "state_dict" not in ckpt:
        raise UserError(f"{path}: not an mnist_lit checkpoint (no stage or weights in it)")
    try:
        check_contents(ckpt, path.stat().st_size)
        check_progress(ckpt)
    except SchemaError as err:
        raise UserError(f"{path}: not a usable checkpoint: {err}") from None
    return ckpt


def check_archive(path: Path) -> None:
    """The file is a zip (torch's format since 1.6) whose records are stored as they are: what reading it
    yields is no bigger than the file. (A legacy torch file allocates the sizes it declares before reading; a
    compressed record can inflate a thousandfold.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{path}: not a readable checkpoint (not a torch zip file)") from None
    compressed = next((r.filename for r in records if r.compress_type != zipfile.ZIP_STORED), None)
    if compressed or sum(r.file_size for r in records) > path.stat().st_size:
        raise UserError(f"{path}: refused, its records are compressed ({compressed}): torch writes them stored")


def check_contents(ckpt: dict, file_size: int) -> None:
    """Every value plain data or a dense tensor; the tensors' storages together no bigger than the file."""
    seen, storages, items = set(), {}, 0
    stack = [(ckpt, "checkpoint", 0)]
    while stack:
        value, key, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            items += len(value)
            if items > MAX_ITEMS or depth > MAX_DEPTH:
                raise SchemaError(key, f"more than {MAX_ITEMS} values or {MAX_DEPTH} levels: not a checkpoint of ours")
            pairs = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(item, f"{key}[{shown(name)}]", depth + 1) for name, item in pairs]
        elif isinstance(value, torch.Tensor):
            if value.layout != torch.strided or not dense(value):
                raise SchemaError(key, "a tensor that is not dense (a view claiming more elements than it holds)")
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif not (value is None or isinstance(value, (bool, int, float, str, bytes))):
            raise SchemaError(key, f"a {type(value).__name__}, not plain data")
    if sum(storages.values()) > file_size:
        raise SchemaError("tensors", "they hold more bytes than the file: not a checkpoint of ours")


def dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its memory without gaps or overlaps, in some order of the dimensions
    (contiguous, channels_last, ...): a zero stride over a dimension of size > 1 is not."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def check_progress(ckpt: dict) -> None:
    """The counters Lightning resumes from: whole numbers, and the loop's epoch the checkpoint's own. (Lightning
    takes the epoch from the loop: a loop far ahead would end a run at once, its results written as if finished.)"""
    check(ckpt.get("epoch"), int, "epoch")
    check(ckpt.get("global_step"), int, "global_step")
    for key in ("epoch", "global_step"):
        if ckpt[key] < 0:
            raise SchemaError(key, f"{ckpt[key]} is negative")
    version = ckpt.get("pytorch-lightning_version", "0.0.0")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise SchemaError("pytorch-lightning_version", f"{shown(version)} is not a version")
    check(ckpt.get("callbacks", {}), dict[str, dict], "callbacks")  # Lightning matches them to its callbacks
    check(ckpt.get("optimizer_states", []), list[dict], "optimizer_states")
    check(ckpt.get("lr_schedulers", []), list[dict], "lr_schedulers")
    loops = ckpt.get("loops")
    if loops is None:
        return
    try:
        epochs = loops["fit_loop"]["epoch_progress"]
    except (KeyError, TypeError):
        raise SchemaError("loops.fit_loop.epoch_progress", "missing") from None
    for part in ("total", "current"):
        counters = epochs.get(part) if isinstance(epochs, dict) else None
        key = f"loops.fit_loop.epoch_progress.{part}"
        check(counters, dict[str, int], key)
        if counters.get("completed") != ckpt["epoch"] or any(
            not 0 <= n <= ckpt["epoch"] + 1 for n in counters.values()
        ):
            raise SchemaError(key, f"{shown(counters)} does not agree with the checkpoint's epoch {ckpt['epoch']}")


def run_settings(ckpt: dict) -> dict:
    """The model's and the data's settings a checkpoint records (stage, dataset, seed, net, ...). Checkpoints of
    mnist_lit 0.1 kept stage and dataset among the model's hyperparameters; they are read the same way."""
    return {**ckpt.get("hyper_parameters", {}), **ckpt.get("datamodule_hyper_parameters", {})}
