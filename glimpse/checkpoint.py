"""
Checkpoint I/O, shared by train.py (save, resume), sample.py and eval.py (load, build), and the
random streams a resume restores.

A run's out_dir holds two checkpoints, because resuming and sampling want different weights:

    ckpt.pt   where training stands: what a resumed run needs to continue exactly (glimpse/run.py's
              Run.state_dict defines it: weights, optimizer, grad scaler, counters, every rank's
              random streams). Written at evals (with always_save_checkpoint, else at the last one), on a
              signal, every checkpoint_interval_s, at the end.
    best.pt   the weights at the lowest validation loss so far (Run.weights_dict): no optimizer state,
              only what sampling and evaluation read. Written when an eval improves on the best.

Which out_dir a run may start in, and which checkpoints it may resume, are glimpse/run_folder.py's checks.

Under fsdp=true ckpt.pt holds the full weights but not the optimizer state, which is saved sharded beside
it (glimpse/sharding.py).

Older out_dirs hold ckpt.pt alone; it loads everywhere as before. Either file is a dict of plain types
and tensors, so it loads with torch.load(weights_only=True), which refuses anything that would run
code while unpickling. Writes are atomic: a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch

from glimpse.config import option
from glimpse.errors import GlimpseError, is_out_of_memory
from glimpse.gpt2 import is_hub_name, load_pretrained, pretrained_state
from glimpse.runtime import runtime
from model import GPT, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"
Which = Literal["auto", "best", "last"]


def checkpoint_path(out_dir: str | Path) -> Path:
    """ckpt.pt: where training stands, what --init_from=resume reads."""
    return Path(out_dir) / CHECKPOINT_NAME


def best_path(out_dir: str | Path) -> Path:
    """best.pt: the weights with the lowest validation loss so far."""
    return Path(out_dir) / BEST_NAME


def checkpoint_option():
    """The --checkpoint field of the scripts that read a trained model."""
    return option("auto", "which checkpoint of out_dir to read: best (best.pt, the lowest validation loss), last "
                          "(ckpt.pt, where training stopped), auto: best.pt when there is one, else ckpt.pt")


def check_one_model(init_from: str, checkpoint: str):
    """--checkpoint picks among a run's checkpoints, which --init_from (another model) does not read: given both, the
    choice would be dropped without a word."""
    if init_from and checkpoint != "auto":
        raise ValueError(f"--checkpoint={checkpoint} picks one of OUT_DIR's checkpoints, but --init_from={init_from} "
                         "reads a model of its own: drop --checkpoint")


def folder_missing(folder: Path) -> str:
    """Why a run's folder holds no checkpoint when it is not a folder at all: ' (no such folder)', ' (a file, not a
    folder)', ' (a link to nothing)', or nothing."""
    return ("" if folder.is_dir() else " (a file, not a folder)" if folder.exists()
            else " (a link to nothing)" if folder.is_symlink() else " (no such folder)")


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face model folder's weights, either format


def chosen_checkpoint(out_dir: str | Path, which: Which) -> Path:
    """The file --checkpoint=which names; auto falls back to ckpt.pt for runs older than best.pt."""
    if which not in get_args(Which):  # the scripts' flags are checked already; a notebook's argument is not
        raise GlimpseError(f"checkpoint must be one of {', '.join(get_args(Which))}, got {which!r}")
    folder = Path(out_dir)
    if which == "auto" and not best_path(folder).exists() and not checkpoint_path(folder).exists():
        if (folder / "config.json").is_file() and any((folder / name).is_file() for name in HF_WEIGHTS):
            raise GlimpseError(f"{folder} holds a Hugging Face model (an export, a download), not a glimpse run's "
                               f"checkpoints: give it as --init_from={folder} (sample.py; eval.py for "
                               "--task=hellaswag)")
        raise GlimpseError(f"no {BEST_NAME} or {CHECKPOINT_NAME} in {folder}{folder_missing(folder)}: train one first "
                           "(python train.py ...) or fix --out_dir")
    if which == "last" or (which == "auto" and not best_path(out_dir).exists()):
        return checkpoint_path(out_dir)
    if not best_path(out_dir).exists() and checkpoint_path(out_dir).exists():
        raise GlimpseError(f"no {best_path(out_dir)}: this run has no eval that saved one yet; read where training "
                           "stopped with --checkpoint=last")
    return best_path(out_dir)


def parameter_count(n: int) -> str:
    """A parameter count as the scripts print it: 0.80M, 124.44M; a model of a few thousand would read 0.00M."""
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def refuse_run_folder(source: str):
    """--init_from takes a Hugging Face GPT-2 (a Hub name or a folder); a glimpse run's out_dir is read otherwise."""
    folder = Path(source)  # a run named like a Hub model (gpt2) leaves the name the Hub's, as is_hub_name says
    if not is_hub_name(source) and ((folder / BEST_NAME).is_file() or (folder / CHECKPOINT_NAME).is_file()):
        raise GlimpseError(f"{folder} holds a glimpse run's checkpoints, not a Hugging Face GPT-2 folder: read it "
                           "with --out_dir (train.py: --out_dir with --init_from=resume)")


def describe(path: Path, state: dict) -> str:
    """One line on what a loaded checkpoint is, for the scripts to print."""
    val, step, at = state.get("val_loss"), state.get("iter_num"), state.get("val_loss_step")
    if val is None:
        return f"{path} (step {step})"
    return f"{path} (step {step}, val loss {val:.4f}" + (f" at step {at})" if at not in (None, step) else ")")


def save_checkpoint(path: Path, state: dict):
    """torch.save(state) to path, whole or not at all, and durable: flushed to disk, renamed into place, the rename
    flushed too. Not files.write_atomic: its temporary name is per process (nodes sharing a dataset), where a
    checkpoint's is fixed, path + ".tmp", so that a run killed while saving leaves one checkpoint-sized file that
    the next save replaces, not one per killed run (the out_dir's lock keeps two runs from sharing it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:
        tmp.unlink(missing_ok=True)
        if "unexpected pos" not in str(e):  # a state that cannot be saved: a bug's error, not the disk's
            raise
        # torch's zip writer meets a short write (a full disk) as "[enforce fail at inline_container.cc] unexpected pos"
        raise OSError(errno.ENOSPC, f"the write stopped short, is the disk full? ({str(e).splitlines()[0]})",
                      str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file is no use to anyone; the old checkpoint is untouched
        raise
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX; Windows has no directory fsync)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path, device="cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict, or a GlimpseError that says why it cannot be used.

    mmap: map the file instead of reading it (CPU only), so that what the caller never touches (the
    optimizer state, for sampling) is never read from disk.
    """
    if not path.exists():
        raise GlimpseError(f"no checkpoint at {path}{folder_missing(path.parent)}; train one first (python train.py "
                           "...) or fix --out_dir")
    try:
        with warnings.catch_warnings():  # a damaged file's first bytes may name a pickle protocol: no warning for it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            try:
                state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
            except RuntimeError as e:  # torch's format before 1.6 (no zip) loads whole, not memory-mapped
                if not (mmap and "_use_new_zipfile_serialization" in str(e)):
                    raise
                state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = refusal_reason(str(e))
        raise GlimpseError(f"{path} was refused by the safe loader" + (f" ({reason})" if reason else "")
                           + ": it is not a glimpse checkpoint, or holds objects besides tensors and plain values; "
                           f"{instead(path)}") from None
    # damaged bytes fail torch's unpickler in all these ways (a memo key never stored, a pop from an empty stack, a
    # length cut short, a storage of the wrong kind); a MemoryError is not one, and goes on to user_errors
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        if is_out_of_memory(e):  # a whole file, too big for the device to hold
            raise
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise GlimpseError(f"{path} is corrupt or truncated ({kind}); {instead(path)}") from None
    if not isinstance(state, dict):
        raise GlimpseError(f"{path} is not a glimpse checkpoint (it holds a {type(state).__name__}, not a dict); "
                           f"{instead(path)}")
    missing = [key for key in ("model", "model_config", "tokenizer") if key not in state]
    if missing:
        raise GlimpseError(f"{path} is not a glimpse checkpoint (no {' or '.join(missing)}); {instead(path)}")
    if not isinstance(state["tokenizer"], dict):
        raise GlimpseError(f"{path} names no tokenizer glimpse knows ({str(state['tokenizer'])[:80]!r}); "
                           f"{instead(path)}")
    return state


def instead(path: Path) -> str:
    """What to read instead of a checkpoint that cannot be read: the run's ckpt.pt for its best.pt, which the
    scripts read first."""
    if path.name == BEST_NAME and checkpoint_path(path.parent).exists():
        return f"read {CHECKPOINT_NAME} instead with --checkpoint=last"
    return "use another checkpoint"


def refusal_reason(message: str) -> str:
    """What the safe loader found in a file, from torch's message, whose advice (weights_only=False, allowing more
    globals) would run or trust what the file holds, and is left out; empty when it names nothing."""
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not re.search(r"weights_only|Weights only|Please file|Alternatively|documentation", line):
            return line.split(". ")[0].rstrip(".")
    return ""


def model_from_checkpoint(state: dict, device="cpu") -> GPT:
    """The model a checkpoint describes, holding its weights (built without a random initialisation); a
    GlimpseError for one this glimpse cannot build (another program's, or one edited by hand)."""
    try:
        model = GPT.with_weights(GPTConfig(**state["model_config"]), state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        if is_out_of_memory(e):
            raise
        why = " ".join(line.strip() for line in str(e).splitlines()[:2])[:200]
        raise GlimpseError(f"the checkpoint holds a model this glimpse cannot build ({why}): it is not one a glimpse "
                           "run wrote, or was edited; use another checkpoint") from None
    return model.to(device)


def load_trained(out_dir: str | Path, which: Which, device_name: str, dtype_name: str, doing: str,
                 init_from: str = ""):
    """(model in eval mode, checkpoint dict, device, dtype) for the scripts that use a trained model.

    Reads the checkpoint --checkpoint names onto the device --device names, and says on stderr which
    file it read ("sampling from out/best.pt (step 5000, val loss 1.4712)"). init_from, when given, is a
    pretrained GPT-2 instead (a name such as gpt2, or a Hugging Face folder): see glimpse/gpt2.py.
    """
    device, dtype, _ = runtime(device_name, dtype_name)
    if init_from:
        refuse_run_folder(init_from)
        model = load_pretrained(init_from, device)
        print(f"{doing} {init_from} ({parameter_count(model.num_params(non_embedding=False))} parameters)",
              file=sys.stderr)
        return model, pretrained_state(init_from, model), device, dtype
    path = chosen_checkpoint(out_dir, which)
    # read on the CPU, memory-mapped: the weights are read once, the optimizer state not at all
    state = load_checkpoint(path, "cpu", mmap=True)
    print(f"{doing} {describe(path, state)}", file=sys.stderr)
    return model_from_checkpoint(state, device).eval(), state, device, dtype


def rank_rng_state(device: torch.device) -> dict:
    """This process's own random streams (dropout masks): torch's, and its GPU's (CUDA or MPS)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rank_rng(state: dict, device: torch.device):
    """Set this process's streams back to what rank_rng_state recorded."""
    # a checkpoint loaded onto a GPU brings these byte tensors along; generators take them on the CPU only
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"].cpu())


def saved_rank_states(rng: dict) -> list[dict]:
    """Every rank's streams from a checkpoint's rng entry; checkpoints before per-rank streams held one."""
    return rng["ranks"] if "ranks" in rng else [{k: v for k, v in rng.items() if k != "batches"}]
