"""How many threads a forward pass gets: all of them on an idle machine, fewer beside busy processes.

Why: with two OpenMP threads every op ends at a barrier. When another process holds one of the
cores, the thread that still runs spins at that barrier until the descheduled one gets CPU time
again, so a decode step or a keystroke took 5-7x longer with 2 threads than with 1 beside other
busy processes (measured on the 2-core dev machine, load ~8: keystroke @2048 tokens 1.75-2.2 s vs
0.27-0.34 s, decode step 1.3-2.3 s vs 0.29-0.45 s). One thread has no barrier to wait at.

The policy reads the CPU time of everything but this process from /proc/stat between requests and
gives a forward pass as many threads as there are cores left idle (at least one, at most
`max_threads`). Where /proc is missing it always uses `max_threads`.
"""

from __future__ import annotations

import os
import time

import torch

SAMPLE_EVERY_S = 0.25  # /proc/stat counts in 10 ms ticks: shorter windows are mostly rounding


def _process_ticks(pid: int | str) -> int:
    """CPU ticks (user + system) process `pid` has spent; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def _busy_ticks(own_pids: tuple[int, ...] = ()) -> tuple[int, int] | None:
    """(CPU ticks all processes spent busy, ticks this process and `own_pids` spent), or None
    without /proc."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = _process_ticks("self") + sum(_process_ticks(pid) for pid in own_pids)
    return user + nice + system + irq + softirq + steal, own


class ThreadPolicy:
    """Threads per forward pass from the load other processes put on the machine."""

    def __init__(self, max_threads: int, adaptive: bool = True):
        self.max_threads = max(1, max_threads)
        self.adaptive = adaptive
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.others_busy = 0.0  # cores' worth of CPU used by other processes in the last window
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.own_pids: tuple[int, ...] = ()  # helper processes whose load is ours, not others'
        self._last = (time.monotonic(), _busy_ticks())
        self.threads = self.max_threads

    def update(self) -> int:
        """Re-measure the others' load (at most every SAMPLE_EVERY_S) and return the thread count."""
        if not self.adaptive or self.max_threads == 1:
            return self.max_threads
        now, ticks = time.monotonic(), _busy_ticks(self.own_pids)
        then, before = self._last
        if ticks is None or before is None:
            return self.max_threads
        if now - then >= SAMPLE_EVERY_S:
            others = (ticks[0] - before[0]) - (ticks[1] - before[1])
            self.others_busy = max(0.0, others * self._tick_s / (now - then))
            self._last = (now, ticks)
            idle = self.cores - self.others_busy
            self.threads = max(1, min(self.max_threads, int(idle + 0.5)))
        return self.threads

    def apply(self) -> None:
        """Set torch's thread count in the calling thread: OpenMP keeps the count per thread, so this
        must run in the thread that runs the forward pass."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
