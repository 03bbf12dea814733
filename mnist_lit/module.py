"""The LightningModule: net + loss + torchmetrics + optimizer (SGD as in the original, or Adam) + schedule."""

import logging

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_lit.augment import random_affine
from mnist_lit.data import MEAN, NUM_CLASSES, STD, normalize, seeded_generator
from mnist_lit.errors import UserError
from mnist_lit.loss import nll_loss
from mnist_lit.net import build_net

log = logging.getLogger("mnist_lit")
EVAL_CHUNK = 250  # images per forward pass in evaluation (the eval batch stays the original's 1000)


class SplitMetrics(nn.Module):
    """Accuracy, mean loss over all samples (the last partial batch weighs what it holds) and sample count.

    A step only keeps its predictions, targets and loss (on the device, no host sync); torchmetrics takes them
    in every FLUSH_EVERY steps and at the epoch's end. Measured on the 2-core CPU (LeNet, batch 64): three
    torchmetrics updates per step cost ~0.2 s of a ~9 s epoch; keeping a whole epoch's small tensors instead
    fragmented the heap (peak RSS +~80 MiB).
    """

    FLUSH_EVERY = 64

    def __init__(self, num_classes: int):
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        # A NaN loss shows as NaN, never silently dropped ("disable" would also drop the weights, torchmetrics 1.9).
        self.loss = MeanMetric(nan_strategy=float("nan"))
        self.count = SumMetric()
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.steps = 0  # steps taken in since the last reset
        self.first_bad = -1  # the first of them whose loss is NaN or infinite

    def update(self, log_probs: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        self.pending.append((log_probs.argmax(1), targets, loss))
        if len(self.pending) == self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        predictions, targets, losses = zip(*self.pending)
        self.pending = []
        losses = torch.stack(losses)
        sizes = torch.tensor([len(t) for t in targets], device=losses.device)
        self.acc.update(torch.cat(predictions), torch.cat(targets))
        self.count.update(sizes.sum())
        self.loss.update(losses, weight=sizes.float())  # a copy: MeanMetric writes into the weights of NaN losses
        bad = (~torch.isfinite(losses)).nonzero()  # a host sync, once per FLUSH_EVERY steps
        if self.first_bad < 0 and len(bad):
            self.first_bad = self.steps + int(bad[0])
        self.steps += len(losses)

    def compute_and_reset(self) -> dict:
        """Epoch totals (synced across processes by torchmetrics) and this process's ``first_bad`` step index
        (-1: none), then a fresh start."""
        if self.pending:
            self._flush()
        result = {"loss": self.loss.compute(), "acc": self.acc.compute(), "count": self.count.compute()}
        result["first_bad"], result["steps"] = self.first_bad, self.steps
        for metric in (self.acc, self.loss, self.count):
            metric.reset()
        self.steps, self.first_bad = 0, -1
        return result


class MNISTLitModule(pl.LightningModule):
    """Trains a net from ``mnist_lit.net``.

    optimizer "sgd" (momentum, optional Nesterov) or "adam"; schedule "multistep" (lr x gamma after each
    milestone, counted in epochs from the stage's start) or "onecycle" (per step, peaking at lr).

    ``precision`` is recorded here and applied by the Trainer ("bf16-mixed": Lightning's bfloat16 autocast).

    stage "initial" evaluates on the validation split each epoch (logged as ``val/*``); stage "full" trains
    on all training images and evaluates on the test set each epoch (logged as ``test/*``).
    All hyperparameters are plain data, saved in every checkpoint.
    """

    def __init__(
        self,
        net: str = "lenet",
        lr: float = 0.01,
        momentum: float = 0.5,
        milestones: tuple[int, ...] = (2, 10),
        gamma: float = 0.1,
        stage: str = "initial",
        epochs: int = 20,
        dataset: str = "mnist",
        recipe: str = "seed",
        optimizer: str = "sgd",
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: str = "multistep",
        label_smoothing: float = 0.0,
        augment: bool = False,
        elastic: float = 0.0,
        ema_decay: float = 0.0,
        channels_last: bool = False,
        precision: str = "32-true",
        seed: int = 0,
    ):
        super().__init__()
        if optimizer not in ("sgd", "adam") or schedule not in ("multistep", "onecycle"):
            raise UserError(f"unknown optimizer {optimizer!r} or schedule {schedule!r}")
        self.save_hyperparameters()
        self.hparams.milestones = list(milestones)  # plain list, also when given as a tuple
        self.net = build_net(net, NUM_CLASSES)
        if channels_last:  # NHWC: oneDNN's faster convolution layout on CPUs (measured in scripts/benchmark.py)
            self.net.to(memory_format=torch.channels_last)
        # The training images' pixel mean and std, taken from the data module at setup: saved with the
        # weights, so the model can be used (predict, export) without the data.
        self.register_buffer("pixel_stats", torch.tensor([MEAN, STD], dtype=torch.float64))
        # One metric object per split (ModuleDict keys may not be "train": nn.Module.train exists).
        self.train_metrics = SplitMetrics(NUM_CLASSES)
        self.val_metrics = SplitMetrics(NUM_CLASSES)
        self.test_metrics = SplitMetrics(NUM_CLASSES)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        self.eval_split = "val" if stage == "initial" else "test"
        self.last_eval: dict[str, torch.Tensor] = {}
        self.epoch_lr = lr
        # Manual optimization: training_step makes the plain PyTorch step itself. Lightning's automatic one
        # (closure, more per-step hooks) was the larger part of its per-step overhead (measured: README, Speed).
        self.automatic_optimization = False

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets _current_fx_name around every hook call, ~30 times a training step; nn.Module's generic
        # __setattr__ (parameter/buffer/module checks) made that ~1.2 us each, 30 ms of a 9 s LeNet epoch here.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        if datamodule.hparams.dataset != self.hparams.dataset:
            raise UserError(f"this model is for {self.hparams.dataset}, the data is {datamodule.hparams.dataset}")
        if stage == "fit":  # evaluation keeps the statistics the model was trained with
            self.pixel_stats = torch.tensor([datamodule.mean, datamodule.std], dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def _step(self, batch, split: str) -> torch.Tensor:
        images, targets = batch
        images = self._layout(images)
        if split == "train":
            log_probs = self.net(images)
        else:  # in chunks, same outputs: a CPU convolution's buffers for 1000 images added ~150 MB to peak RSS
            log_probs = torch.cat([self.net(chunk) for chunk in images.split(EVAL_CHUNK)])
        log_probs = log_probs.float()  # float32 for the loss and metrics, also under bf16 autocast
        # Label smoothing is a training device: evaluation reports the plain negative log-likelihood.
        loss = nll_loss(log_probs, targets, self.hparams.label_smoothing if split == "train" else 0.0)
        # No self.log here: epoch-level metrics only, so no per-step host sync or logging overhead.
        getattr(self, f"{split}_metrics").update(log_probs.detach(), targets, loss.detach())
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.augment:
            batch = (self._augment(batch[0]), batch[1])
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self._step(batch, "train")
        self.manual_backward(loss)  # Lightning's backward: precision plugin, DDP gradient sync
        optimizer.step()
        if self.hparams.schedule == "onecycle":  # a per-step schedule
            self.lr_schedulers().step()
        return loss

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        # Draws depend only on (seed, step), never on global RNG state, so a resumed run augments identically.
        generator = seeded_generator(self.hparams.seed, self.global_step, images.device)
        mean, std = self.pixel_stats.tolist()
        return random_affine(images, generator, background=-mean / std, elastic=self.hparams.elastic)

    def recompute_batchnorm_stats(self, images: torch.Tensor) -> None:
        """Set the net's BatchNorm running statistics to those of ``images`` (uint8, N x 28 x 28) under the
        current weights: forward passes in training mode, in chunks, averaged over all chunks (update_bn)."""
        mean, std = self.pixel_stats.tolist()
        chunks = (self._layout(normalize(chunk.to(self.device), mean, std)) for chunk in images.split(EVAL_CHUNK))
        update_bn(chunks, self.net)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.eval_split)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, split: str) -> dict[str, torch.Tensor]:
        result = getattr(self, f"{split}_metrics").compute_and_reset()
        self.log_dict({f"{split}/loss": result["loss"], f"{split}/acc": result["acc"]})
        return result

    def on_validation_epoch_end(self) -> None:
        self.last_eval = self._log_epoch(self.eval_split)
        if self.eval_split == "val" and not self.trainer.sanity_checking:
            self.val_acc_best.update(self.last_eval["acc"])
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self.last_eval = self._log_epoch("test")

    def on_train_epoch_start(self) -> None:
        self.epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # for the epoch's log line

    def on_train_epoch_end(self) -> None:
        if self.hparams.schedule == "multistep":  # a per-epoch schedule; stepped before the epoch's checkpoint
            self.lr_schedulers().step()
        train = self._log_epoch("train")
        if train["first_bad"] >= 0:  # checked before this epoch's checkpoints are written
            bad_step = self.global_step - train["steps"] + train["first_bad"]
            raise UserError(
                f"training diverged: the loss is not finite from epoch {self.current_epoch + 1}, global step "
                f"{bad_step}; stopped before saving, the last good checkpoint is the previous "
                "epoch's last.ckpt"
            )
        if not self.trainer.is_global_zero:
            return
        log.info(
            "epoch %d lr %g train loss %.4f %s",
            self.current_epoch + 1,
            self.epoch_lr,
            float(train["loss"]),
            format_eval(self.eval_split, self.last_eval),
        )

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        if hp.schedule == "onecycle":  # warm up to lr, then anneal to ~0 over the stage's remaining steps
            steps = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps)
            interval = "step"
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, hp.milestones, hp.gamma)
            interval = "epoch"
        # training_step and on_train_epoch_end step the scheduler; Lightning saves and restores its state, and
        # LearningRateMonitor reads "interval" to know when to log the lr.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval, "name": "lr"}}


def correct_and_count(result: dict[str, torch.Tensor]) -> tuple[int, int]:
    """How many of how many images an evaluation got right."""
    count = int(result["count"])
    return round(float(result["acc"]) * count), count


def format_eval(split: str, result: dict[str, torch.Tensor]) -> str:
    """'val 5910/6000 (98.50%)', the original project's way of reporting an evaluation."""
    if not result:
        return f"{split} -"
    correct, count = correct_and_count(result)
    return f"{split} {correct}/{count} ({100 * correct / count:.2f}%)"
