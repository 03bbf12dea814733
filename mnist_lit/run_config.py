"""The run's settings as it keeps them: ``config.yaml``, the config inside every checkpoint, and the experiment's
settings (without paths and switches) as the loggers' hyperparameters."""

import inspect
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.core.saving import save_hparams_to_yaml

from mnist_lit.loggers import TensorBoard
from mnist_lit.runs import OUTPUT_SWITCHES, PATH_KEYS


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
    *PATH_KEYS,
    *OUTPUT_SWITCHES,
    "data.eval_batch_size",
    "full_epochs",
    "model.eval_split",
    "model.pixel_stats",
    "trainer.logger",
    "trainer.num_sanity_val_steps",
    "trainer.use_distributed_sampler",
}


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
