"""
Scoring a model on a whole token split, in windows of a given length; shared by eval.py and train.py.

    windows   non-overlapping windows, every token scored
    sliding   windows moved by `stride`, only each window's last `stride` tokens scored, so every scored
              token sees at least length - stride tokens of context
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from glimpse.errors import GlimpseError

MODES = ("windows", "sliding")


@torch.inference_mode()  # like no_grad, and less bookkeeping per op: nothing here is trained
def length_loss(model, tokens: np.ndarray, length: int, mode: str, stride: int, max_tokens: int,
                batch_size: int, device, ctx) -> tuple[float, int]:
    """Mean loss (nats per token) over up to max_tokens scored tokens, and how many were scored."""
    step, scored_from = (length, 0) if mode == "windows" else (stride, length - stride)
    last_start = len(tokens) - length - 1
    if last_start < 0:
        raise GlimpseError(f"the validation split has {len(tokens)} tokens, too few for a context of {length}")
    per_window = length - scored_from
    n_windows = min(last_start // step + 1, math.ceil(max_tokens / per_window))
    starts = np.arange(n_windows) * step
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        offsets = starts[i:i + batch_size, None] + np.arange(length + 1)  # (b, L + 1)
        window = torch.from_numpy(tokens[offsets].astype(np.int64)).to(device)  # (b, L + 1)
        with ctx:
            logits, _ = model(window[:, :-1])  # (b, L, V)
        losses = F.cross_entropy(logits[:, scored_from:].float().transpose(1, 2), window[:, scored_from + 1:],
                                 reduction="sum")
        total += losses.item()
        count += window.size(0) * per_window
    return total / count, count
