"""
The small modules model.py builds its blocks from (the norms, ReLU squared, dropout), and the device
workarounds they carry, each with its why (the measurements are in docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-5  # LayerNorm's default, used by RMSNorm too, so that the two differ only in what they compute


class ReLUSquared(nn.Module):
    """relu(x)^2, the Primer paper's activation (So et al., 2021): 0 below zero, quadratic above."""

    def forward(self, x):
        return F.relu(x).square()


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that keeps its input's dtype, gain included: a float32 gain on bfloat16 input takes a slower,
    unfused kernel, and CUDA's autocast lists rms_norm among the ops it runs in float32, which would hand qk_norm's
    queries and keys to attention in float32 and keep float32 copies of them for the backward pass. The kernel
    sums the squares in float32 whatever its input, so bfloat16 in and out loses nothing there."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # x's dtype, not autocast's float32 list
            return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_norm(kind: str, width: int, bias: bool) -> nn.Module:
    """GPT-2's LayerNorm (kind "layernorm"), or RMSNorm: x / rms(x) times a gain, no mean subtracted, no bias."""
    if kind == "rmsnorm":
        return RMSNorm(width, eps=NORM_EPS)
    return nn.LayerNorm(width, bias=bias)


def make_dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or at p = 0 an Identity, which costs nothing per call where a Dropout still checks its
    arguments (generation is per-call overhead on a CPU)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def fused_attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, in float32 under CPU bfloat16 autocast: PyTorch's CPU attention kernel
    is slower in bfloat16 than in float32 (docs/performance.md, "A training step")."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
