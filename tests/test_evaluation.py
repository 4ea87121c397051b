"""Scoring a model over a whole split: length_loss against a plain loop over windows."""

import contextlib

import numpy as np
import pytest
import torch

from glimpse.evaluation import length_loss
from model import GPT, GPTConfig


def loss_by_hand(model, tokens: np.ndarray, length: int, step: int, scored: int, max_tokens: int):
    """Windows of `length` tokens starting every `step` tokens, scoring each window's last `scored` predictions
    until max_tokens are scored: the mean of -log softmax(logits)[next token], and how many were scored."""
    losses = []
    for start in range(0, len(tokens) - length, step):  # the window's last target is tokens[start + length]
        if len(losses) >= max_tokens:
            break
        window = torch.from_numpy(tokens[start:start + length + 1].astype(np.int64))
        log_probs = model(window[None, :-1])[0][0].log_softmax(dim=-1)  # (length, V)
        for pos in range(length - scored, length):
            losses.append(-log_probs[pos, window[pos + 1]].item())
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("mode, stride, max_tokens, batch_size", [
    ("windows", 12, 100, 3), ("sliding", 4, 100, 3), ("sliding", 7, 100, 3), ("sliding", 4, 30, 3),
    ("sliding", 4, 100, 1), ("windows", 12, 100, 1)])
def test_length_loss_scores_the_tokens_each_mode_says(mode, stride, max_tokens, batch_size):
    """windows scores every token of non-overlapping windows; sliding moves by stride and scores only the
    last stride tokens of each window. Catches sliding mode scoring whole windows (which counts the same
    tokens several times, most of them with little context), and the filling of a last batch (every case
    has a window count that batches of 3 do not divide) being scored."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, 100).astype(np.uint16)
    length = 12
    step, scored = (length, length) if mode == "windows" else (stride, stride)
    with torch.no_grad():
        expected, expected_count = loss_by_hand(model, tokens, length, step, scored, max_tokens)
    loss, count = length_loss(model, tokens, length, mode, stride, max_tokens, batch_size, "cpu",
                              contextlib.nullcontext())
    assert count == expected_count
    assert loss == pytest.approx(expected, rel=1e-5)
