"""The project's callbacks, each through Lightning's own extension points: numbered and last checkpoints, the
progress bar counting epochs from 1, the divergence stop, the full stage's fresh optimizer, dropout draws that
survive a resume, threads for the free cores, EMA with recomputed BatchNorm statistics, and the checks of the
callback state a checkpoint brings back."""

import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint, Timer, TQDMProgressBar
from pytorch_lightning.callbacks.weight_averaging import EMAWeightAveraging

from mnist_lit.checkpoint_io import own_file
from mnist_lit.data import seeded_generator
from mnist_lit.errors import UserError
from mnist_lit.schema import SchemaError, check_mapping, shown
from mnist_lit.threads import adapt_threads

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


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting epochs from 1 like the logs and checkpoint names."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Without Lightning's ``v_num`` (the run folder's version is in every line of the log)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


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


class ThreadsForFreeCores(Callback):
    """Torch's thread count follows the cores other processes leave free (``mnist_lit.threads``), checked
    between batches (``MNIST_LIT_THREADS=follow``: the results then depend on the load). Not with several
    processes (DDP): Lightning divides the cores between them."""

    def __init__(self):
        self.active = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = trainer.world_size == 1
        if self.active:
            adapt_threads()  # the first measurement starts

    def on_train_batch_start(self, *args) -> None:
        if self.active:
            adapt_threads()

    def on_validation_batch_start(self, *args) -> None:
        if self.active:
            adapt_threads()


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


class CheckedRestore(Callback):
    """The callback state a run goes on from, read as data. Lightning restores each callback's state from the
    checkpoint: a ModelCheckpoint's file paths (on its first save it removes the "previous" file it names), an
    EarlyStopping's counters and patience, a Timer's elapsed time. Before they are restored: the paths are kept
    only where they are files of this run's own checkpoints folder (the others become ""); the stopping state is
    checked against the run's own settings on a resume, and dropped when a new stage starts; everything is
    checked for its type; the states of callbacks this run does not have are dropped."""

    def __init__(self, new_stage: bool):
        self.new_stage = new_stage

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        stored, checked = checkpoint.get("callbacks") or {}, {}
        for callback in trainer.callbacks:
            state = stored.get(callback.state_key)
            if state is None or self.new_stage and isinstance(callback, (EarlyStopping, Timer)):
                continue
            try:
                if isinstance(callback, ModelCheckpoint):
                    state = own_paths(state, callback.dirpath)
                elif isinstance(callback, EarlyStopping):
                    check_stopping_state(state, callback)
                else:
                    check_state(state, RESTORED_STATE)
            except SchemaError as err:
                raise UserError(
                    f"{trainer.ckpt_path}: its state of {type(callback).__name__} is refused: {err}"
                ) from None
            checked[callback.state_key] = state
        checkpoint["callbacks"] = checked


# The state Lightning's callbacks keep, as plain values (scores aside: tensors, see check_state).
CHECKPOINT_STATE = {
    "monitor": str | None,
    "dirpath": str | None,
    "best_model_path": str,
    "kth_best_model_path": str,
    "last_model_path": str,
    "best_k_models": dict,
    "best_model_score": object,
    "current_score": object,
    "kth_value": object,
}
STOPPING_STATE = {
    "wait_count": int,
    "stopped_epoch": int,
    "patience": int,
    "stopping_reason": int,
    "stopping_reason_message": str | None,
    "best_score": object,
}
RESTORED_STATE = {"time_elapsed": dict[str, float], "latest_update_step": int}  # Timer's, EMA's
SCORES = ("best_model_score", "current_score", "kth_value", "best_score")


def check_state(state, types: dict) -> None:
    """SchemaError unless ``state`` holds only these keys with values of these types, its scores None or one
    number (a tensor)."""
    if not isinstance(state, dict):
        raise SchemaError("state", f"{shown(state)} is not a mapping")
    check_mapping({key: value for key, value in state.items() if types.get(key) is not object}, types, "")
    scores = [(key, state[key]) for key in SCORES if key in state]
    scores += [(f"best_k_models[{shown(path)}]", score) for path, score in state.get("best_k_models", {}).items()]
    for key, score in scores:
        if score is not None and not (isinstance(score, torch.Tensor) and score.numel() == 1):
            raise SchemaError(key, f"{shown(score)} is not a score")


def own_paths(state: dict, folder) -> dict:
    """A ModelCheckpoint's state with only the paths that are files of ``folder``; the others become ""."""
    check_state(state, CHECKPOINT_STATE)
    paths = {key: state[key] for key in ("best_model_path", "kth_best_model_path", "last_model_path") if key in state}
    own = {key: str(own_file(path, folder) or "") for key, path in paths.items()}
    best_k = {path: score for path, score in state.get("best_k_models", {}).items() if own_file(path, folder)}
    return {**state, **own, "best_k_models": best_k}


def check_stopping_state(state: dict, callback: EarlyStopping) -> None:
    """An EarlyStopping's counters as the run's own settings allow them: its patience, a wait within it."""
    check_state(state, STOPPING_STATE)
    if state.get("patience") != callback.patience:
        raise SchemaError("patience", f"{shown(state.get('patience'))} is not the run's {callback.patience}")
    if not 0 <= state.get("wait_count", 0) <= callback.patience or state.get("stopped_epoch", 0) < 0:
        raise SchemaError("wait_count", f"{shown(state.get('wait_count'))} is not within the patience")
