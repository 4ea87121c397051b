"""
Compiling a training run's model: a static graph for each shape its steps and evals meet (the batch and
sequence ramps' eighths, then full size), Dynamo's cache sized to hold them all, and every step's graph
compiled before the first step. glimpse/run.py's setup calls these when --compile is on.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from glimpse.errors import GlimpseError
from glimpse.optim import ramp
from glimpse.train_config import TrainConfig
from model import GPT


def training_shapes(cfg: TrainConfig, from_iter: int = 0) -> list[tuple[int, int]]:
    """The (sequences, tokens) shapes of the steps from from_iter on: the ramps' eighths, then full size."""
    ramped = max(cfg.batch_warmup_iters, cfg.seq_warmup_iters)
    shapes = [step_shape(cfg, it) for it in range(from_iter, max(ramped, from_iter) + 1)]
    return list(dict.fromkeys(shapes))  # in order, each once


def step_shape(cfg: TrainConfig, it: int) -> tuple[int, int]:
    """(sequences per micro-step, tokens per sequence) at step it: full size, or on their ramps."""
    return ramp(it, cfg.batch_size, cfg.batch_warmup_iters), ramp(it, cfg.model.block_size, cfg.seq_warmup_iters)


def compile_static(model: GPT, cfg: TrainConfig) -> torch.nn.Module:
    """torch.compile(model) with a static graph for each shape it meets.

    By default Dynamo turns a dimension symbolic the second time it sees it change, so a run whose first
    steps are smaller (the batch and sequence ramps, or an eval at another batch size) would train every
    full-size step on a graph made for any size. The shapes are few (the ramps' eighths, the evals'), so each
    gets its own graph; raise_recompile_limit, called first, sizes the cache to hold them all rather than fall
    back to eager mode.
    """
    return torch.compile(model, **compile_options(cfg))


def compile_options(cfg: TrainConfig) -> dict:
    """torch.compile's options for a run: static shapes, its backend, inductor's mode."""
    mode = {"mode": cfg.compile_mode} if cfg.compile_backend == "inductor" else {}  # the other backends take none
    return {"dynamic": False, "backend": cfg.compile_backend, **mode}


def check_cuda_graphs(cfg: TrainConfig, world_size: int):
    """Refuse the CUDA graphs (--compile_mode=reduce-overhead or max-autotune, --compile_backend=cudagraphs) of a
    run they would go wrong in, on any device: PyTorch's CUDA graph trees break under DDP and mix up the gradients
    of micro-steps (its open issues below). fsdp is refused with the settings (TrainConfig)."""
    if cfg.cuda_graphs and world_size > 1:  # pytorch/pytorch#113809 and #140395
        raise GlimpseError(f"{cfg.graphs_by} records CUDA graphs, which PyTorch's DDP is reported to break with: "
                           f"train in one process, or use --compile_mode=default")
    if cfg.cuda_graphs and cfg.gradient_accumulation_steps > 1:  # pytorch/pytorch#169545
        raise GlimpseError(f"{cfg.graphs_by} records CUDA graphs, which PyTorch does not keep apart across micro-steps "
                           f"({cfg.gradient_accumulation_steps} here): their gradients can be overwritten. Use "
                           f"--gradient_accumulation_steps=1 with a bigger --batch_size, or --compile_mode=default")


def raise_recompile_limit(cfg: TrainConfig):
    """Raise Dynamo's recompile limit, for the whole process (it is a global setting, not an option of
    torch.compile), to a graph for every shape the run compiles: past the limit Dynamo runs eager mode."""
    # the steps', the evals' (training's batch, the final whole-split score's too), and two to spare
    needed = len(training_shapes(cfg)) + 3
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)


def compile_ahead(step_model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, from_iter: int,
                  device: torch.device, ctx: AbstractContextManager):
    """Compile the training step for every shape the run has left (its steps from from_iter on), before the
    first step: compiling takes minutes on a GPU, and inside the first step it would count against max_time
    and its schedule. step_model is what the steps call (Run.ddp_model), ctx the run's autocast.

    One forward and backward per shape on a batch of zeros, in training mode under the run's autocast; the
    random streams are put back and the gradients dropped, so the run goes on as if this had not happened.
    """
    devices = [device] if device.type in ("cuda", "mps") else []  # the GPU's own stream (dropout) too
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        for batch_size, seq_len in training_shapes(cfg, from_iter):
            # inputs and targets apart, as batches have them: Dynamo's guards tell one tensor passed twice apart
            x, y = torch.zeros(2, batch_size, seq_len, dtype=torch.long, device=device)
            with ctx:
                _, loss = step_model(x, y)
            loss.backward()
    optimizer.zero_grad(set_to_none=True)
