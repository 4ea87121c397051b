"""
Reading a prepared dataset: meta.json plus train.bin / val.bin, memory-mapped.

A batch is B windows of block_size + 1 consecutive tokens: inputs are the first block_size, targets
the same shifted by one. Window starts come from a torch.Generator that the caller owns, so the exact
sequence of batches is part of the state a checkpoint can save and restore.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import tokenizer_from_spec
from glimpse.errors import GlimpseError


class TokenData:
    def __init__(self, folder: Path):
        meta_path = folder / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GlimpseError(
                f"{meta_path} not found: prepare the dataset with python data/prepare.py --dataset={folder.name}"
            ) from None
        except json.JSONDecodeError as e:
            raise GlimpseError(f"{meta_path} is not valid JSON ({e}); prepare the dataset again") from None
        self.folder = folder
        self.tokenizer_spec = self.meta["tokenizer"]
        self.vocab_size = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            expected = int(self.meta[f"{split}_tokens"])
            size = path.stat().st_size if path.exists() else -1
            if size != expected * dtype.itemsize:
                raise GlimpseError(
                    f"{path} does not match {meta_path} (expected {expected} {dtype.name} tokens); "
                    f"prepare the dataset again with python data/prepare.py --dataset={folder.name}"
                )
            self.splits[split] = np.memmap(path, dtype=dtype, mode="r")

    def tokenizer(self):
        return tokenizer_from_spec(self.tokenizer_spec)

    def check_block_size(self, block_size: int):
        """Each split must hold at least one whole window of block_size + 1 tokens."""
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise GlimpseError(
                    f"the {split} split of {self.folder} has {len(tokens)} tokens, fewer than "
                    f"block_size + 1 = {block_size + 1}; use a smaller --block_size or more text"
                )

    def random_starts(self, split: str, n: int, block_size: int, generator: torch.Generator):
        """n window starts drawn uniformly from the split: (n,) int64."""
        high = len(self.splits[split]) - block_size
        return torch.randint(high, (n,), generator=generator)

    def batch(self, split: str, starts: torch.Tensor, block_size: int):
        """Inputs and targets for the windows at starts: (len(starts), block_size) int64 each."""
        offsets = starts.numpy()[:, None] + np.arange(block_size + 1)  # (N, T + 1)
        window = torch.from_numpy(self.splits[split][offsets].astype(np.int64))  # (N, T + 1)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
