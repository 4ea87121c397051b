"""
A GPT-2 style decoder-only transformer you can look inside.

Reading order: GPTConfig -> CausalSelfAttention (queries, keys, values, the causal mask, softmax
weights, context vectors) -> MLP -> Block -> GPT -> KVCache and GPT.generate.

Attention has two paths through one module. The fast path calls F.scaled_dot_product_attention,
which on GPU runs a fused flash kernel that never materialises the (T, T) weights. The explicit path
writes out softmax(QK^T / sqrt(d) + mask) V step by step and hands the weights back; it is taken only
when a caller asks for them (GPT.forward_with_attention), so training pays nothing for it.

This file holds the model and nothing else: no I/O, no argv, no prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """The shape of the network. Defaults are GPT-2 small (124M parameters)."""

    block_size: int = 1024  # longest context the model sees (learned positions stop here)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has them

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of the tokens already seen, one slot per position of the context window.

    Generation feeds one new token at a time; without a cache every step would recompute the keys and
    values of the whole window. `length` counts the filled positions; GPT.forward advances it after
    every layer has written its part.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype=torch.float32):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys and values; return all keys and values seen so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs) each


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends only to itself and earlier ones."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        # queries, keys and values for all heads come from one matrix multiply
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        # split the channels into heads: each head attends with its own slice
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs) each
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            y, weights = self._explicit_attention(q, k, v, past, dropout_p)
        else:
            weights = None
            if past == 0:
                # SDPA's is_causal mask is aligned to the top-left corner, right when queries == keys
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:
                # one new query at the end of the window may see every cached key: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                mask = causal_mask(T, past + T, past, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), weights

    def _explicit_attention(self, q, k, v, past: int, dropout_p: float):
        """softmax(QK^T / sqrt(d) + mask) V written out, returning the post-softmax weights too."""
        T, S = q.size(2), k.size(2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        # the causal mask: query i may not see keys after it, so their weight must be exactly 0
        scores = scores.masked_fill(~causal_mask(T, S, past, q.device), float("-inf"))
        weights = F.softmax(scores, dim=-1)  # (B, nh, T, S), each row sums to 1
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        y = dropped @ v  # (B, nh, T, hs): each query's context vector
        return y, weights


def causal_mask(n_queries: int, n_keys: int, offset: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where query i (at position offset + i) may attend to key j."""
    query_pos = torch.arange(n_queries, device=device)[:, None] + offset  # (T, 1)
    key_pos = torch.arange(n_keys, device=device)[None, :]  # (1, S)
    return key_pos <= query_pos  # (T, S)


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU, so exchanged weights behave the same
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, need_weights=False):
        attn_out, weights = self.attn(self.ln_1(x), cache, layer, need_weights)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class Step(NamedTuple):
    """One generated token and what it was predicted from."""

    token: torch.Tensor  # (B, 1) the sampled token ids
    logits: torch.Tensor  # (B, vocab_size) the logits it was sampled from, before temperature
    window_start: int  # the logits are those of a forward over tokens[:, window_start:] so far


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: reading a token in and writing it out share one matrix (fewer parameters,
        # and GPT-2 was trained this way)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default, as GPT-2's paper counts."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None)."""
        x, _ = self._trunk(idx, cache, need_weights=False)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_with_attention(self, idx):
        """Like forward, but through the explicit path: (logits (B, T, V), weights).

        weights is (n_layer, B, n_head, T, T): post-softmax, rows are queries, columns keys.
        """
        x, weights = self._trunk(idx, None, need_weights=True)
        return self.lm_head(x), torch.stack(weights)

    def _trunk(self, idx, cache: KVCache | None, need_weights: bool):
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"cannot attend over {past + T} tokens: block_size is {self.config.block_size}"
            )
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        weights = []
        for layer, block in enumerate(self.transformer.h):
            x, w = block(x, cache, layer, need_weights)
            weights.append(w)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x), weights  # (B, T, C)

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Step]:
        """Yield max_new_tokens Steps, each one sampled token (B, 1) continuing idx (B, T).

        The KV cache covers one context window. When it is full, the window slides: the cache is
        refilled from the most recent half of the window (one batched forward) and generation goes
        on. Keys of deeper layers depend on every earlier token of the window, so the oldest entry
        cannot simply be dropped. Every Step's logits therefore equal a full forward over exactly
        tokens[:, window_start:] as they stood when it was sampled; the context seen oscillates
        between half a window and a full one.
        """
        block_size = self.config.block_size
        keep = max(1, block_size // 2)  # tokens kept when the window slides
        tokens = idx
        dtype = next(self.parameters()).dtype
        cache = KVCache(self.config, idx.size(0), idx.device, dtype)
        window_start = max(0, tokens.size(1) - block_size)
        logits = None
        for _ in range(max_new_tokens):
            if logits is None:  # the first step: prefill the cache with the prompt's window
                logits = self(tokens[:, window_start:], cache=cache)[0][:, -1]
            elif cache.length == block_size:  # full: slide by refilling from the recent half
                cache.length = 0
                window_start = tokens.size(1) - keep
                logits = self(tokens[:, window_start:], cache=cache)[0][:, -1]
            else:  # the usual step: only the newest token goes through the network
                logits = self(tokens[:, -1:], cache=cache)[0][:, -1]
            logits = logits.float()  # (B, vocab_size)
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield Step(token, logits, window_start)
            tokens = torch.cat((tokens, token), dim=1)


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
