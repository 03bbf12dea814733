"""MNIST (or its sisters) as a LightningDataModule: four IDX files, decoded once into uint8 tensors, batched.

Layout on disk is torchvision's: ``<data_dir>/<MNIST|FashionMNIST|KMNIST>/raw/<the four IDX files>``.
Batches are cut from the in-memory tensors by indexing (no per-sample PIL/ToTensor work) and normalised as
whole tensors on the Trainer's device, in ``on_after_batch_transfer``.
"""

import contextlib
import functools
import gzip
import hashlib
import io
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch

from mnist_lit.errors import UserError

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


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of range(n) into (train, val) index tensors, each in ascending order."""
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise UserError(f"val fraction {val_fraction} of {n} images leaves an empty train or validation set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) std of uint8 images after /255, exact, from a 256-bin histogram (no float copy)."""
    counts = torch.bincount(images.reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    var = (counts * (values - mean) ** 2).sum() / counts.sum()
    return mean.item(), var.sqrt().item()


def normalize(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """Pixels 0..255 (N x 28 x 28 or N x 1 x 28 x 28, any dtype) -> float N x 1 x 28 x 28, (x/255 - mean) / std."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return (images.float() - 255 * mean) / (255 * std)


def seeded_generator(seed: int, counter: int, device="cpu") -> torch.Generator:
    """A generator for draw number ``counter`` (an epoch, a step) of a run with ``seed``: its draws depend on
    nothing else, so a resumed run draws the same. Torch generators keep only 32 bits of their seed: seed and
    counter are mixed into those, distinct for every counter below 1,000,003."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + counter) % 2**32)


class EpochSampler:
    """The order of one epoch: a seeded shuffle that changes each epoch, or the plain order.

    Lightning calls ``set_epoch`` at the start of every epoch (also after a resume), so the order of epoch k
    depends only on (seed, k): a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def indices(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=seeded_generator(self.seed, self.epoch))

    def __iter__(self):
        return iter(self.indices().tolist())


class InMemoryLoader:
    """Batches of (uint8 images, int64 labels) indexed out of in-memory tensors; the last partial batch is kept.

    With several processes (DDP), each global batch of ``batch_size`` is split between the ranks: every rank
    takes the same number of steps, every sample is used exactly once per epoch, and the averaged gradients
    are those of one process with the same batch size.
    """

    batch_sampler = None  # Lightning reads `sampler` and `batch_sampler` as on a torch DataLoader

    def __init__(self, images, labels, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size=1):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(labels), shuffle, seed)

    def _global_batches(self) -> list[torch.Tensor]:
        batches = list(self.sampler.indices().split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < self.world_size:  # too few to give every rank a sample
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def __len__(self) -> int:
        n, remainder = divmod(len(self.labels), self.batch_size)
        return n + (remainder >= self.world_size or (remainder > 0 and n == 0))

    def __iter__(self):
        for batch in self._global_batches():
            mine = batch.tensor_split(self.world_size)[self.rank].to(self.labels.device)
            yield self.images[mine], self.labels[mine]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST (or ``dataset``: fashion_mnist, kmnist) for the two stages.

    stage "initial": a seeded split of the 60k training images into train (1 - val_fraction) and validation.
    stage "full": all 60k images for training; the 10k test images are the per-epoch evaluation set.
    The test set is always the 10k official test images. Normalisation uses the mean and std of all 60k
    training images, computed in ``setup`` (``self.mean``, ``self.std``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "mnist",
        stage: str = "initial",
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        download: bool = True,
    ):
        super().__init__()
        dataset_spec(dataset)  # fail early on an unknown name
        if stage not in ("initial", "full"):
            raise UserError(f"unknown stage {stage!r}: use 'initial' or 'full'")
        self.save_hyperparameters()
        self.train_set = self.val_set = None
        self.mean, self.std = MEAN, STD

    @property
    def classes(self) -> tuple[str, ...]:
        return dataset_spec(self.hparams.dataset).classes

    @functools.cached_property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 10k test images and labels, read on first use (the initial stage's training never needs them)."""
        return load_split(raw_dir(self.hparams.data_dir, self.hparams.dataset), "test", self.hparams.dataset)

    def prepare_data(self) -> None:
        ensure_raw_files(self.hparams.data_dir, self.hparams.dataset, download=self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        """Decode the training file once (``stage`` is Lightning's fit/validate/test: both splits are made at once;
        the test split is read on first use)."""
        if self.train_set is not None:
            return
        raw = raw_dir(self.hparams.data_dir, self.hparams.dataset)
        train_images, train_labels = load_split(raw, "train", self.hparams.dataset)
        self.mean, self.std = pixel_stats(train_images)
        if self.hparams.stage == "initial":
            train_idx, val_idx = split_indices(len(train_labels), self.hparams.val_fraction, self.hparams.seed)
            self.train_set = (train_images[train_idx], train_labels[train_idx])
            self.val_set = (train_images[val_idx], train_labels[val_idx])
        else:
            self.train_set, self.val_set = (train_images, train_labels), self.test_set

    def _loader(self, data, batch_size: int, shuffle: bool) -> InMemoryLoader:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.trainer:  # the split lives on the accelerator (uint8 MNIST is 55 MB): no copy per batch
            data = tuple(t.to(self.trainer.strategy.root_device) for t in data)
        return InMemoryLoader(*data, batch_size, shuffle, self.hparams.seed, rank, world_size)

    def train_dataloader(self) -> InMemoryLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> InMemoryLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> InMemoryLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        return normalize(images, self.mean, self.std), labels
