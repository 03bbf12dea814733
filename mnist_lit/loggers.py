"""The run's loggers: a line per epoch on the console and in log.txt, and TensorBoard laid out for this project
(tags metric first, a Custom Scalars page, HPARAMS rows)."""

import logging
import math

from lightning_fabric.utilities.logger import _flatten_dict
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

from mnist_lit.module import format_eval

SPLITS = ("train", "val", "test")  # the splits a metric is logged for: "val/acc", "test/loss", ...

log = logging.getLogger("mnist_lit")


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


def delegated(name: str) -> property:
    """A read-only property that answers with the wrapped logger's own (``self.logger.<name>``)."""
    return property(lambda self: getattr(self.logger, name))


class EpochsFromOne(Logger):
    """A logger added from the command line (``--trainer.logger+=CSVLogger``), its ``epoch`` values counted from 1
    like the run's log lines and checkpoint names (Lightning hands every logger its 0-based epoch counter)."""

    def __init__(self, logger: Logger):
        super().__init__()
        self.logger = logger

    def __getattr__(self, name: str):  # what the logger has beyond the Logger interface (its experiment, ...)
        if name == "logger":
            raise AttributeError(name)
        return getattr(self.logger, name)

    # Logger declares these on the class (name and version abstract), so __getattr__ never sees them.
    name = delegated("name")
    version = delegated("version")
    save_dir = delegated("save_dir")
    log_dir = delegated("log_dir")
    root_dir = delegated("root_dir")

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.logger.log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        self.logger.log_metrics(metrics, step)

    def log_graph(self, model, input_array=None) -> None:
        self.logger.log_graph(model, input_array)

    def save(self) -> None:
        self.logger.save()

    def finalize(self, status: str) -> None:
        self.logger.finalize(status)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.logger.after_save_checkpoint(checkpoint_callback)
