"""The project's additions to Lightning, each through Lightning's own extension points (callbacks, a CheckpointIO
plugin, a ModelCheckpoint subclass, loggers): numbered and last checkpoints, atomic writes, a line per epoch,
TensorBoard's layout, the divergence stop, the full stage's fresh optimizer, EMA with recomputed BatchNorm statistics,
the run's config."""

import inspect
import logging
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.utilities.logger import _flatten_dict
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.callbacks.weight_averaging import EMAWeightAveraging
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

from mnist_lit.data import seeded_generator
from mnist_lit.errors import UserError
from mnist_lit.module import format_eval
from mnist_lit.runs import OUTPUT_SWITCHES, PATH_KEYS

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


SPLITS = ("train", "val", "test")
# The Custom Scalars page: every split and stage of a metric on one chart (a run's stages share one step axis).
LAYOUT = {
    "curves": {
        "accuracy": ["Multiline", [r"^acc/(train|val|test)$"]],
        "loss": ["Multiline", [r"^loss/(train|val|test)$"]],
        "learning rate": ["Multiline", [r"^lr$"]],
    }
}


def tensorboard_tag(key: str) -> str | None:
    """A logged metric's TensorBoard tag, metric first: ``val/acc`` -> ``acc/val``, ``val/acc_best`` ->
    ``acc/val_best``. TensorBoard groups tags by their first part, alphabetically, and opens the first groups: so
    its pages open on accuracy and loss. None for what is no curve: Lightning's ``epoch`` counter and the
    constant image counts (``val/count``, in results.json and the epoch lines)."""
    split, _, name = key.partition("/")
    if key == "epoch" or name == "count":
        return None
    if split not in SPLITS or not name:
        return key
    metric, _, suffix = name.partition("_")
    return f"{metric}/{split}" + (f"_{suffix}" if suffix else "")


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger, laid out for this project: tags from ``tensorboard_tag``, the Custom Scalars
    page of ``LAYOUT``, and HPARAMS rows without one-point ``hp/`` charts: TensorBoard takes each row's metrics
    from the run's own curves (their last values), its columns from all runs, those that differ first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, default_hp_metric=False, **kwargs)
        self.layout_written = False

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.layout_written:
            self.experiment.add_custom_scalars(LAYOUT)
            self.layout_written = True
        tags = ((tensorboard_tag(key), value) for key, value in metrics.items())
        super().log_metrics({tag: value for tag, value in tags if tag}, step)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None, step: int | None = None) -> None:
        super().log_hyperparams(params)  # keeps them (hparams.yaml); writes nothing without metrics
        if metrics:
            # Only the session's start and end: an experiment summary (hparams()'s first) would fix the columns
            # to this run's, and TensorBoard reads one run's experiment only.
            _, start, end = hparams(self._sanitize_params(_flatten_dict(params)), {})
            writer = self.experiment._get_file_writer()
            writer.add_summary(start, step)
            writer.add_summary(end, step)


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


class StepSeededRNG(Callback):
    """Seed torch's global generator before every training step from (run seed, step, process): random layers of
    a net (a dropout) draw the same after a resume, which Lightning's checkpoints do not ensure (they keep no RNG
    state). Nothing else in a step draws from it (data order and augmentation have their own generators)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step * trainer.world_size + trainer.global_rank
        seed = seeded_generator(pl_module.hparams.seed, step).initial_seed()
        torch.manual_seed(seed ^ 0x5EED_D80F)  # not the numbers the augmentation draws


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


# Where a run reads and writes, what it prints, the project's fixed Trainer settings, and values derived from
# others (the full stage's length is in trainer.max_epochs, eval_split follows the stage, pixel_stats the data):
# not the experiment.
NOT_SETTINGS = {
    *PATH_KEYS, *OUTPUT_SWITCHES, "data.eval_batch_size", "full_epochs", "model.eval_split", "model.pixel_stats",
    "trainer.logger", "trainer.num_sanity_val_steps", "trainer.use_distributed_sampler",
}  # fmt: skip


def experiment_settings(config: dict) -> dict:
    """The settings that describe a run's experiment, recipe first: the config without paths and switches, and
    only the Trainer settings that differ from its defaults."""
    config = {**config, "trainer": changed_trainer_settings(config.get("trainer", {}))}
    order = ["recipe", "stage", "seed_everything", "model", "data", "trainer"]
    settings = {}
    for key in sorted(config, key=lambda k: order.index(k) if k in order else len(order)):
        value = config[key]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{key}.{k}" not in NOT_SETTINGS}
        if key not in NOT_SETTINGS:
            settings[key] = value
    return settings


class RunConfig(SaveConfigCallback):
    """The run's resolved config, the way LightningCLI keeps it (``config.yaml``), also written into every
    checkpoint (so a resume or the full stage starts from the run's own settings) and, at the end, to the
    loggers as the run's hyperparameters with its final accuracy (TensorBoard's HPARAMS tab compares runs)."""

    def __init__(self, parser, config, run_dir: Path | None = None, **kwargs):
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.run_dir = run_dir
        self.text = parser.dump(config, skip_unset=False)  # plain YAML: safe in a weights_only checkpoint

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run_dir is not None:  # rank 0 only; the other processes have no run folder
            (self.run_dir / self.config_filename).write_text(self.text)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["config"] = self.text

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        split = pl_module.eval_split
        if not trainer.is_global_zero or f"{split}/acc" not in trainer.callback_metrics:
            return
        settings = experiment_settings(yaml.safe_load(self.text))
        final = {f"{split}/acc": float(trainer.callback_metrics[f"{split}/acc"])}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoard):
                logger.log_hyperparams(settings, final)
            else:
                logger.log_hyperparams(settings)
        if self.run_dir is not None:  # Lightning wrote it empty at the start (the classes log no hparams)
            save_hparams_to_yaml(self.run_dir / "hparams.yaml", settings)
