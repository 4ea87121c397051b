"""
A training run: what it holds between steps (Run, and what its checkpoint holds), and setting it up
(setup: the data, the model, the optimizer, the tracker, a resumed checkpoint's state). The data comes
from data/training_data.py, compiling from glimpse/compiling.py; the loop's bookkeeping between steps
is in glimpse/progress.py.

train.py runs the loop over these; bench_presets.py sets up a Run the same way to time train.py's own step.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import hellaswag
from data.dataset import TokenData, prepared_again
from data.training_data import setup_data
from glimpse.checkpoint import (
    best_path,
    checkpoint_path,
    load_checkpoint,
    parameter_count,
    rank_rng_state,
    restore_rank_rng,
    saved_rank_states,
)
from glimpse.compiling import (
    check_cuda_graphs,
    compile_ahead,
    compile_options,
    compile_static,
    raise_recompile_limit,
    step_shape,
)
from glimpse.config import config_values
from glimpse.distributed import Distributed, run_device
from glimpse.errors import GlimpseError, is_out_of_memory
from glimpse.files import write_text
from glimpse.gpt2 import FINETUNE_KEYS, check_finetune_tokenizer, finetune_ignores, load_pretrained, pretrained_folder
from glimpse.optim import configure_optimizer, get_lr, keeping_settings
from glimpse.run_folder import check_resumable, check_resume, check_steps_left
from glimpse.runtime import peak_flops, runtime
from glimpse.sharding import (
    check_fsdp,
    clear_sharded_slot,
    full_weights,
    load_sharded,
    local_parameters,
    next_sharded_slot,
    save_sharded,
    shard,
)
from glimpse.tracking import Tracker, read_records
from glimpse.train_config import TrainConfig
from model import GPT, GPTConfig


@dataclass
class Run:
    """A training run between steps: what it trains and with what, and how far it has got.

    Three names for the network, each for its callers:
      model      the module itself: its weights are saved, checked for finiteness and drawn in snapshots
                 (a compiled or DDP wrapper would put prefixes on every saved name); under fsdp it is
                 sharded in place, each parameter a DTensor of which each process holds a part
      compiled   model, or torch.compile(model) (under fsdp model itself, its blocks compiled in place):
                 evaluations call it, for the compiled speed without DDP's gradient hooks
      ddp_model  compiled inside DDP under torchrun, else compiled itself (and model under fsdp, which
                 needs no wrapper): training steps call it, since DDP averages the gradients across
                 processes in backward
    """

    cfg: TrainConfig
    ddp: Distributed  # the run's processes (rank, world size, collectives): under DDP, FSDP or one alone
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
    peak: float | None  # the device's peak FLOP/s at dtype, for MFU; None where it is not known
    # built last in setup, once nothing else can fail: on resume it rewrites metrics.jsonl to the checkpoint's step
    tracker: Tracker = field(default_factory=lambda: Tracker(None, enabled=False))
    wandb_run_id: str | None = None  # the checkpoint's: kept through a resume that does not log to wandb
    pretrained: str | None = None  # the --init_from a finetuning run started from (gpt2, or a folder)
    hellaswag: list[hellaswag.Example] | None = None  # what --hellaswag_interval scores
    iter_num: int = 0
    best_val_loss: float = float("inf")
    train_seconds: float = 0.0  # time spent in training steps: the clock that max_time budgets
    steps_seconds: float = 0.0  # at the last checkpoint, the loop's wall time less its pauses: metrics' train_seconds
    step_lr: float = 0.0  # the learning rate of the last step taken, as the evals report it
    unlogged_loss: tuple[float, int] = (0.0, 0)  # the loss summed over the steps since the last log step; their count
    tokens_per_sec: float = 0.0  # over the last log interval
    flops_per_sec: float = 0.0  # the model arithmetic of those tokens, at the sequence lengths they had
    last_eval: dict = field(default_factory=dict)
    # the step whose scheduled work (eval, best.pt, HellaSwag, snapshot) has run: a checkpoint taken between a
    # step and its work (a signal, checkpoint_interval_s) must not let the resumed run skip that work
    work_done_at: int = -1
    # a finished run resumed with no step left: the final eval it logged (metrics.jsonl's record; {} on the other
    # processes), which stands rather than being scored again; None when the run does its final eval
    final_logged: dict | None = None
    sharded_at: str | None = None  # fsdp: the folder of out_dir holding the training state ckpt.pt goes with

    @property
    def eval_shares(self) -> Distributed:
        """How evaluations share their batches out: one share per process, but under fsdp in lockstep, since every
        forward is a collective that all processes must join, and the shares (every world_size-th batch, window
        or example) do not always come out equal in number."""
        return replace(self.ddp, lockstep=True) if self.cfg.fsdp else self.ddp

    def gradient_sync(self, defer: bool) -> AbstractContextManager:
        """Around a micro-step's forward and backward: defer averaging the gradients across processes (to the
        last micro-step) when defer, as DDP's no_sync does; FSDP takes it as a setting instead."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(not defer)
            return nullcontext()
        return self.ddp_model.no_sync() if defer and self.ddp.enabled else nullcontext()

    def local_parameters(self) -> list[torch.Tensor]:
        """The parameters' values this process holds: all of them, or under fsdp its shards."""
        return local_parameters(self.model)

    def model_weights(self) -> dict:
        """The model's whole state dict; under fsdp gathered from every process onto rank 0's CPU, so that
        the other processes get {}. Every process calls it."""
        return full_weights(self.model) if self.cfg.fsdp else self.model.state_dict()

    def inspectable_model(self) -> GPT | None:
        """The model for what rank 0 runs alone (attention snapshots): model itself, or under fsdp, whose
        forward needs every process, a plain copy of the gathered weights on rank 0's CPU (None on the
        others). Every process calls it."""
        if not self.cfg.fsdp:
            return self.model
        weights = self.model_weights()
        return GPT.with_weights(self.model.config, weights).eval() if self.ddp.is_main else None

    def save_sharded(self):
        """fsdp: write the weights and optimizer state, each process its shards, to the folder of ckpt.dcp/ that
        the current ckpt.pt does not name; state_dict then names it. Every process calls it."""
        slot = next_sharded_slot(self.sharded_at)
        folder = Path(self.cfg.out_dir) / slot
        self.ddp.on_main(lambda: clear_sharded_slot(folder), f"clearing {folder}")
        save_sharded(folder, self.model, self.optimizer)
        self.sharded_at = slot

    @property
    def tokens_per_iter(self) -> int:
        return self.cfg.batch_size * self.cfg.model.block_size * self.cfg.gradient_accumulation_steps

    def step_shape(self, it: int) -> tuple[int, int]:
        return step_shape(self.cfg, it)

    def work_due(self, last_step: bool) -> tuple[bool, bool, bool]:
        """Whether an eval (and best.pt), a HellaSwag score and an attention snapshot are due at this step."""
        cfg, it = self.cfg, self.iter_num
        attn_every = cfg.eval_interval if cfg.attn_log_interval is None else cfg.attn_log_interval
        return (it % cfg.eval_interval == 0 or last_step,
                bool(self.hellaswag) and (it % cfg.hellaswag_interval == 0 or last_step),
                bool(attn_every) and (it % attn_every == 0 or last_step))

    def ended(self) -> str:
        """What ended the run at its step ("max_iters=5000", "max_time=60 s spent"), or "" while steps are left."""
        if self.iter_num >= self.cfg.max_iters:
            return f"max_iters={self.cfg.max_iters}"
        return f"max_time={self.cfg.max_time:g} s spent" if self.cfg.max_time and \
            self.train_seconds >= self.cfg.max_time else ""

    def say(self, text: str):
        """A line on stdout from the main process, above the bar, flushed: a log file or pipe gets it at once."""
        if self.ddp.is_main:
            tqdm.write(text)
            sys.stdout.flush()

    def weights_dict(self) -> dict:
        """What best.pt holds: the weights and what sampling and evaluation need to use them."""
        return {"model": self.model_weights(), "model_config": asdict(self.model.config),
                "train_config": config_values(self.cfg), "tokenizer": self.data.tokenizer_spec,
                "iter_num": self.iter_num, "val_loss": self.last_eval.get("val_loss"),
                "val_loss_step": self.last_eval.get("iter"),  # a checkpoint saved between evals holds an earlier one
                "wandb_run_id": self.tracker.run_id or self.wandb_run_id, "pretrained": self.pretrained,
                "dataset_prepared": self.data.prepared}  # eval.py says when the dataset was prepared again since

    def state_dict(self) -> dict:
        """What ckpt.pt holds: everything a resumed run needs to continue as if it had never stopped.

        Every process calls it: each one's own random streams (its dropout masks) are gathered. Under fsdp the
        optimizer state is not in it but in the folder save_sharded last wrote, which it names.
        """
        training = {"sharded": self.sharded_at} if self.cfg.fsdp else {"optimizer": self.optimizer.state_dict()}
        return {**self.weights_dict(), **training, "scaler": self.scaler.state_dict(),
                "best_val_loss": self.best_val_loss, "train_seconds": self.train_seconds,
                "steps_seconds": self.steps_seconds,
                "work_done": self.work_done_at == self.iter_num,
                "step_lr": self.step_lr, "tokens_per_sec": self.tokens_per_sec,  # what the step's eval reports
                "unlogged_loss": list(self.unlogged_loss),
                "rng": {"batches": self.batch_gen.get_state(), "ranks": self.ddp.gather(rank_rng_state(self.device))}}

    def load_state_dict(self, state: dict):
        """Continue from a ckpt.pt (older ones too: no scaler, one rank's streams). The weights and optimizer
        state of an fsdp run's come from the folder it names, on any process count, with fsdp or without."""
        if state.get("sharded"):
            with keeping_settings(self.optimizer):
                load_sharded(Path(self.cfg.out_dir) / state["sharded"], self.model, self.optimizer)
            self.sharded_at = state["sharded"]
        elif self.cfg.fsdp:
            raise GlimpseError(f"{checkpoint_path(self.cfg.out_dir)} was written without fsdp: resume it with "
                               "--fsdp=false, or start a new out_dir")
        else:
            try:
                self.model.load_state_dict(state["model"])
                with keeping_settings(self.optimizer):
                    self.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:  # a damaged or hand-edited ckpt.pt
                if is_out_of_memory(e):  # the run is fine: the device is full
                    raise
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise GlimpseError(f"{checkpoint_path(self.cfg.out_dir)} does not fit the run it would resume "
                                   f"({why}); start a new run in another --out_dir") from None
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iter_num, self.best_val_loss = state["iter_num"], state["best_val_loss"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.steps_seconds = state.get("steps_seconds", self.train_seconds)  # older checkpoints: the budget's clock
        self.wandb_run_id = state.get("wandb_run_id")
        # the rate and speed of the last step taken (older checkpoints: the rate the next step takes)
        self.step_lr = state.get("step_lr", get_lr(self.iter_num, self.cfg))
        self.tokens_per_sec = state.get("tokens_per_sec", 0.0)
        self.unlogged_loss = tuple(state.get("unlogged_loss", (0.0, 0)))
        # checkpoints from before the flag were only written after their step's work
        self.work_done_at = self.iter_num if state.get("work_done", True) else -1
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
    device, dtype, ctx = runtime(run_device(cfg.device, ddp), cfg.dtype, ddp.local_rank)
    if cfg.gradient_accumulation_steps % ddp.world_size:
        raise GlimpseError(
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
            f"the number of processes ({ddp.world_size}): each process takes an equal share"
        )
    check_cuda_graphs(cfg, ddp.world_size)
    if cfg.fsdp:  # before the weights and the data: a run refused here has nothing to read or fetch
        check_fsdp(dtype, resuming=cfg.init_from == "resume")
    out_dir = Path(cfg.out_dir)  # which train.py checked first (check_start), before any data or weights came
    pretrained = cfg.init_from if cfg.init_from not in ("scratch", "resume") else None
    folder = pretrained_folder(pretrained) if pretrained else None  # a Hub name's weights are fetched here

    data, examples = setup_data(cfg, ddp)
    state = None
    if cfg.init_from == "resume":  # under fsdp the weights come from the shards: the file's are mapped, not read
        state = load_checkpoint(checkpoint_path(out_dir), "cpu" if cfg.fsdp else device, mmap=cfg.fsdp)
        check_resumable(state, checkpoint_path(out_dir))
        check_steps_left(state, cfg.max_iters)
    asked = cfg.model  # the model keys as set: a finetuning run replaces them with the pretrained model's
    cfg, model, pretrained = build_model(cfg, data, state, pretrained, folder)
    model = model.to(device)
    if cfg.compile:  # Dynamo's limit is the process's, not torch.compile's: raised here, before anything compiles
        raise_recompile_limit(cfg)
    compiled = compile_static(model, cfg) if cfg.compile and not cfg.fsdp else model
    ddp_model = compiled
    if cfg.fsdp:  # compiled block by block, if at all: FSDP's hooks between the blocks run eagerly
        shard(model, model.transformer.h, device, compile_options(cfg) if cfg.compile else None)
    elif ddp.enabled:
        ddp_model = DDP(compiled, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    run = Run(cfg, ddp, device, dtype, ctx, data, model, compiled, ddp_model,
              optimizer=configure_optimizer(model, cfg, device),
              scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
              batch_gen=torch.Generator().manual_seed(cfg.seed),
              peak=peak_flops(device, dtype),  # None on CPU, MPS and unknown GPUs: no MFU rather than a guess
              pretrained=pretrained, hellaswag=examples)
    if state is not None:
        run.load_state_dict(state)
        # the best so far is also best.pt's own loss: best.pt may be newer than ckpt.pt (always_save_checkpoint=false,
        # a run killed between checkpoints), and a resumed run that does not retrace its steps exactly (a time
        # budget) must not replace it with a worse one. A best.pt that cannot be read is replaced at the next best
        with contextlib.suppress(GlimpseError):
            best = load_checkpoint(best_path(out_dir), "cpu", mmap=True).get("val_loss")
            run.best_val_loss = min(run.best_val_loss, best if best is not None else math.inf)
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # each process its own dropout masks
        run.step_lr = get_lr(0, cfg)  # step 0's eval reports the rate its first step will take
    run.say(f"{parameter_count(model.num_params())} parameters | "
            f"{device} {str(dtype).removeprefix('torch.')} | "
            f"{ddp.world_size} process(es) | {run.tokens_per_iter:,} tokens per step"
            + (f" | MFU against a peak of {run.peak / 1e12:g} TFLOP/s per device" if run.peak else ""))
    ignored = finetune_ignores(model.config, asked, TrainConfig().model) if pretrained else []
    if ignored:
        run.say(f"note: finetuning trains {pretrained}'s shape, so {', '.join(ignored)} did not apply (of the model "
                f"keys, only {' and '.join(FINETUNE_KEYS)} do)")
    if pretrained and asked.block_size > model.config.block_size:  # a preset's 256 beside a model of 64 positions
        run.say(f"note: block_size={asked.block_size} is longer than {pretrained}'s {model.config.block_size} learned "
                f"positions, so the run trains at {model.config.block_size}")
    if cfg.compile:
        compile_ahead(run.ddp_model, run.optimizer, cfg, run.iter_num, device, ctx)
    # a checkpoint taken before its step's work: the resumed run does that step's eval, HellaSwag score and
    # snapshot, those due there, logging them at the checkpoint's step again
    due = run.work_due(bool(run.ended())) if state and run.work_done_at != run.iter_num else (False, False, False)
    # a finished run resumed (a job launched again after it ended): its final eval, logged at this step on the same
    # data, stands, rather than the same weights scored again into a wandb run of their own
    logged = final_logged(run, state) if ddp.is_main and state and run.ended() and cfg.final_eval else None
    run.final_logged = (logged or {}) if ddp.any(logged is not None) else None  # every process skips it alike
    # the run's files, only now that nothing before can fail: a resume that stops on a bad flag keeps them whole;
    # the Tracker first, whose wandb may refuse to start (no login), before it or config.json touches a file
    run.tracker = Tracker(
        out_dir / "metrics.jsonl", enabled=ddp.is_main, wandb_log=cfg.wandb_log, wandb_project=cfg.wandb_project,
        wandb_run_name=cfg.wandb_run_name, config=config_values(cfg), resume_run_id=run.wandb_run_id,
        keep_through_iter=state["iter_num"] if state else None,
        redone=tuple(key for key, is_due in zip(("val_loss", "hellaswag_acc"), due) if is_due),
        keep_final=run.final_logged is not None,
        logs_at_checkpoint=any(due) or bool(state and run.ended() and cfg.final_eval and run.final_logged is None),
        draw_losses=True,
    )
    if ddp.is_main:
        try:
            write_text(out_dir / "config.json", json.dumps(config_values(cfg), indent=1) + "\n")
        except GlimpseError:
            run.tracker.close()
            raise
    if state is not None:
        resumed(run, state["train_config"], state.get("dataset_prepared"))
    return run


def resumed(run: Run, saved: dict, prepared: dict | None):
    """What resuming does beyond loading the checkpoint: the old run's attention snapshots after it go, as its
    records after it did from metrics.jsonl; and the run says where it goes on from and what it does differently
    from the run it resumes (saved: that run's train config; prepared: its dataset's preparation, None before
    checkpoints kept it)."""
    run.say(f"resumed from {checkpoint_path(run.cfg.out_dir)} at step {run.iter_num:,}"
            + (f" (best val loss so far {run.best_val_loss:.4f})" if math.isfinite(run.best_val_loss) else ""))
    if ended := run.ended():
        run.say(f"note: the run had ended there ({ended}), so no step is left to train: raise --max_iters (or "
                "--max_time) to train on")
    if steps := run.tracker.dropped_steps:
        run.say(f"dropped metrics.jsonl's records of step{'s' if len(steps) > 1 else ''} {steps[0]:,}"
                + (f" to {steps[-1]:,}" if len(steps) > 1 else "") + ", logged after the checkpoint: the steps from "
                "it are retraced")
    snapshots = Path(run.cfg.out_dir) / "attention"
    if run.ddp.is_main and snapshots.is_dir():
        from glimpse.viewer import drop_snapshots_after  # matplotlib is imported only by runs that have snapshots

        if dropped := drop_snapshots_after(snapshots, run.iter_num):
            run.say(f"dropped the attention snapshots of steps {', '.join(map(str, dropped))}, taken after the "
                    "checkpoint: the steps from it are retraced")
    if run.tracker.left_wandb_run:
        old_id, logged_to = run.tracker.left_wandb_run
        where = "past the checkpoint" if logged_to > run.iter_num else "the checkpoint's, which this run logs again"
        run.say(f"wandb: run {old_id} logged up to step {logged_to:,}, {where}, and a resumed wandb run takes only "
                f"steps after its last: this run goes on in a new wandb run, {run.tracker.run_id}")
    settings = config_values(run.cfg)
    named_apart = ("init_from", "out_dir", "data_dir", "dataset")  # the dataset's move has a note of its own
    if moved := [f"{key} {json.dumps(saved[key])} -> {json.dumps(value)}" for key, value in settings.items()
                 if key in saved and saved[key] != value and key not in named_apart]:
        run.say(f"changed since the checkpoint: {', '.join(moved)}")
    changed = [key for key in ("eval_iters", "batch_size", "seed") if key in saved and saved[key] != settings[key]]
    was, now = dataset_folders(run.cfg, saved)
    best = (", and best.pt is replaced only by a loss on its validation split below the best so far on the other's"
            if math.isfinite(run.best_val_loss) else "")
    if was.resolve() != now.resolve():  # allowed (the tokenizer is the same), but no longer the run it resumes
        run.say(f"note: dataset {was} -> {now} since the checkpoint: the run goes on training on another corpus{best}")
    elif changes := prepared_again(prepared, run.data.prepared):  # the same folder, prepared again, same tokenizer
        run.say(f"note: dataset {now} was prepared again since the checkpoint ({changes}): the run goes on training "
                f"on other batches{best}")
    if changed and math.isfinite(run.best_val_loss):  # the evals' batches are drawn from these three
        run.say(f"note: with {' and '.join(changed)} changed, the evals now score other batches than the best so far "
                "was scored on, so best.pt is replaced only by a loss below it on the new ones")


def dataset_folders(cfg: TrainConfig, saved: dict) -> tuple[Path, Path]:
    """(the dataset folder a checkpoint's run trained on, by its train config saved; the one cfg trains on)."""
    was = Path(saved.get("data_dir", cfg.data_dir)) / saved.get("dataset", cfg.dataset)
    return was, Path(cfg.data_dir) / cfg.dataset


def final_logged(run: Run, state: dict) -> dict | None:
    """The final eval metrics.jsonl holds at the checkpoint's step, when the data is the one it scored (the same
    folder, not prepared again since): None when there is none to stand for a new one."""
    was, now = dataset_folders(run.cfg, state["train_config"])
    if was.resolve() != now.resolve() or prepared_again(state.get("dataset_prepared"), run.data.prepared):
        return None
    path = Path(run.cfg.out_dir) / "metrics.jsonl"
    records = read_records(path) if path.is_file() else []
    return next((r for r in reversed(records) if r["iter"] == run.iter_num
                 and isinstance(r.get("final_val_loss"), float)), None)  # a NaN loss was written as null


def build_model(cfg: TrainConfig, data: TokenData, state: dict | None, pretrained: str | None, folder):
    """(the config as the run trains it, the model on the CPU, the pretrained model it started from or None):
    a new GPT of the model keys, pretrained GPT-2's shape and weights, or a checkpoint's shape to resume."""
    if pretrained:
        check_finetune_tokenizer(pretrained, folder, data.tokenizer_spec, cfg.dataset)
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
