"""
Where and how the model runs: device, number format, autocast, the GPU's peak speed, and stopping on
signals (torchrun's processes are glimpse/distributed.py's).

Every device-specific call lives here, gated on the device it needs, so that the scripts read the
same on CPU, CUDA and Apple's MPS.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch

from glimpse.config import option
from glimpse.errors import GlimpseError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def device_option():
    """The --device field every script shares."""
    return option("auto", "auto: CUDA, then MPS, then CPU")


def dtype_option():
    """The --dtype field every script shares."""
    return option("auto", "auto: bfloat16 on CUDA GPUs that compute it natively (Ampere and later) and on CPUs with "
                          "AVX-512 BF16 or AMX, float16 on older GPUs (V100, T4; training adds a grad scaler), "
                          "float32 elsewhere (a CPU without them runs bfloat16 many times slower than float32). "
                          "float32 on CUDA lets matrix products use TF32 tensor cores (10-bit mantissa products, "
                          "float32 sums)")


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """auto picks CUDA, then MPS, then CPU; asking for one that is not there is an error. Besides the scripts'
    names, one that torch names (cuda:1, a torch.device: the Python API's) is checked the same way."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise GlimpseError(f"device={name} but PyTorch sees no CUDA GPU; use --device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GlimpseError(f"device={name} but PyTorch sees {torch.cuda.device_count()} CUDA GPUs, numbered from 0; "
                           "use --device=cuda (or auto)")
    if device.type == "mps" and not mps:
        raise GlimpseError(f"device={name} but this PyTorch has no MPS backend; use --device=cpu (or auto)")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA GPUs and CPUs that compute it natively, float16 on older GPUs, float32 elsewhere.

    Volta and Turing (V100, T4) can run bfloat16 only by emulating it, far slower than their float16
    tensor cores, and torch.cuda.is_bf16_supported() counts emulation unless told not to.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if computes_bfloat16(device) else torch.float16
        if device.type == "cpu" and computes_bfloat16(device):
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def computes_bfloat16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively rather than by emulating it: CUDA GPUs from Ampere on, CPUs
    with bfloat16 instructions. Not MPS: bfloat16 there needs macOS 14 or later, and which Apple GPUs compute it
    natively PyTorch does not say, so Muon orthogonalises in float32 on a Mac (and dtype=auto is float32 there)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_computes_bfloat16()


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


def sum_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype that many losses or counts are added up in on device: float64, but float32 on MPS, which has
    no float64 (creating a float64 tensor there fails)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


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
        # said at once: the step or eval under way may take minutes. Once per machine under torchrun, which sends
        # the signal to every process; written straight to the file descriptor, which a handler may do at any moment
        if os.environ.get("LOCAL_RANK", "0") == "0":
            with contextlib.suppress(OSError):  # stderr gone (a `| tee` the Ctrl-C ended too) must not lose the save
                os.write(2, f"\n{signal.Signals(signum).name}: stopping with a checkpoint once the step or eval under "
                            "way ends; Ctrl-C again to quit at once without one\n".encode())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
