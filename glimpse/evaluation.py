"""
Scoring a model on held-out tokens: a quick estimate on a few fixed batches (train.py's evals), and
the whole split in windows of a given length (eval.py, and train.py's final score).

    windows   non-overlapping windows, every token scored
    sliding   windows moved by `stride`, only each window's last `stride` tokens scored, so every scored
              token sees at least length - stride tokens of context

Over a whole split, the tokens after the last window that fits (fewer than a window's worth) are scored too,
by one more window that ends where the split does, scoring only them. Scoring several lengths, eval.py starts
each at the first token the longest one can score with its full context and scores the same number at each, so
that every length scores the same text.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import gather_windows
from glimpse.errors import GlimpseError
from glimpse.runtime import sum_dtype

MODES = ("windows", "sliding")
BATCH_SIZE = 8  # windows per forward pass when scoring windows: eval.py's --batch_size, bench.py's head removal


def window_starts(n_tokens: int, length: int, step: int, max_windows: int) -> np.ndarray:
    """Where windows of length + 1 tokens (inputs and their targets) start, step apart, at most max_windows."""
    last_start = n_tokens - length - 1
    if last_start < 0:
        raise GlimpseError(f"the validation split has {n_tokens:,} tokens, too few for a context of {length:,}: "
                           "score shorter contexts (eval.py's --lengths)")
    return np.arange(min(last_start // step + 1, max_windows)) * step


def context(length: int, mode: str, stride: int) -> int:
    """The context every target a window of this length scores has at least: none in non-overlapping windows,
    length - stride in sliding ones."""
    return 0 if mode == "windows" else length - stride


def first_target(lengths: list[int], mode: str, stride: int) -> int:
    """The first target (tokens[i]) that windows of every one of lengths can score with its full context: scoring
    from there, each length scores the same text, so that their losses differ by the context alone."""
    return max(context(length, mode, min(stride, length)) for length in lengths) + 1


def scored_windows(n_tokens: int, length: int, mode: str, stride: int, max_tokens: int, first: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, scored_from, scored_to), (W,) each: the windows of mode that score the targets tokens[first:first +
    max_tokens] (to the split's end), and which of each window's targets they are, positions scored_from to
    scored_to - 1 (the ones before are context). first: by default the first one this length can score.

    Windows take the targets in turns of `step` (stride, or the whole window), each with its context before it; a
    turn that would run past the split's end is scored by a window that ends with the split."""
    step = length if mode == "windows" else stride  # targets per window
    ahead = context(length, mode, stride)
    first = ahead + 1 if first is None else first
    if first <= ahead:
        raise ValueError(f"a window of {length} tokens scores no target before tokens[{ahead + 1}], not {first}")
    if n_tokens - 1 - max(length, first) < 0:  # no window fits, or no target is left after the context
        raise GlimpseError(f"the validation split has {n_tokens:,} tokens, too few for a context of "
                           f"{max(length, first - 1):,}: score shorter contexts (eval.py's --lengths)")
    turn = np.arange(first, min(n_tokens, first + max_tokens), step)  # (W,) each window's first target
    end = np.minimum(turn + step, first + max_tokens)  # (W,) one past its last
    starts = np.minimum(turn - ahead - 1, n_tokens - 1 - length)  # (W,) the last target is tokens[start + length]
    return starts, turn - starts - 1, np.minimum(end, n_tokens) - starts - 1


def windows(tokens: np.ndarray, length: int, max_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows over the start of tokens, about max_tokens in all: inputs, targets (N, L) each."""
    starts = window_starts(len(tokens), length, length, math.ceil(max_tokens / length))
    window = torch.from_numpy(gather_windows(tokens, starts, length + 1)).to(device)
    return window[:, :-1], window[:, 1:]  # (N, L) each


@torch.no_grad()  # not inference_mode: a compiled model would need a graph of its own for inference tensors
def length_loss(model, tokens: np.ndarray, length: int, mode: str, stride: int, max_tokens: int,
                batch_size: int, device, ctx, *, first: int | None = None, ddp=None, show_progress: bool = False,
                desc: str = "") -> tuple[float, int]:
    """Mean loss (nats per token) over up to max_tokens targets from tokens[first] (scored_windows), and how many
    were scored.

    Each batch goes through the model as the evals' batches do, inputs and targets of batch_size windows, the
    model scoring the targets it is given: the last batch is filled up with windows whose targets are all
    ignored, and the targets a window does not score are ignored, so that a compiled model scores the
    whole split on the graph its evals made (at the same batch size), with no shape of its own to compile.
    Under DDP (ddp, a distributed.Distributed) each process scores every world_size-th window and the
    sums are added up, so a split of any size costs each process its share only. show_progress: a progress bar
    over the windows on a terminal (long lengths are long work on a CPU: docs/length.md), named desc or by the
    windows' mode and length.
    """
    starts, scored_from, scored_to = scored_windows(len(tokens), length, mode, stride, max_tokens, first)
    mine = range(len(starts)) if ddp is None else ddp.share(range(len(starts)))  # in lockstep, padded with None
    sums = torch.zeros(2, dtype=sum_dtype(device), device=device)  # (summed loss, tokens scored)
    bar = tqdm(total=sum(w is not None for w in mine), desc=desc or f"{mode}, {length:,} tokens", unit="window",
               leave=False, disable=None if show_progress else True)  # None: shown on a terminal only
    with bar:
        for i in range(0, len(mine), batch_size):
            batch = [w for w in mine[i:i + batch_size] if w is not None]
            n = len(batch)  # windows scored; a process whose share ran out still joins the others' forward
            window = torch.from_numpy(gather_windows(tokens, starts[batch + [0] * (batch_size - n)], length + 1))
            x = window[:, :-1].contiguous().to(device)  # (B, L)
            # a copy of its own: for one window, contiguous() would give a view into x's memory, and -1 written there
            y = window[:, 1:].clone(memory_format=torch.contiguous_format)  # (B, L)
            lo, hi = torch.zeros(batch_size, 1, dtype=torch.int64), torch.zeros(batch_size, 1, dtype=torch.int64)
            lo[:n, 0], hi[:n, 0] = torch.from_numpy(scored_from[batch]), torch.from_numpy(scored_to[batch])  # (B, 1)
            position = torch.arange(length)  # (L,)
            y[(position < lo) | (position >= hi)] = -1  # context, targets past max_tokens, and the filling (lo = hi)
            count = int((hi - lo).sum())
            with ctx:
                _, loss = model(x, y.to(device))  # the mean over the targets not ignored
            if count:
                sums[0] += loss.to(sums.dtype) * count
                sums[1] += count
            bar.update(n)
    if ddp is not None:
        sums = ddp.sum(sums)
    total, count = sums.tolist()
    return total / count, int(count)


@torch.no_grad()
def estimate_loss(model, data, cfg, device, ctx, ddp) -> dict[str, float]:
    """Mean loss on the same cfg.eval_iters batches of each split of data (a TokenData) every time.

    Fixed batches make successive evals comparable: a change in the number is the model's, not the
    sample's. Under DDP the batches are shared out between processes and the losses averaged.
    """
    out = {}
    with evaluating(model):
        for split in ("train", "val"):
            out[split] = split_estimate(model, data, split, cfg, device, ctx, ddp)
    return out


@torch.no_grad()
def split_estimate(model, data, split: str, cfg, device, ctx, ddp) -> float:
    """The mean loss on one split's cfg.eval_iters fixed batches, each process its share."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    starts = data.random_starts(split, cfg.eval_iters * cfg.batch_size, cfg.model.block_size, gen)
    total = torch.zeros((), device=device)
    for i in ddp.share(range(cfg.eval_iters)):
        if i is None:
            idle_forward(model, device, ctx, (cfg.batch_size, cfg.model.block_size))
            continue
        x, y = data.batch(split, starts[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.model.block_size)
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    return (ddp.sum(total) / cfg.eval_iters).item()


def idle_forward(model, device, ctx, shape: tuple[int, int] = (1, 1)):
    """A forward whose result is thrown away: how a process in lockstep (Distributed.share) whose share has run
    out, or whose item is skipped, joins the collectives of the others' forwards. Inputs and targets (all
    ignored) of the shape the others score, as they pass them, so that a compiled model runs a graph it has."""
    x = torch.zeros(shape, dtype=torch.long, device=device)
    with ctx:
        model(x, torch.full_like(x, -1))


@contextmanager
def evaluating(model):
    """model in eval mode inside the block, and back in the mode it was in after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
