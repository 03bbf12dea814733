"""mnist_lit.threads: torch's thread count follows the cores other processes leave free, in every entry point,
unless the user chose it; and benchmarks/contention.py, which measures that, on a tiny problem."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run

from mnist_lit import evaluate, threads


@pytest.mark.parametrize(
    "others,threads_wanted",
    [(0.0, 4), (0.3, 4), (0.6, 3), (1.0, 3), (1.5, 2), (2.7, 1), (3.9, 1), (8.0, 1)],
)
def test_one_thread_per_core_the_others_leave(others, threads_wanted):
    assert threads.threads_for(others, cores=4, most=4) == threads_wanted
    assert threads.threads_for(others, cores=4, most=2) == min(2, threads_wanted)


def test_others_use_is_the_machines_busy_time_less_ours():
    assert threads.others_busy_cores(busy_s=3.0, own_s=2.0, wall_s=2.0) == 0.5
    assert threads.others_busy_cores(busy_s=1.0, own_s=1.2, wall_s=1.0) == 0.0  # clock ticks vs os.times
    assert sum(threads.cpu_seconds()) > 0


@pytest.fixture
def adaptive(monkeypatch):
    """No user setting, 2 threads to start from, a new decision, a measurement at every call, and a machine
    where the other processes keep ``busy[0]`` cores busy (set by the test)."""
    for name in (*threads.USER_SETTINGS, "MNIST_LIT_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "INTERVAL_S", 0.0)
    monkeypatch.setattr(threads, "_decided", False)
    monkeypatch.setattr(threads, "_free_cores", None)
    busy, clock = [0.0], {"busy": 0.0, "own": 0.0}

    def cpu_seconds():
        clock["busy"] += busy[0] * 0.01 + 0.001  # per call: the others' share of a 10 ms interval, and ours
        clock["own"] += 0.001
        return clock["busy"], clock["own"]

    ticks = iter(range(10**9))
    monkeypatch.setattr(threads, "cpu_seconds", cpu_seconds)
    monkeypatch.setattr(threads, "monotonic", lambda: next(ticks) * 0.01)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield busy
    torch.set_num_threads(saved)


def test_the_count_follows_the_load_both_ways(adaptive):
    adaptive[0] = 1.0  # a busy neighbour
    for _ in range(3):
        threads.adapt_threads()
    assert torch.get_num_threads() == 1
    adaptive[0] = 0.0  # gone
    for _ in range(3):
        threads.adapt_threads()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "setting", [("OMP_NUM_THREADS", "2"), ("MKL_NUM_THREADS", "2"), ("MNIST_LIT_THREADS", "fixed")]
)
def test_a_users_own_setting_wins_over_the_thread_count(setting, adaptive, monkeypatch):
    monkeypatch.setenv(*setting)
    adaptive[0] = 1.0
    for _ in range(3):
        threads.adapt_threads()
    assert torch.get_num_threads() == 2 and not threads.adapts()


ENTRY_POINTS = {  # each entry point, in-process, on the tiny data
    "train": lambda ckpt, data, out: run("--data-dir", data, "--save-dir", out, "--epochs", 1, "--quiet"),
    "evaluate": lambda ckpt, data, out: evaluate.main(["--ckpt", ckpt, "--data-dir", data, "--out", out]),
}
FOLLOWS = {"evaluate": True, "train": False}  # a forward pass gives the same numbers with any thread count


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_the_thread_count_follows_a_busy_neighbour_where_it_changes_no_number(
    entry_point, adaptive, trained_ckpt, shared_data_dir, tmp_path, monkeypatch
):
    adaptive[0] = 1.0
    assert ENTRY_POINTS[entry_point](str(trained_ckpt), str(shared_data_dir), str(tmp_path / "out")) == 0
    assert torch.get_num_threads() == (1 if FOLLOWS[entry_point] else 2)


def test_training_follows_the_load_when_asked(adaptive, shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_LIT_THREADS", "follow")
    adaptive[0] = 1.0
    assert ENTRY_POINTS["train"](None, str(shared_data_dir), str(tmp_path / "out")) == 0
    assert torch.get_num_threads() == 1


def test_the_thread_count_changes_a_weight_gradient_not_a_forward_pass():
    """Why training keeps its thread count: the same gradient summed by 1 or 2 threads differs in its last bits."""
    saved, generator = torch.get_num_threads(), torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 16, 12, 12, generator=generator), torch.randn(32, 16, 5, 5, generator=generator)
    results = []
    for threads_ in (1, 2):
        torch.set_num_threads(threads_)
        weight = w.clone().requires_grad_()
        out = torch.nn.functional.conv2d(x, weight)
        out.sum().backward()
        results.append((out.detach(), weight.grad))
    torch.set_num_threads(saved)
    assert torch.equal(results[0][0], results[1][0])
    if (os.cpu_count() or 1) > 1:
        assert not torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("others,policy", [(0.0, None), (0.2, None), (1.0, "PASSIVE"), (3.0, "PASSIVE")])
def test_openmp_threads_sleep_while_they_wait_if_others_run(others, policy, monkeypatch):
    monkeypatch.setattr(threads, "running_others", lambda: others)
    environ = {}
    threads.share_the_cpu(environ)
    assert environ.get("OMP_WAIT_POLICY") == policy
    assert not threads.user_chose(environ)  # its own choice leaves the thread count free to follow the load
    for setting in ({"OMP_NUM_THREADS": "2"}, {"GOMP_SPINCOUNT": "0"}, {"MNIST_LIT_THREADS": "fixed"}):
        environ = dict(setting)
        threads.share_the_cpu(environ)
        assert environ == setting  # the user's own choice wins
    assert threads.running_others() >= 0.0  # the real run queue


ENTRY_SCRIPTS = [
    "scripts/train.py",
    "scripts/evaluate.py",
    "scripts/predict.py",
    "scripts/export.py",
    "scripts/tta_views.py",
    "scripts/select_ensemble.py",
    "benchmarks/benchmark.py",
]
BEFORE_TORCH = """
import runpy, sys
import mnist_lit.threads
calls = []
mnist_lit.threads.share_the_cpu = lambda *args: calls.append("torch" in sys.modules)
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(calls)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_every_entry_point_sets_openmps_environment_before_torch_starts(script):
    done = subprocess.run([sys.executable, "-c", BEFORE_TORCH, script], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1] == "[False]", done.stderr[-500:]


@pytest.mark.slow
def test_the_contention_benchmark_reports_its_ratios(shared_data_dir, tmp_path):
    out = tmp_path / "contention.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "contention.py"),
        "--data-dir",
        str(shared_data_dir),
        "--steps",
        "2",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--",
        "--precision",
        "32-true",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {
        f"{setting} {place}" for setting in ("default", "ours", "follow") for place in ("alone", "beside")
    }
    assert runs["default alone"]["ratio_to_default_alone"] == 1.0
    assert all(row["median_s"] > 0 and row["ratio_to_default_alone"] > 0 for row in runs.values())
