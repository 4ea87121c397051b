"""
The HTML viewer of an attention dump, and the slider over train.py's snapshots (glimpse/viewer.html and
glimpse/snapshots.html, with the dump's numbers packed inside).

The viewer takes what the PNGs do (glimpse/render.py): `attn` (n_layer, n_head, T, T), `tokens` and
`prompt_len`, and draws with the same colours. It is a single file with everything inside it (no network,
no fonts or scripts from elsewhere), so it opens from disk on an air-gapped machine. The weights travel as
one byte each, the square root quantised to 0..255 (at most 0.004 off), only the lower triangle, and
deflated layer by layer: the page inflates a layer (the browser's own DecompressionStream) when it is
first shown, so a GPT-2 small dump over 1024 tokens opens in seconds instead of decoding 144 heads up
front. A small max-pooled picture of every head travels uncompressed beside them, for the layer x head
picker.

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
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from glimpse.files import write_atomic
from glimpse.render import (
    COLORMAP,
    DIVERGING_COLORMAP,
    MASKED_COLOR,
    MOVED_COLORMAP,
    checked_attention,
    hex_colours,
    token_label,
)

VIEWER_TEMPLATE = Path(__file__).with_name("viewer.html")
SNAPSHOTS_TEMPLATE = Path(__file__).with_name("snapshots.html")
DATA_PLACEHOLDER = "__GLIMPSE_DATA__"
THUMBNAIL_CELLS = 48  # a picker thumbnail is at most 48 x 48 cells: 144 of them stay light to embed and draw
ATTRIBUTION_PARTS = ("heads", "embed", "attn_bias", "mlp", "skip", "norm_bias")  # the order the viewer reads


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
        "colormap": hex_colours(COLORMAP),
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
    snapshots = [(step, path.name) for step, path in snapshot_folders(attention_dir) if (path / "index.html").is_file()]
    data = {"steps": [step for step, _ in snapshots], "folders": [name for _, name in snapshots]}
    path = attention_dir / "index.html"
    page = SNAPSHOTS_TEMPLATE.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, script_json(data))
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def snapshot_folders(attention_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each of train.py's snapshots in attention_dir (its iter_<step>/ folders), by step."""
    return sorted((int(match.group(1)), path) for path in Path(attention_dir).iterdir()
                  if (match := re.fullmatch(r"iter_(\d+)", path.name)) and path.is_dir())


def drop_snapshots_after(attention_dir: Path, step: int) -> list[int]:
    """Remove the snapshots of steps after `step` (a resumed run's checkpoint: those belong to the steps it
    retraces, which may not fall where they did) and rewrite the slider over the rest; return their steps."""
    later = [(n, path) for n, path in snapshot_folders(attention_dir) if n > step]
    for _, path in later:
        shutil.rmtree(path)
    if later:
        write_snapshot_index(attention_dir)
    return [n for n, _ in later]


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


def packed_mechanism(mechanism, shape: tuple, meta: dict,
                     token_text: Callable[[list[int]], list[str]] | None = None) -> dict:
    """A Mechanism as the viewer reads it: {"mechanism": {...}, "vocab": {id: label}} (see below).

    mechanism.layers[l] is base64 of zlib of layer l's numbers, in this order: q, k, v (H, T, hs) each,
    for additive attention only the scores' lower triangle (H, T (T + 1) / 2) packed as the weights are,
    value_out_norm (H, T), and the query's stages before qk_norm and rope that q_stages names (H, T, hs)
    each. With bits 16 they are float16, all high bytes and then all low bytes (the high bytes deflate
    well, the low ones hardly, and mixed they deflate poorly); with bits 32, float32 as they are. The page
    computes the rest itself, as the lecture does: q.k, the softmax, the context
    vector and what each key moved (weight x value_out_norm). A dot-product model's scores it takes from
    q.k (scaled, plus ALiBi's -slope x distance from alibi_slopes), so that the scaled q.k and the score it
    shows are one number, and the page does not carry them: at T tokens they are T (T + 1) / 2 numbers a
    head against q, k and v's 3 T hs, most of a long text's page. Additive attention has no q.k, so its
    scores travel. mechanism.globals is base64 of zlib of float32 arrays, in the order and shapes of
    globals_layout: the prediction, its logit and attribution at each position, and the logit lens (ids
    as float32, exact below 2^24).
    """
    from glimpse.mechanism import packed  # torch, which a Mechanism needs anyway
    from glimpse.positions import alibi_slopes

    L, H, T = shape
    if tuple(mechanism.shape) != (L, H, T):
        raise ValueError(f"the mechanism is (n_layer, n_head, T) = {tuple(mechanism.shape)}, the attention {shape}")
    config = (meta or {}).get("model_config") or {}
    attn_score = str(config.get("attn_score", "scaled_dot"))

    def scores(layer: int) -> list[np.ndarray]:  # the page computes a dot-product model's scores from q.k
        return [packed(mechanism.scores[layer])] if attn_score == "additive" else []

    stages = mechanism.query_stages()  # the queries before qk_norm and rope, where the model has them
    per_layer = [[mechanism.q[layer], mechanism.k[layer], mechanism.v[layer], *scores(layer),
                  mechanism.value_out_norm[layer], *(stage[layer] for stage in stages.values())]
                 for layer in range(L)]
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
    pos_encoding = str(config.get("pos_encoding", "learned"))
    vocab = {}
    if token_text is not None:
        ids = sorted({int(i) for i in mechanism.predicted} | {int(i) for i in np.ravel(mechanism.lens_ids)})
        vocab = {str(i): token_label(text, 16) for i, text in zip(ids, token_text(ids))}
    return {
        "mechanism": {
            "attn_score": attn_score,
            "pos_encoding": pos_encoding,
            # ALiBi's penalty is -slope x distance: the page adds it to the scaled q.k itself, exactly
            "alibi_slopes": alibi_slopes(H).tolist() if pos_encoding == "alibi" else None,
            "qk_norm": bool(config.get("qk_norm", False)),  # q and k as traced are after it: the page says so
            "smear": bool(config.get("smear", False)),  # the embeddings' share of a logit holds the smear's too
            "tie_embeddings": bool(config.get("tie_embeddings", True)),  # the lens's first row reads the token back
            # the logit the attribution splits is the one before this cap: the page shows both
            "logit_softcap": float(config.get("logit_softcap") or 0.0),
            "head_dim": int(mechanism.q.shape[-1]),
            "q_stages": list(stages),
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
