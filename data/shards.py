"""
Writing a dataset's shards: documents routed whole to train or val, tokens cut into fixed-size shard
files, progress kept so that a killed run can go on, and meta.json written last.

A run works in a staging folder beside the dataset (NAME/.preparing-HOST/, one per host so that nodes
on a shared filesystem never meet). Each shard goes to a temporary name and is renamed when complete;
after every finished shard, progress.json (the position in the corpus and how many tokens the
open shards hold, in one file replaced in one step) says where a rerun starts. publish() moves the shards over
an older dataset's and writes meta.json last, so an older dataset stays whole until then.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

from data.tokenizer import Tokenizer
from glimpse.errors import GlimpseError
from glimpse.files import write_atomic

WRITE_BUFFER = 1 << 20  # bytes gathered before a write to the shard file: few system calls per shard
HELD_SLICE = 1 << 22  # tokens of the first document copied at a time from its file to the shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


class ShardWriter:
    """One split's tokens, written as shards of `size` tokens.

    Tokens go straight to the open shard's file (SPLIT_NNNNNN.bin.partial), which is renamed when it
    holds `size` tokens: memory holds no shard, whatever its size. A resumed writer cuts its partial
    file back to the `partial` tokens that the last saved progress counted.
    """

    def __init__(self, folder: Path, split: str, size: int, dtype: np.dtype, shards=(), partial: int = 0):
        self.folder, self.split, self.size, self.dtype = folder, split, size, dtype
        self.shards = list(shards)  # [{"file": ..., "tokens": ...}]
        self.filled, self.file = partial, None
        if partial:
            self.file = open(self.partial_path(), "r+b", buffering=WRITE_BUFFER)
            if self.file.seek(0, os.SEEK_END) < partial * dtype.itemsize:
                raise ValueError(f"{self.partial_path().name} is shorter than saved")
            self.file.truncate(partial * dtype.itemsize)
            self.file.seek(0, os.SEEK_END)

    def partial_path(self) -> Path:
        return self.folder / f"{self.split}_{len(self.shards):06d}.bin.partial"

    @property
    def count(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.filled

    def append(self, ids: np.ndarray):
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        while len(ids):
            take = min(len(ids), self.size - self.filled)
            if self.file is None:
                self.file = open(self.partial_path(), "wb", buffering=WRITE_BUFFER)
            self.file.write(ids[:take].data)
            self.filled += take
            ids = ids[take:]
            if self.filled == self.size:
                self.flush()

    def flush(self):
        """Finish the open shard: its file gets its final name."""
        if self.filled:
            self.file.close()
            name = f"{self.split}_{len(self.shards):06d}.bin"
            os.replace(self.partial_path(), self.folder / name)
            self.shards.append({"file": name, "tokens": self.filled})
            self.filled, self.file = 0, None

    def sync(self):
        """Put the open shard's tokens on disk, so that a saved progress can count on them."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())


class Held:
    """The first document's tokens, in a file beside the shards rather than in memory, until it is known
    whether another document follows; read back a slice of HELD_SLICE tokens at a time."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, dtype, 0
        self.file = open(path, "wb", buffering=WRITE_BUFFER)

    def append(self, ids: np.ndarray):
        self.file.write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        self.count += len(ids)

    def slices(self, start: int, stop: int):
        self.file.close()
        for i in range(start, stop, HELD_SLICE):  # read, not mapped: mapped pages would count as the process's
            yield np.fromfile(self.path, self.dtype, count=min(HELD_SLICE, stop - i), offset=i * self.dtype.itemsize)

    def drop(self):
        self.file.close()
        self.path.unlink(missing_ok=True)


class Router:
    """Sends each document, whole, to val or train, with the separator between documents of a split.

    A document starts at its first token: an empty one (a blank row of a table) is no document, neither
    counted nor separated. The first document waits for the second, on disk: a corpus of one document is split by
    its tokens instead.
    """

    def __init__(self, writers: dict[str, ShardWriter], separator: np.ndarray, val_tokens: int, val_fraction: float,
                 docs: int = 0, split: str | None = None):
        self.writers, self.separator, self.docs = writers, separator, docs
        self.val_tokens, self.val_fraction = val_tokens, val_fraction
        # the fraction as written (0.1 as 1/10, not the float just above it), so that whole multiples come out exact
        self.val_share = Fraction(repr(val_fraction))
        val = writers["val"]
        self.held = Held(val.folder / "first_document.bin", val.dtype) if docs == 0 else None
        self.split = split  # where the document being added goes
        self.opening = False  # a document has begun and no token of it has come yet
        self.empty = 0  # documents without a token, for the message of a corpus that holds none

    def add(self, ids: np.ndarray, starts_doc: bool):
        if starts_doc:
            self.empty += self.opening
            self.opening = True
        if not len(ids):
            return
        if self.opening:
            self.opening, starts_doc = False, True
            if self.docs == 1 and self.held is not None:
                self.release("val", 0, self.held.count)  # the first document is validation's
                self.held.drop()
                self.held = None
            self.split = self.assign(self.docs)
            self.docs += 1
        if self.held is not None:
            self.held.append(ids)
        else:
            self.emit(self.split, ids, starts_doc)

    def release(self, split: str, start: int, stop: int):
        """Held tokens start:stop to split, as one document."""
        for i, ids in enumerate(self.held.slices(start, stop)):
            self.emit(split, ids, i == 0)

    def assign(self, doc: int) -> str:
        """Where document number doc goes: the first ones until they hold val_tokens (the last may go past), or
        else a val_fraction of them spread evenly, the first n documents holding ceil(n * val_fraction) for
        validation (doc 0, 10, 20, ... at 0.1)."""
        if self.val_tokens:
            return "val" if self.writers["val"].count < self.val_tokens else "train"
        return "val" if math.ceil((doc + 1) * self.val_share) > math.ceil(doc * self.val_share) else "train"

    def emit(self, split: str, ids: np.ndarray, starts_doc: bool):
        writer = self.writers[split]
        if starts_doc and writer.count:
            writer.append(self.separator)
        writer.append(ids)

    def close(self):
        """Close the open files of a preparation stopped part-way (a rerun cuts them back to its saved progress);
        on a full disk the tokens still in their buffers are lost with them."""
        files = [writer.file for writer in self.writers.values()] + [self.held.file if self.held else None]
        for file in files:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()

    def finish(self, source: str):
        self.empty += self.opening
        if self.held is not None and not self.held.count:  # not one token in the whole corpus
            self.held.drop()
            many = self.empty > 1  # documents, so perhaps a table whose text is in another field
            raise GlimpseError(f"{source} holds no text" + (f" ({self.empty:,} documents, all empty)" if many else "")
                               + ": point --input at the corpus"
                               + (", or --text_column at the field that holds it" if many else ""))
        if self.held is not None:  # one document: validation is its last tokens
            n = self.held.count
            n_val = min(self.val_tokens or n - int(n * (1 - self.val_fraction)), n)
            self.release("train", 0, n - n_val)
            self.release("val", n - n_val, n)
            self.held.drop()
        documents = f"{self.docs:,} document{'s' if self.docs != 1 else ''}"
        for split, writer in self.writers.items():
            writer.flush()
            if not writer.count:
                cause = "--val_tokens" if self.val_tokens else "--val_fraction"  # the one that decided the split
                raise GlimpseError(f"{source} gives no {split} tokens ({documents}): "
                                   + (f"lower {cause}" if split == "train" else f"raise {cause}"))


class Progress:
    """What a run has finished, in its staging folder: enough for a rerun to go on where it stopped."""

    def __init__(self, staging: Path, settings: dict, dtype: np.dtype, writers: dict, items=0, docs=0,
                 split: str | None = None):
        self.staging, self.settings, self.dtype, self.writers = staging, settings, dtype, writers
        self.items, self.docs, self.split = items, docs, split  # split: where the document in progress goes

    @classmethod
    def resume(cls, staging: Path, settings: dict, dtype: np.dtype, size: int) -> Progress:
        try:
            state = json.loads((staging / "progress.json").read_text(encoding="utf-8"))
            if state["settings"] != settings:
                raise ValueError("another corpus or other settings")
            for shard in (shard for s in state["splits"].values() for shard in s["shards"]):
                if (staging / shard["file"]).stat().st_size != shard["tokens"] * dtype.itemsize:
                    raise ValueError(f"{shard['file']} changed")
            writers = {split: ShardWriter(staging, split, size, dtype, s["shards"], s["partial"])
                       for split, s in state["splits"].items()}
            return cls(staging, settings, dtype, writers, state["items"], state["docs"], state["split"])
        except (OSError, ValueError, KeyError, TypeError):  # nothing to resume, or not this run: start afresh
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            return cls(staging, settings, dtype, {s: ShardWriter(staging, s, size, dtype) for s in ("train", "val")})

    def shards_kept(self) -> int:
        return sum(len(w.shards) for w in self.writers.values())

    def save(self, docs: int, split: str | None):
        """One file, replaced in one step, after the open shards' tokens are on disk: the position in the
        corpus and the tokens it counts always agree. A rerun may start inside a document: split says where
        the rest of it goes."""
        for w in self.writers.values():
            w.sync()
        splits = {split: {"shards": w.shards, "partial": w.filled} for split, w in self.writers.items()}
        state = {"settings": self.settings, "items": self.items, "docs": docs, "split": split, "splits": splits}
        write_atomic(self.staging / "progress.json",
                     lambda tmp: tmp.write_text(json.dumps(state) + "\n", encoding="utf-8"))


def publish(out: Path, staging: Path, writers: dict[str, ShardWriter], meta: dict):
    """Move the finished shards from staging into out in place of an older dataset, and meta.json last."""
    (out / "meta.json").unlink(missing_ok=True)  # the dataset is incomplete until meta.json is back
    for old in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), out / "train.bin", out / "val.bin"]:
        old.unlink(missing_ok=True)
    for w in writers.values():
        for shard in w.shards:
            os.replace(staging / shard["file"], out / shard["file"])
    meta["shards"] = {split: w.shards for split, w in writers.items()}
    meta.update({f"{split}_tokens": w.count for split, w in writers.items()})
    write_atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8"))
    shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens in "
          f"{sum(len(w.shards) for w in writers.values())} shards, {meta['documents']:,} "
          f"document{'s' if meta['documents'] != 1 else ''}, "
          f"vocabulary {meta['vocab_size']:,} ({meta['tokenizer']['kind']})", file=sys.stderr)


def write_dataset(out: Path, tokenizer: Tokenizer, ids: np.ndarray, source: str, val_fraction: float = 0.1,
                  shards: int = 1):
    """A dataset of one document given as token ids (bench.py's random tokens): its last tokens are val, and
    each split is cut into `shards` shards of equal size."""
    staging = out / f".preparing-{socket.gethostname()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    n_train = int(len(ids) * (1 - val_fraction))
    writers = {}
    for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
        writers[split] = ShardWriter(staging, split, max(-(-len(part) // shards), 1), dtype)
        writers[split].append(part.astype(dtype))
        writers[split].flush()
    publish(out, staging, writers, {"tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size,
                                    "dtype": dtype.name, "source": source, "documents": 1})

