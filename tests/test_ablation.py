"""Removing heads: exactly what zeroing a head's c_proj columns does, on every attention path; mean
ablation substitutes the mean it reports; eval.py and sample.py report, rank, generate and dump without
heads; and bad --ablate lists are one-line errors."""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import shutil
import sys
from contextlib import nullcontext

import pytest
import torch

import eval as eval_script
import sample as sample_script
from glimpse import ablation
from glimpse.ablation import (
    Ablation,
    HeadMeans,
    forward_from,
    head_means,
    losses_per_head,
    mean_loss,
    parse_heads,
    residual_streams,
    top_heads,
)
from glimpse.attention import load_dump
from glimpse.errors import GlimpseError
from glimpse.generation import generate
from glimpse.induction import induction_probe
from model import GPT, GPTConfig
from sample import SampleConfig, sample
from tests.conftest import Terminal, files_in, python, tiny_config
from tests.test_reliability import run_main

CONFIGS = [dict(), dict(pos_encoding="rope", bias=False, norm="rmsnorm", qk_norm=True)]


def small_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=3, n_head=4, n_embd=32, **overrides)).eval()


def without_columns(model: GPT, heads: list[tuple[int, int]]) -> GPT:
    """An independent way to remove heads: a copy whose c_proj ignores their context vectors."""
    other = copy.deepcopy(model)
    hs = model.config.n_embd // model.config.n_head
    with torch.no_grad():
        for layer, head in heads:
            other.transformer.h[layer].attn.c_proj.weight[:, head * hs:(head + 1) * hs] = 0.0
    return other


@pytest.mark.parametrize("overrides", CONFIGS)
def test_a_removed_head_equals_zeroing_its_c_proj_columns_on_every_path(overrides):
    model = small_model(**overrides)
    removed = [(0, 1), (2, 3)]
    reference = without_columns(model, removed)
    ablation = Ablation.of(removed, 3, 4)
    idx = torch.randint(30, (2, 16))
    torch.testing.assert_close(model(idx, heads=ablation)[0], reference(idx)[0], rtol=0, atol=1e-6)  # fused
    ours, theirs = model.forward_with_attention(idx, ablation), reference.forward_with_attention(idx)  # explicit
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)
    steps = list(generate(model, idx[:, :5], 30, temperature=0, heads=ablation))  # the KV cache, past a slide
    expected = list(generate(reference, idx[:, :5], 30, temperature=0))
    assert [s.token.tolist() for s in steps] == [s.token.tolist() for s in expected]
    for ours_step, theirs_step in zip(steps, expected):
        torch.testing.assert_close(ours_step.logits, theirs_step.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(model(idx)[0], reference(idx)[0])  # the removal changes something


def test_removing_no_head_is_the_intact_model_and_a_whole_layer_leaves_its_mlp():
    model = small_model(bias=False)
    idx = torch.randint(30, (2, 16))
    assert torch.equal(model(idx, heads=Ablation.of([], 3, 4))[0], model(idx)[0])
    block = model.transformer.h[1]
    x = torch.randn(2, 16, 32)
    out, _ = block(x, heads=Ablation.of([(1, h) for h in range(4)], 3, 4), layer=1)
    torch.testing.assert_close(out, x + block.mlp(block.ln_2(x)))  # no biases: attention adds exactly nothing


def test_mean_ablation_substitutes_the_mean_it_reports():
    model = small_model()
    idx = torch.randint(30, (3, 16))
    seen = []

    class Record:  # every layer's context vectors as the model computes them
        def edit(self, layer, y):
            seen.append((layer, y.clone()))
            return y

    model(idx, heads=Record())
    direct = torch.stack([torch.cat([y for at, y in seen if at == layer]).mean(dim=(0, 2)) for layer in range(3)])
    means = head_means(model, idx, 2, nullcontext())  # (L, H, hs), in two batches
    torch.testing.assert_close(means, direct, rtol=1e-5, atol=1e-6)
    ablation = Ablation.of([(1, 2)], 3, 4, means)
    replaced = []

    class AfterAblation:
        def edit(self, layer, y):
            y = ablation.edit(layer, y)
            replaced.append((layer, y))
            return y

    model(idx, heads=AfterAblation())
    y = dict(replaced)[1]  # (B, nh, T, hs)
    assert torch.equal(y[:, 2], means[1, 2].expand_as(y[:, 2]))  # the removed head says its mean everywhere
    assert not torch.equal(y[:, 0], means[1, 0].expand_as(y[:, 0]))  # the others speak for themselves
    collect = HeadMeans(3, 4, 8)
    assert torch.equal(model(idx, heads=collect)[0], model(idx)[0])  # collecting changes nothing


@pytest.mark.parametrize("max_rows", [64, 3])  # every copy in one forward; copies split up
def test_scoring_without_each_head_shows_its_progress_on_a_terminal(monkeypatch, max_rows):
    """Minutes of work at GPT-2's size: a bar counting the windows scored without a head, 5 x 3 x 4 of them."""
    model, x = small_model(), torch.randint(30, (5, 16))
    monkeypatch.setattr(ablation, "tqdm", functools.partial(ablation.tqdm, mininterval=0, miniters=1))  # each update
    monkeypatch.setattr(sys, "stderr", Terminal())
    losses_per_head(model, x, x, torch.ones(16, dtype=torch.bool), None, nullcontext(), max_rows=max_rows,
                    show_progress=True)
    shown = sys.stderr.getvalue()
    assert "scoring without each head" in shown and "60/60" in shown and "61/60" not in shown
    monkeypatch.setattr(sys, "stderr", Terminal())
    losses_per_head(model, x, x, torch.ones(16, dtype=torch.bool), None, nullcontext())  # off unless asked
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("overrides", [*CONFIGS, dict(pos_encoding="alibi"), dict(attn_score="additive"),
                                       dict(pos_encoding="sinusoidal"), dict(pos_encoding="none", smear=True)])
def test_going_on_from_a_layers_recorded_stream_is_the_whole_forward(overrides):
    """forward_from, which head removal scores through, runs the later blocks as the model does: with the
    model's own positions (RoPE's rotation, ALiBi's penalty, which at random weights move the loss too little to
    notice) and scores."""
    model = small_model(**overrides)
    idx = torch.randint(30, (2, 16))
    with torch.no_grad():
        logits, streams = residual_streams(model, idx)
        for layer, (x, y) in enumerate(streams):
            torch.testing.assert_close(forward_from(model, layer, x, y), logits, rtol=0, atol=1e-6)
        removed = without_columns(model, [(1, 2)])(idx)[0]
        torch.testing.assert_close(forward_from(model, 1, *streams[1], Ablation.of([(1, 2)], 3, 4)), removed,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(value_embeds=1, unet=True, smear=True)])
def test_each_head_removed_alone_in_batched_copies_equals_one_scoring_per_head(overrides):
    """With value_embeds or unet, later blocks read more than the stream entering them: whole forwards."""
    model = small_model(**overrides)
    x, y = torch.randint(30, (5, 16)), torch.randint(30, (5, 16))
    scored = torch.arange(16) >= 4  # the last 12 positions count
    for max_rows in (64, 7, 3):  # every copy in one forward; several windows a forward; copies split up
        intact, losses = losses_per_head(model, x, y, scored, None, nullcontext(), max_rows=max_rows)
        logits = model(x)[0]
        expected = torch.nn.functional.cross_entropy(logits[:, 4:].transpose(1, 2), y[:, 4:]).item()
        assert intact == pytest.approx(expected, rel=1e-5)
        for layer in range(3):
            for head in range(4):
                other = without_columns(model, [(layer, head)])(x)[0]
                one = torch.nn.functional.cross_entropy(other[:, 4:].transpose(1, 2), y[:, 4:]).item()
                assert losses[layer, head].item() == pytest.approx(one, rel=1e-5), (max_rows, layer, head)
    assert mean_loss(model, x, y, None, nullcontext(), 2) == pytest.approx(
        torch.nn.functional.cross_entropy(model(x)[0].transpose(1, 2), y).item(), rel=1e-5)


@pytest.mark.parametrize("overrides", [dict(value_embeds=1), dict(unet=True)])
def test_value_embeds_or_unet_alone_scores_each_head_with_whole_forwards(overrides):
    """Either switch alone makes later blocks read more than the stream entering them: each sends the removals
    through whole forwards, whose losses are those of zeroing each head's c_proj columns."""
    model = small_model(**overrides)
    x, y = torch.randint(30, (2, 16)), torch.randint(30, (2, 16))
    scored = torch.ones(16, dtype=torch.bool)
    _, losses = losses_per_head(model, x, y, scored, None, nullcontext())
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        other = without_columns(model, [(layer, head)])(x)[0]
        one = torch.nn.functional.cross_entropy(other.transpose(1, 2), y).item()
        assert losses[layer, head].item() == pytest.approx(one, rel=1e-5), (layer, head)


def test_scoring_without_each_head_holds_no_more_logits_at_once_than_its_limit(monkeypatch):
    """At GPT-2's vocabulary and length one row of logits is 206 MB: max_rows copies of the windows in one forward
    would not fit in memory. The rows a forward takes shrink so that its logits stay within LOGITS_BYTES, here one
    row's worth, and the losses are those of the roomier forwards."""
    model, x = small_model(), torch.randint(30, (3, 16))
    scored = torch.ones(16, dtype=torch.bool)
    roomy = losses_per_head(model, x, x, scored, None, nullcontext(), max_rows=64)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.size(0)))
    monkeypatch.setattr(ablation, "LOGITS_BYTES", 16 * 30 * 4)  # T x V float32 logits: one row
    tight = losses_per_head(model, x, x, scored, None, nullcontext(), max_rows=64)
    assert rows and max(rows) == 1
    assert tight[0] == pytest.approx(roomy[0], rel=1e-6)
    torch.testing.assert_close(tight[1], roomy[1], rtol=1e-5, atol=0)


def test_top_heads_lists_the_n_costliest_removals_largest_first():
    """eval.py prints the ten heads whose removal costs most: all ten of a model with more heads than that."""
    losses = torch.arange(12, dtype=torch.float32).view(3, 4)  # head 2.3 costs most, 0.0 least
    top = top_heads(losses, intact=1.0, n=10)
    assert [(r["layer"], r["head"]) for r in top] == [(2, 3), (2, 2), (2, 1), (2, 0), (1, 3), (1, 2), (1, 1),
                                                        (1, 0), (0, 3), (0, 2)]
    assert top[0]["loss"] == 11.0 and top[0]["loss_increase"] == 10.0
    assert len(top_heads(losses, intact=1.0, n=3)) == 3


def test_a_config_built_in_python_refuses_an_unknown_ablation():
    """The scripts' flags check --ablation against its choices; SampleConfig and EvalConfig built in Python (as
    tests and notebooks build them) go through check_removals, which refuses it before any model is loaded."""
    with pytest.raises(ValueError, match="ablation must be one of zero, mean, got 'random'"):
        SampleConfig(ablation="random")
    with pytest.raises(ValueError, match="ablation must be one of zero, mean, got 'random'"):
        eval_script.EvalConfig(ablation="random")


def test_the_probe_reports_the_second_copy_without_each_head():
    model = small_model()
    hs = 8
    with torch.no_grad():  # head 2.1 already says nothing: removing it cannot change the loss
        model.transformer.h[2].attn.c_proj.weight[:, 1 * hs:2 * hs] = 0.0
    probe = induction_probe(model, n_tokens=6, batch=3, ablation="zero")
    without = torch.tensor(probe["second_copy_loss_without"])
    assert without.shape == (3, 4)
    assert without[2, 1].item() == pytest.approx(probe["second_copy_loss"], rel=1e-5)
    assert (without - probe["second_copy_loss"]).abs().max() > 1e-4  # other heads do matter


def test_the_probe_scores_a_model_in_training_mode_without_dropout_and_leaves_it_training():
    """Dropout would make every loss of the removal pass random: two calls on a training-mode model gave
    different second-copy losses without each head. They match eval mode's, and the mode is restored."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16, dropout=0.3))
    model.train()
    first = induction_probe(model, n_tokens=6, batch=3, ablation="zero")
    second = induction_probe(model, n_tokens=6, batch=3, ablation="mean")
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert first == induction_probe(model, n_tokens=6, batch=3, ablation="zero")
    assert second == induction_probe(model, n_tokens=6, batch=3, ablation="mean")


def test_eval_py_reports_ranks_and_draws_the_heads(trained, tmp_path):
    cfg, _ = trained
    out = shutil.copytree(cfg.out_dir, tmp_path / "run")  # a copy: eval.py writes into the run
    run = python("eval.py", f"--out_dir={out}", "--ablate=1.0", "--max_tokens=2048")
    assert run.returncode == 0, run.stderr
    assert "intact model" in run.stdout and "without 1.0" in run.stdout
    ranked = python("eval.py", f"--out_dir={out}", "--head_importance", "--ablation=mean",
                    "--max_tokens=2048")
    assert ranked.returncode == 0, ranked.stderr
    with open(f"{out}/head_importance.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert float(r["loss_increase"]) == pytest.approx(float(r["loss"]) - float(rows[0]["loss"])
                                                          + float(rows[0]["loss_increase"]), abs=1e-9)
    top = max(rows, key=lambda r: float(r["loss_increase"]))
    assert f"{int(top['layer']):5d} {int(top['head']):4d}" in ranked.stdout.split("increase")[1].splitlines()[1]
    from PIL import Image

    with Image.open(f"{out}/head_importance.png") as image:
        assert image.width > 100 and image.height > 100


def test_eval_py_ablate_scores_the_model_without_the_heads_it_names(trained, tmp_path, capsys):
    """--ablate's loss is the model's without those heads: the loss --head_importance finds with that head removed
    alone, on the same windows; the printed change is that loss less the intact model's."""
    cfg, _ = trained
    out = shutil.copytree(cfg.out_dir, tmp_path / "run")  # a copy: --head_importance writes into the run
    settings = dict(out_dir=str(out), max_tokens=512, device="cpu", dtype="float32")
    ablated = eval_script.score_heads(eval_script.EvalConfig(**settings, ablate="1.0"))
    ranked = eval_script.score_heads(eval_script.EvalConfig(**settings, head_importance=True))
    assert ablated["heads"] == ["1.0"] and ablated["tokens_scored"] == ranked["tokens_scored"] >= 512
    assert ablated["intact_loss"] == pytest.approx(ranked["intact_loss"], rel=1e-5)
    assert ablated["ablated_loss"] == pytest.approx(ranked["losses"][1][0], rel=1e-5)
    assert abs(ablated["ablated_loss"] - ablated["intact_loss"]) > 1e-3  # the head does something
    eval_script.print_heads(ablated)
    change = ablated["ablated_loss"] - ablated["intact_loss"]
    assert f"  without 1.0  {ablated['ablated_loss']:.4f}  ({change:+.4f})" in capsys.readouterr().out.splitlines()


def test_eval_py_and_sample_py_show_their_long_scorings_on_a_terminal(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    run = shutil.copytree(cfg.out_dir, tmp_path / "run")  # eval.py writes its results there: not into the shared run
    monkeypatch.setattr(sys, "stderr", Terminal())
    eval_script.main([f"--out_dir={run}", "--head_importance", "--max_tokens=256"])
    assert sys.stderr.getvalue().count("scoring without each head") >= 1
    monkeypatch.setattr(sys, "stderr", Terminal())
    eval_script.main([f"--out_dir={run}", "--lengths=1", "--max_tokens=256"])
    assert "windows, 32 tokens" in sys.stderr.getvalue() and "sliding, 32 tokens" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    sample(SampleConfig(out_dir=str(run), num_samples=1, max_new_tokens=8, head_importance=True,
                        dump_dir=str(tmp_path / "ranked")), io.StringIO())
    assert sys.stderr.getvalue().count("scoring without each head") >= 1


@pytest.mark.parametrize("argv,says", [
    (["--ablate=9.0"], "the model has 2 layers"),
    (["--ablate=1.7"], "each layer has 2 heads"),
    (["--ablate=x"], "--ablate takes heads as layer.head"),
    (["--ablate=\u00b2.0"], "--ablate takes heads as layer.head"),  # a superscript 2 is a digit to str.isdigit
    (["--ablate=1.0,1.0"], "names head 1.0 more than once"),
    (["--ablation=random"], "ablation must be one of zero, mean"),
    (["--head_importance", "--ablate=1.0"], "drop --ablate, or drop --head_importance"),
])
def test_bad_ablations_are_one_line_errors_that_write_nothing(trained, capsys, argv, says):
    cfg, _ = trained
    before = files_in(cfg.out_dir)
    assert says in run_main(eval_script.main, [f"--out_dir={cfg.out_dir}", *argv], capsys)
    assert says in run_main(sample_script.main, [f"--out_dir={cfg.out_dir}", "--max_new_tokens=2", *argv], capsys)
    assert files_in(cfg.out_dir) == before


def test_ablate_counts_the_layers_and_heads_of_a_model_with_more_heads_than_layers(tmp_path, data_dir, capsys):
    """One layer of four heads: 0.3 is a head of it, 1.0 and 0.4 are not, in eval.py, sample.py and the notebook
    API alike (a model with as many layers as heads cannot tell the two counts apart)."""
    from glimpse.notebook import load
    from train import train

    cfg = tiny_config(data_dir, tmp_path / "wide", n_layer=1, n_head=4, n_embd=16, max_iters=2, eval_interval=2,
                      eval_iters=1, attn_log_interval=0)
    train(cfg)
    capsys.readouterr()
    eval_script.main([f"--out_dir={cfg.out_dir}", "--ablate=0.3", "--max_tokens=256"])
    assert "without 0.3" in capsys.readouterr().out
    sample(SampleConfig(out_dir=cfg.out_dir, ablate="0.3", num_samples=1, max_new_tokens=3,
                        dump_dir=str(tmp_path / "dumps")), io.StringIO())
    assert load(cfg.out_dir).loss("ROMEO: the night", ablate="0.3") > 0
    for ablate, says in (("1.0", "the model has 1 layers"), ("0.4", "each layer has 4 heads")):
        assert says in run_main(eval_script.main, [f"--out_dir={cfg.out_dir}", f"--ablate={ablate}"], capsys)
        assert says in run_main(sample_script.main, [f"--out_dir={cfg.out_dir}", "--max_new_tokens=2",
                                                     f"--ablate={ablate}"], capsys)
        with pytest.raises(GlimpseError, match=says):
            load(cfg.out_dir).loss("ROMEO: the night", ablate=ablate)


def test_sample_generates_and_dumps_without_heads_and_shows_their_cost(trained, tmp_path):
    cfg, _ = trained
    settings = dict(out_dir=cfg.out_dir, start="ROMEO:", num_samples=1, max_new_tokens=40, temperature=0)
    intact = sample(SampleConfig(**settings, dump_dir=str(tmp_path / "intact")), io.StringIO())[0]
    ablated = sample(SampleConfig(**settings, ablate="1.0,1.1", dump_dir=str(tmp_path / "ablated")),
                     io.StringIO())[0]
    assert ablated != intact  # the last layer's heads matter to this model
    meta = load_dump(tmp_path / "ablated" / "sample_0")["meta"]
    assert meta["ablated_heads"] == ["1.0", "1.1"] and meta["ablation"] == "zero"
    sample(SampleConfig(**settings, head_importance=True, dump_dir=str(tmp_path / "ranked")), io.StringIO())
    importance = json.loads((tmp_path / "ranked" / "sample_0" / "head_importance.json").read_text())
    assert len(importance["loss_increase"]) == 2 and len(importance["loss_increase"][0]) == 2
    for losses, increases in zip(importance["loss"], importance["loss_increase"], strict=True):
        assert increases == pytest.approx([loss - importance["intact_loss"] for loss in losses], abs=1e-6)  # float32
    assert max(max(row) for row in importance["loss_increase"]) > 0  # the last layer's heads matter, as above
    page = (tmp_path / "ranked" / "sample_0" / "index.html").read_text()
    assert '"loss_increase"' in page  # the viewer has the scores to draw on the thumbnails
    # a text of one token (the default prompt, nothing generated) predicts nothing: no importance, no error
    sample(SampleConfig(out_dir=cfg.out_dir, num_samples=1, max_new_tokens=0, head_importance=True,
                        dump_dir=str(tmp_path / "one")), io.StringIO())
    assert (tmp_path / "one" / "sample_0" / "attention.npz").is_file()
    assert not (tmp_path / "one" / "sample_0" / "head_importance.json").exists()


def test_a_mean_over_a_one_token_prompt_is_pointed_out(trained, tmp_path, capsys):
    """The default prompt is one newline: a removed head's "mean" output over it is its output at that one token."""
    cfg, _ = trained
    settings = dict(out_dir=cfg.out_dir, num_samples=1, max_new_tokens=2, ablate="1.0", ablation="mean",
                    dump_attention=False)
    sample(SampleConfig(**settings), io.StringIO())  # the default start
    assert "note: --ablation=mean puts in each removed head's mean output over the prompt, here one token" \
        in capsys.readouterr().err
    sample(SampleConfig(**settings, start="ROMEO:"), io.StringIO())
    sample(SampleConfig(**{**settings, "ablation": "zero"}), io.StringIO())
    assert "note:" not in capsys.readouterr().err


def test_parse_heads_keeps_the_order_given():
    assert parse_heads("2.3, 0.1") == [(2, 3), (0, 1)]


def test_parse_heads_takes_the_last_layer_and_head_and_refuses_the_first_past_them():
    """Heads count from 0: in a model of 2 layers of 3 heads, 1.2 is the last and 2.0 and 0.3 do not exist (passed
    through, they failed later as an IndexError traceback)."""
    assert parse_heads("1.2,0.0", n_layer=2, n_head=3) == [(1, 2), (0, 0)]
    with pytest.raises(GlimpseError, match=r"names layer 2, but the model has 2 layers \(0 to 1\)"):
        parse_heads("2.0", n_layer=2, n_head=3)
    with pytest.raises(GlimpseError, match=r"names head 0.3, but each layer has 3 heads \(0 to 2\)"):
        parse_heads("0.3", n_layer=2, n_head=3)


def test_head_importance_goes_to_wandb_as_a_table_and_an_image(tmp_path, data_dir):
    from tests.conftest import tiny_config
    from train import train

    out = tmp_path / "out"
    train(tiny_config(data_dir, out, max_iters=10, eval_interval=10, attn_log_interval=0))
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run = python("eval.py", f"--out_dir={out}", "--head_importance", "--max_tokens=256", "--wandb_log=true", env=env)
    assert run.returncode == 0, run.stderr
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run_dir / "files" / "media" / "table").rglob("*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["layer", "head", "loss", "loss_increase"] and len(logged["data"]) == 2 * 2
    with open(out / "head_importance.csv") as f:
        written = [float(v) for row in csv.DictReader(f) for v in row.values()]
    assert written == pytest.approx([v for row in logged["data"] for v in row])
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
