"""The dataset files: MNIST (or its sisters) as four IDX files in torchvision's layout, found, unpacked or
downloaded, and decoded with every check (structure, counts, labels, the official md5s).

Layout on disk: ``<data_dir>/<MNIST|FashionMNIST|KMNIST>/raw/<the four IDX files>``.
"""

import contextlib
import gzip
import hashlib
import io
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnist_lit.errors import UserError

DATA_DIR = "data"  # where the dataset's folder is (or is downloaded to) unless --data-dir says otherwise
FILES = {  # split -> (images, labels): the same names for all three datasets
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetSpec:
    """An MNIST-format dataset that torchvision knows: its files live in ``<data_dir>/<folder>/raw``."""

    folder: str  # torchvision's class name, which is also its folder name
    classes: tuple[str, ...]  # names of labels 0..9, as torchvision gives them
    # Official uncompressed files, where known: name -> (size in bytes, md5). A file of exactly that size must
    # have that md5; files of other sizes (e.g. the small ones the tests write) are checked for structure only.
    official: dict[str, tuple[int, str]] = field(default_factory=dict)


DATASETS = {
    "mnist": DatasetSpec(
        "MNIST",
        tuple("0123456789"),
        {
            "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
            "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
            "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
            "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
        },
    ),
    "fashion_mnist": DatasetSpec(
        "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "kmnist": DatasetSpec("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
# MNIST's pixel mean and std after /255 over its 60k training images. The data module computes each dataset's
# own from its training file; these are the figures it must find for MNIST (tests check it on the real files).
MEAN, STD = 0.1306604762738429, 0.30810780385646264
NUM_CLASSES = 10
IMAGE_SIZE = 28


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def raw_dir(data_dir, dataset: str = "mnist") -> Path:
    return Path(data_dir) / dataset_spec(dataset).folder / "raw"


def ensure_raw_files(data_dir, dataset: str = "mnist", download: bool = True) -> Path:
    """Make sure the four IDX files are in ``raw_dir(data_dir, dataset)``: as they are, gunzipped, or downloaded."""
    raw = raw_dir(data_dir, dataset)
    names = [name for pair in FILES.values() for name in pair]
    for name in names:
        if not (raw / name).exists() and (raw / f"{name}.gz").exists():
            _gunzip(raw / f"{name}.gz", raw / name)
    missing = [name for name in names if not (raw / name).exists()]
    if not missing:
        return raw
    reason = "downloading is off"
    if download:
        made = [d for d in (raw, raw.parent, Path(data_dir)) if not d.exists()]  # torchvision makes these
        reason = _download(data_dir, dataset)
        missing = [name for name in names if not (raw / name).exists()]
        if not missing:
            return raw
        for folder in made:  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
    raise UserError(
        f"{dataset} files missing in {raw}: {', '.join(missing)} ({reason}); put the four IDX files there "
        f"(uncompressed or .gz), or pass --data-dir to a folder that holds {dataset_spec(dataset).folder}/raw/"
    )


def _torchvision_class(dataset: str):
    from torchvision import datasets  # imported only when needed: it is slow to import

    return getattr(datasets, dataset_spec(dataset).folder)


def _download(data_dir, dataset: str) -> str:
    """Download with torchvision; returns why it failed ('' on success). Its chatter is kept off the console."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            _torchvision_class(dataset)(root=str(data_dir), download=True)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError ... depending on the failure
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__  # the last mirror's
        return f"could not download them, offline? {cause}"
    return ""


def _gunzip(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".part")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{src}: corrupt gzip file ({err})") from None
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot unpack {src} into {dst.parent}: {err.strerror}") from None
    os.replace(tmp, dst)


def read_idx(path: Path, ndim: int, official: dict[str, tuple[int, str]] | None = None) -> torch.Tensor:
    """Decode an IDX file of unsigned bytes with ``ndim`` dimensions (1: labels, 3: images), fully checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)  # straight into the buffer the tensor will use: no second 47 MB copy
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic is not None and magic != 0x800 + ndim:  # 0x08: unsigned byte, then the number of dimensions
        raise UserError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {magic:#010x})")
    if len(data) < header:
        raise UserError(f"{path}: {len(data)} bytes, too short for an IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise UserError(
            f"{path}: {len(data)} bytes, but its header ({' x '.join(map(str, dims))}) needs {expected}: "
            "truncated or corrupt"
        )
    size, md5 = (official or {}).get(path.name, (None, None))
    if len(data) == size and hashlib.md5(data).hexdigest() != md5:
        raise UserError(f"{path}: md5 differs from the official file: corrupt, replace it")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).reshape(dims)


def load_split(raw: Path, split: str, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """The checked images (uint8, N x 28 x 28) and labels (int64, N) of 'train' or 'test'."""
    image_path, label_path = (raw / name for name in FILES[split])
    official = dataset_spec(dataset).official
    images, labels = read_idx(image_path, 3, official), read_idx(label_path, 1, official)
    if tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{image_path}: images are {tuple(images.shape[1:])}, expected 28 x 28")
    if len(images) != len(labels):
        raise UserError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if len(labels) == 0:
        raise UserError(f"{label_path}: holds no images")
    if int(labels.max()) >= NUM_CLASSES:
        raise UserError(f"{label_path}: label {int(labels.max())} is out of range 0-{NUM_CLASSES - 1}")
    return images, labels.long()
