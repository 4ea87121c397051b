"""
Pictures of attention: a PNG per layer, and one HTML page to explore the whole dump.

Both take the same inputs: `attn` (n_layer, n_head, T, T) post-softmax weights, rows are queries and
columns keys, 0 above the diagonal; `tokens`, the text of each of the T positions; and `prompt_len`,
how many of them were the prompt (the rest were generated).

Colours follow the square root of the weight by default. A query spread evenly over 256 keys gives
each one 0.004, which a linear scale draws as black; the square root keeps diffuse heads visible
while a weight of 1 still stands out. The colour bars are labelled in real weights.

The viewer is a single file with everything inside it (no network, no fonts or scripts from
elsewhere), so it opens from disk on an air-gapped machine. The weights travel as one byte each, the
square root quantised to 0..255 (at most 0.004 off), only the lower triangle, and deflated layer by
layer: the page inflates a layer (the browser's own DecompressionStream) when it is first shown, so a
GPT-2 small dump over 1024 tokens opens in seconds instead of decoding 144 heads up front. A small
max-pooled picture of every head travels uncompressed beside them, for the layer x head picker.

With a Mechanism (glimpse/mechanism.py) the page also shows how each head got its weights: the
pre-softmax scores, what each head moved from each key, the lecture's computation step by step for one
query, the logit attribution and the logit lens. Its numbers travel as float16 (float32 when a value
would not fit), high and low bytes apart as in the npz, deflated per layer and inflated when first
shown; a dump without one carries exactly what it did before.

write_snapshot_index puts a slider over train.py's attention snapshots (out_dir/attention/iter_<n>/).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import textwrap
import unicodedata
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORMAP = "viridis"
DIVERGING_COLORMAP = "RdBu_r"  # scores and logit attributions: blue below 0, red above, white at 0
MOVED_COLORMAP = "magma"  # what a head moved: sequential like the weights, but not to be mistaken for them
MASKED_COLOR = "#eeeeee"  # above the diagonal: keys a query cannot see, unlike a weight of 0
GENERATED_COLOR = "#c0392b"  # axis labels of generated tokens; prompt tokens stay black
MAX_LABELLED_TOKENS = 64  # past this, token text on the axes would overlap: positions only
VIEWER_TEMPLATE = Path(__file__).with_name("viewer.html")
SNAPSHOTS_TEMPLATE = Path(__file__).with_name("snapshots.html")
DATA_PLACEHOLDER = "__GLIMPSE_DATA__"
VISIBLE_CHARS = {"\n": "⏎", "\t": "⇥", " ": "␣"}
THUMBNAIL_CELLS = 48  # a picker thumbnail is at most 48 x 48 cells: 144 of them stay light to embed and draw


def token_label(token: str, limit: int = 12) -> str:
    """A token as one short visible label: whitespace as ⏎ ⇥ ␣, other control characters as \\xNN."""
    if token == "":
        return "∅"
    chars = []
    for ch in token:
        if ch in VISIBLE_CHARS:
            chars.append(VISIBLE_CHARS[ch])
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            chars.append(f"\\x{ord(ch):02x}")
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
    image = ax.imshow(increase, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
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
    fig.suptitle(f"layer {layer} · {T} tokens: {prompt_len} prompt, {T - prompt_len} generated{pooling}",
                 fontsize=11, y=1 - 0.12 / height, va="top")
    return fig


def label_axes(ax, labels: list[str], prompt_len: int, size: float):
    """Every token's text beside its column (below) and its row (left); generated tokens in red."""
    # plain texts, not tick labels: matplotlib builds a whole Tick (marks, label, grid line) per label,
    # which made a labelled 6-head layer take twice as long to draw
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


def viewer_html(attn, tokens, prompt_len: int, meta: dict, heads: dict | None = None,
                importance: dict | None = None, mechanism=None, cut: int = 0,
                token_text: Callable[[list[int]], list[str]] | None = None) -> str:
    """A self-contained HTML page to pick a layer and head, see its heatmap, and hover tokens.

    importance ({"loss_increase": (L, H), ...}, glimpse/ablation.py) puts each head's loss increase
    without it on its thumbnail. mechanism, the text's Mechanism (its weights are attn), adds the scores
    and moved modes and the step-by-step, attribution and lens panels; token_text turns the token ids
    those panels name (predictions, the lens) into text, else they show as ids. cut: tokens before the
    window left out.
    """
    attn = checked_attention(attn, tokens, prompt_len)
    n_layer, n_head, T, _ = attn.shape
    data = {
        "n_layer": n_layer,
        "n_head": n_head,
        "T": T,
        "prompt_len": int(prompt_len),
        "tokens": [str(t) for t in tokens],
        "labels": [token_label(t) for t in tokens],
        "meta": plain(meta),
        "heads": plain(heads),
        "importance": plain(importance),
        "cut": int(cut),
        "colormap": [f"{r:02x}{g:02x}{b:02x}" for r, g, b in colormap_bytes()],
        "masked": MASKED_COLOR,
        **packed_weights(attn),
    }
    if mechanism is not None:
        data.update(packed_mechanism(mechanism, attn.shape[:3], meta, token_text))
    return VIEWER_TEMPLATE.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, script_json(data))


def script_json(data) -> str:
    """data as JSON to put inside a <script> element: ASCII with < > & escaped, so that no token can close
    the element it sits in, or open a comment."""
    payload = json.dumps(data, ensure_ascii=True, allow_nan=False)
    return payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_viewer(path: Path, attn, tokens, prompt_len: int, meta: dict, heads: dict | None = None,
                 importance: dict | None = None, mechanism=None, cut: int = 0,
                 token_text: Callable[[list[int]], list[str]] | None = None) -> Path:
    """Write viewer_html(...) to path as UTF-8; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html = viewer_html(attn, tokens, prompt_len, meta, heads, importance, mechanism, cut, token_text)
    path.write_text(html, encoding="utf-8")
    return path


def write_snapshot_index(attention_dir: Path) -> Path:
    """Write attention_dir/index.html: a slider over the snapshots train.py dumps there (iter_<n>/, by n),
    each shown by its own viewer in a frame, with play and pause; returns the path.

    The layer, head and mode picked stay as the steps change: the viewer in the frame reports them, and the
    page keeps them, with the step, in its own address (#step=..&layer=..&head=..&mode=..). A folder without
    its index.html (a dump still being written, or written without pictures) is left out. Written to a
    temporary name and renamed, since a browser may be reading it while training goes on.
    """
    attention_dir = Path(attention_dir)
    snapshots = sorted((int(match.group(1)), path.name) for path in attention_dir.iterdir()
                       if (match := re.fullmatch(r"iter_(\d+)", path.name)) and (path / "index.html").is_file())
    data = {"steps": [step for step, _ in snapshots], "folders": [name for _, name in snapshots]}
    path = attention_dir / "index.html"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(SNAPSHOTS_TEMPLATE.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, script_json(data)),
                       encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def packed_weights(attn: np.ndarray) -> dict:
    """The weights as the viewer reads them: {"weights": [L strings], "thumbnails": str, "thumbnail_block": int}.

    weights[l] is base64 of zlib of uint8 (n_head, T * (T + 1) / 2): round(255 * sqrt(w)) over the lower
    triangle, row q of a head starting at q * (q + 1) / 2 and holding keys 0..q; the viewer decodes
    (byte / 255)^2. thumbnails is base64 of uint8 (n_layer, n_head, n, n), the same bytes max-pooled
    over blocks of thumbnail_block x thumbnail_block cells (n = ceil(T / block)): the maximum, so that a
    thin line such as a previous-token diagonal survives the shrinking.
    """
    n_layer, n_head, T, _ = attn.shape
    block = math.ceil(T / THUMBNAIL_CELLS)
    starts = np.arange(0, T, block)  # (n,) first query, and first key, of each thumbnail block
    lower = np.flatnonzero(np.tri(T, dtype=bool))  # (T(T+1)/2,) the lower triangle in a flat (T * T), row-major
    thumbnails = np.empty((n_layer, n_head, starts.size, starts.size), dtype=np.uint8)
    layers = []
    for layer in range(n_layer):  # one layer at a time: never a float copy of the whole dump
        square = sqrt_bytes(attn[layer])  # (H, T, T) uint8
        thumbnails[layer] = np.maximum.reduceat(np.maximum.reduceat(square, starts, axis=1), starts, axis=2)
        packed = np.take(square.reshape(n_head, T * T), lower, axis=1)  # (H, T(T+1)/2)
        # level 1 with run-length matches only: most of a peaky head is long runs of zero bytes (weights
        # under 4e-6), which this compresses as well as level 9 does and much faster than the default;
        # noisy rows have no long matches for the slower levels to find anyway
        deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        layers.append(base64.b64encode(deflate.compress(packed) + deflate.flush()).decode("ascii"))
    return {"weights": layers, "thumbnails": base64.b64encode(thumbnails.tobytes()).decode("ascii"),
            "thumbnail_block": block}


def sqrt_bytes(weights: np.ndarray) -> np.ndarray:
    """round(255 * sqrt(w)) as uint8, for w clipped to [0, 1]; any shape, the same shape back."""
    if weights.dtype == np.float16:  # a dump's own dtype: one table look-up instead of four float passes
        return float16_sqrt_bytes()[weights.view(np.uint16)]
    scaled = np.clip(weights, 0.0, 1.0, dtype=np.float32)  # the only float copy, of one layer
    np.sqrt(scaled, out=scaled)
    scaled *= 255
    return np.rint(scaled, out=scaled).astype(np.uint8)


@functools.cache
def float16_sqrt_bytes() -> np.ndarray:
    """(65536,) uint8: sqrt_bytes of every float16, indexed by its bits; NaN bits map to 0."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # (65536,)
    return sqrt_bytes(np.nan_to_num(every, nan=0.0))


def colormap_bytes(name: str = COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colormap, so the viewer's colours match the PNGs'."""
    return np.rint(255 * colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]).astype(np.uint8)


def hex_colours(name: str) -> list[str]:
    """A colormap's 256 colours as "rrggbb" strings, as the viewer reads them."""
    return [f"{r:02x}{g:02x}{b:02x}" for r, g, b in colormap_bytes(name)]


ATTRIBUTION_PARTS = ("heads", "embed", "attn_bias", "mlp", "skip", "norm_bias")  # the order the viewer reads


def packed_mechanism(mechanism, shape: tuple, meta: dict,
                     token_text: Callable[[list[int]], list[str]] | None = None) -> dict:
    """A Mechanism as the viewer reads it: {"mechanism": {...}, "vocab": {id: label}} (see below).

    mechanism.layers[l] is base64 of zlib of layer l's numbers, in this order: q, k, v (H, T, hs) each,
    the scores' lower triangle (H, T (T + 1) / 2) packed as the weights are, and value_out_norm (H, T).
    With bits 16 they are float16, all high bytes and then all low bytes (the high bytes deflate well,
    the low ones hardly, and mixed they deflate poorly); with bits 32, float32 as they are. The page
    computes the rest itself, as the lecture does: q.k, the softmax, the context vector and what each
    key moved (weight x value_out_norm). mechanism.globals is base64 of zlib of float32 arrays, in the
    order and shapes of globals_layout: the prediction, its logit and attribution at each position, and
    the logit lens (ids as float32, exact below 2^24).
    """
    L, H, T = shape
    if tuple(mechanism.shape) != (L, H, T):
        raise ValueError(f"the mechanism is (n_layer, n_head, T) = {tuple(mechanism.shape)}, the attention {shape}")
    rows, cols = np.tril_indices(T)
    per_layer = [[mechanism.q[layer], mechanism.k[layer], mechanism.v[layer],
                  mechanism.scores[layer][:, rows, cols], mechanism.value_out_norm[layer]] for layer in range(L)]
    # float16 holds numbers up to 65504: a model whose queries or scores grow past that travels in float32
    fits = all(np.abs(a).max(initial=0.0) < 65000 for arrays in per_layer for a in arrays)
    layers = [deflated_base64(half_planes(arrays) if fits else
                              np.concatenate([np.ravel(a).astype("<f4") for a in arrays]).tobytes(), level=6)
              for arrays in per_layer]
    attribution = mechanism.attribution
    globals_ = [("predicted", mechanism.predicted), ("logit", mechanism.logit),
                *((f"dla_{name}", attribution[name]) for name in ATTRIBUTION_PARTS),
                ("lens_ids", mechanism.lens_ids), ("lens_probs", mechanism.lens_probs)]
    packed_globals = np.concatenate([np.ravel(a).astype("<f4") for _, a in globals_]).tobytes()
    config = (meta or {}).get("model_config") or {}
    vocab = {}
    if token_text is not None:
        ids = sorted({int(i) for i in mechanism.predicted} | {int(i) for i in np.ravel(mechanism.lens_ids)})
        vocab = {str(i): token_label(text, 16) for i, text in zip(ids, token_text(ids))}
    return {
        "mechanism": {
            "attn_score": str(config.get("attn_score", "scaled_dot")),
            "pos_encoding": str(config.get("pos_encoding", "learned")),
            "head_dim": int(mechanism.q.shape[-1]),
            "bits": 16 if fits else 32,
            "layers": layers,
            "globals": deflated_base64(packed_globals, level=6),
            "globals_layout": [[name, list(np.shape(a))] for name, a in globals_],
            "diverging": hex_colours(DIVERGING_COLORMAP),
            "moved_colormap": hex_colours(MOVED_COLORMAP),
        },
        "vocab": vocab,
    }


def half_planes(arrays: list[np.ndarray]) -> bytes:
    """arrays, flattened one after another, as float16: every high byte, then every low byte."""
    bits = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float16).view(np.uint16)
    return (bits >> 8).astype(np.uint8).tobytes() + (bits & 0xFF).astype(np.uint8).tobytes()


def deflated_base64(raw: bytes, level: int) -> str:
    """raw deflated (a zlib stream, which the browser's DecompressionStream("deflate") reads) as base64 text."""
    return base64.b64encode(zlib.compress(raw, level)).decode("ascii")


def plain(value):
    """value with numpy scalars and arrays turned into Python ones and NaN or infinity into None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # a Path, a dtype, an enum: its text is what a reader wants to see
