"""
Where and how the model runs: device, number format, autocast, the GPU's peak speed, the DDP process
group, and signals.

Every device-specific call lives here, gated on the device it needs, so that the scripts read the
same on CPU, CUDA and Apple's MPS.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from glimpse.config import option
from glimpse.errors import GlimpseError, UserExit, reported_by_caller

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def device_option():
    """The --device field every script shares."""
    return option("auto", "auto: CUDA, then MPS, then CPU")


def dtype_option():
    """The --dtype field every script shares."""
    return option("auto", "auto: bfloat16 on CUDA GPUs that compute it natively (Ampere and later) and on CPUs with "
                          "AVX-512 BF16 or AMX, float16 with a grad scaler on older GPUs (V100, T4), float32 elsewhere "
                          "(a CPU without them runs bfloat16 many times slower than float32). float32 on CUDA lets "
                          "matrix products use TF32 tensor cores (10-bit mantissa products, float32 sums)")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto picks CUDA, then MPS, then CPU; asking for one that is not there is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise GlimpseError("device=cuda but PyTorch sees no CUDA GPU; use --device=cpu (or auto)")
    if name == "mps" and not mps:
        raise GlimpseError("device=mps but this PyTorch has no MPS backend; use --device=cpu (or auto)")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA GPUs and CPUs that compute it natively, float16 on older GPUs, float32 elsewhere.

    Volta and Turing (V100, T4) can run bfloat16 only by emulating it, far slower than their float16
    tensor cores, and torch.cuda.is_bf16_supported() counts emulation unless told not to.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device.type == "cpu" and cpu_computes_bfloat16():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


@functools.cache
def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512 BF16 or AMX), read from /proc/cpuinfo.

    Without them PyTorch converts every bfloat16 product to float32 and back, tens of times slower than
    float32 itself. Outside Linux the answer is not known here, so no.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", flags, re.MULTILINE))


def allow_tf32(device: torch.device, dtype: torch.dtype) -> bool:
    """Let float32 matrix products on CUDA use TF32 tensor cores; True when it did.

    PyTorch leaves TF32 off, so a float32 run on Ampere or later would compute its products on the
    CUDA cores at a fraction of the tensor cores' rate. The setting is global to the process.
    """
    if device.type != "cuda" or dtype != torch.float32:
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True


def runtime(device_name: str, dtype_name: str, local_rank: int = 0):
    """(device, dtype, autocast context) for --device and --dtype: what every script that runs a model sets up."""
    device = resolve_device(device_name, local_rank)
    dtype = resolve_dtype(dtype_name, device)
    allow_tf32(device, dtype)
    return device, dtype, autocast(device, dtype)


def synchronize(device: torch.device):
    """Wait until the device has finished the work queued on it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on the device; to a GPU through pinned memory, so the copy overlaps the compute."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; float32 runs as it is."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense peak TFLOP/s (no 2:4 sparsity) of the GPUs glimpse knows, from NVIDIA's datasheets, for bfloat16,
# float16 and float32. The 16-bit figures are tensor cores that accumulate in float32, as PyTorch's matrix
# products do (GeForce cards do that at half their float16-accumulate rate); float32 is the dense TF32
# tensor-core figure, since glimpse turns TF32 on for float32 (allow_tf32), and the CUDA cores' figure on
# GPUs without TF32 (Volta, Turing). None: no bfloat16 tensor cores (Volta, Turing).
# Each pattern must match the whole device name, so that a MIG slice ("NVIDIA A100-SXM4-40GB MIG 1g.5gb")
# or another variant (H100 NVL, RTX 4090 D) gets no peak rather than the wrong one.
GPU_PEAKS = (
    (r"H100 80GB HBM3", 989, 989, 494.7),  # H100 SXM
    (r"H100 PCIe", 756, 756, 378),
    (r"H200", 989, 989, 494.7),  # SXM
    (r"A100(-SXM4|-PCIE)?[- ]\d+GB( PCIe)?", 312, 312, 156),  # SXM and PCIe alike
    (r"L4", 121, 121, 60),
    (r"A10", 125, 125, 62.5),
    (r"A10G", 70, 70, 35),  # AWS's A10 (no NVIDIA datasheet: the figures clouds quote): fewer tensor FLOPs
    (r"GeForce RTX 4090", 165.2, 165.2, 82.6),
    (r"GeForce RTX 3090", 71, 71, 35.6),
    (r"V100-SXM2-\d+GB", None, 125, 15.7),
    (r"V100-PCIE-\d+GB", None, 112, 14),
    (r"T4", None, 65, 8.1),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s at dtype, the denominator of MFU; None where it is not known.

    None on CPU and MPS, whose peaks depend on cores, clocks and vector units that PyTorch does not
    report, and on GPUs missing from GPU_PEAKS: no MFU is better than a meaningless one.
    """
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """GPU_PEAKS' figure for a device name as CUDA reports it (e.g. "NVIDIA H100 80GB HBM3"), in FLOP/s."""
    column = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[dtype]
    for pattern, *tflops in GPU_PEAKS:
        if re.fullmatch(rf"(NVIDIA |Tesla )?{pattern}", name):
            return tflops[column] * 1e12 if tflops[column] is not None else None
    return None


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

    def barrier(self):
        if self.enabled:
            dist.barrier()

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
    if device_name == "cuda" or (device_name == "auto" and cuda_available):
        return {"backend": "nccl", "device_id": torch.device("cuda", local_rank)}
    return {"backend": "gloo"}


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return "RANK" in os.environ


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


class StopRequest:
    """Remembers a SIGINT or SIGTERM so that training can stop between steps, with a checkpoint.

    A second signal stops at once (KeyboardInterrupt), for when saving is not wanted.
    """

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # Python only lets it handle signals
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
