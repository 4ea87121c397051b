"""
Position encodings that are functions, not parameters: the model (model.py) calls them.

sinusoidal   the fixed sines and cosines of "Attention Is All You Need", added to the token embeddings
rotary_table, rotate   RoPE: queries and keys turned by an angle that grows with position
alibi_slopes ALiBi's per-head slopes for a penalty that grows with distance

The learned table (GPT-2's wpe) is a parameter and stays in the model; "none" needs no code.
"""

from __future__ import annotations

import math

import torch

SINUSOID_SCALE = 0.02 * math.sqrt(2)  # gives the sinusoids the 0.02 standard deviation of GPT-2's embeddings


def rotary_table(pos, head_dim: int):
    """Rotary position embedding (RoPE), part 1: the cosines and sines of the angles pos x freq, one
    frequency per channel pair: (T,) -> (cos (T, hs/2), sin (T, hs/2)), in float32 (positions can be large).

    A query at i and a key at j, both turned by rotate, meet with q.k depending on i - j only: attention
    sees relative positions, and positions beyond training length are just further turns. The table
    depends on positions only, so the model computes it once per forward for every layer.
    """
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, device=pos.device, dtype=torch.float32) / half)  # (hs/2,)
    angles = pos.float()[:, None] * freqs[None, :]  # (T, hs/2)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """RoPE, part 2: turn each channel pair (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by its angle."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def sinusoidal(pos, dim: int):
    """The fixed sine/cosine position embedding of "Attention Is All You Need": (T,) -> (T, dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=pos.device).float() / dim)  # (dim/2,)
    angles = pos.float()[:, None] * freqs[None, :]  # (T, dim/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (T, dim): sin, cos interleaved
    return table[:, :dim]  # an odd dim has one sine too many


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence from 2^(-8/n) (1/2, 1/4, ..., 1/256 for 8 heads).

    For a head count that is not a power of 2, the paper takes the slopes of the nearest lower power
    of 2 and fills in with every other slope of the next one.
    """
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    lower = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes, device="cpu")  # a real tensor even in a model built on the meta device
