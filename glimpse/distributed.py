"""
torchrun's processes: this process's place among them, the collectives that keep them in step, joining the
process group, and ending a process cleanly, with a user's error printed once for all of them.

Outside torchrun a run is rank 0 of 1, and every collective here returns at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from glimpse.errors import GlimpseError, UserExit, reported_by_caller


@dataclass
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 when run plainly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where collectives put their tensors: NCCL needs them on the GPU
    # every forward is a collective (fsdp gathers each block's weights): each process must run as many as the others
    lockstep: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items) -> list:
        """This process's share of items (a sequence): every world_size-th from its rank. In lockstep the shares are
        made equal in number, the short ones padded with None, for which a process runs a forward and throws it
        away (evaluation.idle_forward)."""
        mine = list(items[self.rank::self.world_size])
        if self.lockstep:
            mine += [None] * (-(-len(items) // self.world_size) - len(mine))  # up to ceil(len / world_size)
        return mine

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over all processes (itself when not distributed)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.sum(value) / self.world_size

    def max(self, values: list[float]) -> list[float]:
        """The largest of each number over all processes, in one collective."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when flag is true on any of them."""
        return self.max([float(flag)])[0] > 0

    def gather(self, value) -> list:
        """Every process's value (any picklable object), in rank order, on every process."""
        if not self.enabled:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def on_main(self, fn, what: str):
        """fn() on rank 0 alone, with every rank told whether it failed, so that all of them stop together.

        Were rank 0 to raise alone, the others would wait in their next collective for a rank that never
        comes, until a timeout of many minutes; this way torchrun sees every process fail at once.
        """
        error, result = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # raised again below, once every rank knows
                error = e
        if self.any(error is not None):
            if error is not None:
                raise error
            raise GlimpseError(f"rank 0 failed while {what}; its error says why")
        return result


def process_group_options(device_name: str, local_rank: int, cuda_available: bool) -> dict:
    """init_process_group's arguments: NCCL bound to this process's GPU from the start, else gloo."""
    if device_name == "mps":
        raise GlimpseError("device=mps cannot run under torchrun: its processes talk through gloo, which holds CPU "
                           "and CUDA tensors only; use --device=cpu, or train on MPS in one process without torchrun")
    if device_name == "cuda" or (device_name == "auto" and cuda_available):
        return {"backend": "nccl", "device_id": torch.device("cuda", local_rank)}
    return {"backend": "gloo"}


def run_device(device_name: str, ddp: Distributed) -> str:
    """The --device a process runs on: as given, but auto under torchrun is the process group's own device (its
    GPU under NCCL, else the CPU), never MPS, whose tensors gloo cannot hold."""
    return ddp.device.split(":")[0] if ddp.enabled and device_name == "auto" else device_name


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return "RANK" in os.environ


def first_process() -> bool:
    """True in the process that writes the run's files: rank 0 under torchrun, the only one outside it. Known before
    the process group is made."""
    return int(os.environ.get("RANK", "0")) == 0


def machines() -> int:
    """How many machines the torchrun job spans (1 outside torchrun): its processes over this machine's."""
    if not launched_by_torchrun():
        return 1
    return int(os.environ["WORLD_SIZE"]) // int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))


def init_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun.

    The group is never destroyed: the process ends by exit_when_done_under_torchrun's os._exit, with the
    group alive. Destroying a gloo group joins its worker threads while holding the GIL, and a worker still
    letting go of the last collective's tensors waits for that GIL: the process hangs after a run that
    succeeded, now and then (whether destroy_process_group drops the last reference or DDP's reducer does,
    as the run is freed).
    """
    if not launched_by_torchrun():
        return Distributed()
    local_rank = int(os.environ["LOCAL_RANK"])
    options = process_group_options(device_name, local_rank, torch.cuda.is_available())
    if options["backend"] == "nccl":
        torch.cuda.set_device(local_rank)  # before the group exists, so nothing lands on GPU 0 by default
    ddp = Distributed(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]),
                      f"cuda:{local_rank}" if options["backend"] == "nccl" else "cpu")
    dist.init_process_group(**options)
    return ddp


@contextmanager
def exit_when_done_under_torchrun():
    """Under torchrun, end the process with the block's exit status the moment it is done, without
    Python's teardown, and print a user's error once for all processes; elsewhere, nothing.

    The process group is still alive (init_distributed), and its worker threads with it. Python's teardown
    would have one of them, still letting go of the last collective's tensors, reach for a GIL that is gone,
    and the process abort (SIGABRT) after a run that succeeded, now and then. By the end of the block every
    file is written and closed and wandb finished; only the streams are left to flush.

    A bad setting stops every process alike: rank 0 prints it (report_user_error), the others exit with
    the same status and say nothing, and a process that fails because another stopped for a user's error
    (a collective whose peer left) says nothing either, where its traceback would bury the one line.
    """
    if not launched_by_torchrun():
        yield
        return
    status = 0
    try:
        with reported_by_caller():
            yield
    except UserExit as e:
        status = e.code
        report_user_error(e.message, e.code)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        reported = user_error_reported()
        if reported is None:
            traceback.print_exc()
        status = 1 if reported is None else reported
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# How long a process other than rank 0 waits for rank 0 to report the same error before printing its own:
# rank 0 may still be importing torch, or meet an error that only this process has.
REPORT_WAIT_S = 30.0


def report_user_error(message: str, status: int):
    """Print a user's error once for a torchrun job: on rank 0, or on another rank when rank 0 does not
    report one within REPORT_WAIT_S; then tell the other processes, through torchrun's store, that it is
    printed and with which status."""
    rank = int(os.environ["RANK"])
    store = _torchrun_store(REPORT_WAIT_S)
    if rank != 0 and store is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # torchrun stopping the job stops this wait at once
            signal.signal(sig, signal.SIG_DFL)
        try:
            store.wait([_report_key()])
            return
        except Exception:  # rank 0 did not report: this process's error is its own
            pass
    print(f"error: {message}" if rank == 0 else f"error (rank {rank}): {message}", file=sys.stderr)
    if store is not None:
        try:
            store.set(_report_key(), str(status))
            store.get(_report_key())  # an answer: the store holds it before this process leaves
        except Exception:
            pass
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun's summary shows it instead of a link to its docs
        record = {"message": f"error: {message}", "extraInfo": {"timestamp": str(int(time.time()))}}
        try:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": record}, f)  # the layout torchrun's own error handler writes
        except OSError:
            pass


def user_error_reported() -> int | None:
    """The status of the user's error another process of this torchrun job printed, or None."""
    store = _torchrun_store(5.0)
    try:
        return int(store.get(_report_key())) if store is not None and store.check([_report_key()]) else None
    except Exception:
        return None


def _torchrun_store(timeout_s: float):
    """A client of the key-value store torchrun's agent keeps for the job, or None where there is none."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception:
        return None


def _report_key() -> str:
    # one per attempt: torchrun --max_restarts starts the processes again on the same store
    return f"glimpse/user_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
