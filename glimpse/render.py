"""
Pictures of attention: a PNG per layer, and the colours the HTML viewer (glimpse/viewer.py) shares with them.

They take `attn` (n_layer, n_head, T, T) post-softmax weights, rows are queries and columns keys, 0 above
the diagonal; `tokens`, the text of each of the T positions; and `prompt_len`, how many of them were the
prompt (the rest were generated).

Colours follow the square root of the weight by default. A query spread evenly over 256 keys gives
each one 0.004, which a linear scale draws as black; the square root keeps diffuse heads visible
while a weight of 1 still stands out. The colour bars are labelled in real weights.
"""

from __future__ import annotations

import math
import textwrap
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORMAP = "viridis"
DIVERGING_COLORMAP = "RdBu_r"  # scores, logit attributions, head removal: blue below 0, red above, white at 0
MOVED_COLORMAP = "magma"  # what a head moved: sequential like the weights, but not to be mistaken for them
MASKED_COLOR = "#eeeeee"  # above the diagonal: keys a query cannot see, unlike a weight of 0
GENERATED_COLOR = "#c0392b"  # axis labels of generated tokens; prompt tokens stay black
AXES_NOTE = "query ↓ · key →"  # rows are queries, as in QK^T
MAX_LABELLED_TOKENS = 64  # past this, token text on the axes would overlap: positions only
VISIBLE_CHARS = {"\n": "⏎", "\t": "⇥", " ": "␣"}
# characters that show as nothing, or as a break the label cannot hold: controls, surrogates, format marks (zero
# widths, joiners), line and paragraph separators (U+2028, U+2029) and spaces other than " " (no-break, U+3000)
UNSEEN = ("Cc", "Cs", "Cf", "Zl", "Zp", "Zs")


def token_label(token: str, limit: int = 12) -> str:
    """A token as one short visible label: whitespace as ⏎ ⇥ ␣, other characters that show as nothing as
    \\xNN or \\uNNNN."""
    if token == "":
        return "∅"
    chars = []
    for ch in token:
        if ch in VISIBLE_CHARS:
            chars.append(VISIBLE_CHARS[ch])
        elif unicodedata.category(ch) in UNSEEN:
            n = ord(ch)
            chars.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
        else:
            chars.append(ch)
    label = "".join(chars)
    return label if len(label) <= limit else label[: limit - 1] + "…"


def checked_attention(attn, tokens, prompt_len: int) -> np.ndarray:
    """attn as a float array (n_layer, n_head, T, T), or a ValueError that says what does not fit.

    A float array comes back as it is, not copied: GPT-2 small's dump over 1024 tokens is 300 MB in
    float16 and would be 600 MB in float32, so the callers convert one layer at a time.
    """
    attn = np.asarray(attn)
    if not np.issubdtype(attn.dtype, np.floating):
        attn = attn.astype(np.float32)
    if attn.ndim != 4 or attn.shape[2] != attn.shape[3]:
        hint = " (a batch of dumps? pick one: attn[:, 0])" if attn.ndim == 5 else ""
        raise ValueError(f"attn must be (n_layer, n_head, T, T), got shape {attn.shape}{hint}")
    if attn.shape[0] < 1 or attn.shape[1] < 1 or attn.shape[2] < 1:
        raise ValueError(f"attn has an empty dimension: shape {attn.shape}")
    if len(tokens) != attn.shape[2]:
        raise ValueError(f"{len(tokens)} tokens for attention over T={attn.shape[2]} positions")
    if not 0 <= prompt_len <= attn.shape[2]:
        raise ValueError(f"prompt_len must be in [0, T={attn.shape[2]}], got {prompt_len}")
    if not all(np.isfinite(layer).all() for layer in attn):  # per layer: no mask the size of the dump
        raise ValueError("attn holds NaN or infinite weights")
    return attn


def write_layer_images(folder: Path, attn, tokens, prompt_len: int) -> list[Path]:
    """One PNG per layer, folder/layer_<l>.png, the layer's heads side by side; returns the paths."""
    attn = checked_attention(attn, tokens, prompt_len)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [token_label(t) for t in tokens]
    paths = []
    for layer in range(attn.shape[0]):
        path = folder / f"layer_{layer}.png"
        fig = layer_figure(attn[layer].astype(np.float32), layer, labels, prompt_len)  # (H, T, T)
        with warnings.catch_warnings():
            # tokens in scripts DejaVu Sans lacks draw as boxes; one warning per glyph is only noise
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(path, dpi=fig.dpi)
        fig.clear()  # Figure made without pyplot: nothing global holds it once cleared and dropped
        paths.append(path)
    return paths


def write_importance_image(path: Path, increase: np.ndarray, title: str) -> Path:
    """A heatmap of each head's loss increase when it is removed: layers down, heads across (L, H)."""
    n_layer, n_head = increase.shape
    fig = Figure(figsize=(max(5.0, 1.6 + 0.7 * n_head), 1.4 + 0.55 * n_layer), dpi=120)
    ax = fig.add_subplot()
    span = max(float(np.abs(increase).max()), 1e-9)  # a diverging scale centred on 0: red costs, blue helps
    image = ax.imshow(increase, cmap=DIVERGING_COLORMAP, vmin=-span, vmax=span, aspect="auto")
    for (layer, head), value in np.ndenumerate(increase):
        dark = abs(value) > 0.6 * span  # white on the deepest colours, black elsewhere
        ax.text(head, layer, f"{value:+.3f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(n_head), [str(h) for h in range(n_head)])
    ax.set_yticks(range(n_layer), [str(layer) for layer in range(n_layer)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=8)
    fig.colorbar(image, ax=ax, label="loss increase (nats per token)")
    fig.tight_layout()
    fig.savefig(path)
    fig.clear()
    return path


def layer_figure(layer_attn: np.ndarray, layer: int, labels: list[str], prompt_len: int) -> Figure:
    """A figure of one layer's heads (n_head, T, T) as heatmaps sharing one colour bar."""
    n_head, T, _ = layer_attn.shape
    labelled = T <= MAX_LABELLED_TOKENS
    font = 7 if T <= 32 else 6
    # inches: each panel holds T label rows of `font` points when labelled; margins hold the labels
    panel = max(3.0, 0.11 * T) if labelled else 3.6
    label_room = 0.15 + max(map(len, labels)) * font * 0.65 / 72 if labelled else 0.6
    left, bottom, top, right, gap = label_room, label_room, 0.35, 0.15, 0.1
    cell_w, cell_h = left + panel + right, top + panel + bottom + gap
    # wrap into rows of at most 4 panels (fewer if the figure would pass ~24 in), rows evenly filled
    n_rows = math.ceil(n_head / max(1, min(4, int(24 // cell_w))))
    n_cols = math.ceil(n_head / n_rows)
    title_h, bar_w = 0.45, 1.0
    width, height = n_cols * cell_w + bar_w, n_rows * cell_h + title_h
    dpi = 120 if labelled else 110  # labels of 6-7 points need ~10 pixels to read
    # axes placed by hand in inches: a layout engine measures every tick label and costs more time
    # than the drawing itself
    fig = Figure(figsize=(width, height), dpi=dpi)

    # past one pixel per token, pool blocks by their maximum so that a thin line (a previous-token
    # diagonal) survives the shrinking instead of being skipped
    block = max(1, math.ceil(T / (panel * dpi)))
    cmap = colormaps[COLORMAP].with_extremes(bad=MASKED_COLOR)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    masked = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T) True where key j > query i
    hidden = pooled(masked, block, reduce=np.min)
    for head in range(n_head):
        row, col = divmod(head, n_cols)
        x0 = col * cell_w + left
        y0 = height - title_h - (row + 1) * cell_h + bottom + gap
        ax = fig.add_axes((x0 / width, y0 / height, panel / width, panel / height))
        image = ax.imshow(
            np.ma.masked_array(pooled(layer_attn[head], block), hidden), cmap=cmap, norm=norm,
            interpolation="nearest", extent=(-0.5, T - 0.5, T - 0.5, -0.5),  # axes in token positions
        )
        ax.set_title(f"layer {layer} · head {head}", fontsize=10, pad=4)
        if 0 < prompt_len < T:  # where generation took over from the prompt, below the diagonal only
            edge = prompt_len - 0.5
            ax.vlines(edge, edge, T - 0.5, colors="white", linewidths=0.8, linestyles="--")
            ax.hlines(edge, -0.5, edge, colors="white", linewidths=0.8, linestyles="--")
        if labelled:
            label_axes(ax, labels, prompt_len, font)
            # the tokens fill the margins an axis title would take: the masked corner says which way is which
            ax.text(0.98, 0.98, AXES_NOTE, transform=ax.transAxes, ha="right", va="top", fontsize=font, color="#444")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.tick_params(labelsize=7, length=2, pad=1)
            ax.set_xlabel("key position", fontsize=8, labelpad=1)
            ax.set_ylabel("query position", fontsize=8, labelpad=1)
    bar_h = min(n_rows * cell_h - bottom - gap - top, 4.0)
    bar_y = height - title_h - top - bar_h
    bar_ax = fig.add_axes((1 - 0.8 * bar_w / width, bar_y / height, 0.15 / width, bar_h / height))
    colorbar = fig.colorbar(image, cax=bar_ax)
    colorbar.set_ticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 1])
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label("attention weight (√ scale)", fontsize=8)
    pooling = f" · {block}×{block} blocks shown by their max" if block > 1 else ""
    # what the dashed lines and the red labels mark, where the picture shows them
    marks = (" (dashed lines: the prompt's end" + ("; generated tokens in red)" if labelled else ")")
             if 0 < prompt_len < T else "")
    fig.suptitle(f"layer {layer} · {T} tokens: {prompt_len} prompt, {T - prompt_len} generated{marks}{pooling}",
                 fontsize=11, y=1 - 0.12 / height, va="top")
    return fig


def label_axes(ax, labels: list[str], prompt_len: int, size: float):
    """Every token's text beside its column (below) and its row (left); generated tokens in red."""
    # plain texts, not tick labels: matplotlib builds a whole Tick (marks, label, grid line) per label,
    # a cost per token that plain texts do not pay
    ax.set_xticks([])
    ax.set_yticks([])
    # below: x in token positions, y as a fraction of the axes (just under 0); beside: the other way round
    below, beside = ax.get_xaxis_transform(), ax.get_yaxis_transform()
    for i, label in enumerate(labels):
        color = GENERATED_COLOR if i >= prompt_len else "black"
        # parse_math off: a token such as "$x$" is text, not a formula
        ax.text(i, -0.006, label, transform=below, rotation=90, ha="center", va="top", fontsize=size,
                color=color, parse_math=False)
        ax.text(-0.006, i, label, transform=beside, ha="right", va="center", fontsize=size, color=color,
                parse_math=False)


def pooled(a: np.ndarray, block: int, reduce=np.max) -> np.ndarray:
    """(T, T) -> (ceil(T / block), ceil(T / block)), each block reduced to one value."""
    if block == 1:
        return a
    T = a.shape[0]
    n = math.ceil(T / block)
    padded = np.pad(a, ((0, n * block - T), (0, n * block - T)), mode="edge")  # edge: adds no new max or min
    return reduce(padded.reshape(n, block, n, block), axis=(1, 3))


def colormap_bytes(name: str = COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colormap, so the viewer's colours match the PNGs'."""
    return np.rint(255 * colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]).astype(np.uint8)


def hex_colours(name: str) -> list[str]:
    """A colormap's 256 colours as "rrggbb" strings, as the viewer reads them."""
    return [f"{r:02x}{g:02x}{b:02x}" for r, g, b in colormap_bytes(name)]
