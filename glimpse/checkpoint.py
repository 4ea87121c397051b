"""
Checkpoint I/O, shared by train.py (save, resume) and sample.py (load, build), and what resuming
checks and restores: the model shape, tokenizer and optimizer a checkpoint must match, and its random
streams.

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
from dataclasses import fields
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


def check_resume(state: dict, model_config: GPTConfig, optimizer: str, tokenizer_spec: dict, dataset: Path):
    """A checkpoint resumes only with the same model shape, tokenizer and optimizer."""
    if state["tokenizer"] != tokenizer_spec:
        raise GlimpseError(f"the checkpoint's tokenizer does not match dataset {dataset}; "
                           "resume with the dataset it was trained on")
    saved_optimizer = state["train_config"].get("optimizer", "adamw")  # older checkpoints: AdamW
    if saved_optimizer != optimizer:
        raise GlimpseError(f"optimizer={optimizer} contradicts the checkpoint's optimizer={saved_optimizer}, "
                           "whose state it could not continue; drop the flag or start a new out_dir")
    saved = state["model_config"]
    for f in fields(GPTConfig):
        was = saved.get(f.name, f.default)  # a checkpoint older than the field was built with its default
        if f.name != "dropout" and was != getattr(model_config, f.name):
            raise GlimpseError(f"{f.name}={getattr(model_config, f.name)} contradicts the checkpoint's "
                               f"{f.name}={was}; drop the flag or start a new out_dir")


def rng_state(batch_gen: torch.Generator, device: torch.device) -> dict:
    """The random streams a resumed run must continue: training batches, torch's, and the GPU's."""
    state = {"batches": batch_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(rng: dict, batch_gen: torch.Generator, device: torch.device):
    """Set the streams back to what rng_state recorded, so a resumed run draws what it would have.

    Only rank 0 saves, so under DDP every process resumes with rank 0's streams.
    """
    # a checkpoint loaded onto a GPU brings these byte tensors along; generators take them on the CPU only
    batch_gen.set_state(rng["batches"].cpu())
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
