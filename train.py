"""
Train a GPT on a prepared dataset, on one CPU/GPU or many through torchrun.

    python train.py config/shakespeare_char_cpu.toml
    python train.py config/shakespeare_char.toml --max_iters=2000 --compile=true
    torchrun --standalone --nproc_per_node=2 train.py config/shakespeare_char_cpu.toml \
        --batch_size=6 --gradient_accumulation_steps=2     # the same 12 sequences per step, in 2 processes
    python train.py --help              # every key, its default and meaning

Built-in datasets (shakespeare_char, shakespeare) are downloaded and prepared on first use. The run
writes out_dir/config.json (the resolved config), out_dir/metrics.jsonl (one JSON line per log and
per eval) and out_dir/ckpt.pt (everything needed to sample from it or resume it).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.dataset import TokenData
from data.prepare import ensure_dataset
from glimpse.attention import dump_text
from glimpse.checkpoint import (
    check_resume,
    checkpoint_path,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from glimpse.config import option, parse_config
from glimpse.errors import GlimpseError, user_errors
from glimpse.evaluation import estimate_loss, length_loss
from glimpse.optim import configure_optimizer, get_lr, set_lr
from glimpse.runtime import (
    Device,
    Dtype,
    StopRequest,
    autocast,
    close_distributed,
    device_option,
    dtype_option,
    init_distributed,
    peak_flops,
    resolve_device,
    resolve_dtype,
)
from glimpse.tracking import Tracker
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = option("out", "folder for ckpt.pt, config.json and metrics.jsonl")
    dataset: str = option("shakespeare_char", "dataset name: reads DATA_DIR/NAME/{train,val}.bin")
    data_dir: str = option("data", "folder that holds one sub-folder per dataset")
    init_from: Literal["scratch", "resume"] = option("scratch", "start fresh, or resume out_dir/ckpt.pt")
    # where it runs
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    compile: bool = option(False, "torch.compile the model: slower start, faster steps")
    seed: int = option(1337, "seeds weights, batches and dropout")
    # data
    batch_size: int = option(64, "sequences per micro-step (per process under DDP)")
    block_size: int = option(256, "context length in tokens")
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
    always_save_checkpoint: bool = option(True, "checkpoint at every eval, not only when val loss improves")
    final_eval: bool = option(True, "after the last step, score the whole validation split and log final_val_loss")
    checkpoint_interval_s: float = option(
        0.0, "also checkpoint every this many seconds of training, whatever the val loss (0: only at evals)"
    )
    attn_log_interval: int | None = option(
        None, "dump attention maps of a fixed validation text every this many steps (none: at every eval; 0: never)"
    )
    attn_probe_tokens: int = option(64, "tokens of validation text in those maps (token labels show up to 64)")
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
    # model
    n_layer: int = option(6, "transformer blocks")
    n_head: int = option(6, "attention heads per block")
    n_embd: int = option(384, "width of the residual stream")
    dropout: float = option(0.2, "dropout probability while training")
    bias: bool = option(True, "biases in Linear and LayerNorm layers, as GPT-2 has them")
    attn_score: Literal["scaled_dot", "dot", "additive"] = option(
        "scaled_dot", "how queries score keys: softmax(QK^T/sqrt(d)), unscaled QK^T (both on the fused fast "
        "path), or Bahdanau's v^T tanh(W_q q + W_k k) (explicit path only: slow, memory grows as T^2 x head size)"
    )
    pos_encoding: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = option(
        "learned", "where position information comes from: GPT-2's learned table (stops at block_size), fixed "
        "sinusoids, rotary (RoPE), ALiBi's distance penalty, or none (only the causal mask)"
    )
    norm: Literal["layernorm", "rmsnorm"] = option(
        "layernorm", "the normalisation before attention, the MLP and the head: GPT-2's LayerNorm, or RMSNorm "
        "(divide by the root mean square, times a learned gain; no mean subtracted, no bias), as LLaMA and most "
        "later models have it"
    )
    activation: Literal["gelu", "relu2"] = option(
        "gelu", "the MLP's nonlinearity: GPT-2's tanh GELU, or ReLU squared (relu(x)^2, from the Primer paper, "
        "used by modded-nanogpt)"
    )
    qk_norm: bool = option(
        False, "RMS-normalise each head's queries and keys (learned gain per channel) before rotary and the scores: "
        "the logits are then bounded by the gains, not by how large queries and keys grow, a guard against the "
        "logit growth reported to destabilise training at high learning rates"
    )
    tie_embeddings: bool = option(
        True, "the output head shares the token-embedding matrix, as in GPT-2; false gives lm_head a matrix of its "
        "own (vocab_size x n_embd more parameters), so reading a token and predicting it can differ"
    )
    zero_init_proj: bool = option(
        False, "start the projections that write into the residual stream (attn.c_proj, mlp.c_proj) at zero, so "
        "every block starts as the identity and learns what to add; false: GPT-2's small random start"
    )
    # wandb
    wandb_log: bool = option(False, "log config and scalars to wandb (WANDB_MODE=offline works)")
    wandb_project: str = option("glimpse", "wandb project")
    wandb_run_name: str = option("", "wandb run name (empty: wandb picks one)")

    def __post_init__(self):
        for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval",
                     "eval_iters", "log_interval", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "attn_probe_tokens"):
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
        self.model_config(vocab_size=1)  # checks the model's shape (n_embd vs n_head, dropout)

    def model_config(self, vocab_size: int) -> GPTConfig:
        # every GPTConfig field but vocab_size (the dataset's) is a key of the same name here
        shape = {f.name: getattr(self, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}
        return GPTConfig(vocab_size=vocab_size, **shape)


def train(cfg: TrainConfig) -> dict:
    """Run training as cfg says; return the last evaluation ({'iter', 'train_loss', 'val_loss', ...})."""
    ddp = init_distributed(cfg.device)
    try:
        return _train(cfg, ddp)
    finally:
        close_distributed(ddp)


def _train(cfg: TrainConfig, ddp) -> dict:
    device = resolve_device(cfg.device, ddp.local_rank)
    dtype = resolve_dtype(cfg.dtype, device)
    ctx = autocast(device, dtype)
    if cfg.gradient_accumulation_steps % ddp.world_size:
        raise GlimpseError(
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
            f"the number of processes ({ddp.world_size}): each process takes an equal share"
        )
    micro_steps = cfg.gradient_accumulation_steps // ddp.world_size  # this process's share
    out_dir = Path(cfg.out_dir)
    if cfg.init_from == "scratch" and checkpoint_path(out_dir).exists():
        raise GlimpseError(f"{checkpoint_path(out_dir)} exists: continue it with --init_from=resume, or start "
                           "fresh in another --out_dir (or delete that one)")

    # data: the first process of each machine prepares a built-in dataset while the others wait
    if ddp.local_rank == 0:
        ensure_dataset(cfg.dataset, cfg.data_dir)
    ddp.barrier()
    data = TokenData(ensure_dataset(cfg.dataset, cfg.data_dir))
    data.check_block_size(cfg.block_size)

    # model, optimizer and the random streams, fresh or from the checkpoint
    state = load_checkpoint(checkpoint_path(out_dir), device) if cfg.init_from == "resume" else None
    model_config = cfg.model_config(data.vocab_size)
    if state is not None:
        check_resume(state, model_config, cfg.optimizer, data.tokenizer_spec, data.folder)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = GPT(model_config).to(device)
    optimizer = configure_optimizer(model, cfg, device)
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # draws every training batch
    iter_num, best_val_loss = 0, float("inf")
    train_seconds = 0.0  # time spent in training steps: the clock that max_time budgets
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
        train_seconds = state.get("train_seconds", 0.0)
        restore_rng(state["rng"], batch_gen, device)
    else:
        torch.manual_seed(cfg.seed + ddp.rank)  # each process its own dropout masks
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fast_model = torch.compile(model) if cfg.compile else model
    step_model = fast_model
    if ddp.enabled:
        step_model = DDP(fast_model, device_ids=[ddp.local_rank] if device.type == "cuda" else None)

    tracker = Tracker(
        out_dir / "metrics.jsonl", enabled=ddp.is_main, wandb_log=cfg.wandb_log, wandb_project=cfg.wandb_project,
        wandb_run_name=cfg.wandb_run_name, config=asdict(cfg),
        resume_run_id=state.get("wandb_run_id") if state else None,
        keep_through_iter=iter_num if state else None,
    )
    if ddp.is_main:
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n", encoding="utf-8")
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    say = tqdm.write if ddp.is_main else (lambda *_: None)
    peak = peak_flops(device, dtype)  # None on CPU, MPS and unknown GPUs: then no MFU at all, not a guess
    flops_per_token = model.flops_per_token() if peak else 0  # the model's shape is fixed: count once
    say(f"{model.num_params() / 1e6:.2f}M parameters | {device} {str(dtype).removeprefix('torch.')} | "
        f"{ddp.world_size} process(es) | {tokens_per_iter:,} tokens per step"
        + (f" | MFU against a peak of {peak / 1e12:g} TFLOP/s per device" if peak else ""))

    def save(val_loss: float | None):
        """Checkpoint the run as it stands (rank 0 only); weights that are no longer finite are never saved."""
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise GlimpseError(f"the weights are no longer finite at step {iter_num}; the last good checkpoint "
                               "is kept. Try a lower learning_rate, or dtype=float32")
        save_checkpoint(checkpoint_path(out_dir), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": asdict(model_config), "train_config": asdict(cfg), "tokenizer": data.tokenizer_spec,
            "iter_num": iter_num, "best_val_loss": best_val_loss, "val_loss": val_loss,
            "wandb_run_id": tracker.run_id, "rng": rng_state(batch_gen, device), "train_seconds": train_seconds,
        })

    stop = StopRequest()  # SIGINT / SIGTERM: finish the step, checkpoint, exit 130 / 143
    bar = tqdm(total=cfg.max_iters, initial=iter_num, desc="train", unit="step", disable=not ddp.is_main,
               dynamic_ncols=True)
    t_saved = time.time()
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    t_log, iters_since_log, tokens_per_sec, last_eval = time.time(), 0, 0.0, {}
    resumed_at = iter_num if state is not None else None  # its eval is in metrics.jsonl already
    step_lr = get_lr(0, cfg)  # read only by step 0's eval: a resumed run takes a step before its next eval
    try:
        while True:
            budget_used = train_seconds / cfg.max_time if cfg.max_time else None
            # under DDP the processes' clocks differ a little: all follow the slowest, to stop together
            budget_used = ddp.max(budget_used) if budget_used is not None else None
            lr = get_lr(iter_num, cfg, budget_used)
            last_step = iter_num >= cfg.max_iters or (budget_used is not None and budget_used >= 1.0)
            if (iter_num % cfg.eval_interval == 0 or last_step) and iter_num != resumed_at:
                losses = estimate_loss(fast_model, data, cfg, device, ctx, ddp)
                # lr and tokens_per_sec are those of the last step taken, as in the step record of this iter
                last_eval = {"iter": iter_num, "val_loss": losses["val"], "eval_train_loss": losses["train"],
                             "val_bits_per_token": losses["val"] / math.log(2),
                             "lr": step_lr, "tokens_per_sec": tokens_per_sec}
                tracker.log(last_eval)
                say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if not math.isfinite(losses["val"]):
                    raise GlimpseError(f"the validation loss became {losses['val']} at step {iter_num}; the last "
                                       "good checkpoint is kept. Try a lower learning_rate, or dtype=float32")
                if ddp.is_main and iter_num > 0 and (losses["val"] < best_val_loss or cfg.always_save_checkpoint):
                    best_val_loss = min(best_val_loss, losses["val"])
                    save(losses["val"])
                    t_saved = time.time()
                t_log = time.time()  # evaluation time does not count against throughput
            attn_every = cfg.eval_interval if cfg.attn_log_interval is None else cfg.attn_log_interval
            if ddp.is_main and attn_every and (iter_num % attn_every == 0 or last_step) \
                    and iter_num != resumed_at:
                log_attention_maps(model, data, cfg, iter_num, tracker)
                t_log = time.time()  # evaluation time does not count against throughput
            if last_step:
                break
            t_step = time.time()

            # one optimizer step over the global batch; this process takes micro-steps rank, rank + world, ...
            set_lr(optimizer, lr, cfg)
            step_lr = lr
            n_seqs = cfg.gradient_accumulation_steps * cfg.batch_size  # the global batch, drawn alike everywhere
            starts = data.random_starts("train", n_seqs, cfg.block_size, batch_gen)
            starts = starts.view(cfg.gradient_accumulation_steps, cfg.batch_size)[ddp.rank::ddp.world_size]
            for micro, micro_starts in enumerate(starts):
                x, y = data.batch("train", micro_starts, cfg.block_size)
                if device.type == "cuda":
                    x = x.pin_memory().to(device, non_blocking=True)
                    y = y.pin_memory().to(device, non_blocking=True)
                else:
                    x, y = x.to(device), y.to(device)
                # gradients are averaged across processes only on the last micro-step
                defer_sync = ddp.enabled and micro < micro_steps - 1
                with step_model.no_sync() if defer_sync else nullcontext(), ctx:
                    _, loss = step_model(x, y)
                    loss = loss / micro_steps
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            iters_since_log += 1
            train_seconds += time.time() - t_step
            bar.update(1)

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                train_loss = (ddp.mean(loss_sum) / iters_since_log).item()  # .item() waits for the GPU
                dt = time.time() - t_log
                tokens_per_sec = tokens_per_iter * iters_since_log / dt
                record = {"iter": iter_num, "train_loss": train_loss, "lr": lr, "tokens_per_sec": tokens_per_sec}
                postfix = {"loss": f"{train_loss:.4f}", "tok_s": f"{tokens_per_sec:,.0f}"}
                if peak:
                    # model FLOPs utilisation: the share of the devices' combined peak that the model's arithmetic used
                    record["mfu"] = tokens_per_sec * flops_per_token / (peak * ddp.world_size)
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                tracker.log(record)
                bar.set_postfix(postfix)
                if not math.isfinite(train_loss):
                    raise GlimpseError(f"the training loss became {train_loss} at step {iter_num}; the last good "
                                       "checkpoint is kept. Try a lower learning_rate, or dtype=float32")
                loss_sum.zero_()
                t_log, iters_since_log = time.time(), 0
            if cfg.checkpoint_interval_s and ddp.is_main and time.time() - t_saved >= cfg.checkpoint_interval_s:
                save(last_eval.get("val_loss"))
                t_saved = time.time()
            # under DDP every process must stop at the same step, so they agree at log steps only
            if (not ddp.enabled or iter_num % cfg.log_interval == 0) and ddp.any(stop.signum is not None):
                if ddp.is_main:
                    save(last_eval.get("val_loss"))
                bar.close()
                tracker.close()
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                say(f"stopped by {name} at step {iter_num}; checkpoint saved: continue with --init_from=resume")
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    finally:
        stop.restore()
        bar.close()  # before any error message, so that the message is the last line
    if cfg.final_eval and ddp.is_main:
        # the estimates above use eval_iters random batches; the run's last word is the whole split
        model.eval()
        val = data.splits["val"]
        # no gradients to keep, so bigger batches than training's (up to 4,096 tokens) run faster
        eval_batch = max(cfg.batch_size, 4096 // cfg.block_size)
        loss, scored = length_loss(fast_model, val, cfg.block_size, "windows", cfg.block_size, len(val),
                                   eval_batch, device, ctx)
        final = {"iter": iter_num, "final_val_loss": loss, "final_val_bits_per_token": loss / math.log(2),
                 "final_val_tokens": scored}
        tracker.log(final)
        last_eval = {**last_eval, **final}
        say(f"final val loss {loss:.4f} on the whole validation split ({scored:,} tokens, {cfg.block_size}-token "
            "windows)")
    tracker.close()
    return last_eval


def log_attention_maps(model: GPT, data: TokenData, cfg: TrainConfig, iter_num: int, tracker: Tracker):
    """Dump the attention over the start of the validation split to out_dir/attention/iter_<n>/ and wandb.

    The text is the same at every step, so the dumps show how the heads form over the run; the
    cost is one forward over attn_probe_tokens tokens, and the pictures.
    """
    n = min(cfg.attn_probe_tokens, cfg.block_size, len(data.splits["val"]))
    if n == 0:
        return
    ids = data.splits["val"][:n].astype(np.int64)
    meta = {"iter": iter_num, "model_config": asdict(model.config), "tokenizer": data.tokenizer_spec,
            "source": f"the first {n} tokens of {data.folder.name}'s validation split"}
    folder = Path(cfg.out_dir) / "attention" / f"iter_{iter_num}"
    heads = dump_text(model, data.tokenizer(), ids, prompt_len=n, meta=meta, folder=folder)
    tracker.log_attention(folder, heads, step=iter_num)


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv,
                           prog="train.py", description=__doc__)
        train(cfg)


if __name__ == "__main__":
    main()
