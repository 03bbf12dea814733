"""Sharing the CPU with other processes without changing a run's numbers.

Torch runs a parallel region on one OpenMP thread per core, and the threads spin-wait for each other at its end.
Beside another busy process one of them waits for a core the neighbour holds while the others spin: a run took
3x its time alone (2-core AMD EPYC, docs/benchmark.md). Two levers, used where they change no result:

- **How OpenMP's threads wait** (``share_the_cpu``, called by every entry point before torch starts: OpenMP
  reads its environment once). If other processes are running, they sleep while they wait instead of spinning
  (``OMP_WAIT_POLICY=PASSIVE``); on an idle machine they spin, the fastest there. The thread count, and so every
  number a run computes, stays what it is on an idle machine.
- **How many threads** (``adapt_threads``, between batches): every half second the other processes' CPU time
  (the machine's busy time in ``/proc/stat`` less this process's own) decides how many cores are free, and
  torch's thread count follows. A forward pass gives the same numbers with any thread count, so evaluate.py,
  predict.py, export.py and tta_views.py follow the load; in training a weight gradient summed by 1 or 2
  threads differs in its last bits (and training amplifies that), so train.py follows it only with
  ``MNIST_LIT_THREADS=follow``, trading bit-identical results for speed beside others.

A user's own choice wins: with ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` set (the sweeps and the test suite divide the cores that way), or ``MNIST_LIT_THREADS=fixed``,
nothing changes. This module imports torch only when the thread count is first set.
"""

import math
import os
import time
from time import monotonic

USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
INTERVAL_S = 0.5  # between measurements of the thread count: 50 clock ticks a core, short against a run
# Others' use (in cores) that counts as a busy core: a neighbour beside our spinning threads gets ~0.6 of one;
# below 0.4 it is background noise (a shell, a logger).
BUSY_CORE = 0.4
SAMPLES, SAMPLE_GAP_S = 20, 0.002  # share_the_cpu's look at the run queue: 40 ms


CHOSEN_HERE = "MNIST_LIT_WAIT_POLICY"  # beside OMP_WAIT_POLICY when share_the_cpu set it, not the user


def user_chose(environ=os.environ) -> bool:
    ours = {"OMP_WAIT_POLICY"} if CHOSEN_HERE in environ else set()
    return environ.get("MNIST_LIT_THREADS") == "fixed" or any(n in environ for n in USER_SETTINGS if n not in ours)


def running_others() -> float:
    """How many other tasks are running or waiting for a core, on average over a few samples of the run queue
    (``procs_running`` in /proc/stat counts this process too)."""
    counts = []
    for _ in range(SAMPLES):
        with open("/proc/stat") as stat:
            counts += [int(line.split()[1]) for line in stat if line.startswith("procs_running")]
        time.sleep(SAMPLE_GAP_S)
    return max(0.0, sum(counts) / len(counts) - 1) if counts else 0.0


def share_the_cpu(environ=os.environ) -> None:
    """Before torch starts: OpenMP's threads sleep while they wait if other processes are running now."""
    if user_chose(environ) or not os.path.exists("/proc/stat"):
        return
    if running_others() >= BUSY_CORE:
        environ["OMP_WAIT_POLICY"] = environ[CHOSEN_HERE] = "PASSIVE"


def others_busy_cores(busy_s: float, own_s: float, wall_s: float) -> float:
    """The cores the other processes kept busy over ``wall_s`` seconds: the machine's busy CPU time less ours."""
    return max(0.0, busy_s - own_s) / wall_s if wall_s > 0 else 0.0


def threads_for(others: float, cores: int, most: int) -> int:
    """The thread count for the cores the others leave: one per core not taken (a core counts as taken from
    BUSY_CORE of its time), at least 1, at most ``most`` (torch's default)."""
    taken = math.floor(others + 1 - BUSY_CORE)
    return max(1, min(most, cores - taken))


def cpu_seconds() -> tuple[float, float]:
    """(all CPUs' busy seconds since boot, this process's CPU seconds): /proc/stat's first line and os.times()."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields  # steal: a VM's host gave the core away
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    times = os.times()
    return busy, times.user + times.system


class FreeCores:
    """Measures the others' CPU use between calls and sets torch's thread count to the cores they leave."""

    def __init__(self):
        import torch

        self.torch = torch
        self.most = torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        self.last = (monotonic(), *cpu_seconds())

    def update(self) -> None:
        now = monotonic()
        if now - self.last[0] < INTERVAL_S:
            return
        busy, own = cpu_seconds()
        others = others_busy_cores(busy - self.last[1], own - self.last[2], now - self.last[0])
        self.last = (now, busy, own)
        threads = threads_for(others, self.cores, self.most)
        if threads != self.torch.get_num_threads():
            self.torch.set_num_threads(threads)


def adapts() -> bool:
    """Whether the thread count may follow the load here: no user setting, several cores, Linux's /proc/stat."""
    return not user_chose() and (os.cpu_count() or 1) > 1 and os.path.exists("/proc/stat")


def training_follows() -> bool:
    """Whether training follows the load too (``MNIST_LIT_THREADS=follow``: results then depend on it)."""
    return os.environ.get("MNIST_LIT_THREADS") == "follow" and adapts()


_free_cores: FreeCores | None = None
_decided = False


def adapt_threads() -> None:
    """Call between batches: sets torch's thread count to the free cores, at most every INTERVAL_S (a clock read
    otherwise). Does nothing where ``adapts()`` says no (decided on the first call)."""
    global _free_cores, _decided
    if not _decided:
        _free_cores, _decided = FreeCores() if adapts() else None, True
    if _free_cores is not None:
        _free_cores.update()
