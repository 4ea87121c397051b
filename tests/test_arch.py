"""Architecture options (norm, activation, qk_norm, tie_embeddings, zero_init_proj, logit_softcap, value_embeds,
unet, smear) and the Muon optimizer."""

import math
from dataclasses import asdict, fields

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train as train_script
from glimpse.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from glimpse.config import config_keys
from glimpse.generation import KVCache
from glimpse.layers import ReLUSquared, make_dropout
from glimpse.optim import configure_optimizer, get_lr, set_lr
from glimpse.positions import rotary_table, rotate
from model import GPT, GPTConfig
from tests.conftest import CLOCKED, tiny_config, train_config
from tests.test_reliability import run_main
from tests.test_train import read_metrics
from tests.test_variants import check_cached_generation, check_paths_agree, check_training_lowers_the_loss, variant
from train import TrainConfig, train

FLAGS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "relu2": dict(activation="relu2"),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "zero_init_proj": dict(zero_init_proj=True),
    "softcap": dict(logit_softcap=0.5),  # small: the cap bends every logit of an untrained model
    "value_embeds": dict(value_embeds=2),
    "unet": dict(unet=True),
    "smear": dict(smear=True),
    "all": dict(norm="rmsnorm", activation="relu2", qk_norm=True, tie_embeddings=False, zero_init_proj=True,
                logit_softcap=0.5, value_embeds=1, unet=True, smear=True),
}
# each flag with GPT-2's learned positions and with rope (qk_norm acts just before the rotation), and
# everything on with the scores and encodings that take other paths
CASES = [(flag, "scaled_dot", pos) for flag in FLAGS for pos in ("learned", "rope")] + [
    ("all", "additive", "alibi"), ("all", "dot", "sinusoidal"), ("all", "scaled_dot", "none")]


def flagged(flag: str, score: str = "scaled_dot", pos: str = "rope") -> GPT:
    model = variant(score, pos, **FLAGS[flag])
    if model.config.smear:
        with torch.no_grad():
            model.smear_scale.fill_(0.8)  # it starts at 0, where the smear would change nothing to test
    return model


def plain_twin(model: GPT, **off) -> GPT:
    """The same weights in a model with the flags in `off` set back (the extra parameters dropped)."""
    twin = GPT(GPTConfig(**{**asdict(model.config), **off})).eval()
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin


@pytest.mark.parametrize("flag", FLAGS)
def test_no_position_sees_a_later_token(flag):
    model = flagged(flag)
    idx = torch.randint(0, 20, (2, 8))
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 20
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("flag,score,pos", CASES)
def test_fast_and_explicit_paths_agree(flag, score, pos):
    check_paths_agree(flagged(flag, score, pos))


@pytest.mark.parametrize("flag,score,pos", CASES)
def test_cached_generation_equals_full_forward(flag, score, pos):
    check_cached_generation(flagged(flag, score, pos))


@pytest.mark.parametrize("flag", FLAGS)
def test_ten_training_steps_lower_the_loss(flag):
    check_training_lowers_the_loss(flagged(flag))


@pytest.mark.parametrize("flag", FLAGS)
def test_checkpoint_round_trip_restores_the_logits(flag, tmp_path):
    model = flagged(flag)
    with torch.no_grad():  # move every parameter off its initial value (gains off 1, projections off 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config": asdict(model.config),
                                         "tokenizer": {"kind": "gpt2"}})
    again = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt")).eval()
    assert again.config == model.config
    idx = torch.randint(0, 20, (2, 8))
    assert torch.equal(again(idx)[0], model(idx)[0])
    if not model.config.tie_embeddings:
        assert again.lm_head.weight.data_ptr() != again.transformer.wte.weight.data_ptr()


def test_defaults_are_gpt2():
    config = GPTConfig()
    assert (config.norm, config.activation, config.qk_norm, config.tie_embeddings, config.zero_init_proj) == (
        "layernorm", "gelu", False, True, False)
    model = variant("scaled_dot", "learned")
    assert all(type(m) is not nn.RMSNorm for m in model.modules())
    assert isinstance(model.transformer.h[0].mlp.activation, nn.GELU)
    assert model.transformer.h[0].mlp.activation.approximate == "tanh"
    assert not any("q_norm" in name or "k_norm" in name for name in model.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_proj.weight.abs().min() > 0


def test_rmsnorm_replaces_every_layernorm():
    model = flagged("rmsnorm")
    norms = [model.transformer.ln_f] + [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)]
    assert all(isinstance(m, nn.RMSNorm) for m in norms) and len(norms) == 5
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert not any(".ln_" in name and name.endswith(".bias") for name in model.state_dict())  # gain only
    x = torch.randn(3, 16) * 5 + 2
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()  # no mean subtracted
    torch.testing.assert_close(model.transformer.ln_f(x), expected)


def test_rmsnorm_and_layernorm_differ_only_in_subtracting_the_mean():
    """Both add the same eps: on rows of mean 0, small enough for eps to count, the two give the same numbers."""
    x = torch.randn(4, 16) * 1e-3
    x = x - x.mean(-1, keepdim=True)
    rms, layer = flagged("rmsnorm").transformer.ln_f, variant("scaled_dot", "rope").transformer.ln_f
    assert isinstance(layer, nn.LayerNorm)
    torch.testing.assert_close(rms(x), layer(x))


def test_a_model_without_biases_has_no_norm_biases_and_dropout_drops_in_training_alone():
    unbiased = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, bias=False))
    assert not any(name.endswith(".bias") for name in unbiased.state_dict())
    idx = torch.randint(0, 20, (2, 8))
    torch.manual_seed(0)
    dropping = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    assert not torch.equal(dropping(idx)[0], dropping(idx)[0])  # training mode: other units dropped each pass
    dropping.eval()
    assert torch.equal(dropping(idx)[0], dropping(idx)[0])
    ones = torch.ones(1000)
    kept = make_dropout(0.5)(ones)  # the blocks' own dropout: what survives is scaled by 1 / (1 - p)
    assert set(kept.unique().tolist()) == {0.0, 2.0} and 350 < int(kept.count_nonzero()) < 650
    assert isinstance(make_dropout(0.0), nn.Identity)


def test_relu2_is_relu_squared():
    mlp = flagged("relu2").transformer.h[0].mlp
    assert isinstance(mlp.activation, ReLUSquared)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2))


def test_qk_norm_normalises_queries_and_keys_each_with_its_own_gain():
    """The weights, by hand: each head's query and key RMS-normalised over its channels, times q_norm's and
    k_norm's own gains (set apart here: at their initial 1s a swapped gain would not show), then scaled q.k."""
    attn = flagged("qk_norm", pos="learned").transformer.h[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(1, 6, 16)  # (B, T, C)
    _, weights = attn.context(x, need_weights=True)  # (1, nh, T, T)
    q, k, _ = attn.c_attn(x).split(16, dim=2)
    q, k = (t.view(1, 6, 2, 8).transpose(1, 2) for t in (q, k))  # (1, nh, T, hs)
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()  # noqa: E731
    scores = (rms(q) * attn.q_norm.weight) @ (rms(k) * attn.k_norm.weight).transpose(-1, -2) / math.sqrt(8)
    expected = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    torch.testing.assert_close(weights, expected.detach(), rtol=1e-5, atol=1e-6)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """Scaling the query and key rows of c_attn by 100 changes nothing once they are normalised."""
    def logits_after_scaling(model, factor):
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:32] *= factor  # the query and key rows (n_embd = 16 each)
                block.attn.c_attn.bias[:32] *= factor
        return model(idx)[0]

    idx = torch.randint(0, 20, (2, 8))
    normed = flagged("qk_norm")
    attn = normed.transformer.h[0].attn
    assert isinstance(attn.q_norm, nn.RMSNorm) and attn.q_norm.normalized_shape == (8,)  # over head_dim
    # the same up to RMSNorm's eps (1e-5 against a mean square of about 0.006 at this initialisation)
    torch.testing.assert_close(logits_after_scaling(flagged("qk_norm"), 100.0), normed(idx)[0], rtol=0, atol=1e-3)
    plain = variant("scaled_dot", "rope")
    assert not torch.allclose(logits_after_scaling(variant("scaled_dot", "rope"), 100.0), plain(idx)[0], atol=1e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_rms_norm_keeps_its_inputs_dtype_under_autocast(device):
    """CUDA's autocast runs rms_norm in float32: qk_norm's queries and keys must still reach attention in
    bfloat16, as the projections made them, and equal a float32 norm up to bfloat16's rounding."""
    model = flagged("qk_norm").to(device)
    norm = model.transformer.h[0].attn.q_norm
    x = torch.randn(2, 2, 5, 8, device=device).bfloat16()  # (B, nh, T, hs), as c_attn gives them under autocast
    with torch.autocast(device, dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.rms_norm(x.float(), (8,), norm.weight, norm.eps), rtol=1e-2, atol=1e-2)


def test_qk_norm_puts_normalised_keys_in_the_cache():
    model = flagged("qk_norm")  # with rope: the keys are normalised, then rotated
    cache = KVCache(model.config, 2, "cpu")
    idx = torch.randint(0, 20, (2, 5))
    model(idx, cache=cache)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        k = attn.c_attn(model.transformer.h[0].ln_1(model.transformer.wte(idx)))[..., 16:32]
        k = attn.k_norm(k.view(2, 5, 2, 8).transpose(1, 2))  # (B, nh, T, hs)
    torch.testing.assert_close(cache.k[0, :, :, :5], rotate(k, *rotary_table(torch.arange(5), 8)))
    rms = cache.k[:, :, :, :5].pow(2).mean(-1).sqrt()  # (n_layer, B, nh, 5): gains start at 1, rotation keeps norms
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-2)  # 1 up to RMSNorm's eps


def test_untied_head_has_its_own_weight():
    untied, tied = flagged("untied"), variant("scaled_dot", "rope")
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(untied.state_dict())
    head_size = 20 * 16  # vocab_size x n_embd
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + head_size
    assert untied.num_params() == tied.num_params()  # the head counts, the lookup table does not
    assert 0.015 < untied.lm_head.weight.std().item() < 0.025  # GPT-2's std 0.02, as the tied head has


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = flagged("zero_init_proj")
    projections = [m.c_proj.weight for b in model.transformer.h for m in (b.attn, b.mlp)]
    assert len(projections) == 4 and all((w == 0).all() for w in projections)
    x = torch.randn(2, 8, 16)
    for block in model.transformer.h:
        out, _ = block(x, rotary_table(torch.arange(8), 16 // model.config.n_head))
        assert torch.equal(out, x)
    idx = torch.randint(0, 20, (2, 8))
    embedded = model.transformer.wte(idx)  # rope: no position embedding is added
    torch.testing.assert_close(model(idx)[0], model.lm_head(model.transformer.ln_f(embedded)))


def test_softcap_squashes_every_logit_through_tanh():
    capped = flagged("softcap")
    with torch.no_grad():
        capped.lm_head.weight.mul_(10)  # logits past the cap
    plain = GPT(GPTConfig(**{**asdict(capped.config), "logit_softcap": 0.0}))
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 20, (2, 8))
    raw, logits = plain(idx)[0], capped(idx)[0]
    assert raw.abs().max() > 0.5 and logits.abs().max() < 0.5  # bounded by the cap
    torch.testing.assert_close(logits, 0.5 * torch.tanh(raw / 0.5))
    with pytest.raises(ValueError, match="logit_softcap must be 0"):
        GPTConfig(logit_softcap=-1.0)


def test_value_embeds_add_a_token_table_to_the_first_layers_values():
    model = flagged("value_embeds")
    assert [n for n, _ in model.named_parameters() if ".ve." in n] == ["transformer.ve.0.weight",
                                                                       "transformer.ve.1.weight"]
    idx = torch.randint(0, 20, (2, 8))
    plain = plain_twin(model, value_embeds=0)
    assert not torch.allclose(model(idx)[0], plain(idx)[0])
    with torch.no_grad():
        model.transformer.ve[1].weight.zero_()
    torch.testing.assert_close(model(idx)[0], plain_twin(model, value_embeds=1)(idx)[0])  # one table a layer
    with torch.no_grad():
        model.transformer.ve[0].weight.zero_()
    torch.testing.assert_close(model(idx)[0], plain(idx)[0])  # nothing else differs
    assert model.num_params() == plain.num_params()  # looked up, like wte: not counted
    with pytest.raises(ValueError, match="value_embeds must be between 0 and n_layer"):
        GPTConfig(n_layer=2, value_embeds=3)


def test_unet_adds_the_early_blocks_outputs_to_the_late_blocks_inputs():
    model = variant("scaled_dot", "rope", n_layer=4, unet=True)
    assert model.skip_weights.tolist() == [1.0, 1.0]  # starting as plain sums
    idx = torch.randint(0, 20, (2, 8))
    plain = plain_twin(model, unet=False)
    with torch.no_grad():
        for block in model.transformer.h:  # move the zero-initialised projections, so that blocks write
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(model(idx)[0], plain(idx)[0])
    # block 3 takes block 0's output and block 2 block 1's: the streams entering them, recorded by hand
    streams, x = [], model.transformer.wte(idx)
    rope = rotary_table(torch.arange(8), 8)
    for layer, block in enumerate(plain.transformer.h):
        if layer >= 2:
            x = x + 0.5 * layer * streams[3 - layer]
        x, _ = block(x, rope, layer=layer)
        streams.append(x)
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([1.5, 1.0]))  # skip i: 0.5 * (n_layer - 1 - i)
    torch.testing.assert_close(model(idx)[0], plain.head(plain.transformer.ln_f(x)))
    with torch.no_grad():
        model.skip_weights.zero_()
    torch.testing.assert_close(model(idx)[0], plain(idx)[0])


def test_smear_mixes_in_the_previous_tokens_embedding_only():
    model = flagged("smear")
    idx = torch.randint(0, 20, (2, 8))
    plain = plain_twin(model, smear=False)
    smeared, logits = model(idx)[0], plain(idx)[0]
    torch.testing.assert_close(smeared[:, 0], logits[:, 0])  # the first token has nothing before it
    assert not torch.allclose(smeared[:, 1:], logits[:, 1:])
    # by hand: x_t + scale * sigmoid(gate . x_t) * x_(t-1), and the rest of the network unchanged
    x = model.transformer.wte(idx)
    gate = torch.sigmoid(x @ model.transformer.smear_gate.weight.T)  # (B, T, 1)
    mixed = x + 0.8 * gate * torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
    emb = plain.transformer.wte
    with torch.no_grad():
        plain.transformer.wte = nn.Embedding.from_pretrained(mixed.view(-1, 16))  # one row per (b, t)
    torch.testing.assert_close(smeared, plain(torch.arange(16).view(2, 8))[0])
    plain.transformer.wte = emb


def test_flags_are_checked_and_pass_through_train_config():
    with pytest.raises(ValueError, match="norm must be one of layernorm, rmsnorm, got 'batchnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="activation must be one of gelu, relu2, got 'swish'"):
        GPTConfig(activation="swish")
    # every model field but the dataset's vocab_size is a training key of the same name, passed through
    shape = {f.name for f in fields(GPTConfig)} - {"vocab_size"}
    keys = config_keys(TrainConfig)
    assert shape <= set(keys) and all(keys[name].group == "model" for name in shape)
    config = train_config(**FLAGS["all"]).model_config(vocab_size=20)
    assert {k: getattr(config, k) for k in FLAGS["all"]} == FLAGS["all"]


def test_a_checkpoint_from_before_the_flags_loads_and_resumes(tmp_path, data_dir):
    """A model_config without the new keys means GPT-2's choices: it samples and resumes as before."""
    out = tmp_path / "old"
    train(tiny_config(data_dir, out, max_iters=10, eval_interval=10, attn_log_interval=0, final_eval=False))
    path = out / "ckpt.pt"
    state = load_checkpoint(path)
    new_keys = ("norm", "activation", "qk_norm", "tie_embeddings", "zero_init_proj")
    for key in new_keys:
        del state["model_config"][key], state["train_config"][key]
    for key in ("optimizer", "muon_lr", "muon_momentum", "muon_ns_steps"):
        del state["train_config"][key]
    save_checkpoint(path, state)
    model = model_from_checkpoint(load_checkpoint(path))
    assert model.config == GPTConfig(**{**state["model_config"], **{k: getattr(GPTConfig, k) for k in new_keys}})
    last = train(tiny_config(data_dir, out, max_iters=20, eval_interval=10, attn_log_interval=0, final_eval=False,
                             init_from="resume"))
    assert last["iter"] == 20 and math.isfinite(last["val_loss"])


@pytest.mark.parametrize("flags,score,pos", [({}, "scaled_dot", "learned"), (FLAGS["all"], "additive", "rope")])
def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(flags, score, pos):
    cfg = train_config(n_layer=2, n_head=2, n_embd=16, block_size=8, optimizer="muon", attn_score=score,
                      pos_encoding=pos, **flags)
    model = GPT(cfg.model_config(vocab_size=20))
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}  # a tied matrix once
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len(set(seen)) == len(names) and set(seen) == set(names)  # each parameter exactly once
    muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    assert muon == {f"transformer.h.{i}.{layer}.weight" for i in range(2)
                    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    adamw = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert "transformer.wte.weight" in adamw and "transformer.ln_f.weight" in adamw
    if not cfg.model.tie_embeddings:
        assert "lm_head.weight" in adamw
    if score == "additive":  # per-head score parameters are not hidden matrices
        assert {"transformer.h.0.attn.score_q", "transformer.h.0.attn.score_v"} <= adamw
    set_lr(optimizer, cfg.learning_rate / 4, cfg)  # a quarter of the way: both optimizers follow
    assert [g["lr"] for g in optimizer.muon.param_groups] == [cfg.muon_lr / 4]
    assert all(g["lr"] == cfg.learning_rate / 4 for g in optimizer.adamw.param_groups)


def test_the_default_optimizer_is_still_plain_adamw():
    cfg = train_config(n_layer=2, n_head=2, n_embd=16, block_size=8)
    optimizer = configure_optimizer(GPT(cfg.model_config(vocab_size=20)), cfg, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    set_lr(optimizer, 0.123, cfg)
    assert all(g["lr"] == 0.123 for g in optimizer.param_groups)


def test_muon_trains_checkpoints_both_states_and_resumes_exactly(tmp_path, data_dir, capsys):
    settings = dict(optimizer="muon", max_iters=60, eval_interval=20, dropout=0.1, attn_log_interval=0,
                    final_eval=False)
    cfg = tiny_config(data_dir, tmp_path / "straight", **settings)
    last = train(cfg)
    train(tiny_config(data_dir, tmp_path / "halves", **{**settings, "max_iters": 40}))
    train(tiny_config(data_dir, tmp_path / "halves", **settings, init_from="resume"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in CLOCKED} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "halves")) == strip(read_metrics(tmp_path / "straight"))
    evals = [r for r in read_metrics(cfg.out_dir) if "val_loss" in r]
    assert last["val_loss"] < 0.8 * evals[0]["val_loss"]
    optimizer = load_checkpoint(tmp_path / "straight" / "ckpt.pt")["optimizer"]
    assert len(optimizer["muon"]["state"]) == 8  # a momentum buffer for each of the 2 blocks' 4 matrices
    fraction = get_lr(59, cfg) / cfg.learning_rate  # the schedule at the last step taken
    assert optimizer["muon"]["param_groups"][0]["lr"] == pytest.approx(cfg.muon_lr * fraction)
    assert optimizer["adamw"]["param_groups"][0]["lr"] == get_lr(59, cfg)
    argv = [f"--data_dir={data_dir}", f"--out_dir={cfg.out_dir}", "--dataset=tiny", "--device=cpu", "--n_layer=2",
            "--n_head=2", "--n_embd=32", "--block_size=32", "--init_from=resume", "--max_iters=70", "--optimizer=adamw"]
    assert "optimizer=adamw contradicts the checkpoint's optimizer=muon" in run_main(train_script.main, argv, capsys)


def test_muon_without_torch_optim_muon_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delattr(torch.optim, "Muon")  # as in PyTorch before 2.9
    message = run_main(train_script.main, [f"--out_dir={tmp_path}", "--optimizer=muon"], capsys)
    assert "optimizer=muon needs torch.optim.Muon, which PyTorch 2.9 and newer have" in message


def test_bfloat16_autocast_on_cpu_matches_float32():
    """Under CPU bfloat16 autocast, attention runs in float32 and the norms in the input's dtype (for speed):
    the logits stay close to a float32 forward, with every flag on."""
    model = flagged("all").eval()
    idx = torch.randint(model.config.vocab_size, (2, 16))
    with torch.no_grad():
        reference, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model(idx)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)


def test_muon_ns_steps_reaches_the_optimizer_and_is_validated():
    cfg = train_config(n_layer=1, n_head=2, n_embd=16, block_size=8, optimizer="muon", muon_ns_steps=3)
    optimizer = configure_optimizer(GPT(cfg.model_config(vocab_size=20)), cfg, torch.device("cpu"))
    assert [group["ns_steps"] for group in optimizer.muon.param_groups] == [3]
    with pytest.raises(ValueError, match="muon_ns_steps"):
        TrainConfig(muon_ns_steps=0)
