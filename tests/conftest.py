"""Shared fixtures (the functions tests call are in helpers.py). pytest-xdist's controller imports this file too
and runs no test: it imports no torch at module level, so the workers start sooner (torch and Lightning take 3 s)."""

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``-n N``, setup.cfg), the workers share the cores: each would otherwise start a torch
    thread per core, and oversubscribed OpenMP threads wait on each other (a bf16 epoch ran 50x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch is imported, and by the scripts started


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, which it keeps within each group
def pytest_collection_modifyitems(items):
    """The slow tests first. pytest-xdist (``--dist loadscope``, setup.cfg) gives each worker a whole module at a
    time, in this order: the modules with long tests go first and the short ones fill in at the end, so the workers
    finish together (in the shuffled order, a 40 s test could start last, with the other worker idle)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A fresh small dataset for tests that may change it."""
    from helpers import write_mnist

    return write_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """A small dataset shared by the tests that only read it."""
    from helpers import write_mnist

    return write_mnist(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    """Point torchvision's mirrors at a closed local port: a download attempt fails at once, offline."""
    try:
        from torchvision import datasets
    except ImportError:  # without torchvision nothing can download anyway
        return

    for name in ("MNIST", "FashionMNIST", "KMNIST"):
        monkeypatch.setattr(getattr(datasets, name), "mirrors", ["http://127.0.0.1:9/"])


@pytest.fixture(scope="session")
def trained_ckpt(shared_data_dir, tmp_path_factory) -> Path:
    """A tiny model trained for 3 epochs on the small IDX files: the last.ckpt of its initial-stage run."""
    from helpers import run

    save_dir = tmp_path_factory.mktemp("trained")
    assert run("--data-dir", shared_data_dir, "--save-dir", save_dir, "--epochs", "3", "--lr", "0.05", "--quiet") == 0
    return save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def initial_run(shared_data_dir, tmp_path_factory):
    """One 4-epoch initial run; returns (data_dir, save_dir, run_dir)."""
    from helpers import INITIAL, run

    save_dir = tmp_path_factory.mktemp("runs") / "logs"
    assert run("--data-dir", shared_data_dir, "--save-dir", save_dir, *INITIAL) == 0
    return shared_data_dir, save_dir, save_dir / "initial" / "version_0"


def unavailable(reason: str) -> None:
    """Skip a test whose system part (a database server, a browser) cannot be had here; with MNIST_LIT_CI=1
    (``.ci/run``) fail instead: CI must run every test."""
    if os.environ.get("MNIST_LIT_CI") == "1":
        pytest.fail(f"{reason} (MNIST_LIT_CI=1: every test must run)")
    pytest.skip(reason, allow_module_level=True)


def _postgres_bin() -> Path | None:
    """The folder of the newest PostgreSQL server programs (Debian keeps them off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    on_path = shutil.which("initdb")
    return found[-1].parent if found else Path(on_path).parent if on_path else None


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[str]:
    """A throw-away PostgreSQL server on 127.0.0.1 (password login, no fsync), stopped after the session: the URL
    of its maintenance database. Skips where none can be had, fails in CI (``unavailable``)."""
    give_up = unavailable
    bin_dir = _postgres_bin()
    if bin_dir is None:
        give_up("no PostgreSQL server programs (initdb): apt-get install postgresql")
    if importlib.util.find_spec("psycopg") is None:
        give_up("no PostgreSQL driver for Python: pip install -e '.[postgres]'")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            give_up("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="mnist_lit_pg_"))  # not under pytest's root-only tmp dir
    password = secrets.token_hex(8)
    (home / "password").write_text(password)
    if as_user:
        os.chown(home, user.pw_uid, user.pw_gid)
        os.chown(home / "password", user.pw_uid, user.pw_gid)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = home / "data"
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    steps = [
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "mnist",
            f"--pwfile={home / 'password'}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "-o", options, "start"],
    ]
    try:
        for step in steps:
            done = subprocess.run([*as_user, *step], capture_output=True, text=True, cwd=home)
            if done.returncode != 0:
                log = (home / "log").read_text()[-2000:] if (home / "log").exists() else ""
                give_up(f"the PostgreSQL server did not start: {done.stderr.strip()[-2000:]} {log}")
        yield f"postgresql://mnist:{password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            cwd=home,
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def new_database(request, tmp_path_factory) -> Callable[[], str]:
    """Parametrized over the storages: a function that makes a new empty database and returns its URL (a sqlite
    file, or a database on the test PostgreSQL server)."""
    if request.param == "sqlite":
        folder = tmp_path_factory.mktemp("sqlite")
        return lambda: f"sqlite:///{folder / secrets.token_hex(6)}.db"
    admin = request.getfixturevalue("postgres_server")

    def create() -> str:
        import psycopg

        name = f"study_{secrets.token_hex(6)}"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return admin.rsplit("/", 1)[0] + f"/{name}"

    return create
