"""
Which folders a training run may start in, and which checkpoints it may resume: what stops a run is found
before it prepares data, downloads weights or writes anything (check_start, check_out_dir), and a resume
continues only the run it was given (check_resumable, check_resume), and one training run at a time holds the
folder (training_in). The files themselves are glimpse/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from glimpse.checkpoint import best_path, checkpoint_path, folder_missing, load_checkpoint, refuse_run_folder
from glimpse.config import config_keys, recorded_values
from glimpse.distributed import first_process
from glimpse.errors import GlimpseError
from glimpse.files import missing_folders, remove_empty
from glimpse.gpt2 import is_hub_name, pretrained_folder
from glimpse.train_config import TrainConfig
from model import GPTConfig


def check_start(out_dir: Path, init_from: str):
    """What stops a training run that costs nothing to find: an out_dir it may not use (check_out_dir), an
    --init_from that is a run's folder or a folder without GPT-2's files. train.py asks before it prepares data."""
    starts = ("scratch", "resume")
    if init_from not in starts and not is_hub_name(init_from) and not Path(init_from).exists():
        near = difflib.get_close_matches(init_from, starts, n=1)  # a typo would read as a missing folder
        if near:
            raise GlimpseError(f"--init_from={init_from} is neither {' nor '.join(starts)} nor a folder: did you mean "
                               f"--init_from={near[0]}?")
    check_out_dir(out_dir, init_from)
    if init_from in ("scratch", "resume"):
        return
    refuse_run_folder(init_from)
    if not is_hub_name(init_from):
        pretrained_folder(init_from)  # a local folder's files; a Hub name's weights are fetched by setup


@contextlib.contextmanager
def training_in(out_dir: Path, main: bool = True):
    """The run folder for this training run alone while it runs (main: the process that writes its files): a second
    train.py there, a resume started while the first still runs or the same --out_dir given twice, is refused before
    it writes anything, rather than interleaving records and checkpoints with the first. The lock is the OS's on the
    folder itself (flock), which ends with the process however it ends: nothing is left behind to remove. A folder
    made for a run that fails before writing into it is removed again."""
    made = missing_folders(out_dir) if main else []
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY) if main else None
    held = fd is None  # the folder is this run's: a folder made here is its to remove
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GlimpseError(f"another train.py is training in {out_dir}: wait for it to end (or stop it), or "
                                   "give this run another --out_dir") from None
            except OSError:  # a filesystem without locks (some network ones): the run goes on unguarded
                pass
            held = True
        yield
    finally:
        if held:  # only those left empty: a run that wrote its files keeps them
            remove_empty(made)
        if fd is not None:
            os.close(fd)


def check_out_dir(out_dir: Path, init_from: str):
    """Refuse an out_dir a run cannot use, before anything is read, fetched or written: a file; a link to nothing
    (or a folder under one); a run to resume without the training state; a run's checkpoints a new run would
    overwrite; the pretrained folder being read; another program's config.json, metrics.jsonl or loss.png."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GlimpseError(f"--out_dir {out_dir} is a file, not a folder: name another")
    # a loop, or a link to what was deleted, the folder or one it is under: mkdir would say "File exists"
    if dangling := next((p for p in (out_dir, *out_dir.parents) if p.is_symlink() and not p.exists()), None):
        where = "" if dangling == out_dir else f" is under {dangling}, which"
        raise GlimpseError(f"--out_dir {out_dir}{where} is a link to nothing ({os.readlink(dangling)}): remove it or "
                           "name another")
    ckpt, best = checkpoint_path(out_dir), best_path(out_dir)
    if init_from == "resume":
        if best.exists() and not ckpt.exists():
            raise GlimpseError(f"{out_dir} has best.pt but no ckpt.pt: its run stopped before saving its training "
                               "state, and best.pt holds only weights (for sample.py and eval.py), so it cannot be "
                               "resumed; start a new run in another --out_dir")
        if not ckpt.exists():  # said before a preset's corpus is prepared, or fetched for hours, for nothing
            raise GlimpseError(f"no checkpoint at {ckpt}{folder_missing(out_dir)}, so nothing to resume: give the "
                               "--out_dir of the run to go on with, or start a new run without --init_from=resume")
        return
    if ckpt.exists():
        raise GlimpseError(f"{ckpt} exists: continue it with --init_from=resume, or start fresh in another --out_dir "
                           "(or delete that one)")
    if best.exists():
        raise GlimpseError(f"{best} exists, from a run that stopped before saving ckpt.pt (so it cannot be resumed): "
                           "start fresh in another --out_dir, or delete that one")
    local = init_from != "scratch" and not is_hub_name(init_from)  # a Hugging Face folder to finetune
    if local and out_dir.resolve() == Path(init_from).resolve():
        raise GlimpseError(f"--out_dir {out_dir} is the folder --init_from reads the pretrained model from, whose "
                           "config.json a run would overwrite: train into another folder")
    config = out_dir / "config.json"
    ours = is_run_config(config)
    if config.exists() and not ours:
        raise GlimpseError(f"{config} is not a glimpse run's config.json, and a run would overwrite it: name another "
                           "--out_dir")
    # without a run's config.json, the files a run writes beside it are another program's (or another glimpse's:
    # eval.py's records of a pretrained model)
    theirs = [] if ours else [p for p in (out_dir / "metrics.jsonl", out_dir / "loss.png")
                                                if p.is_file() and p.stat().st_size]
    if theirs:
        raise GlimpseError(f"{theirs[0]} is not a glimpse training run's (no run config.json beside it), and a run "
                           "would overwrite it: name another --out_dir")


def is_run_config(path: Path) -> bool:
    """Whether path is the config.json a run writes (a run that stopped before its first checkpoint leaves one)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {"init_from", "max_iters", "out_dir"} <= values.keys()


def run_settings(preset: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """What a resume takes above the defaults and a preset, below its flags: the settings of the run in out_dir
    as its ckpt.pt was saved with them (what config.json lists, unless a later start that saved no checkpoint
    rewrote it). Nothing for any other start, nor for a folder without a checkpoint (check_start says so); a
    checkpoint that cannot be read is refused here, before the run's data is read or fetched for the defaults."""
    given = {**preset, **flags}
    if given.get("init_from") != "resume":
        return {}
    path = checkpoint_path(given.get("out_dir", config_keys(TrainConfig)["out_dir"].default))
    if not path.is_file():
        return {}
    saved = load_checkpoint(path, mmap=True).get("train_config")  # mapped: the tensors are not read
    if not isinstance(saved, dict):
        return {}
    # the folder is the one it was read from, wherever the run was; the start is a resume, whatever the run's was
    kept = recorded_values(TrainConfig, saved, f"{path}'s settings", given={*flags, "out_dir", "init_from"})
    if (passed_over := [f"{key} {json.dumps(kept[key])} (the preset's {json.dumps(value)})"
                        for key, value in preset.items() if key in kept and kept[key] != value]) and first_process():
        print(f"note: a resume takes the run's own settings over a preset's: {', '.join(passed_over)} (a flag "
              "changes a training setting; the model's shape and the optimizer's kind stay the checkpoint's)")
    return kept


# what a resume cannot change (check_resume): the model's shape, and the optimizer whose state it continues
RESUME_KEEPS = frozenset({"optimizer"} | {f.name for f in fields(GPTConfig) if f.name != "dropout"})

# a setting that contradicts the checkpoint comes from a flag given to the resume
SAME_SETTINGS = ("a resume takes the run's own settings, those its checkpoint was saved with (out_dir/config.json "
                 "lists them): leave out the flag that changes this one, or start a new out_dir")


def check_resumable(state: dict, path: Path):
    """A checkpoint to resume holds the training state, not only weights (a best.pt copied over ckpt.pt)."""
    missing = [key for key in ("iter_num", "best_val_loss", "rng", "train_config") if key not in state]
    if "optimizer" not in state and "sharded" not in state:
        missing.append("optimizer")
    if missing:
        raise GlimpseError(f"{path} holds weights without the training state a resume needs (no "
                           f"{', '.join(missing)}): it is a best.pt or an export, not a ckpt.pt; start a new run in "
                           "another --out_dir")
    if not isinstance(state["train_config"], dict):  # what every check of a resume reads the run's settings from
        raise GlimpseError(f"{path} holds its run's settings as {type(state['train_config']).__name__}, not the "
                           "table a run saves: it was edited or written by another program; start a new run in "
                           "another --out_dir")


def check_steps_left(state: dict, max_iters: int):
    """A resume does not end before the step it starts from: a mistyped --max_iters (80 for 800) would end the run at
    once and record the typo in its config.json. One at that step goes on to what the run has left to do there (its
    evals, the final one)."""
    step = state["iter_num"]
    if step > max_iters:
        wrote = state["train_config"].get("max_iters")
        raise GlimpseError(f"the checkpoint is at step {step:,}, past --max_iters={max_iters:,}: raise --max_iters to "
                           "go on" + (f" (the run that wrote it had {wrote:,})" if isinstance(wrote, int) else ""))


def check_resume(state: dict, model_config: GPTConfig, optimizer: str, tokenizer_spec: dict, dataset: Path):
    """A checkpoint resumes only with the same model shape, tokenizer and optimizer."""
    if state["tokenizer"] != tokenizer_spec:
        saved = state["train_config"]
        trained_on = ""  # where the run's data was, where its checkpoint says
        if "dataset" in saved and "data_dir" in saved:
            trained_on = f", {Path(saved['data_dir']) / saved['dataset']}"
        if trained_on and (Path(saved["data_dir"]) / saved["dataset"]).resolve() == Path(dataset).resolve():
            raise GlimpseError(f"dataset {dataset} was prepared again since the checkpoint was written (or is another "
                               f"folder of that name), with another tokenizer than its "
                               f"({state['tokenizer'].get('kind')}): prepare it as the run had it to resume, or start "
                               "a new out_dir")
        raise GlimpseError(f"the checkpoint's tokenizer does not match dataset {dataset}, not the one it was trained "
                           f"on{trained_on}: {SAME_SETTINGS}")
    saved_optimizer = state["train_config"].get("optimizer", "adamw")  # older checkpoints: AdamW
    if saved_optimizer != optimizer:
        raise GlimpseError(f"optimizer={optimizer} contradicts the checkpoint's optimizer={saved_optimizer}, "
                           f"whose state it could not continue; {SAME_SETTINGS}")
    saved = state["model_config"]
    for f in fields(GPTConfig):
        was = saved.get(f.name, f.default)  # a checkpoint older than the field was built with its default
        if f.name in RESUME_KEEPS and was != getattr(model_config, f.name):
            raise GlimpseError(f"{f.name}={getattr(model_config, f.name)} contradicts the checkpoint's "
                               f"{f.name}={was}; {SAME_SETTINGS}")
