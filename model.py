"""
A GPT-2 style decoder-only transformer you can look inside.

Reading order: GPTConfig -> MLP -> Block -> GPT. Each block starts with causal multi-head
self-attention, which has a file of its own to be read by itself: glimpse/self_attention.py (queries,
keys, values, scores, softmax weights, context vectors; the fast fused path and the explicit one).
Beside it in glimpse/: the causal mask (masks.py), the position encodings that are functions
(positions.py), the norms and device workarounds the blocks are built from (layers.py), and generating
with the KV cache (generation.py).

The variants of the lecture notes are config switches, GPT-2 by default:
  attn_score    scaled_dot (QK^T / sqrt(d)), dot (QK^T), additive (Bahdanau: w^T tanh(A q + B k))
  pos_encoding  learned (a table up to block_size), sinusoidal (fixed, added to the embeddings),
                rope (rotates queries and keys), alibi (a per-head penalty on distance), none
and so are the architecture choices of later GPTs: norm (layernorm or rmsnorm), activation (gelu or
relu2, ReLU squared), qk_norm (RMS-normalised queries and keys), tie_embeddings (lm_head shares
wte's matrix), zero_init_proj (every block starts as the identity), and modded-nanogpt's
logit_softcap, value_embeds, unet and smear.

This file holds the model and nothing else: no I/O, no argv, no prints. GPTConfig's fields carry the
help text that train.py's --help shows for them, so each option is described once, here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from glimpse.config import option
from glimpse.generation import KVCache
from glimpse.layers import ReLUSquared, make_dropout, make_norm
from glimpse.positions import SINUSOID_SCALE, rotary_table, sinusoidal
from glimpse.self_attention import CausalSelfAttention, HeadEdit, Tap

AttnScore = Literal["scaled_dot", "dot", "additive"]
PosEncoding = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "relu2"]
ATTN_SCORES, POS_ENCODINGS = get_args(AttnScore), get_args(PosEncoding)


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
        "scaled_dot", "how queries score keys: softmax(QK^T/sqrt(d_k)), d_k the head's size, unscaled QK^T (both on "
        "the fused fast path), or Bahdanau's w^T tanh(A q + B k), A, B, w each head's own (explicit path only: slow, "
        "memory grows as T^2 x head size)"
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
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))  # (B, T, C), through (B, T, 4C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config.norm, config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config.norm, config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0, need_weights=False, heads=None, record=None, masks=None,
                ve=None, tap=None):
        """record, a list, collects (x, the heads' context vectors): see GPT.trunk. tap: see GPT.trunk."""
        y, weights = self.attn.context(self.ln_1(x), rope=rope, cache=cache, layer=layer, need_weights=need_weights,
                                       masks=masks, ve=ve, tap=tap)  # (B, nh, T, hs), (B, nh, T, S) or None
        if record is not None:
            record.append((x, y))
        out = self.finish(x, y, layer, heads)  # (B, T, C)
        if tap is not None:
            tap.block(layer, x, y, out)
        return out, weights

    def finish(self, x, y, layer=0, heads=None):
        """The block once its heads' context vectors y (B, nh, T, hs) are known: x + attention, x + MLP."""
        x = x + self.attn.project(y, layer, heads)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """Token ids in, next-token logits out: embeddings, n_layer blocks, a final norm and lm_head.

    forward(idx, targets) -> (logits, loss) always; forward_with_attention also returns every head's weights,
    through the explicit path. Both run trunk, which reads the story of one forward top to bottom.
    """

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
            ln_f=make_norm(config.norm, config.n_embd, config.bias),
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

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward and backward) of sequences of seq_len tokens (default block_size):
        6 N + 12 n_layer n_embd seq_len.

        N is num_params(): the weights a token meets in a matrix product, lm_head included (and the biases and
        norm gains, a rounding error), but not the position table, which is only looked up. Going forward, each
        weight of a product costs one multiply and one add per token; going back, twice that (one product for
        the input's gradient, one for the weight's): 6 N. Attention does work that no weight accounts for: every
        query scores every key (Q K^T) and sums the values by its weights, 2 n_embd FLOPs per key for each, over
        all heads: 4 n_embd seq_len per token and layer going forward, 12 n_embd seq_len with the backward pass
        (shorter sequences, as in a sequence warm-up, do less). As in the PaLM paper's appendix, the estimate
        counts the whole window (the causal mask leaves half of it unused) and leaves out the norms, softmax and
        loss, cheap beside the matrix products; additive scores cost more than it says.
        """
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    def head(self, x):
        """The logits of the final residual stream x (B, T, C): (B, T, vocab_size), capped if logit_softcap."""
        logits = self.lm_head(x)  # (B, T, vocab_size)
        cap = self.config.logit_softcap
        return logits if not cap else cap * torch.tanh(logits / cap)

    def forward(self, idx, targets=None, cache: KVCache | None = None, heads: HeadEdit | None = None,
                last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        heads: a HeadEdit that sees (and may replace) each layer's per-head context vectors. last_only: the
        logits of the last position alone (B, 1, vocab_size), all that generating the next token needs.
        """
        x, _ = self.trunk(idx, cache, need_weights=False, heads=heads)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): a 1,024-token prefill would otherwise write 1,024 x 50,257 logits
        logits = self.head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # (B*T, vocab_size) against (B*T,); targets may be a slice (not viewable), hence reshape
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_with_attention(self, idx, heads: HeadEdit | None = None, weights_dtype: torch.dtype | None = None,
                               logits: bool = True):
        """Like forward, but through the explicit path: (logits (B, T, V) or None, weights).

        weights is (n_layer, B, n_head, T, T): post-softmax, rows are queries, columns keys. weights_dtype
        casts each layer's weights as soon as they are computed (a dump keeps float16: at GPT-2's 144 heads
        and 1,024 tokens that halves what is held); logits=False skips the head (T x vocab_size of work).
        """
        x, weights = self.trunk(idx, None, need_weights=True, heads=heads, weights_dtype=weights_dtype)
        return (self.head(x) if logits else None), torch.stack(weights)

    def trunk(self, idx, cache: KVCache | None, need_weights: bool, heads: HeadEdit | None = None,
              record: list | None = None, weights_dtype: torch.dtype | None = None, tap: Tap | None = None):
        """idx (B, T) -> (the final residual stream, normalised (B, T, C), each layer's weights or Nones).

        record, a list, collects each block's input stream and heads' context vectors (glimpse/ablation.py
        starts removals from them). tap, with need_weights, sees each layer's queries, keys, values, scores and
        weights, and each block's streams (glimpse/mechanism.py reads the mechanism off them)."""
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
            x = x + self.transformer.wpe(pos)  # (B, T, C), (T, C) broadcast over the batch
        elif encoding == "sinusoidal":  # scaled to GPT-2's initial embedding size, so neither drowns the other
            x = x + SINUSOID_SCALE * sinusoidal(pos, self.config.n_embd).to(x.dtype)  # (B, T, C)
        x = self.transformer.drop(x)  # rope and alibi act inside attention; none leaves only the mask
        rope, masks = self.layer_inputs(pos, past, need_weights)
        ves = [table(idx) for table in self.transformer.ve] if self.config.value_embeds else []  # (B, T, C) each
        n_layer, n_skips = self.config.n_layer, self.config.n_layer // 2 if self.config.unet else 0
        weights, skips = [], []
        for layer, block in enumerate(self.transformer.h):
            if layer >= n_layer - n_skips:  # the late half takes in the early half's outputs, innermost first
                x = x + self.skip_weights[n_layer - 1 - layer] * skips.pop()  # (B, T, C)
            x, w = block(x, rope=rope, cache=cache, layer=layer, need_weights=need_weights, heads=heads,
                         record=record, masks=masks, ve=ves[layer] if layer < len(ves) else None,
                         tap=tap)  # (B, T, C), (B, nh, T, S) or None
            if layer < n_skips:
                skips.append(x)
            weights.append(w.to(weights_dtype) if w is not None and weights_dtype else w)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x), weights  # (B, T, C)

    def layer_inputs(self, pos: torch.Tensor, past: int, need_weights: bool):
        """What every layer of a forward over positions pos (T,), past .. past + T - 1, takes alike: rope's
        (cos, sin), each (T, hs/2), under pos_encoding=rope (else None), and the masks (the causal mask, ALiBi's
        penalty). They depend on the positions only, so a forward makes them once, not in every layer."""
        rope = rotary_table(pos, self.config.n_embd // self.config.n_head) if self.config.pos_encoding == "rope" \
            else None
        return rope, self.transformer.h[0].attn.masks(len(pos), past, pos.device, need_weights)

    def smear(self, x, cache: KVCache | None):
        """Token embeddings x (B, T, C) -> each plus a gated share of the one before it. Under the KV cache
        the one before the first new token is the cache's last_embedding (none at the window's start)."""
        before = cache.last_embedding if cache is not None and cache.length else None
        if before is None:
            before = torch.zeros_like(x[:, :1])  # (B, 1, C): the first token has nothing before it
        previous = torch.cat((before, x[:, :-1]), dim=1)  # (B, T, C)
        if cache is not None:
            cache.last_embedding = x[:, -1:]  # (B, 1, C)
        gate = torch.sigmoid(self.transformer.smear_gate(x))  # (B, T, 1): how much of it each token takes
        return x + self.smear_scale * gate * previous  # (B, T, C)
