r"""
Train a GPT on a prepared dataset, on one CPU/GPU or many through torchrun.

    python train.py config/shakespeare_char_cpu.toml
    python train.py config/shakespeare_char.toml --max_iters=2000 --compile=true
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_cpu.toml \
        --batch_size=6 --gradient_accumulation_steps=2     # the same 12 sequences per step, in 2 processes
    python train.py config/finetune_shakespeare.toml   # finetune pretrained GPT-2 (--init_from=gpt2)
    python train.py --help              # every key, its default and meaning

Built-in datasets (shakespeare_char, shakespeare) are downloaded and prepared on first use. The run
writes out_dir/config.json (the resolved config), out_dir/metrics.jsonl (one JSON line per log and
per eval), out_dir/ckpt.pt (where training stands: what --init_from=resume continues) and
out_dir/best.pt (the weights with the lowest validation loss, which sample.py and eval.py read).
"""

# Reading order: train and loop -> Run and setup (what a run holds, and what its checkpoint holds; setup_data and
# build_model) ->
# the loop's steps: train_step, StepLog, evaluate, snapshot_attention, save, final_eval -> TimeBudget ->
# TrainConfig (the keys).

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import hellaswag
from data.dataset import TokenData
from data.prepare import ensure_dataset
from glimpse.attention import dump_text
from glimpse.checkpoint import (
    best_path,
    check_resume,
    checkpoint_path,
    load_checkpoint,
    rank_rng_state,
    restore_rank_rng,
    save_checkpoint,
    saved_rank_states,
)
from glimpse.config import config_values, nested, option, parse_config
from glimpse.errors import GlimpseError, user_errors
from glimpse.evaluation import estimate_loss, evaluating, length_loss
from glimpse.gpt2 import load_pretrained, pretrained_folder
from glimpse.optim import configure_optimizer, get_lr, ramp, set_lr
from glimpse.runtime import (
    Device,
    Distributed,
    Dtype,
    StopRequest,
    close_distributed,
    device_option,
    dtype_option,
    exit_when_done_under_torchrun,
    init_distributed,
    peak_flops,
    runtime,
    synchronize,
    to_device,
)
from glimpse.tracking import Tracker
from model import GPT, GPTConfig


def train(cfg: TrainConfig) -> dict:
    """Run training as cfg says; return the last evaluation ({'iter', 'train_loss', 'val_loss', ...})."""
    ddp = init_distributed(cfg.device)
    try:
        run = setup(cfg, ddp)
        try:
            return loop(run)
        finally:
            run.tracker.close()
    finally:
        close_distributed(ddp)


def loop(run: Run) -> dict:
    """Steps until max_iters or the time budget: evals, snapshots and checkpoints on their schedules."""
    cfg, ddp = run.cfg, run.ddp
    budget = TimeBudget(cfg.max_time, run.train_seconds, run.iter_num)
    resumed_at = run.iter_num if cfg.init_from == "resume" else None  # its eval is in metrics.jsonl already
    attn_every = cfg.eval_interval if cfg.attn_log_interval is None else cfg.attn_log_interval
    stop = StopRequest()  # SIGINT / SIGTERM: finish the step, checkpoint, exit 130 / 143
    bar = tqdm(total=cfg.max_iters, initial=run.iter_num, desc="train", unit="step", disable=not ddp.is_main,
               dynamic_ncols=True)
    log = StepLog(run.device)
    t_saved = time.time()
    try:
        while True:
            budget_used = budget.fraction(run.iter_num)
            lr = get_lr(run.iter_num, cfg, budget_used)
            last_step = run.iter_num >= cfg.max_iters or (budget_used is not None and budget_used >= 1.0)
            if (run.iter_num % cfg.eval_interval == 0 or last_step) and run.iter_num != resumed_at:
                if evaluate_and_save(run, last_step):
                    t_saved = time.time()
                log.pause()  # evaluation time does not count against throughput
            if run.hellaswag and (run.iter_num % cfg.hellaswag_interval == 0 or last_step) \
                    and run.iter_num != resumed_at:
                score_hellaswag(run)
                log.pause()
            if attn_every and (run.iter_num % attn_every == 0 or last_step) and run.iter_num != resumed_at:
                snapshot_attention(run)
                log.pause()
            if last_step:
                break

            t_step = time.perf_counter()
            log.tokens += math.prod(run.step_shape(run.iter_num)) * cfg.gradient_accumulation_steps
            log.loss_sum += train_step(run, lr)
            if cfg.max_time:
                synchronize(run.device)  # the budget counts the step's work, not the time to queue it
            budget.spent += time.perf_counter() - t_step
            run.train_seconds = budget.spent
            log.steps += 1
            bar.update(1)
            log_step = run.iter_num % cfg.log_interval == 0 or run.iter_num == cfg.max_iters
            if log_step:
                bar.set_postfix(log.write(run, lr, budget_used))

            # the processes must take the same decisions at the same step: under DDP they agree at log steps
            # only, in one small collective, rather than paying for one every step
            if not ddp.enabled or log_step:
                interval_due = bool(cfg.checkpoint_interval_s) and time.time() - t_saved >= cfg.checkpoint_interval_s
                stopping, saving, slowest = ddp.max([stop.signum is not None, interval_due, budget.spent])
                budget.agree(slowest, run.iter_num)
                if saving or stopping:
                    save(run)
                    t_saved = time.time()
                if stopping:
                    bar.close()
                    signum = stop.signum or signal.SIGTERM  # a process that got no signal itself stops as SIGTERM
                    run.say(f"stopped by {signal.Signals(signum).name} at step {run.iter_num}; checkpoint saved: "
                            "continue with --init_from=resume")
                    raise SystemExit(128 + signum)
    finally:
        stop.restore()
        bar.close()  # before any error message, so that the message is the last line
    if cfg.final_eval:
        run.last_eval = {**run.last_eval, **final_eval(run)}
    return run.last_eval


@dataclass
class Run:
    """A training run between steps: what it trains and with what, and how far it has got.

    Three names for the network, each for its callers:
      model      the module itself: its weights are saved, checked for finiteness and drawn in snapshots
                 (a compiled or DDP wrapper would put prefixes on every saved name)
      compiled   model, or torch.compile(model): evaluations call it, for the compiled speed without
                 DDP's gradient hooks
      ddp_model  compiled inside DDP under torchrun, else compiled itself: training steps call it, since
                 DDP averages the gradients across processes in backward
    """

    cfg: TrainConfig
    ddp: Distributed
    device: torch.device
    dtype: torch.dtype
    ctx: AbstractContextManager  # autocast to dtype (nothing for float32), entered around every forward
    data: TokenData
    model: GPT
    compiled: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16 only: scales the loss so that small gradients survive
    batch_gen: torch.Generator  # draws every training batch; the same on every process
    tracker: Tracker
    peak: float | None  # the device's peak FLOP/s at dtype, for MFU; None where it is not known
    pretrained: str | None = None  # the --init_from a finetuning run started from (gpt2, or a folder)
    hellaswag: list[hellaswag.Example] | None = None  # what --hellaswag_interval scores
    iter_num: int = 0
    best_val_loss: float = float("inf")
    train_seconds: float = 0.0  # time spent in training steps: the clock that max_time budgets
    step_lr: float = 0.0  # the learning rate of the last step taken, as the evals report it
    tokens_per_sec: float = 0.0  # over the last log interval
    last_eval: dict = field(default_factory=dict)

    @property
    def tokens_per_iter(self) -> int:
        return self.cfg.batch_size * self.cfg.model.block_size * self.cfg.gradient_accumulation_steps

    def step_shape(self, it: int) -> tuple[int, int]:
        """(sequences per micro-step, tokens per sequence) at step it: full size, or on their ramps."""
        return (ramp(it, self.cfg.batch_size, self.cfg.batch_warmup_iters),
                ramp(it, self.cfg.model.block_size, self.cfg.seq_warmup_iters))

    def say(self, text: str):
        if self.ddp.is_main:
            tqdm.write(text)

    def weights_dict(self) -> dict:
        """What best.pt holds: the weights and what sampling and evaluation need to use them."""
        return {"model": self.model.state_dict(), "model_config": asdict(self.model.config),
                "train_config": config_values(self.cfg), "tokenizer": self.data.tokenizer_spec,
                "iter_num": self.iter_num, "val_loss": self.last_eval.get("val_loss"),
                "wandb_run_id": self.tracker.run_id, "pretrained": self.pretrained}

    def state_dict(self) -> dict:
        """What ckpt.pt holds: everything a resumed run needs to continue as if it had never stopped.

        Every process calls it: each one's own random streams (its dropout masks) are gathered.
        """
        return {**self.weights_dict(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "best_val_loss": self.best_val_loss, "train_seconds": self.train_seconds,
                "rng": {"batches": self.batch_gen.get_state(), "ranks": self.ddp.gather(rank_rng_state(self.device))}}

    def load_state_dict(self, state: dict):
        """Continue from a ckpt.pt (older ones too: no scaler, one rank's streams)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iter_num, self.best_val_loss = state["iter_num"], state["best_val_loss"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.batch_gen.set_state(state["rng"]["batches"].cpu())
        ranks = saved_rank_states(state["rng"])
        if len(ranks) == self.ddp.world_size:
            restore_rank_rng(ranks[self.ddp.rank], self.device)
        else:  # another process count: no exact continuation, but each process still its own masks
            self.say(f"resuming {len(ranks)} process(es)' run in {self.ddp.world_size}: dropout masks are reseeded")
            torch.manual_seed(self.cfg.seed + self.ddp.rank + self.iter_num * self.ddp.world_size)


def setup(cfg: TrainConfig, ddp: Distributed) -> Run:
    """Everything a run needs before its first step: device, data, model, optimizer, tracker, and the
    checkpoint's state when resuming."""
    device, dtype, ctx = runtime(cfg.device, cfg.dtype, ddp.local_rank)
    if cfg.gradient_accumulation_steps % ddp.world_size:
        raise GlimpseError(
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
            f"the number of processes ({ddp.world_size}): each process takes an equal share"
        )
    out_dir = Path(cfg.out_dir)
    existing = [p for p in (checkpoint_path(out_dir), best_path(out_dir)) if p.exists()]
    if cfg.init_from != "resume" and existing:
        raise GlimpseError(f"{existing[0]} exists: continue it with --init_from=resume, or start fresh in another "
                           "--out_dir (or delete that one)")
    pretrained = cfg.init_from if cfg.init_from not in ("scratch", "resume") else None
    folder = pretrained_folder(pretrained) if pretrained else None  # a bad name fails before any data is prepared

    data, examples = setup_data(cfg, ddp)
    state = load_checkpoint(checkpoint_path(out_dir), device) if cfg.init_from == "resume" else None
    cfg, model, pretrained = build_model(cfg, data, state, pretrained, folder)
    model = model.to(device)
    compiled = torch.compile(model) if cfg.compile else model
    ddp_model = compiled
    if ddp.enabled:
        ddp_model = DDP(compiled, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    tracker = Tracker(
        out_dir / "metrics.jsonl", enabled=ddp.is_main, wandb_log=cfg.wandb_log, wandb_project=cfg.wandb_project,
        wandb_run_name=cfg.wandb_run_name, config=config_values(cfg),
        resume_run_id=state.get("wandb_run_id") if state else None,
        keep_through_iter=state["iter_num"] if state else None,
    )
    run = Run(cfg, ddp, device, dtype, ctx, data, model, compiled, ddp_model,
              optimizer=configure_optimizer(model, cfg, device),
              scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
              batch_gen=torch.Generator().manual_seed(cfg.seed), tracker=tracker,
              peak=peak_flops(device, dtype),  # None on CPU, MPS and unknown GPUs: no MFU rather than a guess
              pretrained=pretrained, hellaswag=examples)
    if state is not None:
        run.load_state_dict(state)
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # each process its own dropout masks
    run.step_lr = get_lr(run.iter_num, cfg)  # step 0's eval reports the rate its first step will take
    if ddp.is_main:
        (out_dir / "config.json").write_text(json.dumps(config_values(cfg), indent=1) + "\n", encoding="utf-8")
    run.say(f"{model.num_params() / 1e6:.2f}M parameters | {device} {str(dtype).removeprefix('torch.')} | "
            f"{ddp.world_size} process(es) | {run.tokens_per_iter:,} tokens per step"
            + (f" | MFU against a peak of {run.peak / 1e12:g} TFLOP/s per device" if run.peak else ""))
    return run


def setup_data(cfg: TrainConfig, ddp: Distributed) -> tuple[TokenData, list | None]:
    """The dataset, and the HellaSwag examples when they are scored: the first process of each machine
    prepares or downloads them while the others wait."""
    if ddp.local_rank == 0:
        ensure_dataset(cfg.dataset, cfg.data_dir)
        if cfg.hellaswag_interval:
            hellaswag.val_file(cfg.hellaswag_file, cfg.data_dir)
    ddp.barrier()
    data = TokenData(ensure_dataset(cfg.dataset, cfg.data_dir))
    data.check_block_size(cfg.model.block_size)
    examples = None
    if cfg.hellaswag_interval:
        examples = hellaswag.read_examples(hellaswag.val_file(cfg.hellaswag_file, cfg.data_dir))
        examples = hellaswag.first(examples, cfg.hellaswag_examples)
    return data, examples


def build_model(cfg: TrainConfig, data: TokenData, state: dict | None, pretrained: str | None, folder):
    """(the config as the run trains it, the model on the CPU, the pretrained model it started from or None):
    a new GPT of the model keys, pretrained GPT-2's shape and weights, or a checkpoint's shape to resume."""
    if pretrained and data.tokenizer_spec["kind"] != "gpt2":
        raise GlimpseError(f"--init_from={pretrained} reads GPT-2's BPE tokens, but dataset {cfg.dataset} is "
                           f"tokenized by {data.tokenizer_spec['kind']}: finetune on a GPT-2 BPE dataset, such as "
                           "--dataset=shakespeare")
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    if pretrained:
        model = load_pretrained(str(folder), block_size=cfg.model.block_size, dropout=cfg.model.dropout).train()
        for p in model.parameters():  # training rewrites every weight: own them, in the layout DDP's buckets expect
            p.data = p.data.contiguous()
        cfg = replace(cfg, model=replace(model.config))  # the run's config says what it trains: GPT-2's shape
    else:
        model_config = cfg.model_config(data.vocab_size)
        if state is not None:
            pretrained = state.get("pretrained")  # a finetuning run resumes with its pretrained model's shape
            if pretrained is not None:
                model_config = replace(GPTConfig(**state["model_config"]), block_size=cfg.model.block_size,
                                       dropout=cfg.model.dropout)
                cfg = replace(cfg, model=model_config)
            check_resume(state, model_config, cfg.optimizer, data.tokenizer_spec, data.folder)
        model = GPT(model_config)
    if model.config.vocab_size < data.vocab_size:
        raise GlimpseError(f"dataset {cfg.dataset} has {data.vocab_size} tokens, more than the model's "
                           f"{model.config.vocab_size}: finetune on a dataset of its tokenizer")
    return cfg, model, pretrained


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One optimizer step over the global batch at learning rate lr; returns this process's mean loss.

    The loss stays on the device (reading it would wait for the GPU). Every process draws the same
    global batch and takes micro-steps rank, rank + world_size, ...; DDP averages the gradients.
    """
    cfg, ddp = run.cfg, run.ddp
    set_lr(run.optimizer, lr, cfg)
    run.step_lr = lr
    batch_size, block_size = run.step_shape(run.iter_num)
    starts = run.data.random_starts("train", cfg.gradient_accumulation_steps * batch_size, block_size, run.batch_gen)
    mine = starts.view(cfg.gradient_accumulation_steps, batch_size)[ddp.rank::ddp.world_size]
    total = torch.zeros((), device=run.device)
    for micro, micro_starts in enumerate(mine):
        x, y = (to_device(t, run.device) for t in run.data.batch("train", micro_starts, block_size))
        # gradients are averaged across processes only on the last micro-step
        defer_sync = ddp.enabled and micro < len(mine) - 1
        with run.ddp_model.no_sync() if defer_sync else nullcontext(), run.ctx:
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


def blown_up(what: str, step: int) -> GlimpseError:
    """The error that stops a run whose loss or weights stopped being finite."""
    return GlimpseError(f"{what} at step {step}; the last good checkpoint is kept. Try a lower learning_rate, or "
                        "dtype=float32")


def throughput(run: Run) -> dict:
    """Model FLOPs utilisation at the last measured speed, {'mfu': share of the devices' combined peak}, or {}
    where the peak is not known."""
    if not run.peak:
        return {}
    return {"mfu": run.tokens_per_sec * run.model.flops_per_token() / (run.peak * run.ddp.world_size)}


class StepLog:
    """The training loss and speed between log steps, summed on the device so that steps need no host sync."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.tokens, self.since = 0, 0, time.time()

    def pause(self):
        """Leave the time since the last step out of the next speed (an eval, a snapshot)."""
        self.since = time.time()

    def write(self, run: Run, lr: float, budget_used: float | None) -> dict:
        """Log the mean loss and speed since the last log step; return what the progress bar shows."""
        train_loss = (run.ddp.mean(self.loss_sum) / self.steps).item()  # .item() waits for the device
        run.tokens_per_sec = self.tokens / (time.time() - self.since)
        record = {"iter": run.iter_num, "train_loss": train_loss, "lr": lr, "tokens_per_sec": run.tokens_per_sec,
                  **throughput(run)}
        if budget_used is not None:
            record["budget_used"] = budget_used  # the fraction of max_time this step's lr was set from
        run.tracker.log(record)
        if not math.isfinite(train_loss):
            raise blown_up(f"the training loss became {train_loss}", run.iter_num)
        self.loss_sum.zero_()
        self.steps, self.tokens, self.since = 0, 0, time.time()
        shown = {"loss": f"{train_loss:.4f}", "tok_s": f"{run.tokens_per_sec:,.0f}"}
        return shown | ({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})


def evaluate(run: Run) -> dict:
    """Estimate the train and val loss on fixed batches (each process its share), and log them."""
    losses = estimate_loss(run.compiled, run.data, run.cfg, run.device, run.ctx, run.ddp)
    run.last_eval = {"iter": run.iter_num, "val_loss": losses["val"], "eval_train_loss": losses["train"],
                     "val_bits_per_token": losses["val"] / math.log(2),
                     "lr": run.step_lr, "tokens_per_sec": run.tokens_per_sec}  # those of the last step taken
    run.tracker.log(run.last_eval)
    run.say(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if not math.isfinite(losses["val"]):
        raise blown_up(f"the validation loss became {losses['val']}", run.iter_num)
    return run.last_eval


def evaluate_and_save(run: Run, last_step: bool) -> bool:
    """An eval, then best.pt if it improved on the best so far, and ckpt.pt at every eval
    (always_save_checkpoint) or at the last one. True when ckpt.pt was written."""
    val_loss = evaluate(run)["val_loss"]
    if run.iter_num == 0:
        return False  # untrained weights: nothing worth keeping
    if val_loss < run.best_val_loss:
        run.best_val_loss = val_loss
        save(run, best=True)
    if run.cfg.always_save_checkpoint or last_step:
        save(run)
        return True
    return False


def score_hellaswag(run: Run) -> dict:
    """HellaSwag accuracy (completion style, data/hellaswag.py), each process its share of the examples.

    The eager model scores it: the examples' lengths all differ, which a compiled model would recompile for.
    """
    result = hellaswag.evaluate(run.model, run.hellaswag, run.data.tokenizer(), run.cfg.model.block_size,
                                run.device, run.ctx, run.ddp, show_progress=run.ddp.is_main)
    run.tracker.log({"iter": run.iter_num, **result})
    run.say(f"step {run.iter_num}: hellaswag acc {result['hellaswag_acc']:.4f}, acc_norm "
            f"{result['hellaswag_acc_norm']:.4f} ({result['hellaswag_examples']:,} examples)")
    return result


def snapshot_attention(run: Run):
    """Dump the attention over the start of the validation split to out_dir/attention/iter_<n>/ and wandb.

    The text is the same at every step, so the dumps show how the heads form over the run; the cost
    is one forward over attn_probe_tokens tokens, and the pictures. Rank 0 draws; the others wait.
    """
    cfg, val = run.cfg, run.data.tokens("val")
    n = min(cfg.attn_probe_tokens, cfg.model.block_size, len(val))
    if n == 0:
        return
    folder = Path(cfg.out_dir) / "attention" / f"iter_{run.iter_num}"

    def draw():
        meta = {"iter": run.iter_num, "model_config": asdict(run.model.config), "tokenizer": run.data.tokenizer_spec,
                "source": f"the first {n} tokens of {run.data.folder.name}'s validation split"}
        try:
            heads = dump_text(run.model, run.data.tokenizer(), val[:n].astype(np.int64), prompt_len=n, meta=meta,
                              folder=folder)
        except OSError as e:
            raise GlimpseError(f"could not write the attention snapshot to {folder}: {e.strerror or e}") from None
        run.tracker.log_attention(folder, heads, step=run.iter_num)

    run.ddp.on_main(draw, f"drawing the attention snapshot of step {run.iter_num}")


def save(run: Run, best: bool = False):
    """Write ckpt.pt (best: best.pt) as the run stands. Every process calls it; rank 0 writes.

    Weights that are no longer finite are never saved, so the last good checkpoint survives a blow-up.
    """
    finite = all(torch.isfinite(p).all() for p in run.model.parameters())
    if run.ddp.any(not finite):
        raise blown_up("the weights are no longer finite", run.iter_num)
    path = best_path(run.cfg.out_dir) if best else checkpoint_path(run.cfg.out_dir)
    state = run.weights_dict() if best else run.state_dict()

    def write():
        try:
            save_checkpoint(path, state)
        except OSError as e:
            raise GlimpseError(f"could not write {path}: {e.strerror or e}; the previous one is kept") from None

    run.ddp.on_main(write, f"writing {path}")


def final_eval(run: Run) -> dict:
    """Score the whole validation split in block_size windows, each process its share; log and return it."""
    val, block_size = run.data.tokens("val"), run.cfg.model.block_size
    # no gradients to keep, so bigger batches than training's (up to 4,096 tokens) run faster
    eval_batch = max(run.cfg.batch_size, 4096 // block_size)
    with evaluating(run.model):
        loss, scored = length_loss(run.compiled, val, block_size, "windows", block_size, len(val), eval_batch,
                                   run.device, run.ctx, ddp=run.ddp)
    final = {"iter": run.iter_num, "final_val_loss": loss, "final_val_bits_per_token": loss / math.log(2),
             "final_val_tokens": scored}
    run.tracker.log(final)
    run.say(f"final val loss {loss:.4f} on the whole validation split ({scored:,} tokens, {block_size}-token "
            "windows)")
    return final


class TimeBudget:
    """The max_time clock: seconds spent in training steps (evals, checkpoints and snapshots are off it).

    Every process must take the same learning rate and stop at the same step, but their clocks differ
    a little. So they agree on the slowest clock at log steps (every step when there is one process),
    and in between extend the agreed time by the seconds per step agreed so far.
    """

    def __init__(self, max_time: float, spent: float, iter_num: int):
        self.max_time, self.spent = max_time, spent  # spent: this process's own clock
        self.agreed, self.agreed_at = spent, iter_num
        self.start, self.start_at = spent, iter_num

    def agree(self, slowest: float, iter_num: int):
        self.agreed, self.agreed_at = slowest, iter_num

    def fraction(self, iter_num: int) -> float | None:
        """The share of the budget spent by step iter_num, the same on every process; None: no budget."""
        if not self.max_time:
            return None
        steps = self.agreed_at - self.start_at
        per_step = (self.agreed - self.start) / steps if steps else 0.0
        return (self.agreed + (iter_num - self.agreed_at) * per_step) / self.max_time


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = option("out", "folder for ckpt.pt, best.pt, config.json and metrics.jsonl")
    dataset: str = option("shakespeare_char", "dataset name: reads DATA_DIR/NAME/{train,val}.bin")
    data_dir: str = option("data", "folder that holds one sub-folder per dataset")
    init_from: str = option(
        "scratch", "scratch: a new model of the model keys; resume: continue out_dir/ckpt.pt; gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl, or a folder holding a Hugging Face GPT-2 config.json and model.safetensors: finetune "
        "pretrained GPT-2 (its shape; of the model keys only block_size, at most 1024, and dropout apply)"
    )
    # where it runs
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    compile: bool = option(False, "torch.compile the model: slower start, faster steps")
    seed: int = option(1337, "seeds weights, batches and dropout")
    # data
    batch_size: int = option(64, "sequences per micro-step (per process under DDP)")
    batch_warmup_iters: int = option(
        0, "grow the sequences per micro-step from a quarter of batch_size to all of it over this many steps, in "
        "eighths: cheaper steps early, when a rough gradient does as well (0: the full batch from the start)"
    )
    seq_warmup_iters: int = option(
        0, "grow the training sequences from a quarter of block_size to all of it over this many steps, in "
        "eighths: short contexts first, as modded-nanogpt's window schedule (0: full length from the start)"
    )
    gradient_accumulation_steps: int = option(
        1, "micro-steps per optimizer step, over all processes (must divide by the process count)"
    )
    # schedule
    max_iters: int = option(5000, "optimizer steps in total")
    max_time: float = option(
        0.0, "a time budget in seconds of training steps (evals, checkpoints and attention maps are off this clock): "
        "training stops when it is spent, and the cosine decay follows the fraction used, so the run ends fully "
        "decayed; 0: no budget, max_iters and lr_decay_iters rule"
    )
    eval_interval: int = option(250, "evaluate (and maybe checkpoint) every this many steps")
    eval_iters: int = option(200, "batches per split in each evaluation")
    log_interval: int = option(10, "log the training loss every this many steps")
    always_save_checkpoint: bool = option(
        True, "write ckpt.pt (what resuming needs) at every eval; false: only at the end, on a signal and every "
        "checkpoint_interval_s. Either way best.pt keeps the weights with the lowest val loss"
    )
    final_eval: bool = option(True, "after the last step, score the whole validation split and log final_val_loss")
    checkpoint_interval_s: float = option(
        0.0, "also checkpoint every this many seconds of training, whatever the val loss (0: only at evals)"
    )
    attn_log_interval: int | None = option(
        None, "dump attention maps of a fixed validation text every this many steps (none: at every eval; 0: never)"
    )
    attn_probe_tokens: int = option(64, "tokens of validation text in those maps (token labels show up to 64)")
    hellaswag_interval: int = option(
        0, "score HellaSwag (completion style) every this many steps and at the end, the examples split across "
        "processes; logs hellaswag_acc and hellaswag_acc_norm (0: never)"
    )
    hellaswag_file: str = option("", "a local hellaswag_val.jsonl (empty: downloaded once to DATA_DIR/hellaswag/)")
    hellaswag_examples: int = option(0, "score the first this many HellaSwag examples each time (0: all 10,042)")
    # optimizers and the learning-rate schedule
    optimizer: Literal["adamw", "muon"] = option(
        "adamw", "adamw: AdamW for every parameter; muon: Muon for the matrices inside the blocks (c_attn, c_proj, "
        "c_fc) and AdamW for embeddings, lm_head, norms and biases. Muon orthogonalises each momentum update with "
        "Newton-Schulz iterations, so that every direction of a matrix moves at a similar rate, not only the few "
        "that dominate the gradient. Needs PyTorch 2.9 or newer"
    )
    learning_rate: float = option(1e-3, "peak learning rate (AdamW's), reached after warmup")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warmup")
    lr_decay_iters: int = option(5000, "step at which the cosine decay reaches min_lr")
    weight_decay: float = option(
        0.1, "decoupled weight decay, on matrices only (not biases or norms); under optimizer=muon Muon's matrices "
        "take it too, times muon_lr"
    )
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    muon_lr: float = option(
        0.02, "Muon's peak learning rate (optimizer=muon); the schedule scales it as it scales learning_rate, so Muon "
        "and AdamW warm up and decay together"
    )
    muon_momentum: float = option(0.95, "Muon's momentum (Nesterov), optimizer=muon")
    muon_ns_steps: int = option(
        5, "Newton-Schulz iterations that orthogonalise each Muon update: fewer are cheaper and rougher"
    )
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0 turns clipping off")
    # model: GPTConfig's keys, with a smaller default than GPT-2's
    model: GPTConfig = nested(
        lambda: GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        "the network's shape (model.py's GPTConfig); each key is set by its own name, --n_layer=4 or n_layer = 4",
    )
    # wandb
    wandb_log: bool = option(False, "log config and scalars to wandb (WANDB_MODE=offline works)")
    wandb_project: str = option("glimpse", "wandb project")
    wandb_run_name: str = option("", "wandb run name (empty: wandb picks one)")

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "attn_probe_tokens", "hellaswag_interval",
                     "hellaswag_examples", "batch_warmup_iters", "seq_warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_time < 0:
            raise ValueError(f"max_time must not be negative, got {self.max_time}")
        if self.checkpoint_interval_s < 0:
            raise ValueError(f"checkpoint_interval_s must not be negative, got {self.checkpoint_interval_s}")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be positive; min_lr, grad_clip and weight_decay non-negative")
        if self.attn_log_interval is not None and self.attn_log_interval < 0:
            raise ValueError(f"attn_log_interval must be none, 0 (never) or positive, got {self.attn_log_interval}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.muon_ns_steps < 1:
            raise ValueError(f"muon_ns_steps must be at least 1, got {self.muon_ns_steps}")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_lr must be positive and muon_momentum in [0, 1), got {self.muon_lr} and "
                             f"{self.muon_momentum}")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer=muon needs torch.optim.Muon, which PyTorch 2.9 and newer have; this is "
                             f"PyTorch {torch.__version__}: upgrade it, or use optimizer=adamw")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The network to build: the model keys, and the dataset's vocabulary."""
        return replace(self.model, vocab_size=vocab_size)


def main(argv: list[str] | None = None):
    with exit_when_done_under_torchrun(), user_errors():
        cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv,
                           prog="train.py", description=__doc__)
        train(cfg)


if __name__ == "__main__":
    main()
