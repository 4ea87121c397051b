"""Attention dumps from sample.py and train.py: contents, honesty, head metrics, probes and wandb."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from glimpse.attention import head_metrics, load_dump
from glimpse.checkpoint import checkpoint_path, load_checkpoint
from glimpse.errors import GlimpseError
from glimpse.induction import induction_heads, induction_probe, induction_scores, induction_verdict, probe_tokens
from sample import SampleConfig, default_dump_dir, sample
from tests.conftest import python
from tests.wandb_records import logged_history


def layer0_weights_by_hand(state_dict: dict, token_ids: np.ndarray, n_head: int) -> np.ndarray:
    """softmax(QK^T / sqrt(d) + causal mask) of layer 0, from the raw weights, in numpy alone."""
    sd = {k: v.double().numpy() for k, v in state_dict.items()}
    T = len(token_ids)
    x = sd["transformer.wte.weight"][token_ids] + sd["transformer.wpe.weight"][:T]  # (T, C)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-5) * sd["transformer.h.0.ln_1.weight"] + sd["transformer.h.0.ln_1.bias"]
    qkv = x @ sd["transformer.h.0.attn.c_attn.weight"].T + sd["transformer.h.0.attn.c_attn.bias"]  # (T, 3C)
    C = x.shape[1]
    d = C // n_head
    q = qkv[:, :C].reshape(T, n_head, d).transpose(1, 0, 2)  # (H, T, d)
    k = qkv[:, C:2 * C].reshape(T, n_head, d).transpose(1, 0, 2)  # (H, T, d)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)  # (H, T, T)
    scores[:, np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    scores -= scores.max(-1, keepdims=True)
    w = np.exp(scores)
    return w / w.sum(-1, keepdims=True)


def test_sample_dumps_the_attention_of_a_prompt(trained, tmp_path):
    cfg, _ = trained
    dump_dir = tmp_path / "dumps"
    run = python("sample.py", f"--out_dir={cfg.out_dir}", "--start=ROMEO:\nthe night", "--max_new_tokens=0",
                 "--num_samples=1", f"--dump_dir={dump_dir}")
    assert run.returncode == 0, run.stderr
    folder = dump_dir / "sample_0"
    dump = load_dump(folder)
    T = len("ROMEO:\nthe night")
    assert dump["attn"].dtype == np.float16 and dump["attn"].shape == (2, 2, T, T)
    assert dump["token_ids"].dtype == np.int32 and "".join(dump["tokens"]) == "ROMEO:\nthe night"
    assert dump["prompt_len"] == T
    attn = dump["attn"].astype(np.float32)
    assert (attn[..., np.triu(np.ones((T, T), dtype=bool), 1)] == 0).all()
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=5e-3)
    assert dump["meta"]["iter"] == 150 and dump["meta"]["sampling"]["max_new_tokens"] == 0
    assert dump["meta"]["model_config"]["n_layer"] == 2
    heads = json.loads((folder / "heads.json").read_text())
    assert [len(layer["heads"]) for layer in heads["layers"]] == [2, 2]
    assert {p.name for p in folder.iterdir()} >= {"attention.npz", "heads.json", "layer_0.png", "layer_1.png",
                                                  "index.html"}
    # honest numbers: the dump equals an independent computation from the checkpoint's weights
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    expected = layer0_weights_by_hand(state["model"], dump["token_ids"], n_head=2)
    np.testing.assert_allclose(attn[0], expected, atol=2e-3)


@pytest.mark.parametrize("setting, message", [
    (dict(num_samples=0), "num_samples must be at least 1, got 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must not be negative, got -1"),
    (dict(mechanism=True, dump_attention=False), "--mechanism goes into the attention dumps: drop "
                                                 "--dump_attention=false"),
    (dict(mechanism=True, ablate="0.0"), "--mechanism shows the intact model's heads at work: drop --ablate (or "
                                         "dump the mechanism in a run of its own)"),
])
def test_sample_settings_out_of_range_or_at_odds_are_one_clear_error(setting, message):
    with pytest.raises(ValueError) as error:
        SampleConfig(**setting)
    assert str(error.value) == message
    SampleConfig(num_samples=1, max_new_tokens=0, mechanism=True)  # the edges themselves are allowed


def test_a_pretrained_models_dumps_go_to_a_folder_named_after_it_not_into_a_run():
    """out/attention may be a run's own (its snapshots beside it): sample.py --init_from=gpt2 writes elsewhere."""
    assert default_dump_dir(SampleConfig(init_from="gpt2")) == Path("attention-gpt2")
    assert default_dump_dir(SampleConfig(init_from="models/hf-char")) == Path("attention-hf-char")
    assert default_dump_dir(SampleConfig(init_from=".")) == Path(f"attention-{Path.cwd().name}")  # not attention-
    assert default_dump_dir(SampleConfig(init_from="models/hf-char/..")) == Path("attention-models")
    assert default_dump_dir(SampleConfig(out_dir="out-x")) == Path("out-x") / "attention"


def test_a_run_and_another_model_given_together_are_refused_not_one_dropped():
    """--init_from samples or scores a model of its own: a run's --checkpoint (sample.py and eval.py) or, for
    sample.py, its --out_dir given beside it would be dropped without a word; eval.py writes into an --out_dir."""
    import eval as eval_script

    for make in (SampleConfig, lambda **kw: eval_script.EvalConfig(task="hellaswag", **kw)):
        with pytest.raises(ValueError, match=r"^--checkpoint=last picks one of OUT_DIR's checkpoints, but "
                                             r"--init_from=gpt2 reads a model of its own: drop --checkpoint$"):
            make(init_from="gpt2", checkpoint="last")
        assert make(checkpoint="last").checkpoint == "last" and make(init_from="gpt2").init_from == "gpt2"
    with pytest.raises(ValueError, match=r"^--out_dir names a run to sample from, but --init_from=gpt2 samples"):
        SampleConfig(init_from="gpt2", out_dir="out-x")
    assert eval_script.EvalConfig(task="hellaswag", init_from="gpt2", out_dir="mine").out_dir == "mine"


def test_sample_dump_keeps_the_last_window_and_can_be_turned_off(trained, tmp_path):
    cfg, _ = trained
    run = python("sample.py", f"--out_dir={cfg.out_dir}", "--start=ROMEO:", "--max_new_tokens=40",
                 "--num_samples=2", f"--dump_dir={tmp_path / 'd'}")
    assert run.returncode == 0, run.stderr
    for i in range(2):
        dump = load_dump(tmp_path / "d" / f"sample_{i}")
        assert dump["attn"].shape[-1] == 32  # 6 + 40 tokens, cut to the block_size window
        assert dump["prompt_len"] == 0  # the prompt fell out of the window
        assert "".join(dump["tokens"]) in run.stdout
    off = python("sample.py", f"--out_dir={cfg.out_dir}", "--max_new_tokens=5", "--num_samples=1",
                 "--dump_attention=false", f"--dump_dir={tmp_path / 'off'}")
    assert off.returncode == 0 and not (tmp_path / "off").exists()


def test_head_metrics_on_known_patterns():
    T = 6
    attn = np.zeros((1, 3, T, T))
    for q in range(T):
        attn[0, 0, q, max(q - 1, 0)] = 1.0  # previous token
        attn[0, 1, q, 0] = 1.0  # sink on the first token
        attn[0, 2, q, : q + 1] = 1.0 / (q + 1)  # uniform over the past
    prev, sink, uniform = head_metrics(attn)["layers"][0]["heads"]
    assert prev["prev_token"] == 1.0 and prev["mean_distance"] == 1.0 and prev["entropy"] == 0.0
    assert prev["self"] == 0.0  # the query's own key, which a previous-token head leaves alone
    assert sink["first_token"] == 1.0 and sink["mean_distance"] == pytest.approx(np.mean(range(1, T)))
    assert sink["self"] == 0.0 and sink["prev_token"] == pytest.approx(1 / (T - 1))  # only query 1's is the first
    assert uniform["entropy"] == pytest.approx(np.mean([np.log(q + 1) for q in range(1, T)]))
    assert uniform["self"] == pytest.approx(np.mean([1 / (q + 1) for q in range(1, T)]))


def test_gpt2_token_strings_keep_partial_utf8(gpt2_ranks):
    from data.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = tok.encode("naïve 🤖 robot")
    strings = tok.token_strings(ids)
    assert len(strings) == len(ids) and any("\\x" in s for s in strings)  # the emoji spans tokens
    assert "".join(strings).startswith("naïve")


def test_training_writes_attention_maps_and_logs_them_to_wandb(tmp_path, data_dir):
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=10",
                 "--eval_interval=10", "--eval_iters=2", "--attn_log_interval=5", "--wandb_log=true", env=env)
    assert run.returncode == 0, run.stderr
    steps = (0, 5, 10)  # a snapshot between the logs too (every 10 steps), which logs at no other step
    for it in steps:
        dump = load_dump(out / "attention" / f"iter_{it}")
        assert dump["attn"].shape == (2, 2, 16, 16) and dump["meta"]["iter"] == it
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "attention").glob("layer_0_*.png"))) == 3
    assert len(list((media / "images" / "attention").glob("layer_1_*.png"))) == 3
    assert len(list((media / "html" / "attention").glob("viewer_*.html"))) == 3
    assert len(list((media / "table" / "attention").glob("heads_*.table.json"))) == 3
    columns = ["layer", "head", "entropy", "prev_token", "first_token", "self", "mean_distance"]
    tables = [json.loads(path.read_text()) for path in (media / "table" / "attention").glob("heads_*.table.json")]
    assert all(table["columns"] == columns for table in tables)
    # each table is one snapshot's heads.json, a row per head under its own layer and head
    snapshots = [json.loads((out / "attention" / f"iter_{it}" / "heads.json").read_text()) for it in steps]
    expected = [[[layer["layer"], head["head"], *(head[c] for c in columns[2:])] for layer in heads["layers"]
                 for head in layer["heads"]] for heads in snapshots]
    np.testing.assert_allclose(sorted(table["data"] for table in tables), sorted(expected), rtol=1e-12)
    assert [row[:2] for row in expected[0]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # each snapshot at the step it was taken at
    assert [row["_step"] for row in logged_history(run_dir) if "attention/layer_0/_type" in row] == list(steps)
    types = {k: v for row in logged_history(run_dir) for k, v in row.items() if k.endswith("/_type")}
    assert types == {"attention/layer_0/_type": "image-file", "attention/layer_1/_type": "image-file",
                     "attention/viewer/_type": "html-file", "attention/heads/_type": "table-file"}

    # sample.py logs its dump to the run that trained the checkpoint
    state = load_checkpoint(checkpoint_path(out))
    sampled = python("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1", "--wandb_log=true",
                     env=env)
    assert sampled.returncode == 0, sampled.stderr
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(state["wandb_run_id"]) for r in runs)
    assert "sample_0/layer_0/_type" in set().union(*logged_history(runs[-1]))


def test_induction_probe_on_an_untrained_model_finds_nothing():
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=3, n_embd=12)).eval()
    probe = induction_probe(model, n_tokens=8, batch=4)
    assert np.array(probe["induction"]).shape == (2, 3)
    assert np.array(probe["induction"]).max() < 0.3  # attention spread over ~8-16 keys
    assert probe["first_copy_loss"] == pytest.approx(np.log(30), abs=0.3)
    assert probe["second_copy_loss"] == pytest.approx(np.log(30), abs=0.3)
    # by hand: position t predicts token t + 1; the first copy's predictions of r[1:] are positions 0..n-2, the
    # second's n..2n-2 (position n-1 predicts the second copy's first token, which nothing before it gives away)
    seq = probe_tokens(30, 8, 4, 0)  # (4, 16): the probe's own sequences, its default seed
    with torch.no_grad():
        logits, _ = model(seq)  # (4, 16, 30)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), seq[:, 1:], reduction="none")
    assert probe["first_copy_loss"] == pytest.approx(losses[:, :7].mean().item(), rel=1e-5)
    assert probe["second_copy_loss"] == pytest.approx(losses[:, 8:].mean().item(), rel=1e-5)
    # each head's weight on the token just before, over every query but the first (which has none before it)
    with torch.no_grad():
        _, weights = model.forward_with_attention(seq)  # (L, 4, H, 16, 16)
    t = torch.arange(1, 16)
    by_hand = weights[:, :, :, t, t - 1].mean(dim=(1, 3))  # (L, H)
    np.testing.assert_allclose(probe["prev_token_on_probe"], by_hand.numpy(), rtol=1e-3, atol=1e-4)
    for n in (9, 0, 1):  # past half the block, and none (which once meant the default)
        with pytest.raises(GlimpseError, match=f"n_tokens must be from 2 to 8 .*; got {n}$"):
            induction_probe(model, n_tokens=n)


def test_induction_scores_on_known_heads():
    """Over [r, r], a head that reads the token after r[j]'s first copy scores 1, one that reads the previous
    token or r[j]'s first copy itself scores 0. Catches scoring the key at j (the earlier copy of the query's
    own token) instead of j + 1 (the token that followed it). Every query of the second copy counts, the
    last one too: its induction key, n, is in the sequence."""
    n = 5
    tokens = torch.tensor([[3, 0, 4, 1, 2] * 2, [1, 2, 3, 4, 0] * 2])  # (B, 2n): r has no repeats
    weights = torch.zeros(1, 2, 5, 2 * n, 2 * n)  # (L, B, H, 2n, 2n)
    for q in range(2 * n):
        earlier = q - n if q >= n else q  # the first copy of the query's token (itself in the first copy)
        induction = earlier + 1 if q >= n else q
        weights[0, :, 0, q, induction] = 1.0
        weights[0, :, 1, q, max(q - 1, 0)] = 1.0  # previous token
        weights[0, :, 2, q, earlier] = 1.0  # the same token, the first time
        weights[0, :, 3, q, induction] += 0.5  # half induction, half on the query itself
        weights[0, :, 3, q, q] += 0.5
        weights[0, :, 4, q, induction if q == 2 * n - 1 else q] = 1.0  # induction at the last query only
    scores = induction_scores(weights, tokens)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.0, 0.0, 0.5, 1 / n]]))


def perfect_induction_head(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (1, B, 1, T, T): a head that matches tokens, as an induction head does: each query spreads
    its weight evenly over the keys that followed an earlier occurrence of its token (itself when none)."""
    B, T = tokens.shape
    weights = torch.zeros(1, B, 1, T, T)
    for b in range(B):
        for q in range(T):
            keys = [k + 1 for k in range(q) if tokens[b, k] == tokens[b, q]] or [q]
            for k in keys:
                weights[0, b, 0, q, k] += 1 / len(keys)
    return weights


@pytest.mark.parametrize("vocab_size, n", [(65, 64), (65, 16), (50257, 32), (16, 16), (4, 16), (2, 9)])
def test_a_perfect_induction_head_scores_1_at_any_vocabulary(vocab_size, n):
    """A head that reads what followed every earlier occurrence of the query's token is as good an
    induction head as there is. Scored on the single key j + 1 it scored about 0.6 on r drawn with repeats
    from a char model's 65 tokens at n = 64. The probe draws r without repeats where the vocabulary allows,
    and credits every such key where it does not: the head scores 1, and so does the ceiling reported."""
    tokens = probe_tokens(vocab_size, n, batch=6, seed=0)  # (B, 2n)
    assert tokens.shape == (6, 2 * n) and (tokens[:, :n] == tokens[:, n:]).all()
    assert 0 <= tokens.min() and tokens.max() < vocab_size
    if vocab_size >= n:  # every query has one earlier occurrence, so one induction key: j + 1
        assert all(len(set(row[:n].tolist())) == n for row in tokens)
    assert induction_scores(perfect_induction_head(tokens), tokens).item() == pytest.approx(1.0, abs=1e-6)
    assert (probe_tokens(vocab_size, n, batch=6, seed=0) == tokens).all()  # the seed decides the draw


def test_the_induction_probe_reports_its_ceiling_and_how_it_drew():
    from model import GPT, GPTConfig

    for vocab_size, draw in [(30, "without repeats"), (5, "with repeats")]:
        model = GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=8)).eval()
        probe = induction_probe(model, n_tokens=8, batch=4)
        assert probe["draw"] == draw and probe["induction_ceiling"] == 1.0
        assert np.array(probe["prev_token_on_probe"]).shape == (1, 2) and "prev_token" not in probe
        assert probe["verdict"].startswith("no induction head")  # random weights


def test_the_probe_draws_no_id_past_the_tokenizers(tmp_path):
    """A vocabulary padded past its tokenizer's (for speed) has ids no text holds and training never shaped: the
    probe draws from the tokenizer's ids, as sample.py and the notebook give them. A padding row made NaN here
    would make the attention of every sequence that holds it NaN."""
    from glimpse.notebook import Model
    from model import GPT, GPTConfig
    from sample import report_probe

    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=8)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[20:] = float("nan")
    assert np.isnan(induction_probe(model, n_tokens=8, batch=4)["induction"]).all()  # drawn from the model's 40
    probe = induction_probe(model, n_tokens=8, batch=4, vocab_size=20)
    assert probe["vocab_size"] == 20 and np.isfinite(probe["induction"]).all()
    assert induction_probe(model, n_tokens=8, batch=4, vocab_size=50)["vocab_size"] == 40  # the model's ids at most
    assert induction_probe(model, n_tokens=8, batch=4, vocab_size=5)["draw"] == "with repeats"  # 8 of 5 ids
    out = io.StringIO()
    report_probe(model, [], tmp_path, SampleConfig(probe="induction"), out, vocab_size=20)
    assert "induction probe: 8 random tokens of 20 (without repeats), repeated" in out.getvalue()
    assert np.isfinite(json.loads((tmp_path / "probe_induction.json").read_text())["induction"]).all()
    notebook = Model(model, {"tokenizer": {"kind": "char", "chars": "abcdefghijklmnopqrst"}})  # 20 characters
    assert np.isfinite(notebook.induction(n_tokens=8)["induction"]).all()
    with pytest.raises(GlimpseError, match="the probe's vocab_size must be at least 1 .*; got 0$"):
        induction_probe(model, n_tokens=8, vocab_size=0)
    for wrong in (2.5, "20"):  # a size, not a float or a text
        with pytest.raises(GlimpseError, match=f"vocab_size must be a whole number .* or None; got {wrong!r}$"):
            induction_probe(model, n_tokens=8, vocab_size=wrong)


def test_the_induction_verdict_names_the_heads_that_read_the_induction_key():
    """At least half the ceiling and the peak at +1: 0.1 and 1.0 are induction heads, 1.1 scores more than
    1.0 but looks elsewhere most, and 0.0 scores too little."""
    probe = {"induction": [[0.1, 0.9], [0.6, 0.7]], "peak_offsets": [[1, 1], [1, -1]], "induction_ceiling": 1.0,
             "second_copy_loss_without": [[1.0, 3.5], [2.0, 0.4]], "first_copy_loss": 3.4, "second_copy_loss": 0.3}
    assert induction_verdict(probe).startswith("induction heads 0.1 (0.900, 3.500 without it), 1.0 (0.600, 2.000 "
                                               "without it); the second copy costs 0.300 nats, the first 3.400")
    assert induction_heads(probe) == [(0, 1), (1, 0)]  # highest score first, as the verdict names them
    probe["induction_ceiling"] = 2.0  # the same scores, now below half of it
    assert induction_verdict(probe).startswith("no induction head") and "the highest, head 0.1, scores 0.900" in \
        induction_verdict(probe)
    assert induction_heads(probe) == []
    probe["induction_ceiling"], probe["peak_offsets"] = 1.2, [[1, 1], [0, -1]]  # 1.0 now peaks at its own token
    assert induction_heads(probe) == [(0, 1)] and induction_verdict(probe).startswith("induction head 0.1 (0.900")


def test_induction_probe_offsets_place_each_heads_weight_relative_to_the_earlier_token():
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=3, n_embd=12)).eval()
    for block in model.transformer.h:
        with torch.no_grad():
            block.attn.c_attn.weight.zero_()  # every score 0: each query spreads evenly over the keys it sees
            block.attn.c_attn.bias.zero_()
    n = 6
    offsets = np.array(induction_probe(model, n_tokens=n, batch=2)["offsets"])  # (L, H, 2n)
    expected = np.zeros(2 * n)  # the query at n + j sees n + j + 1 keys; key j + d sits at index n - 1 + d
    for j in range(n):
        for d in range(-j, n + 1):
            expected[n - 1 + d] += 1 / (n + j + 1) / n
    assert offsets.shape == (2, 3, 2 * n)
    # the probe holds the weights in float16, as the dumps do: 3 significant digits
    np.testing.assert_allclose(offsets, np.broadcast_to(expected, offsets.shape), rtol=1e-3)
    np.testing.assert_allclose(offsets.sum(-1), 1.0, rtol=1e-3)


def test_sample_probe_prints_and_saves_head_scores(trained, tmp_path):
    cfg, _ = trained
    run = python("sample.py", f"--out_dir={cfg.out_dir}", "--start=ROMEO:", "--max_new_tokens=20", "--num_samples=2",
                 "--probe=induction", f"--dump_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    chars = load_checkpoint(checkpoint_path(cfg.out_dir))["tokenizer"]["chars"]  # the tokenizer's ids are drawn
    assert f"induction probe: 16 random tokens of {len(chars)} (without repeats), repeated" in run.stdout
    table = run.stdout[run.stdout.index("layer head  induction  peak  prev_token  sink  without\n"):].splitlines()
    legend = [line.split()[0] for line in table[5:10]]  # after the header and the 4 heads' rows
    assert legend == ["induction", "peak", "prev_token", "sink", "without"]
    assert table[5].endswith("a perfect induction head: 1.000") and "(zero ablation)" in table[9]
    assert table[6].endswith("+1 induction, 0 the same token, +15 the query's previous token, +16 the query itself")
    probe = json.loads((tmp_path / "probe_induction.json").read_text())
    assert table[10] == f"verdict: {probe['verdict']}" and probe["verdict"] == induction_verdict(probe)  # its numbers'
    assert probe["induction_heads"] == [list(h) for h in induction_heads(probe)]  # the heads the verdict names
    assert len(probe["heads"]) == 4 and probe["n_tokens"] == 16 and probe["induction_ceiling"] == 1.0
    assert "prev_token" not in probe and len(probe["prev_token_on_probe"]) == 2  # over [r, r], per layer
    assert {"prev_token_on_samples", "first_token_on_samples"} <= set(probe["heads"][0])
    assert "prev_token" not in probe["heads"][0] and "first_token" not in probe["heads"][0]
    for head in probe["heads"]:  # the printed peak is the largest entry of that head's offset profile
        row = probe["offsets"][head["layer"]][head["head"]]
        assert row[head["peak_offset"] + 15] == max(row)
    heads_0 = json.loads((tmp_path / "sample_0" / "heads.json").read_text())
    heads_1 = json.loads((tmp_path / "sample_1" / "heads.json").read_text())
    expected = (heads_0["layers"][1]["heads"][0]["prev_token"] + heads_1["layers"][1]["heads"][0]["prev_token"]) / 2
    assert probe["heads"][2]["prev_token_on_samples"] == pytest.approx(expected)  # layer 1, head 0: over the samples


def test_the_npz_is_read_back_bit_for_bit_with_numpy_alone(tmp_path):
    from glimpse.attention import load_layer, write_dump

    rng = np.random.default_rng(0)
    T = 9
    scores = rng.normal(scale=6.0, size=(3, 2, T, T))  # peaky rows: weights from about 1e-8 (subnormal in float16) to 1
    scores[..., np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    attn = torch.softmax(torch.tensor(scores), -1).numpy().astype(np.float16)  # (L, H, T, T)
    write_dump(tmp_path, attn, list(range(T)), [chr(97 + i) for i in range(T)], 4, {"k": 1}, pictures=False)
    # the recipe docs/attention.md gives, in numpy alone
    z = np.load(tmp_path / "attention.npz")
    bits = z["layer_2_high"].astype(np.uint16) << 8 | z["layer_2_low"]  # (n_head, T(T+1)/2)
    rows, cols = np.tril_indices(T)
    layer = np.zeros((2, T, T), np.float16)
    layer[:, rows, cols] = bits.view(np.float16)
    assert z["layer_2_high"].dtype == np.uint8 and z["layer_2_high"].shape == (2, T * (T + 1) // 2)
    assert (layer.view(np.uint16) == attn[2].view(np.uint16)).all()
    assert (load_layer(tmp_path, 1).view(np.uint16) == attn[1].view(np.uint16)).all()
    dump = load_dump(tmp_path)
    assert (dump["attn"].view(np.uint16) == attn.view(np.uint16)).all() and dump["meta"] == {"k": 1}
    assert dump["prompt_len"] == 4 and list(dump["tokens"]) == [chr(97 + i) for i in range(T)]
    assert not list(tmp_path.glob("*.part"))  # the temporary npz was renamed into place


def test_a_dump_over_an_earlier_one_leaves_none_of_its_files(tmp_path):
    """sample.py writes sample_<i> again on every run: pictures, layers and head importance of an earlier dump
    that this one does not write must not stay to pass for this text's (wandb uploads the folder's PNGs)."""
    from glimpse.attention import write_dump

    def attention(n_layer: int, T: int) -> np.ndarray:
        scores = np.where(np.tril(np.ones((T, T), dtype=bool)), 0.0, -np.inf)
        return np.broadcast_to(torch.softmax(torch.tensor(scores), -1).numpy(), (n_layer, 2, T, T)).astype(np.float16)

    importance = {"ablation": "zero", "intact_loss": 1.0, "loss_increase": [[0.1, 0.2]] * 3}
    write_dump(tmp_path, attention(3, 6), list(range(6)), list("abcdef"), 2, {}, importance=importance)
    assert {p.name for p in tmp_path.iterdir()} >= {"layer_2.png", "head_importance.json", "index.html"}
    write_dump(tmp_path, attention(2, 4), list(range(4)), list("abcd"), 2, {}, pngs=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.npz", "heads.json", "index.html"]
    write_dump(tmp_path, attention(2, 4), list(range(4)), list("abcd"), 2, {}, pictures=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.npz", "heads.json"]
    write_dump(tmp_path / "user", attention(1, 4), list(range(4)), list("abcd"), 2, {})
    for name in ("notes.txt", "layer_norm.png"):  # what is not a dump's own stays
        (tmp_path / "user" / name).write_text("mine")
    write_dump(tmp_path / "user", attention(1, 4), list(range(4)), list("abcd"), 2, {}, pictures=False)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine" == (tmp_path / "user" / "layer_norm.png").read_text()


def test_the_probe_legend_at_two_tokens_names_each_offset_once(tmp_path):
    """At block_size 4 the probe repeats 2 tokens, and the query's previous token is at +1, induction's offset."""
    from model import GPT, GPTConfig
    from sample import report_probe

    model = GPT(GPTConfig(block_size=4, vocab_size=10, n_layer=1, n_head=2, n_embd=8)).eval()
    out = io.StringIO()
    report_probe(model, [], tmp_path, SampleConfig(probe="induction"), out)
    legend = next(line for line in out.getvalue().splitlines() if line.startswith("  peak"))
    assert legend.endswith(": +1 induction, 0 the same token, +2 the query itself")


def test_sample_names_the_dumps_it_wrote_and_leaves_none_of_an_earlier_run(trained, tmp_path, capsys):
    """A run of fewer samples than the last removes the last one's later sample_<i> folders, and a run without the
    probe the last one's probe file: beside this run's they would pass for its own. The line that points to the
    dumps names this run's; what is not a dump is left alone."""
    cfg, _ = trained
    dumps = tmp_path / "dumps"
    for n, probe, named, removed in (
            (3, "induction", "sample_0/index.html to sample_2/index.html", ""),
            (2, "induction", "sample_0/index.html to sample_1/index.html", "sample_2"),
            (1, "none", "sample_0/index.html", "sample_1, probe_induction.json")):
        (dumps / "sample_7").mkdir(parents=True, exist_ok=True)  # not a dump: no attention.npz
        sample(SampleConfig(out_dir=cfg.out_dir, num_samples=n, max_new_tokens=5, dump_dir=str(dumps), pngs=False,
                            probe=probe), io.StringIO())
        err = capsys.readouterr().err.splitlines()
        assert [line for line in err if line.startswith("attention dumps:")] == [f"attention dumps: {dumps}/{named}"]
        assert [load_dump(dumps / f"sample_{i}")["meta"]["sample"] for i in range(n)] == list(range(n))
        assert [line for line in err if line.startswith("removed")] == (
            [f"removed an earlier run's {removed} from {dumps}: a dump folder holds one run's"] if removed else [])
        assert sorted(path.name for path in dumps.iterdir()) == [
            *(["probe_induction.json"] if probe == "induction" else []), *(f"sample_{i}" for i in range(n)),
            "sample_7"]
    sample(SampleConfig(out_dir=cfg.out_dir, num_samples=1, max_new_tokens=5, dump_dir=str(dumps), pngs=False,
                        dump_attention=False), io.StringIO())  # writes nothing there: removes nothing
    assert sorted(path.name for path in dumps.iterdir()) == ["sample_0", "sample_7"]
    shutil.copytree(dumps / "sample_0", dumps / "sample_1")  # as a run of two samples left it
    sample(SampleConfig(out_dir=cfg.out_dir, num_samples=1, max_new_tokens=5, dump_dir=str(dumps), pngs=False,
                        dump_attention=False, probe="induction"), io.StringIO())  # the probe alone: dumps stay
    assert sorted(path.name for path in dumps.iterdir()) == ["probe_induction.json", "sample_0", "sample_1",
                                                             "sample_7"]
    # a text longer than the model attends over is dumped as its last block_size tokens: the line says so
    sample(SampleConfig(out_dir=cfg.out_dir, start="ROMEO:", max_new_tokens=26, num_samples=1, dump_dir=str(dumps),
                        pngs=False), io.StringIO())  # 6 + 26 = 32 tokens, block_size: all of it dumped
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attention dumps:")]
    assert lines == [f"attention dumps: {dumps}/sample_0/index.html"]
    sample(SampleConfig(out_dir=cfg.out_dir, start="ROMEO:", max_new_tokens=27, num_samples=1, dump_dir=str(dumps),
                        pngs=False), io.StringIO())  # 6 + 27 = 33 tokens, one past block_size
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attention dumps:")]
    assert lines == [f"attention dumps: {dumps}/sample_0/index.html (each text's last 32 tokens, the model's "
                     "block_size)"]
    assert len(load_dump(dumps / "sample_0")["tokens"]) == 32


def test_token_text_with_nul_characters_round_trips_through_a_dump(tmp_path):
    from data.tokenizer import CharTokenizer
    from glimpse.attention import dump_text, write_npz
    from model import GPT, GPTConfig

    tokenizer = CharTokenizer.from_text("a\x00b")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8))
    ids = tokenizer.encode("a\x00b\x00\x00a").tolist()
    dump_text(model, tokenizer, ids, 2, {}, tmp_path / "nul", pictures=False)
    assert load_dump(tmp_path / "nul")["tokens"] == ["a", "\x00", "b", "\x00", "\x00", "a"]  # numpy's str drops NULs
    # a dump written before the tokens travelled exactly still loads, its tokens as numpy kept them
    old = tmp_path / "old"
    old.mkdir()
    attn = np.tril(np.ones((1, 1, 3, 3), dtype=np.float16)) / np.arange(1, 4, dtype=np.float16)[:, None]
    write_npz(old / "attention.npz", attn, token_ids=np.arange(3, dtype=np.int32), tokens=np.array(["a", "b", "c"]),
              prompt_len=np.int32(3), meta=np.array("{}"), cut=np.int32(0))
    assert load_dump(old)["tokens"] == ["a", "b", "c"]


def test_a_length_study_of_learned_positions_alone_draws_no_longer_attention(tmp_path):
    """Learned positions run only at their training length, so a study of them alone has no 4x dumps: the
    picture of 1x beside 4x is left out (an empty figure failed to save, after every model had trained)."""
    from scripts.length_study import plot_dumps

    (tmp_path / "dumps" / "learned-1x").mkdir(parents=True)
    plot_dumps(tmp_path, ["learned"])
    assert not (tmp_path / "length_study_attention.png").exists()


def test_the_length_studys_attention_picture_shows_this_studys_encodings_only(tmp_path):
    """A study run again in the same --out with other encodings: the earlier one's dumps stay on disk, and must
    not come back as rows of this study's picture (one row of 1x and 4x per encoding)."""
    from PIL import Image

    from glimpse.attention import write_dump
    from scripts.length_study import plot_dumps

    for encoding in ("rope", "alibi"):
        for k in (1, 4):
            T = 4 * k
            attn = np.broadcast_to(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], (1, 1, T, T))
            write_dump(tmp_path / "dumps" / f"{encoding}-{k}x", attn.astype(np.float16), list(range(T)),
                       [str(i) for i in range(T)], T, {}, pictures=False)
    heights = {}
    for encodings in (["rope"], ["rope", "alibi"]):
        plot_dumps(tmp_path, encodings)
        heights[len(encodings)] = Image.open(tmp_path / "length_study_attention.png").size[1]
    assert heights[2] == pytest.approx(2 * heights[1], rel=0.02)  # 3.2 inches a row


def test_the_length_studys_tables_name_each_way_of_windowing_once(tmp_path, capsys):
    from scripts.length_study import write_tables

    rows = [{"multiple": m, "length": 64 * m, "mode": mode, "val_loss": 2.0 + m / 10, "pos_encoding": "rope",
             "seed": seed} for m in (1, 2) for mode in ("windows", "sliding") for seed in (1337, 1338)]
    write_tables(tmp_path, rows)
    text = (tmp_path / "length_study.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if "validation loss" in line]
    assert headings == ["sliding windows: validation loss (nats/char), mean over seeds [min, max]",
                        "non-overlapping windows: validation loss (nats/char), mean over seeds [min, max]"]
    assert "| rope | 2.100 [2.100, 2.100] | 2.200 [2.200, 2.200] |" in text and text in capsys.readouterr().out


def test_the_weights_of_a_model_in_training_mode_are_its_eval_modes_without_dropout():
    """attention_weights dumps the model's weights, not a random dropout mask's: a model training with dropout
    gives the weights it gives in eval mode, and is left training."""
    from glimpse.attention import attention_weights
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=8, dropout=0.5)).train()
    ids = torch.arange(8)
    got = attention_weights(model, ids)  # (L, H, T, T)
    assert model.training
    with torch.no_grad():
        _, want = model.eval().forward_with_attention(ids[None])  # (L, 1, H, T, T)
    np.testing.assert_array_equal(got, want[:, 0].half().numpy())


def test_a_failed_look_at_the_weights_leaves_the_model_in_its_mode():
    """attention_weights, the mechanism's trace and the induction probe put the model in eval mode for their
    forward: one that fails (too long a text, too long a probe) must still give training mode back."""
    from glimpse.attention import attention_weights
    from glimpse.mechanism import trace
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, dropout=0.1)).train()
    with pytest.raises(ValueError, match="cannot attend over 9 tokens"):
        attention_weights(model, torch.arange(9))
    assert model.training
    with pytest.raises(IndexError):
        trace(model, [1, 2, 99])  # 99 is past the 16-token vocabulary
    assert model.training
    assert attention_weights(model, torch.arange(8)).shape == (1, 2, 8, 8) and model.training
