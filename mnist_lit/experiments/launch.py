"""What sweep.py and tune.py share: their common options, the Optuna storage (with heartbeats and retries of the
trials of dead workers; a database that cannot be opened is one error line), and running one train.py in a process
of its own."""

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

from mnist_lit.errors import ArgumentParser, UserError
from mnist_lit.flags import recipe_names

TRAIN = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
HEARTBEAT_S = 10  # a dead worker's trial is failed (and retried) 3 heartbeats after its last one


class RunFailed(Exception):
    """A train.py process that did not finish: its trial fails, the other grid points go on."""


def add_run_options(parser: ArgumentParser) -> None:
    """The options sweep.py and tune.py share: the base settings (in the order given), where runs go, the study."""

    def recipe(name: str) -> list[str]:
        if name not in recipe_names():
            raise argparse.ArgumentTypeError(f"unknown recipe {name!r}: choose one of {', '.join(recipe_names())}")
        return ["--recipe", name]

    def config(path: str) -> list[str]:
        if not Path(path).is_file():
            raise argparse.ArgumentTypeError(f"{path}: no such file")
        return ["--config", str(Path(path).resolve())]

    for flag, to_args, metavar, text in (
        ("--recipe", recipe, "NAME", "the runs' recipe (configs/NAME.yaml)"),
        ("--config", config, "FILE", "a config file for every run (repeatable, with --recipe in the order given)"),
    ):  # both append to one list, base, in the order given on the command line
        parser.add_argument(flag, dest="base", action="append", type=to_args, default=[], metavar=metavar, help=text)
    parser.add_argument("--save-dir", required=True, help="all runs go to SAVE_DIR/initial (and full)/version_N")
    parser.add_argument("--data-dir", help="the runs' --data-dir")
    parser.add_argument("--epochs", type=int, help="each run's --epochs")
    parser.add_argument("--jobs", type=int, default=1, help="trials at a time in this process (default 1)")
    parser.add_argument("--storage", help="Optuna database URL (default: sqlite SAVE_DIR/<script>.db)")
    parser.add_argument("--study", help="the study's name (default: derived from the command)")
    parser.add_argument("--quiet", action="store_true", help="the runs print no progress bars")


def check_run_options(args, script: str) -> None:
    """Check the shared options; make SAVE_DIR absolute (runs and resumes name their folders by it)."""
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        raise UserError("--jobs and --epochs must be >= 1")
    args.base = [arg for pair in args.base for arg in pair]  # ["--recipe", NAME, "--config", FILE, ...]
    args.settings = [*args.base, *(["--epochs", str(args.epochs)] if args.epochs else [])]  # every run's
    args.save_dir = Path(args.save_dir).resolve()
    args.script = script
    args.where = ["--save-dir", str(args.save_dir)]  # where runs go and what they print: not a run's identity
    args.where += ["--data-dir", str(Path(args.data_dir).resolve())] if args.data_dir else []
    args.where += ["--quiet"] if args.quiet else []


def study_storage(args, heartbeat: int | None):
    """The study's storage (--storage, else sqlite SAVE_DIR/<script>.db), then SAVE_DIR: a database that cannot
    be opened leaves nothing behind."""
    if not args.storage:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        args.storage = f"sqlite:///{args.save_dir / args.script}.db"
    storage = open_storage(args.storage, heartbeat)
    args.save_dir.mkdir(parents=True, exist_ok=True)
    return storage


def study_name(prefix: str, *what) -> str:
    """A study name derived from the command, so that the same command finds the same study."""
    return f"{prefix}-{hashlib.sha1(json.dumps(what).encode()).hexdigest()[:12]}"


def retry_callback(max_retry: int | None = 3):
    """Optuna's callback that queues a failed trial again (same point, same user attrs) as a new WAITING trial."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # optuna >= 4.9's name
    return (retry or optuna.storages.RetryFailedTrialCallback)(max_retry=max_retry)


def no_traceback(record: logging.LogRecord) -> bool:
    """Optuna's line for a failed trial without the traceback when a train.py failed: it printed its error itself."""
    if record.exc_info and isinstance(record.exc_info[1], RunFailed):
        record.exc_info = None
    return True


def shown(url: str) -> str:
    """A database URL as it may be printed: without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: hide whatever stands between user: and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_storage(url: str, heartbeat: int | None = None, create: bool = True):
    """Optuna's RDBStorage; with heartbeat (seconds), the trials of dead workers are failed and retried. Without
    create, an existing database is only read (no tables made). A database that cannot be opened (server down,
    wrong password, no driver, bad URL) is a UserError of one line."""
    import optuna
    import sqlalchemy

    for handler in logging.getLogger("optuna").handlers:  # optuna's own console handler
        handler.addFilter(no_traceback)

    sqlite = url.startswith("sqlite")
    # isolation_level None: Python's sqlite3 issues no BEGIN of its own (see begin_immediate)
    kwargs: dict = {"engine_kwargs": {"connect_args": {"timeout": 60, "isolation_level": None}}} if sqlite else {}
    if heartbeat:
        renamed = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")  # optuna >= 4.9
        name = "heartbeat_stale_trial_callback" if renamed else "failed_trial_callback"
        kwargs.update(heartbeat_interval=heartbeat, grace_period=3 * heartbeat, **{name: retry_callback()})
    if not create:
        kwargs.update(skip_table_creation=True, skip_compatibility_check=True)
    problem = f"cannot open the database {shown(url)}"
    try:
        if sqlite and not create:
            path = sqlalchemy.engine.make_url(url).database
            if not path or not Path(path).is_file():  # sqlite would make an empty file
                raise UserError(f"{problem}: no such file")
        storage = rdb_storage(url, kwargs)
        if not create and not sqlalchemy.inspect(storage.engine).has_table("studies"):
            raise UserError(f"{shown(url)} holds no Optuna studies")
    except (ImportError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        cause = getattr(err, "orig", None) or err.__cause__ or err  # the driver's own message
        why = " ".join(str(cause).split("\n")[0].split()) or type(cause).__name__
        if isinstance(err, ImportError):
            why = f"no database driver for it ({why}; PostgreSQL: pip install -e '.[postgres]')"
        raise UserError(f"{problem}: {why}") from None
    if sqlite:
        begin_immediate(storage.engine)
    return storage


def rdb_storage(url: str, kwargs: dict):
    """Optuna's RDBStorage, tried again while other workers starting at the same moment make a new database's
    tables (each finds them missing, one's insert wins)."""
    import optuna
    import sqlalchemy

    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except sqlalchemy.exc.DBAPIError as err:
            if attempt == 9 or not re.search("unique|already exists", str(err), re.IGNORECASE):
                raise
            time.sleep(0.1 + random.random())


def begin_immediate(engine) -> None:
    """Every transaction on this SQLite engine starts with BEGIN IMMEDIATE (SQLAlchemy's documented recipe for
    pysqlite). SQLite has no SELECT ... FOR UPDATE and Python's sqlite3 begins a transaction only at its first
    write, so two workers could both read the same WAITING trial (an enqueued one, or the retry of a dead worker's)
    and both run it (optuna/optuna#4002; tests/test_launch.py shows it). Taking the write lock at BEGIN makes
    Optuna's read-then-update atomic; a trial's transactions are milliseconds, so workers barely wait."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


def run_train(argv: list[str], jobs: int) -> None:
    """One train.py in a process of its own; RunFailed unless it exits 0."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # runs at a time share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    print(f"+ train.py {shlex.join(argv)}", flush=True)
    code = subprocess.run([sys.executable, str(TRAIN), *argv], env=env).returncode
    if code != 0:
        raise RunFailed(f"train.py exited with {code}: {shlex.join(argv)}")


def results_of(run: Path) -> dict | None:
    try:
        return json.loads((run / "results.json").read_text())
    except (OSError, ValueError):  # none, or cut short by a kill: the run did not finish
        return None
