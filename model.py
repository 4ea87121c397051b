"""
A GPT-2 style decoder-only transformer you can look inside.

Reading order: GPTConfig -> CausalSelfAttention (queries, keys, values, scores, the causal mask,
softmax weights, context vectors) and its helpers (dot_scores, attend, causal_mask) -> MLP -> Block
-> GPT and GPT.generate. The position encodings that are functions (sinusoidal, rotary,
alibi_slopes) live in glimpse/positions.py; the KV cache and the choice of each next token in
glimpse/generation.py.

Attention has two paths through one module. The fast path calls F.scaled_dot_product_attention,
which on GPU runs a fused flash kernel that never materialises the (T, T) weights. The explicit path
writes out softmax(scores + mask) V step by step and hands the weights back; it is taken when a
caller asks for the weights (GPT.forward_with_attention), and for additive scores, which no fused
kernel computes. Training with the default scores pays nothing for it.

The variants of the lecture notes are config switches, GPT-2 by default:
  attn_score    scaled_dot (QK^T / sqrt(d)), dot (QK^T), additive (Bahdanau: v^T tanh(W_q q + W_k k))
  pos_encoding  learned (a table up to block_size), sinusoidal (fixed, added to the embeddings),
                rope (rotates queries and keys), alibi (a per-head penalty on distance), none
and so are the architecture choices of later GPTs: norm (layernorm or rmsnorm), activation (gelu or
relu2, ReLU squared), qk_norm (RMS-normalised queries and keys), tie_embeddings (lm_head shares
wte's matrix) and zero_init_proj (every block starts as the identity).

This file holds the model and nothing else: no I/O, no argv, no prints. GPTConfig's fields carry the
help text that train.py's --help shows for them, so each option is described once, here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from glimpse.config import option
from glimpse.generation import KVCache, Step, sample_next
from glimpse.positions import SINUSOID_SCALE, alibi_slopes, rotary_table, rotate, sinusoidal

AttnScore = Literal["scaled_dot", "dot", "additive"]
PosEncoding = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "relu2"]
ATTN_SCORES, POS_ENCODINGS = get_args(AttnScore), get_args(PosEncoding)
NORM_EPS = 1e-5  # LayerNorm's default, used by RMSNorm too, so that the two differ only in what they compute


class HeadEdit(Protocol):
    """Something that sees each layer's per-head context vectors and returns them, changed or not."""

    def edit(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """y (B, nh, T, hs): the heads' context vectors at one layer, before c_proj mixes them."""
        ...


@dataclass
class GPTConfig:
    """The shape of the network. Defaults are GPT-2 small (124M parameters).

    Each field with help is also a key of train.py (--n_layer=4, or n_layer = 4 in a preset).
    """

    block_size: int = option(1024, "context length in tokens (learned positions stop here)")
    vocab_size: int = 50257  # GPT-2's BPE vocabulary; a training run takes its dataset's
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(12, "attention heads per block")
    n_embd: int = option(768, "width of the residual stream")
    dropout: float = option(0.0, "dropout probability while training")
    bias: bool = option(True, "biases in Linear and LayerNorm layers, as GPT-2 has them")
    attn_score: AttnScore = option(
        "scaled_dot", "how queries score keys: softmax(QK^T/sqrt(d)), unscaled QK^T (both on the fused fast "
        "path), or Bahdanau's v^T tanh(W_q q + W_k k) (explicit path only: slow, memory grows as T^2 x head size)"
    )
    pos_encoding: PosEncoding = option(
        "learned", "where position information comes from: GPT-2's learned table (stops at block_size), fixed "
        "sinusoids, rotary (RoPE), ALiBi's distance penalty, or none (only the causal mask)"
    )
    norm: Norm = option(
        "layernorm", "the normalisation before attention, the MLP and the head: GPT-2's LayerNorm, or RMSNorm "
        "(divide by the root mean square, times a learned gain; no mean subtracted, no bias), as LLaMA and most "
        "later models have it"
    )
    activation: Activation = option(
        "gelu", "the MLP's nonlinearity: GPT-2's tanh GELU, or ReLU squared (relu(x)^2, from the Primer paper, "
        "used by modded-nanogpt)"
    )
    qk_norm: bool = option(
        False, "RMS-normalise each head's queries and keys (learned gain per channel) before rotary and the scores: "
        "the logits are then bounded by the gains, not by how large queries and keys grow, a guard against the "
        "logit growth reported to destabilise training at high learning rates"
    )
    tie_embeddings: bool = option(
        True, "the output head shares the token-embedding matrix, as in GPT-2; false gives lm_head a matrix of its "
        "own (vocab_size x n_embd more parameters), so reading a token and predicting it can differ"
    )
    zero_init_proj: bool = option(
        False, "start the projections that write into the residual stream (attn.c_proj, mlp.c_proj) at zero, so "
        "every block starts as the identity and learns what to add; false: GPT-2's small random start"
    )
    logit_softcap: float = option(
        0.0, "squash the logits smoothly into (-cap, cap): cap * tanh(logits / cap), as modded-nanogpt does, so "
        "that no logit grows without bound (0: no cap, as GPT-2)"
    )
    value_embeds: int = option(
        0, "the first this many blocks add a token embedding of their own to their attention's values, as "
        "modded-nanogpt's value embeddings do: each token's identity reaches those values directly (0: none)"
    )
    unet: bool = option(
        False, "U-net skips: for i < n_layer // 2, block n_layer - 1 - i takes in a learned share of block i's "
        "output, a short path from early blocks to late ones (modded-nanogpt)"
    )
    smear: bool = option(
        False, "add to each token's embedding a learned, gated share of the previous token's (modded-nanogpt's "
        "smear): a look one token back before any attention"
    )

    def __post_init__(self):
        for name, kind in (("attn_score", AttnScore), ("pos_encoding", PosEncoding), ("norm", Norm),
                           ("activation", Activation)):
            choices = get_args(kind)  # checked here too: a GPTConfig can be built without the config parser
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
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
        if not 0 <= self.value_embeds <= self.n_layer:
            raise ValueError(f"value_embeds must be between 0 and n_layer ({self.n_layer}), got {self.value_embeds}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be 0 (no cap) or positive, got {self.logit_softcap}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            head_dim = self.n_embd // self.n_head
            raise ValueError(f"rope rotates channel pairs: n_embd // n_head ({head_dim}) must be even")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends only to itself and earlier ones.

    Self-attention: queries, keys and values all come from the same sequence (in encoder-decoder
    attention, the queries come from another). Each head scores every (query, key) pair, turns a
    query's scores into weights with a softmax, and returns the weighted sum of the values: the
    query's context vector.
    """

    def __init__(self, config: GPTConfig):
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
        if self.score_kind == "additive":  # Bahdanau: v^T tanh(W_q q + W_k k), with its own W_q, W_k, v per head
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

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False,
                heads: HeadEdit | None = None, masks: Masks | None = None):
        """x (B, T, C) -> (output (B, T, C), weights (B, nh, T, S) or None): context, then project.

        rope is rotary's (cos, sin) for x's positions, each (T, hs/2), under pos_encoding=rope; else None.
        masks, what the causal mask and ALiBi make of this forward (GPT builds them once for all layers;
        built here when not given). heads, when given, sees every head's context vectors before c_proj
        mixes them, and may replace some (glimpse/ablation.py removes heads that way); the weights
        returned are the softmax's, as computed.
        """
        y, weights = self.context(x, rope, cache, layer, need_weights, masks)  # (B, nh, T, hs)
        return self.project(y, layer, heads), weights

    def project(self, y, layer: int = 0, heads: HeadEdit | None = None):
        """The heads' context vectors y (B, nh, T, hs) -> the attention's output (B, T, C): side by side,
        then mixed by c_proj."""
        if heads is not None:
            y = heads.edit(layer, y)  # (B, nh, T, hs)
        B, nh, T, hs = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def context(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False,
                masks: Masks | None = None, ve: torch.Tensor | None = None):
        """x (B, T, C) -> (every head's context vectors (B, nh, T, hs), weights (B, nh, T, S) or None).

        ve (B, T, C), under value_embeds: this layer's embedding of each token, added to its value."""
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
        if self.qk_norm:  # before rope (a rotation keeps norms) and before the cache: cached keys are normalised
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotate by position, so q.k depends on the distance only
            cos, sin = (t.to(q.dtype) for t in rope)  # the turn in q's dtype, which is cheaper
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs) each
        dropout_p = self.dropout if self.training else 0.0
        if masks.explicit:
            y, weights = self.explicit_attention(q, k, v, masks, dropout_p)
            return y, weights if need_weights else None
        # the fused kernel computes exactly what the explicit path does, without the weights
        scale = 1.0 if self.score_kind == "dot" else None  # None: SDPA's own 1/sqrt(hs)
        y = fused_attention(q, k, v, attn_mask=masks.fused, dropout_p=dropout_p, is_causal=masks.is_causal,
                            scale=scale)
        return y, None

    def explicit_attention(self, q, k, v, masks: Masks, dropout_p: float = 0.0):
        """Every step written out, weights kept: scores (+ ALiBi's penalty), the causal mask, softmax, the
        weighted sum of the values. (B, nh, T, hs), (B, nh, S, hs) x 2 -> (context, weights (B, nh, T, S))."""
        return attend(self.scores(q, k) + masks.penalty, v, masks.causal, dropout_p)

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


class Masks(NamedTuple):
    """One forward's masks, the same in every layer: what the explicit path and the fused kernel each take.

    explicit  the explicit path runs (weights wanted, or additive scores, which SDPA cannot compute)
    causal    explicit path: (T, S) True where a query may see a key
    penalty   explicit path: ALiBi's (nh, T, S) penalty, added to the scores; 0.0 for other encodings
    fused     fused path: ALiBi's penalty with -inf where masked, a boolean mask after a cache, or None
    is_causal fused path: SDPA's own causal mask (no cache: queries and keys are the same positions)
    """

    explicit: bool
    causal: torch.Tensor | None
    penalty: torch.Tensor | float
    fused: torch.Tensor | None
    is_causal: bool

    @classmethod
    def build(cls, T: int, past: int, device, explicit: bool, slopes: torch.Tensor | None = None) -> Masks:
        S = past + T
        penalty = 0.0
        if slopes is not None:  # ALiBi: slope x distance back, per head
            distance = torch.arange(T, device=device)[:, None] + past - torch.arange(S, device=device)[None, :]
            penalty = -slopes[:, None, None] * distance.clamp(min=0)  # (nh, T, S)
        if explicit:
            return cls(True, causal_mask(T, S, past, device), penalty, None, False)
        if slopes is not None:  # a float mask: ALiBi's penalty, and -inf where it is causal
            return cls(False, None, 0.0, penalty.masked_fill(~causal_mask(T, S, past, device), float("-inf")), False)
        if past == 0:  # SDPA's is_causal mask is aligned to the top-left corner, right when queries == keys
            return cls(False, None, 0.0, None, True)
        if T > 1:  # several new queries after a cache: each sees the cache and the new ones up to itself
            return cls(False, None, 0.0, causal_mask(T, S, past, device), False)
        return cls(False, None, 0.0, None, False)  # one new query at the end sees every cached key: no mask


def fused_attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, in float32 under CPU bfloat16 autocast: PyTorch's CPU attention kernel
    is slower in bfloat16 than in float32 (docs/performance.md, "A training step")."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def dot_scores(q, k, scale: float):
    """q . k for every (query, key) pair, times scale: (..., T, hs), (..., S, hs) -> (..., T, S)."""
    return (q @ k.transpose(-2, -1)) * scale


def attend(scores, v, mask=None, dropout_p: float = 0.0):
    """Scores -> softmax weights -> context vectors: returns (context (..., T, hs), weights (..., T, S)).

    mask (T, S) is True where a query may see a key; elsewhere the weight is exactly 0.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1)  # each row sums to 1
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


def causal_mask(n_queries: int, n_keys: int, offset: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where query i (at position offset + i) may attend to key j."""
    query_pos = torch.arange(n_queries, device=device)[:, None] + offset  # (T, 1)
    key_pos = torch.arange(n_keys, device=device)[None, :]  # (1, S)
    return key_pos <= query_pos  # (T, S)


class ReLUSquared(nn.Module):
    """relu(x)^2, the Primer paper's activation (So et al., 2021): 0 below zero, quadratic above."""

    def forward(self, x):
        return F.relu(x).square()


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, a nonlinearity (GELU or ReLU squared), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's tanh GELU by default, so exchanged weights behave the same
        self.activation = nn.GELU(approximate="tanh") if config.activation == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = make_dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its gain in the input's dtype: a float32 gain on bfloat16 input takes a slower, unfused
    kernel."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or at p = 0 an Identity, which costs nothing per call where a Dropout still checks its
    arguments (generation is per-call overhead on a CPU)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm: x / rms(x) times a gain, with no mean subtracted and no bias."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0, need_weights=False, heads=None, record=None, masks=None,
                ve=None):
        """record, a list, collects (x, the heads' context vectors) for GPT.forward_from."""
        y, weights = self.attn.context(self.ln_1(x), rope, cache, layer, need_weights, masks, ve)  # (B, nh, T, hs)
        if record is not None:
            record.append((x, y))
        return self.finish(x, y, layer, heads), weights

    def finish(self, x, y, layer=0, heads=None):
        """The block once its heads' context vectors y (B, nh, T, hs) are known: x + attention, x + MLP."""
        x = x + self.attn.project(y, layer, heads)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_encoding == "learned":  # one learned vector per position, up to block_size
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.value_embeds:  # one table per block that takes them, looked up like wte
            modules["ve"] = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd)
                                          for _ in range(config.value_embeds))
        if config.smear:  # the gate reads the token's own embedding; smear_scale starts it at nothing
            modules["smear_gate"] = nn.Linear(config.n_embd, 1, bias=False)
        modules.update(
            drop=make_dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.smear:
            self.smear_scale = nn.Parameter(torch.zeros(1))
        if config.unet:  # one weight per skip, starting as a plain sum of the two streams
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        if config.tie_embeddings:
            # weight tying: reading a token in and writing it out share one matrix (fewer parameters,
            # and GPT-2 was trained this way)
            self.transformer.wte.weight = self.lm_head.weight
        if self.lm_head.weight.is_meta:
            return  # built to be handed weights (with_weights): nothing to initialise
        # an untied lm_head gets GPT-2's std 0.02 too, so that untying changes one thing only: the
        # initial logits have the tied model's scale
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth; zero_init_proj starts them at 0, so that
        # each block adds nothing until training gives it something to add
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def with_weights(cls, config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
        """A GPT holding these weights, built on the meta device: no memory and no random initialisation is
        spent on parameters that the state dict replaces at once."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)  # the state's tensors themselves become the parameters
        if config.tie_embeddings:
            model.transformer.wte.weight = model.lm_head.weight  # assign gave the two names a Parameter each
        return model

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; embeddings are left out by default, as GPT-2's paper counts.

        With tied weights the token embedding is also the output head, so it stays in the count.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        if non_embedding and "ve" in self.transformer:
            n -= sum(p.numel() for p in self.transformer.ve.parameters())
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6 N + 12 n_layer n_embd block_size.

        N is num_params(): the weights a token meets in a matrix product, lm_head included (and the biases
        and norm gains, a rounding error), but not the position table, which is only looked up. Going
        forward, each weight of a product costs one multiply and one add per token; going back, twice that
        (one product for the input's gradient, one for the weight's): 6 N. Attention does work that no
        weight accounts for: every query scores every key (Q K^T) and sums the values by its weights, 2
        n_embd FLOPs per key for each, over all heads: 4 n_embd block_size per token and layer going
        forward, 12 n_embd block_size with the backward pass. As in the PaLM paper's appendix, the estimate
        counts the whole window (the causal mask leaves half of it unused) and leaves out the norms, softmax
        and loss, cheap beside the matrix products; additive scores cost more than it says.
        """
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def head(self, x):
        """The logits of the final residual stream x (B, T, C): (B, T, vocab_size), capped if logit_softcap."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if not cap else cap * torch.tanh(logits / cap)

    def forward(self, idx, targets=None, cache: KVCache | None = None, heads: HeadEdit | None = None,
                last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        heads: a HeadEdit that sees (and may replace) each layer's per-head context vectors. last_only: the
        logits of the last position alone (B, 1, vocab_size), all that generating the next token needs.
        """
        x, _ = self._trunk(idx, cache, need_weights=False, heads=heads)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): a 1,024-token prefill would otherwise write 1,024 x 50,257 logits
        logits = self.head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_with_attention(self, idx, heads: HeadEdit | None = None, weights_dtype: torch.dtype | None = None,
                               logits: bool = True):
        """Like forward, but through the explicit path: (logits (B, T, V) or None, weights).

        weights is (n_layer, B, n_head, T, T): post-softmax, rows are queries, columns keys. weights_dtype
        casts each layer's weights as soon as they are computed (a dump keeps float16: at GPT-2's 144 heads
        and 1,024 tokens that halves what is held); logits=False skips the head (T x vocab_size of work).
        """
        x, weights = self._trunk(idx, None, need_weights=True, heads=heads, weights_dtype=weights_dtype)
        return (self.head(x) if logits else None), torch.stack(weights)

    def forward_from(self, layer: int, x, y, heads: HeadEdit | None = None):
        """Logits (B, T, V) from block `layer` on, given the residual stream x (B, T, C) entering it and its
        heads' context vectors y (B, nh, T, hs), as residual_streams records them: nothing before those
        is computed again, which is all that removing heads of that layer changes. Not for models with
        value_embeds or unet, whose later blocks need more than x."""
        if self.config.value_embeds or self.config.unet:
            raise ValueError("forward_from needs value_embeds = 0 and unet = false: later blocks of this model "
                             "read the tokens or earlier blocks' outputs too")
        pos = torch.arange(x.size(1), device=x.device)  # (T,)
        rope = rotary_table(pos, self.config.n_embd // self.config.n_head) if self.config.pos_encoding == "rope" \
            else None
        x = self.transformer.h[layer].finish(x, y, layer, heads)
        masks = self.transformer.h[0].attn.masks(x.size(1), 0, x.device, False)  # every layer's
        for i in range(layer + 1, self.config.n_layer):
            x, _ = self.transformer.h[i](x, rope, None, i, False, heads, masks=masks)
        return self.head(self.transformer.ln_f(x))

    def residual_streams(self, idx) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The logits (B, T, V), and for each block the residual stream entering it (B, T, C) and its heads'
        context vectors (B, nh, T, hs), for forward_from."""
        record = []
        x, _ = self._trunk(idx, None, need_weights=False, record=record)
        return self.head(x), record

    def _trunk(self, idx, cache: KVCache | None, need_weights: bool, heads: HeadEdit | None = None,
               record: list | None = None, weights_dtype: torch.dtype | None = None):
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        encoding, block_size = self.config.pos_encoding, self.config.block_size
        if past + T > block_size and (cache is not None or encoding == "learned"):
            why = "the KV cache holds" if cache is not None else "learned position embeddings exist for"
            raise ValueError(
                f"cannot attend over {past + T} tokens: {why} block_size = {block_size} positions only"
                + ("; sinusoidal, rope, alibi and none can run longer" if cache is None else "")
            )
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.smear:
            x = self.smear(x, cache)
        if encoding == "learned":
            x = x + self.transformer.wpe(pos)
        elif encoding == "sinusoidal":  # scaled to GPT-2's initial embedding size, so neither drowns the other
            x = x + SINUSOID_SCALE * sinusoidal(pos, self.config.n_embd).to(x.dtype)
        x = self.transformer.drop(x)  # rope and alibi act inside attention; none leaves only the mask
        # rope's angles depend on positions only: computed once here, not in every layer
        rope = rotary_table(pos, self.config.n_embd // self.config.n_head) if encoding == "rope" else None
        masks = self.transformer.h[0].attn.masks(T, past, idx.device, need_weights)  # the same in every layer
        ves = [table(idx) for table in self.transformer.ve] if self.config.value_embeds else []  # (B, T, C) each
        n_layer, n_skips = self.config.n_layer, self.config.n_layer // 2 if self.config.unet else 0
        weights, skips = [], []
        for layer, block in enumerate(self.transformer.h):
            if layer >= n_layer - n_skips:  # the late half takes in the early half's outputs, innermost first
                x = x + self.skip_weights[n_layer - 1 - layer] * skips.pop()
            x, w = block(x, rope, cache, layer, need_weights, heads, record, masks,
                         ves[layer] if layer < len(ves) else None)
            if layer < n_skips:
                skips.append(x)
            weights.append(w.to(weights_dtype) if w is not None and weights_dtype else w)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x), weights  # (B, T, C)

    def smear(self, x, cache: KVCache | None):
        """Token embeddings x (B, T, C) -> each plus a gated share of the one before it. Under the KV cache
        the one before the first new token is the cache's last_embedding (none at the window's start)."""
        before = cache.last_embedding if cache is not None and cache.length else None
        if before is None:
            before = torch.zeros_like(x[:, :1])  # (B, 1, C): the first token has nothing before it
        previous = torch.cat((before, x[:, :-1]), dim=1)  # (B, T, C)
        if cache is not None:
            cache.last_embedding = x[:, -1:]
        gate = torch.sigmoid(self.transformer.smear_gate(x))  # (B, T, 1): how much of it each token takes
        return x + self.smear_scale * gate * previous

    @torch.inference_mode()  # like no_grad, and cheaper per op: generation is overhead-bound on a CPU
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        heads: HeadEdit | None = None,
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
                logits = self(tokens[:, window_start:], cache=cache, heads=heads, last_only=True)[0][:, -1]
            elif cache.length == block_size:  # full: slide by refilling from the recent half
                cache.length = 0
                window_start = tokens.size(1) - keep
                logits = self(tokens[:, window_start:], cache=cache, heads=heads, last_only=True)[0][:, -1]
            else:  # the usual step: only the newest token goes through the network
                logits = self(tokens[:, -1:], cache=cache, heads=heads)[0][:, -1]
            logits = logits.float()  # (B, vocab_size)
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield Step(token, logits, window_start)
            tokens = torch.cat((tokens, token), dim=1)
