"""The LightningModule: net + loss + torchmetrics + optimizer (SGD as in the original, or Adam) + schedule."""

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import update_bn
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_lit.augment import random_affine
from mnist_lit.data import normalize, seeded_generator
from mnist_lit.errors import require
from mnist_lit.idx import IMAGE_SIZE, MEAN, NUM_CLASSES, STD
from mnist_lit.loss import nll_loss
from mnist_lit.net import build_net


def split_metrics() -> tuple[MulticlassAccuracy, MeanMetric]:
    """The accuracy and the mean loss of one split, updated every step (see ``MNISTLitModule.model_step``)."""
    # validate_args=False: the argument checks cost a host sync on every update. The loss mean takes each sample's
    # loss: the last, partial batch weighs what it holds. nan_strategy="disable": no NaN check (a host sync per
    # update); a NaN loss makes the mean NaN.
    return MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False), MeanMetric(nan_strategy="disable")


class MNISTLitModule(pl.LightningModule):
    """A net from ``mnist_lit.net`` with its input normalisation: it takes images as MNIST stores them.

    ``model(images)``: pixels 0..255 (uint8 or float, N x 28 x 28 or N x 1 x 28 x 28) -> log-probabilities
    (N x 10), normalised with the training images' statistics saved in the model (``pixel_stats``).
    The defaults are the original protocol's (the ``seed`` recipe). Logged per epoch: ``{split}/loss``,
    ``{split}/acc`` (and ``val/acc_best``), where the per-epoch evaluation is logged as ``eval_split``: ``val``
    in the initial stage, ``test`` in the full stage. Hyperparameters are plain data, saved in every checkpoint,
    so ``MNISTLitModule.load_from_checkpoint(path, weights_only=True).eval()`` rebuilds the model.
    """

    def __init__(
        self,
        net: str = "lenet",
        net_options: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.5,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: Literal["multistep", "onecycle"] = "multistep",
        milestones: Sequence[int] = (2, 10),
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        augment: bool = False,
        elastic: float = 0.0,
        channels_last: bool = False,
        seed: int = 0,
        eval_split: Literal["val", "test"] = "val",
        pixel_stats: tuple[float, float] | None = None,
    ):
        """
        Args:
            net: a name in the registry ``mnist_lit.net.NETS`` (lenet: the original project's net).
            net_options: keyword arguments of that net's constructor, e.g. ``{dropout: 0.3}`` for lenet,
                ``{width: 32}`` for wide; their defaults are the constructor's.
            optimizer: sgd (with ``momentum``, ``nesterov``) or adam.
            lr: learning rate; OneCycle's peak with ``schedule: onecycle``.
            momentum: SGD momentum, in [0, 1).
            nesterov: Nesterov momentum (SGD).
            weight_decay: L2 penalty, >= 0.
            schedule: multistep (lr x ``gamma`` after each of ``milestones``, epochs counted from the stage's
                start) or onecycle (per step: warm up to ``lr``, then anneal to ~0 by the last step).
            milestones: increasing epochs after which the lr is multiplied by ``gamma``; the original's 2 10.
            gamma: lr factor at each milestone.
            label_smoothing: probability mass spread over all classes in the training loss (evaluation: plain NLL).
            augment: random rotation, shift and scale of each training batch, on the device.
            elastic: with augment, also bend each image by up to this many pixels.
            channels_last: NHWC memory layout for the convolutions (oneDNN's faster layout on CPUs).
            seed: the run's seed (set from --seed_everything): augmentation draws depend only on (seed, step).
            eval_split: what the per-epoch evaluation (Lightning's validation loop) is logged as: val, or test in
                the full stage (train.py sets it from --stage).
            pixel_stats: mean and std of the training images' pixels after /255, which the input is normalised
                with (train.py sets them from the data module's); None: MNIST's.
        """
        super().__init__()
        require(
            (lr > 0, f"model.lr must be > 0 (got {lr})"),
            (0 <= momentum < 1, f"model.momentum must be in [0, 1) (got {momentum})"),
            (weight_decay >= 0 and label_smoothing >= 0 and elastic >= 0, "model: negative regularisation setting"),
            (
                list(milestones) == sorted(set(milestones)) and min(milestones, default=1) > 0,
                f"model.milestones must be increasing, > 0 (got {list(milestones)})",
            ),
            (optimizer in ("sgd", "adam"), f"unknown model.optimizer {optimizer!r}: sgd or adam"),
            (schedule in ("multistep", "onecycle"), f"unknown model.schedule {schedule!r}: multistep or onecycle"),
            (eval_split in ("val", "test"), f"unknown model.eval_split {eval_split!r}: val or test"),
            (
                pixel_stats is None or (len(pixel_stats) == 2 and pixel_stats[1] > 0),
                f"model.pixel_stats must be (mean, std) with std > 0 (got {pixel_stats})",
            ),
        )
        self.save_hyperparameters(logger=False)  # the run's config goes to the logger whole (run_config.RunConfig)
        self.hparams.milestones = list(milestones)  # plain list, also when given as a tuple
        self.hparams.pixel_stats = None if pixel_stats is None else [float(v) for v in pixel_stats]
        self.net = build_net(net, NUM_CLASSES, net_options)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # One torchmetrics object per split and quantity (names as in Lightning's examples: "train" itself is taken
        # by nn.Module.train); the evaluations also count the images they saw (over all processes).
        self.train_acc, self.train_loss = split_metrics()
        self.val_acc, self.val_loss = split_metrics()
        self.test_acc, self.test_loss = split_metrics()
        self.val_count, self.test_count = SumMetric(nan_strategy="disable"), SumMetric(nan_strategy="disable")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best

    @property
    def eval_split(self) -> str:
        return self.hparams.eval_split

    @property
    def pixel_stats(self) -> tuple[float, float]:
        """Mean and std of the training images' pixels after /255: what the input is normalised with."""
        return tuple(self.hparams.pixel_stats) if self.hparams.pixel_stats is not None else (MEAN, STD)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N x 10, float32) of images as MNIST stores them: pixels 0..255, white on black,
        uint8 or float, N x 28 x 28 or N x 1 x 28 x 28. Call ``model.eval()`` first (BatchNorm, for the nets that
        have it, uses the training batch's statistics in training mode)."""
        return self.classify(self.preprocess(images))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels 0..255 -> the net's input, float32 N x 1 x 28 x 28 normalised with ``pixel_stats``: the one
        place where images are normalised (training, evaluation, forward, the BatchNorm recomputation, exports)."""
        shapes = ((IMAGE_SIZE, IMAGE_SIZE), (1, IMAGE_SIZE, IMAGE_SIZE))
        if not torch.jit.is_tracing() and tuple(images.shape[1:]) not in shapes:  # a trace's shapes are tensors
            raise ValueError(f"expected images of N x 28 x 28 or N x 1 x 28 x 28 pixels, got {tuple(images.shape)}")
        return normalize(images, *self.pixel_stats)

    def classify(self, inputs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (float32, also under bf16 autocast) of preprocessed images."""
        if self.hparams.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.net(inputs).float()

    def model_step(self, batch, training: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, log-probabilities and targets of a batch of (pixels, labels)."""
        images, targets = batch
        inputs = self.preprocess(images)
        if training and self.hparams.augment:
            inputs = self.augment(inputs)
        log_probs = self.classify(inputs)
        # Label smoothing is a training device: evaluation reports the plain negative log-likelihood.
        loss = nll_loss(log_probs, targets, self.hparams.label_smoothing if training else 0.0)
        return loss, log_probs, targets

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, log_probs, targets = self.model_step(batch, training=True)
        self.train_acc.update(log_probs, targets)
        self.train_loss.update(loss.detach().expand(len(targets)))  # one value per sample: a mean over samples
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.eval_split == "test":  # the full stage evaluates on the test set after every epoch
            return self.test_step(batch, batch_idx)
        loss, log_probs, targets = self.model_step(batch)
        self.val_acc.update(log_probs, targets)
        self.val_loss.update(loss.expand(len(targets)))
        self.val_count.update(len(targets))

    def test_step(self, batch, batch_idx: int) -> None:
        loss, log_probs, targets = self.model_step(batch)
        self.test_acc.update(log_probs, targets)
        self.test_loss.update(loss.expand(len(targets)))
        self.test_count.update(len(targets))

    # The metrics are logged once per epoch, from the epoch-end hooks: Lightning computes (syncs across processes)
    # and resets the metric objects. Logged from every step, Lightning would move each metric object to the device
    # on every call (docs/benchmark.md measures what a step costs).
    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.eval_split == "test":
            return self.on_test_epoch_end()
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True)
        self.log("val/count", self.val_count, on_step=False, on_epoch=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best(self.val_acc.compute())
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        self.log("test/count", self.test_count, on_step=False, on_epoch=True)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Log-probabilities of a batch of images (or of (images, labels) pairs, as the data module yields)."""
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def augment(self, inputs: torch.Tensor) -> torch.Tensor:
        """Randomly moved and bent preprocessed images; the uncovered border is a black pixel, preprocessed."""
        # Draws depend only on (seed, step), never on global RNG state, so a resumed run augments identically.
        generator = seeded_generator(self.hparams.seed, self.global_step, inputs.device)
        # The fill computed in float32 from float32 statistics: the value the strong recipe's figures were made with.
        mean, std = torch.tensor(self.pixel_stats, dtype=torch.float32)
        background = float(-mean / std)
        return random_affine(inputs, generator, background=background, elastic=self.hparams.elastic)

    def recompute_batchnorm_stats(self, images: torch.Tensor, batch_size: int) -> None:
        """Set the net's BatchNorm running statistics to those of ``images`` (uint8, N x 28 x 28) under the
        current weights: forward passes in training mode, averaged over all batches (torch's update_bn)."""
        batches = (self.preprocess(chunk.to(self.device)) for chunk in images.split(batch_size))
        if self.hparams.channels_last:
            batches = (batch.contiguous(memory_format=torch.channels_last) for batch in batches)
        with torch.no_grad():
            update_bn(batches, self.net)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints of earlier versions kept the statistics as a buffer ``pixel_stats`` among the weights (and
        their model took normalised images): the buffer is dropped, its values are used unless the model was given
        its own."""
        for key in ("state_dict", "current_model_state"):  # the second: the trained weights beside an EMA's
            old = checkpoint.get(key, {}).pop("pixel_stats", None)
            if old is not None and self.hparams.pixel_stats is None:
                self.hparams.pixel_stats = old.tolist()

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        if hp.schedule == "onecycle":
            steps = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, hp.milestones, hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "name": "lr"}}


def format_eval(split: str, correct: int, count: int) -> str:
    """'val 5910/6000 (98.50%)', the original project's way of reporting an evaluation."""
    return f"{split} {correct}/{count} ({100 * correct / count:.2f}%)"
