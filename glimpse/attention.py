"""
Attention dumps: what every head of every layer attended to, saved for people and tools.

One dump is a folder:

    attention.npz  a zip of .npy arrays (np.load reads it, no pickle): layer_<l>_high and layer_<l>_low
                   uint8 [n_head, T (T + 1) / 2], the high and low bytes of layer l's post-softmax
                   weights as float16 bits, lower triangle only (row q of a head, the weights query q puts
                   on keys 0..q, starts at q (q + 1) / 2; above the diagonal every weight is exactly 0;
                   rows sum to 1); token_ids int32 [T]; tokens [T] (each token's text, as numpy's
                   fixed-width strings keep it: without trailing NUL characters); tokens_json, the same
                   texts exactly, as a JSON list (load_dump reads it); prompt_len; meta (a JSON
                   string); cut, how many tokens before the window were left out (the model attends
                   over block_size tokens at most). load_layer rebuilds one layer [n_head, T, T]
                   float16 with numpy alone, load_dump all of them [n_layer, n_head, T, T].
                   With the mechanism (sample.py --mechanism, glimpse/mechanism.py), also per layer l,
                   float32: q_<l>, k_<l>, v_<l> [n_head, T, head_dim] (and, under qk_norm or rope, the
                   queries before them: q_projected_<l>, W_q x, and under both q_normed_<l>, qk_norm's,
                   the same shape); scores_<l> and head_out_norm_<l>
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
the viewer is built (zlib works outside Python's lock), so that deflating does not dominate a dump of
GPT-2 small over its 1,024 tokens (144 heads of half a million weights each); docs/gpt2.md gives the
sizes and times measured. sample.py writes one dump per sample and train.py one per snapshot
(attn_log_interval); head_metrics scores heads on known patterns (previous-token, sink, self), and
glimpse/induction.py on the induction circuit.
"""

from __future__ import annotations

import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from glimpse.evaluation import evaluating
from glimpse.files import write_atomic
from glimpse.mechanism import Mechanism, check_layer, dump_file, mechanism_arrays, packed, trace, unpacked
from model import GPT


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor, heads=None) -> np.ndarray:
    """Post-softmax weights [n_layer, n_head, T, T] as float16, the dumps' precision, for one text (T,).

    heads: a HeadEdit (glimpse/ablation.py) in place while the text goes through, or None.
    """
    with evaluating(model):  # no dropout: the weights are the model's, not a random mask's
        _, weights = model.forward_with_attention(ids[None], heads, weights_dtype=torch.float16,
                                                  logits=False)  # (L, 1, H, T, T)
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

    np.savez_compressed deflates at level 6 and takes no other; zipfile at level 1 writes the same .npy
    entries faster (docs/gpt2.md times a GPT-2-sized dump), and np.load reads them all the same.
    """
    def entries():  # one layer's triangle in memory at a time
        for layer in range(attn.shape[0]):
            bits = packed(attn[layer]).astype(np.float16).view(np.uint16)  # (H, T(T+1)/2)
            yield f"layer_{layer}_high", (bits >> 8).astype(np.uint8)
            yield f"layer_{layer}_low", (bits & 0xFF).astype(np.uint8)
        yield from arrays.items()

    def write(tmp: Path):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, array in entries():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    write_atomic(path, write)


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
    # a dump over an earlier one in the same folder (sample_<i> again): the earlier one's files that this one does
    # not write would pass for this text's, in the folder and on wandb
    layers = [p for p in folder.glob("layer_*.png") if p.stem.removeprefix("layer_").isdigit()]  # the dump's own
    for stale in (*layers, folder / "head_importance.json", folder / "index.html"):
        stale.unlink(missing_ok=True)
    with ThreadPoolExecutor(1) as pool:  # deflating the npz on the second core while the rest is computed
        npz = pool.submit(write_npz, folder / "attention.npz", attn, token_ids=np.asarray(token_ids, dtype=np.int32),
                          tokens=np.array(tokens, dtype=str), tokens_json=np.array(json.dumps(list(tokens))),
                          prompt_len=np.int32(prompt_len),
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
    float16 array, tokens a list of each token's text."""
    with np.load(dump_file(folder), allow_pickle=False) as z:
        out = {k: z[k] for k in z.files if not k.startswith("layer_")}
        if "attn" not in out:  # older dumps hold the whole array as it is
            out["attn"] = np.stack([layer_of(z, layer) for layer in range(layer_count(z))])
    out["meta"] = json.loads(str(out["meta"]))
    out.update({key: int(out[key]) for key in ("prompt_len", "cut") if key in out})
    # the JSON copy keeps a token of NUL characters, which numpy's strings drop; dumps older than it have none
    texts = out.pop("tokens_json", None)
    out["tokens"] = json.loads(str(texts)) if texts is not None else [str(t) for t in out["tokens"]]
    return out


def load_layer(folder: Path, layer: int) -> np.ndarray:
    """One layer of a dump, [n_head, T, T] float16, reading only that layer's entries of the npz."""
    with np.load(dump_file(folder), allow_pickle=False) as z:
        check_layer(layer, len(z["attn"]) if "attn" in z.files else layer_count(z), of="the dump's")
        return z["attn"][layer] if "attn" in z.files else layer_of(z, layer)


def layer_count(z) -> int:
    """How many layers an open npz of the packed formats holds."""
    return sum(k.endswith("_high") for k in z.files) or sum(k.startswith("layer_") for k in z.files)


def layer_of(z, layer: int) -> np.ndarray:
    """Layer l [n_head, T, T] float16 from an open npz: its two byte planes put back together (or, in dumps
    written before the bytes were stored apart, its float16 triangle), zeros above the diagonal."""
    if f"layer_{layer}_high" in z.files:
        bits = z[f"layer_{layer}_high"].astype(np.uint16) << 8 | z[f"layer_{layer}_low"]  # (H, T(T+1)/2)
        tril = bits.view(np.float16)
    else:
        tril = z[f"layer_{layer}"]
    return unpacked(tril, len(z["token_ids"]), 0.0, np.float16)
