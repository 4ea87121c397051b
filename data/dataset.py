"""
Reading a prepared dataset: meta.json plus its shards (train_NNNNNN.bin, val_NNNNNN.bin; older datasets
hold one train.bin and one val.bin), memory-mapped.

A batch is B windows of block_size + 1 consecutive tokens: inputs are the first block_size, targets
the same shifted by one. Windows lie within one shard, drawn uniformly over every window of the split.
Window starts come from a torch.Generator that the caller owns, so the exact sequence of batches is
part of the state a checkpoint can save and restore.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.prepare import prepare_command
from data.tokenizer import tokenizer_from_spec
from glimpse.errors import GlimpseError


class TokenData:
    """A prepared dataset folder (data/prepare.py): its meta.json, its train and val shards read as memory
    maps, the tokenizer it was made with, and training's batches drawn from them."""

    def __init__(self, folder: Path):
        meta_path = folder / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GlimpseError(f"{meta_path} not found: prepare the dataset with {prepare_command(folder)}, or point "
                               "--data_dir at the folder that holds it") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # bytes that are not even UTF-8 text: no JSON either
            why = e if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise GlimpseError(f"{meta_path} is not valid JSON ({why}); prepare the dataset again with "
                               f"{prepare_command(folder)}") from None
        self.folder = folder
        try:  # a meta.json that data/prepare.py did not write (another tool's, or edited) lacks what it says
            self.tokenizer_spec = self.meta["tokenizer"]
            self.vocab_size = int(self.meta["vocab_size"])
            dtype = np.dtype(self.meta["dtype"])
            shards = self.meta.get("shards") or {
                split: [{"file": f"{split}.bin", "tokens": self.meta[f"{split}_tokens"]}] for split in ("train", "val")}
            shards = {split: [(str(s["file"]), int(s["tokens"])) for s in shards[split]] for split in ("train", "val")}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            missing = f"no {e}" if isinstance(e, KeyError) else f"a bad value ({e})"
            raise GlimpseError(f"{folder} is not a dataset data/prepare.py prepared: its meta.json has {missing}; "
                               f"prepare it with {prepare_command(folder)}") from None
        # what tells one preparation of the folder from another with the same tokenizer (a checkpoint keeps it)
        # (not its source: the same file may be named another way, --input=play.txt then /data/play.txt)
        self.prepared = {"documents": self.meta.get("documents"),
                         **{f"{split}_tokens": sum(tokens for _, tokens in shards[split]) for split in shards}}
        self.splits = {}  # split -> [memmap per shard]
        for split in ("train", "val"):
            self.splits[split] = []
            for file, tokens in shards[split]:
                path = folder / file
                size = path.stat().st_size if path.exists() else -1
                if size != tokens * dtype.itemsize:
                    raise GlimpseError(
                        f"{path} does not match {meta_path} (expected {tokens} {dtype.name} tokens; "
                        "deleted or changed since): prepare the dataset again with "
                        f"{prepare_command(folder, self.meta.get('source', ''))}"  # the input, if still there
                    )
                self.splits[split].append(np.memmap(path, dtype=dtype, mode="r"))

    def tokenizer(self):
        return tokenizer_from_spec(self.tokenizer_spec)

    def check_block_size(self, block_size: int):
        """Each split must hold at least one whole window of block_size + 1 tokens."""
        for split, shards in self.splits.items():
            longest = max(len(s) for s in shards)
            if longest < block_size + 1:
                # a window never crosses shards: short shards want bigger ones, a short val split more of the text
                where, fix = ((" in its longest shard", "prepare it again with a larger --shard_tokens")
                              if len(shards) > 1 else ("", "prepare it again with a larger --val_tokens or "
                                                       "--val_fraction" if split == "val" else "give it more text"))
                raise GlimpseError(
                    f"the {split} split of {self.folder} has {longest} tokens{where}, fewer than "
                    f"block_size + 1 = {block_size + 1}; use a smaller --block_size, or {fix}"
                )

    def tokens(self, split: str) -> SplitTokens:
        """The split's tokens as one sequence, read shard by shard as sliced: nothing is copied until then."""
        return SplitTokens(self.splits[split])

    def window_counts(self, split: str, block_size: int) -> np.ndarray:
        """(n_shards,) how many windows of block_size + 1 tokens start in each shard."""
        return np.array([max(len(s) - block_size, 0) for s in self.splits[split]], dtype=np.int64)

    def random_starts(self, split: str, n: int, block_size: int, generator: torch.Generator):
        """n windows drawn uniformly from the split's: (n,) int64 indices over the windows of all its shards."""
        high = int(self.window_counts(split, block_size).sum())
        return torch.randint(high, (n,), generator=generator)

    def batch(self, split: str, starts: torch.Tensor, block_size: int):
        """Inputs and targets for the windows at starts: (len(starts), block_size) int64 each."""
        counts = self.window_counts(split, block_size)
        ends = np.cumsum(counts)  # (n_shards,)
        starts = starts.numpy()
        shard_of = np.searchsorted(ends, starts, side="right")  # (N,)
        offsets = starts - (ends - counts)[shard_of]  # (N,) the window's start within its shard
        window = np.empty((len(starts), block_size + 1), dtype=np.int64)  # (N, T + 1)
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            window[rows] = gather_windows(self.splits[split][shard], offsets[rows], block_size + 1)
        window = torch.from_numpy(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


PREPARED_KEYS = ("documents", "train_tokens", "val_tokens")  # what TokenData.prepared records


def prepared_again(then: dict | None, now: dict) -> str:
    """How a dataset folder's preparation differs from the one a checkpoint recorded (TokenData.prepared): "" when
    its counts do not, or the checkpoint holds no record (older, or not a run's); else its counts then and now."""
    if not isinstance(then, dict) or all(then.get(key) == now.get(key) for key in PREPARED_KEYS):
        return ""
    number = lambda value: f"{value:,}" if isinstance(value, int) else str(value)  # noqa: E731
    documents = then.get("documents") != now.get("documents")  # named only when they differ

    def counts(p: dict) -> str:
        return (f"{number(p.get('documents'))} documents, " if documents else "") + \
            f"{number(p.get('train_tokens'))} train and {number(p.get('val_tokens'))} val tokens"

    return f"{counts(then)} then, {counts(now)} now"


class SplitTokens:
    """A split's shards as one sequence of tokens: len() and [start:stop] (an array), reading only the shards
    that the slice touches, so that a snapshot's attn_probe_tokens or an eval's next windows never copy the whole
    split."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.ends = np.cumsum([len(s) for s in shards], dtype=np.int64)  # (n_shards,) where each shard ends

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("SplitTokens takes a slice, tokens[start:stop]")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("SplitTokens takes a slice with no step")
        parts = []
        for shard, end in zip(self.shards, self.ends):
            begin = end - len(shard)
            if start < end and stop > begin:
                parts.append(shard[max(start - begin, 0):min(stop, end) - begin])
        if len(parts) == 1:
            return parts[0]  # a view of the shard itself
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.shards[0].dtype)


def gather_windows(tokens: np.ndarray | SplitTokens, starts: np.ndarray, length: int) -> np.ndarray:
    """tokens[s : s + length] for each start s: (len(starts), length) int64. Only the span from the first start
    to the last window's end is read."""
    if len(starts) == 0:
        return np.empty((0, length), dtype=np.int64)
    low = int(starts.min())
    span = tokens[low:int(starts.max()) + length]
    return span[(starts - low)[:, None] + np.arange(length)].astype(np.int64)
