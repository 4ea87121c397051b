"""
Checkpoint I/O, shared by train.py (save, resume) and sample.py (load, build).

A checkpoint is a dict of plain types and tensors, so it loads with torch.load(weights_only=True),
which refuses anything that would run code while unpickling:

    model         the raw model's state_dict (never the torch.compile or DDP wrapper's)
    model_config  GPTConfig as a dict
    tokenizer     the tokenizer spec (data/tokenizer.py): a checkpoint alone can sample
    train_config  the resolved training config as a dict
    optimizer, iter_num, best_val_loss, rng, wandb_run_id   what resuming needs

Writes are atomic: a temporary file in the same folder, flushed to disk, then renamed over ckpt.pt,
so a crash mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from glimpse.errors import GlimpseError
from model import GPT, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_NAME


def save_checkpoint(path: Path, state: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX; Windows has no directory fsync)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """The checkpoint's dict, or a GlimpseError that says why it cannot be used."""
    if not path.exists():
        raise GlimpseError(
            f"no checkpoint at {path}; train one first (python train.py ...) or fix --out_dir"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GlimpseError(f"{path} was refused by the safe loader: {first_line}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise GlimpseError(f"{path} is corrupt or truncated ({type(e).__name__}); use another checkpoint") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise GlimpseError(f"{path} is not a glimpse checkpoint (no model or model_config)")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> GPT:
    """Rebuild the model a checkpoint describes and load its weights."""
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device)
