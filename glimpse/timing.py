"""
Timing and memory readings for bench.py: medians of repeated runs, several functions timed in turn, and
the process's resident memory.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from glimpse.runtime import synchronize


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of fn over repeats runs, after one warm-up run."""
    fn()  # warm-up: first-call allocations and lazy imports are not what a user waits for each time
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: list, devices: list[torch.device], repeats: int) -> list[float]:
    """Median seconds of each fn, timing them in turn, round after round, after one warm-up each."""
    for fn in fns:
        fn()  # warm-up: first-call allocations and lazy imports are not what a user waits for each time
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, device, ts in zip(fns, devices, times):
            t0 = time.perf_counter()
            fn()
            synchronize(device)  # GPU work runs asynchronously: wait for it before reading the clock
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (POSIX)."""
    import resource  # POSIX

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes
