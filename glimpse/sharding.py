"""
fsdp=true: the model sharded across torchrun's processes with PyTorch's FSDP2, and its training state
saved and restored sharded through torch.distributed.checkpoint (DCP).

DDP keeps a whole replica of the weights, gradients and AdamW state in every process; FSDP2 keeps a
1/N share of each, gathering a block's whole weights only for its forward and backward. Each parameter
becomes a DTensor of which a process holds its part (.to_local()).

The checkpoint of an fsdp run is two things:

    ckpt.pt              the whole weights, gathered on rank 0 (so sample.py, eval.py and export.py read
                         it as any other), the counters and random streams, and the name of the folder
                         below that holds the training state; no optimizer state
    ckpt.dcp/a or /b     the weights and AdamW state as training holds them, each process its shards

A save writes the folder ckpt.pt does not name, then ckpt.pt, so a crash mid-save leaves the previous
pair whole. DCP records how the tensors were laid out and reshards on load, so a run resumes on any
process count, with fsdp or without.

torch.distributed.fsdp and .checkpoint are imported inside the functions: runs without fsdp never load them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from glimpse.errors import GlimpseError

SHARDED_SLOTS = ("ckpt.dcp/a", "ckpt.dcp/b")  # relative to out_dir: ckpt.pt names the one it goes with


def check_fsdp(dtype: torch.dtype, resuming: bool = False):
    """fsdp=true needs torchrun's process group, and a number format without a loss scaler. A resume takes it from
    the run's settings, and may go on without it."""
    if not dist.is_initialized():
        raise GlimpseError("fsdp=true shards the model across torchrun's processes: launch train.py with torchrun "
                           "(torchrun --standalone --nproc_per_node=N train.py ...; N=1 works too)"
                           + ("; or go on unsharded in this process with --fsdp=false" if resuming else ""))
    if dtype == torch.float16:  # dtype=auto on a GPU without bfloat16
        raise GlimpseError("fsdp=true does not support float16 (its loss scaler would skip steps on some processes "
                           "only): use --dtype=float32")


def shard(model: torch.nn.Module, blocks: torch.nn.ModuleList, device: torch.device,
          compile_options: dict | None = None):
    """FSDP2 in place: each block one unit, whose weights are gathered for its forward and backward and freed
    after, then the root for what is left (embeddings, final norm, head), so that no more than one block's
    whole weights are held at a time besides the root's.

    With compile_options each block is first compiled in place (Module.compile, so its parameters keep their
    names in every state dict); FSDP's own hooks around it are never traced (torch disables Dynamo for them).

    The sharded model's first forward must not run under torch.inference_mode: FSDP2 would keep the weights it
    gathers there as inference tensors, which every training step after refuses to update. train.py's evals,
    HellaSwag and attention snapshots run under no_grad, so whichever comes first (a resumed run may start with
    any of them) is fine.

    The shards live on device, the run's: left to itself FSDP2 would put them on the machine's accelerator, a
    GPU's or a Mac's, even in a run given --device=cpu."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # every process, one dimension
    for block in blocks:
        if compile_options is not None:
            block.compile(**compile_options)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters' values this process holds: all of them, or of a sharded model its shards."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # DTensors have to_local


def full_weights(model: torch.nn.Module) -> dict:
    """A sharded model's whole state dict, gathered from every process onto rank 0's CPU (the other processes
    get {}). Every process calls it: it is a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def next_sharded_slot(last: str | None) -> str:
    """The folder (relative to out_dir) the next sharded save writes: not the one the current ckpt.pt names."""
    return SHARDED_SLOTS[1] if last == SHARDED_SLOTS[0] else SHARDED_SLOTS[0]


def clear_sharded_slot(folder: Path):
    """Empty the folder a sharded save is about to write (rank 0, before the save), so that no shard of an older
    save at another process count is left in it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Every process writes its shards of the weights and the optimizer state to folder (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Load what save_sharded wrote into model and optimizer, whether sharded over any number of processes or
    not sharded at all: each process reads the parts its own tensors hold."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / ".metadata").exists():
        raise GlimpseError(f"{folder} is missing or incomplete: the checkpoint's weights and optimizer state are "
                           "there; restore that folder, or start a new out_dir")
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill: this run's own
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
