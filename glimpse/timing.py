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
    for fn, device in zip(fns, devices):
        fn()  # warm-up: first-call allocations and lazy imports are not what a user waits for each time
        synchronize(device)  # and its queued GPU work is not the first timed run's
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


# What each kind of op is called, in torch's op names (aten::..., the CPU's kernels) and in the CUDA kernels'
# (cuBLAS/CUTLASS GEMMs, flash attention, Triton kernels that torch.compile generated): the first that matches.
OP_KINDS = {
    "matmul": r"^aten::(mm|addmm|bmm|baddbmm|_scaled_mm|matmul|linear)$|gemm|cutlass|xmma|wgmma|cublas",
    "attention": r"scaled_dot_product|flash|fmha|efficient_attention",
    "cross-entropy": r"cross_entropy|log_softmax|nll_loss",
    "norm": r"rms_norm|layer_norm",
    "compiled (Triton)": r"^triton_",
    "copies and casts": r"^aten::(copy_|to|_to_copy|clone|contiguous)$|memcpy|memset",
}


def profile_steps(fn, device: torch.device, steps: int, folder: Path, name: str) -> dict:
    """Run fn steps times under torch.profiler, after one unprofiled run; write folder/name.txt (the ops that
    took the time, by self time on the device: the GPU's where there is one, else the CPU's) and
    folder/name.trace.json (for chrome://tracing or Perfetto); return the time per step by kind of op.

    Self times do not overlap (on a GPU, only the kernels' rows are summed), so the kinds add up to the busy
    time. The optimizer's step is given apart, inclusive of the ops inside it (the Newton-Schulz products are
    matmuls too). On a GPU, busy well below the wall time means the GPU waited for the host.
    """
    import re

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall = time.perf_counter() - t0
    rows = prof.key_averages()
    cpu_rows = [r for r in rows if r.device_type == DeviceType.CPU]
    # on a GPU the kernels' own rows: an aten op's row carries its kernels' time too, and annotations repeat it
    timed = [r for r in rows if r.device_type != DeviceType.CPU and not r.is_user_annotation] if on_gpu else cpu_rows
    kinds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    for row in timed:
        kind = next((k for k, pattern in OP_KINDS.items() if re.search(pattern, row.key, re.IGNORECASE)), "other")
        kinds[kind] += row.self_device_time_total if on_gpu else row.self_cpu_time_total
    optimizer = sum(r.device_time_total if on_gpu else r.cpu_time_total for r in cpu_rows
                    if r.key.startswith("Optimizer.step"))  # the host's annotation, with the kernels it launched
    folder.mkdir(parents=True, exist_ok=True)
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    (folder / f"{name}.txt").write_text(rows.table(sort_by=sort_by, row_limit=40) + "\n", encoding="utf-8")
    prof.export_chrome_trace(str(folder / f"{name}.trace.json"))
    per_step_ms = 1e-3 / steps  # microseconds over all steps -> milliseconds per step
    return {"clock": "gpu" if on_gpu else "cpu", "wall_ms": wall * 1e3 / steps,
            "busy_ms": sum(kinds.values()) * per_step_ms,
            "kinds_ms": {k: t * per_step_ms for k, t in kinds.items()},
            "optimizer_step_ms": optimizer * per_step_ms, "files": [f"{name}.txt", f"{name}.trace.json"]}
