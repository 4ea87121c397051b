"""The mechanism (glimpse/mechanism.py) against a forward written out in numpy from the model's weights alone:
queries, keys, values, scores, weights, context vectors, what each head moved, the logit attribution and the
logit lens, for GPT-2's architecture and the modern one, ALiBi, dot and additive scores."""

import math

import numpy as np
import pytest
import torch

from glimpse.attention import dump_text, load_dump
from glimpse.errors import GlimpseError
from glimpse.mechanism import load_mechanism, trace
from glimpse.self_attention import attend, dot_scores
from model import GPT, GPTConfig

ARCHITECTURES = {
    "gpt2": dict(),
    "modern": dict(norm="rmsnorm", activation="relu2", pos_encoding="rope", qk_norm=True, smear=True, bias=False,
                   tie_embeddings=False, zero_init_proj=True, logit_softcap=10.0),
    "alibi-dot": dict(pos_encoding="alibi", attn_score="dot"),
    "additive-unet": dict(attn_score="additive", pos_encoding="sinusoidal", unet=True, value_embeds=1, n_layer=4),
}


def model_of(arch: str, seed: int = 0) -> GPT:
    """A small model whose every weight is off its initial value (zero-initialised gains and projections
    included), so that no part of the mechanism can hide behind a zero."""
    torch.manual_seed(seed)
    settings = dict(block_size=12, vocab_size=23, n_layer=3, n_head=2, n_embd=16) | ARCHITECTURES[arch]
    model = GPT(GPTConfig(**settings))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def weights_of(model: GPT) -> dict[str, np.ndarray]:
    return {name: t.detach().double().numpy() for name, t in model.state_dict().items()}


def norm(x, w, prefix, kind):
    gain = w[f"{prefix}.weight"]
    if kind == "rmsnorm":
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * gain
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * gain + w.get(f"{prefix}.bias", 0.0)


def linear(x, w, prefix):
    return x @ w[f"{prefix}.weight"].T + w.get(f"{prefix}.bias", 0.0)


def reference(model: GPT, ids: list[int]) -> dict:
    """Every quantity of the mechanism, from the weights and the papers' formulas, in float64 numpy."""
    c, w = model.config, weights_of(model)
    T, H, hs = len(ids), c.n_head, c.n_embd // c.n_head
    pos = np.arange(T)
    x = w["transformer.wte.weight"][ids]  # (T, C)
    if c.smear:
        before = np.vstack([np.zeros((1, c.n_embd)), x[:-1]])
        gate = 1 / (1 + np.exp(-(x @ w["transformer.smear_gate.weight"].T)))  # (T, 1)
        x = x + w["smear_scale"] * gate * before
    if c.pos_encoding == "learned":
        x = x + w["transformer.wpe.weight"][:T]
    if c.pos_encoding == "sinusoidal":
        table = np.zeros((T, c.n_embd))
        freqs = np.exp(-math.log(10000.0) * np.arange(0, c.n_embd, 2) / c.n_embd)
        table[:, 0::2], table[:, 1::2] = np.sin(pos[:, None] * freqs), np.cos(pos[:, None] * freqs)
        x = x + 0.02 * math.sqrt(2) * table
    causal = np.tril(np.ones((T, T), dtype=bool))
    out = {key: [] for key in ("q", "k", "v", "scores", "weights", "context", "moved", "head_outputs")}
    streams, skips = [x], []
    for layer in range(c.n_layer):
        if c.unet and layer >= c.n_layer - c.n_layer // 2:
            x = x + w["skip_weights"][c.n_layer - 1 - layer] * skips.pop()
        p = f"transformer.h.{layer}"
        qkv = linear(norm(x, w, f"{p}.ln_1", c.norm), w, f"{p}.attn.c_attn")  # (T, 3C)
        q, k, v = (qkv[:, i * c.n_embd:(i + 1) * c.n_embd].reshape(T, H, hs).transpose(1, 0, 2) for i in range(3))
        if layer < c.value_embeds:
            v = v + w[f"transformer.ve.{layer}.weight"][ids].reshape(T, H, hs).transpose(1, 0, 2)
        if c.qk_norm:
            q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + 1e-5) * w[f"{p}.attn.q_norm.weight"]
            k = k / np.sqrt((k ** 2).mean(-1, keepdims=True) + 1e-5) * w[f"{p}.attn.k_norm.weight"]
        if c.pos_encoding == "rope":  # channel i turns with channel i + hs/2 by pos * 10000^(-i / (hs/2))
            angle = pos[:, None] * 10000.0 ** (-np.arange(hs // 2) / (hs // 2))  # (T, hs/2)
            q, k = (np.concatenate([t[..., :hs // 2] * np.cos(angle) - t[..., hs // 2:] * np.sin(angle),
                                    t[..., :hs // 2] * np.sin(angle) + t[..., hs // 2:] * np.cos(angle)], -1)
                    for t in (q, k))
        if c.attn_score == "additive":  # v_h . tanh(W_q q + W_k k)
            a, b = q @ w[f"{p}.attn.score_q"], k @ w[f"{p}.attn.score_k"]  # (H, T, hs)
            scores = np.einsum("hqke,he->hqk", np.tanh(a[:, :, None] + b[:, None]), w[f"{p}.attn.score_v"])
        else:
            scores = q @ k.transpose(0, 2, 1) / (math.sqrt(hs) if c.attn_score == "scaled_dot" else 1.0)
        if c.pos_encoding == "alibi":  # slopes 2^(-8 (h + 1) / H) times the distance back
            slopes = 2.0 ** (-8 * (np.arange(H) + 1) / H)
            scores = scores - slopes[:, None, None] * np.maximum(pos[:, None] - pos[None, :], 0)
        scores = np.where(causal, scores, -np.inf)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        weights = e / e.sum(-1, keepdims=True)  # (H, T, T)
        context = weights @ v  # (H, T, hs)
        w_o = w[f"{p}.attn.c_proj.weight"]  # (C, C)
        head_out = np.stack([context[h] @ w_o[:, h * hs:(h + 1) * hs].T for h in range(H)])  # (H, T, C)
        value_size = np.stack([np.linalg.norm(v[h] @ w_o[:, h * hs:(h + 1) * hs].T, axis=-1) for h in range(H)])
        x = x + head_out.sum(0) + w.get(f"{p}.attn.c_proj.bias", 0.0)
        hidden = linear(norm(x, w, f"{p}.ln_2", c.norm), w, f"{p}.mlp.c_fc")
        if c.activation == "relu2":
            hidden = np.maximum(hidden, 0) ** 2
        else:
            hidden = 0.5 * hidden * (1 + np.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
        x = x + linear(hidden, w, f"{p}.mlp.c_proj")
        if c.unet and layer < c.n_layer // 2:
            skips.append(x)
        streams.append(x)
        for key, value in (("q", q), ("k", k), ("v", v), ("scores", scores), ("weights", weights),
                           ("context", context), ("moved", weights * value_size[:, None, :]),
                           ("head_outputs", head_out)):
            out[key].append(value)
    out = {key: np.stack(value) for key, value in out.items()}
    unembed = w["lm_head.weight"]
    out["lens"] = [norm(s, w, "transformer.ln_f", c.norm) @ unembed.T for s in streams]  # (T, V) each
    out["logits"] = out["lens"][-1]  # before any softcap
    out["final"] = x
    return out


def close(ours, theirs, tol=2e-5):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape
    finite = np.isfinite(theirs)
    assert (np.isfinite(ours) == finite).all()
    assert np.allclose(ours[finite], theirs[finite], rtol=tol, atol=tol), np.abs(ours[finite] - theirs[finite]).max()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_quantity_equals_a_forward_written_out_from_the_weights(arch):
    model = model_of(arch)
    ids = torch.randint(0, 23, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    got, want = trace(model, ids), reference(model, ids)
    for key in ("q", "k", "v", "scores", "weights", "context"):
        close(getattr(got, key), want[key])
    close(got.head_out_norm, want["moved"])
    close(got.head_outputs, want["head_outputs"])
    # the model's own logits, softcap and all, pick the same token the attribution explains
    logits = model(torch.tensor(ids)[None])[0][0].detach().numpy()
    assert (got.predicted == logits.argmax(-1)).all()
    assert (got.predicted == want["logits"].argmax(-1)).all()
    close(got.logit, want["logits"][np.arange(12), got.predicted])
    # the logit lens: each layer's stream through ln_f and the head (and its cap), then the softmax's top five
    cap = model.config.logit_softcap
    for row, lens in enumerate(want["lens"]):
        lens = cap * np.tanh(lens / cap) if cap else lens
        probs = np.exp(lens - lens.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)  # (T, V)
        top = np.argsort(-probs, axis=-1)[:, :5]  # (T, 5)
        assert (got.lens_ids[row] == top).all()
        close(got.lens_probs[row], np.take_along_axis(probs, top, axis=-1))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_attribution_of_each_part_sums_to_the_logit(arch):
    model = model_of(arch, seed=3)
    ids = list(range(10))
    got, want = trace(model, ids), reference(model, ids)
    c, w = model.config, weights_of(model)
    parts = got.attribution
    total = parts["heads"].sum((0, 1)) + parts["embed"] + parts["attn_bias"].sum(0) + parts["mlp"].sum(0) \
        + parts["skip"].sum(0) + parts["norm_bias"]
    close(total, got.logit, tol=1e-4)
    # a head's share, recomputed: its output through ln_f with the final stream's scale, on the predicted row
    final = want["final"]
    centred = c.norm == "layernorm"
    scale = np.sqrt(((final - final.mean(-1, keepdims=True)) ** 2).mean(-1) + 1e-5) if centred \
        else np.sqrt((final ** 2).mean(-1) + 1e-5)
    rows = w["lm_head.weight"][got.predicted] * w["transformer.ln_f.weight"] / scale[:, None]  # (T, C)
    out = want["head_outputs"]  # (L, H, T, C)
    if centred:
        out = out - out.mean(-1, keepdims=True)
    close(parts["heads"], (out * rows).sum(-1), tol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_the_attribution_sums_to_the_logit_on_a_freshly_initialised_model(arch):
    """At GPT-2's initial scale the final stream is small (std about 0.02), so ln_f's eps is a large part of its
    scale: the parts still sum to the logit only when the attribution divides by the scale ln_f itself uses."""
    torch.manual_seed(0)
    settings = dict(block_size=12, vocab_size=23, n_layer=3, n_head=2, n_embd=16) | ARCHITECTURES[arch]
    model = GPT(GPTConfig(**settings)).eval()
    got = trace(model, list(range(10)))
    total = sum(part.reshape(-1, 10).sum(axis=0) for part in got.attribution.values())
    close(total, got.logit, tol=1e-5)


def test_softmax_of_the_scores_gives_the_weights_and_the_weights_times_the_values_the_context():
    got = trace(model_of("modern"), list(range(12)))
    scores = torch.from_numpy(got.scores)
    close(torch.softmax(scores, dim=-1).numpy(), got.weights, tol=1e-6)
    close(got.weights @ got.v, got.context, tol=1e-6)
    assert np.isneginf(got.scores[..., np.triu_indices(12, 1)[0], np.triu_indices(12, 1)[1]]).all()
    close(got.weights.sum(-1), np.ones(got.weights.shape[:-1]), tol=1e-6)


def test_a_text_longer_than_the_window_is_cut_to_its_last_block_size_tokens():
    model = model_of("gpt2")
    got = trace(model, list(range(20)), [f"t{i}" for i in range(20)])
    assert got.cut == 8 and got.tokens == [f"t{i}" for i in range(8, 20)]
    assert got.token_ids.tolist() == list(range(8, 20))


def test_the_lecture_notes_toy_example_through_glimpses_attention():
    """Three keys, one query, scores scaled by sqrt(2): the notes print these weights and context vectors."""
    keys = torch.tensor([[0.8, 0.6], [0.2, 0.9], [0.0, 0.4]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    for query, weights, context in (([1.0, 0.5], [0.4431, 0.3224, 0.2345], [0.5604, 0.4396]),
                                    ([0.1, 1.2], [0.3296, 0.4075, 0.2629], [0.4611, 0.5389])):
        got_context, got_weights = attend(dot_scores(torch.tensor([query]), keys, 1 / math.sqrt(2)), values)
        assert np.allclose(got_weights[0].numpy(), weights, atol=5e-5)
        assert np.allclose(got_context[0].numpy(), context, atol=5e-5)


class Letters:
    """A tokenizer of 23 letters, enough for dump_text."""

    def token_strings(self, ids):
        return [chr(97 + i) for i in ids]


def test_a_mechanism_dump_reads_back_with_numpy_as_traced(tmp_path):
    model = model_of("modern")
    ids = list(range(15))
    dump_text(model, Letters(), ids, 4, {"test": True}, tmp_path / "d", pngs=False, mechanism=True)
    got, dumped, weights = trace(model, ids), load_mechanism(tmp_path / "d"), load_dump(tmp_path / "d")
    assert int(weights["cut"]) == 3 and int(weights["prompt_len"]) == 1
    for key in ("q", "k", "v", "scores", "head_out_norm", "predicted", "logit", "lens_ids", "lens_probs",
                "q_projected", "q_normed"):  # the modern model's queries before qk_norm and rope too
        close(dumped[key], getattr(got, key), tol=1e-6)
    for part, value in got.attribution.items():
        close(dumped[f"attribution_{part}"], value, tol=1e-6)
    # the float16 weights of the dump are the softmax of the float32 scores beside them
    close(torch.softmax(torch.from_numpy(dumped["scores"]), -1).numpy(), weights["attn"].astype(np.float32), tol=1e-3)


def test_a_dump_without_the_mechanism_says_so(tmp_path):
    dump_text(model_of("gpt2"), Letters(), list(range(5)), 2, {}, tmp_path / "c", pngs=False, mechanism=True)
    assert "q_projected" not in load_mechanism(tmp_path / "c")  # GPT-2's queries are W_q x as the scores take them
    dump_text(model_of("gpt2"), Letters(), list(range(5)), 2, {}, tmp_path / "d", pngs=False)
    with pytest.raises(GlimpseError, match="--mechanism"):
        load_mechanism(tmp_path / "d")
    with pytest.raises(ValueError, match="intact model"):
        dump_text(model_of("gpt2"), Letters(), list(range(5)), 2, {}, tmp_path / "e", pngs=False, mechanism=True,
                  heads=object())
    assert not (tmp_path / "e").exists()
