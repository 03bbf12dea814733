"""Torch's CPU threads for the cores that are free, revisited as a run goes.

Torch runs a parallel region on one OpenMP thread per core, and the threads spin-wait for each other at its end.
On a machine where another process is busy, one of them waits for a core the neighbour holds while the others
spin: a run beside one busy single-threaded process took 3x its time alone (2-core AMD EPYC; docs/benchmark.md).
One thread fewer avoids that, but costs up to 1.7x on an idle machine; so the count follows the load instead:
every half second ``adapt_threads`` measures how much CPU the other processes took (the machine's busy time in
``/proc/stat`` less this process's own) and sets torch's thread count to the cores they leave free, all of them on
an idle machine (torch's default).

A user's own choice wins: with ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment (the sweeps and the
test suite divide the cores that way), or ``MNIST_LIT_THREADS=fixed``, nothing changes. Only the main thread
calls it (OpenMP's thread count is the calling thread's), between batches.
"""

import math
import os
from time import monotonic

import torch

USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
INTERVAL_S = 0.5  # between measurements: 50 clock ticks a core, short against a run
# Others' use (in cores) that counts as a busy core: a neighbour beside our spinning threads gets ~0.6 of one;
# below 0.4 it is background noise (a shell, a logger).
BUSY_CORE = 0.4


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
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def adapts() -> bool:
    """Whether the thread count may follow the load here: no user setting, several cores, Linux's /proc/stat,
    and one process (a DDP run's processes share the cores as Lightning sets them)."""
    if os.environ.get("MNIST_LIT_THREADS") == "fixed" or any(name in os.environ for name in USER_SETTINGS):
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (os.cpu_count() or 1) > 1 and os.path.exists("/proc/stat") and not distributed


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
