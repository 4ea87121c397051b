"""Training end to end: the loss goes down, the run's files, checkpoints, resume, and sampling."""

import functools
import io
import json
import math
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.dataset import TokenData
from data.prepare import PrepareConfig, prepare
from glimpse import evaluation
from glimpse.checkpoint import (
    best_path,
    checkpoint_path,
    load_checkpoint,
    load_trained,
    model_from_checkpoint,
    parameter_count,
    save_checkpoint,
)
from glimpse.config import config_values
from glimpse.errors import GlimpseError
from glimpse.evaluation import scored_windows
from glimpse.optim import configure_optimizer, get_lr
from glimpse.run_folder import check_resumable, check_resume, run_settings
from glimpse.runtime import gpu_peak_flops, peak_flops
from glimpse.tracking import Tracker, loss_figure, read_records
from model import GPTConfig
from sample import SampleConfig, sample
from tests.conftest import CLOCKED, Terminal, files_in, python, tiny_config, train_config
from train import TrainConfig, train
from train import main as train_main


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_the_run_files(trained):
    cfg, last = trained
    records = read_metrics(cfg.out_dir)
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 50, 100, 150]
    assert evals[0]["val_loss"] > math.log(30)  # starts near uniform over the ~30 characters
    assert last["val_loss"] < 0.6 * evals[0]["val_loss"]
    assert last["val_bits_per_token"] == pytest.approx(last["val_loss"] / math.log(2))
    steps = [r for r in records if "train_loss" in r]
    assert [r["iter"] for r in steps] == list(range(10, 151, 10))
    for r in steps:
        assert {"iter", "train_loss", "lr", "tokens_per_sec"} <= set(r) and r["tokens_per_sec"] > 0
    for r in evals:
        assert {"iter", "val_loss", "eval_train_loss", "lr", "tokens_per_sec"} <= set(r)
    # the last eval's two losses are the final weights' (ckpt.pt) on each split's fixed batches, each its own split's
    from contextlib import nullcontext

    from glimpse.distributed import Distributed

    model, *_ = load_trained(cfg.out_dir, "last", "cpu", "float32", "evaluating")
    losses = evaluation.estimate_loss(model, TokenData(Path(cfg.data_dir) / cfg.dataset), cfg, "cpu", nullcontext(),
                                      Distributed())
    assert (evals[-1]["eval_train_loss"], evals[-1]["val_loss"]) == pytest.approx((losses["train"], losses["val"]))
    # best.pt holds the weights and what reading them needs, ckpt.pt the training state besides (best.pt's
    # keys are all in it: the resumed run may start from either)
    best, last_state = load_checkpoint(best_path(cfg.out_dir)), load_checkpoint(checkpoint_path(cfg.out_dir))
    assert {"optimizer", "rng", "scaler"} <= set(last_state) - set(best) and set(best) < set(last_state)
    # each eval's attention snapshot reads the validation split's first tokens, as many as the model's window holds
    from glimpse.attention import load_dump

    data = TokenData(Path(cfg.data_dir) / cfg.dataset)
    first = data.tokens("val")[:cfg.model.block_size].tolist()  # attn_probe_tokens (64) is past block_size (32)
    snapshot = load_dump(Path(cfg.out_dir) / "attention" / "iter_150")
    assert snapshot["tokens"] == data.tokenizer().token_strings(first) and snapshot["attn"].shape[-1] == 32
    assert snapshot["meta"]["source"] == f"the first 32 tokens of {cfg.dataset}'s validation split"
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text()) == config_values(cfg)
    final = records[-1]  # the whole validation split, scored once at the end
    val_tokens = json.loads((Path(cfg.data_dir) / cfg.dataset / "meta.json").read_text())["val_tokens"]
    assert final["iter"] == 150 and final["final_val_tokens"] == val_tokens - 1  # every target of the split, once
    assert final["final_val_bits_per_token"] == pytest.approx(final["final_val_loss"] / math.log(2))
    assert abs(final["final_val_loss"] - evals[-1]["val_loss"]) < 0.1  # the estimate was close


def test_a_run_draws_its_losses_beside_metrics_jsonl(trained):
    """loss.png is redrawn at every eval and after the final score: at the end it is the picture of every record."""
    cfg, _ = trained
    out_dir = Path(cfg.out_dir)
    picture = (out_dir / "loss.png").read_bytes()
    drawn = io.BytesIO()
    loss_figure(read_records(out_dir / "metrics.jsonl"), out_dir.name).savefig(drawn, format="png")
    assert picture == drawn.getvalue()  # the final record included
    assert Image.open(io.BytesIO(picture)).size == (840, 480)


def test_the_loss_picture_draws_each_loss_at_its_steps():
    records = [{"iter": 0, "val_loss": 4.0, "eval_train_loss": 4.1}, {"iter": 1, "train_loss": 3.9, "lr": 1e-3},
               {"iter": 2, "train_loss": None}, {"iter": 2, "val_loss": 3.0, "eval_train_loss": 3.2},
               {"iter": 2, "final_val_loss": 3.05, "final_val_tokens": 100}, {"iter": 3, "hellaswag_acc": 0.3}]
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
              for line in loss_figure(records, "run").axes[0].lines}
    assert curves == {"train, mean of the steps since the last log": ([1], [3.9]),  # a loss logged as null: none
                      "train, the evals' batches": ([0, 2], [4.1, 3.2]),
                      "val, the evals' batches": ([0, 2], [4.0, 3.0]),
                      "val, the whole split: 3.0500": ([2], [3.05])}
    no_loss = loss_figure([{"iter": 0, "hellaswag_acc": 0.3}], "run").axes[0]
    assert not no_loss.lines and no_loss.get_legend() is None  # no empty legend box (nor matplotlib's warning)
    # a run evaluated again after its end (eval.py, a resume) has several final scores: the label says the last
    again = records + [{"iter": 5, "final_val_loss": 2.75}]
    labels = [line.get_label() for line in loss_figure(again, "run").axes[0].lines]
    assert labels[-1] == "val, the whole split: 2.7500"
    styles = {line.get_label(): (line.get_linestyle(), line.get_marker())
              for line in loss_figure(records, "run").axes[0].lines}
    assert styles["train, mean of the steps since the last log"][1] == "o"  # one point: a line would draw nothing
    records.append({"iter": 3, "train_loss": 2.9})
    line = loss_figure(records, "run").axes[0].lines[0]
    assert (line.get_linestyle(), line.get_marker()) == ("-", "None")  # a run of logs: a line, no markers


def test_a_resume_redraws_the_losses_it_keeps(tmp_path):
    """Resumed from step 10, the run drops what the old one logged after it: at once from the picture too."""
    records = [{"iter": 0, "val_loss": 4.0, "eval_train_loss": 4.1}, {"iter": 10, "train_loss": 3.0},
               {"iter": 10, "val_loss": 3.2, "eval_train_loss": 3.1}, {"iter": 20, "train_loss": 2.5},
               {"iter": 20, "val_loss": 2.9, "eval_train_loss": 2.8}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "loss.png").write_bytes(b"the old run's picture, to step 20")
    Tracker(metrics, keep_through_iter=10, draw_losses=True).close()
    drawn = io.BytesIO()
    loss_figure(records[:3], tmp_path.name).savefig(drawn, format="png")
    assert (tmp_path / "loss.png").read_bytes() == drawn.getvalue()


def test_the_loss_picture_of_a_run_in_the_working_folder_is_titled_by_its_folder(tmp_path, monkeypatch):
    """--out_dir=. gives metrics.jsonl a parent with no name: the title names the folder itself."""
    monkeypatch.chdir(tmp_path)
    record = {"iter": 0, "val_loss": 4.0, "eval_train_loss": 4.1}
    tracker = Tracker(Path("metrics.jsonl"), draw_losses=True)
    tracker.log(record)
    drawn = io.BytesIO()
    loss_figure([record], tmp_path.name).savefig(drawn, format="png")
    assert (tmp_path / "loss.png").read_bytes() == drawn.getvalue()


def test_a_loss_picture_that_cannot_be_written_is_a_warning_not_a_failed_run(tmp_path, data_dir):
    out = tmp_path / "out"
    (out / "loss.png").mkdir(parents=True)  # a folder where the picture goes
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
                 "--max_iters=20", "--eval_interval=10", "--eval_iters=2")
    assert run.returncode == 0, run.stderr
    assert re.search(r"^\d,\d{3} parameters \| cpu", run.stdout, re.M), run.stdout  # a few thousand, not 0.00M
    warnings = [line for line in run.stderr.splitlines() if "loss.png" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: could not draw"), run.stderr  # once, not per eval
    assert [r["iter"] for r in read_metrics(out) if "val_loss" in r] == [0, 10, 20]
    assert (out / "loss.png").is_dir() and not list(out.glob("loss.png.*"))  # no temporary file left behind


def test_the_final_score_shows_its_progress_on_a_terminal(tmp_path, data_dir, monkeypatch):
    """The whole split is scored after the last step, minutes on a big corpus: a bar counts its windows on a
    terminal, as the training bar counts the steps, and the score is the one the run logs."""
    monkeypatch.setattr(evaluation, "tqdm", functools.partial(evaluation.tqdm, mininterval=0, miniters=1))
    monkeypatch.setattr(sys, "stderr", Terminal())
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=2, eval_interval=2, eval_iters=1)
    final = train(cfg)
    val = TokenData(data_dir / "tiny").tokens("val")
    windows = len(scored_windows(len(val), 32, "windows", 32, len(val))[0])
    shown = sys.stderr.getvalue()
    assert "final val loss:" in shown and f" {windows}/{windows} " in shown, shown[-2000:]
    assert final["final_val_loss"] == read_metrics(cfg.out_dir)[-1]["final_val_loss"]


def test_mfu_only_against_a_known_peak(trained):
    cfg, _ = trained
    assert peak_flops(torch.device("cpu"), torch.float32) is None  # a CPU's peak is not known: no MFU at all
    assert not any("mfu" in r for r in read_metrics(cfg.out_dir))
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12  # the dense figure, not sparsity's
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 156e12  # TF32 tensor cores: float32 allows TF32
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float32) == 15.7e12  # no TF32 before Ampere: CUDA cores
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bfloat16 tensor cores
    for unknown in ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA A40"):
        assert gpu_peak_flops(unknown, torch.bfloat16) is None  # a slice, a variant, a GPU not in the table


def test_float16_mfu_is_against_the_float16_tensor_cores():
    """auto picks float16 on a V100 or T4: its MFU is against their float16 tensor cores, neither missing (as
    bfloat16's would be) nor against float32's far lower figure."""
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float16) == 125e12
    assert gpu_peak_flops("Tesla T4", torch.float16) == 65e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.float16) == 756e12


def test_each_way_cuda_names_a_gpu_of_the_peak_table_finds_its_row():
    """The names CUDA reports for the A100's two boards (PCIe 40GB and 80GB spell it apart), the H200, and the
    A10G, which must not read as the A10 its name begins with (NVIDIA's datasheets; AWS's figures for the A10G)."""
    for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"):
        assert gpu_peak_flops(name, torch.bfloat16) == 312e12, name
    assert gpu_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12  # dense: 1,979 is the 2:4 sparsity figure
    assert gpu_peak_flops("NVIDIA A10", torch.bfloat16) == 125e12
    assert gpu_peak_flops("NVIDIA A10G", torch.bfloat16) == 70e12


def test_a_parameter_count_is_in_millions_from_ten_thousand_and_exact_below():
    """The scripts print a count in millions (124.44M), which would read 0.00M for a model of a few thousand: below
    10,000 the count is exact, and from 10,000 on it is in millions."""
    assert [parameter_count(n) for n in (9_999, 10_000, 124_439_808)] == ["9,999", "0.01M", "124.44M"]


def test_checkpoint_loads_safely_and_round_trips(trained, tmp_path):
    cfg, last = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))  # torch.load(weights_only=True) inside
    assert state["iter_num"] == 150 and state["tokenizer"]["kind"] == "char"
    assert state["train_config"] == config_values(cfg)
    model = model_from_checkpoint(state).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    logits, _ = model(idx)
    save_checkpoint(tmp_path / "copy.pt", state)
    again = model_from_checkpoint(load_checkpoint(tmp_path / "copy.pt")).eval()
    assert torch.equal(again(idx)[0], logits)
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch's format before 1.6
    legacy = model_from_checkpoint(load_checkpoint(tmp_path / "legacy.pt", mmap=True)).eval()  # as sample.py maps it
    assert torch.equal(legacy(idx)[0], logits)


def test_a_checkpoint_in_torchs_format_from_before_zip_files_still_loads(trained, tmp_path):
    """torch.save wrote a plain pickle before PyTorch 1.6 (and does still with _use_new_zipfile_serialization=False),
    which cannot be memory-mapped: the scripts, which map the checkpoint they read, read such a file whole rather
    than call it corrupt."""
    cfg, _ = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    torch.save(state, tmp_path / "ckpt.pt", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "ckpt.pt", mmap=True)
    assert loaded["iter_num"] == state["iter_num"] and loaded["model"].keys() == state["model"].keys()
    assert all(torch.equal(loaded["model"][name], weight) for name, weight in state["model"].items())


def test_a_model_read_to_sample_or_score_is_in_eval_mode_whatever_dropout_it_trained_with(trained, tmp_path):
    """A checkpoint keeps the dropout its run trained with (0.2 in the presets): the model the scripts read must come
    back in eval mode, or every sample and score would drop units at random."""
    cfg, _ = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    state["model_config"]["dropout"] = 0.5
    save_checkpoint(tmp_path / "best.pt", state)
    model, _, _, _ = load_trained(tmp_path, "auto", "cpu", "float32", "sampling from")
    assert model.config.dropout == 0.5 and not any(m.training for m in model.modules())


def test_sampling_from_the_checkpoint_alone(trained, tmp_path):
    cfg, _ = trained
    out = io.StringIO()
    dumps = str(tmp_path / "dumps")  # not into the session's run, which other tests read
    samples = sample(SampleConfig(out_dir=cfg.out_dir, start="ROMEO:", num_samples=2, max_new_tokens=40,
                                  dump_dir=dumps), out)
    assert len(samples) == 2 and all(s.startswith("ROMEO:") and len(s) == 46 for s in samples)
    assert out.getvalue().count("---------------") == 2
    again = sample(SampleConfig(out_dir=cfg.out_dir, start="ROMEO:", num_samples=2, max_new_tokens=40,
                                dump_dir=dumps), io.StringIO())
    assert again == samples  # the same seed gives the same text
    other = sample(SampleConfig(out_dir=cfg.out_dir, start="ROMEO:", num_samples=2, max_new_tokens=40, seed=7,
                                dump_dir=dumps), io.StringIO())
    assert other != samples  # and --seed another
    assert samples[0] != samples[1]  # one random stream for all the samples, not the seed again for each one
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\n")
    greedy = sample(SampleConfig(out_dir=cfg.out_dir, start=f"FILE:{prompt}", num_samples=1, max_new_tokens=200,
                                 temperature=0, dump_dir=dumps), io.StringIO())
    assert greedy[0].startswith("JULIET:\n") and len(greedy[0]) == 208  # past block_size (32): window slides


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_resume_continues_exactly(tmp_path, data_dir, device):
    run = dict(eval_interval=20, dropout=0.1, device=device)  # on a GPU the checkpoint loads onto it, RNG state too
    train(tiny_config(data_dir, tmp_path / "straight", max_iters=60, **run))
    train(tiny_config(data_dir, tmp_path / "halves", max_iters=40, **run))
    train(tiny_config(data_dir, tmp_path / "halves", max_iters=60, init_from="resume", **run))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in CLOCKED} for r in rs]  # noqa: E731
    halves, straight = strip(read_metrics(tmp_path / "halves")), strip(read_metrics(tmp_path / "straight"))
    if device == "cpu":
        assert halves == straight
    else:  # CUDA adds some gradients (the embedding's) atomically, in no fixed order: equal up to rounding
        assert [r["iter"] for r in halves] == [r["iter"] for r in straight]
        for a, b in zip(halves, straight):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-7), (a, b)


def test_a_resume_given_only_its_folder_goes_on_with_the_runs_own_settings(tmp_path, data_dir, monkeypatch, capsys):
    """A resume needs neither the preset nor the flags the run was started with: the settings its checkpoint was
    saved with stand above the defaults and a preset. Settings far from the defaults (a preset's and flags' model,
    schedule, dropout) come back exactly, whatever a later start wrote into config.json; a flag given to the resume
    still wins, and one that contradicts the checkpoint is refused with nothing changed."""
    preset = tmp_path / "preset.toml"
    preset.write_text('dataset = "tiny"\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\ndropout = 0.1\n')
    flags = [str(preset), f"--data_dir={data_dir}", "--device=cpu", "--dtype=float32", "--batch_size=16",
             "--eval_interval=20", "--eval_iters=5", "--warmup_iters=10", "--lr_decay_iters=60", "--learning_rate=3e-3",
             "--min_lr=3e-4", "--attn_log_interval=0", "--seed=7"]
    train_main([*flags, f"--out_dir={tmp_path / 'straight'}", "--max_iters=60"])
    monkeypatch.chdir(tmp_path)
    train_main([*flags, "--out_dir=first", "--max_iters=40"])
    Path("first").rename("out")  # moved to where a resume with no --out_dir looks: the record's out_dir is not used
    record = tmp_path / "out" / "config.json"  # as a start that stopped before its first checkpoint rewrites it
    record.write_text(json.dumps({**json.loads(record.read_text()), "batch_size": 64, "learning_rate": 1.0}))
    other = tmp_path / "other.toml"  # a preset given to the resume sets only what the run's settings lack
    other.write_text('init_from = "resume"\nlearning_rate = 0.5\neval_iters = 1\ndropout = 0.1\n')  # 0.1 agrees
    capsys.readouterr()
    train_main([str(other), "--max_iters=60"])
    said = capsys.readouterr().out
    assert "resumed from out/ckpt.pt at step 40" in said
    assert "changed since the checkpoint: max_iters 40 -> 60\n" in said
    assert said.startswith("note: a resume takes the run's own settings over a preset's: learning_rate 0.003 (the "
                           "preset's 0.5), eval_iters 5 (the preset's 1) (a flag changes a training setting; the "
                           "model's shape and the optimizer's kind stay the checkpoint's)\n"), said
    strip = lambda rs: [{k: v for k, v in r.items() if k not in CLOCKED} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "out")) == strip(read_metrics(tmp_path / "straight"))
    recorded = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("out", "straight")}
    assert recorded["out"] == {**recorded["straight"], "out_dir": "out", "init_from": "resume"}
    train_main(["--init_from=resume"])  # at max_iters: nothing left to train, which it says
    assert "note: the run had ended there (max_iters=60), so no step is left to train: raise --max_iters (or " \
        "--max_time) to train on\n" in capsys.readouterr().out
    path = tmp_path / "out" / "ckpt.pt"  # as a version whose key this one no longer has saved it
    state = load_checkpoint(path)
    save_checkpoint(path, {**state, "train_config": {**state["train_config"], "retired_key": 1}})
    train_main(["--init_from=resume", "--max_iters=70", "--eval_interval=5"])  # a flag given wins over the record
    assert [r["iter"] for r in read_metrics(tmp_path / "out") if "val_loss" in r][-3:] == [60, 65, 70]
    files = files_in(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--init_from=resume", "--max_iters=80", "--n_layer=3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: n_layer=3 contradicts the checkpoint's n_layer=2; a resume takes the run's own settings, those its "
        "checkpoint was saved with (out_dir/config.json lists them): leave out the flag that changes this one, or "
        "start a new out_dir")
    assert files_in(tmp_path / "out") == files
    state = load_checkpoint(path)
    save_checkpoint(path, {**state, "train_config": {**state["train_config"], "n_layer": "two"}})
    with pytest.raises(SystemExit):
        train_main(["--init_from=resume", "--max_iters=80"])
    assert capsys.readouterr().err.strip().endswith("error: n_layer in out/ckpt.pt's settings must be integer, got "
                                                    "'two': give the setting as a flag")
    train_main(["--init_from=resume", "--max_iters=75", "--n_layer=2"])  # as the error says
    assert read_metrics(tmp_path / "out")[-1]["iter"] == 75
    with pytest.raises(SystemExit):  # the flag clashes with a setting the user did not type this time
        train_main(["--init_from=resume", "--max_iters=80", "--learning_rate=1e-4"])
    assert capsys.readouterr().err.strip().endswith(
        "error: min_lr (0.0003) is above learning_rate (0.0001), so the schedule would rise after warmup: set --min_lr "
        "at or below the learning rate (min_lr=0.0003 is the run's recorded setting; a flag replaces it)")
    train_main(["--init_from=resume", "--max_iters=80", "--learning_rate=1e-4", "--min_lr=1e-5"])
    assert read_metrics(tmp_path / "out")[-1]["iter"] == 80


def test_an_error_naming_what_a_resume_keeps_says_to_leave_out_the_flag_that_clashes(tmp_path, data_dir, capsys):
    """A resume keeps its checkpoint's optimizer and model shape whatever the flags say, so an error that names
    one of them as recorded says to leave out the flag that clashes with it, not that a flag replaces it."""
    out = tmp_path / "out"
    train_main([f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
                "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--max_iters=2",
                "--eval_interval=2", "--eval_iters=2", "--attn_log_interval=0", "--optimizer=muon"])
    files = files_in(out)
    capsys.readouterr()
    for flags, error in [
        (["--fsdp=true"], "error: fsdp=true supports optimizer=adamw only (Muon orthogonalises whole matrices, which "
         "fsdp splits across processes): use --optimizer=adamw, or --fsdp=false (optimizer=\"muon\" is the run's "
         "recorded setting, which the run keeps: leave out the flag that clashes with it)"),
        (["--pos_encoding=rope", "--n_embd=30"], "error: rope rotates channel pairs: n_embd // n_head (15) must be "
         "even (n_head=2 is the run's recorded setting, which the run keeps: leave out the flag that clashes with it)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4", *flags])
        said = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in said and said.endswith(error), said
    assert files_in(out) == files
    train_main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])  # the clashing flags left out
    assert read_metrics(out)[-1]["iter"] == 4


def test_a_resume_may_change_dropout_and_read_a_checkpoint_older_than_a_model_key(trained):
    """Dropout is a training setting, not part of the model's shape: a resume may change it. A checkpoint saved
    before a model key existed was built with that key's default, which a resume at the default matches."""
    cfg, _ = trained
    path = checkpoint_path(cfg.out_dir)
    state = load_checkpoint(path)
    model_config = cfg.model_config(state["model_config"]["vocab_size"])
    del state["model_config"]["smear"]  # as a checkpoint from before --smear holds it
    for config in (model_config, replace(model_config, dropout=0.3)):
        check_resume(state, config, "adamw", state["tokenizer"], Path(cfg.data_dir))
    with pytest.raises(GlimpseError, match="smear=True contradicts the checkpoint's smear=False"):
        check_resume(state, replace(model_config, smear=True), "adamw", state["tokenizer"], Path(cfg.data_dir))
    del state["train_config"]["optimizer"]  # as a checkpoint from before --optimizer holds it: AdamW's
    check_resume(state, model_config, "adamw", state["tokenizer"], Path(cfg.data_dir))
    with pytest.raises(GlimpseError, match="optimizer=muon contradicts the checkpoint's optimizer=adamw"):
        check_resume(state, model_config, "muon", state["tokenizer"], Path(cfg.data_dir))


def test_a_resume_on_its_own_dataset_prepared_again_says_so_however_the_data_dir_is_spelled(trained, monkeypatch):
    """The run's dataset, named by the checkpoint with a relative data_dir and by the resume with an absolute one,
    is the same folder: a tokenizer that changed there is a dataset prepared again, not a flag that differs."""
    cfg, _ = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    model_config = cfg.model_config(state["model_config"]["vocab_size"])
    monkeypatch.chdir(Path(cfg.data_dir).parent)
    relative = {**state, "train_config": {**state["train_config"], "data_dir": Path(cfg.data_dir).name}}
    other_tokenizer = {**state["tokenizer"], "kind": "gpt2"}
    with pytest.raises(GlimpseError, match="was prepared again since the checkpoint was written"):
        check_resume(relative, model_config, "adamw", other_tokenizer, Path(cfg.data_dir).resolve() / cfg.dataset)


def test_only_a_resume_takes_a_checkpoints_settings_and_only_a_training_state_resumes(trained):
    """A new run in a folder with a checkpoint takes none of its settings (check_start refuses the folder); a
    checkpoint lacking the optimizer's state, and only that, cannot be resumed, unless it is sharded (FSDP's)."""
    cfg, _ = trained
    assert run_settings({}, {"init_from": "scratch", "out_dir": cfg.out_dir}) == {}
    assert run_settings({}, {"init_from": "resume", "out_dir": cfg.out_dir})["max_iters"] == cfg.max_iters
    path = checkpoint_path(cfg.out_dir)
    state = load_checkpoint(path)
    check_resumable(state, path)
    del state["optimizer"]
    with pytest.raises(GlimpseError, match=r"holds weights without the training state a resume needs \(no optimizer\)"):
        check_resumable(state, path)
    check_resumable({**state, "sharded": {}}, path)


def test_a_resume_refuses_a_checkpoint_that_differs_in_any_model_key_but_dropout(trained):
    """Most keys leave the weights' shapes as they are (n_head, the score, the norm, positions without a table):
    a resume that let one through would go on training another model on these weights, without a word."""
    cfg, _ = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    model_config = cfg.model_config(state["model_config"]["vocab_size"])
    for f in fields(GPTConfig):
        other = {**state, "model_config": {**state["model_config"], f.name: "another"}}
        if f.name == "dropout":
            check_resume(other, model_config, "adamw", state["tokenizer"], Path(cfg.data_dir))
            continue
        with pytest.raises(GlimpseError, match=re.escape(f"{f.name}={getattr(model_config, f.name)} contradicts the "
                                                         f"checkpoint's {f.name}=another")):
            check_resume(other, model_config, "adamw", state["tokenizer"], Path(cfg.data_dir))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_compiled_by_inductor_on_cuda_trains_as_the_eager_run(tmp_path, data_dir):
    """float32 on CUDA turns TF32 on through torch's fp32_precision settings, after which torch's older getters
    raise; Inductor read them in torch 2.10 and earlier, so a compiled float32 run is checked on a GPU."""
    run = dict(device="cuda", dtype="float32", max_iters=20, eval_interval=10, attn_log_interval=0)
    eager = train(tiny_config(data_dir, tmp_path / "eager", **run))
    compiled = train(tiny_config(data_dir, tmp_path / "compiled", compile=True, **run))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)  # the peak, right after warmup
    assert get_lr(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert get_lr(110, cfg) == get_lr(5000, cfg) == pytest.approx(0.1)
    lrs = [get_lr(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_decay_that_ends_where_warmup_ends_holds_min_lr_from_there():
    """lr_decay_iters equal to warmup_iters leaves no cosine between them: both 0 (a flat rate), or both at max_iters
    (the settings allow it: the run never decays), whose last step's rate the loop still asks for. From there the
    rate is min_lr, not a cosine over zero steps, which divides by zero."""
    for steps in (0, 100):
        cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=steps, lr_decay_iters=steps, max_iters=100)
        assert get_lr(steps, cfg) == get_lr(steps + 5, cfg) == 0.1


def test_optimizer_decays_matrices_only_and_sees_each_parameter_once():
    from model import GPT

    cfg = train_config(n_layer=2, n_head=2, n_embd=16, block_size=8)
    model = GPT(cfg.model_config(vocab_size=20))
    groups = configure_optimizer(model, cfg, torch.device("cpu")).param_groups
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == cfg.weight_decay
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_gpt2_tokenizer_dataset_trains_and_samples(tmp_path, corpus_file, gpt2_ranks):
    prepare(PrepareConfig(dataset="tiny", input=str(corpus_file), tokenizer="gpt2", data_dir=str(tmp_path)))
    cfg = tiny_config(tmp_path, tmp_path / "out", max_iters=20, eval_interval=10)
    last = train(cfg)
    assert last["val_loss"] < math.log(50257)
    text = sample(SampleConfig(out_dir=cfg.out_dir, start="ROMEO:", num_samples=1, max_new_tokens=10), io.StringIO())
    assert text[0].startswith("ROMEO:") and len(text[0]) > len("ROMEO:")


def test_scripts_as_a_user_runs_them(tmp_path, data_dir):
    out = tmp_path / "out"
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
                 "--max_iters=20", "--eval_interval=10", "--eval_iters=2")
    assert run.returncode == 0, run.stderr
    assert "step 20: train loss" in run.stdout
    result = python("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=30")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ROMEO:") == 2 and result.stdout.count("---------------") == 2
    missing = python("sample.py", f"--out_dir={tmp_path / 'none'}")
    assert missing.returncode == 2 and missing.stderr.startswith("error: no best.pt or ckpt.pt in")
    resume_missing = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny",
                            f"--out_dir={tmp_path / 'none'}", "--init_from=resume")
    assert resume_missing.returncode == 2 and "no checkpoint at" in resume_missing.stderr
