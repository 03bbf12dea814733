"""``scripts/train.py``: one stage as the command line says (settings: ``mnist_lit.cli``). Into its run folder
go the command, a copy of the code, the log, the checkpoints and TensorBoard events, and at the end results.json."""

import argparse
import ctypes
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from pytorch_lightning.callbacks import EarlyStopping

from mnist_lit.checkpoint_config import TRUST_FLAG
from mnist_lit.cli import CKPT_ENV, MNISTCLI, SETTINGS_ERRORS, first_error
from mnist_lit.errors import UserError, exit_code
from mnist_lit.flags import expand_short_flags
from mnist_lit.loggers import EpochsFromOne, eval_summary
from mnist_lit.runs import console, log_file, remove_run_dir, snapshot_code

log = logging.getLogger("mnist_lit")


def train(argv: list[str]) -> dict:
    """Run one stage as the command line says; returns the results (rank 0 also writes them to results.json)."""
    args = expand_short_flags(argv)
    trust = TRUST_FLAG in args
    args = [a for a in args if a != TRUST_FLAG]
    with console():
        try:
            cli = MNISTCLI(args, trust_checkpoint_config=trust)
        except argparse.ArgumentError as err:  # jsonargparse's messages span lines: one line for our users
            raise UserError(" ".join(str(err).split())) from None
        except SETTINGS_ERRORS as err:  # a callback, logger or plugin the settings name could not be built
            raise UserError(f"the settings could not be built: {first_error(err)}") from None
        run_dir, trainer, model = cli.run_dir, cli.trainer, cli.model
        with log_file(run_dir):
            if run_dir is not None:
                (run_dir / "command.txt").write_text(shlex.join(["python", "scripts/train.py", *argv]) + "\n")
                snapshot_code(run_dir)
            how = "resuming" if cli.resume else "from" if cli.ckpt_path else "new run"
            log.info("%s stage, run dir %s, %s %s", cli.config.stage, run_dir, how, cli.ckpt_path or "")
            start = time.perf_counter()
            if run_dir is not None and cli.ckpt_path:  # the processes Lightning launches (DDP) inherit it
                os.environ[CKPT_ENV] = str(cli.ckpt_path.resolve())
            # The folders loggers from the command line will make: removed with the run folder if it fails at once.
            added = [Path(lg.log_dir) for lg in trainer.loggers if isinstance(lg, EpochsFromOne) and lg.log_dir]
            new_logger_dirs = [folder for folder in added if not folder.exists()]
            try:
                trainer.fit(model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path, weights_only=True)
            except BaseException as err:
                saved = run_dir is not None and any(run_dir.glob("checkpoints/*.ckpt"))
                if run_dir is not None and not saved:
                    remove_run_dir(run_dir)  # nothing to resume or use: a failed launch leaves no run folder
                    for folder in new_logger_dirs:
                        if folder.is_dir():
                            remove_run_dir(folder)
                if isinstance(err, SETTINGS_ERRORS) and not saved:  # the Trainer's set-up refused the settings
                    raise UserError(f"the run could not start: {first_error(err)}") from None
                raise
            finally:
                if run_dir is not None:
                    os.environ.pop(CKPT_ENV, None)
            wall = time.perf_counter() - start
            stopped = stopped_early(trainer)
            if stopped:
                log.info("stopped early after epoch %d of %d: %s", stopped["epoch"], trainer.max_epochs, stopped["by"])
            summary, correct, count = eval_summary(trainer.callback_metrics, model.eval_split)
            log.info("final: epoch %d %s, %.0f s, run dir %s", trainer.current_epoch, summary, wall, run_dir)
    metrics = trainer.callback_metrics
    results = {
        "stage": cli.config.stage,
        "recipe": cli.config.recipe,
        "run_dir": str(run_dir.resolve()) if run_dir else None,
        "ckpt_from": str(cli.ckpt_path.resolve()) if cli.ckpt_path else None,  # absolute: evaluate.py follows it
        "epoch": trainer.current_epoch,
        "split": model.eval_split,
        "correct": correct,
        "count": count,
        "acc": float(metrics[f"{model.eval_split}/acc"]) if count else None,
        "loss": float(metrics[f"{model.eval_split}/loss"]) if count else None,
        "processes": trainer.world_size,
        "stopped_early": stopped,
        "wall_s": round(wall, 2),
    }
    if run_dir is not None:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def stopped_early(trainer) -> dict | None:
    """The epoch (1-based) a run stopped at before its last, and which callback stopped it why; None for a run
    that trained all its epochs."""
    if trainer.current_epoch >= trainer.max_epochs:
        return None
    reasons = [
        f"{type(callback).__name__}: {callback.stopping_reason_message or 'stopped'}"
        for callback in trainer.callbacks
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch
    ]
    return {"epoch": trainer.current_epoch, "by": "; ".join(reasons) or "a callback stopped the Trainer"}


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS (Linux only).

    By default glibc returns large freed blocks (a step's activations) to the OS and page-faults fresh zeroed
    pages back in on the next step. How often depends on its adaptive thresholds: measured on the 2-core CPU,
    the plain loop's LeNet epoch took 0.75-2.1 million page faults and 10.1-11.5 s from run to run; with these
    two settings 0.36 million and 9.0-9.5 s (4 runs each, 2-core Intel Xeon). Process-wide, so it is called by
    the entry points only (train.py's main, the benchmark), never on import.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_threshold, 32 << 20)  # blocks below 32 MiB (glibc's maximum) come from the heap
    libc.mallopt(m_trim_threshold, 1 << 30)  # and freed heap memory is not given back below 1 GiB


def main(argv: list[str] | None = None) -> int:
    """scripts/train.py: errors meant for the user become one line and exit code 2; --print_config exits 0."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    keep_freed_memory()
    try:
        return exit_code(lambda: train(argv))
    except SystemExit as done:  # --help, --print_config
        return done.code if isinstance(done.code, int) else 0
