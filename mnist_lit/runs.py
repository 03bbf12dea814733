"""Runs on disk: each invocation's own ``<save-dir>/<stage>/version_N``, finding a checkpoint by its bare name,
the code snapshot, the console and log.txt lines."""

import contextlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from mnist_lit.errors import UserError

log = logging.getLogger("mnist_lit")
PACKAGE_DIR = Path(__file__).resolve().parent
# A run's settings (dotted config keys) that are not its experiment: where it reads and writes, and what it prints
# or keeps. A checkpoint never passes the paths on (checkpoint_config); HPARAMS and the runs table show neither.
PATH_KEYS = ("save_dir", "ckpt", "data.data_dir", "trainer.default_root_dir")
OUTPUT_SWITCHES = ("save_freq", "quiet", "data.download", "trainer.enable_progress_bar", "trainer.enable_model_summary")


def run_version(run_dir: Path) -> int | None:
    """N of a run folder ``version_N``; None for another name."""
    number = run_dir.name.removeprefix("version_")
    return int(number) if run_dir.name.startswith("version_") and number.isdigit() else None


def run_dirs(save_dir, stage: str) -> list[Path]:
    """The runs of a stage, newest (highest version) first."""
    runs = [p for p in (Path(save_dir) / stage).glob("version_*") if run_version(p) is not None]
    return sorted(runs, key=run_version, reverse=True)


def new_run_dir(save_dir, stage: str) -> Path:
    """Create the next ``version_N``; mkdir is atomic, so two runs can never share or reuse a directory."""
    try:
        (Path(save_dir) / stage).mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. --save-dir names a file
        raise UserError(f"cannot make the run folder under {Path(save_dir) / stage}: {err.strerror}") from None
    runs = run_dirs(save_dir, stage)
    version = run_version(runs[0]) + 1 if runs else 0
    while True:
        path = Path(save_dir) / stage / f"version_{version}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            version += 1


def remove_run_dir(run_dir: Path) -> None:
    """Remove a run folder that holds nothing to keep, and its stage folder if that is left empty."""
    shutil.rmtree(run_dir)
    with contextlib.suppress(OSError):  # other runs are in it
        run_dir.parent.rmdir()


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
        for file in sorted([*src.rglob("*.py"), *src.rglob("*.sh")]):
            copy = run_dir / "code" / src.name / file.relative_to(src)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, copy)


class TqdmHandler(logging.Handler):
    """Console lines through tqdm.write, so they print above a running progress bar instead of into it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)


def launched_as_rank_zero() -> bool:
    """False in the processes a launcher starts for the other ranks (Lightning's DDP, torchrun, SLURM)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def console():
    """Our lines (logger ``mnist_lit``) on the console, other ranks' only from warnings up; warnings that say
    nothing to our users filtered. The loggers' settings (also Lightning's, which --quiet lowers) are restored on
    exit."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    lightning_log = logging.getLogger("pytorch_lightning")
    seed_log = logging.getLogger("lightning_fabric.utilities.seed")
    saved = log.level, log.propagate, lightning_log.level, seed_log.level
    seed_log.setLevel(logging.WARNING)  # "Seed set to 0" on every run: the seed is in config.yaml
    log.addHandler(handler)
    log.setLevel(logging.INFO if launched_as_rank_zero() else logging.WARNING)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            # Our loaders index in-memory tensors: worker processes would only add overhead.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # Each run writes into its own new directory, so a resumed checkpoint's dirpath always differs.
            warnings.filterwarnings("ignore", message=".*dirpath has changed from.*")
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
            # We log once per epoch, never per step, so the per-step logging interval does not matter.
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            # Raised inside Lightning 2.6 itself against newer torch; nothing for our users to act on.
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        lightning_log.setLevel(saved[2])
        seed_log.setLevel(saved[3])


@contextlib.contextmanager
def log_file(run_dir: Path | None):
    """Our lines also go to run_dir/log.txt (made on the first line); nothing on the ranks without a run folder."""
    if run_dir is None:
        yield
        return
    handler = logging.FileHandler(run_dir / "log.txt", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
