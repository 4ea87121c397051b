"""
Causal multi-head self-attention: the layer every block of model.py starts with, written to be read.

Each head projects every token to a query, a key and a value; scores each (query, key) pair (scaled
dot product, plain dot product, or Bahdanau's additive score); masks the future (glimpse/masks.py);
turns a query's scores into softmax weights; and returns the weighted sum of the values, the query's
context vector. c_proj then mixes the heads' context vectors back into the residual stream.

Attention has two paths through one module. The fast path calls F.scaled_dot_product_attention,
which on GPU runs a fused flash kernel that never materialises the (T, T) weights. The explicit path
writes out softmax(scores + mask) V step by step and hands the weights back; it is taken when a
caller asks for the weights (GPT.forward_with_attention), and for additive scores, which no fused
kernel computes. Training with the default scores pays nothing for it.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from glimpse.generation import KVCache
from glimpse.layers import NORM_EPS, RMSNorm, fused_attention, make_dropout
from glimpse.masks import Masks
from glimpse.positions import alibi_slopes, rotate


class AttentionShape(Protocol):
    """What the layer needs of a model's config (model.py's GPTConfig has it): no import of model, which
    imports this module."""

    n_embd: int
    n_head: int
    dropout: float
    bias: bool
    attn_score: str
    pos_encoding: str
    qk_norm: bool


class HeadEdit(Protocol):
    """Something that sees each layer's per-head context vectors and returns them, changed or not."""

    def edit(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """y (B, nh, T, hs): the heads' context vectors at one layer, before c_proj mixes them."""
        ...


class Tap(Protocol):
    """Something that sees each step of the explicit path as the model computes it (glimpse/mechanism.py
    records them): nothing is computed a second time for it."""

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor,
                  weights: torch.Tensor, projected: tuple[torch.Tensor, torch.Tensor],
                  normed: tuple[torch.Tensor, torch.Tensor] | None):
        """q (B, nh, T, hs) and k (B, nh, S, hs) as the scores use them (after qk_norm and rope), v (B, nh, S, hs)
        as the weights sum it, S = T without a KV cache (trace() uses none), the past's positions too with one;
        scores (B, nh, T, S) before the mask (ALiBi's penalty added); weights (B, nh, T, S), the softmax's.
        projected: (q, k) as c_attn made them, before qk_norm and rope; normed: after qk_norm, before rope (None
        without it). Both cover this forward's T positions only."""
        ...

    def block(self, layer: int, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor):
        """x (B, T, C) the residual stream entering block `layer`, y (B, nh, T, hs) its heads' context
        vectors, out (B, T, C) the stream it hands on."""
        ...


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends only to itself and earlier ones.

    Self-attention: queries, keys and values all come from the same sequence (in encoder-decoder
    attention, the queries come from another). Each head scores every (query, key) pair, turns a
    query's scores into weights with a softmax, and returns the weighted sum of the values: the
    query's context vector.

    It runs in two halves, which a Block (model.py) calls in turn: context() computes every head's context
    vectors, project() mixes them into the attention's output. Between the two, the heads are apart, which is
    where head removal edits them and the mechanism's trace reads them.
    """

    def __init__(self, config: AttentionShape):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.score_kind = config.attn_score  # scores() computes them
        self.pos_encoding = config.pos_encoding
        # queries, keys and values for all heads come from one matrix multiply
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = make_dropout(config.dropout)
        # Bahdanau: w^T tanh(A q + B k), with its own A, B, w (score_q, score_k, score_v) per head
        if self.score_kind == "additive":
            hs = self.head_dim
            self.score_q = nn.Parameter(torch.randn(self.n_head, hs, hs) / math.sqrt(hs))
            self.score_k = nn.Parameter(torch.randn(self.n_head, hs, hs) / math.sqrt(hs))
            self.score_v = nn.Parameter(torch.randn(self.n_head, hs) * 0.02)
        if self.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.n_head), persistent=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            # RMSNorm over each head's channels, with a learned gain per channel shared by the heads. Unit-RMS
            # queries and keys cap a scaled score at sqrt(hs) (under 3 for 8-channel heads), too flat a softmax
            # for sharp attention; the gains let training raise that cap, so the 1/sqrt(hs) scale stays as it is
            self.q_norm = RMSNorm(self.head_dim, eps=NORM_EPS)
            self.k_norm = RMSNorm(self.head_dim, eps=NORM_EPS)

    def context(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False,
                masks: Masks | None = None, ve: torch.Tensor | None = None, tap: Tap | None = None):
        """x (B, T, C) -> (every head's context vectors (B, nh, T, hs), weights (B, nh, T, S) or None).

        rope is rotary's (cos, sin) for x's positions, each (T, hs/2), under pos_encoding=rope; else None.
        masks, what the causal mask and ALiBi make of this forward (GPT builds them once for all layers; built
        here when not given). ve (B, T, C), under value_embeds: this layer's embedding of each token, added to its
        value. tap, on the explicit path, is handed q, k, v, the scores and the weights. The weights returned are
        the softmax's, as computed, when need_weights."""
        B, T, C = x.size()
        if masks is None:
            masks = self.masks(T, cache.length if cache is not None else 0, x.device, need_weights)
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        if ve is not None:
            v = v + ve  # (B, T, C)
        # split the channels into heads: each head attends with its own slice
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        projected, normed = (q, k), None  # what a tap sees of the steps before the scores' q and k
        if self.qk_norm:  # before rope (a rotation keeps norms) and before the cache: cached keys are normalised
            q, k = self.q_norm(q), self.k_norm(k)
            normed = (q, k)
        if rope is not None:  # rotate by position, so q.k depends on the distance only
            cos, sin = (t.to(q.dtype) for t in rope)  # the turn in q's dtype, which is cheaper
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs) each
        dropout_p = self.dropout if self.training else 0.0
        if masks.explicit:
            scores = self.scores(q, k) + masks.penalty  # (B, nh, T, S)
            y, weights = attend(scores, v, masks.causal, dropout_p)  # (B, nh, T, hs), (B, nh, T, S)
            if tap is not None:
                tap.attention(layer, q, k, v, scores, weights, projected, normed)
            return y, weights if need_weights else None
        # the fused kernel computes exactly what the explicit path does, without the weights
        scale = 1.0 if self.score_kind == "dot" else None  # None: SDPA's own 1/sqrt(hs)
        y = fused_attention(q, k, v, attn_mask=masks.fused, dropout_p=dropout_p, is_causal=masks.is_causal,
                            scale=scale)  # (B, nh, T, hs)
        return y, None

    def project(self, y, layer: int = 0, heads: HeadEdit | None = None):
        """The heads' context vectors y (B, nh, T, hs) -> the attention's output (B, T, C): side by side,
        then mixed by c_proj. heads, when given, sees every head's context vectors first and may replace some
        (glimpse/ablation.py removes heads that way)."""
        if heads is not None:
            y = heads.edit(layer, y)  # (B, nh, T, hs)
        B, nh, T, hs = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)

    def masks(self, T: int, past: int, device, need_weights: bool) -> Masks:
        """What the causal mask and ALiBi make of a forward of T queries after past cached positions."""
        slopes = self.alibi_slopes if self.pos_encoding == "alibi" else None
        return Masks.build(T, past, device, need_weights or self.score_kind == "additive", slopes)

    def scores(self, q, k):
        """How much each query matches each key: (B, nh, T, hs), (B, nh, S, hs) -> (B, nh, T, S)."""
        if self.score_kind == "scaled_dot":
            # dividing by sqrt(hs) keeps the scores' spread near 1 whatever the head size, so the
            # softmax neither saturates nor flattens as heads get wider
            return dot_scores(q, k, 1 / math.sqrt(self.head_dim))
        if self.score_kind == "dot":
            return dot_scores(q, k, 1.0)
        query_part = torch.einsum("bhtd,hde->bhte", q, self.score_q)  # (B, nh, T, hs)
        key_part = torch.einsum("bhsd,hde->bhse", k, self.score_k)  # (B, nh, S, hs)
        hidden = torch.tanh(query_part[:, :, :, None, :] + key_part[:, :, None, :, :])  # (B, nh, T, S, hs)
        return torch.einsum("bhtse,he->bhts", hidden, self.score_v)  # (B, nh, T, S)


def dot_scores(q, k, scale: float):
    """q . k for every (query, key) pair, times scale: (..., T, hs), (..., S, hs) -> (..., T, S)."""
    return (q @ k.transpose(-2, -1)) * scale


def attend(scores, v, mask=None, dropout_p: float = 0.0):
    """Scores -> softmax weights -> context vectors: returns (context (..., T, hs), weights (..., T, S)).

    mask (T, S) is True where a query may see a key; elsewhere the weight is exactly 0.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (..., T, S)
    weights = F.softmax(scores, dim=-1)  # (..., T, S): each row sums to 1
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights  # (..., T, hs), (..., T, S)
