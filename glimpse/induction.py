"""
The induction probe: does a model copy what followed an earlier occurrence of the current token?

Random tokens repeated twice, [r, r], cannot be predicted the first time; a model with induction heads
predicts the second copy by attending, from each token of it, to the token that followed the same token in
the first copy. induction_probe scores every head on that (and on the previous token, and on where it looks
relative to the earlier occurrence), compares the two copies' losses, and with --ablation removes each head
alone to see which ones the repeat depends on. sample.py --probe=induction prints its verdict.
"""

from __future__ import annotations

import operator
from contextlib import nullcontext
from typing import get_args

import torch
import torch.nn.functional as F

from glimpse.ablation import AblationKind, head_means, losses_per_head
from glimpse.errors import GlimpseError
from glimpse.evaluation import evaluating
from model import GPT


@torch.no_grad()
def induction_probe(model: GPT, n_tokens: int | None = None, batch: int = 8, seed: int = 0,
                    ablation: str | None = None, vocab_size: int | None = None) -> dict:
    """Score every head on random tokens repeated twice, [r, r], with r of n_tokens tokens.

    An induction head, at the second copy of a token, attends to the token that followed its earlier
    occurrence (induction_scores) and so lets the model predict what comes next. Random tokens cannot
    be predicted the first time, so a model with induction heads has a far lower loss on the second
    copy than on the first. The draw of r (probe_tokens) and the scoring make a perfect induction head
    score 1 at any vocabulary size: "induction_ceiling" is the score of a head that puts all its weight
    on induction keys, computed from the drawn tokens, so that the scores can be read against it.

    With ablation ("zero" or "mean", glimpse/ablation.py), also the second-copy loss with each head
    removed alone, "second_copy_loss_without" (L, H): the heads the repeat depends on raise it.
    "induction_heads" lists the induction heads as [layer, head], highest score first (induction_heads; empty
    when there is none), and "verdict" says so in one line (induction_verdict).

    vocab_size: the tokenizer's, when the model's vocabulary is padded past it for speed (GPT-2's 50,257 to
    50,304): the padding's ids are no token, never trained on, and are not drawn. None draws from the model's.

    Everything runs in eval mode (dropout would make the weights and the removals' losses random), and
    the model is left in the mode it came in.
    """
    if ablation not in (None, *get_args(AblationKind)):  # anything else would silently remove heads as zero does
        raise GlimpseError(f"ablation must be {', '.join(get_args(AblationKind))} or None (no removals), "
                           f"got {ablation!r}")
    config = model.config
    n = config.block_size // 2 if n_tokens is None else n_tokens
    if not 2 <= n <= config.block_size // 2:  # both copies in one window
        raise GlimpseError(f"the probe's n_tokens must be from 2 to {config.block_size // 2} (half the model's "
                           f"block_size, so that both copies fit in one window); got {n}")
    try:
        vocab = config.vocab_size if vocab_size is None else min(operator.index(vocab_size), config.vocab_size)
    except TypeError:
        raise GlimpseError(f"the probe's vocab_size must be a whole number (the tokenizer's) or None; got "
                           f"{vocab_size!r}") from None
    if vocab < 1:
        raise GlimpseError(f"the probe's vocab_size must be at least 1 (the tokenizer's); got {vocab_size}")
    device = next(model.parameters()).device
    seq = probe_tokens(vocab, n, batch, seed).to(device)  # (B, 2n)
    with evaluating(model):
        # one sequence at a time, the weights in float16: at GPT-2's 1,024 tokens a batch's float32 weights and
        # logits would take 6 GB, one sequence's a few hundred MB
        scores, prev_token, offsets, losses = 0.0, 0.0, 0.0, []
        t = torch.arange(1, 2 * n, device=device)
        for row in seq:
            logits, weights = model.forward_with_attention(row[None], weights_dtype=torch.float16)
            # logits (1, 2n, V), weights (L, 1, H, 2n, 2n)
            scores = scores + induction_scores(weights, row[None]) / batch  # (L, H)
            prev_token = prev_token + weights[:, 0, :, t, t - 1].float().mean(dim=-1) / batch  # (L, H)
            offsets = offsets + repeat_offsets(weights, n) / batch  # (L, H, 2n)
            losses.append(F.cross_entropy(logits[0, :-1].float(), row[1:], reduction="none"))  # (2n - 1,)
            del logits, weights
        losses = torch.stack(losses)  # (B, 2n - 1)
        without = None
        if ablation is not None:
            inputs, targets = seq[:, :-1], seq[:, 1:]  # (B, 2n - 1) each
            scored = torch.arange(2 * n - 1, device=device) >= n  # the targets r[1:] of the second copy
            value = head_means(model, inputs, batch, nullcontext()) if ablation == "mean" else None
            without = losses_per_head(model, inputs, targets, scored, value, nullcontext())[1].tolist()
    probe = {
        "n_tokens": n,
        "batch": batch,
        "vocab_size": vocab,  # the tokens are drawn from ids 0 to vocab_size - 1
        "draw": "without repeats" if vocab >= n else "with repeats",
        **({"ablation": ablation, "second_copy_loss_without": without} if ablation else {}),
        "induction": scores.cpu().tolist(),
        "induction_ceiling": induction_keys(seq)[:, n:].any(dim=-1).float().mean().item(),
        "prev_token_on_probe": prev_token.cpu().tolist(),  # (L, H): weight on the token before, over [r, r]
        "offsets": offsets.cpu().tolist(),
        "peak_offsets": (offsets.argmax(dim=-1) - (n - 1)).cpu().tolist(),  # (L, H): each head's likeliest d
        "first_copy_loss": losses[:, : n - 1].mean().item(),  # predicting r[1:] the first time
        "second_copy_loss": losses[:, n:].mean().item(),  # predicting r[1:] again
    }
    return {**probe, "induction_heads": [list(h) for h in induction_heads(probe)],
            "verdict": induction_verdict(probe)}


def ranked_heads(probe: dict) -> list[tuple[float, int, int]]:
    """Every head as (score, layer, head), highest induction score first."""
    return sorted(((score, layer, head) for layer, scores in enumerate(probe["induction"])
                   for head, score in enumerate(scores)), reverse=True)


def induction_heads(probe: dict) -> list[tuple[int, int]]:
    """An induction_probe result's induction heads as (layer, head), highest score first; [] when none is.

    An induction head here scores at least half the ceiling and weighs +1 most: most of its weight sits on
    the induction keys, not merely near them.
    """
    ceiling, peaks = probe["induction_ceiling"], probe["peak_offsets"]
    return [(layer, head) for score, layer, head in ranked_heads(probe)
            if score >= ceiling / 2 and peaks[layer][head] == 1]


def induction_verdict(probe: dict) -> str:
    """One line on an induction_probe result: its induction heads (induction_heads), or the likeliest
    candidate when none is."""
    ceiling, peaks, without = probe["induction_ceiling"], probe["peak_offsets"], probe.get("second_copy_loss_without")
    scores, found = probe["induction"], induction_heads(probe)
    losses = f"the second copy costs {probe['second_copy_loss']:.3f} nats, the first {probe['first_copy_loss']:.3f}"
    if not found:
        score, layer, head = ranked_heads(probe)[0]
        return (f"no induction head (none scores half of {ceiling:.3f} with its peak at +1); the highest, "
                f"head {layer}.{head}, scores {score:.3f}, peak {peaks[layer][head]:+d}; {losses}")
    listed = ", ".join(f"{layer}.{head} ({scores[layer][head]:.3f}" + (f", {without[layer][head]:.3f} without it)"
                                                                       if without else ")") for layer, head in found)
    return f"induction head{'s' if len(found) > 1 else ''} {listed}; {losses}"


def probe_tokens(vocab_size: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The probe's sequences [r, r], (batch, 2n), from a generator seeded with seed.

    Each r is n distinct tokens (a random permutation's first n) when the vocabulary has that many, so
    that every second-copy query has exactly one earlier occurrence and one induction key. From a
    smaller vocabulary r must repeat tokens; it is drawn with replacement, and induction_scores credits
    every key that followed an earlier occurrence.
    """
    gen = torch.Generator().manual_seed(seed)
    if vocab_size >= n:
        r = torch.stack([torch.randperm(vocab_size, generator=gen)[:n] for _ in range(batch)])  # (B, n)
    else:
        r = torch.randint(vocab_size, (batch, n), generator=gen)  # (B, n)
    return torch.cat([r, r], dim=1)  # (B, 2n)


def induction_keys(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T, T) bool: key k is an induction key of query q when the token at k - 1 < q is the
    query's own token, that is when k followed an earlier occurrence of it (k = q included: the query
    itself, when its token also came just before it)."""
    T = tokens.shape[-1]
    earlier = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril(-1)  # (T, T): position k < q
    occurrences = (tokens[:, :, None] == tokens[:, None, :]) & earlier  # (B, T, T): query q's token at k < q
    keys = torch.zeros_like(occurrences)
    keys[:, :, 1:] = occurrences[:, :, :-1]  # the key just after each earlier occurrence
    return keys


def induction_scores(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each head's mean weight on the induction keys over [r, r]: (L, B, H, 2n, 2n), (B, 2n) -> (L, H).

    A query of the second copy scores the weight it puts on every key that followed an earlier
    occurrence of its token (induction_keys): with r free of repeats, only key j + 1 for the query at
    n + j, the token that followed r[j] the first time; with repeats in r, every such key, since an
    induction head matches tokens, not places, and each of them is one it may read. This is TransformerLens'
    induction detection pattern (duplicate tokens shifted one right), read over the second copy.

    All n queries of the second copy count, the last one (2n - 1) included: its induction key, n, is
    in the sequence. TransformerLens' induction stripe and head detector average over it too, as does the
    prefix-matching score of Olsson et al. (2022), defined for every token with an earlier copy. Only its
    target, the token after 2n - 1, lies outside the sequence, which matters to the loss, not to where
    the head looks.
    """
    n = tokens.shape[-1] // 2
    keys = induction_keys(tokens)[:, n:]  # (B, n, 2n): the second copy's queries
    credited = (weights[..., n:, :] * keys[None, :, None]).sum(dim=-1, dtype=torch.float32)  # (L, B, H, n)
    return credited.mean(dim=(1, 3))  # (L, H)


def repeat_offsets(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Where each head looks from the second copy of [r, r], relative to the query token's place in the first.

    weights (L, B, H, 2n, 2n) -> (L, H, 2n): entry n - 1 + d is the weight the queries at n + j put on key
    j + d, averaged over the n queries (0 where j + d is not a key yet), for d from -(n - 1) to n.
    d = 1 is the induction key, d = 0 the same token the first time, d = n the query itself; each head's
    row sums to 1. When r has no repeats (probe_tokens), j is the token's only earlier occurrence. A head
    that matches the earlier occurrence but reads a neighbour of it shows up here with a peak at another d,
    where the induction score alone would only say 0.
    """
    d = torch.arange(-(n - 1), n + 1, device=weights.device)  # (2n,) offsets
    j = torch.arange(n, device=weights.device)  # (n,) the query at n + j
    keys = j[:, None] + d[None, :]  # (n, 2n)
    valid = (keys >= 0) & (keys <= n + j[:, None])  # a key exists and the causal mask lets the query see it
    picked = weights[:, :, :, (n + j)[:, None], keys.clamp(0, 2 * n - 1)]  # (L, B, H, n, 2n)
    return (picked.float() * valid).mean(dim=(1, 3))  # (L, H, 2n)
