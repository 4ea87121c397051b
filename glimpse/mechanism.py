"""
The mechanism behind the weights: what every head computed on one text, read off the model as it runs.

The lecture's attention, step by step, is what each head of model.py does: a query is scored against
every key (scaled dot product, plain dot product or additive, plus ALiBi's penalty), the causal mask
hides the keys after the query, a softmax turns the scores into weights, and the weighted sum of the
values is the head's context vector; c_proj's slice for the head, W_O,h, writes it into the residual
stream. trace() runs a text through the model's own explicit path with a Tap (glimpse/self_attention.py)
that keeps each of those tensors as the model computed them, and adds three readings of them:

    head_out_norm  ||weight_ij v_j W_O,h||: how much head h moves from key j into query i's stream. A head
                   can weigh a token heavily and move almost nothing from it, when its value is small
                   (Kobayashi et al., 2020, "Attention is not only a weight").
    attribution    direct logit attribution: each head's share of the logit of the token the model
                   predicts next at each position, through ln_f with its scale at that position held fixed,
                   beside every other part of the residual stream (the embeddings, each MLP, the biases,
                   the U-net skips); the parts sum to the logit (before any softcap).
    lens           the logit lens: the prediction read off the residual stream after each block, through
                   ln_f and the output head, as if the model ended there.

sample.py --mechanism writes them into a dump (glimpse/attention.py; mechanism_arrays are the entries it
adds to attention.npz, load_mechanism reads them back with numpy alone), the viewer shows them
(glimpse/viewer.py), and glimpse/notebook.py hands them to Python as a Mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from glimpse.errors import GlimpseError
from glimpse.evaluation import evaluating
from glimpse.masks import causal_mask
from model import GPT

LENS_TOP = 5  # the likeliest tokens the logit lens keeps per layer and position


@dataclass
class Mechanism:
    """What every head computed on one text of T tokens (L layers, H heads, hs channels per head, C = H hs).

    Arrays are numpy float32 (ids int64). Rows are queries, columns keys.

    token_ids, tokens (T,)  the text, and each token's own text
    cut                     tokens before the text's window left out (a model attends over block_size at most)
    weights   (L, H, T, T)  the softmax's weights, 0 above the diagonal; every row sums to 1
    scores    (L, H, T, T)  the scores the softmax takes, scaled as the model scales them (ALiBi's penalty
                            added); -inf above the diagonal, where the causal mask puts it
    q, k      (L, H, T, hs) the queries and keys exactly as the scores use them (after qk_norm and rope)
    q_projected, k_projected (L, H, T, hs) the same before both: W_q x and W_k x (plus their biases), x the
                            block's normalised input; None in a model with neither (q and k are them)
    q_normed, k_normed (L, H, T, hs) after qk_norm, before rope; None without qk_norm, or without rope after it
                            (q and k are them)
    v         (L, H, T, hs) the values (value embeddings added, under value_embeds)
    context   (L, H, T, hs) each head's context vector per query: weights @ v
    value_out_norm (L, H, T) ||v_j W_O,h||, the size of what head h would move from key j at weight 1
    head_out_norm (L, H, T, T) ||weight_ij v_j W_O,h|| = weights * value_out_norm over the keys
    predicted (T,)          the token the model predicts after each position (its likeliest)
    logit     (T,)          that token's logit, before any logit_softcap
    attribution             the logit's parts (each (T,) per layer, head or term): "heads" (L, H, T), "embed"
                            (T,), "attn_bias" (L, T), "mlp" (L, T), "skip" (L, T), "norm_bias" (T,); they sum
                            to logit
    lens_ids, lens_probs (L + 1, T, LENS_TOP) the likeliest tokens and their probabilities read off the stream
                            entering block 0 (row 0) and leaving each block l (row l + 1)
    """

    token_ids: np.ndarray
    tokens: list[str]
    weights: np.ndarray
    scores: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    context: np.ndarray
    value_out_norm: np.ndarray
    predicted: np.ndarray
    logit: np.ndarray
    attribution: dict[str, np.ndarray]
    lens_ids: np.ndarray
    lens_probs: np.ndarray
    head_outputs: np.ndarray = field(repr=False)  # (L, H, T, C): what each head writes into the stream
    q_projected: np.ndarray | None = field(repr=False)  # None where the model has no such step: see above
    k_projected: np.ndarray | None = field(repr=False)
    q_normed: np.ndarray | None = field(repr=False)
    k_normed: np.ndarray | None = field(repr=False)
    cut: int = 0

    @property
    def head_out_norm(self) -> np.ndarray:
        """(L, H, T, T), computed at each use from the weights: moved(layer) holds one layer of it."""
        return self.weights * self.value_out_norm[:, :, None, :]  # (L, H, T, T)

    def query_stages(self) -> dict[str, np.ndarray]:
        """The queries before the scores took them, at each stage the model has before q, in its order:
        q_projected (W_q x), then q_normed (after qk_norm, when rope rotates it after); none without either."""
        stages = {"q_projected": self.q_projected, "q_normed": self.q_normed}
        return {name: a for name, a in stages.items() if a is not None}

    def moved(self, layer: int) -> np.ndarray:
        """head_out_norm of one layer, (H, T, T): at GPT-2's 1,024 tokens the whole of it is 600 MB."""
        check_layer(layer, self.shape[0])
        return self.weights[layer] * self.value_out_norm[layer][:, None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layer, n_head, T)."""
        return self.weights.shape[0], self.weights.shape[1], self.weights.shape[2]


class Recorder:
    """The Tap trace() hands the model: keeps one text's tensors per layer, as float32 on the CPU."""

    def __init__(self):
        self.attention_steps, self.blocks, self.projections = [], [], []

    def attention(self, layer, q, k, v, scores, weights, projected, normed):
        self.attention_steps.append([t[0].float().cpu() for t in (q, k, v, scores, weights)])  # (nh, T, .) each
        # a stage the model does not have is q and k themselves, the same tensors: kept once, as q and k
        stages = [projected if projected[0] is not q else None, normed if normed and normed[0] is not q else None]
        self.projections.append([t[0].float().cpu() if pair is not None else None
                                 for pair in stages for t in (pair or (None, None))])

    def block(self, layer, x, y, out):
        self.blocks.append([t[0].float().cpu() for t in (x, y, out)])


@torch.no_grad()
def trace(model: GPT, ids, tokens: list[str] | None = None) -> Mechanism:
    """Run one text (its token ids) through the model and keep what each head computed (see Mechanism).

    Only the last block_size tokens are traced (cut says how many were left out). The model runs in eval
    mode (no dropout) and in float32, and is left in the mode it came in.
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("trace needs at least one token")
    window = ids[-model.config.block_size:]
    device = next(model.parameters()).device
    idx = torch.tensor(window, dtype=torch.long, device=device)[None]  # (1, T)
    recorder = Recorder()
    with evaluating(model), torch.autocast(device.type, enabled=False):
        final, _ = model.trunk(idx, None, need_weights=True, tap=recorder)  # (1, T, C), after ln_f
        raw_logits = model.lm_head(final)[0].float().cpu()  # (T, V): no softcap, which DLA cannot split
        lens_ids, lens_probs = logit_lens(model, [recorder.blocks[0][0]] + [b[2] for b in recorder.blocks])
    steps = recorder.attention_steps
    q, k, v, scores, weights = (torch.stack([s[i] for s in steps]) for i in range(5))  # (L, H, T, .) each
    # (L, H, T, hs) each: c_attn's q and k, then qk_norm's (None where the model has no such step before q and k)
    q_projected, k_projected, q_normed, k_normed = (
        torch.stack([p[i] for p in recorder.projections]).numpy() if recorder.projections[0][i] is not None
        else None for i in range(4))
    T = idx.size(1)
    scores = scores.masked_fill(~causal_mask(T, T, 0, scores.device), float("-inf"))  # (L, H, T, T)
    context = torch.stack([b[1] for b in recorder.blocks])  # (L, H, T, hs)
    w_o = [block.attn.c_proj.weight.detach().float().cpu() for block in model.transformer.h]  # (C, C) each
    value_out = torch.stack([per_head(v[layer], w_o[layer]) for layer in range(len(w_o))])  # (L, H, T, C)
    head_outputs = torch.stack([per_head(context[layer], w_o[layer]) for layer in range(len(w_o))])  # (L, H, T, C)
    predicted = raw_logits.argmax(dim=-1)  # (T,)
    attribution = logit_attribution(model, recorder.blocks, head_outputs, predicted)
    return Mechanism(
        token_ids=np.asarray(window, dtype=np.int64),
        tokens=list(tokens[-len(window):]) if tokens is not None else [str(i) for i in window],
        weights=weights.numpy(), scores=scores.numpy(), q=q.numpy(), k=k.numpy(), v=v.numpy(),
        context=context.numpy(), value_out_norm=value_out.norm(dim=-1).numpy(),
        predicted=predicted.numpy(), logit=raw_logits.gather(1, predicted[:, None])[:, 0].numpy(),
        attribution={name: part.numpy() for name, part in attribution.items()},
        lens_ids=lens_ids.numpy(), lens_probs=lens_probs.numpy(), head_outputs=head_outputs.numpy(),
        cut=len(ids) - len(window), q_projected=q_projected, k_projected=k_projected, q_normed=q_normed,
        k_normed=k_normed,
    )


def per_head(vectors: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Each head's vectors (H, T, hs) through its own slice of c_proj's weight w_o (C, H hs): (H, T, C), what
    the head writes into the residual stream (c_proj's bias belongs to no head)."""
    H, T, hs = vectors.shape
    w_heads = w_o.view(w_o.size(0), H, hs)  # (C, H, hs): column block h is head h's W_O,h
    return torch.einsum("htd,chd->htc", vectors, w_heads)


def final_norm_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ln_f divides each position of the stream x (T, C) by: sqrt(var + eps) for LayerNorm, the RMS
    for RMSNorm. Held fixed, it makes ln_f linear in x, so the stream's parts can be read through it apart."""
    if isinstance(norm, nn.LayerNorm):
        return torch.sqrt(x.var(dim=-1, unbiased=False) + norm.eps)  # (T,)
    return torch.sqrt(x.square().mean(dim=-1) + norm.eps)  # (T,)


def logit_attribution(model: GPT, blocks: list, head_outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Each part of the final residual stream's share of the logit of targets (T,), the token at each position.

    blocks: each block's (stream in (T, C), context vectors, stream out), as Recorder keeps them;
    head_outputs (L, H, T, C). The stream leaving the last block is the embeddings, plus for each block its
    heads' outputs, c_proj's bias and the MLP's output, plus any U-net skip added before it. ln_f (its scale
    at each position fixed), then lm_head, is linear in those parts: their shares sum to the logit.
    """
    norm, head = model.transformer.ln_f, model.lm_head
    final = blocks[-1][2]  # (T, C)
    scale = final_norm_scale(norm, final)  # (T,)
    gain = norm.weight.detach().float().cpu() if norm.weight is not None else torch.ones(final.size(-1))
    unembed = head.weight.detach().float().cpu()[targets]  # (T, C): each position's target row of lm_head
    direction = gain * unembed / scale[:, None]  # (T, C)
    centre = isinstance(norm, nn.LayerNorm)

    def share(part: torch.Tensor) -> torch.Tensor:  # (..., T, C) -> (..., T)
        if centre:
            part = part - part.mean(dim=-1, keepdim=True)
        return (part * direction).sum(dim=-1)

    heads, attn_bias, mlp, skip = [], [], [], []
    for layer, (x, _, out) in enumerate(blocks):
        attn = model.transformer.h[layer].attn
        bias = attn.c_proj.bias.detach().float().cpu() if attn.c_proj.bias is not None else torch.zeros(x.size(-1))
        attn_out = head_outputs[layer].sum(dim=0) + bias  # (T, C): all heads mixed, as c_proj writes them
        heads.append(share(head_outputs[layer]))  # (H, T)
        attn_bias.append(share(bias.expand_as(x)))  # (T,)
        mlp.append(share(out - x - attn_out))  # (T,): what the block added besides attention: its MLP
        skip.append(share(x - blocks[layer - 1][2]) if layer else torch.zeros(x.size(0)))
    norm_bias = getattr(norm, "bias", None)
    return {
        "heads": torch.stack(heads), "embed": share(blocks[0][0]), "attn_bias": torch.stack(attn_bias),
        "mlp": torch.stack(mlp), "skip": torch.stack(skip),
        "norm_bias": (unembed @ norm_bias.detach().float().cpu()) if norm_bias is not None else torch.zeros(len(final)),
    }


def logit_lens(model: GPT, streams: list[torch.Tensor], top: int = LENS_TOP) -> tuple[torch.Tensor, torch.Tensor]:
    """The likeliest tokens read off each stream (T, C) through ln_f and the output head: (ids, probabilities),
    each (len(streams), T, top). One stream at a time: GPT-2's 1,024 x 50,257 logits are 200 MB each."""
    device = next(model.parameters()).device
    ids, probs = [], []
    for stream in streams:
        logits = model.head(model.transformer.ln_f(stream.to(device)))  # (T, V)
        p, i = torch.softmax(logits.float(), dim=-1).topk(min(top, logits.size(-1)), dim=-1)  # (T, top) each
        ids.append(i.cpu())
        probs.append(p.cpu())
    return torch.stack(ids), torch.stack(probs)


def packed(a: np.ndarray) -> np.ndarray:
    """The lower triangles of a stack of (T, T) matrices, row by row, as attention.npz keeps them:
    (..., T, T) -> (..., T (T + 1) / 2); row q starts at q (q + 1) / 2."""
    rows, cols = np.tril_indices(a.shape[-1])  # row-major: (0,0), (1,0), (1,1), (2,0), ...
    return a[..., rows, cols]


def unpacked(tril: np.ndarray, T: int, above: float, dtype=np.float32) -> np.ndarray:
    """packed's inverse: (..., T (T + 1) / 2) -> (..., T, T), with above in every cell above the diagonal."""
    full = np.full((*tril.shape[:-1], T, T), above, dtype=dtype)
    rows, cols = np.tril_indices(T)
    full[..., rows, cols] = tril
    return full


def mechanism_arrays(mechanism: Mechanism) -> dict[str, np.ndarray]:
    """The entries a Mechanism adds to a dump's attention.npz (glimpse/attention.py's docstring lists them): per
    layer, the triangles packed as the weights are."""
    arrays = {}
    for layer in range(mechanism.shape[0]):
        arrays.update({f"q_{layer}": mechanism.q[layer], f"k_{layer}": mechanism.k[layer],
                       f"v_{layer}": mechanism.v[layer], f"scores_{layer}": packed(mechanism.scores[layer]),
                       f"head_out_norm_{layer}": packed(mechanism.moved(layer)),
                       **{f"{name}_{layer}": stage[layer] for name, stage in mechanism.query_stages().items()}})
    arrays.update({"predicted": mechanism.predicted.astype(np.int32), "logit": mechanism.logit,
                   **{f"dla_{name}": part for name, part in mechanism.attribution.items()},
                   "lens_ids": mechanism.lens_ids.astype(np.int32), "lens_probs": mechanism.lens_probs})
    return {name: np.asarray(a, dtype=np.int32 if a.dtype.kind in "iu" else np.float32) for name, a in arrays.items()}


def check_layer(layer, n_layer: int, of: str = "the model's"):
    """A GlimpseError unless layer is a whole number from 0 to n_layer - 1 (a negative one would count from the end
    silently; True would be layer 1)."""
    if isinstance(layer, bool) or not (isinstance(layer, int | np.integer) and 0 <= layer < n_layer):
        raise GlimpseError(f"layer must be a whole number from 0 to {n_layer - 1} ({of} {n_layer} layers); "
                           f"got {layer!r}")


def dump_file(folder: str | Path) -> Path:
    """The attention.npz of a dump's folder (or that file itself); a GlimpseError for a path that holds none."""
    path = Path(folder)
    if not (path.name == "attention.npz" and path.is_file()):
        path = path / "attention.npz"
    if not path.is_file():
        raise GlimpseError(f"no attention.npz in {folder}: give a dump's folder (sample.py writes "
                           "OUT_DIR/attention/sample_<i>/; run.save(folder) the folder given)")
    return path


def load_mechanism(folder: Path) -> dict[str, np.ndarray]:
    """A mechanism dump's arrays at their full shapes, with numpy alone: q, k, v (L, H, T, hs) and the query's
    stages the dump holds (q_projected, q_normed: see Mechanism.query_stages); scores (L, H, T, T), -inf above
    the diagonal; head_out_norm (L, H, T, T), 0 above it; predicted, logit,
    lens_ids, lens_probs; the attribution's parts as attribution_<part>. A GlimpseError names a dump written
    without --mechanism."""
    with np.load(dump_file(folder), allow_pickle=False) as z:
        if "scores_0" not in z.files:
            raise GlimpseError(f"{folder} holds no mechanism: dump it with sample.py --mechanism")
        T, L = len(z["token_ids"]), sum(name.startswith("scores_") for name in z.files)
        out = {name: np.stack([z[f"{name}_{layer}"] for layer in range(L)]) for name in ("q", "k", "v")}
        out.update({name: np.stack([z[f"{name}_{layer}"] for layer in range(L)])
                    for name in ("q_projected", "q_normed") if f"{name}_0" in z.files})
        for name, above in (("scores", -np.inf), ("head_out_norm", 0.0)):
            out[name] = unpacked(np.stack([z[f"{name}_{layer}"] for layer in range(L)]), T, above)
        for name in ("predicted", "logit", "lens_ids", "lens_probs"):
            out[name] = z[name]
        out.update({f"attribution_{name[4:]}": z[name] for name in z.files if name.startswith("dla_")})
    return out
