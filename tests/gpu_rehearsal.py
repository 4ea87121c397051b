"""Stands in for python in scripts/gpu_checks.sh (its PYTHON) on a machine without a GPU: every command the
script runs, run for real but tiny and on the CPU, so that its plumbing (the steps, their logs, the greps of
their output, the comparisons, the picture, the archive) is checked before a GPU's scarce minutes are spent.

    PYTHON="python tests/gpu_rehearsal.py" bash scripts/gpu_checks.sh OUT 900

It says there are two GPUs (torchrun then starts two gloo processes), sends train.py and bench.py to the CPU
in float32, uncompiled, with a 1-layer model of 32 channels over 32 tokens, divides the step counts the script
gives by 50, and leaves pytest out (the tests run apart), exiting 5 as pytest does when it collects nothing: the
summary's exit codes are then seen to be each step's own. Each train.py or bench.py command first prints the
command as the script gave it (and its TORCH_LOGS), for what the CPU's stand-ins override (compiling, repeats).
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
    if "train.py" in argv or "bench.py" in argv:
        logs = [f"TORCH_LOGS={os.environ['TORCH_LOGS']}"] if "TORCH_LOGS" in os.environ else []  # what compiling logs
        print("rehearsal: given", *logs, "python", " ".join(argv), flush=True)
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
    sys.exit(5 if sys.argv[1:3] == ["-m", "pytest"] else 0)  # 5: pytest's exit when it collects nothing
