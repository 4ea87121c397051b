"""
Removing attention heads, to measure what a model loses without them: causal evidence, where an
attention map only shows where a head looks.

A head is removed by replacing its context vector (its output before c_proj mixes the heads) with
zeros (ablation=zero) or with that head's mean over the scored text (ablation=mean, which keeps the
residual stream at its usual scale, so what is lost is what the head says about this token, not its
average contribution). Heads are named layer.head, counted from 0, as in the dumps.

    parse_heads       "1.0,2.3" -> [(1, 0), (2, 3)], checked against the model's shape
    Ablation          a HeadEdit (glimpse/self_attention.py) that removes heads, a different set per batch row if asked
    HeadMeans         a HeadEdit that changes nothing and averages every head's context vectors
    mean_loss         the mean loss over windows, with a HeadEdit in place
    losses_per_head   the loss intact and with each head removed alone, several removals per forward,
                      each from the residual stream where its layer starts (residual_streams, forward_from)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from tqdm import tqdm

from glimpse.config import option
from glimpse.errors import GlimpseError
from glimpse.runtime import sum_dtype

AblationKind = Literal["zero", "mean"]
ABLATIONS = get_args(AblationKind)
LOGITS_BYTES = 256 * 2**20  # the most float32 logits losses_per_head holds at once


def ablation_option(over: str):
    """The --ablation field of the scripts that remove heads; over: the text a head's mean is taken over."""
    return option("zero", f"what a removed head outputs instead: zeros, or its mean context vector over {over} "
                          "(keeps the residual stream's scale; one extra pass)")


def check_removals(ablate: str, ablation: str, head_importance: bool):
    """The checks --ablate, --ablation and --head_importance need before any model is loaded."""
    if ablate:
        parse_heads(ablate)  # the syntax; the model's shape is checked once it is loaded
    if ablate and head_importance:
        raise ValueError("--head_importance removes every head in turn; drop --ablate, or drop --head_importance")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")


def parse_heads(spec: str, n_layer: int | None = None, n_head: int | None = None,
                named: str = "--ablate") -> list[tuple[int, int]]:
    """The heads a --ablate list names, in its order; without a shape, only the syntax is checked. Errors call
    the list by named (a script's flag; the notebook API's argument)."""
    heads = []
    for item in (part.strip() for part in spec.split(",")):
        layer, dot, head = item.partition(".")
        if not (dot and layer.isascii() and layer.isdigit() and head.isascii() and head.isdigit()):  # not '²'
            raise GlimpseError(f"{named} takes heads as layer.head, comma-separated (1.0,2.3), counted from 0; "
                               f"got {item!r}")
        heads.append((int(layer), int(head)))
    twice = sorted({f"{layer}.{head}" for layer, head in heads if heads.count((layer, head)) > 1})
    if twice:
        raise GlimpseError(f"{named} names head {', '.join(twice)} more than once")
    for layer, head in heads:
        if n_layer is not None and layer >= n_layer:
            raise GlimpseError(f"{named} names layer {layer}, but the model has {n_layer} layers (0 to {n_layer - 1})")
        if n_head is not None and head >= n_head:
            raise GlimpseError(f"{named} names head {layer}.{head}, but each layer has {n_head} heads "
                               f"(0 to {n_head - 1})")
    return heads


class Ablation:
    """Removes heads: keep (R, L, H) is 1 for a head that stays and 0 for one removed, for each of R batch
    rows (R = 1: the same heads for every row); value (L, H, hs) is what a removed head says instead
    (its mean), or None for zeros."""

    def __init__(self, keep: torch.Tensor, value: torch.Tensor | None = None):
        self.keep, self.value = keep, value

    @classmethod
    def of(cls, heads: list[tuple[int, int]], n_layer: int, n_head: int, value: torch.Tensor | None = None,
           device=None) -> Ablation:
        """The same heads removed in every row."""
        keep = torch.ones(1, n_layer, n_head, device=device)
        for layer, head in heads:
            keep[0, layer, head] = 0.0
        return cls(keep, value)

    def edit(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        keep = self.keep[:, layer, :, None, None].to(y.dtype)  # (R, nh, 1, 1)
        if self.value is None:
            return y * keep  # (B, nh, T, hs)
        value = self.value[layer][None, :, None, :].to(y.dtype)  # (1, nh, 1, hs)
        return y * keep + value * (1 - keep)


class HeadMeans:
    """Changes nothing; sums each head's context vectors over every position of every row it sees."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, device=None):
        dtype = sum_dtype(device or "cpu")
        self.sums = torch.zeros(n_layer, n_head, head_dim, dtype=dtype, device=device)
        self.positions = torch.zeros(n_layer, dtype=dtype, device=device)

    def edit(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        self.sums[layer] += y.to(self.sums.dtype).sum(dim=(0, 2))  # (nh, hs)
        self.positions[layer] += y.size(0) * y.size(2)
        return y

    def means(self) -> torch.Tensor:
        """(L, H, hs): each head's mean context vector, in float32."""
        return (self.sums / self.positions[:, None, None]).float()


def head_means(model, inputs: torch.Tensor, batch_rows: int, ctx) -> torch.Tensor:
    """(L, H, hs): every head's mean context vector over the windows inputs (N, T), one extra pass."""
    c = model.config
    collect = HeadMeans(c.n_layer, c.n_head, c.n_embd // c.n_head, device=inputs.device)
    with torch.inference_mode(), ctx:
        for i in range(0, len(inputs), batch_rows):
            model(inputs[i:i + batch_rows], heads=collect, last_only=True)  # the heads' outputs, not the logits
    return collect.means()


@torch.inference_mode()
def mean_loss(model, inputs: torch.Tensor, targets: torch.Tensor, heads, ctx, batch_rows: int) -> float:
    """Mean loss over every target of the windows (N, T), with heads (a HeadEdit, or None) in place."""
    total = torch.zeros((), dtype=sum_dtype(inputs.device), device=inputs.device)
    for i in range(0, len(inputs), batch_rows):
        with ctx:
            logits, _ = model(inputs[i:i + batch_rows], heads=heads)  # (b, T, V)
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets[i:i + batch_rows], reduction="sum")
        total += losses.to(total.dtype)
    return total.item() / targets.numel()


@torch.inference_mode()
def losses_per_head(model, inputs: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor,
                    value: torch.Tensor | None, ctx, max_rows: int = 64,
                    show_progress: bool = False) -> tuple[float, torch.Tensor]:
    """Mean loss over the scored target positions, intact and with each head removed alone: (loss, (L, H)).

    inputs and targets are (N, T) windows, scored a (T,) bool mask of the positions that count. Removing
    a head of layer l changes nothing before that layer's heads have spoken, so the residual stream
    entering block l and its heads' context vectors are computed once, intact, and the removals of
    layer l's heads start from them (forward_from), as copies of the windows stacked in one batch,
    a different head removed in each copy, up to max_rows rows per forward: on a CPU, fewer and larger
    forwards cost less than one after another. Under value_embeds or unet, later blocks read more than the
    stream entering them, and each removal runs the whole network instead. show_progress: a progress bar on a
    terminal, counting the windows scored without a head (N x L x H in all; the cost: docs/ablation.md).
    """
    c = model.config
    n_scored = len(inputs) * int(scored.sum())

    def loss_sum(logits, y):  # (R, T, V), (R, T) -> (R,) summed over the scored positions
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (R, T)
        return losses[:, scored].to(intact.dtype).sum(dim=1)

    intact = torch.zeros((), dtype=sum_dtype(inputs.device), device=inputs.device)
    without = torch.zeros(c.n_layer, c.n_head, dtype=intact.dtype, device=inputs.device)
    heads = torch.arange(c.n_head, device=inputs.device)
    per_layer = []  # per_layer[l] (H, L, H): copy h keeps every head but head h of layer l
    for layer in range(c.n_layer):
        keep = torch.ones(c.n_head, c.n_layer, c.n_head, device=inputs.device)
        keep[heads, layer, heads] = 0.0
        per_layer.append(keep)
    # the logits of a forward's rows are held at once: at GPT-2's 1,024 tokens and 50,257 tokens of vocabulary
    # one row's are 206 MB, so the rows a forward takes shrink to keep them within LOGITS_BYTES
    max_rows = max(1, min(max_rows, LOGITS_BYTES // (inputs.size(1) * c.vocab_size * 4)))
    windows = max(1, max_rows // c.n_head)  # as many windows a forward as max_rows allows
    whole = bool(c.value_embeds or c.unet)  # later blocks read more than the stream: every forward runs whole
    bar = tqdm(total=len(inputs) * c.n_layer * c.n_head, desc="scoring without each head", unit="window",
               leave=False, disable=None if show_progress else True)  # None: shown on a terminal only
    with bar:
        for w in range(0, len(inputs), windows):
            x, y = inputs[w:w + windows], targets[w:w + windows]  # (b, T) each
            b = x.size(0)
            per_forward = max(1, max_rows // b)  # heads removed in one forward, one copy of the windows each
            with ctx:  # one autocast region for the window's forwards: the weights are cast once, not once each
                logits, streams = residual_streams(model, x)  # (b, T, V), n_layer of (b, T, C)
                intact += loss_sum(logits, y).sum()
                for layer in range(c.n_layer):
                    x_in, y_in = streams[layer]  # (b, T, C), (b, nh, T, hs): the layer's input, what its heads say
                    for first in range(0, c.n_head, per_forward):
                        chosen = heads[first:first + per_forward]  # (k,): the heads removed, one per copy
                        k = len(chosen)
                        ablation = Ablation(per_layer[layer][chosen].repeat_interleave(b, 0), value)  # (k b, L, H)
                        if whole:  # (k b, T, V): row i b + j removes head chosen[i]
                            logits = model(x.repeat(k, 1), heads=ablation)[0]
                        else:
                            logits = forward_from(model, layer, x_in.repeat(k, 1, 1), y_in.repeat(k, 1, 1, 1),
                                                  ablation)
                        without[layer, chosen] += loss_sum(logits, y.repeat(k, 1)).view(k, b).sum(dim=1)
                        bar.update(k * b)
    return intact.item() / n_scored, (without / n_scored).float().cpu()


def residual_streams(model, idx) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The logits (B, T, V) of model (a GPT), and for each block the residual stream entering it (B, T, C)
    and its heads' context vectors (B, nh, T, hs), for forward_from."""
    record = []
    x, _ = model.trunk(idx, None, need_weights=False, record=record)
    return model.head(x), record


def forward_from(model, layer: int, x, y, heads=None):
    """Logits (B, T, V) from block `layer` on, given the residual stream x (B, T, C) entering it and its
    heads' context vectors y (B, nh, T, hs), as residual_streams records them: nothing before those
    is computed again, which is all that removing heads of that layer changes. Not for models with
    value_embeds or unet, whose later blocks need more than x."""
    c, blocks = model.config, model.transformer.h
    if c.value_embeds or c.unet:
        raise ValueError("forward_from needs value_embeds = 0 and unet = false: later blocks of this model "
                         "read the tokens or earlier blocks' outputs too")
    pos = torch.arange(x.size(1), device=x.device)  # (T,): the window's positions, from 0 (no cache)
    rope, masks = model.layer_inputs(pos, 0, need_weights=False)
    x = blocks[layer].finish(x, y, layer, heads)  # (B, T, C)
    for i in range(layer + 1, c.n_layer):
        x, _ = blocks[i](x, rope=rope, layer=i, heads=heads, masks=masks)  # (B, T, C)
    return model.head(model.transformer.ln_f(x))


def top_heads(losses: torch.Tensor, intact: float, n: int = 10) -> list[dict]:
    """The n heads whose removal costs most, largest loss increase first."""
    rows = [{"layer": layer, "head": head, "loss": float(losses[layer, head]),
             "loss_increase": float(losses[layer, head]) - intact}
            for layer in range(losses.size(0)) for head in range(losses.size(1))]
    return sorted(rows, key=lambda r: -r["loss_increase"])[:n]
