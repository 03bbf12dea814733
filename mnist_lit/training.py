"""From command-line options to a finished run: DataModule + LightningModule + Trainer, for both stages.

One code path serves every case:
- a new ``initial`` stage (no ``--ckpt``);
- a new ``full`` stage from an initial-stage checkpoint: Lightning restores weights, epoch and step (so the
  curves continue), then a fresh optimizer at lr 1e-4 takes over, as in the original project;
- an exact resume of an interrupted run of either stage (``--ckpt`` of that stage): Lightning restores
  weights, optimizer, scheduler, epoch and step; the data order depends only on (seed, epoch).
Each invocation writes into a new ``<save-dir>/<stage>/version_N`` and never touches an earlier run.
"""

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.callbacks.weight_averaging import EMAWeightAveraging
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tqdm import tqdm

from mnist_lit.data import DATASETS, MNISTDataModule
from mnist_lit.errors import ArgumentParser, UserError, exit_code
from mnist_lit.inference import load_checkpoint, module_from_checkpoint
from mnist_lit.module import MNISTLitModule, correct_and_count, format_eval
from mnist_lit.net import NETS
from mnist_lit.recipes import DATA_ONLY, FULL_STAGE, FULL_STAGE_EPOCHS, RECIPES, SEED

log = logging.getLogger("mnist_lit")
PACKAGE_DIR = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="train.py",
        description="Train the MNIST CNN: '--stage initial', then '--stage full --ckpt last.ckpt'.",
    )
    p.add_argument("--stage", choices=["initial", "full"], help="initial (default): 90/10 split; full: all 60k")
    p.add_argument("--train-full", type=int, choices=[0, 1], help="the original's spelling: 1 means --stage full")
    p.add_argument(
        "--ckpt",
        "--resume",
        dest="ckpt",
        metavar="PATH",
        help="checkpoint to resume (same stage) or to start the full stage from; a bare name such as "
        "last.ckpt means that file of the newest initial-stage run under --save-dir",
    )
    p.add_argument("--data-dir", default="data", help="holds MNIST/raw/ (default: data, downloaded if missing)")
    p.add_argument("--dataset", choices=list(DATASETS), help="mnist (default), fashion_mnist or kmnist")
    p.add_argument("--save-dir", default="lightning_logs", help="runs go to SAVE_DIR/STAGE/version_N")
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help="preset settings of a new run: seed (default, the original protocol), fast (least time to 99 %%) "
        "or strong (highest accuracy); the options below override single settings",
    )
    p.add_argument("--net", choices=sorted(NETS), help="architecture (default lenet, the original's)")
    p.add_argument("--epochs", type=int, help="number of the last epoch (default 20; full: checkpoint's + 20)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.01; full: 1e-4)")
    p.add_argument("--milestones", type=int, nargs="*", help="epochs of the stage after which lr /= 10 (2 10)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.5)")
    p.add_argument(
        "--ema-decay",
        type=float,
        help="> 0: validate and save an exponential moving average of the weights (default 0; strong 0.999)",
    )
    p.add_argument(
        "--precision", choices=["32-true", "bf16-mixed"], help="32-true (default) or bf16-mixed (bfloat16 autocast)"
    )
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, help="NHWC layout for the convolutions (off)"
    )
    p.add_argument("--batch-size", type=int, help="training batch size, split between DDP processes (64)")
    p.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default 1000)")
    p.add_argument("--val-fraction", type=float, help="share of the 60k held out in the initial stage (0.1)")
    p.add_argument("--seed", type=int, help="seeds the split, the shuffling and the initial weights (0)")
    p.add_argument("--save-freq", type=int, default=5, help="keep a numbered checkpoint every N epochs (5)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (Lightning's; default auto)")
    p.add_argument("--devices", default="auto", help="number of devices (Lightning's; default auto)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--num-nodes", type=int, default=1, help="number of machines (Lightning's)")
    p.add_argument("--deterministic", action="store_true", help="use only deterministic torch algorithms")
    p.add_argument("--quiet", action="store_true", help="no progress bar or Lightning banners (for logs, CI)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.train_full is not None:
        stage = "full" if args.train_full else "initial"
        if args.stage not in (None, stage):
            raise UserError(f"--train-full {args.train_full} contradicts --stage {args.stage}")
        args.stage = stage
    args.stage = args.stage or "initial"
    checks = [
        (args.lr, lambda v: v > 0, "--lr must be > 0"),
        (args.momentum, lambda v: 0 <= v < 1, "--momentum must be in [0, 1)"),
        (args.ema_decay, lambda v: 0 <= v < 1, "--ema-decay must be in [0, 1)"),
        (args.batch_size, lambda v: v >= 1, "--batch-size must be >= 1"),
        (args.eval_batch_size, lambda v: v >= 1, "--eval-batch-size must be >= 1"),
        (args.val_fraction, lambda v: 0 < v < 1, "--val-fraction must be between 0 and 1"),
        (args.seed, lambda v: v >= 0, "--seed must be >= 0"),
        (args.epochs, lambda v: v >= 1, "--epochs must be >= 1"),
        (args.save_freq, lambda v: v >= 1, "--save-freq must be >= 1"),
        (
            args.milestones,
            lambda v: v == sorted(set(v)) and min(v, default=1) > 0,
            "--milestones must be increasing, > 0",
        ),
    ]
    for value, ok, message in checks:
        if value is not None and not ok(value):
            raise UserError(f"{message} (got {value})")
    return args


# --- runs and checkpoints on disk -------------------------------------------------------------------------


def run_dirs(save_dir, stage: str) -> list[Path]:
    """The runs of a stage, newest (highest version) first."""
    runs = [p for p in (Path(save_dir) / stage).glob("version_*") if p.name[8:].isdigit()]
    return sorted(runs, key=lambda p: int(p.name[8:]), reverse=True)


def new_run_dir(save_dir, stage: str) -> Path:
    """Create the next ``version_N``; mkdir is atomic, so two runs can never share or reuse a directory."""
    try:
        (Path(save_dir) / stage).mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. --save-dir names a file
        raise UserError(f"cannot make the run folder under {Path(save_dir) / stage}: {err.strerror}") from None
    runs = run_dirs(save_dir, stage)
    version = int(runs[0].name[8:]) + 1 if runs else 0
    while True:
        path = Path(save_dir) / stage / f"version_{version}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            version += 1


def resolve_ckpt(name: str, save_dir, stage: str = "initial") -> Path:
    """A path that exists as given, or a bare file name: that checkpoint of the newest initial-stage run.

    For ``--stage full``, the newest full-stage run comes first if it did not finish (no results.json) and
    holds that file: ``--stage full --ckpt last.ckpt`` then resumes the interrupted full stage.
    """
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file")
    if path.name != name:
        raise UserError(f"checkpoint not found: {name}")
    full_runs = run_dirs(save_dir, "full") if stage == "full" else []
    if full_runs and not (full_runs[0] / "results.json").exists() and (full_runs[0] / "checkpoints" / name).is_file():
        candidate = full_runs[0] / "checkpoints" / name
        print(f"--ckpt {name} -> {candidate} (that full-stage run did not finish: resuming it)")
        return candidate
    runs = run_dirs(save_dir, "initial")
    if not runs:
        raise UserError(f"checkpoint {name} not found: no such file, and no run under {Path(save_dir) / 'initial'}")
    candidate = runs[0] / "checkpoints" / name
    if not candidate.is_file():  # never fall back to an older run: that would silently train from the wrong one
        raise UserError(f"checkpoint {name} not found: the newest initial run {runs[0]} has none; give its path")
    print(f"--ckpt {name} -> {candidate}")
    return candidate


def snapshot_code(run_dir: Path) -> None:
    """Copy the package's and the scripts' code (.py, .sh) into run_dir/code, as the original project did."""
    for src in (PACKAGE_DIR, PACKAGE_DIR.parent / "scripts"):
        for file in sorted([*src.glob("*.py"), *src.glob("*.sh")]):
            (run_dir / "code" / src.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, run_dir / "code" / src.name / file.name)


class TqdmHandler(logging.Handler):
    """Console lines through tqdm.write, so they print above a running progress bar instead of into it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)


@contextlib.contextmanager
def run_logging(run_dir: Path | None, quiet: bool):
    """Epoch lines go to the console and to run_dir/log.txt; --quiet also silences Lightning's banners."""
    handlers: list[logging.Handler] = [TqdmHandler()]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "log.txt", delay=True))  # made on the first line
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if run_dir is not None else logging.WARNING)  # other ranks: only warnings
    log.propagate = False
    lightning_log = logging.getLogger("pytorch_lightning")
    old_level = lightning_log.level
    if quiet:
        lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Our loaders index in-memory tensors: worker processes would only add overhead.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # Each run writes into its own new directory, so a resumed checkpoint's dirpath always differs.
            warnings.filterwarnings("ignore", message=".*dirpath has changed from.*")
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
            # We log once per epoch, never per step, so the per-step logging interval does not matter.
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            # Our epoch values come from torchmetrics, which already syncs them across processes.
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            # Raised inside Lightning 2.6 itself against newer torch; nothing for our users to act on.
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            yield
    finally:
        lightning_log.setLevel(old_level)
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


# --- Lightning pieces ------------------------------------------------------------------------------------


class NumberedCheckpoint(ModelCheckpoint):
    """Keeps every n-th epoch as ``005.ckpt``, ``010.ckpt``, ...: 1-based epoch numbers, like the original."""

    def __init__(self, dirpath: Path, every_n_epochs: int):
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


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting epochs from 1 like the logs and checkpoint names."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


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
        start, images = time.perf_counter(), trainer.datamodule.train_set[0]
        with trainer.precision_plugin.forward_context():  # the statistics of the activations training sees
            pl_module.recompute_batchnorm_stats(images)
        # The swap back at the epoch's end hands these statistics to the averaged model, which is checkpointed.
        log.info(
            "EMA: BatchNorm statistics recomputed from %d training images, %.1f s",
            len(images),
            time.perf_counter() - start,
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


def build_trainer(
    args: argparse.Namespace,
    run_dir: Path | None,
    epochs: int,
    fresh_optimizer: bool,
    ema_decay: float = 0.0,
    precision: str = "32-true",
) -> pl.Trainer:
    """The Trainer of a run; ``run_dir`` is None in the other ranks' processes (rank 0 owns the directory)."""
    version = int(run_dir.name[8:]) if run_dir else None
    checkpoints = run_dir / "checkpoints" if run_dir else None  # Lightning broadcasts rank 0's to the others
    callbacks = [
        NumberedCheckpoint(checkpoints, every_n_epochs=args.save_freq),
        # Lightning writes last.ckpt only together with a top-k save, so a second, every-epoch callback does it.
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="last",
            every_n_epochs=1,
            save_top_k=1,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        ),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if fresh_optimizer:
        callbacks.insert(0, FreshOptimizer())
    if ema_decay:  # Lightning's own EMA: validates with, and saves as state_dict, the averaged weights
        callbacks.append(EMAWithFreshBatchNorm(decay=ema_decay))
    if not args.quiet:
        callbacks.append(EpochProgressBar(refresh_rate=20))
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=precision,
        max_epochs=epochs,  # Lightning counts from the checkpoint's epoch, so this is the last epoch's number
        logger=TensorBoardLogger(args.save_dir, name=args.stage, version=version, default_hp_metric=False),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        deterministic=args.deterministic,
        use_distributed_sampler=False,  # our in-memory loaders are not DataLoaders
    )


# --- one run ---------------------------------------------------------------------------------------------


def choose_settings(args: argparse.Namespace, ckpt: dict | None, resume: bool) -> tuple[dict, int]:
    """The run's settings and its last epoch: a recipe (new run) or the checkpoint's, then the options given."""
    given = {key: getattr(args, key) for key in SEED if getattr(args, key, None) is not None}
    given.pop("epochs", None)  # the last epoch is decided below
    if ckpt is None:
        settings = {**RECIPES[args.recipe or "seed"], **given}
        return settings, args.epochs or settings["epochs"]
    saved = {**ckpt.get("datamodule_hyper_parameters", {}), **ckpt["hyper_parameters"]}
    settings = {key: saved.get(key, SEED[key]) for key in SEED}  # checkpoints from before a setting existed
    if "recipe" in given and given["recipe"] != settings["recipe"]:
        raise UserError(
            f"--recipe {given['recipe']} differs from the checkpoint's {settings['recipe']}: a checkpoint brings its "
            "own settings"
        )
    done = ckpt["epoch"] + 1  # our checkpoints are written at the end of an epoch
    if resume:
        for key, value in given.items():
            if value != settings[key]:
                raise UserError(
                    f"resuming keeps the run's settings: --{key.replace('_', '-')} {value} differs from the "
                    f"checkpoint's {settings[key]}"
                )
        epochs = args.epochs or saved["epochs"]
        if settings["schedule"] == "onecycle" and epochs != saved["epochs"]:
            raise UserError(f"a onecycle run keeps its --epochs {saved['epochs']} on resume: its schedule is fixed")
    else:
        for key in ("net", "dataset"):  # the full stage goes on from the checkpoint's weights
            if key in given and given[key] != settings[key]:
                raise UserError(
                    f"the full stage goes on from the checkpoint's weights: --{key} {given[key]} differs from its "
                    f"{settings[key]}"
                )
        settings.update(FULL_STAGE)
        settings.update(given)
        epochs = args.epochs or done + FULL_STAGE_EPOCHS
    if epochs <= done:
        raise UserError(f"--epochs {epochs} is not beyond the checkpoint's epoch {done}: nothing to train")
    return settings, epochs


def launched_as_rank_zero() -> bool:
    """False in the processes a launcher starts for the other ranks (Lightning's DDP, torchrun, SLURM)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def train(args: argparse.Namespace, command: str = "") -> dict:
    """Run one stage as the options say; returns the results (rank 0 also writes them to results.json)."""
    ckpt_path = ckpt = None
    if args.ckpt:
        ckpt_path = resolve_ckpt(args.ckpt, args.save_dir, args.stage)
        ckpt = load_checkpoint(ckpt_path)
        module_from_checkpoint(ckpt, ckpt_path)  # its weights must fit its architecture before anything starts
    elif args.stage == "full":
        raise UserError("--stage full needs --ckpt: the initial stage's checkpoint to go on from (e.g. last.ckpt)")
    ckpt_stage = ckpt["hyper_parameters"]["stage"] if ckpt else None
    if ckpt_stage == "full" and args.stage == "initial":
        raise UserError(f"{ckpt_path} is a full-stage checkpoint: resume it with --stage full")
    resume = ckpt_stage == args.stage
    settings, epochs = choose_settings(args, ckpt, resume)

    datamodule = MNISTDataModule(
        data_dir=args.data_dir,
        dataset=settings["dataset"],
        stage=args.stage,
        seed=settings["seed"],
        **{key: settings[key] for key in DATA_ONLY},
    )
    # Only rank 0 makes the run directory; Lightning broadcasts its checkpoint folder to the other ranks.
    run_dir = None
    if launched_as_rank_zero():
        datamodule.prepare_data()  # missing or corrupt data fails here, before a run directory is made;
        datamodule.setup()  # the decoded tensors are kept, Lightning's own setup call reuses them
        run_dir = new_run_dir(args.save_dir, args.stage)
    with run_logging(run_dir, args.quiet):
        try:  # Lightning checks --accelerator, --devices, --strategy, --num-nodes here
            trainer = build_trainer(
                args,
                run_dir,
                epochs,
                fresh_optimizer=ckpt is not None and not resume,
                ema_decay=settings["ema_decay"],
                precision=settings["precision"],
            )
        except (MisconfigurationException, ValueError) as err:
            if run_dir is not None:
                run_dir.rmdir()  # still empty: a run that cannot start leaves nothing behind
            raise UserError(f"the Trainer refused the options: {err}") from None
        if run_dir is not None:
            (run_dir / "command.txt").write_text(command + "\n")
            snapshot_code(run_dir)
        start = time.perf_counter()
        how = "resuming" if resume else "from" if ckpt else "new run"
        log.info("%s stage, run dir %s, %s %s", args.stage, run_dir, how, ckpt_path or "")
        pl.seed_everything(settings["seed"], verbose=False)
        model = MNISTLitModule(
            **{k: v for k, v in settings.items() if k not in DATA_ONLY and k != "epochs"},  # epochs: this run's
            stage=args.stage,
            epochs=epochs,
        )
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        result = model.last_eval  # the last epoch's evaluation: validation split, or test set in the full stage
        wall = time.perf_counter() - start
        summary = format_eval(model.eval_split, result)
        log.info("final: epoch %d %s, %.0f s, run dir %s", trainer.current_epoch, summary, wall, run_dir)
    correct, count = correct_and_count(result)
    results = {
        "stage": args.stage,
        "run_dir": str(run_dir.resolve()) if run_dir else None,
        "ckpt_from": str(ckpt_path.resolve()) if ckpt_path else None,  # absolute: evaluate.py follows it
        "epoch": trainer.current_epoch,
        "split": model.eval_split,
        "correct": correct,
        "count": count,
        "acc": float(result["acc"]),
        "loss": float(result["loss"]),
        "processes": trainer.world_size,
        "wall_s": round(wall, 1),
    }
    if run_dir is not None:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS (Linux only).

    By default glibc returns large freed blocks (a step's activations) to the OS and page-faults fresh zeroed
    pages back in on the next step. How often depends on its adaptive thresholds: measured on the 2-core CPU,
    the plain loop's LeNet epoch took 0.75-2.1 million page faults and 10.1-11.5 s from run to run; with these
    two settings 0.36 million and 9.0-9.5 s (4 runs each; README, Speed). The README's peak RSS figures are
    measured with these settings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_threshold, 32 << 20)  # blocks below 32 MiB (glibc's maximum) come from the heap
    libc.mallopt(m_trim_threshold, 1 << 30)  # and freed heap memory is not given back below 1 GiB


def main(argv: list[str] | None = None) -> int:
    """The command line of scripts/train.py: errors meant for the user become one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    return exit_code(lambda: train(parse_args(argv), command=shlex.join(["python", "scripts/train.py", *argv])))
