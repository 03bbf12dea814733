"""The project's additions to Lightning, each through Lightning's own extension points (callbacks, a CheckpointIO
plugin, a ModelCheckpoint subclass, a logger): numbered and last checkpoints, atomic writes, a line per epoch,
the divergence stop, the full stage's fresh optimizer, EMA with recomputed BatchNorm statistics, the run's config."""

import inspect
import logging
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.callbacks.weight_averaging import EMAWeightAveraging
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from mnist_lit.errors import UserError
from mnist_lit.module import format_eval

log = logging.getLogger("mnist_lit")


class NumberedCheckpoint(ModelCheckpoint):
    """Keeps every n-th epoch as ``005.ckpt``, ``010.ckpt``, ...: 1-based epoch numbers, like the original."""

    def __init__(self, dirpath: Path | None, every_n_epochs: int):
        super().__init__(
            dirpath=dirpath,
            filename="{epoch:03d}",
            auto_insert_metric_name=False,
            every_n_epochs=every_n_epochs,
            save_top_k=-1,
            save_on_train_epoch_end=True,
        )

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None) -> str:
        return super().format_checkpoint_name({**metrics, "epoch": metrics["epoch"] + 1}, filename, ver, prefix)


def last_checkpoint(dirpath: Path | None) -> ModelCheckpoint:
    """``last.ckpt`` after every epoch. Lightning's ``save_last`` writes it only together with a top-k save, so
    this is a second callback that saves every epoch under that one name."""
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="last",
        every_n_epochs=1,
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, flush it to disk, then rename: a killed run never leaves a torn checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting epochs from 1 like the logs and checkpoint names."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


def eval_summary(metrics: dict, split: str) -> tuple[str, int | None, int | None]:
    """An evaluation's metrics as 'val 5910/6000 (98.50%)', with its correct and total counts (None: none ran)."""
    if f"{split}/acc" not in metrics:
        return f"{split} -", None, None
    count = int(metrics[f"{split}/count"])
    correct = round(float(metrics[f"{split}/acc"]) * count)
    return format_eval(split, correct, count), correct, count


class EpochLines(Logger):
    """A logger that prints one line per epoch, as the original did: ``epoch 20 lr 0.0001 train loss 0.0424 val
    5884/6000 (98.07%)``. Lightning hands every logger the epoch's values once they are computed (rank 0 only):
    the evaluation's and the lr first, then the training epoch's, which complete the line."""

    def __init__(self):
        super().__init__()
        self.latest: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "epoch_lines"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.latest.update(metrics)
        if "train/loss" not in metrics:
            return
        split = "test" if "test/acc" in self.latest else "val"
        line = f"epoch {int(metrics['epoch']) + 1} lr {self.latest.get('lr', math.nan):g} train loss "
        log.info("%s%.4f %s", line, metrics["train/loss"], eval_summary(self.latest, split)[0])


class DivergenceStop(EarlyStopping):
    """Stop with one clear error when an epoch's mean training loss is not finite, before that epoch's checkpoints
    are written, so last.ckpt stays the last good epoch's. It is Lightning's EarlyStopping with check_finite on
    ``train/loss``: Lightning runs it after the module has logged the epoch and before the checkpoint callbacks.
    One host sync per epoch, none per step."""

    def __init__(self):
        super().__init__(monitor="train/loss", patience=2**31, check_finite=True, check_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        loss = trainer.callback_metrics.get(self.monitor)
        if loss is not None and not math.isfinite(float(loss)):
            raise UserError(
                f"training diverged: the loss is not finite in epoch {trainer.current_epoch + 1}; stopped before "
                "saving, the last good checkpoint is the previous epoch's last.ckpt"
            )


class FreshOptimizer(Callback):
    """Start the full stage with a new optimizer and schedule, as the original did, after Lightning restored
    the initial stage's weights, epoch and step from its checkpoint."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.setup_optimizers(trainer)


class EMAWithFreshBatchNorm(EMAWeightAveraging):
    """Lightning's EMA of the weights, whose BatchNorm statistics are recomputed for the averaged weights at the
    end: before the last epoch's validation, from the clean training images (one forward pass over them).

    With ``use_buffers=True`` the EMA averages BatchNorm's running statistics like weights, but statistics
    averaged over many steps need not fit the averaged weights; SWA recomputes them for that reason
    (torch.optim.swa_utils.update_bn). Measured on the strong recipe: docs/recipes.md.
    """

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)  # swaps: pl_module now holds the averaged weights
        if trainer.sanity_checking or trainer.current_epoch != trainer.max_epochs - 1:
            return
        start, datamodule = time.perf_counter(), trainer.datamodule
        with trainer.precision_plugin.forward_context():  # the statistics of the activations training sees
            pl_module.recompute_batchnorm_stats(datamodule.train_set[0], datamodule.hparams.eval_batch_size)
        # The swap back at the epoch's end hands these statistics to the averaged model, which is checkpointed.
        log.info("EMA: BatchNorm statistics recomputed from the training images, %.1f s", time.perf_counter() - start)


def changed_trainer_settings(trainer_config: dict) -> dict:
    """The Trainer settings of a config that differ from the Trainer's defaults (callbacks by class name)."""
    defaults = inspect.signature(pl.Trainer).parameters
    changed = {k: v for k, v in trainer_config.items() if k in defaults and v != defaults[k].default}
    if changed.get("callbacks"):
        callbacks = changed["callbacks"] if isinstance(changed["callbacks"], list) else [changed["callbacks"]]
        changed["callbacks"] = ", ".join(str(c.get("class_path", c)).rsplit(".", 1)[-1] for c in callbacks)
    return changed


class RunConfig(SaveConfigCallback):
    """The run's resolved config, the way LightningCLI keeps it (``config.yaml``), also written into every
    checkpoint (so a resume or the full stage starts from the run's own settings) and, at the end, to the
    loggers as the run's hyperparameters with its final accuracy (TensorBoard's HPARAMS tab compares runs)."""

    def __init__(self, parser, config, run_dir: Path | None = None, **kwargs):
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.run_dir = run_dir
        self.text = parser.dump(config, skip_none=False)  # plain YAML: safe in a weights_only checkpoint

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run_dir is not None:  # rank 0 only; the other processes have no run folder
            (self.run_dir / self.config_filename).write_text(self.text)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["config"] = self.text

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        split = pl_module.eval_split
        if not trainer.is_global_zero or f"{split}/acc" not in trainer.callback_metrics:
            return
        settings = yaml.safe_load(self.text)
        settings["trainer"] = changed_trainer_settings(settings.get("trainer", {}))
        final = {f"hp/{split}_acc": float(trainer.callback_metrics[f"{split}/acc"])}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(settings, final)
            else:
                logger.log_hyperparams(settings)
        if self.run_dir is not None:  # Lightning wrote it empty at the start (the classes log no hparams)
            save_hparams_to_yaml(self.run_dir / "hparams.yaml", settings)
