"""
Generating text with a model: the KV cache, the loop that fills it and slides the window, and picking
each next token.

generate() prefills a KVCache with the prompt, feeds one new token at a time through the network, and
hands each step's logits to sample_next. It takes any GPT of model.py (this module does not import
model, which imports the KV cache from here).
"""

from __future__ import annotations

from collections.abc import Iterator
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
    values of the whole window. `length` counts the filled positions; GPT.trunk advances it after
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
    # a tiny temperature (1e-40) took logits / temperature to inf and softmax to NaN. Shifted so that each row's
    # largest logit is 0, the others go to -inf instead, and sampling tends to greedy as it should; the largest stay
    # 0 undivided, as a temperature below float32's smallest number (5e-324) is 0 to it, and 0 / 0 is NaN. A NaN
    # logit (a blown-up model) stays NaN, for sampling to refuse rather than draw from a row made uniform
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # (B, V)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V) each
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        # drop a token when the tokens before it already reach top_p; the likeliest always stays
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False  # also where top_p is 0 to float32 (1e-300), when 0 >= top_p held for it
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.inference_mode()  # like no_grad, and cheaper per op: generation is overhead-bound on a CPU
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, heads=None,
             vocab_size: int | None = None) -> Iterator[Step]:
    """Yield max_new_tokens Steps of model (a GPT), each one sampled token (B, 1) continuing idx (B, T).

    The KV cache covers one context window. When it is full, the window slides: the cache is
    refilled from the most recent half of the window (one batched forward) and generation goes
    on. Keys of deeper layers depend on every earlier token of the window, so the oldest entry
    cannot simply be dropped. Every Step's logits therefore equal a full forward over exactly
    tokens[:, window_start:] as they stood when it was sampled; the context seen oscillates
    between half a window and a full one. heads: a HeadEdit (glimpse/self_attention.py) applied at every step.
    vocab_size: the tokenizer's; the ids past it of a vocabulary padded for speed (GPT-2's 50,257 to 50,304) are
    never sampled, as no tokenizer could write them out: their logits in the Steps are -inf.
    """
    block_size = model.config.block_size
    keep = max(1, block_size // 2)  # tokens kept when the window slides
    tokens = idx
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, idx.size(0), idx.device, dtype)
    window_start = max(0, tokens.size(1) - block_size)
    logits = None
    for _ in range(max_new_tokens):
        if logits is None:  # the first step: prefill the cache with the prompt's window
            logits = model(tokens[:, window_start:], cache=cache, heads=heads, last_only=True)[0][:, -1]
        elif cache.length == block_size:  # full: slide by refilling from the recent half
            cache.length = 0
            window_start = tokens.size(1) - keep
            logits = model(tokens[:, window_start:], cache=cache, heads=heads, last_only=True)[0][:, -1]
        else:  # the usual step: only the newest token goes through the network
            logits = model(tokens[:, -1:], cache=cache, heads=heads)[0][:, -1]
        logits = logits.float()  # (B, vocab_size)
        if vocab_size is not None:  # a padded vocabulary: its padding is no token (this step's own logits)
            logits[:, vocab_size:] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        yield Step(token, logits, window_start)
        tokens = torch.cat((tokens, token), dim=1)
