"""Attention variants: score functions and position encodings, each through every path."""

import itertools
import json
import math

import pytest
import torch

from glimpse.generation import generate
from glimpse.positions import SINUSOID_SCALE, alibi_slopes, rotary_table, rotate, sinusoidal
from glimpse.self_attention import attend, dot_scores
from model import ATTN_SCORES, GPT, POS_ENCODINGS, GPTConfig

COMBINATIONS = list(itertools.product(ATTN_SCORES, POS_ENCODINGS))


def variant(score: str, pos: str, **overrides) -> GPT:
    cfg = dict(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
               attn_score=score, pos_encoding=pos)
    cfg.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


def test_the_lecture_notes_toy_example():
    """One query against three keys, scaled dot-product: the weights and context vector of the notes."""
    keys = torch.tensor([[0.8, 0.6], [0.2, 0.9], [0.0, 0.4]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    query = torch.tensor([[1.0, 0.5]])
    context, weights = attend(dot_scores(query, keys, 1 / math.sqrt(2)), values)
    torch.testing.assert_close(weights, torch.tensor([[0.4431, 0.3224, 0.2345]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(context, torch.tensor([[0.5604, 0.4396]]), atol=1e-4, rtol=0)
    _, weights = attend(dot_scores(torch.tensor([[0.1, 1.2]]), keys, 1 / math.sqrt(2)), values)
    torch.testing.assert_close(weights, torch.tensor([[0.3296, 0.4075, 0.2629]]), atol=1e-4, rtol=0)


def check_paths_agree(model: GPT):
    """The fused path and the explicit one give the same logits; the weights are causal softmax rows."""
    idx = torch.randint(0, 20, (2, 8))
    fast, _ = model(idx)
    explicit, weights = model.forward_with_attention(idx)
    torch.testing.assert_close(explicit, fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 2, 8))
    assert (weights[..., torch.triu(torch.ones(8, 8, dtype=torch.bool), 1)] == 0).all()


def check_cached_generation(model: GPT):
    """Every KV-cached step's logits equal an uncached forward over its window, past block_size."""
    tokens = torch.randint(0, 20, (2, 3))
    for step in generate(model, tokens, 20, generator=torch.Generator().manual_seed(0)):
        expected, _ = model(tokens[:, step.window_start:])
        torch.testing.assert_close(step.logits, expected[:, -1], rtol=1e-4, atol=1e-4)
        tokens = torch.cat([tokens, step.token], 1)


def check_training_lowers_the_loss(model: GPT):
    """Ten AdamW steps on a fixed batch lower the loss by more than 0.3 nats."""
    model.train()
    x = torch.randint(0, 20, (4, 8))
    y = torch.roll(x, -1, dims=1)  # a learnable target: the next token of a fixed batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("score,pos", COMBINATIONS)
def test_fast_and_explicit_paths_agree(score, pos):
    check_paths_agree(variant(score, pos))


@pytest.mark.parametrize("score,pos", COMBINATIONS)
def test_cached_generation_equals_full_forward_past_block_size(score, pos):
    check_cached_generation(variant(score, pos))


@pytest.mark.parametrize("score,pos", COMBINATIONS)
def test_a_few_training_steps_lower_the_loss(score, pos):
    check_training_lowers_the_loss(variant(score, pos))


def test_rotary_turns_each_channel_pair_by_position_times_its_frequency():
    """RoFormer's angles, written out: pair i of a head of size d (channels i and i + d/2) turns by
    p x 10000^(-2i/d) at position p (distance alone would hold for any frequencies)."""
    d, p = 8, 5
    cos, sin = rotary_table(torch.tensor([p]), d)  # (1, d/2) each
    for i in range(d // 2):
        angle = p * 10000.0 ** (-2 * i / d)
        assert cos[0, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert sin[0, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        x = torch.zeros(1, 1, 1, d)
        x[..., i] = 1.0  # the pair's first axis turns towards its second
        turned = rotate(x, cos, sin)[0, 0, 0]
        assert turned[i].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert turned[i + d // 2].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert turned.abs().sum().item() == pytest.approx(abs(math.cos(angle)) + abs(math.sin(angle)), abs=1e-6)


def test_rotary_attention_depends_on_distance_only():
    q, k = torch.randn(2, 1, 2, 6, 8)
    pos = torch.arange(6)
    def rotary(x, pos):
        return rotate(x, *rotary_table(pos, x.size(-1)))

    scores = rotary(q, pos) @ rotary(k, pos).transpose(-1, -2)
    shifted = rotary(q, pos + 37) @ rotary(k, pos + 37).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rotary(q, pos), rotary(q, pos + 37))


def test_rope_gives_the_same_weights_at_shifted_positions():
    attn = variant("scaled_dot", "rope").transformer.h[0].attn
    x = torch.randn(1, 6, 16)
    _, at_zero = attn.context(x, rotary_table(torch.arange(6), attn.head_dim), need_weights=True)
    _, at_fifty = attn.context(x, rotary_table(torch.arange(50, 56), attn.head_dim), need_weights=True)
    torch.testing.assert_close(at_zero, at_fifty, rtol=1e-4, atol=1e-5)


def test_alibi_slopes_are_the_papers_geometric_sequence():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert alibi_slopes(6).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_alibi_slopes_are_real_numbers_in_a_model_built_on_the_meta_device():
    """Loaders build a model's shapes on the meta device (no memory) before its weights: the slopes, a buffer no
    checkpoint holds, must still be the numbers, not a meta tensor that to_empty would fill with garbage."""
    with torch.device("meta"):
        slopes = alibi_slopes(4)
    assert slopes.device.type == "cpu"
    torch.testing.assert_close(slopes, torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]))


def test_alibi_weights_fall_off_with_distance():
    attn = variant("scaled_dot", "alibi").transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight.zero_()  # all scores 0: only ALiBi's bias is left
    _, weights = attn.context(torch.randn(1, 8, 16), need_weights=True)
    last = weights[0, 0, -1]  # the last query of the steepest head
    assert (last[1:] > last[:-1]).all()  # nearer keys get more weight


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi", "none"])
def test_encodings_that_extrapolate_run_past_block_size(pos):
    model = variant("scaled_dot", pos)
    logits, _ = model(torch.randint(0, 20, (1, 32)))  # 4x the block size
    assert logits.shape == (1, 32, 20) and torch.isfinite(logits).all()


def test_learned_positions_refuse_longer_texts_and_say_why():
    with pytest.raises(ValueError, match="learned position embeddings exist for block_size = 8"):
        variant("scaled_dot", "learned")(torch.randint(0, 20, (1, 9)))


def test_configs_are_checked():
    with pytest.raises(ValueError, match="attn_score"):
        GPTConfig(attn_score="cosine")
    with pytest.raises(ValueError, match="pos_encoding"):
        GPTConfig(pos_encoding="relative")
    with pytest.raises(ValueError, match="must be even"):
        GPTConfig(n_embd=12, n_head=4, pos_encoding="rope")
    assert "transformer.wpe.weight" not in variant("scaled_dot", "rope").state_dict()


def test_eval_py_writes_the_table_csv_and_plot(tmp_path, data_dir):
    import csv

    from tests.conftest import python, tiny_config
    from train import train

    out = tmp_path / "rope"
    train(tiny_config(data_dir, out, pos_encoding="rope", block_size=16, max_iters=30, eval_interval=30,
                      attn_log_interval=0))
    run = python("eval.py", f"--out_dir={out}", "--lengths=1,2,4", "--max_tokens=256")
    assert run.returncode == 0, run.stderr
    assert [line.split()[:2] for line in run.stdout.splitlines()[1:]] == [["16", "1"], ["32", "2"], ["64", "4"]]
    rows = list(csv.DictReader(open(out / "length_eval.csv")))
    assert [(r["multiple"], r["mode"]) for r in rows] == [(m, mode) for m in "124" for mode in ("windows", "sliding")]
    assert all(0 < float(r["val_loss"]) < 10 and int(r["tokens_scored"]) >= 256 for r in rows)
    header, *printed = run.stdout.splitlines()
    assert header.split()[3:5] == ["windows", "sliding"]  # after "length" and "x block"
    for line, (windows, sliding) in zip(printed, zip(rows[::2], rows[1::2])):  # each loss under its own heading
        assert [float(v) for v in line.split()[2:4]] == [round(float(windows["val_loss"]), 4),
                                                         round(float(sliding["val_loss"]), 4)]
    assert (out / "length_eval.png").read_bytes()[:4] == b"\x89PNG"

    too_long = python("eval.py", f"--out_dir={out}", "--lengths=100000")
    assert too_long.returncode == 2 and "too few for a context of 1,600,000: score shorter contexts (eval.py's " \
        "--lengths)" in too_long.stderr
    no_context = python("eval.py", f"--out_dir={out}", "--lengths=1,2", "--stride=16")
    assert no_context.returncode == 2 and "--stride=16 leaves sliding windows of 16 tokens no context" in \
        no_context.stderr

    learned = tmp_path / "learned"
    train(tiny_config(data_dir, learned, block_size=16, max_iters=10, eval_interval=10, attn_log_interval=0))
    refused = python("eval.py", f"--out_dir={learned}", "--lengths=1,2")
    assert refused.returncode == 2 and "has none for longer contexts" in refused.stderr
    assert python("eval.py", f"--out_dir={learned}", "--lengths=1", "--max_tokens=64").returncode == 0
    default = python("eval.py", f"--out_dir={learned}", "--max_tokens=64")  # the default lengths: block_size only
    assert default.returncode == 0 and "scoring that length alone" in default.stderr, default.stderr
    assert [line.split(",")[0] for line in (learned / "length_eval.csv").read_text().splitlines()[1:]] == ["1", "1"]


def test_eval_py_scores_the_same_text_at_every_length(tmp_path, data_dir):
    """With its blocks' outputs zeroed, a model predicts each token from the token before it alone, so the
    context cannot change its loss: each length's loss is then that of the text it scored, and every length,
    in each mode, scores the same tokens. (Sliding windows that all began at token 0 scored text further on at
    longer lengths, and max_tokens rounded up to whole windows scored more of it.)"""
    import csv

    from glimpse.checkpoint import best_path, load_checkpoint, save_checkpoint
    from tests.conftest import python, tiny_config
    from train import train

    out = tmp_path / "rope"
    train(tiny_config(data_dir, out, pos_encoding="rope", block_size=16, max_iters=10, eval_interval=10,
                      attn_log_interval=0))
    state = load_checkpoint(best_path(out))  # what eval.py reads
    for name, weight in state["model"].items():
        if ".c_proj." in name:  # what attention and the MLP add to the residual stream
            weight.zero_()
    save_checkpoint(best_path(out), state)
    run = python("eval.py", f"--out_dir={out}", "--lengths=1,2,4", "--max_tokens=100", "--stride=6", "--dtype=float32")
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(open(out / "length_eval.csv")))
    for mode in ("windows", "sliding"):
        scored = [(float(r["val_loss"]), int(r["tokens_scored"])) for r in rows if r["mode"] == mode]
        assert len(scored) == 3 and all(count == 100 for _, count in scored)
        assert [loss for loss, _ in scored] == pytest.approx([scored[0][0]] * 3, rel=1e-6)


def test_eval_py_logs_its_table_and_plot_to_wandb(tmp_path, data_dir):
    from tests.conftest import python, tiny_config
    from train import train

    out = tmp_path / "alibi"
    train(tiny_config(data_dir, out, pos_encoding="alibi", block_size=16, max_iters=10, eval_interval=10,
                      attn_log_interval=0))
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run = python("eval.py", f"--out_dir={out}", "--lengths=1,2", "--max_tokens=64", "--wandb_log=true", env=env)
    assert run.returncode == 0, run.stderr
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = list((run_dir / "files" / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 2  # the full table and the line plot's data
    by_name = {t.name.split("_0_")[0]: json.loads(t.read_text()) for t in tables}
    assert by_name["table"]["columns"][:3] == ["multiple", "length", "mode"] and len(by_name["table"]["data"]) == 4
    assert by_name["sliding_table"]["columns"] == ["multiple", "val_loss"]  # the line plot's points


def test_additive_scores_are_v_tanh_of_the_query_part_plus_the_key_part():
    """Bahdanau's score written out one (head, query, key) at a time: v_h . tanh(q W_q,h + k W_k,h). A score
    without its tanh, or with W_q used for the keys, still runs every path the same way."""
    attn = variant("additive", "none").transformer.h[0].attn
    torch.manual_seed(1)
    with torch.no_grad():
        attn.score_v.normal_()  # larger than its 0.02 start, so that a missing tanh shows
    q, k = torch.randn(2, 1, 2, 3, 8)  # (B, nh, T, hs) each
    scores = attn.scores(q, k).detach()  # (1, nh, T, T)
    for h in range(2):
        w_q, w_k, v = (p[h].detach() for p in (attn.score_q, attn.score_k, attn.score_v))
        for t in range(3):
            for s in range(3):
                expected = sum(v[e] * math.tanh(sum(q[0, h, t, d] * w_q[d, e] + k[0, h, s, d] * w_k[d, e]
                                                    for d in range(8)))
                               for e in range(8))
                assert scores[0, h, t, s].item() == pytest.approx(float(expected), abs=1e-5)


def test_plain_dot_scores_are_unscaled_on_both_paths():
    """attn_score=dot is q . k itself: a dot model scaled by 1/sqrt(hs) on both paths would agree with itself."""
    attn = variant("dot", "none").transformer.h[0].attn
    q, k = torch.randn(2, 1, 2, 3, 8)
    torch.testing.assert_close(attn.scores(q, k), torch.einsum("bhtd,bhsd->bhts", q, k))
    x = torch.randn(1, 3, 16)
    _, weights = attn.context(x, need_weights=True)
    q, k, _ = attn.c_attn(x).split(16, dim=2)
    q, k = (t.view(1, 3, 2, 8).transpose(1, 2) for t in (q, k))  # (1, nh, T, hs)
    logits = (q @ k.transpose(-1, -2)).masked_fill(torch.triu(torch.ones(3, 3, dtype=torch.bool), 1), float("-inf"))
    torch.testing.assert_close(weights, torch.softmax(logits, -1))


@pytest.mark.parametrize("score", ATTN_SCORES)
def test_dropout_acts_while_training_only_and_the_weights_are_the_softmaxs(score):
    """In eval mode a model with dropout computes what the same weights without dropout do, on both paths; in
    training mode its outputs change, yet the weights it hands back are still softmax rows summing to 1."""
    dropping, plain = variant(score, "learned", dropout=0.5), variant(score, "learned")  # same seed: same weights
    idx = torch.randint(0, 20, (2, 8))
    torch.testing.assert_close(dropping(idx)[0], plain(idx)[0])
    torch.testing.assert_close(dropping.forward_with_attention(idx), plain.forward_with_attention(idx))
    dropping.train()
    torch.manual_seed(2)
    logits, weights = dropping.forward_with_attention(idx)
    assert not torch.allclose(logits, plain(idx)[0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 2, 8))


@pytest.mark.parametrize("score", ["scaled_dot", "additive"])
def test_attention_dropout_on_the_explicit_path_drops_the_weights_it_sums_the_values_by(score):
    """In training, the explicit path's context vectors are its softmax weights, dropped out, times the values:
    F.dropout's mask from the same seed, over the weights it hands back; not the undropped weights times them."""
    model = variant(score, "learned", dropout=0.5).train()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.manual_seed(3)
        context, weights = attn.context(x, need_weights=True)  # (B, nh, T, hs), (B, nh, T, T)
        v = attn.c_attn(x).split(16, dim=2)[2].view(2, 8, 2, 8).transpose(1, 2)  # (B, nh, T, hs)
        torch.manual_seed(3)
        expected = torch.nn.functional.dropout(weights, p=0.5) @ v
    torch.testing.assert_close(context, expected)
    assert not torch.allclose(context, weights @ v)


def test_sinusoids_are_sin_at_even_channels_and_cos_at_odd_ones():
    """"Attention Is All You Need": PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i + 1) = cos(the same angle)."""
    d = 6
    table = sinusoidal(torch.arange(5), d)  # (5, d)
    for p in range(5):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoids_of_an_odd_width_fill_exactly_that_width_at_gpt2s_scale():
    """An odd n_embd takes one sine fewer than the pairs make; scaled by SINUSOID_SCALE the table is of the size
    GPT-2's learned position embeddings start at (drawn around 0 with standard deviation 0.02): each sine and cosine
    pair has a mean square of 1/2, so the scaled table's root mean square is 0.02 at any length."""
    table = sinusoidal(torch.arange(5), 7)
    assert table.shape == (5, 7)
    assert table[3, 6].item() == pytest.approx(math.sin(3 / 10000 ** (6 / 7)), abs=1e-6)  # the last sine
    scaled = SINUSOID_SCALE * sinusoidal(torch.arange(1024), 768)
    assert scaled.pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=1e-4)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=3, n_embd=15, pos_encoding="sinusoidal"))
    assert model(torch.randint(11, (2, 8)))[0].shape == (2, 8, 11)


def test_the_length_study_trains_each_encoding_scores_each_length_and_resumes_when_run_again(tmp_path, data_dir,
                                                                                            capsys):
    """scripts/length_study.py end to end, on a small stand-in for the corpus: a model of the recipe's shape per
    encoding and seed, trained for --max_iters steps and scored at each length from its last weights (learned
    positions at 1x only), the tables over seeds, the plots and the dumps at 1x and 4x. Run again, a finished
    study trains nothing; with more steps, a model resumes from its checkpoint."""
    import csv
    import shutil
    import statistics

    import numpy as np

    from data.dataset import TokenData
    from eval import EvalConfig, score_lengths
    from glimpse.attention import attention_weights, load_dump
    from glimpse.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
    from scripts.length_study import main

    data = tmp_path / "data"
    shutil.copytree(data_dir / "tiny", data / "shakespeare_char")
    out = tmp_path / "study"
    args = [f"--out={out}", f"--data_dir={data}", "--encodings=rope,learned", "--seeds=2", "--lengths=1,2",
            "--max_tokens=200"]
    main([*args, "--max_iters=1"])
    runs = {(e, s): out / f"{e}-seed{s}" for e in ("rope", "learned") for s in (1337, 1338)}
    for (encoding, seed), run in runs.items():
        state = load_checkpoint(checkpoint_path(run))
        assert state["iter_num"] == 1 and state["train_config"]["seed"] == seed
        assert state["train_config"]["lr_decay_iters"] == 1 and state["train_config"]["always_save_checkpoint"]
        shape = {k: state["model_config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "pos_encoding")}
        assert shape == {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "pos_encoding": encoding}
    rows = list(csv.DictReader(open(out / "length_study.csv", encoding="utf-8")))
    scored = {(r["pos_encoding"], int(r["seed"]), r["mode"], int(r["multiple"])): float(r["val_loss"]) for r in rows}
    assert len(scored) == len(rows) == 2 * 2 * 2 + 2 * 2  # rope at 1x and 2x, learned at 1x; two modes, two seeds
    for (encoding, seed), run in runs.items():  # each row is its own model's, after its last step
        lengths = "1,2" if encoding == "rope" else "1"
        for r in score_lengths(EvalConfig(out_dir=str(run), lengths=lengths, max_tokens=200, checkpoint="last")):
            assert scored[(encoding, seed, r["mode"], r["multiple"])] == pytest.approx(r["val_loss"], rel=1e-6)
    assert scored[("rope", 1337, "sliding", 1)] != scored[("rope", 1338, "sliding", 1)]
    table = (out / "length_study.md").read_text(encoding="utf-8")
    pair = [scored[("rope", s, "sliding", 2)] for s in (1337, 1338)]
    assert f"{statistics.mean(pair):.3f} [{min(pair):.3f}, {max(pair):.3f}] |" in table
    assert "| learned | " in table and table.count(" n/a |") == 2  # learned at 2x, in each mode
    assert table in capsys.readouterr().out
    dumps = {d.name: load_dump(d) for d in (out / "dumps").iterdir()}
    assert sorted(dumps) == ["learned-1x", "rope-1x", "rope-4x"]
    assert [dumps[n]["attn"].shape[-1] for n in ("learned-1x", "rope-1x", "rope-4x")] == [64, 64, 256]
    val = TokenData(data / "shakespeare_char").tokens("val")  # the same text at each length: the split's start
    assert [dumps[n]["token_ids"].tolist() for n in ("rope-1x", "rope-4x")] == [val[:64].tolist(), val[:256].tolist()]
    first_seed = model_from_checkpoint(load_checkpoint(checkpoint_path(runs[("rope", 1337)]))).eval()
    want = attention_weights(first_seed, torch.from_numpy(val[:64].astype(np.int64)))  # the first seed's model
    np.testing.assert_array_equal(dumps["rope-1x"]["attn"], want)
    assert (out / "length_study.png").stat().st_size and (out / "length_study_attention.png").stat().st_size

    again = [*args[:2], *args[4:], "--seeds=1"]
    learned = runs[("learned", 1337)]
    trained = checkpoint_path(learned).stat().st_mtime_ns, (learned / "metrics.jsonl").read_bytes()
    main([*again, "--encodings=learned", "--max_iters=1"])  # finished: not trained again, its rows come back
    assert (checkpoint_path(learned).stat().st_mtime_ns, (learned / "metrics.jsonl").read_bytes()) == trained
    assert "resumed from" not in capsys.readouterr().out  # nor resumed to evaluate its last step again
    assert list(csv.DictReader(open(out / "length_study.csv", encoding="utf-8"))) == [
        r for r in rows if r["pos_encoding"] == "learned" and r["seed"] == "1337"]
    main([*again, "--encodings=rope", "--max_iters=2"])  # one step more: resumed from its checkpoint
    run = runs[("rope", 1337)]
    evals = [r["iter"] for r in map(json.loads, open(run / "metrics.jsonl")) if "val_loss" in r]
    assert load_checkpoint(checkpoint_path(run))["iter_num"] == 2 and evals == [0, 1, 2]
