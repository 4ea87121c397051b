r"""
Train a GPT on a prepared dataset, on one CPU/GPU or many through torchrun.

    python train.py config/shakespeare_char_cpu.toml
    python train.py config/shakespeare_char.toml --max_iters=2000 --compile=true
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_cpu.toml \
        --batch_size=6 --gradient_accumulation_steps=2     # the same 12 sequences per step, in 2 processes
    torchrun --standalone --nproc_per_node=8 train.py config/finetune_shakespeare.toml --init_from=gpt2-xl \
        --fsdp=true     # weights, gradients and AdamW state sharded across the 8 (docs/training.md)
    python train.py --init_from=resume --out_dir=out-shakespeare-char-cpu   # go on, with the run's own settings
    python train.py config/finetune_shakespeare.toml   # finetune pretrained GPT-2 (--init_from=gpt2)
    python train.py --help              # every key, its default and meaning

Built-in datasets (shakespeare_char, shakespeare; openwebtext and fineweb_edu, streamed for hours) are
downloaded and prepared on first use (data/prepare.py; docs/corpora.md for a corpus of your own). The run
writes out_dir/config.json (the resolved config), out_dir/metrics.jsonl (one JSON line per log and
per eval), out_dir/loss.png (those losses drawn, at every eval), out_dir/ckpt.pt (where training stands:
what --init_from=resume continues) and out_dir/best.pt (the weights with the lowest validation loss,
which sample.py and eval.py read).
"""

# Reading order: train and loop -> how the loop stops (stop_now) -> the loop's steps: scheduled_work,
# train_step, evaluate (and evaluate_and_keep_best), score_hellaswag, snapshot_attention, checkpoint and save,
# then after the loop final_eval and report_budget. What a run holds and how it is set up (Run, setup) are in
# glimpse/run.py; the keys (TrainConfig) in glimpse/train_config.py.

from __future__ import annotations

import math
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data import hellaswag
from data.training_data import prepare_data
from glimpse.attention import dump_text
from glimpse.checkpoint import best_path, checkpoint_path, save_checkpoint
from glimpse.config import parse_config
from glimpse.distributed import exit_when_done_under_torchrun, first_process, init_distributed
from glimpse.errors import GlimpseError, user_errors
from glimpse.evaluation import estimate_loss, evaluating, length_loss
from glimpse.optim import get_lr, set_lr
from glimpse.progress import StepLog, TimeBudget, blown_up, progress_bar, report_step
from glimpse.run import Run, setup
from glimpse.run_folder import RESUME_KEEPS, check_start, run_settings, training_in
from glimpse.runtime import StopRequest, synchronize, to_device
from glimpse.train_config import TrainConfig


def train(cfg: TrainConfig) -> dict:
    """Run training as cfg says; return the last evaluation ({'iter', 'train_loss', 'val_loss', ...})."""
    check_start(Path(cfg.out_dir), cfg.init_from)  # what stops a run is said before data is prepared or downloaded
    with training_in(Path(cfg.out_dir), main=first_process()):  # no second run in the folder while this one runs
        prepare_data(cfg)  # before any process group: a long preparation must not sit inside a collective's timeout
        ddp = init_distributed(cfg.device)  # under torchrun the group lives until the process exits (see there)
        run = setup(cfg, ddp)
        try:
            return loop(run)
        finally:
            run.tracker.close()


def loop(run: Run) -> dict:
    """Steps until max_iters or the time budget: evals, snapshots and checkpoints on their schedules."""
    cfg, ddp = run.cfg, run.ddp
    budget = TimeBudget(cfg.max_time, run.train_seconds, run.iter_num)
    stop = StopRequest()  # SIGINT / SIGTERM: finish the step, checkpoint, exit 130 / 143
    bar = progress_bar(cfg, run, show=ddp.is_main)
    log = StepLog(run.device, unlogged_loss=run.unlogged_loss, seconds_before=run.steps_seconds)
    first_step, t_saved = run.iter_num, time.time()
    step_budget = None  # the share of the budget the last step's rate was set from
    try:
        while True:
            budget_used = budget.fraction(run.iter_num)
            lr = get_lr(run.iter_num, cfg, budget_used)
            last_step = run.iter_num >= cfg.max_iters or (budget_used is not None and budget_used >= 1.0)
            if last_step and log.steps:  # a budget that ends between log steps: its last steps' loss is logged too
                report_step(bar, run, log.write(run, run.step_lr, step_budget))
            if run.iter_num != run.work_done_at and scheduled_work(run, last_step, log):
                t_saved = time.time()
            if last_step:  # a signal during the last step's work stops the run as it would earlier: no final eval
                if ddp.max([stop.signum is not None])[0]:
                    stop_now(run, stop, bar, log)
                break

            t_step, step_budget = time.perf_counter(), budget_used
            log.count(run, run.iter_num)
            log.loss_sum += train_step(run, lr)
            if cfg.max_time:
                synchronize(run.device)  # the budget counts the step's work, not the time to queue it
            budget.spent += time.perf_counter() - t_step
            run.train_seconds = budget.spent
            log.steps += 1
            bar.update(min(budget.spent, bar.total) - bar.n if cfg.max_time else 1)
            log_step = run.iter_num % cfg.log_interval == 0 or run.iter_num == cfg.max_iters
            if log_step:
                report_step(bar, run, log.write(run, lr, budget_used))

            # the processes must take the same decisions at the same step: under DDP they agree at log steps
            # only, in one small collective, rather than paying for one every step
            if not ddp.enabled or log_step:
                interval_due = bool(cfg.checkpoint_interval_s) and time.time() - t_saved >= cfg.checkpoint_interval_s
                stopping, saving, slowest = ddp.max([stop.signum is not None, interval_due, budget.spent])
                budget.agree(slowest, run.iter_num)
                if stopping:
                    stop_now(run, stop, bar, log)
                if saving:
                    with log.paused():
                        checkpoint(run, log)
                    t_saved = time.time()
    finally:
        stop.restore()
        bar.close()  # before any error message, so that the message is the last line
    steps, seconds = run.iter_num - first_step, log.steps_seconds()
    run.say(f"{steps:,} steps in {seconds:.1f} s of training (evals, snapshots and checkpoints left out)")
    if cfg.max_time:
        report_budget(run)
    if cfg.final_eval:
        run.last_eval = {**run.last_eval, **final_eval(run)}
    return run.last_eval


def stop_now(run: Run, stop: StopRequest, bar, log: StepLog):
    """Save the checkpoint and end as the signal asked: exit code 130 for SIGINT, 143 for SIGTERM."""
    with log.paused():
        checkpoint(run, log)
    bar.close()
    signum = stop.signum or signal.SIGTERM  # a process that got no signal itself stops as SIGTERM
    run.say(f"stopped by {signal.Signals(signum).name} at step {run.iter_num}; checkpoint saved: continue with "
            f"--init_from=resume --out_dir={shlex.quote(run.cfg.out_dir)}")
    raise SystemExit(128 + signum)


def scheduled_work(run: Run, last_step: bool, log: StepLog) -> bool:
    """The evaluation (and best.pt), HellaSwag score and attention snapshot due at this step, left out of the
    training speed, then ckpt.pt when it is due; True when ckpt.pt was written."""
    cfg, it = run.cfg, run.iter_num
    eval_due, hellaswag_due, snapshot_due = run.work_due(last_step)
    saving = eval_due and it > 0 and (cfg.always_save_checkpoint or last_step)  # step 0's weights are untrained
    if eval_due or hellaswag_due or snapshot_due:
        with log.paused():
            if eval_due:
                evaluate_and_keep_best(run)
            if hellaswag_due:
                score_hellaswag(run)
            if snapshot_due:
                snapshot_attention(run)
            run.work_done_at = it  # before ckpt.pt is written: a run resumed from it goes straight to the next step
            if saving:
                checkpoint(run, log)
    run.work_done_at = it
    return saving


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One optimizer step over the global batch at learning rate lr; returns this process's mean loss.

    The loss stays on the device (reading it would wait for the GPU). Every process draws the same
    global batch and takes micro-steps rank, rank + world_size, ...; DDP (or FSDP) averages the gradients.
    """
    cfg, ddp = run.cfg, run.ddp
    set_lr(run.optimizer, lr, cfg)
    run.step_lr = lr
    batch_size, seq_len = run.step_shape(run.iter_num)  # a ramp's, else batch_size and the model's block_size
    starts = run.data.random_starts("train", cfg.gradient_accumulation_steps * batch_size, seq_len, run.batch_gen)
    mine = starts.view(cfg.gradient_accumulation_steps, batch_size)[ddp.rank::ddp.world_size]
    total = torch.zeros((), device=run.device)
    for micro, micro_starts in enumerate(mine):
        x, y = (to_device(t, run.device) for t in run.data.batch("train", micro_starts, seq_len))
        # gradients are averaged across processes only on the last micro-step
        with run.gradient_sync(defer=micro < len(mine) - 1), run.ctx:
            _, loss = run.ddp_model(x, y)
            loss = loss / len(mine)
        run.scaler.scale(loss).backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    return total


def evaluate(run: Run) -> dict:
    """Estimate the train and val loss on fixed batches (each process its share), and log them."""
    losses = estimate_loss(run.compiled, run.data, run.cfg, run.device, run.ctx, run.eval_shares)
    run.last_eval = {"iter": run.iter_num, "val_loss": losses["val"], "eval_train_loss": losses["train"],
                     "val_bits_per_token": losses["val"] / math.log(2),
                     "lr": run.step_lr, "tokens_per_sec": run.tokens_per_sec}  # those of the last step taken
    run.tracker.log(run.last_eval)
    run.say(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if not math.isfinite(losses["val"]):
        raise blown_up(f"the validation loss became {losses['val']}", run)
    return run.last_eval


def evaluate_and_keep_best(run: Run):
    """An eval, then best.pt if it improved on the best so far (untrained weights at step 0 are never kept)."""
    val_loss = evaluate(run)["val_loss"]
    if run.iter_num > 0 and val_loss < run.best_val_loss:
        run.best_val_loss = val_loss
        save(run, best=True)


def score_hellaswag(run: Run) -> dict:
    """HellaSwag accuracy (completion style, data/hellaswag.py), each process its share of the examples.

    The eager model scores it: the examples' lengths all differ, which a compiled model would recompile for
    (under fsdp the blocks are compiled in place, so they are told to run eagerly for it).
    """
    with torch.compiler.set_stance("force_eager"):
        result = hellaswag.evaluate(run.model, run.hellaswag, run.data.tokenizer(), run.cfg.model.block_size,
                                    run.device, run.ctx, run.eval_shares, show_progress=run.ddp.is_main)
    run.tracker.log({"iter": run.iter_num, **result})
    run.say(f"step {run.iter_num}: hellaswag acc {result['hellaswag_acc']:.4f}, acc_norm "
            f"{result['hellaswag_acc_norm']:.4f} ({result['hellaswag_examples']:,} examples)")
    return result


def snapshot_attention(run: Run):
    """Dump the attention over the start of the validation split to out_dir/attention/iter_<n>/ and wandb;
    out_dir/attention/index.html slides over every snapshot so far.

    The text is the same at every step, so the dumps show how the heads form over the run; the cost
    is one forward over attn_probe_tokens tokens, and the pictures. Rank 0 draws; the others wait (under
    fsdp, with a copy of the weights gathered on its CPU).
    """
    cfg, val = run.cfg, run.data.tokens("val")
    n = min(cfg.attn_probe_tokens, cfg.model.block_size, len(val))
    if n == 0:
        return
    folder = Path(cfg.out_dir) / "attention" / f"iter_{run.iter_num}"
    model = run.inspectable_model()

    def draw():
        meta = {"iter": run.iter_num, "model_config": asdict(model.config), "tokenizer": run.data.tokenizer_spec,
                "source": f"the first {n} tokens of {run.data.folder.name}'s validation split"}
        from glimpse.viewer import write_snapshot_index  # matplotlib is imported only once a snapshot is drawn

        try:
            heads = dump_text(model, run.data.tokenizer(), val[:n].astype(np.int64), prompt_len=n, meta=meta,
                              folder=folder)
            write_snapshot_index(folder.parent)  # the slider over every snapshot so far, without wandb
        except OSError as e:
            raise GlimpseError(f"could not write the attention snapshot to {folder}: {e.strerror or e}") from None
        run.tracker.log_attention(folder, heads, step=run.iter_num)

    run.ddp.on_main(draw, f"drawing the attention snapshot of step {run.iter_num}")


def checkpoint(run: Run, log: StepLog):
    """ckpt.pt, carrying the loss of the steps taken since the last log step (a run stopped between log steps
    then logs, once resumed, the mean over the same steps as a run never stopped) and the clock of metrics.jsonl's
    train_seconds (which a resumed run's records go on from)."""
    run.unlogged_loss = log.unlogged(run.ddp)
    run.steps_seconds = log.seconds_before + log.steps_seconds()
    save(run)


def save(run: Run, best: bool = False):
    """Write ckpt.pt (best: best.pt) as the run stands. Every process calls it; rank 0 writes.

    Weights that are no longer finite are never saved, so the last good checkpoint survives a blow-up.
    Under fsdp every process first writes its shards of the training state (ckpt.dcp/), then rank 0 ckpt.pt.
    """
    finite = all(torch.isfinite(p).all() for p in run.local_parameters())
    if run.ddp.any(not finite):
        raise blown_up("the weights are no longer finite", run)
    path = best_path(run.cfg.out_dir) if best else checkpoint_path(run.cfg.out_dir)
    if run.cfg.fsdp and not best:
        run.save_sharded()
    state = run.weights_dict() if best else run.state_dict()

    def write():
        try:
            save_checkpoint(path, state)
        except OSError as e:
            raise GlimpseError(f"could not write {path}: {e.strerror or e}; the previous one is kept") from None

    run.ddp.on_main(write, f"writing {path}")


def final_eval(run: Run) -> dict:
    """Score the whole validation split in block_size windows, each process its share; log and return it. A
    finished run resumed returns the one it logged (Run.final_logged) instead: the same weights on the same data."""
    if (logged := run.final_logged) is not None:
        if logged:
            run.say(f"final val loss {logged['final_val_loss']:.4f} on the whole validation split, as the run logged "
                    f"it at step {logged['iter']:,} (metrics.jsonl): the same weights and data, not scored again")
        return logged
    val, block_size = run.data.tokens("val"), run.cfg.model.block_size
    # no gradients to keep, so eagerly bigger batches than training's (up to 4,096 tokens) run faster; a compiled
    # model keeps the evals' batch, whose graph it has
    eval_batch = run.cfg.batch_size if run.cfg.compile else max(run.cfg.batch_size, 4096 // block_size)
    with evaluating(run.model):
        loss, scored = length_loss(run.compiled, val, block_size, "windows", block_size, len(val), eval_batch,
                                   run.device, run.ctx, ddp=run.eval_shares, show_progress=run.ddp.is_main,
                                   desc="final val loss")
    final = {"iter": run.iter_num, "final_val_loss": loss, "final_val_bits_per_token": loss / math.log(2),
             "final_val_tokens": scored}
    run.tracker.log(final)
    run.say(f"final val loss {loss:.4f} on the whole validation split ({scored:,} tokens, {block_size}-token "
            "windows; why it differs from the evals' estimate: docs/training.md)")
    return final


def report_budget(run: Run):
    """Say how many steps the time budget bought (resumed runs included), and warn when that is far below what
    it was set to buy."""
    cfg, steps = run.cfg, run.iter_num
    if steps >= cfg.max_iters and run.train_seconds < cfg.max_time:  # the steps ran out first
        run.say(f"max_iters={cfg.max_iters:,} ended the run with {run.train_seconds:.1f} s of the {cfg.max_time:g} s "
                "budget spent" + (" (the learning rate decayed with the steps)" if cfg.max_iters > cfg.warmup_iters
                                  else ", still warming up"))
        return
    run.say(f"the {cfg.max_time:g} s budget bought {steps:,} steps")
    expected = round(cfg.budget_steps_per_s * cfg.max_time)  # what the budget buys at the rate it was set for
    if expected and steps < expected / 2 and run.iter_num < cfg.max_iters:
        run.say(f"warning: {steps:,} steps is far below the {expected:,} this budget buys on the machine it was set "
                "on (a busy or slower machine?), so expect a clearly worse model. For a result that does not depend "
                f"on the machine, give steps instead: --max_time=0 --max_iters={expected} --lr_decay_iters={expected}")


# what asks a training run for less memory (a one-line error names it when the device is full)
TOO_BIG = ("ask for less: a smaller --batch_size (more --gradient_accumulation_steps keep the tokens per step), "
           "--block_size or model (--n_layer, --n_embd)")


def main(argv: list[str] | None = None):
    with exit_when_done_under_torchrun(), user_errors(out_of_memory=TOO_BIG):
        cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv,
                           prog="train.py", description=__doc__, recorded=run_settings, fixed=RESUME_KEEPS)
        train(cfg)


if __name__ == "__main__":
    main()
