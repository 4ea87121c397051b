"""glimpse/mechanism.py's trace() against TransformerLens on the same weights: a random glimpse model of GPT-2's
shape is exported (export.py) and TransformerLens loads the folder offline, so every tensor trace() reads off
the model's own forward is checked against TransformerLens' hooks, never against numbers copied from it.

TransformerLens 4 reaches a model through TransformerBridge.boot_transformers, which wraps transformers'
GPT2LMHeadModel with the raw weights and eager attention. Two bridges are booted from the folder:
  raw     no weight processing (the bridge's default): q, k, v, scores, pattern, z, the head results and the
          logit lens are then in the model's own coordinates, as glimpse computes them;
  folded  enable_compatibility_mode(fold_ln=True) and nothing else, for direct logit attribution: folding puts
          ln_f's gain into W_U (and its bias into b_U), so TransformerLens' logit_attrs (centre, divide by the
          cached ln_final scale, dot with W_U[:, token]) is the attribution through ln_f that glimpse computes.
          center_writing_weights, center_unembed and fold_value_biases stay off: each moves a share of the
          logit to another owner (centred writers and unembedding shift every component's share; folded value
          biases leave the heads for the attention bias), where glimpse keeps each share with its component.
The head is untied, so that reading the unembedding off the token embeddings would show, and the text is longer
than block_size, so the comparison runs over the window trace() keeps.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

model_bridge = pytest.importorskip("transformer_lens.model_bridge",
                                   reason="transformer_lens is not installed (pip install -r requirements-dev.txt)")

import huggingface_hub.constants  # noqa: E402

import export  # noqa: E402
from data.tokenizer import CharTokenizer  # noqa: E402
from glimpse.checkpoint import save_checkpoint  # noqa: E402
from glimpse.config import build  # noqa: E402
from glimpse.gpt2 import load_pretrained  # noqa: E402
from glimpse.mechanism import LENS_TOP, Mechanism, trace  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tests.conftest import make_corpus  # noqa: E402

TEXT = make_corpus(4)
CUT = 8  # tokens of the text before the window trace() keeps
SHAPE = dict(block_size=32, n_layer=3, n_head=4, n_embd=64, tie_embeddings=False)
RTOL = 1e-5  # float32 on both sides; only the order of the sums differs


def close(ours: np.ndarray | torch.Tensor, theirs: torch.Tensor, what: str):
    """ours equals theirs to RTOL, entries near zero to RTOL of the largest entry."""
    theirs = theirs.detach().float()
    atol = RTOL * theirs.abs().max().item()
    torch.testing.assert_close(torch.as_tensor(ours).float(), theirs, rtol=RTOL, atol=atol,
                               msg=lambda message: f"{what}: {message}")


def random_checkpoint(out_dir: Path, config: GPTConfig, chars: str, seed: int = 0) -> Path:
    """A checkpoint of random weights large enough that attention is peaked (scores of a few units, not the
    near-uniform weights of the training init), with LayerNorm gains and biases away from 1 and 0, so that a
    scale, a gain or a bias read wrongly shows."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1 if name.endswith("bias") else 0.2)
    save_checkpoint(out_dir / "best.pt", {"model": model.state_dict(), "model_config": asdict(config),
                                          "tokenizer": {"kind": "char", "chars": chars}, "train_config": {},
                                          "iter_num": 0, "val_loss": None})
    return out_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """trace() of the text on the exported model, and TransformerLens' caches of the same window."""
    tokenizer = CharTokenizer.from_text(TEXT)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **SHAPE)
    root = tmp_path_factory.mktemp("mechanism-reference")
    out = random_checkpoint(root / "run", config, tokenizer.chars)
    folder = export.export(build(export.ExportConfig, dict(out_dir=str(out), to=str(root / "hf"))))
    ids = tokenizer.encode(TEXT)[:config.block_size + CUT].tolist()
    mechanism = trace(load_pretrained(str(folder)), ids, list(TEXT[:len(ids)]))
    window = torch.tensor([ids[CUT:]])  # (1, T): transformers' GPT-2 has block_size positions
    with pytest.MonkeyPatch.context() as mp:  # offline: the folder is all there is to read
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what is_offline_mode() reads, set on import
        raw = model_bridge.TransformerBridge.boot_transformers(str(folder), device="cpu")
        folded = model_bridge.TransformerBridge.boot_transformers(str(folder), device="cpu")
    folded.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    with torch.no_grad():
        raw_logits, raw_cache = raw.run_with_cache(window)
        folded_logits, folded_cache = folded.run_with_cache(window)
    return SimpleNamespace(mechanism=mechanism, config=config, ids=ids, window=window, raw=raw, raw_cache=raw_cache,
                           logits=raw_logits[0], folded=folded, folded_cache=folded_cache,
                           folded_logits=folded_logits[0])


def heads_first(hooked: torch.Tensor) -> torch.Tensor:
    """A TransformerLens per-head activation (1, T, H, d) as glimpse lays it out: (H, T, d)."""
    return hooked[0].transpose(0, 1)


def test_trace_keeps_the_window_transformer_lens_runs(reference):
    m: Mechanism = reference.mechanism
    T = reference.config.block_size
    assert m.cut == CUT and m.shape == (SHAPE["n_layer"], SHAPE["n_head"], T)
    assert m.token_ids.tolist() == reference.window[0].tolist() == reference.ids[CUT:]
    assert m.tokens == list(TEXT[CUT:CUT + T])
    # the raw bridge computes the model glimpse computes: the same logits, the same predictions
    assert reference.logits.shape == (T, reference.config.vocab_size)
    assert m.predicted.tolist() == reference.logits.argmax(dim=-1).tolist()
    close(m.logit, reference.logits.gather(1, torch.from_numpy(m.predicted)[:, None])[:, 0], "logit")
    # folding ln_f into the unembedding is a change of coordinates, not of the model
    close(reference.folded_logits, reference.logits, "folded logits")


def test_transformer_lens_reads_a_char_export_from_text_without_a_bos_token(reference):
    """A char export's vocabulary has no BOS token, and TransformerLens would put one past it (an IndexError):
    with prepend_bos=False, as docs/gpt2.md says, it encodes text with the exported tokenizer to glimpse's ids
    and gives glimpse's logits."""
    text = TEXT[CUT:CUT + reference.config.block_size]
    assert reference.raw.to_tokens(text, prepend_bos=False)[0].tolist() == reference.ids[CUT:]
    with torch.no_grad():
        logits = reference.raw(text, prepend_bos=False)[0]  # (T, V)
    close(reference.mechanism.logit, logits.gather(1, torch.from_numpy(reference.mechanism.predicted)[:, None])[:, 0],
          "logit from text")


def test_queries_keys_and_values_are_transformer_lens_hooks(reference):
    m, cache = reference.mechanism, reference.raw_cache
    hs = SHAPE["n_embd"] // SHAPE["n_head"]
    assert m.q.shape == m.k.shape == m.v.shape == (SHAPE["n_layer"], SHAPE["n_head"], SHAPE["block_size"], hs)
    for layer in range(SHAPE["n_layer"]):
        for name, ours in (("q", m.q), ("k", m.k), ("v", m.v)):
            theirs = heads_first(cache[f"blocks.{layer}.attn.hook_{name}"])  # (H, T, hs)
            close(ours[layer], theirs, f"layer {layer} {name}")
        # the heads are distinct: a head read twice, or q for k, would not pass the checks above unseen
        assert not np.allclose(m.q[layer, 0], m.q[layer, 1]) and not np.allclose(m.q[layer], m.k[layer])


def test_scores_and_weights_are_transformer_lens_scores_and_pattern(reference):
    m, cache = reference.mechanism, reference.raw_cache
    T = SHAPE["block_size"]
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): query i sees keys j <= i
    for layer in range(SHAPE["n_layer"]):
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0]  # (H, T, T), the mask already applied
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # (H, T, T)
        ours = torch.from_numpy(m.scores[layer])  # (H, T, T)
        close(ours[:, causal], scores[:, causal], f"layer {layer} scores")
        # both hide the keys after each query: glimpse with -inf, transformers with float32's lowest value
        assert torch.isneginf(ours[:, ~causal]).all()
        assert (scores[:, ~causal] <= torch.finfo(torch.float32).min).all()
        close(m.weights[layer], pattern, f"layer {layer} weights")
        assert (m.weights[layer][:, ~causal.numpy()] == 0).all()
        np.testing.assert_allclose(m.weights[layer].sum(axis=-1), 1, rtol=RTOL)
    # attention is peaked, not uniform, so a weight put on the wrong key would show
    assert m.weights.max() > 0.9


def test_context_and_head_outputs_are_transformer_lens_z_and_results(reference):
    m, cache, bridge = reference.mechanism, reference.raw_cache, reference.raw
    cache.compute_head_results()  # hook_result: z through each head's own W_O, before b_O
    for layer in range(SHAPE["n_layer"]):
        close(m.context[layer], heads_first(cache[f"blocks.{layer}.attn.hook_z"]), f"layer {layer} context")
        close(m.head_outputs[layer], heads_first(cache[f"blocks.{layer}.attn.hook_result"]),
              f"layer {layer} head outputs")
        # value_out_norm: each value through its head's W_O (H, hs, C) at weight 1, from TransformerLens' v and W_O
        value_out = torch.einsum("htd,hdc->htc", heads_first(cache[f"blocks.{layer}.attn.hook_v"]),
                                 bridge.blocks[layer].attn.W_O)  # (H, T, C)
        close(m.value_out_norm[layer], value_out.norm(dim=-1), f"layer {layer} value_out_norm")
        close(m.head_out_norm[layer], cache[f"blocks.{layer}.attn.hook_pattern"][0] * value_out.norm(dim=-1)[:, None],
              f"layer {layer} head_out_norm")


def test_direct_logit_attribution_is_transformer_lens_logit_attrs(reference):
    m, cache, bridge = reference.mechanism, reference.folded_cache, reference.folded
    L, H, T = m.shape
    predicted = torch.from_numpy(m.predicted)[None]  # (1, T): one target per position

    def attrs(stack: torch.Tensor) -> torch.Tensor:  # (n, 1, T, C) -> (n, T): through ln_final's cached scale
        return cache.logit_attrs(stack, tokens=predicted)[:, 0]

    heads = attrs(cache.stack_head_results())  # (L H, T), layer-major as glimpse's (L, H, T)
    close(m.attribution["heads"], heads.view(L, H, T), "heads")
    parts, labels = cache.decompose_resid(return_labels=True)  # (2 + 2 L, 1, T, C)
    assert labels == ["embed", "pos_embed"] + [f"{layer}_{part}_out" for layer in range(L)
                                              for part in ("attn", "mlp")]
    shares = attrs(parts)  # (2 + 2 L, T)
    close(m.attribution["embed"], shares[0] + shares[1], "embed")  # glimpse keeps token and position together
    close(m.attribution["mlp"], shares[3::2], "mlp")
    close(m.attribution["attn_bias"], shares[2::2] - heads.view(L, H, T).sum(dim=1), "attn_bias")  # b_O's share
    assert np.all(m.attribution["skip"] == 0)  # GPT-2 has no U-net skips
    close(m.attribution["norm_bias"], bridge.b_U[predicted[0]], "norm_bias")  # ln_f's bias, folded into b_U
    # the parts add up to the logit, and no part is negligible enough for a wrong one to hide
    total = sum(part.reshape(-1, T).sum(axis=0) for part in m.attribution.values())
    np.testing.assert_allclose(total, m.logit, rtol=1e-4, atol=1e-4 * np.abs(m.logit).max())
    assert np.abs(m.attribution["heads"]).max() > 0.1 * np.abs(m.logit).max()


def test_logit_lens_is_transformer_lens_logit_lens(reference):
    m, cache, bridge = reference.mechanism, reference.raw_cache, reference.raw
    L = SHAPE["n_layer"]
    lens = cache.logit_lens(positions=None, top_k=LENS_TOP, return_type="probs")
    # the stream entering each block, then the last block's output: glimpse's rows 0..L
    assert lens.labels == [f"{layer}_pre" for layer in range(L)] + ["final_post"]
    top_ids = lens.readout.top_ids[:, 0]  # (L + 1, T, top)
    assert m.lens_ids.shape == tuple(top_ids.shape) == (L + 1, SHAPE["block_size"], LENS_TOP)
    assert m.lens_ids.tolist() == top_ids.tolist()
    close(m.lens_probs, lens.values[:, 0], "lens probabilities")
    # the same read by hand: the accumulated stream through ln_final (its own statistics) and the unembedding
    streams = cache.accumulated_resid(apply_ln=True)[:, 0]  # (L + 1, T, C)
    assert m.lens_ids[..., 0].tolist() == (streams @ bridge.W_U + bridge.b_U).argmax(dim=-1).tolist()
    # the last row is the model's own prediction; the earlier rows are not all of them the same
    assert m.lens_ids[L, :, 0].tolist() == m.predicted.tolist() == reference.logits.argmax(dim=-1).tolist()
    assert any(m.lens_ids[layer, :, 0].tolist() != m.predicted.tolist() for layer in range(L))
