"""
The training loop's bookkeeping: StepLog for the loss and speed between log steps, TimeBudget for
max_time, the progress bar, MFU, and the error that stops a run whose numbers blew up.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from glimpse.checkpoint import best_path, checkpoint_path
from glimpse.errors import GlimpseError
from glimpse.runtime import synchronize
from glimpse.train_config import TrainConfig

if TYPE_CHECKING:
    from glimpse.distributed import Distributed
    from glimpse.run import Run


def blown_up(what: str, run: Run) -> GlimpseError:
    """The error that stops a run whose loss or weights stopped being finite, with the advice that fits it."""
    kept = [str(p) for p in (checkpoint_path(run.cfg.out_dir), best_path(run.cfg.out_dir)) if p.exists()]
    saved = f"{' and '.join(kept)} kept as {'they were' if len(kept) > 1 else 'it was'}" if kept else \
        "no checkpoint had been written yet"
    advice = "Try a lower learning_rate" + (", or dtype=float32" if run.dtype != torch.float32 else "")
    return GlimpseError(f"{what} at step {run.iter_num}; {saved}. {advice}")


def throughput(run: Run) -> dict:
    """Model FLOPs utilisation at the last measured speed, {'mfu': share of the devices' combined peak}, or {}
    where the peak is not known."""
    if not run.peak:
        return {}
    return {"mfu": run.flops_per_sec / (run.peak * run.ddp.world_size)}


class StepLog:
    """The training loss and speed between log steps, summed on the device so that steps need no host sync."""

    def __init__(self, device: torch.device, clock=time.time, unlogged_loss: tuple[float, int] = (0.0, 0),
                 seconds_before: float = 0.0):
        """unlogged_loss: a resumed run's loss summed over the steps its checkpoint took since their last log step,
        and how many they were, so that its first record averages the same steps as a run never stopped;
        seconds_before, the seconds of training its checkpoint had taken, which each record's train_seconds adds."""
        self.device, self.clock, self.seconds_before = device, clock, seconds_before
        self.loss_sum = torch.tensor(unlogged_loss[0], dtype=torch.float32, device=device)
        self.steps, self.tokens, self.flops, self.since, self.away = unlogged_loss[1], 0, 0, clock(), 0.0
        self.started, self.away_in_all = self.since, 0.0  # for the steps' time over the whole loop
        self.pause_started: float | None = None  # the clock when the pause under way began
        self.flops_per_token = {}  # seq_len -> the model's FLOPs per token: counted once, not at every step

    def count(self, run: Run, it: int):
        """Count step it's tokens (all processes') and their model FLOPs, at the step's own sequence length."""
        batch_size, seq_len = run.step_shape(it)
        tokens = batch_size * seq_len * run.cfg.gradient_accumulation_steps
        self.tokens += tokens
        if seq_len not in self.flops_per_token:
            self.flops_per_token[seq_len] = run.model.flops_per_token(seq_len)
        self.flops += tokens * self.flops_per_token[seq_len]

    @contextmanager
    def paused(self):
        """Leave the block's time (an eval, a snapshot, a checkpoint) out of the speed of the steps around it."""
        synchronize(self.device)  # the steps queued before the pause are the steps' time, not the pause's
        start = self.pause_started = self.clock()
        try:
            yield
        finally:
            self.away += self.clock() - start
            self.away_in_all += self.clock() - start
            self.pause_started = None

    def steps_seconds(self) -> float:
        """The seconds the loop has spent in training steps since it started: its wall time, less the pauses (the
        one under way too, for a checkpoint written in it). The steps' queued GPU work counts as theirs (each pause
        waits for it first, and so does this)."""
        synchronize(self.device)
        now = self.clock()
        pausing = now - self.pause_started if self.pause_started is not None else 0.0
        return now - self.started - self.away_in_all - pausing

    def unlogged(self, ddp: Distributed) -> tuple[float, int]:
        """The loss summed over the steps since the last log step (its mean over the processes), and their count:
        what a checkpoint carries to the resumed run. Every process calls it."""
        return ddp.mean(self.loss_sum).item(), self.steps

    def write(self, run: Run, lr: float, budget_used: float | None) -> dict:
        """Log the mean loss and speed since the last log step; return what the progress bar shows."""
        train_loss = (run.ddp.mean(self.loss_sum) / self.steps).item()  # .item() waits for the device
        seconds = self.clock() - self.since - self.away
        run.tokens_per_sec, run.flops_per_sec = self.tokens / seconds, self.flops / seconds
        record = {"iter": run.iter_num, "train_loss": train_loss, "lr": lr, "tokens_per_sec": run.tokens_per_sec,
                  **throughput(run), "train_seconds": self.seconds_before + self.steps_seconds()}  # the x of a speedrun
        if budget_used is not None:
            record["budget_used"] = budget_used  # the fraction of max_time spent before this step
        run.tracker.log(record)
        if not math.isfinite(train_loss):
            raise blown_up(f"the training loss became {train_loss}", run)
        self.loss_sum.zero_()
        self.steps, self.tokens, self.flops, self.since, self.away = 0, 0, 0, self.clock(), 0.0
        shown = {"loss": f"{train_loss:.4f}", "tok_s": f"{run.tokens_per_sec:,.0f}"}
        return shown | ({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})


def progress_bar(cfg: TrainConfig, run: Run, show: bool) -> tqdm:
    """The training bar: in steps, or under a time budget in its seconds, so that the time left it shows is the
    budget's rather than max_iters' (a preset's budget ends long before its max_iters).

    Drawn on a terminal only (tqdm's disable=None): into a log file or a pipe its redraws pile up, and report_step
    prints a line per log step there instead."""
    hidden = None if show else True
    if cfg.max_time:
        return tqdm(total=cfg.max_time, initial=min(run.train_seconds, cfg.max_time), desc="train", disable=hidden,
                    dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of steps "
                                                   "[{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.max_iters, initial=run.iter_num, desc="train", unit="step", disable=hidden,
                dynamic_ncols=True)


def report_step(bar: tqdm, run: Run, shown: dict):
    """A log step's numbers (StepLog.write's): on the bar, or where none is drawn, one line from the main process,
    beside the evals' lines."""
    if not bar.disable:
        bar.set_postfix(({"step": run.iter_num} if run.cfg.max_time else {}) | shown)  # the bar counts seconds
    else:
        cfg, mfu = run.cfg, f", {shown['mfu']} MFU" if "mfu" in shown else ""
        if cfg.max_time:
            left = f", {min(run.train_seconds, cfg.max_time):.1f}/{cfg.max_time:g} s of steps"
        else:  # the steps to go at the run's mean seconds per step so far, as the bar's estimate does
            steps_left = cfg.max_iters - run.iter_num
            left = f", about {duration(steps_left * run.train_seconds / run.iter_num)} of steps left" \
                if steps_left > 0 and run.train_seconds > 0 else ""
        run.say(f"step {run.iter_num}: loss {shown['loss']}, {shown['tok_s']} tokens/s{mfu}{left}")


def duration(seconds: float) -> str:
    """A time to go, as rounded as an estimate is: 45 s, 12 min, 2.5 h."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


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
