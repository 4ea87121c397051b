"""
What generation needs besides the network: the KV cache, one step's record, and picking the next token.

GPT.generate (model.py) runs the loop: it fills a KVCache, feeds one new token at a time through the
network, and hands each step's logits to sample_next.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class CacheShape(Protocol):
    """What a KVCache needs of a model's config (model.py's GPTConfig has it): no import of model, which
    imports this module."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int


class KVCache:
    """Keys and values of the tokens already seen, one slot per position of the context window.

    Generation feeds one new token at a time; without a cache every step would recompute the keys and
    values of the whole window. `length` counts the filled positions; GPT.forward advances it after
    every layer has written its part.
    """

    def __init__(self, config: CacheShape, batch_size: int, device, dtype=torch.float32):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.last_embedding: torch.Tensor | None = None  # (B, 1, C): the newest token's, for the smear

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys and values; return all keys and values seen so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs) each


class Step(NamedTuple):
    """One generated token and what it was predicted from."""

    token: torch.Tensor  # (B, 1) the sampled token ids
    logits: torch.Tensor  # (B, vocab_size) the logits it was sampled from, before temperature
    window_start: int  # the logits are those of a forward over tokens[:, window_start:] so far


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample.

    top_k keeps the k likeliest tokens; top_p keeps the smallest set whose probability reaches p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V) each
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        # drop a token when the tokens before it already reach top_p; the likeliest always stays
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
