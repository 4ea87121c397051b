"""The model: shapes, initial loss, causality, the two attention paths, and KV-cached generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from glimpse.generation import KVCache, generate, sample_next
from glimpse.layers import fused_attention
from model import GPT, GPTConfig


def small_model(**overrides) -> GPT:
    cfg = dict(block_size=16, vocab_size=50, n_layer=3, n_head=4, n_embd=32, dropout=0.0, bias=True)
    cfg.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def test_shapes_and_initial_loss_is_near_uniform():
    model = small_model(vocab_size=65)
    idx, targets = torch.randint(0, 65, (2, 4, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 16, 65)
    # small initial weights give near-equal logits, so the loss is about that of guessing uniformly
    assert abs(loss.item() - math.log(65)) < 0.1
    logits, loss = model(idx)
    assert loss is None


def test_initial_weights_have_gpt2s_scales():
    """Weights and embeddings at std 0.02, the projections into the residual stream at 0.02 / sqrt(2 n_layer)
    (8 layers: 0.005), so that the stream's variance does not grow with depth; biases at 0."""
    model = small_model(n_layer=8, n_embd=64, block_size=64)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert not p.any(), name


def test_parameter_names_follow_gpt2_and_head_is_tied():
    model = small_model(n_layer=1)
    names = set(model.state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.weight",
                 "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                 "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]:
        assert name in names
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    no_bias = small_model(bias=False)
    assert not any(n.endswith(".bias") for n in no_bias.state_dict())


def test_causal_changing_a_token_leaves_earlier_logits_unchanged():
    model = small_model()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 50
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_fast_and_weights_paths_agree():
    model = small_model()
    idx = torch.randint(0, 50, (3, 16))
    fast, _ = model(idx)
    explicit, weights = model.forward_with_attention(idx)
    torch.testing.assert_close(explicit, fast, rtol=1e-5, atol=1e-5)
    assert weights.shape == (3, 3, 4, 16, 16)  # (n_layer, B, n_head, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 3, 4, 16))
    above_diagonal = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
    assert (weights[..., above_diagonal] == 0).all()


def test_weights_are_softmax_of_scaled_scores_for_one_layer():
    """Recompute layer 0's weights by hand from its parameters: softmax(QK^T / sqrt(d) + mask)."""
    model = small_model(n_layer=1)
    idx = torch.randint(0, 50, (1, 10))
    _, weights = model.forward_with_attention(idx)
    block = model.transformer.h[0]
    with torch.no_grad():
        x = block.ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10)))
        q, k, _ = block.attn.c_attn(x).split(32, dim=2)
        q = q.view(1, 10, 4, 8).transpose(1, 2)
        k = k.view(1, 10, 4, 8).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        scores = scores + torch.full((10, 10), float("-inf")).triu(1)
        expected = scores.softmax(-1)
    torch.testing.assert_close(weights[0], expected, rtol=1e-5, atol=1e-6)


def test_cpu_bfloat16_attention_runs_in_float32():
    """On CPU, bfloat16 attention equals SDPA over the float32 upcasts, rounded back to bfloat16, also under
    autocast. Catches dropping the float32 detour (bfloat16 SDPA rounds differently) or taking it with
    autocast still on (which would cast the upcasts straight back down)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen).bfloat16() for _ in range(3))  # (B, nh, T, hs) each
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.3)
    expected = expected.bfloat16()
    assert not torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), expected)
    assert torch.equal(fused_attention(q, k, v, is_causal=True, scale=0.3), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused_attention(q, k, v, is_causal=True, scale=0.3), expected)


def test_weights_path_is_only_taken_when_asked(monkeypatch):
    """The training path must not build the (T, T) weights: the explicit attend() is never called."""
    import glimpse.self_attention as model_module

    model = small_model()
    calls = []
    original = model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    model.train()
    _, loss = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)))
    loss.backward()
    assert calls == []
    model.forward_with_attention(torch.randint(0, 50, (1, 4)))
    assert len(calls) == 3


def test_cached_prefill_then_chunk_matches_full_forward():
    """Feeding a window in two pieces through the cache gives the same logits as one forward."""
    model = small_model()
    idx = torch.randint(0, 50, (2, 16))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu")
    first, _ = model(idx[:, :7], cache=cache)
    rest, _ = model(idx[:, 7:], cache=cache)  # 9 queries against 16 keys: needs the offset mask
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(idx[:, :1], cache=cache)


def test_cached_chunks_of_every_size_match_full_forward():
    """Chunks of 1, 2 and more tokens after a cache each see the cache and their own earlier tokens only: a
    chunk of two is masked like a longer one (only a single new query may go without a mask)."""
    model = small_model()
    idx = torch.randint(0, 50, (2, 16))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu")
    pieces, start = [], 0
    for size in (5, 1, 2, 3, 5):
        pieces.append(model(idx[:, start:start + size], cache=cache)[0])
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23])
@pytest.mark.parametrize("block_size", [16, 7])
def test_generation_logits_equal_full_forward_over_their_window(prompt_len, block_size):
    """Every step's logits equal an uncached forward over exactly its window, well past block_size."""
    model = small_model(block_size=block_size)
    idx = torch.randint(0, 50, (2, prompt_len))
    gen = torch.Generator().manual_seed(0)
    tokens = idx
    windows = set()
    for step in generate(model, idx, 3 * block_size + 5, temperature=1.0, generator=gen):
        window = tokens[:, step.window_start:]
        assert 1 <= window.size(1) <= block_size
        expected, _ = model(window)
        torch.testing.assert_close(step.logits, expected[:, -1], rtol=1e-4, atol=1e-4)
        windows.add(window.size(1))
        tokens = torch.cat([tokens, step.token], 1)
    assert tokens.shape == (2, prompt_len + 3 * block_size + 5)
    assert block_size in windows  # the window did fill up, and then slid


def test_greedy_generation_is_deterministic_and_seeded_sampling_repeats():
    model = small_model()
    idx = torch.randint(0, 50, (1, 4))

    def run(**kw):
        return torch.cat([s.token for s in generate(model, idx, 20, **kw)], 1)

    torch.testing.assert_close(run(temperature=0), run(temperature=0))
    a = run(temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = run(temperature=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.flatten().tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # about [0.64, 0.24, 0.09, 0.03, 0.01]
    nucleus = sample_next(logits, 1.0, top_p=float(probs[0] + probs[1]) - 0.01, generator=gen)
    assert set(nucleus.flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.1, generator=gen).flatten().tolist()) == {0}
    assert sample_next(logits[:1], 0.0).item() == 0


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_flops_per_token_counts_the_matrix_products_by_hand():
    model = small_model(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    C = 16
    block = (2 * C  # ln_1 gain and bias
             + C * 3 * C + 3 * C  # c_attn: queries, keys and values
             + C * C + C  # attn.c_proj
             + 2 * C  # ln_2
             + C * 4 * C + 4 * C  # c_fc
             + 4 * C * C + C)  # mlp.c_proj
    weights = 20 * C + 2 * block + 2 * C  # the tied head (vocab x C), two blocks, ln_f; not the position table
    assert weights == 6912
    attention = 2 * 2 * C * 8 * 2  # per layer: QK^T and weights x V, 2 FLOPs per channel and key, 2 layers
    # backward costs twice the forward: 3x in all
    assert model.flops_per_token() == 3 * (2 * weights + attention) == 6 * 6912 + 12 * 2 * C * 8
    # sequences of 4 tokens (a sequence warm-up) score half as many keys per query
    assert model.flops_per_token(4) == 3 * (2 * weights + attention // 2)


def test_dropout_drops_in_training_only_and_is_absent_at_zero():
    idx = torch.randint(0, 50, (2, 16))
    model = small_model(dropout=0.2)
    assert torch.equal(model(idx)[0], model(idx)[0])  # eval mode: deterministic
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])  # training: a fresh mask each call
    plain = small_model(dropout=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    plain.load_state_dict(model.state_dict())  # dropout holds no weights: checkpoints load either way
    assert torch.allclose(plain(idx)[0], model.eval()(idx)[0])
