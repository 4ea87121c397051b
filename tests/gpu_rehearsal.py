"""Stands in for python in scripts/gpu_checks.sh (its PYTHON) on a machine without a GPU: every command the
script runs, run for real but tiny and on the CPU, so that its plumbing (the steps, their logs, the greps of
their output, the comparisons, the picture, the archive) is checked before a GPU's scarce minutes are spent.

    PYTHON="python tests/gpu_rehearsal.py" bash scripts/gpu_checks.sh OUT 900

It says there are two GPUs (torchrun then starts two gloo processes), sends train.py and bench.py to the CPU
in float32, uncompiled, with a 1-layer model of 32 channels over 32 tokens, divides the step counts the script
gives by 50, and leaves pytest out (the tests run apart).
"""

from __future__ import annotations

import os
import sys

TINY = ["--device=cpu", "--dtype=float32", "--compile=false", "--n_layer=1", "--n_head=2", "--n_embd=32",
        "--block_size=32", "--eval_iters=2", "--warmup_iters=1", "--log_interval=1"]


def rehearsed(argv: list[str]) -> list[str] | None:
    """The command to run instead of python argv, or None when there is nothing to run."""
    if argv[:1] == ["-c"] and "device_count" in argv[1]:
        print(2)
        return None
    if argv[:2] == ["-m", "pytest"]:
        print("rehearsal: pytest left out:", " ".join(argv[2:]))
        return None
    if "train.py" in argv:
        argv = [scaled(a) for a in argv] + TINY
        if not any(a.startswith("--max_iters=") for a in argv):  # a preset's own count: 10 steps
            argv += ["--max_iters=10", "--lr_decay_iters=10"]
    if "bench.py" in argv:
        tiny = ":".join(a.removeprefix("--") for a in TINY[:7]) + ":batch_size=2"
        argv = [f"{a}:{tiny}" if a.startswith("--preset=") else "--repeats=1" if a.startswith("--repeats=") else a
                for a in argv]
    return argv


def scaled(arg: str) -> str:
    """A step count given on the command line, divided by 50 (at least 1)."""
    for key in ("--max_iters=", "--lr_decay_iters=", "--eval_interval="):
        if arg.startswith(key):
            return key + str(max(1, int(arg[len(key):]) // 50))
    return arg


if __name__ == "__main__":
    command = rehearsed(sys.argv[1:])
    if command is not None:
        os.execv(sys.executable, [sys.executable, *command])
