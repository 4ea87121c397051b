"""
Attention dumps: what every head of every layer attended to, saved for people and tools.

One dump is a folder:

    attention.npz  a zip of .npy arrays (np.load reads it, no pickle): layer_<l>_high and layer_<l>_low
                   uint8 [n_head, T (T + 1) / 2], the high and low bytes of layer l's post-softmax
                   weights as float16 bits, lower triangle only (row q of a head, the weights query q puts
                   on keys 0..q, starts at q (q + 1) / 2; above the diagonal every weight is exactly 0;
                   rows sum to 1); token_ids int32 [T]; tokens [T] (each token's text); prompt_len; meta
                   (a JSON string); cut, how many tokens before the window were left out (the model
                   attends over block_size tokens at most). load_layer rebuilds one layer [n_head, T, T]
                   float16 with numpy alone, load_dump all of them [n_layer, n_head, T, T].
                   With the mechanism (sample.py --mechanism, glimpse/mechanism.py), also per layer l,
                   float32: q_<l>, k_<l>, v_<l> [n_head, T, head_dim]; scores_<l> and head_out_norm_<l>
                   [n_head, T (T + 1) / 2], packed as the weights are; and for the whole text predicted
                   int32 [T], logit [T], dla_heads [n_layer, n_head, T], dla_embed [T], dla_attn_bias,
                   dla_mlp and dla_skip [n_layer, T], dla_norm_bias [T], lens_ids int32 and lens_probs
                   [n_layer + 1, T, 5]. glimpse/mechanism.py's load_mechanism reads them back at their full shapes.
    heads.json     per layer and head: entropy, mass on the previous token, on the first token (a
                   sink), on the token itself, and the mean distance attended over
    layer_<l>.png  each layer's heads as heatmaps (optional: at GPT-2's size they cost more than the rest)
    index.html     a self-contained viewer

Layers are stored apart, so that they are read one at a time, and each float16's two bytes apart: the
high byte (exponent and top of the mantissa) deflates to a fraction of its size, the low byte is
mostly noise, and interleaved they deflate poorly. The npz is deflated at zlib's fastest level while
the viewer is built (zlib works outside Python's lock), so that a dump of GPT-2 small over its 1,024
tokens (144 heads of half a million weights each) is written in seconds; docs/gpt2.md gives the sizes
and times measured. sample.py writes one dump per sample and train.py one per eval; the probes below
score heads on known circuits (previous-token, sink, induction).
"""

from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glimpse.ablation import head_means, losses_per_head
from glimpse.mechanism import Mechanism, mechanism_arrays, trace
from model import GPT


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor, heads=None) -> np.ndarray:
    """Post-softmax weights [n_layer, n_head, T, T] as float16, the dumps' precision, for one text (T,).

    heads: a HeadEdit (glimpse/ablation.py) in place while the text goes through, or None.
    """
    was_training = model.training
    model.eval()  # no dropout: the weights are the model's, not a random mask's
    _, weights = model.forward_with_attention(ids[None], heads, weights_dtype=torch.float16,
                                              logits=False)  # (L, 1, H, T, T)
    model.train(was_training)
    return weights[:, 0].cpu().numpy()


def head_metrics(attn: np.ndarray) -> dict:
    """Per layer and head, averaged over queries 1..T-1 (query 0 can only attend to itself).

    entropy        nats; 0 when a head looks at one token, ln(t + 1) when it spreads evenly
    prev_token     weight on the token just before the query
    first_token    weight on token 0, where many heads park attention they do not need (a sink)
    self           weight on the query's own token
    mean_distance  expected distance back from the query to the keys, in tokens

    One layer at a time, in float32 (each query's sums in float64): a float copy of GPT-2's 144 heads
    at 1,024 tokens would be 600 MB or more.
    """
    n_layer, n_head, T, _ = attn.shape
    queries = np.arange(1, T) if T > 1 else np.array([0])  # (Q,)
    rows = np.arange(len(queries))
    back = (queries[:, None] - np.arange(T)[None, :]).clip(min=0).astype(np.float32)  # (Q, T) how far back
    layers = []
    for layer in range(n_layer):
        w = attn[layer][:, queries, :].astype(np.float32)  # (H, Q, T)
        logs = np.log(np.where(w > 0, w, 1.0))  # (H, Q, T)
        entropy = -(w * logs).sum(-1, dtype=np.float64).mean(-1) + 0.0  # (H,); + 0.0 turns -0.0 into 0.0
        del logs
        prev = w[:, rows, queries - 1].mean(-1, dtype=np.float64) if T > 1 else np.zeros(n_head)  # (H,)
        first = w[..., 0].mean(-1, dtype=np.float64)  # (H,)
        self_mass = w[:, rows, queries].mean(-1, dtype=np.float64)  # (H,)
        distance = (w * back).sum(-1, dtype=np.float64).mean(-1)  # (H,)
        heads = [
            {"head": h, "entropy": float(entropy[h]), "prev_token": float(prev[h]), "first_token": float(first[h]),
             "self": float(self_mass[h]), "mean_distance": float(distance[h])}
            for h in range(n_head)
        ]
        layers.append({"layer": layer, "heads": heads})
    return {"queries": len(queries), "layers": layers}


def write_npz(path: Path, attn: np.ndarray, **arrays):
    """attention.npz as the module docstring describes it, written to a temporary name and renamed.

    np.savez_compressed deflates at level 6, which took seconds per layer at GPT-2's size; zipfile at
    level 1 writes the same .npy entries a few times faster, and np.load reads them all the same.
    """
    rows, cols = np.tril_indices(attn.shape[-1])  # row-major: (0,0), (1,0), (1,1), (2,0), ...

    def entries():  # one layer's triangle in memory at a time
        for layer in range(attn.shape[0]):
            bits = attn[layer][:, rows, cols].astype(np.float16).view(np.uint16)  # (H, T(T+1)/2)
            yield f"layer_{layer}_high", (bits >> 8).astype(np.uint8)
            yield f"layer_{layer}_low", (bits & 0xFF).astype(np.uint8)
        yield from arrays.items()

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, array in entries():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dump(folder: Path, attn: np.ndarray, token_ids, tokens: list[str], prompt_len: int, meta: dict,
               pictures: bool = True, importance: dict | None = None, pngs: bool = True,
               mechanism: Mechanism | None = None, cut: int = 0, token_text=None) -> dict:
    """Write one dump folder (see the module docstring); return its head metrics.

    pictures: the viewer, and the layer PNGs unless pngs is false.

    importance, when given ({"intact_loss", "loss_increase" (L, H), ...}), goes to head_importance.json
    and into the viewer, which shows each head's loss increase on its thumbnail. mechanism, the text's
    trace (attn is then its weights), goes into the npz and the viewer; cut, the tokens before the window;
    token_text, the tokenizer's token_strings, names the tokens the mechanism's panels predict.
    """
    from glimpse import render, viewer  # matplotlib is imported only when pictures are drawn

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(1) as pool:  # deflating the npz on the second core while the rest is computed
        npz = pool.submit(write_npz, folder / "attention.npz", attn, token_ids=np.asarray(token_ids, dtype=np.int32),
                          tokens=np.array(tokens, dtype=str), prompt_len=np.int32(prompt_len),
                          meta=np.array(json.dumps(meta)), cut=np.int32(cut),
                          **(mechanism_arrays(mechanism) if mechanism is not None else {}))
        heads = head_metrics(attn)
        (folder / "heads.json").write_text(json.dumps(heads, indent=1) + "\n", encoding="utf-8")
        if importance is not None:
            (folder / "head_importance.json").write_text(json.dumps(importance, indent=1) + "\n", encoding="utf-8")
        if pictures and pngs:
            render.write_layer_images(folder, attn, tokens, prompt_len)
        if pictures:
            viewer.write_viewer(folder / "index.html", attn, tokens, prompt_len, meta, heads, importance, mechanism,
                                cut, token_text)
        npz.result()  # its error, if any, is this dump's
    return heads


def dump_window(model: GPT, ids) -> list[int]:
    """The tokens a dump of ids shows: the last block_size of them."""
    return [int(i) for i in ids][-model.config.block_size:]


def dump_text(model: GPT, tokenizer, ids, prompt_len: int, meta: dict, folder: Path, pictures: bool = True,
              heads=None, importance: dict | None = None, pngs: bool = True, mechanism: bool = False) -> dict:
    """Dump the attention over the last block_size tokens of ids (a text's token ids).

    heads: a HeadEdit in place (removed heads stay removed in the dump); importance: see write_dump.
    mechanism: also the queries, keys, values, scores, what each head moved, the logit attribution and
    the logit lens (glimpse/mechanism.py), which describe the intact model: not with heads.
    """
    if mechanism and heads is not None:
        raise ValueError("the mechanism is the intact model's: dump it without heads removed")
    ids = [int(i) for i in ids]
    window = dump_window(model, ids)
    cut = len(ids) - len(window)  # tokens older than the window are left out
    tokens = tokenizer.token_strings(window)
    traced = trace(model, window, tokens) if mechanism else None
    if traced is not None:
        attn = traced.weights
    else:
        device = next(model.parameters()).device
        attn = attention_weights(model, torch.tensor(window, dtype=torch.long, device=device), heads)
    return write_dump(folder, attn, window, tokens, max(0, prompt_len - cut), meta, pictures, importance, pngs,
                      traced, cut, tokenizer.token_strings)


def load_dump(folder: Path) -> dict:
    """A dump's arrays and meta, read with numpy alone (no pickle); attn is the full [n_layer, n_head, T, T]
    float16 array."""
    with np.load(Path(folder) / "attention.npz", allow_pickle=False) as z:
        out = {k: z[k] for k in z.files if not k.startswith("layer_")}
        if "attn" not in out:  # older dumps hold the whole array as it is
            n_layer = sum(k.endswith("_high") for k in z.files) or sum(k.startswith("layer_") for k in z.files)
            out["attn"] = np.stack([layer_of(z, layer) for layer in range(n_layer)])
    out["meta"] = json.loads(str(out["meta"]))
    out["prompt_len"] = int(out["prompt_len"])
    return out


def load_layer(folder: Path, layer: int) -> np.ndarray:
    """One layer of a dump, [n_head, T, T] float16, reading only that layer's entries of the npz."""
    with np.load(Path(folder) / "attention.npz", allow_pickle=False) as z:
        return z["attn"][layer] if "attn" in z.files else layer_of(z, layer)


def layer_of(z, layer: int) -> np.ndarray:
    """Layer l [n_head, T, T] float16 from an open npz: its two byte planes put back together (or, in dumps
    written before the bytes were stored apart, its float16 triangle), zeros above the diagonal."""
    if f"layer_{layer}_high" in z.files:
        bits = z[f"layer_{layer}_high"].astype(np.uint16) << 8 | z[f"layer_{layer}_low"]  # (H, T(T+1)/2)
        tril = bits.view(np.float16)
    else:
        tril = z[f"layer_{layer}"]
    T = len(z["token_ids"])
    full = np.zeros((tril.shape[0], T, T), dtype=np.float16)
    rows, cols = np.tril_indices(T)
    full[:, rows, cols] = tril
    return full


@torch.no_grad()
def induction_probe(model: GPT, n_tokens: int | None = None, batch: int = 8, seed: int = 0,
                    ablation: str | None = None) -> dict:
    """Score every head on random tokens repeated twice, [r, r], with r of n_tokens tokens.

    An induction head, at the second copy of a token, attends to the token that followed its earlier
    occurrence (induction_scores) and so lets the model predict what comes next. Random tokens cannot
    be predicted the first time, so a model with induction heads has a far lower loss on the second
    copy than on the first. The draw of r (probe_tokens) and the scoring make a perfect induction head
    score 1 at any vocabulary size: "induction_ceiling" is the score of a head that puts all its weight
    on induction keys, computed from the drawn tokens, so that the scores can be read against it.

    With ablation ("zero" or "mean", glimpse/ablation.py), also the second-copy loss with each head
    removed alone, "second_copy_loss_without" (L, H): the heads the repeat depends on raise it. "verdict"
    says in one line which heads are induction heads (induction_verdict).

    Everything runs in eval mode (dropout would make the weights and the removals' losses random), and
    the model is left in the mode it came in.
    """
    config = model.config
    n = n_tokens or config.block_size // 2
    if not 2 <= n <= config.block_size // 2:
        raise ValueError(f"the probe needs 2 <= n_tokens <= block_size // 2 = {config.block_size // 2}")
    device = next(model.parameters()).device
    seq = probe_tokens(config.vocab_size, n, batch, seed).to(device)  # (B, 2n)
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)
    probe = {
        "n_tokens": n,
        "batch": batch,
        "draw": "without repeats" if config.vocab_size >= n else "with repeats",
        **({"ablation": ablation, "second_copy_loss_without": without} if ablation else {}),
        "induction": scores.cpu().tolist(),
        "induction_ceiling": induction_keys(seq)[:, n:].any(dim=-1).float().mean().item(),
        "prev_token_on_probe": prev_token.cpu().tolist(),  # (L, H): weight on the token before, over [r, r]
        "offsets": offsets.cpu().tolist(),
        "peak_offsets": (offsets.argmax(dim=-1) - (n - 1)).cpu().tolist(),  # (L, H): each head's likeliest d
        "first_copy_loss": losses[:, : n - 1].mean().item(),  # predicting r[1:] the first time
        "second_copy_loss": losses[:, n:].mean().item(),  # predicting r[1:] again
    }
    return {**probe, "verdict": induction_verdict(probe)}


def induction_verdict(probe: dict) -> str:
    """One line on an induction_probe result: its induction heads, or the likeliest candidate when none is.

    An induction head here scores at least half the ceiling and weighs +1 most: most of its weight sits on
    the induction keys, not merely near them.
    """
    ceiling, peaks, without = probe["induction_ceiling"], probe["peak_offsets"], probe.get("second_copy_loss_without")
    heads = sorted(((score, layer, head) for layer, scores in enumerate(probe["induction"])
                    for head, score in enumerate(scores)), reverse=True)
    found = [(s, layer, head) for s, layer, head in heads if s >= ceiling / 2 and peaks[layer][head] == 1]
    losses = f"the second copy costs {probe['second_copy_loss']:.3f} nats, the first {probe['first_copy_loss']:.3f}"
    if not found:
        score, layer, head = heads[0]
        return (f"no induction head (none scores half of {ceiling:.3f} with its peak at +1); the highest, "
                f"{layer}.{head}, scores {score:.3f}, peak {peaks[layer][head]:+d}; {losses}")
    listed = ", ".join(f"{layer}.{head} ({score:.3f}" + (f", {without[layer][head]:.3f} without it)" if without
                                                         else ")") for score, layer, head in found)
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
