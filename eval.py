"""
Train short, test long: a checkpoint's validation loss at multiples of its training block_size.

    python eval.py --out_dir=out-rope --lengths=1,2,4,8
    python eval.py --out_dir=out-alibi --lengths=1,4 --max_tokens=8192 --wandb_log=true

Two ways to cut the validation split into contexts of L = multiple x block_size tokens:

  windows   non-overlapping windows of L tokens, every token scored. Early tokens of a window have
            little context, so the mean mixes short and long contexts.
  sliding   windows of L tokens moved by --stride tokens, only the last stride tokens of each one
            scored: every scored token sees at least L - stride tokens before it.

It prints a table and writes OUT_DIR/length_eval.csv and OUT_DIR/length_eval.png (loss against
length); with --wandb_log it logs a wandb.Table and line plot to the run that trained the checkpoint.
Models with learned positions have no position past block_size, so only --lengths=1 works for them.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from data.dataset import TokenData
from glimpse.checkpoint import Which, checkpoint_option, load_trained
from glimpse.config import option, parse_config
from glimpse.errors import GlimpseError, user_errors
from glimpse.evaluation import MODES, length_loss
from glimpse.runtime import Device, Dtype, autocast, device_option, dtype_option
from glimpse.tracking import Tracker


@dataclass
class EvalConfig:
    out_dir: str = option("out", "folder of the training run to evaluate; results are written there too")
    checkpoint: Which = checkpoint_option()
    lengths: str = option("1,2,4,8", "context lengths to test, as multiples of the training block_size")
    stride: int = option(0, "sliding mode: tokens scored per window (0: block_size // 2)")
    max_tokens: int = option(16384, "validation tokens scored per length and mode (the start of the split)")
    batch_size: int = option(8, "windows per forward pass")
    data_dir: str = option("", "dataset folder root (empty: the one the checkpoint was trained with)")
    dataset: str = option("", "dataset name (empty: the one the checkpoint was trained with)")
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    wandb_log: bool = option(False, "log the table and a line plot to the checkpoint's wandb run (or a new one)")

    def __post_init__(self):
        self.multiples()  # a malformed list fails here, before anything loads
        if self.stride < 0 or self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError("stride must be 0 or more; max_tokens and batch_size at least 1")

    def multiples(self) -> list[int]:
        try:
            values = [int(v) for v in self.lengths.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"lengths must be whole numbers separated by commas, e.g. 1,2,4,8; got {self.lengths!r}"
            ) from None
        if not values or min(values) < 1:
            raise ValueError(f"lengths must be positive multiples of block_size, e.g. 1,2,4,8; got {self.lengths!r}")
        return values


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Every (length, mode) row of the study for one checkpoint; also writes the CSV and the plot."""
    model, state, device, dtype = load_trained(cfg.out_dir, cfg.checkpoint, cfg.device, cfg.dtype, "evaluating")
    ctx = autocast(device, dtype)
    block_size, encoding = model.config.block_size, model.config.pos_encoding
    multiples = cfg.multiples()
    if encoding == "learned" and max(multiples) > 1:
        raise GlimpseError(
            f"this model learned one embedding per position up to block_size = {block_size}, so it has none for "
            "longer contexts: use --lengths=1, or train with --pos_encoding=sinusoidal, rope, alibi or none"
        )
    train_cfg = state["train_config"]
    data = TokenData(Path(cfg.data_dir or train_cfg["data_dir"]) / (cfg.dataset or train_cfg["dataset"]))
    if data.tokenizer_spec != state["tokenizer"]:
        raise GlimpseError(f"dataset {data.folder} uses another tokenizer than the checkpoint; pick its own dataset")
    stride = cfg.stride or max(1, block_size // 2)
    rows = []
    for multiple in multiples:
        length = multiple * block_size
        for mode in MODES:
            loss, scored = length_loss(model, data.splits["val"], length, mode, min(stride, length), cfg.max_tokens,
                                       cfg.batch_size, device, ctx)
            rows.append({"multiple": multiple, "length": length, "mode": mode, "val_loss": loss,
                         "bits_per_token": loss / math.log(2), "tokens_scored": scored,
                         "pos_encoding": encoding, "attn_score": model.config.attn_score})
    write_results(Path(cfg.out_dir), rows, f"{encoding} positions, trained at {block_size} tokens")
    if cfg.wandb_log:
        log_to_wandb(state, rows)
    return rows


def write_results(out_dir: Path, rows: list[dict], title: str):
    """OUT_DIR/length_eval.csv, and length_eval.png: loss against context length, one line per mode."""
    with open(out_dir / "length_eval.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        ax.plot([r["multiple"] for r in mine], [r["val_loss"] for r in mine], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length / training block_size")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "length_eval.png")


def log_to_wandb(state: dict, rows: list[dict]):
    import wandb

    tracker = Tracker(None, wandb_log=True, wandb_project=state["train_config"].get("wandb_project", "glimpse"),
                      resume_run_id=state.get("wandb_run_id"), job_type="eval")
    table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
    sliding = wandb.Table(columns=["multiple", "val_loss"],
                          data=[[r["multiple"], r["val_loss"]] for r in rows if r["mode"] == "sliding"])
    tracker.run.log({"length_eval/table": table,
                     "length_eval/sliding": wandb.plot.line(sliding, "multiple", "val_loss",
                                                            title="val loss vs length (sliding)")})
    tracker.close()


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(EvalConfig, sys.argv[1:] if argv is None else argv, prog="eval.py",
                           description=__doc__, allow_file=False)
        rows = evaluate(cfg)
        print(f"{'length':>8} {'x block':>8} {'windows':>9} {'sliding':>9}   (val loss, nats per token)")
        for multiple in cfg.multiples():
            pair = {r["mode"]: r for r in rows if r["multiple"] == multiple}
            print(f"{pair['windows']['length']:8d} {multiple:8d} {pair['windows']['val_loss']:9.4f} "
                  f"{pair['sliding']['val_loss']:9.4f}")
        print(f"wrote {Path(cfg.out_dir) / 'length_eval.csv'} and length_eval.png", file=sys.stderr)


if __name__ == "__main__":
    main()
