"""Shared fixtures: small MNIST-format IDX files written by the tests themselves (no network, no real data)."""

import gzip
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
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from mnist_lit.idx import FILES, raw_dir
from mnist_lit.train import main

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (``-n N``, setup.cfg), the workers share the cores: each would otherwise start a torch
    thread per core, and oversubscribed OpenMP threads wait on each other (a bf16 epoch ran 50x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the scripts the tests start
        torch.set_num_threads(threads)


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, which it keeps within each group
def pytest_collection_modifyitems(items):
    """The slow tests first. pytest-xdist (``--dist loadscope``, setup.cfg) gives each worker a whole module at a
    time, in this order: the modules with long tests go first and the short ones fill in at the end, so the workers
    finish together (in the shuffled order, a 40 s test could start last, with the other worker idle)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic 0x0800 + ndim, big-endian dimensions, then the bytes."""
    header = (0x800 + array.dim()).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: label k lights a 6x6 block at a fixed place of its own, over faint noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = 2 + 5 * (label // 5) * 2, 2 + 5 * (label % 5)
        images[i, row : row + 6, col : col + 6] = 255
    return images, labels


def loss_before_and_after_one_step(model, batch, precision="32-true") -> tuple[float, float]:
    """The model's training-mode loss on ``batch`` (pixels 0..255, labels) before and after one step of
    training_step, run by a minimal Trainer."""

    def loss() -> float:
        model.train()
        with torch.no_grad():
            return F.nll_loss(model(batch[0]), batch[1]).item()

    before = loss()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(*batch), batch_size=len(batch[1])))
    assert trainer.global_step == 1
    return before, loss()


def write_mnist(data_dir: Path, n_train: int = 320, n_test: int = 120, gz: bool = False, dataset="mnist") -> Path:
    """Write the four IDX files (optionally as .gz) under data_dir/<dataset folder>/raw; returns data_dir."""
    raw = raw_dir(data_dir, dataset)
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = digits(n, seed)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return data_dir


def previous_version_checkpoint(ckpt: dict) -> dict:
    """A checkpoint as the version before models took raw pixels wrote it: the pixel statistics as a float32
    buffer ``pixel_stats`` among the weights (that model took normalised images), no eval_split or pixel_stats
    among the hyperparameters."""
    old = {**ckpt, "hyper_parameters": dict(ckpt["hyper_parameters"]), "state_dict": dict(ckpt["state_dict"])}
    old["state_dict"]["pixel_stats"] = torch.tensor(old["hyper_parameters"].pop("pixel_stats"))
    del old["hyper_parameters"]["eval_split"]
    return old


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A fresh small dataset for tests that may change it."""
    return write_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """A small dataset shared by the tests that only read it."""
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
    from mnist_lit.train import main

    save_dir = tmp_path_factory.mktemp("trained")
    argv = ["--data-dir", shared_data_dir, "--save-dir", save_dir, "--epochs", "3", "--lr", "0.05", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return save_dir / "initial" / "version_0" / "checkpoints" / "last.ckpt"


# scripts/train.py in-process, and what its runs leave: shared by the test_cli_* files.
ROOT = Path(__file__).resolve().parents[1]
# 320 training images -> 288 train / 32 val with the default 10 %; batch 64 -> 5 steps per epoch.
INITIAL = ["--epochs", "4", "--save-freq", "2", "--lr", "0.05", "--milestones", "2", "3", "--quiet"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def net_weights(ckpt_path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epoch_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith("epoch ")]


@pytest.fixture(scope="session")
def initial_run(shared_data_dir, tmp_path_factory):
    """One 4-epoch initial run; returns (data_dir, save_dir, run_dir)."""
    save_dir = tmp_path_factory.mktemp("runs") / "logs"
    assert run("--data-dir", shared_data_dir, "--save-dir", save_dir, *INITIAL) == 0
    return shared_data_dir, save_dir, save_dir / "initial" / "version_0"


def resolved_config(capsys, *argv) -> dict:
    """What --print_config prints: the settings a run with these options would have."""
    capsys.readouterr()
    assert run(*argv, "--print_config") == 0
    return yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])  # after the "--ckpt x -> path" line


def event_scalar_tags(run_dir: Path) -> set[str]:
    """The scalar tags of a run's TensorBoard events, as written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def hparams_in_events(run_dir: Path) -> dict:
    """The settings of TensorBoard's HPARAMS tab, as its plugin reads them from the events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    # No experiment summary: TensorBoard would take every run's columns and metrics from one run's.
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in hparams.items()}


def unavailable(reason: str) -> None:
    """Skip a test whose system part (a database server, a browser) cannot be had here; with MNIST_LIT_CI=1
    (``.ci/run``) fail instead: CI must run every test."""
    if os.environ.get("MNIST_LIT_CI") == "1":
        pytest.fail(f"{reason} (MNIST_LIT_CI=1: every test must run)")
    pytest.skip(reason, allow_module_level=True)


def _postgres_bin() -> Path | None:
    """The folder of the newest PostgreSQL server programs (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if
                   p.parts[-3].isdigit() else 0)  # fmt: skip
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
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off -c synchronous_commit=off " \
        "-c full_page_writes=off -c max_connections=300"  # fmt: skip
    steps = [
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "mnist", f"--pwfile={home / 'password'}",
         "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "-o", options, "start"],
    ]  # fmt: skip
    try:
        for step in steps:
            done = subprocess.run([*as_user, *step], capture_output=True, text=True, cwd=home)
            if done.returncode != 0:
                log = (home / "log").read_text()[-2000:] if (home / "log").exists() else ""
                give_up(f"the PostgreSQL server did not start: {done.stderr.strip()[-2000:]} {log}")
        yield f"postgresql://mnist:{password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=home)  # fmt: skip
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
