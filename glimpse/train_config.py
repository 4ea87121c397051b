"""
TrainConfig: every key of a training run, with its default and the help that train.py --help shows.

Precedence is defaults < a TOML preset < --key=value (glimpse/config.py); a resume's recorded settings (those
its checkpoint was saved with, glimpse/run_folder.py) go above the preset, below the flags; the model's keys are
model.py's GPTConfig, set by their own names (--n_layer=4). A config that cannot run is refused here,
before any data or model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from glimpse.config import nested, option
from glimpse.runtime import Device, Dtype, device_option, dtype_option
from model import GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = option("out", "folder for ckpt.pt, best.pt, config.json and metrics.jsonl")
    dataset: str = option("shakespeare_char", "dataset name: reads DATA_DIR/NAME/ (meta.json and the token shards "
                          "data/prepare.py writes); a built-in one is prepared on first use")
    data_dir: str = option("data", "folder that holds one sub-folder per dataset")
    init_from: str = option(
        "scratch", "scratch: a new model of the model keys; resume: continue out_dir/ckpt.pt, with the settings it was "
        "saved with (out_dir/config.json lists them) above the defaults and a preset, below the flags; gpt2, "
        "gpt2-medium, gpt2-large, gpt2-xl (from the Hugging Face Hub or its cache; a folder of that name holding a "
        "Hugging Face model wins), or a folder holding a Hugging Face GPT-2 config.json and model.safetensors: "
        "finetune pretrained GPT-2 (its shape; of the model keys only block_size, at most 1024, and dropout apply)"
    )
    # where it runs
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    compile: bool = option(False, "torch.compile the model: slower start, faster steps")
    compile_backend: str = option(
        "inductor", "torch.compile's backend: inductor generates fused kernels; aot_eager traces the same graphs but "
        "runs them op by op, which compiles in seconds (to tell a compiler problem from a model one)"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = option(
        "default", "inductor's mode: default; reduce-overhead also records each step's kernels as a CUDA graph and "
        "replays it, saving the kernel launches a small model's step waits on (recorded on GPUs only; one process of "
        "one micro-step, no fsdp: see docs/performance.md); max-autotune also tries kernel variants for the fastest "
        "(minutes more to compile), with CUDA graphs; max-autotune-no-cudagraphs without them"
    )
    fsdp: bool = option(
        False, "shard weights, gradients and AdamW state across torchrun's processes (PyTorch's FSDP2, one unit per "
        "block) instead of DDP's full replica in each: for models whose replica and optimizer state do not fit one "
        "device. Checkpoints save the training state sharded (out_dir/ckpt.dcp/), resumable on any process count"
    )
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
        "training stops when it is spent, and the cosine decay follows the fraction used (or the fraction of "
        "max_iters taken, if further along), so the run ends fully decayed; 0: no budget, max_iters and lr_decay_iters "
        "rule"
    )
    budget_steps_per_s: float = option(
        0.0, "under max_time: the steps per second of training the budget was set for, on the machine it was set on; "
        "a run that gets fewer than half of the steps that rate gives in max_time says so at its end, since a busy "
        "or slower machine gives a worse model in the same time (0: no check)"
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
        0.1, "AdamW's decoupled weight decay, on matrices only (not biases or norms): each step shrinks them by the "
        "step's learning rate times this (optimizer=muon: Muon's matrices take muon_weight_decay instead)"
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
    muon_weight_decay: float = option(
        0.1, "Muon's decoupled weight decay (optimizer=muon): each step shrinks the blocks' matrices by the step's "
        "Muon rate times this, as AdamW's shrink by its rate times weight_decay: at equal values Muon's decay is "
        "muon_lr / learning_rate times AdamW's"
    )
    muon_split_qkv: bool = option(
        False, "Muon orthogonalises c_attn's update as three C x C matrices (queries, keys, values), each a full step "
        "of its own, instead of one 3C x C matrix, whose one step the three share out by the size of their gradients"
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
        if not self.out_dir.strip():  # an empty one would write the run's files into the current folder
            raise ValueError("out_dir must name a folder, got an empty one")
        if not self.init_from.strip():  # an empty one would read the current folder as a Hugging Face model
            raise ValueError("init_from must be scratch, resume, gpt2 (or gpt2-medium, -large, -xl) or a folder, got "
                             "an empty one")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "attn_probe_tokens", "hellaswag_interval",
                     "hellaswag_examples", "batch_warmup_iters", "seq_warmup_iters", "budget_steps_per_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_time < 0:
            raise ValueError(f"max_time must not be negative, got {self.max_time}")
        if self.checkpoint_interval_s < 0:
            raise ValueError(f"checkpoint_interval_s must not be negative, got {self.checkpoint_interval_s}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate:g}")
        for name in ("min_lr", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name):g}")
        if self.min_lr > self.learning_rate:  # the cosine "decay" would then climb from the peak
            raise ValueError(f"min_lr ({self.min_lr:g}) is above learning_rate ({self.learning_rate:g}), so the "
                             f"schedule would rise after warmup: set --min_lr at or below the learning rate")
        # a run that goes past its warmup would drop from the peak in one step (with a time budget the clock drives
        # the decay, and lr_decay_iters is not read)
        if not self.max_time and 0 < self.warmup_iters < self.max_iters and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(f"lr_decay_iters ({self.lr_decay_iters}) is not after warmup_iters ({self.warmup_iters}), "
                             f"so the rate would drop from its peak to min_lr in one step: set --lr_decay_iters "
                             f"above --warmup_iters")
        if self.attn_log_interval is not None and self.attn_log_interval < 0:
            raise ValueError(f"attn_log_interval must be none, 0 (never) or positive, got {self.attn_log_interval}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.muon_ns_steps < 1:
            raise ValueError(f"muon_ns_steps must be at least 1, got {self.muon_ns_steps}")
        if self.muon_weight_decay < 0:
            raise ValueError(f"muon_weight_decay must not be negative, got {self.muon_weight_decay}")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_lr must be positive and muon_momentum in [0, 1), got {self.muon_lr} and "
                             f"{self.muon_momentum}")
        if self.compile:
            from torch._dynamo import list_backends  # only a compiled run pays for importing the compiler

            backends = list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise ValueError(f"compile_backend must be one of torch.compile's backends, e.g. inductor or "
                                 f"aot_eager; got {self.compile_backend!r}")
            if self.compile_mode != "default" and self.compile_backend != "inductor":
                raise ValueError(f"compile_mode is inductor's ({self.compile_backend} takes no mode): use "
                                 f"--compile_backend=inductor, or --compile_mode=default")
            if self.cuda_graphs and self.fsdp:
                raise ValueError(f"{self.graphs_by} records CUDA graphs, which need every tensor at a fixed address, "
                                 f"while fsdp gathers and frees the weights every step: use --compile_mode=default or "
                                 f"max-autotune-no-cudagraphs, with --compile_backend=inductor")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optimizer=muon needs torch.optim.Muon, which PyTorch 2.9 and newer have; this is "
                             f"PyTorch {torch.__version__}: upgrade it, or use optimizer=adamw")

        if self.hellaswag_file and not self.hellaswag_interval:  # it would be read by nothing
            raise ValueError("--hellaswag_file is read when --hellaswag_interval is set: give both, or drop it")
        if self.fsdp and self.optimizer != "adamw":
            raise ValueError("fsdp=true supports optimizer=adamw only (Muon orthogonalises whole matrices, which "
                             "fsdp splits across processes): use --optimizer=adamw, or --fsdp=false")
        if self.fsdp and self.dtype == "float16":
            raise ValueError("fsdp=true does not support dtype=float16 (its loss scaler would skip steps on some "
                             "processes only): use --dtype=bfloat16 or float32")

    @property
    def cuda_graphs(self) -> bool:
        """Whether a compiled run records its steps as CUDA graphs (on a GPU; the CPU runs them as compiled): in
        inductor's modes that do, or through the cudagraphs backend (the same CUDA graph trees, without inductor)."""
        return self.compile and (self.compile_mode in ("reduce-overhead", "max-autotune")
                                 or self.compile_backend == "cudagraphs")

    @property
    def graphs_by(self) -> str:
        """The setting that records CUDA graphs, as the errors name it."""
        by_backend = self.compile_backend == "cudagraphs"
        return "compile_backend=cudagraphs" if by_backend else f"compile_mode={self.compile_mode}"

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The network to build: the model keys, and the dataset's vocabulary."""
        return replace(self.model, vocab_size=vocab_size)
