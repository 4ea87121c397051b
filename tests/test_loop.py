"""The training loop's named steps, called one by one: what a checkpoint holds, which file each save
writes, the time budget, the number formats a GPU gets, and every shipped preset taking a step."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib
from data.training_data import prepare_data
from glimpse import runtime
from glimpse.checkpoint import best_path, checkpoint_path, load_checkpoint, save_checkpoint
from glimpse.compiling import training_shapes
from glimpse.config import config_values, parse_config
from glimpse.distributed import Distributed, process_group_options, run_device
from glimpse.errors import GlimpseError
from glimpse.evaluation import scored_windows
from glimpse.optim import get_lr, ramp
from glimpse.progress import StepLog, TimeBudget, throughput
from glimpse.run import setup
from glimpse.runtime import allow_tf32, autocast, resolve_dtype
from glimpse.tracking import Tracker, read_records
from sample import SampleConfig, sample
from tests.conftest import CLOCKED, REPO, tiny_config, train_config
from tests.test_train import read_metrics
from train import TrainConfig, evaluate_and_keep_best, loop, report_budget, save, train, train_step


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_save_never_writes_weights_that_are_no_longer_finite(tmp_path, data_dir):
    run = setup(tiny_config(data_dir, tmp_path / "out"), Distributed())
    train_step(run, 1e-3)
    save(run)
    save(run, best=True)
    before = {p: digest(p) for p in (checkpoint_path(run.cfg.out_dir), best_path(run.cfg.out_dir))}
    with torch.no_grad():
        run.model.lm_head.weight[0, 0] = float("nan")
    for best in (False, True):
        with pytest.raises(GlimpseError, match="no longer finite at step 1; .*ckpt.pt and .*best.pt kept as they were"
                                               r"\. Try a lower learning_rate$"):  # float32 already: no dtype advice
            save(run, best=best)
    assert {p: digest(p) for p in before} == before
    # nothing written yet: the message promises no checkpoint; a bfloat16 run is pointed at float32
    run = setup(tiny_config(data_dir, tmp_path / "fresh", dtype="bfloat16"), Distributed())
    with torch.no_grad():
        run.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(GlimpseError, match="no checkpoint had been written yet. Try a lower learning_rate, or "
                                           "dtype=float32"):
        save(run)
    assert not (tmp_path / "fresh" / "ckpt.pt").exists()


def stop_during_step(run, step: int, sig=signal.SIGTERM):
    """Send this process sig while run trains step `step` (its forward pass), as a user's kill would."""
    calls = []

    def hook(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == step + 1:
                os.kill(os.getpid(), sig)
    run.model.register_forward_pre_hook(hook)


def test_a_resume_runs_the_work_of_the_step_it_was_stopped_before(tmp_path, data_dir):
    """A signal during step 19 checkpoints at step 20 before step 20's eval, best.pt and snapshot: the resumed
    run must do them, and do each only once."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=40, eval_interval=20, lr_decay_iters=40, final_eval=False)
    run = setup(cfg, Distributed())
    stop_during_step(run, 19)
    with pytest.raises(SystemExit) as stopped:
        loop(run)
    run.tracker.close()
    assert stopped.value.code == 143 and load_checkpoint(checkpoint_path(cfg.out_dir))["iter_num"] == 20
    assert not best_path(cfg.out_dir).exists()  # step 20's eval had not run
    out = io.StringIO()
    with redirect_stdout(out):
        train(replace(cfg, init_from="resume"))
    assert f"resumed from {checkpoint_path(cfg.out_dir)} at step 20" in out.getvalue()
    evals = [r for r in read_metrics(cfg.out_dir) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    # step 20's eval reports the rate and speed of step 19 (the last step taken), as it would have unstopped
    assert evals[1]["lr"] == pytest.approx(get_lr(19, cfg)) and evals[1]["tokens_per_sec"] > 0
    snapshots = sorted(int(p.name.removeprefix("iter_")) for p in (Path(cfg.out_dir) / "attention").glob("iter_*"))
    assert snapshots == [0, 20, 40]
    best = load_checkpoint(best_path(cfg.out_dir))["iter_num"]
    assert best in (20, 40)
    # a checkpoint written by the eval itself is taken after its step's work: resuming it redoes none of it
    with redirect_stdout(io.StringIO()) as again:
        train(replace(cfg, init_from="resume", max_iters=50, lr_decay_iters=50))
    evals = [r["iter"] for r in read_metrics(cfg.out_dir) if "val_loss" in r]
    assert evals == [0, 20, 40, 50]
    said = again.getvalue()
    assert "step 50: train loss" in said and "step 40: train loss" not in said  # step 40's eval not run again


def test_a_resume_after_its_steps_work_was_cut_short_logs_that_work_once(tmp_path, data_dir, monkeypatch):
    """A checkpoint at step 20 taken before its work (a signal, checkpoint_interval_s), then a run that did the
    eval and died before its next checkpoint: the resume does step 20's eval again, and its record replaces the
    first one's instead of standing beside it; in wandb, whose resumed run takes only steps after its last (20),
    it goes on in a new run."""
    import train as train_script
    from tests.test_hellaswag import own_text_examples, write_examples

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    examples = write_examples(tmp_path / "val.jsonl", own_text_examples(2))
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=40, eval_interval=20, lr_decay_iters=40, final_eval=False,
                      hellaswag_interval=20, hellaswag_file=str(examples), wandb_log=True)
    run = setup(cfg, Distributed())
    stop_during_step(run, 19)
    with pytest.raises(SystemExit), redirect_stdout(io.StringIO()):
        loop(run)
    run.tracker.close()
    resumed = setup(replace(cfg, init_from="resume"), Distributed())

    def died(run):  # the process dies after step 20's eval, before its snapshot
        raise RuntimeError("killed")

    with monkeypatch.context() as patched, pytest.raises(RuntimeError, match="killed"), \
            redirect_stdout(io.StringIO()):
        patched.setattr(train_script, "snapshot_attention", died)
        loop(resumed)
    resumed.tracker.close()
    for key in ("val_loss", "hellaswag_acc"):  # logged before it died
        assert [r["iter"] for r in read_metrics(cfg.out_dir) if key in r] == [0, 20]
    assert load_checkpoint(checkpoint_path(cfg.out_dir))["iter_num"] == 20
    with redirect_stdout(io.StringIO()) as said:
        train(replace(cfg, init_from="resume"))
    assert "logged up to step 20, the checkpoint's, which this run logs again" in said.getvalue()
    records = read_metrics(cfg.out_dir)
    for key in ("val_loss", "hellaswag_acc"):
        assert [r["iter"] for r in records if key in r] == [0, 20, 40], key
    assert [r["iter"] for r in records if "train_loss" in r] == list(range(10, 41, 10))  # the steps' logs kept once


def test_a_resume_at_a_step_with_no_work_due_keeps_its_records_and_wandb_run(tmp_path, data_dir, monkeypatch):
    """A signal's checkpoint at step 10, where no eval is due (every 20): the resume has no work of that step to do
    again, so it logs nothing there: it goes on in the same wandb run, and a HellaSwag score eval.py appended at
    step 10 (--checkpoint=last) stays."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=20, eval_interval=20, lr_decay_iters=20, final_eval=False,
                      attn_log_interval=0, wandb_log=True)
    run = setup(cfg, Distributed())
    stop_during_step(run, 9)
    with pytest.raises(SystemExit), redirect_stdout(io.StringIO()):
        loop(run)
    run.tracker.close()
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    assert state["iter_num"] == 10 and not state["work_done"]
    score = {"iter": 10, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.5, "hellaswag_examples": 4}
    Tracker(Path(cfg.out_dir) / "metrics.jsonl", append=True).log(score)  # as eval.py appends it
    with redirect_stdout(io.StringIO()) as said:
        train(replace(cfg, init_from="resume"))
    assert "wandb: run" not in said.getvalue()
    assert load_checkpoint(checkpoint_path(cfg.out_dir))["wandb_run_id"] == state["wandb_run_id"]
    assert score in read_metrics(cfg.out_dir)


def test_a_run_stopped_between_log_steps_logs_what_the_straight_run_logs(tmp_path, data_dir):
    """A signal at step 15 checkpoints half way through a log interval: the record at step 20 must still average
    steps 11 to 20, as the straight run's does, not only the five steps taken after the resume."""

    def records(out):
        return [{k: v for k, v in r.items() if k not in CLOCKED} for r in read_metrics(out)]

    run = dict(max_iters=30, log_interval=10, eval_interval=30, attn_log_interval=0, final_eval=False, dropout=0.1)
    train(tiny_config(data_dir, tmp_path / "straight", **run))
    stopped = setup(tiny_config(data_dir, tmp_path / "stopped", **run), Distributed())
    stop_during_step(stopped, 14)
    with pytest.raises(SystemExit):
        loop(stopped)
    stopped.tracker.close()
    assert load_checkpoint(checkpoint_path(tmp_path / "stopped"))["iter_num"] == 15
    train(tiny_config(data_dir, tmp_path / "stopped", init_from="resume", **run))
    assert [r["iter"] for r in records(tmp_path / "stopped")] == [0, 10, 20, 30, 30]
    assert records(tmp_path / "stopped") == records(tmp_path / "straight")


def test_a_resume_drops_the_snapshots_taken_after_its_checkpoint(tmp_path, data_dir):
    """A run killed between checkpoints leaves snapshots of steps it retraces; a resumed run that takes them
    elsewhere (another schedule, a time budget) must not leave the old ones in the slider beside its own."""
    import shutil

    from tests.test_viewer_mechanism import embedded_data_of

    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=10, eval_interval=10, final_eval=False,
                      attn_probe_tokens=8)
    train(cfg)
    shutil.copy(checkpoint_path(cfg.out_dir), tmp_path / "step10.pt")
    train(replace(cfg, init_from="resume", max_iters=20))
    attention = Path(cfg.out_dir) / "attention"
    assert sorted(p.name for p in attention.glob("iter_*")) == ["iter_0", "iter_10", "iter_20"]
    shutil.copy(tmp_path / "step10.pt", checkpoint_path(cfg.out_dir))  # as if killed after step 20, unsaved
    out = io.StringIO()
    with redirect_stdout(out):
        train(replace(cfg, init_from="resume", max_iters=18, lr_decay_iters=18, attn_log_interval=15))
    assert "dropped the attention snapshots of steps 20, taken after the checkpoint" in out.getvalue()
    # tiny_config logs every 10 steps: 20's train log and eval went from metrics.jsonl, and the run says so
    assert "dropped metrics.jsonl's records of step 20, logged after the checkpoint" in out.getvalue()
    assert embedded_data_of(attention / "index.html", "glimpse-snapshots")["steps"] == [0, 10, 15, 18]
    assert sorted(p.name for p in attention.glob("iter_*")) == ["iter_0", "iter_10", "iter_15", "iter_18"]


def test_a_resume_at_the_last_step_does_what_the_run_left_undone_there(tmp_path, data_dir):
    """A run stopped in its final eval (here: made without one) resumes at max_iters to do it, not refused as a
    resume with nothing to train."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=4, eval_interval=2, attn_log_interval=0, final_eval=False)
    train(cfg)
    out = io.StringIO()
    with redirect_stdout(out):
        last = train(replace(cfg, init_from="resume", final_eval=True))
    assert "0 steps in" in out.getvalue() and "final_val_loss" in last and last["iter"] == 4


def test_a_finished_run_launched_again_keeps_its_final_eval_unless_its_data_changed(tmp_path, data_dir, capsys):
    """A job launched again after its run ended (a scheduler's retry, a script that always resumes) has no step
    to take: the final eval the run logged at its last step stands, neither scored again nor logged twice. It is
    scored again where that record cannot stand: none logged (a run stopped in it), a NaN, or the dataset
    prepared again or moved since the checkpoint."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=4, eval_interval=2, attn_log_interval=0)
    first = train(cfg)["final_val_loss"]
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    records = read_records(metrics)
    assert records[-1]["iter"] == 4 and records[-1]["final_val_loss"] == first
    # the final record marked so that a new score would show: the same weights would score it alike
    metrics.write_text("".join(json.dumps({**r, "final_val_loss": 9.5} if "final_val_loss" in r else r) + "\n"
                               for r in records))
    kept = metrics.read_text()
    capsys.readouterr()
    last = train(replace(cfg, init_from="resume"))
    said = capsys.readouterr().out
    assert last["final_val_loss"] == 9.5 and metrics.read_text() == kept
    assert "final val loss 9.5000 on the whole validation split, as the run logged it at step 4 (metrics.jsonl): " \
        "the same weights and data, not scored again" in said and "0 steps in" in said
    state = load_checkpoint(checkpoint_path(cfg.out_dir))  # as if its dataset had been prepared again since
    prepared = {**state["dataset_prepared"], "val_tokens": state["dataset_prepared"]["val_tokens"] + 1}
    save_checkpoint(checkpoint_path(cfg.out_dir), {**state, "dataset_prepared": prepared})
    rescored = train(replace(cfg, init_from="resume"))["final_val_loss"]
    assert rescored == pytest.approx(first) and [r["final_val_loss"] for r in read_records(metrics)
                                                 if "final_val_loss" in r] == [rescored]  # one record, the new one
    save_checkpoint(checkpoint_path(cfg.out_dir), state)  # its own dataset again, but moved to another folder
    shutil.copytree(Path(data_dir) / "tiny", tmp_path / "moved" / "tiny")
    metrics.write_text(kept)
    assert train(replace(cfg, init_from="resume", data_dir=str(tmp_path / "moved")))["final_val_loss"] == \
        pytest.approx(first)
    records = read_records(metrics)
    for logged in ([{**r, "final_val_loss": None} if "final_val_loss" in r else r for r in records],  # a NaN (null)
                   [r for r in records if "final_val_loss" not in r]):  # a run stopped in its final eval
        metrics.write_text("".join(json.dumps(r) + "\n" for r in logged))
        assert train(replace(cfg, init_from="resume"))["final_val_loss"] == pytest.approx(first)


def test_a_resume_that_changes_the_evals_batches_says_so(tmp_path, data_dir):
    """The evals score batches drawn from eval_iters, batch_size and seed: a resume that changes one compares its
    evals with a best loss scored on other batches, which the user should know."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=10, eval_interval=10, attn_log_interval=0,
                      final_eval=False)
    train(cfg)
    said = {}
    other = tmp_path / "other"  # the same corpus in another folder: the same tokenizer, so a resume may take it
    shutil.copytree(Path(data_dir) / "tiny", other / "tiny")
    changes = (("same", {"data_dir": os.path.relpath(data_dir)}),  # the same folder, named another way
               ("fewer", {"eval_iters": 2}), ("seed", {"seed": 7}), ("data", {"data_dir": str(other)}))
    for name, change in changes:  # each from the run as it stopped
        shutil.copytree(cfg.out_dir, tmp_path / name)
        out = io.StringIO()
        with redirect_stdout(out):
            train(replace(cfg, out_dir=str(tmp_path / name), init_from="resume", max_iters=cfg.max_iters + 1,
                          **change))
        said[name] = out.getvalue()
    assert "resumed from" in said["same"] and "note:" not in said["same"]
    assert "changed since the checkpoint: max_iters 10 -> 11\n" in said["same"]  # the folder named another way is not
    assert f"changed since the checkpoint: max_iters 10 -> 11, eval_iters {cfg.eval_iters} -> 2\n" in said["fewer"]
    assert "note: with eval_iters changed, the evals now score other batches" in said["fewer"]
    assert "note: with seed changed, the evals now score other batches" in said["seed"]
    assert f"note: dataset {Path(data_dir) / 'tiny'} -> {other / 'tiny'} since the checkpoint: the run goes on " \
        "training on another corpus, and best.pt is replaced only by a loss on its validation split" in said["data"]


def test_a_resume_on_its_dataset_prepared_again_says_so(tmp_path, corpus_file):
    """The run's own dataset folder, prepared again with the same tokenizer (another split of the text): the resume
    is allowed, as on another folder, but no longer takes the batches the run would have, which it says."""
    from data.prepare import PrepareConfig, prepare

    with redirect_stderr(io.StringIO()):
        prepare(PrepareConfig(dataset="tiny", input=str(corpus_file), data_dir=str(tmp_path / "data")))
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", max_iters=10, eval_interval=10, attn_log_interval=0,
                      final_eval=False)
    train(cfg)
    before = load_checkpoint(checkpoint_path(cfg.out_dir))["dataset_prepared"]
    # prepared anew as it was (its input named another way), then with a larger val split
    for name, fraction in (("same", 0.0), ("again", 0.2)):
        source = os.path.relpath(corpus_file) if name == "same" else str(corpus_file)
        with redirect_stderr(io.StringIO()):
            prepare(PrepareConfig(dataset="tiny", input=source, data_dir=str(tmp_path / "data"),
                                  **({"val_fraction": fraction} if fraction else {})))
        shutil.copytree(cfg.out_dir, tmp_path / name)
        with redirect_stdout(io.StringIO()) as said:
            train(replace(cfg, out_dir=str(tmp_path / name), init_from="resume", max_iters=11))
        if not fraction:
            assert "note:" not in said.getvalue()
    now = load_checkpoint(checkpoint_path(tmp_path / "again"))["dataset_prepared"]
    assert now["val_tokens"] > before["val_tokens"] and now["documents"] == before["documents"] == 1
    assert (f"note: dataset {tmp_path / 'data' / 'tiny'} was prepared again since the checkpoint "
            f"({before['train_tokens']:,} train and {before['val_tokens']:,} val tokens then, {now['train_tokens']:,} "
            f"train and {now['val_tokens']:,} val tokens now): the run goes on training on other batches, and best.pt "
            "is replaced only by a loss on its validation split below the best so far on the other's"
            ) in said.getvalue()
    # eval.py on the first run, whose checkpoint knew the dataset as it was: it scores the split as it is, and says so
    import eval as eval_script

    with redirect_stderr(io.StringIO()) as told, redirect_stdout(io.StringIO()):
        eval_script.main([f"--out_dir={cfg.out_dir}", "--max_tokens=64", "--lengths=1"])
    assert (f"note: dataset {tmp_path / 'data' / 'tiny'}, where the run trained, was prepared again since the "
            f"checkpoint ({before['train_tokens']:,} train and {before['val_tokens']:,} val tokens then, "
            f"{now['train_tokens']:,} train and {now['val_tokens']:,} val tokens now): its validation split is scored "
            "as it is now, not as the run's evals saw it") in told.getvalue()
    with redirect_stderr(io.StringIO()) as told, redirect_stdout(io.StringIO()):  # the one it knew: nothing to say
        eval_script.main([f"--out_dir={tmp_path / 'again'}", "--max_tokens=64", "--lengths=1"])
    assert "note:" not in told.getvalue()


def test_the_speed_leaves_out_the_pauses_and_counts_the_flops_of_each_steps_length(tmp_path, data_dir):
    """tokens/s over steps only, however an eval falls between log steps; MFU from each step's own length."""
    now = [0.0]
    log = StepLog(torch.device("cpu"), clock=lambda: now[0])
    run = setup(tiny_config(data_dir, tmp_path / "out", seq_warmup_iters=8), Distributed())
    run.tracker.close()
    run.peak = 1e9
    log.loss_sum += 1.0
    log.steps = 2
    log.count(run, 0)  # 16 sequences of 8 tokens: a quarter of block_size
    now[0] += 1.0
    with log.paused():  # an eval between two log steps
        now[0] += 10.0
    log.count(run, 20)  # past the warm-up: 16 x 32
    now[0] += 1.0
    log.write(run, 1e-3, None)
    assert run.tokens_per_sec == pytest.approx((16 * 8 + 16 * 32) / 2.0)  # the 10 s eval left out
    flops = 16 * 8 * run.model.flops_per_token(8) + 16 * 32 * run.model.flops_per_token(32)
    assert throughput(run)["mfu"] == pytest.approx(flops / 2.0 / 1e9)
    record = read_metrics(tmp_path / "out")[-1]
    assert record["mfu"] == pytest.approx(flops / 2.0 / 1e9) and record["tokens_per_sec"] == run.tokens_per_sec
    assert record["train_seconds"] == pytest.approx(2.0)  # the steps' seconds so far, what a speedrun is timed by
    with log.paused():  # a pause after a log step is left out of the loop's step time too
        now[0] += 5.0
        assert log.steps_seconds() == pytest.approx(2.0)  # a checkpoint written in a pause: that pause left out
    now[0] += 0.5
    assert log.steps_seconds() == pytest.approx(2.5)  # 1 + 1 + 0.5 s of steps; 15 s of pauses left out
    resumed = StepLog(torch.device("cpu"), clock=lambda: now[0], seconds_before=100.0)  # a checkpoint's 100 s
    now[0] += 3.0
    resumed.steps, resumed.tokens = 1, 1
    assert resumed.write(run, 1e-3, None) and read_metrics(tmp_path / "out")[-1]["train_seconds"] == 103.0


def test_each_log_step_measures_its_own_steps_and_every_micro_step_of_them(tmp_path, data_dir):
    """tokens/s after a log step is that interval's alone (an earlier pause or earlier seconds would inflate or
    deflate every later record), and a step's tokens are all its micro-steps'."""
    now = [0.0]
    log = StepLog(torch.device("cpu"), clock=lambda: now[0])
    run = setup(tiny_config(data_dir, tmp_path / "out", gradient_accumulation_steps=2), Distributed())
    run.tracker.close()
    step_tokens = 2 * 16 * 32  # 2 micro-steps of 16 sequences of 32 tokens
    log.loss_sum += 1.0
    log.steps = 1
    log.count(run, 0)
    now[0] += 1.0
    with log.paused():  # an eval in the first interval
        now[0] += 10.0
    log.write(run, 1e-3, None)
    assert run.tokens_per_sec == pytest.approx(step_tokens / 1.0)
    log.loss_sum += 2.0
    log.steps = 2
    log.count(run, 1)
    log.count(run, 2)
    now[0] += 4.0
    log.write(run, 1e-3, None)
    assert run.tokens_per_sec == pytest.approx(2 * step_tokens / 4.0)  # 2 steps in the 4 s since the log step
    assert [r["train_loss"] for r in read_metrics(tmp_path / "out")[-2:]] == [1.0, 1.0]


def test_a_new_run_says_the_tokens_of_every_micro_step_and_reports_its_first_steps_rate(tmp_path, data_dir, capsys):
    """A step is gradient_accumulation_steps micro-steps of batch_size sequences: the line a run starts with counts
    the tokens of them all (2 x 16 x 32), as tokens/s does; and step 0's eval, before any step, reports the rate the
    first step will take, not none."""
    run = setup(tiny_config(data_dir, tmp_path / "out", gradient_accumulation_steps=2), Distributed())
    run.tracker.close()
    assert "| 1 process(es) | 1,024 tokens per step\n" in capsys.readouterr().out
    assert run.step_lr == get_lr(0, run.cfg) > 0


def test_a_checkpoint_from_before_the_loops_counters_resumes_with_what_they_stood_for(trained, tmp_path):
    """Checkpoints written before steps_seconds, step_lr and work_done were kept: the loop's clock was then the
    budget's (train_seconds), the rate an eval reported the next step's, and a checkpoint was only ever taken after
    its step's work, which the resumed run must not do again."""
    cfg, _ = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    for key in ("steps_seconds", "step_lr", "work_done"):
        del state[key]
    run = setup(replace(cfg, out_dir=str(tmp_path / "out")), Distributed())
    run.tracker.close()
    run.load_state_dict(state)
    assert run.steps_seconds == state["train_seconds"] > 0
    assert run.step_lr == get_lr(state["iter_num"], run.cfg) > 0
    assert run.work_done_at == run.iter_num == state["iter_num"]


def test_a_resume_in_another_process_count_gives_each_process_its_own_dropout_masks(trained, tmp_path):
    """A checkpoint of one process resumed by two cannot hand each its saved streams: each reseeds from the seed,
    the step and its rank, so that the two processes do not drop the same units."""
    cfg, _ = trained
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    run = setup(replace(cfg, out_dir=str(tmp_path / "out")), Distributed())
    run.tracker.close()
    draws, said = [], io.StringIO()
    for rank in (0, 1):
        run.ddp = Distributed(rank=rank, world_size=2)  # its collectives are not called on the way
        with redirect_stdout(said):
            run.load_state_dict(state)
        draws.append(torch.rand(16))
    assert said.getvalue().count("resuming 1 process(es)' run in 2: dropout masks are reseeded") == 1  # rank 0's
    assert not torch.equal(*draws)


def test_a_worse_eval_later_in_the_run_leaves_best_pt_alone(tmp_path, data_dir):
    """best.pt keeps the lowest val loss of the run, never the untrained weights of step 0, and a later eval that
    is worse (weights wiped here) replaces neither it nor the best loss a resume compares against."""
    run = setup(tiny_config(data_dir, tmp_path / "out", attn_log_interval=0), Distributed())
    run.tracker.close()
    evaluate_and_keep_best(run)
    assert not best_path(run.cfg.out_dir).exists() and run.best_val_loss == math.inf
    for _ in range(20):
        train_step(run, 3e-3)
    evaluate_and_keep_best(run)
    trained = run.last_eval["val_loss"]
    assert load_checkpoint(best_path(run.cfg.out_dir))["iter_num"] == 20 and run.best_val_loss == trained
    with torch.no_grad():
        for p in run.model.parameters():
            p.zero_()  # uniform predictions: the loss of knowing nothing
    train_step(run, 0.0)  # step 21, the weights left as they are
    evaluate_and_keep_best(run)
    assert run.last_eval["iter"] == 21 and run.last_eval["val_loss"] > trained
    best = load_checkpoint(best_path(run.cfg.out_dir))
    assert best["iter_num"] == 20 and best["val_loss"] == trained and run.best_val_loss == trained


def test_micro_steps_add_up_to_the_step_one_batch_of_their_sequences_takes(tmp_path, data_dir):
    """Two micro-steps of 8 sequences draw the 16 one batch of 16 draws, and their losses are averaged as its are:
    the same losses, and the same weights after the steps."""
    taken = {}
    for name, batch_size, micro_steps in (("one", 16, 1), ("two", 8, 2)):
        run = setup(tiny_config(data_dir, tmp_path / name, batch_size=batch_size,
                                gradient_accumulation_steps=micro_steps), Distributed())
        run.tracker.close()
        taken[name] = [train_step(run, 3e-3).item() for _ in range(3)], run.model.state_dict()
    assert taken["two"][0] == pytest.approx(taken["one"][0], rel=1e-5)
    for key, weight in taken["one"][1].items():
        torch.testing.assert_close(taken["two"][1][key], weight, rtol=1e-4, atol=1e-5)


def test_the_first_steps_train_on_other_windows_than_the_evals_fixed_batches(tmp_path, data_dir, monkeypatch):
    """The evals' batches come from a generator of their own: had the training batches started from the same
    seed, the first steps would train on the very windows the train loss is then estimated on."""
    from data.dataset import TokenData

    drawn = []
    draw = TokenData.random_starts

    def recording(self, split, n, block_size, generator):
        starts = draw(self, split, n, block_size, generator)
        drawn.append((split, set(starts.tolist())))
        return starts

    monkeypatch.setattr(TokenData, "random_starts", recording)
    run = setup(tiny_config(data_dir, tmp_path / "out", eval_iters=4, batch_size=8), Distributed())
    run.tracker.close()
    evaluate_and_keep_best(run)  # step 0's eval, before any step: train's 4 batches, then val's
    for _ in range(4):
        train_step(run, 3e-3)
    assert [split for split, _ in drawn] == ["train", "val"] + ["train"] * 4
    assert all(len(starts) > 6 for _, starts in drawn)  # windows drawn from the whole split, not a few
    evals = drawn[0][1]
    assert all(not starts & evals for _, starts in drawn[2:]), [starts & evals for _, starts in drawn[2:]]


@pytest.mark.parametrize("grad_clip, dtype", [(0.05, "float32"), (0.0, "float32"), (0.05, "float16")])
def test_the_optimizer_steps_on_gradients_clipped_to_grad_clip(tmp_path, data_dir, grad_clip, dtype):
    """With AdamW a clip's effect on the weights is subtle (its update is near blind to the gradient's scale), so
    the gradients are read where the optimizer takes them: their norm grad_clip (this model's are far above it),
    and untouched at 0. In float16 the loss scaler's factor is taken out before the clip, not after it."""
    run = setup(tiny_config(data_dir, tmp_path / "out", grad_clip=grad_clip, learning_rate=0.1, dtype=dtype),
                Distributed())
    run.tracker.close()
    norms = []

    def taken(optimizer, *_):
        """The gradients' norm as the optimizer takes them: a fused AdamW given the scaler's factor (its grad_scale,
        which GradScaler sets where the gradients were not unscaled before) divides them by it in its kernel."""
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.model.parameters()
                                                     if p.grad is not None]))
        norms.append(norm / (getattr(optimizer, "grad_scale", None) or 1.0))

    run.optimizer.register_step_pre_hook(taken)
    for _ in range(3):
        train_step(run, 0.1)
    assert len(norms) == 3
    if grad_clip:
        assert all(n == pytest.approx(grad_clip, rel=1e-4) for n in norms), norms
    else:
        assert all(n > 0.05 for n in norms), norms  # the same model's gradients, far above the clip tested


def test_a_resumed_budget_run_goes_on_from_the_time_it_had_spent(tmp_path, data_dir):
    """The budget's clock, the last step's rate and the best loss so far come back with the checkpoint: a
    resumed run that started its clock at 0 would get the whole max_time again, its rate back near the peak."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=10**6, max_time=0.5, eval_interval=10**6,
                      attn_log_interval=0, final_eval=False)
    train(cfg)
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    resumed = setup(replace(cfg, max_time=1.0, init_from="resume"), Distributed())
    resumed.tracker.close()
    assert resumed.train_seconds == state["train_seconds"] >= 0.5
    assert resumed.step_lr == state["step_lr"] and resumed.iter_num == state["iter_num"] > 0
    assert resumed.best_val_loss == state["best_val_loss"] < math.inf
    with redirect_stdout(io.StringIO()) as said:  # the budget spent, a resume has no step left to take
        setup(replace(cfg, init_from="resume"), Distributed()).tracker.close()
    assert "note: the run had ended there (max_time=0.5 s spent), so no step is left to train" in said.getvalue()


def test_a_run_says_how_many_steps_it_took_in_how_long(tmp_path, data_dir, capsys):
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=4, eval_interval=2)
    train(cfg)
    state = load_checkpoint(checkpoint_path(cfg.out_dir))
    logged = [r["train_seconds"] for r in read_metrics(cfg.out_dir) if "train_seconds" in r][-1]  # step 4's log
    # the checkpoint holds metrics.jsonl's clock (wall time less pauses), not the budget's (the steps' calls alone,
    # always less), and a resume goes on from it: set far ahead here, the resumed records must follow it
    assert state["steps_seconds"] >= logged > state["train_seconds"] > 0
    save_checkpoint(checkpoint_path(cfg.out_dir), {**state, "steps_seconds": 1000.0})
    train(replace(cfg, init_from="resume", max_iters=7))
    said = capsys.readouterr()
    times = re.findall(r"^(\d+) steps in (\d+\.\d) s of training", said.out + said.err, re.MULTILINE)
    assert [steps for steps, _ in times] == ["4", "3"]  # the resumed run's own steps (seconds: see the test above)
    seconds = {r["iter"]: r["train_seconds"] for r in read_metrics(cfg.out_dir) if "train_seconds" in r}
    assert list(seconds) == [4, 7] and 1000.0 < seconds[7] < 1000.0 + float(times[1][1]) + 1.0


def test_a_budget_that_bought_far_fewer_steps_than_it_was_set_for_says_so(tmp_path, data_dir):
    said = {}
    for name, rate in (("short", 2 * 10**7), ("as_set", 2)):  # 0.5 s at these rates: 10,000,000 and 1 steps
        with redirect_stdout(io.StringIO()) as out:
            train(tiny_config(data_dir, tmp_path / name, max_iters=10**6, max_time=0.5, budget_steps_per_s=rate,
                              eval_interval=10**6, attn_log_interval=0, final_eval=False))
        said[name] = out.getvalue()
    steps = load_checkpoint(checkpoint_path(tmp_path / "short"))["iter_num"]
    assert f"the 0.5 s budget bought {steps:,} steps" in said["short"]
    assert "far below the 10,000,000 this budget buys" in said["short"] and "--max_iters=10000000" in said["short"]
    assert "budget bought" in said["as_set"] and "far below" not in said["as_set"]
    # a run that max_iters ended is not short of its budget, however far below the budget's rate it stopped
    with redirect_stdout(io.StringIO()) as out:
        train(tiny_config(data_dir, tmp_path / "max_iters", max_iters=3, max_time=1000.0, budget_steps_per_s=1,
                          eval_interval=10**6, attn_log_interval=0, final_eval=False))
    assert "max_iters=3 ended the run with" in out.getvalue() and "far below" not in out.getvalue()
    assert "budget spent, still warming up" in out.getvalue()  # its 3 steps are all warmup (10): no decay to speak of


def test_the_budget_report_warns_from_below_half_the_steps_set_for_and_says_whether_warmup_ended(tmp_path, data_dir):
    """10 s at a rate set for 10 steps a second buys 100 steps: 49 is far below them, 50 is not. A run that
    max_iters ended decayed its rate after warmup, or was still warming up when the two end together."""
    run = setup(tiny_config(data_dir, tmp_path / "out", max_iters=1000, max_time=10.0, budget_steps_per_s=10,
                            warmup_iters=10), Distributed())
    run.tracker.close()

    def said(steps: int, seconds: float, max_iters: int = 1000) -> str:
        run.cfg, run.iter_num, run.train_seconds = replace(run.cfg, max_iters=max_iters), steps, seconds
        with redirect_stdout(io.StringIO()) as out:
            report_budget(run)
        return out.getvalue()

    assert "the 10 s budget bought 49 steps" in said(49, 10.0) and "far below the 100 this budget" in said(49, 10.0)
    assert "the 10 s budget bought 50 steps" in said(50, 10.0) and "far below" not in said(50, 10.0)
    assert "max_iters=10 ended the run with 3.0 s of the 10 s budget spent, still warming up" in said(10, 3.0, 10)
    assert "max_iters=11 ended the run with 3.0 s of the 10 s budget spent (the learning rate decayed with the " \
        "steps)" in said(11, 3.0, 11)


def test_ramp_grows_from_a_quarter_to_full_in_eighths():
    sizes = [ramp(it, 64, 12) for it in range(14)]
    assert sizes[0] == 16 and sizes[12:] == [64, 64] and sizes == sorted(sizes)
    assert {size % 8 for size in sizes} == {0} and len(set(sizes)) == 7  # 16, 24, ..., 64
    assert ramp(0, 12, 0) == 12 and ramp(0, 1, 10) == 1


def test_the_batch_and_sequence_ramps_shape_the_steps(tmp_path, data_dir):
    cfg = tiny_config(data_dir, tmp_path / "out", batch_warmup_iters=4, seq_warmup_iters=8)
    run = setup(cfg, Distributed())
    shapes = []
    run.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    for _ in range(10):
        train_step(run, 1e-3)
    assert shapes[0] == (4, 8) and shapes[4:] == [(16, s) for s in (20, 24, 28, 32, 32, 32)]
    assert shapes == [run.step_shape(it) for it in range(10)]
    with pytest.raises(GlimpseError, match="seq_warmup_iters must not be negative"):
        tiny_config(data_dir, tmp_path / "out", seq_warmup_iters=-1)


@pytest.mark.parametrize("error", [RuntimeError, OSError, KeyboardInterrupt])
def test_a_write_that_fails_half_way_leaves_the_old_checkpoint_whole(tmp_path, error):
    """Whatever stops the write (a state torch cannot save, a failing disk, Ctrl-C), the old checkpoint stays
    whole and no half-written temporary file is left beside it."""
    class Unpicklable:
        def __reduce__(self):
            raise error("cannot pickle this")

    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}, "tokenizer": {}})
    before = digest(path)
    with pytest.raises(error, match="cannot pickle"):
        save_checkpoint(path, {"model": {"w": torch.zeros(100_000)}, "model_config": {}, "tokenizer": {},
                               "broken": Unpicklable()})
    assert digest(path) == before and torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no half-written temporary file is left


def test_best_pt_holds_the_best_eval_and_ckpt_pt_where_training_stands(tmp_path, data_dir):
    """40 good steps, then 20 at a learning rate high enough to make the val loss worse."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=40, eval_interval=20, always_save_checkpoint=False,
                      attn_log_interval=0)
    train(cfg)
    cfg = replace(cfg, max_iters=60, eval_interval=10, init_from="resume", learning_rate=0.1, min_lr=0.1,
                  warmup_iters=0)
    train(cfg)
    evals = {r["iter"]: r["val_loss"] for r in read_metrics(cfg.out_dir) if "val_loss" in r and r["iter"] > 0}
    best_iter = min(evals, key=evals.get)
    assert best_iter == 40 and evals[60] > evals[40]  # the run ends worse than its best
    best, last = load_checkpoint(best_path(cfg.out_dir)), load_checkpoint(checkpoint_path(cfg.out_dir))
    assert best["iter_num"] == best_iter and best["val_loss"] == evals[best_iter]
    assert "optimizer" not in best  # weights only: resuming reads ckpt.pt
    assert last["iter_num"] == 60 and last["best_val_loss"] == evals[best_iter]
    assert not torch.equal(best["model"]["lm_head.weight"], last["model"]["lm_head.weight"])
    # sampling reads best.pt unless told otherwise, and says which file it read
    for which, expected in (("auto", best), ("best", best), ("last", last)):
        err = io.StringIO()
        with redirect_stderr(err):
            sample(SampleConfig(out_dir=cfg.out_dir, checkpoint=which, max_new_tokens=2, num_samples=1,
                                dump_attention=False), io.StringIO())
        name = "best.pt" if expected is best else "ckpt.pt"
        assert f"sampling from {Path(cfg.out_dir) / name} (step {expected['iter_num']}" in err.getvalue()


def test_an_out_dir_from_before_best_pt_still_samples(trained, tmp_path):
    cfg, _ = trained
    old = tmp_path / "old"
    old.mkdir()
    (old / "ckpt.pt").write_bytes(checkpoint_path(cfg.out_dir).read_bytes())  # a single-file out_dir
    text = sample(SampleConfig(out_dir=str(old), max_new_tokens=5, num_samples=1, dump_attention=False),
                  io.StringIO())
    assert len(text[0]) == 1 + 5


def test_a_resume_keeps_the_best_loss_its_checkpoint_holds_without_best_pt(tmp_path, data_dir):
    """best.pt's own loss is read when it is there; without it (deleted, unreadable) the best so far is still
    ckpt.pt's, so the resumed run's first eval does not take a worse model for the best."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=20, eval_interval=10, attn_log_interval=0)
    train(cfg)
    saved = load_checkpoint(checkpoint_path(cfg.out_dir))["best_val_loss"]
    best_path(cfg.out_dir).unlink()
    resumed = setup(replace(cfg, max_iters=30, init_from="resume"), Distributed())
    resumed.tracker.close()
    assert math.isfinite(saved) and resumed.best_val_loss == saved


def test_float16_resume_continues_exactly(tmp_path, data_dir):
    """float16 trains through a GradScaler, whose state must survive a resume (float32: test_train.py)."""
    run = dict(eval_interval=20, dropout=0.1, dtype="float16", attn_log_interval=0, learning_rate=1e-2)
    train(tiny_config(data_dir, tmp_path / "straight", max_iters=60, **run))
    train(tiny_config(data_dir, tmp_path / "halves", max_iters=40, **run))
    # a model this small never overflows float16, so the scale stays put; but the scaler counts the steps
    # since its last overflow, and grows the scale when they reach 2,000: that count must carry over too
    saved = load_checkpoint(checkpoint_path(tmp_path / "halves"))["scaler"]
    resumed = setup(tiny_config(data_dir, tmp_path / "halves", max_iters=60, init_from="resume", **run),
                    Distributed())
    resumed.tracker.close()
    assert saved["_growth_tracker"] == 40 and resumed.scaler.state_dict() == saved
    train(tiny_config(data_dir, tmp_path / "halves", max_iters=60, init_from="resume", **run))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in CLOCKED} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "halves")) == strip(read_metrics(tmp_path / "straight"))


def test_the_time_budget_sets_each_steps_rate_and_stops_the_run_when_spent(tmp_path, data_dir):
    """Whatever the machine's speed: every step's lr follows the budget spent before it, and the run stops
    at the first step that finds the budget spent."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=10**6, max_time=1.0, eval_interval=10**6,
                      log_interval=1, attn_log_interval=0, warmup_iters=0)
    last = train(cfg)
    steps = [r for r in read_metrics(cfg.out_dir) if "train_loss" in r]
    assert last["iter"] == steps[-1]["iter"] < 10**6  # the clock, not max_iters, ended it
    for r in steps:
        assert r["lr"] == pytest.approx(get_lr(r["iter"] - 1, cfg, r["budget_used"]))
        assert r["budget_used"] < 1.0  # no step is taken once the budget is spent
    spent = load_checkpoint(checkpoint_path(cfg.out_dir))["train_seconds"]
    assert spent >= cfg.max_time  # ... and the run went on until it was
    assert last["lr"] == steps[-1]["lr"]  # the final eval reports the rate of the step before it
    assert "val_loss" in last and "final_val_loss" in last
    budget = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10)
    assert get_lr(5, budget, 0.0) == pytest.approx(6 / 11)  # warmup still counts steps
    assert get_lr(500, budget, 0.5) == pytest.approx(0.55) and get_lr(500, budget, 1.0) == pytest.approx(0.1)


def test_steps_that_run_out_before_the_budget_decay_the_rate_fully_and_the_run_says_which_ended_it(tmp_path,
                                                                                                     data_dir, capsys):
    """max_iters under a budget the run never spends (the CPU preset's 72 s with --max_iters=30): the rate follows
    the steps towards max_iters, not the small share of the budget spent, and ends decayed as a budgeted run does."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=30, max_time=10_000.0, eval_interval=10**6,
                      log_interval=1, attn_log_interval=0, warmup_iters=5, learning_rate=1e-2, min_lr=1e-3)
    train(cfg)
    steps = [r for r in read_metrics(cfg.out_dir) if "train_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 31)) and steps[-1]["budget_used"] < 0.01
    for r in steps[5:]:  # after warmup: the cosine over steps 5 to 30, as the step fraction has it
        progress = (r["iter"] - 1 - 5) / 25
        assert r["lr"] == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi * progress)) * 9e-3)
    assert steps[-1]["lr"] < 1.1e-3  # the last step's rate is near min_lr, where the budget's share left it at 1e-2
    spent = load_checkpoint(checkpoint_path(cfg.out_dir))["train_seconds"]
    out = capsys.readouterr().out
    assert f"max_iters=30 ended the run with {spent:.1f} s of the 10000 s budget spent" in out
    assert "budget bought" not in out
    # a budget spent in fewer steps than max_iters allows still rules the rate: its share is further along
    assert get_lr(100, TrainConfig(learning_rate=1.0, min_lr=0.1, max_iters=10**6), 0.5) == pytest.approx(0.55)


def test_a_budget_that_ends_between_log_steps_logs_the_loss_of_its_last_steps(tmp_path, data_dir):
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=10**6, max_time=0.5, eval_interval=10**6,
                      log_interval=10**6, attn_log_interval=0, warmup_iters=0, final_eval=False)
    last = train(cfg)
    logged = [r for r in read_metrics(cfg.out_dir) if "train_loss" in r]
    assert [r["iter"] for r in logged] == [last["iter"]]  # every step's loss is in a record, the last ones too
    assert logged[0]["lr"] == pytest.approx(get_lr(last["iter"] - 1, cfg, logged[0]["budget_used"]))
    assert math.isfinite(logged[0]["train_loss"]) and logged[0]["budget_used"] < 1.0


def test_a_mistyped_data_dir_is_not_left_behind(tmp_path, monkeypatch):
    """A built-in dataset that cannot be fetched into a --data_dir that did not exist stops in one line, and the
    folder it made for it is gone again (port 9 on loopback refuses the connection: a real failed download)."""
    from data import prepare

    monkeypatch.setitem(prepare.BUILTIN, "shakespeare_char", ("char", "http://127.0.0.1:9/input.txt"))
    typo = tmp_path / "dta"
    with pytest.raises(GlimpseError, match="could not download"):
        prepare_data(tiny_config(typo, tmp_path / "out", dataset="shakespeare_char"))
    assert list(tmp_path.iterdir()) == []


def test_a_resume_keeps_a_best_pt_newer_than_its_checkpoint(tmp_path, data_dir):
    """With always_save_checkpoint=false a run killed between checkpoints leaves a best.pt better than the best
    its ckpt.pt knows of (here: made so by hand); a resumed run that does not beat it must not replace it."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=20, eval_interval=10, attn_log_interval=0,
                      final_eval=False)
    train(cfg)
    state = load_checkpoint(best_path(cfg.out_dir))
    save_checkpoint(best_path(cfg.out_dir), {**state, "val_loss": 0.01})
    kept = hashlib.sha256(best_path(cfg.out_dir).read_bytes()).hexdigest()
    train(replace(cfg, init_from="resume", max_iters=30))
    assert hashlib.sha256(best_path(cfg.out_dir).read_bytes()).hexdigest() == kept
    best_path(cfg.out_dir).write_bytes(b"not a checkpoint")  # a best.pt it cannot read does not stop a resume
    assert train(replace(cfg, init_from="resume", max_iters=40))["iter"] == 40


def test_a_resume_reads_past_a_metrics_line_cut_short(tmp_path, data_dir):
    """A process killed mid-write (or a full disk) leaves half a line at the end of metrics.jsonl: the resumed
    run keeps every whole record up to its checkpoint and goes on."""
    cfg = tiny_config(data_dir, tmp_path / "out", max_iters=20, eval_interval=10, attn_log_interval=0,
                      final_eval=False)
    train(cfg)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    whole = read_metrics(cfg.out_dir)
    with open(metrics, "a") as f:
        f.write('[1, 2]\n{"iter": 21, "train_lo')
    train(replace(cfg, init_from="resume", max_iters=30))
    records = read_metrics(cfg.out_dir)
    assert records[:len(whole)] == whole and records[-1]["iter"] == 30


def test_a_record_appended_after_a_line_cut_short_is_a_line_of_its_own(tmp_path):
    """eval.py appends its scores to a finished run's metrics.jsonl: after a line cut short, the record must not
    join it (the two would then be one broken line, and the score lost)."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iter": 10, "train_loss": 2.5}\n{"iter": 20, "train_lo')
    tracker = Tracker(metrics, append=True)
    tracker.log({"iter": 20, "hellaswag_acc": 0.5})
    tracker.log({"iter": 20, "hellaswag_acc_norm": 0.25})
    assert read_records(metrics) == [{"iter": 10, "train_loss": 2.5}, {"iter": 20, "hellaswag_acc": 0.5},
                                     {"iter": 20, "hellaswag_acc_norm": 0.25}]
    assert metrics.read_text().count("\n") == 4  # one newline ends the cut line, then one per record
    whole = tmp_path / "whole.jsonl"
    whole.write_text('{"iter": 10}\n')
    Tracker(whole, append=True).log({"iter": 20})
    assert whole.read_text() == '{"iter": 10}\n{"iter": 20}\n'  # a whole file gets no blank line
    empty = tmp_path / "empty.jsonl"  # a run stopped before its first log leaves its metrics.jsonl empty
    empty.write_text("")
    Tracker(empty, append=True).log({"iter": 0})
    assert empty.read_text() == '{"iter": 0}\n'


def test_metrics_lines_that_are_no_record_are_left_out_wherever_they_stand(tmp_path):
    """A line cut short, or one that is not a record of a step (no whole-number iter), is passed over, and the
    records after it are still read."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iter": 1, "train_loss": 2.5}\n{"iter": 2, "train_lo\n{"loss": 1.0}\n{"iter": "3"}\n'
                       '[4]\n{"iter": 5, "val_loss": 2.0}\n')
    assert read_records(metrics) == [{"iter": 1, "train_loss": 2.5}, {"iter": 5, "val_loss": 2.0}]


def test_a_tracker_of_a_process_that_does_not_track_writes_nothing(tmp_path):
    """Under torchrun every rank has a Tracker, and only rank 0's writes: the others' log nothing."""
    metrics = tmp_path / "metrics.jsonl"
    tracker = Tracker(metrics, enabled=False, draw_losses=True)
    tracker.log({"iter": 0, "train_loss": 2.5, "val_loss": 2.4})
    assert list(tmp_path.iterdir()) == []


def test_a_record_of_a_run_that_blew_up_is_json_every_reader_reads(tmp_path):
    """A loss gone NaN or infinite is written null: NaN and Infinity are not JSON (a browser's JSON.parse, jq and
    wandb's importers refuse the line), though Python's json reads them."""
    metrics = tmp_path / "metrics.jsonl"
    Tracker(metrics).log({"iter": 1, "train_loss": float("nan"), "lr": float("inf"), "val_loss": 2.5})
    constants = []  # what Python reads only as an extension of JSON: NaN, Infinity, -Infinity
    record = json.loads(metrics.read_text(), parse_constant=constants.append)
    assert constants == [] and record == {"iter": 1, "train_loss": None, "lr": None, "val_loss": 2.5}


def test_the_bar_counts_the_budgets_seconds_when_there_is_one(tmp_path, data_dir):
    """A preset's budget ends long before its max_iters: its bar must count the budget, or the time left it
    shows is max_iters' (an hour for a run of a minute)."""
    shown = {}
    for name, budget in (("budget", {"max_time": 1.0, "max_iters": 10**6}), ("steps", {"max_iters": 20})):
        with redirect_stderr(Terminal()) as err:
            train(tiny_config(data_dir, tmp_path / name, eval_interval=10**6, attn_log_interval=0, log_interval=1,
                              final_eval=False, **budget))
        shown[name] = [line for line in err.getvalue().split("\r") if line.startswith("train:")][-1]  # its last state
    assert "100%" in shown["budget"] and "1/1 s of steps" in shown["budget"] and "step=" in shown["budget"]
    assert "100%" in shown["steps"] and "20/20" in shown["steps"] and "s of steps" not in shown["steps"]


def test_a_resumed_runs_bar_starts_where_its_checkpoint_stood(tmp_path, data_dir):
    """A resumed run's bar starts at the steps (or, under a budget, the seconds, at most the whole budget) its
    checkpoint had taken: started at 0, its first update would count them as done in the resumed run's first
    moments, and its rate and time to go with them."""
    from glimpse.progress import progress_bar

    run = setup(tiny_config(data_dir, tmp_path / "out"), Distributed())
    run.tracker.close()
    run.iter_num, run.train_seconds = 40, 30.0
    with progress_bar(run.cfg, run, show=False) as bar:
        assert (bar.n, bar.total) == (40, run.cfg.max_iters)
    for budget, shown in ((60.0, 30.0), (20.0, 20.0)):
        with progress_bar(replace(run.cfg, max_time=budget), run, show=False) as bar:
            assert (bar.n, bar.total) == (shown, budget)


def test_a_run_that_blew_up_says_which_checkpoints_it_kept(tmp_path, data_dir):
    """The error that stops a run whose loss stopped being finite says what is left to go back to: no checkpoint
    yet, ckpt.pt alone, or both; and advises float32 only to a run in another dtype."""
    from glimpse.progress import blown_up

    run = setup(tiny_config(data_dir, tmp_path / "out"), Distributed())
    run.tracker.close()
    run.iter_num = 7
    said = lambda: str(blown_up("the training loss became nan", run))  # noqa: E731
    assert said() == "the training loss became nan at step 7; no checkpoint had been written yet. Try a lower " \
                     "learning_rate"
    save_checkpoint(checkpoint_path(run.cfg.out_dir), {"model": {}})
    assert f"at step 7; {checkpoint_path(run.cfg.out_dir)} kept as it was. Try a lower learning_rate" in said()
    save_checkpoint(best_path(run.cfg.out_dir), {"model": {}})
    run.dtype = torch.bfloat16
    assert said().endswith(f"; {checkpoint_path(run.cfg.out_dir)} and {best_path(run.cfg.out_dir)} kept as they "
                           "were. Try a lower learning_rate, or dtype=float32")


def test_the_time_to_go_is_rounded_as_an_estimate_is():
    from glimpse.progress import duration

    assert [duration(s) for s in (0.4, 45, 89.6, 90, 720, 5399, 5400, 9000)] == [
        "0 s", "45 s", "90 s", "2 min", "12 min", "90 min", "1.5 h", "2.5 h"]


class Terminal(io.StringIO):
    """stderr as a terminal: where the training bar is drawn."""

    def isatty(self) -> bool:
        return True


def test_where_stderr_is_no_terminal_each_log_step_is_a_line_and_no_bar_is_drawn(tmp_path, data_dir):
    """Into a log file or a pipe the bar's redraws would pile up: a line per log step is printed instead."""
    for name, budget in (("steps", {"max_iters": 20}), ("budget", {"max_time": 1.0, "max_iters": 10**6})):
        with redirect_stderr(io.StringIO()) as err, redirect_stdout(io.StringIO()) as out:
            train(tiny_config(data_dir, tmp_path / name, eval_interval=10**6, attn_log_interval=0, log_interval=5,
                              final_eval=False, **budget))
        assert "train:" not in err.getvalue() and "\r" not in err.getvalue() + out.getvalue()
        lines = [line for line in out.getvalue().splitlines() if re.match(r"step \d+: loss ", line)]
        logged = read_metrics(tmp_path / name)
        assert [line.split(":")[0] for line in lines] == [f"step {r['iter']}" for r in logged if "train_loss" in r]
        left = r", [01]\.\d/1 s of steps" if name == "budget" else r"(, about [\d.]+ (s|min|h) of steps left)?"
        assert all(re.fullmatch(r"step \d+: loss \d\.\d{4}, [\d,]+ tokens/s" + left, line) for line in lines), lines
        if name == "steps":  # the time to go at the run's pace, but for the last step
            assert [" left" in line for line in lines] == [True] * (len(lines) - 1) + [False]


def test_between_agreements_the_budget_runs_on_at_the_agreed_pace():
    """Under DDP the processes agree on the slowest clock at log steps only; in between, every one of them
    extends it by the agreed seconds per step, so all take the same rate and stop at the same step."""
    budget = TimeBudget(max_time=10.0, spent=2.0, iter_num=100)  # resumed at step 100 with 2 s spent
    assert budget.fraction(100) == budget.fraction(105) == pytest.approx(0.2)  # no pace agreed yet
    budget.spent = 2.9  # this process's own clock, which the fraction does not read
    budget.agree(3.0, 110)  # the slowest process spent 1 s on 10 steps
    assert budget.fraction(110) == pytest.approx(0.3)
    assert budget.fraction(115) == pytest.approx(0.35)  # 5 more steps at 0.1 s each
    assert TimeBudget(0.0, 0.0, 0).fraction(5) is None  # no budget


def test_mfu_is_the_share_of_the_peak_that_the_model_arithmetic_used(tmp_path, data_dir):
    run = setup(tiny_config(data_dir, tmp_path / "out"), Distributed())
    assert run.peak is None and throughput(run) == {}  # a CPU's peak is not known: no MFU at all
    c = run.model.config
    weights = sum(p.numel() for p in run.model.parameters()) - c.block_size * c.n_embd  # less the position table
    per_token = 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size  # forward and backward, attention included
    assert run.model.flops_per_token() == per_token
    run.peak, run.flops_per_sec = 2e12, 40_000.0 * per_token
    assert throughput(run)["mfu"] == pytest.approx(40_000 * per_token / 2e12)
    run.ddp = Distributed(world_size=4)
    assert throughput(run)["mfu"] == pytest.approx(40_000 * per_token / (4 * 2e12))  # four devices' peak


def shipped_presets() -> dict[str, dict]:
    return {p.name: tomllib.loads(p.read_text()) for p in (REPO / "config").glob("*.toml")}


def scratch_presets() -> list[str]:
    """The shipped char-level presets that train from scratch, the GPU ones included (test_gpt2 runs the finetuning
    ones on a GPT-2 of its own, test_hellaswag the GPT-2 (124M) preset, shrunk)."""
    return sorted(name for name, keys in shipped_presets().items()
                  if keys.get("init_from", "scratch") == "scratch" and keys["dataset"] == "shakespeare_char")


@pytest.mark.parametrize("preset", scratch_presets())
def test_every_shipped_preset_trains_a_step(tmp_path, data_dir, preset):
    # a GPU preset's model, flags and optimizer on the CPU: uncompiled (compiling is tested apart), in float32, on
    # 8 sequences rather than a GPU's batch, which would take a CPU most of a minute a step
    keys = shipped_presets()[preset]
    on_cpu = ["--compile=false", "--dtype=float32"] if keys.get("device") == "cuda" else []
    on_cpu += ["--batch_size=8"] if keys.get("batch_size", 64) > 16 else []
    cfg = parse_config(TrainConfig, [str(REPO / "config" / preset), f"--data_dir={data_dir}", "--dataset=tiny",
                                     f"--out_dir={tmp_path / 'out'}", "--max_iters=1", "--max_time=0",
                                     "--eval_iters=1", "--device=cpu", "--wandb_log=false", *on_cpu],
                       prog="train.py", description="")
    last = train(cfg)
    assert last["iter"] == 1 and math.isfinite(last["val_loss"]) and math.isfinite(last["final_val_loss"])
    assert load_checkpoint(checkpoint_path(cfg.out_dir))["train_config"] == config_values(cfg)


def test_auto_picks_float16_on_gpus_that_only_emulate_bfloat16(monkeypatch):
    """No GPU here: stand in for torch's answer on a V100 or T4 (bfloat16 by emulation only), and for CPUs with
    and without bfloat16 instructions (whichever this one is)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_computes_bfloat16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(runtime, "cpu_computes_bfloat16", lambda: True)  # AVX-512 BF16 or AMX
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32  # an MPS device is never asked


def test_float32_on_cuda_allows_tf32_and_nothing_else_changes_it():
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert not allow_tf32(torch.device("cuda"), torch.bfloat16)  # autocast runs those products in bfloat16
        assert not allow_tf32(torch.device("cpu"), torch.float32)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert allow_tf32(torch.device("cuda"), torch.float32)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_autocast_runs_the_products_in_the_runs_16_bit_format_and_leaves_float32_alone():
    """float16 trains through a grad scaler: without autocast it would scale float32 products and gain nothing."""
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        with autocast(torch.device("cpu"), dtype):
            assert torch.nn.functional.linear(x, w).dtype == dtype


def test_nccl_binds_each_process_to_its_gpu_from_the_start():
    assert process_group_options("cuda", 3, cuda_available=True) == {"backend": "nccl",
                                                                     "device_id": torch.device("cuda", 3)}
    assert process_group_options("auto", 1, cuda_available=True)["device_id"] == torch.device("cuda", 1)
    assert process_group_options("auto", 1, cuda_available=False) == {"backend": "gloo"}
    assert process_group_options("cpu", 0, cuda_available=True) == {"backend": "gloo"}


def test_under_torchrun_auto_is_the_groups_device_and_mps_is_refused():
    """gloo holds CPU and CUDA tensors only: on a Mac, auto would pick MPS for every process's collectives."""
    assert run_device("auto", Distributed(0, 0, 2, "cpu")) == "cpu"
    assert run_device("auto", Distributed(1, 1, 2, "cuda:1")) == "cuda"
    assert run_device("auto", Distributed()) == "auto"  # one process: CUDA, then MPS, then the CPU
    assert run_device("mps", Distributed()) == "mps" and run_device("cpu", Distributed(0, 0, 2, "cpu")) == "cpu"
    with pytest.raises(GlimpseError, match="device=mps cannot run under torchrun.*--device=cpu"):
        process_group_options("mps", 0, cuda_available=False)


def test_a_gpu_past_the_machines_is_refused_and_one_it_has_is_taken_as_named(monkeypatch):
    """No GPU here: stand in for torch's answers on a machine with two. Its GPUs are cuda:0 and cuda:1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(GlimpseError, match=r"^device=cuda:2 but PyTorch sees 2 CUDA GPUs, numbered from 0"):
        runtime.resolve_device("cuda:2")


def test_a_config_is_one_source_for_the_models_options():
    cfg = parse_config(TrainConfig, ["--n_layer=3", "--pos_encoding=rope"], prog="train.py", description="")
    assert cfg.model.n_layer == 3 and cfg.model.pos_encoding == "rope"
    assert cfg.model_config(vocab_size=65) == replace(cfg.model, vocab_size=65)
    with pytest.raises(GlimpseError, match="pos_encoding must be one of learned, sinusoidal, rope, alibi, none"):
        parse_config(TrainConfig, ["--pos_encoding=sideways"], prog="train.py", description="")


def test_asking_for_best_pt_where_there_is_none_says_what_to_read_instead(trained, tmp_path, capsys):
    import sample as sample_script
    from tests.test_reliability import run_main

    cfg, _ = trained
    (tmp_path / "ckpt.pt").write_bytes(checkpoint_path(cfg.out_dir).read_bytes())  # ckpt.pt alone
    message = run_main(sample_script.main, [f"--out_dir={tmp_path}", "--checkpoint=best"], capsys)
    assert "no " + str(tmp_path / "best.pt") in message and "--checkpoint=last" in message


def test_the_last_step_is_evaluated_and_drawn_off_the_schedule(tmp_path, data_dir):
    """A run that does not end on a multiple of eval_interval still evaluates, saves and draws its last step."""
    cfg = tiny_config(data_dir, tmp_path, max_iters=25, eval_interval=10, lr_decay_iters=25, final_eval=False)
    train(cfg)
    evals = [r["iter"] for r in read_metrics(tmp_path) if "val_loss" in r]
    assert evals == [0, 10, 20, 25]
    assert sorted(int(p.name.removeprefix("iter_")) for p in (tmp_path / "attention").glob("iter_*")) == [0, 10, 20, 25]
    assert load_checkpoint(checkpoint_path(tmp_path), torch.device("cpu"))["iter_num"] == 25


def test_attn_log_interval_0_draws_no_snapshot_and_a_number_sets_their_own_schedule(tmp_path, data_dir):
    """0 means never (a snapshot costs a forward and the pictures, on rank 0 alone), not "at every eval"."""
    for interval, drawn in ((0, []), (3, [0, 3, 4])):
        out = tmp_path / str(interval)
        train(tiny_config(data_dir, out, max_iters=4, eval_interval=2, lr_decay_iters=4, final_eval=False,
                          attn_log_interval=interval))
        assert sorted(int(p.name.removeprefix("iter_")) for p in (out / "attention").glob("iter_*")) == drawn
        assert [r["iter"] for r in read_metrics(out) if "val_loss" in r] == [0, 2, 4]  # the evals as scheduled


def test_a_compiled_run_compiles_a_static_graph_for_each_step_shape_before_its_first_step(tmp_path, data_dir):
    """Dynamo would turn B and T symbolic once they change (the ramps), leaving full-size steps on a graph for
    any size; and a compile inside the first step would count against max_time. aot_eager traces the same
    graphs as inductor, in seconds. The final whole-split score runs on the evals' graph: its last batch is
    filled up to their shape."""
    from torch._dynamo.utils import counters

    cfg = tiny_config(data_dir, tmp_path / "out", compile=True, compile_backend="aot_eager", batch_warmup_iters=3,
                      seq_warmup_iters=6, max_iters=12, eval_interval=6, final_eval=True, attn_log_interval=0,
                      dropout=0.1)
    shapes = training_shapes(cfg)
    assert shapes[0] == (4, 8) and shapes[-1] == (16, 32) and len(shapes) == 7
    plain = setup(replace(cfg, compile=False, out_dir=str(tmp_path / "plain")), Distributed())
    plain.tracker.close()
    rng = torch.get_rng_state()
    torch._dynamo.reset()
    counters.clear()
    run = setup(cfg, Distributed())
    assert counters["stats"]["unique_graphs"] == len(shapes)  # one static graph per shape, before any step
    assert torch.equal(torch.get_rng_state(), rng)  # the same dropout masks to come as without compiling
    assert all(p.grad is None for p in run.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(run.model.parameters(), plain.model.parameters()))
    result = loop(run)
    run.tracker.close()
    assert counters["stats"]["unique_graphs"] == len(shapes) + 1  # and the evals' one, no step compiled again
    val_tokens = len(run.data.tokens("val"))
    windows = len(scored_windows(val_tokens, 32, "windows", 32, val_tokens)[0])  # the last batch was filled up
    assert windows % cfg.batch_size and result["final_val_tokens"] == val_tokens - 1  # every target, once
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compile_backend must be one of torch.compile's backends"):
        replace(cfg, compile_backend="inductr")


def test_a_long_ramp_compiles_each_of_its_shapes_once():
    """A ramp over many steps stays on each eighth for many of them: compile_ahead runs a forward and backward per
    shape listed, so each must be listed once (eighths 2 to 8 of 32 tokens, then full size from step 100 on), not
    once per step, which would be 100 passes before the first step. A resume lists the shapes it has left."""
    cfg = train_config(batch_size=16, block_size=32, seq_warmup_iters=100)
    assert training_shapes(cfg) == [(16, 8 * eighths // 2) for eighths in range(2, 9)]
    assert training_shapes(cfg, from_iter=90) == [(16, 32)]


def test_compile_mode_reaches_inductor_and_cuda_graphs_are_refused_where_they_would_be_wrong(tmp_path, data_dir):
    """--compile_mode=reduce-overhead asks inductor for CUDA graphs: on the CPU it counts them skipped (a counter
    that only a run asking for them bumps) and the step runs as compiled. Where CUDA graphs would go wrong, the run
    is refused before it starts, on any device: fsdp's weights move every step, PyTorch mixes up the gradients of
    micro-steps recorded as graphs (pytorch/pytorch#169545), and DDP is reported to break them (#113809); another
    backend takes no mode."""
    from torch._dynamo.utils import counters

    cfg = tiny_config(data_dir, tmp_path / "out", n_layer=1, compile=True, compile_mode="reduce-overhead",
                      max_iters=2, attn_log_interval=0)
    torch._dynamo.reset()
    counters.clear()
    run = setup(cfg, Distributed())
    assert counters["inductor"]["cudagraph_skips"] >= 1  # inductor was asked, and the CPU has none to record
    before = [p.detach().clone() for p in run.model.parameters()]
    loss = train_step(run, 1e-3)
    run.tracker.close()
    assert math.isfinite(loss.item()) and any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="fsdp gathers and frees the weights"):
        replace(cfg, fsdp=True, optimizer="adamw")
    with pytest.raises(ValueError, match=r"compile_mode is inductor's \(aot_eager takes no mode\)"):
        replace(cfg, compile_backend="aot_eager")
    with pytest.raises(GlimpseError, match=r"across micro-steps \(2 here\)"):
        setup(replace(cfg, gradient_accumulation_steps=2, out_dir=str(tmp_path / "accumulated")), Distributed())
    assert not (tmp_path / "accumulated").exists()
    with pytest.raises(GlimpseError, match="which PyTorch's DDP is reported to break with"):  # one micro-step each
        setup(replace(cfg, gradient_accumulation_steps=2), Distributed(world_size=2))
    with pytest.raises(ValueError, match="compile_backend=cudagraphs records CUDA graphs"):  # the same graphs
        replace(cfg, compile_mode="default", compile_backend="cudagraphs", fsdp=True, optimizer="adamw")
    replace(cfg, fsdp=True, optimizer="adamw", compile_mode="max-autotune-no-cudagraphs")  # no graphs: allowed
    setup(replace(cfg, compile=False, gradient_accumulation_steps=2, out_dir=str(tmp_path / "eager")),
          Distributed()).tracker.close()  # the mode is read by compiled runs only


def test_a_resume_trains_with_the_optimizer_settings_its_flags_give(tmp_path, data_dir):
    """torch's load_state_dict brings back each group's saved settings with its state: a resume given
    --weight_decay=0, --beta2 or Muon's momentum said "changed since the checkpoint" and recorded the new values,
    but went on with the old ones. The state (moments, momentum buffers, step counts) is still the checkpoint's."""
    cfg = tiny_config(data_dir, tmp_path / "out", optimizer="muon", max_iters=10, eval_interval=10,
                      attn_log_interval=0, final_eval=False)
    train(cfg)
    saved = load_checkpoint(checkpoint_path(cfg.out_dir))["optimizer"]
    changed = dict(weight_decay=0.0, beta1=0.8, beta2=0.95, muon_weight_decay=0.03, muon_momentum=0.9,
                   muon_ns_steps=3)
    resumed = setup(replace(cfg, init_from="resume", max_iters=20, **changed), Distributed())
    resumed.tracker.close()
    muon, decayed, flat = resumed.optimizer.param_groups
    assert (muon["weight_decay"], muon["momentum"], muon["ns_steps"]) == (0.03, 0.9, 3)
    assert decayed["weight_decay"] == 0.0 and decayed["betas"] == flat["betas"] == (0.8, 0.95)
    assert flat["weight_decay"] == 0.0  # biases and gains never decay
    for part in ("muon", "adamw"):  # the moments and buffers loaded as saved
        state = resumed.optimizer.state_dict()[part]["state"]
        assert state.keys() == saved[part]["state"].keys() and state
        for key, values in saved[part]["state"].items():
            for name, value in values.items():
                assert torch.equal(state[key][name], value), (part, key, name)
