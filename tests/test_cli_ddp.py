"""DDP through Lightning on 2 CPU processes (gloo): the same numbers as one process, one run directory."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_lit.train import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--lr", "0.05", "--quiet", "--accelerator", "cpu"]
DDP = ["--devices", "2", "--strategy", "ddp"]


def train_script(*argv) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def ddp_runs(shared_data_dir, tmp_path_factory):
    """Runs that go on from checkpoints named `last.ckpt`, made under DDP (2 processes) in `ddp`, and the same in
    one process in `one` for comparison. In `ddp`: an initial run of 1 epoch (one process) resumed to epoch 2 under
    DDP (version_1), the full stage to epoch 3 from it under DDP, and that full run, as if killed after its last
    epoch, resumed to epoch 4 under DDP (full/version_1). Returns (ddp, one, the results the full run had left)."""
    ddp, one = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("one")

    def one_process(save_dir, *argv) -> None:
        # --devices and --strategy given: a run going on from a checkpoint takes them from its config otherwise
        options = ["--data-dir", shared_data_dir, "--save-dir", save_dir, *ARGS, "--devices", "1", "--strategy", "auto"]
        assert main(list(map(str, [*options, *argv]))) == 0

    def two_processes(*argv) -> None:
        train_script("--data-dir", shared_data_dir, "--save-dir", ddp, *ARGS, *DDP, *argv)

    one_process(ddp, "--epochs", "1")
    two_processes("--ckpt", "last.ckpt", "--epochs", "2")  # resumes initial/version_0 into version_1
    two_processes("--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3")  # from initial/version_1
    one_process(one, "--epochs", "2")
    one_process(one, "--stage", "full", "--ckpt", "last.ckpt", "--epochs", "3")
    full = results(ddp / "full" / "version_0")
    (ddp / "full" / "version_0" / "results.json").unlink()  # as if it had been killed after its last epoch
    two_processes("--stage", "full", "--ckpt", "last.ckpt", "--epochs", "4")  # resumes full/version_0
    return ddp, one, full


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(ddp_runs):
    ddp, one, full = ddp_runs
    # One run directory per run: the second process wrote nothing of its own.
    assert sorted(p.name for p in (ddp / "initial").iterdir()) == ["version_0", "version_1"]
    assert sorted(p.name for p in (ddp / "full").iterdir()) == ["version_0", "version_1"]
    for a, stage, count in ((results(ddp / "initial" / "version_1"), "initial", 32), (full, "full", 120)):
        b = results(one / stage / "version_0")
        assert a["processes"] == 2 and b["processes"] == 1
        assert a["count"] == b["count"] == count  # every validation / test image counted exactly once
        assert abs(a["acc"] - b["acc"]) <= 0.002
    # Each global batch is split between the ranks: the averaged gradient is the one-process gradient.
    w_ddp = torch.load(ddp / "full" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    w_one = torch.load(one / "full" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert max((w_ddp[k] - w_one[k]).abs().max().item() for k in w_one if k.startswith("net.")) < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun(shared_data_dir, tmp_path):
    """--num-nodes 2 with torchrun, both "nodes" on this machine (gloo over loopback): one run directory,
    written by global rank 0 only, and the numbers of one process."""
    port, torchrun = free_port(), Path(sys.executable).with_name("torchrun")
    argv = [
        "scripts/train.py",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--num-nodes",
        "2",
        "--strategy",
        "ddp",
        "--data-dir",
        str(shared_data_dir),
        "--save-dir",
        str(tmp_path / "nodes"),
        "--epochs",
        "2",
        *ARGS,
    ]
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *argv,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert [p.name for p in (tmp_path / "nodes" / "initial").iterdir()] == ["version_0"]
    assert (
        main([str(a) for a in ("--data-dir", shared_data_dir, "--save-dir", tmp_path / "one", "--epochs", "2", *ARGS)])
        == 0
    )
    a, b = results(tmp_path / "nodes" / "initial" / "version_0"), results(tmp_path / "one" / "initial" / "version_0")
    assert (a["processes"], a["count"]) == (2, b["count"]) and abs(a["acc"] - b["acc"]) <= 0.002


@pytest.mark.slow
def test_ddp_goes_on_from_a_bare_checkpoint_name_in_every_process(ddp_runs):
    """Rank 0 resolves `last.ckpt` before it makes the new run folder; the processes Lightning launches must use
    that file too, not resolve the name again (they would find the new, empty folder, or another run)."""
    ddp, _, full = ddp_runs
    resumed = results(ddp / "initial" / "version_1")
    assert resumed["epoch"] == 2 and resumed["ckpt_from"].endswith("initial/version_0/checkpoints/last.ckpt")
    assert resumed["processes"] == 2
    assert full["epoch"] == 3 and full["ckpt_from"].endswith("initial/version_1/checkpoints/last.ckpt")
    again = results(ddp / "full" / "version_1")
    assert again["epoch"] == 4 and again["ckpt_from"].endswith("full/version_0/checkpoints/last.ckpt")
    assert again["processes"] == 2 and again["count"] == 120
