"""
The causal mask, and what it and ALiBi's distance penalty make of one forward for each attention path.

A query may see its own position and earlier ones only: causal_mask says which (query, key) pairs
those are. model.py builds Masks once per forward and hands them to every layer, since they depend
only on how many tokens go in and how many the KV cache already holds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def causal_mask(n_queries: int, n_keys: int, offset: int, device) -> torch.Tensor:
    """(T, S) boolean mask, True where query i (at position offset + i) may attend to key j."""
    query_pos = torch.arange(n_queries, device=device)[:, None] + offset  # (T, 1)
    key_pos = torch.arange(n_keys, device=device)[None, :]  # (1, S)
    return key_pos <= query_pos  # (T, S)


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
        """The masks of T queries after past cached positions; slopes: ALiBi's (nh,) slopes, or None."""
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
