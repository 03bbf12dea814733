"""MNIST (or its sisters) as a LightningDataModule: the IDX files decoded once into uint8 tensors, batched.

Batches of uint8 pixels are cut from the in-memory tensors by indexing (no per-sample PIL/ToTensor work); the
model normalises them, on the Trainer's device, with the training images' statistics (``MNISTDataModule.mean``,
``.std``) that train.py hands it.
"""

import functools
from typing import Literal

import pytorch_lightning as pl
import torch

from mnist_lit.errors import UserError, require
from mnist_lit.idx import DATA_DIR, MEAN, STD, dataset_spec, ensure_raw_files, load_split, raw_dir


def split_indices(
    n: int, val_fraction: float, seed: int, folds: int | None = None, fold: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of range(n) into (train, val) index tensors, each in ascending order.

    Validation is the first ``val_fraction`` of a seeded permutation; with ``folds`` K, it is part ``fold`` of
    that permutation cut into K disjoint parts that cover range(n) (K = 10, fold 0 is the default 10 % split).
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if folds is not None:
        if not 2 <= folds <= n or not 0 <= fold < folds:
            raise UserError(
                f"data.fold must be in 0..{folds - 1} and data.folds in 2..{n} (got fold {fold} of {folds})"
            )
        parts = list(order.tensor_split(folds))
        val = parts.pop(fold)
        return torch.cat(parts).sort().values, val.sort().values
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise UserError(f"val fraction {val_fraction} of {n} images leaves an empty train or validation set")
    return order[n_val:].sort().values, order[:n_val].sort().values


def split_seed(settings) -> int:
    """The seed of a run's split from its data settings (a mapping: the data module's hyperparameters, or a
    checkpoint's ``run_settings``): ``split_seed``, else the run's ``seed``, as for checkpoints written before
    split_seed existed."""
    chosen = settings.get("split_seed")
    return settings.get("seed", 0) if chosen is None else chosen


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


def eval_split_of(stage: str) -> str:
    """What a stage's per-epoch evaluation runs on: 'val', or 'test' in the full stage (which trains on all 60k)."""
    return "val" if stage == "initial" else "test"


def seeded_generator(seed: int, counter: int, device="cpu") -> torch.Generator:
    """A generator for draw number ``counter`` (an epoch, a step) of a run with ``seed``: its draws depend on
    nothing else, so a resumed run draws the same. Torch generators keep only 32 bits of their seed: seed and
    counter are mixed into those, distinct for every counter below 1,000,003."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + counter) % 2**32)


class EpochSampler:
    """The order of one epoch: a seeded shuffle that changes each epoch, or the plain order.

    Lightning calls ``set_epoch`` at the start of every epoch (also after a resume), so the order of epoch k
    depends only on (seed, k): a resumed run sees the same batches as an uninterrupted one. The permutation is
    drawn on the data's device (no host-to-device copy per batch on a GPU; on the CPU the same draws as ever).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, device: torch.device | str = "cpu"):
        self.n, self.shuffle, self.seed, self.device, self.epoch = n, shuffle, seed, device, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def indices(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n, device=self.device)
        generator = seeded_generator(self.seed, self.epoch, self.device)
        return torch.randperm(self.n, generator=generator, device=self.device)


class InMemoryLoader:
    """Batches of (uint8 images, int64 labels) indexed out of in-memory tensors; the last partial batch is kept.

    With several processes (DDP), each global batch of ``batch_size`` is split between the ranks: every rank
    takes the same number of steps, every sample is used exactly once per epoch, and the averaged gradients
    are those of one process with the same batch size.
    """

    batch_sampler = None  # Lightning reads `sampler` and `batch_sampler` as on a torch DataLoader

    def __init__(self, images, labels, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size=1):
        if batch_size < world_size:  # some process would get empty batches (a NaN loss), every step
            raise UserError(
                f"a batch of {batch_size} cannot be split between {world_size} processes: data.batch_size and "
                "data.eval_batch_size must be at least the number of processes"
            )
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSampler(len(labels), shuffle, seed, labels.device)

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
            mine = batch.tensor_split(self.world_size)[self.rank]
            yield self.images[mine], self.labels[mine]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST (or ``dataset``: fashion_mnist, kmnist) for the two stages.

    stage "initial": a seeded split of the 60k training images into train (1 - val_fraction) and validation, or
    with ``folds``, fold ``fold`` of a seeded k-fold partition as validation.
    stage "full": all 60k images for training; the 10k test images are the per-epoch evaluation set.
    The test set is always the 10k official test images. Batches hold uint8 pixels; ``setup`` also computes
    the mean and std of all 60k training images (``self.mean``, ``self.std``), which the model normalises with.
    """

    def __init__(
        self,
        data_dir: str = DATA_DIR,
        dataset: str = "mnist",
        stage: Literal["initial", "full"] = "initial",
        val_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 250,
        download: bool = True,
        folds: int | None = None,
        fold: int = 0,
        split_seed: int | None = None,
    ):
        """
        Args:
            data_dir: holds ``MNIST/raw/`` (or ``FashionMNIST/raw/``, ``KMNIST/raw/``); downloaded if missing.
            dataset: mnist, fashion_mnist or kmnist.
            stage: initial (90/10 split, validated on the 10 %) or full (all 60k, evaluated on the test set).
            val_fraction: share of the 60k training images held out for validation in the initial stage.
            seed: seeds the shuffling, and the split unless ``split_seed`` is given (set from --seed_everything).
            batch_size: training batch; with DDP the global one, split between the processes.
            eval_batch_size: batch of the validation and test passes. The figures do not depend on it; the
                original's 1000 adds ~90 MiB to the peak memory of a CPU run (LeNet's convolution buffers).
            download: download missing files with torchvision.
            folds: k-fold cross-validation of the initial stage: the 60k training images cut into this many
                seeded, disjoint parts; validation is part ``fold``, training the rest (``val_fraction`` unused).
            fold: which part validates, 0..folds-1.
            split_seed: seeds the split alone (None: ``seed``). Runs with the same split_seed, val_fraction and
                fold hold out the same images whatever their seed, net or recipe: an ensemble's members can be
                compared and chosen on a validation set they share.
        """
        super().__init__()
        dataset_spec(dataset)  # fail early on an unknown name
        require(
            (0 < val_fraction < 1, f"data.val_fraction must be between 0 and 1 (got {val_fraction})"),
            (batch_size >= 1 and eval_batch_size >= 1, "data.batch_size and data.eval_batch_size must be >= 1"),
            (seed >= 0, f"the seed must be >= 0 (got {seed})"),
            (split_seed is None or split_seed >= 0, f"data.split_seed must be >= 0 (got {split_seed})"),
        )
        self.save_hyperparameters(logger=False)  # the run's config goes to the logger whole (run_config.RunConfig)
        self.train_set = self.val_set = None
        self.mean, self.std = MEAN, STD

    def __str__(self) -> str:  # Lightning's lists the loaders' sizes, making them (reading the test files)
        return f"MNISTDataModule({self.hparams.dataset}, {self.hparams.stage} stage, {self.hparams.data_dir})"

    @property
    def eval_split(self) -> str:
        """What the per-epoch evaluation (Lightning's validation loop) runs on: 'val', or 'test' in the full stage."""
        return eval_split_of(self.hparams.stage)

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
            hp = self.hparams
            train_idx, val_idx = split_indices(len(train_labels), hp.val_fraction, split_seed(hp), hp.folds, hp.fold)
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
