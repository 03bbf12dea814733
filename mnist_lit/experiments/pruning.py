"""The trial's side of ``scripts/tune.py``: a callback in the trial's train.py process that reports each epoch's
validation accuracy to the trial and stops the run when the study's pruner says so. Apart from tune.py because it
needs Lightning and tune.py does not: a tune.py worker only starts processes and talks to the database, so it
starts in a fraction of a second instead of importing torch and Lightning for nothing."""

from pathlib import Path

import optuna
from pytorch_lightning.callbacks import Callback

from mnist_lit.experiments import launch
from mnist_lit.experiments.tune import make_pruner


class OptunaPruning(Callback):
    """In a trial's train.py process: records the run folder in the trial's user attrs, reports val/acc after every
    epoch (step: the 1-based epoch) and stops training when the study's pruner says so; tune.py then marks the trial
    PRUNED. optuna_integration's PyTorchLightningPruningCallback subclasses ``lightning.pytorch``'s Callback, which
    this project's ``pytorch_lightning`` Trainer does not take: hence this small one."""

    def __init__(self, storage: str, study: str, trial: int, prune_below: float | None = None):
        super().__init__()
        self.where = storage, study, trial, prune_below
        self.trial: optuna.Trial | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # the other DDP processes have no run folder and follow rank 0's should_stop
            storage, name, number, prune_below = self.where
            storage = launch.open_storage(storage)
            study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(prune_below))
            study_id = storage.get_study_id_from_name(name)  # the storage's public API, not the study's privates
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            self.trial = optuna.Trial(study, trial_id)
            self.trial.set_user_attr("run_dir", str(Path(trainer.checkpoint_callback.dirpath).parent))

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.trial is None or trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch + 1
        self.trial.report(float(trainer.callback_metrics["val/acc"]), epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            trainer.should_stop = True
