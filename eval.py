"""
Score a trained checkpoint: its validation loss at lengths past its training block_size, with heads removed,
or on HellaSwag.

Train short, test long: the validation loss at multiples of the training block_size.

    python eval.py --out_dir=out-rope --lengths=1,2,4,8
    python eval.py --out_dir=out-alibi --lengths=1,4 --max_tokens=8192 --wandb_log=true

Two ways to cut the validation split into contexts of L = multiple x block_size tokens:

  windows   non-overlapping windows of L tokens, every token scored. Early tokens of a window have
            little context, so the mean mixes short and long contexts.
  sliding   windows of L tokens moved by --stride tokens, only the last stride tokens of each one
            scored: every scored token sees at least L - stride tokens before it.

In each mode every length scores the same --max_tokens tokens (sliding windows: from the first token the
longest length has its full context for), so that the losses differ by the context alone.

It prints a table and writes OUT_DIR/length_eval.csv and OUT_DIR/length_eval.png (loss against
length); with --wandb_log it logs a wandb.Table and line plot to the run that trained the checkpoint.
Models with learned positions have no position past block_size, so only --lengths=1 works for them (and is
their default).

Which heads does the model need? Remove some and score it without them, on the same block_size
windows as the intact model (glimpse/ablation.py says what removing a head means):

    python eval.py --out_dir=out --ablate=1.0,2.3                  # the loss without heads 1.0 and 2.3
    python eval.py --out_dir=out --ablate=0.1 --ablation=mean      # the head says its mean instead of 0
    python eval.py --out_dir=out --head_importance                 # every head removed alone, ranked

HellaSwag, completion style (data/hellaswag.py says how each ending is scored):

    python eval.py --out_dir=out-gpt --task=hellaswag               # downloads the validation file once
    python eval.py --init_from=gpt2 --task=hellaswag --hellaswag_file=hellaswag_val.jsonl   # offline
    python eval.py --out_dir=out-gpt --task=hellaswag --hellaswag_examples=500   # the first 500 only

It prints acc and acc_norm and appends them to OUT_DIR/metrics.jsonl (with --init_from and no
--out_dir: eval-NAME/metrics.jsonl), and with --wandb_log to the checkpoint's wandb run.

--head_importance writes OUT_DIR/head_importance.csv (layer, head, loss, loss_increase) and
head_importance.png (layers x heads, coloured by the loss increase), and prints the heads that
matter most; with --wandb_log, a wandb.Table and the image.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from data import hellaswag
from data.dataset import TokenData, prepared_again
from data.tokenizer import tokenizer_from_spec
from glimpse import render
from glimpse.ablation import (
    Ablation,
    AblationKind,
    ablation_option,
    check_removals,
    head_means,
    losses_per_head,
    mean_loss,
    parse_heads,
    top_heads,
)
from glimpse.checkpoint import Which, check_one_model, checkpoint_option, load_trained
from glimpse.config import option, parse_config
from glimpse.errors import GlimpseError, user_errors
from glimpse.evaluation import BATCH_SIZE, MODES, first_target, length_loss, scored_windows, windows
from glimpse.files import check_writable
from glimpse.runtime import Device, Dtype, autocast, device_option, dtype_option
from glimpse.tracking import Tracker

DEFAULT_OUT = "out"


@dataclass
class EvalConfig:
    out_dir: str = option(DEFAULT_OUT, "folder of the training run to evaluate; results are written there too")
    checkpoint: Which = checkpoint_option()
    init_from: str = option("", "score pretrained GPT-2 instead of OUT_DIR's checkpoint (--task=hellaswag): gpt2, "
                                "gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder")
    task: Literal["length", "hellaswag"] = option(
        "length", "length: validation loss at multiples of block_size (and --ablate, --head_importance); hellaswag: "
        "HellaSwag accuracy, completion style")
    hellaswag_file: str = option("", "hellaswag: a local hellaswag_val.jsonl (empty: download it to "
                                     "DATA_DIR/hellaswag/ once)")
    hellaswag_examples: int = option(0, "hellaswag: score the first this many examples (0: all 10,042)")
    lengths: str = option("", "context lengths to test, as multiples of the training block_size (empty: 1,2,4,8, "
                              "or 1 for a model with learned positions, which end at block_size)")
    stride: int = option(0, "sliding mode: tokens scored per window (0: block_size // 2)")
    max_tokens: int = option(16384, "validation tokens scored per length and mode, the same ones at each length "
                                    "(near the split's start)")
    batch_size: int = option(BATCH_SIZE, "windows per forward pass")
    data_dir: str = option("", "dataset folder root (empty: the one the checkpoint was trained with)")
    dataset: str = option("", "dataset name (empty: the one the checkpoint was trained with)")
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    ablate: str = option("", "remove these heads, layer.head comma-separated (1.0,2.3), and report the val loss "
                             "without them beside the intact model's, on the same block_size windows")
    ablation: AblationKind = ablation_option("the scored windows")
    head_importance: bool = option(False, "remove each head alone and rank the heads by the loss increase: "
                                          "OUT_DIR/head_importance.csv and .png, and a table")
    wandb_log: bool = option(False, "log the table and a plot to the checkpoint's wandb run (or a new one)")

    def __post_init__(self):
        self.multiples()  # a malformed list fails here, before anything loads
        check_removals(self.ablate, self.ablation, self.head_importance)
        check_one_model(self.init_from, self.checkpoint)
        if self.init_from and self.task != "hellaswag":
            raise ValueError("--init_from scores pretrained GPT-2 on --task=hellaswag; the length and head studies "
                             "read a trained checkpoint's dataset: give --out_dir instead")
        if self.task == "hellaswag" and (self.ablate or self.head_importance):
            raise ValueError("--ablate and --head_importance score the validation split: use them without "
                             "--task=hellaswag")
        self.check_used()
        if self.hellaswag_examples < 0:
            raise ValueError(f"hellaswag_examples must be 0 (all) or more, got {self.hellaswag_examples}")
        if self.stride < 0:
            raise ValueError(f"stride must be 0 or more, got {self.stride}")
        for name in ("max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def check_used(self):
        """A setting the chosen work does not read would be dropped without a word: it is an error instead."""
        heads = bool(self.ablate or self.head_importance)
        if self.ablation != "zero" and not heads:
            raise ValueError("--ablation picks how --ablate and --head_importance remove heads: give one of them, "
                             "or drop --ablation")
        if (self.lengths or self.stride) and (heads or self.task == "hellaswag"):
            doing = "--task=hellaswag" if self.task == "hellaswag" else "--ablate and --head_importance"
            raise ValueError(f"--lengths and --stride are the length task's, which {doing} does not run: drop them")
        if (self.hellaswag_file or self.hellaswag_examples) and self.task != "hellaswag":
            raise ValueError("--hellaswag_file and --hellaswag_examples are read by --task=hellaswag only: add it, "
                             "or drop them")
        if self.wandb_log and self.ablate:
            raise ValueError("--wandb_log logs the length table, head importance and HellaSwag; --ablate's two "
                             "losses are printed only: drop --wandb_log")

    def multiples(self, learned: bool = False) -> list[int]:
        """The --lengths asked for; by default 1, 2, 4, 8, or 1 alone for learned positions (learned)."""
        if not self.lengths.strip():
            return [1] if learned else [1, 2, 4, 8]
        try:
            values = [int(v) for v in self.lengths.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"lengths must be whole numbers separated by commas, e.g. 1,2,4,8; got {self.lengths!r}"
            ) from None
        if not values or min(values) < 1:
            raise ValueError(f"lengths must be positive multiples of block_size, e.g. 1,2,4,8; got {self.lengths!r}")
        return list(dict.fromkeys(values))  # each length once, in the order given


def load(cfg: EvalConfig):
    """The model, its checkpoint, the dataset it is scored on, the device and the autocast context."""
    model, state, device, dtype = load_trained(cfg.out_dir, cfg.checkpoint, cfg.device, cfg.dtype, "evaluating")
    train_cfg = state["train_config"]
    data = TokenData(Path(cfg.data_dir or train_cfg["data_dir"]) / (cfg.dataset or train_cfg["dataset"]))
    if data.tokenizer_spec != state["tokenizer"]:
        if not (cfg.data_dir or cfg.dataset):  # the run's own folder: prepared again since the run trained on it
            raise GlimpseError(f"dataset {data.folder}, where the run trained, uses another tokenizer than the "
                               "checkpoint now: it was prepared again since (or is another folder of that name); "
                               "prepare it as the run had it")
        raise GlimpseError(f"dataset {data.folder} uses another tokenizer than the checkpoint; pick its own dataset")
    if not (cfg.data_dir or cfg.dataset) and (changes := prepared_again(state.get("dataset_prepared"), data.prepared)):
        print(f"note: dataset {data.folder}, where the run trained, was prepared again since the checkpoint "
              f"({changes}): its validation split is scored as it is now, not as the run's evals saw it",
              file=sys.stderr)
    return model, state, data, device, autocast(device, dtype)


def results_folder(cfg: EvalConfig) -> Path:
    """Where eval.py writes: the run's out_dir, or for a pretrained model without one, a folder named after it."""
    if cfg.task == "hellaswag" and cfg.init_from and cfg.out_dir == DEFAULT_OUT:
        return Path(f"eval-{Path(os.path.abspath(cfg.init_from)).name or 'model'}")  # --init_from=. too
    return Path(cfg.out_dir)


def score_lengths(cfg: EvalConfig) -> list[dict]:
    """Every (length, mode) row of the study for one checkpoint; also writes the CSV and the plot."""
    model, state, data, device, ctx = load(cfg)
    block_size, encoding = model.config.block_size, model.config.pos_encoding
    multiples = cfg.multiples(learned=encoding == "learned")
    if encoding == "learned" and not cfg.lengths.strip():
        print(f"note: this model learned its positions up to block_size = {block_size} only: scoring that length "
              "alone", file=sys.stderr)
    if encoding == "learned" and max(multiples) > 1:
        raise GlimpseError(
            f"this model learned one embedding per position up to block_size = {block_size}, so it has none for "
            "longer contexts: use --lengths=1, or train with --pos_encoding=sinusoidal, rope, alibi or none"
        )
    stride = cfg.stride or max(1, block_size // 2)
    if cfg.stride >= min(multiples) * block_size:  # no context left: sliding windows would be the non-overlapping ones
        raise GlimpseError(f"--stride={stride} leaves sliding windows of {min(multiples) * block_size} tokens no "
                           "context, so they would score what non-overlapping windows do: give a smaller stride")
    val, lengths = data.tokens("val"), [multiple * block_size for multiple in multiples]
    first = {mode: first_target(lengths, mode, stride) for mode in MODES}  # the same text scored at every length
    for mode in MODES:  # before scoring anything: a split too short for the longest length stops at once
        scored_windows(len(val), max(lengths), mode, min(stride, max(lengths)), cfg.max_tokens, first[mode])
    # a wandb that cannot start stops the run now, before any scoring
    with Tracker.for_checkpoint(state, "eval", wandb_log=cfg.wandb_log) as tracker:
        rows = []
        for multiple, length in zip(multiples, lengths):
            for mode in MODES:
                loss, scored = length_loss(model, val, length, mode, min(stride, length), cfg.max_tokens,
                                           cfg.batch_size, device, ctx, first=first[mode], show_progress=True)
                rows.append({"multiple": multiple, "length": length, "mode": mode, "val_loss": loss,
                             "bits_per_token": loss / math.log(2), "tokens_scored": scored,
                             "pos_encoding": encoding, "attn_score": model.config.attn_score})
        write_lengths(Path(cfg.out_dir), rows, f"{encoding} positions, trained at {block_size} tokens")
        if tracker.run is not None:
            log_lengths(tracker, rows)
    return rows


def write_lengths(out_dir: Path, rows: list[dict], title: str):
    """OUT_DIR/length_eval.csv, and length_eval.png: loss against context length, one line per mode."""
    try:
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
    except OSError as e:
        raise GlimpseError(f"could not write the length evaluation to {out_dir}: {e.strerror or e}") from None


def log_lengths(tracker: Tracker, rows: list[dict]):
    """The length study to the tracker's wandb run: its table and the sliding windows' line plot."""
    import wandb

    table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
    sliding = wandb.Table(columns=["multiple", "val_loss"],
                          data=[[r["multiple"], r["val_loss"]] for r in rows if r["mode"] == "sliding"])
    tracker.run.log({"length_eval/table": table,
                     "length_eval/sliding": wandb.plot.line(sliding, "multiple", "val_loss",
                                                            title="val loss vs length (sliding)")})


def print_lengths(rows: list[dict]):
    print(f"{'length':>8} {'x block':>8} {'windows':>9} {'sliding':>9}   (val loss, nats per token)")
    for multiple in dict.fromkeys(r["multiple"] for r in rows):  # the lengths scored, in their order
        pair = {r["mode"]: r for r in rows if r["multiple"] == multiple}
        print(f"{pair['windows']['length']:8d} {multiple:8d} {pair['windows']['val_loss']:9.4f} "
              f"{pair['sliding']['val_loss']:9.4f}")


def score_heads(cfg: EvalConfig) -> dict:
    """--ablate or --head_importance: the val loss with heads removed, beside the intact model's."""
    model, state, data, device, ctx = load(cfg)
    c = model.config
    removed = parse_heads(cfg.ablate, c.n_layer, c.n_head) if cfg.ablate else []
    inputs, targets = windows(data.tokens("val"), c.block_size, cfg.max_tokens, device)  # (N, T) each
    # before any scoring, the means' pass included: a wandb that cannot start stops the run now (--ablate logs nothing)
    with Tracker.for_checkpoint(state, "eval", wandb_log=cfg.wandb_log) as tracker:
        value = head_means(model, inputs, cfg.batch_size, ctx) if cfg.ablation == "mean" else None
        result = {"tokens_scored": inputs.numel(), "ablation": cfg.ablation}
        if removed:
            result["intact_loss"] = mean_loss(model, inputs, targets, None, ctx, cfg.batch_size)
            without = Ablation.of(removed, c.n_layer, c.n_head, value, device)
            result["ablated_loss"] = mean_loss(model, inputs, targets, without, ctx, cfg.batch_size)
            result["heads"] = [f"{layer}.{head}" for layer, head in removed]
            return result
        scored = torch.ones(c.block_size, dtype=torch.bool, device=device)
        intact, losses = losses_per_head(model, inputs, targets, scored, value, ctx, show_progress=True)
        result.update(intact_loss=intact, losses=losses.tolist(), top=top_heads(losses, intact))
        write_importance(Path(cfg.out_dir), losses, intact, f"loss increase without each head ({cfg.ablation} "
                         f"ablation, {inputs.numel():,} val tokens)")
        if tracker.run is not None:
            log_importance(tracker, Path(cfg.out_dir), losses, intact)
    return result


def write_importance(out_dir: Path, losses: torch.Tensor, intact: float, title: str):
    """OUT_DIR/head_importance.csv, one row per head, and head_importance.png, the increases as a heatmap."""
    try:
        with open(out_dir / "head_importance.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "head", "loss", "loss_increase"])
            for layer, row in enumerate(losses.tolist()):
                writer.writerows([layer, head, loss, loss - intact] for head, loss in enumerate(row))
        render.write_importance_image(out_dir / "head_importance.png", (losses - intact).numpy(), title)
    except OSError as e:
        raise GlimpseError(f"could not write the head importance to {out_dir}: {e.strerror or e}") from None


def log_importance(tracker: Tracker, out_dir: Path, losses: torch.Tensor, intact: float):
    """The head importance to the tracker's wandb run: a table and the heatmap."""
    import wandb

    rows = [[layer, head, loss, loss - intact] for layer, row in enumerate(losses.tolist())
            for head, loss in enumerate(row)]
    tracker.run.log({"head_importance/table": wandb.Table(columns=["layer", "head", "loss", "loss_increase"],
                                                          data=rows),
                     "head_importance/heatmap": wandb.Image(str(out_dir / "head_importance.png"))})


def print_heads(result: dict):
    print(f"val loss over {result['tokens_scored']:,} tokens ({result['ablation']} ablation), nats per token")
    print(f"  intact model {result['intact_loss']:.4f}")
    if "heads" in result:
        change = result["ablated_loss"] - result["intact_loss"]
        print(f"  without {', '.join(result['heads'])}  {result['ablated_loss']:.4f}  ({change:+.4f})")
        return
    print("  the heads whose removal costs most:\n  layer head      loss  increase")
    for row in result["top"]:
        print(f"  {row['layer']:5d} {row['head']:4d} {row['loss']:9.4f} {row['loss_increase']:+9.4f}")


def score_hellaswag(cfg: EvalConfig) -> dict:
    """--task=hellaswag: acc and acc_norm, appended to the run's metrics.jsonl and logged to its wandb run."""
    model, state, device, dtype = load_trained(cfg.out_dir, cfg.checkpoint, cfg.device, cfg.dtype, "scoring",
                                               cfg.init_from)
    data_dir = cfg.data_dir or state["train_config"].get("data_dir", "data")
    examples = hellaswag.first(hellaswag.read_examples(hellaswag.val_file(cfg.hellaswag_file, data_dir)),
                               cfg.hellaswag_examples)
    # a wandb that cannot start stops the run now, before any scoring
    with Tracker.for_checkpoint(state, "eval", wandb_log=cfg.wandb_log) as tracker:
        result = hellaswag.evaluate(model, examples, tokenizer_from_spec(state["tokenizer"]),
                                    model.config.block_size, device, autocast(device, dtype))
        out_dir = results_folder(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        # a pretrained model's score in a run's metrics.jsonl says whose it is, not to be read as the run's own
        record = {"iter": state["iter_num"] or 0, **result, **({"init_from": cfg.init_from} if cfg.init_from else {})}
        Tracker(out_dir / "metrics.jsonl", append=True).log(record)
        if tracker.run is not None:
            tracker.run.log(result)  # under train.py's names, so that wandb charts both in one
    return {**record, "metrics": str(out_dir / "metrics.jsonl")}


def print_hellaswag(result: dict):
    n, skipped = result["hellaswag_examples"], result["hellaswag_skipped"]
    why = f" ({skipped:,} skipped: text its tokenizer cannot read, or no context)" if skipped else ""
    print(f"hellaswag: acc {result['hellaswag_acc']:.4f}, acc_norm {result['hellaswag_acc_norm']:.4f} over "
          f"{n:,} example{'s' if n != 1 else ''}{why}")
    print(f"appended to {result['metrics']}", file=sys.stderr)


def main(argv: list[str] | None = None):
    with user_errors(out_of_memory="ask for less: a smaller --batch_size (windows per forward pass) or shorter "
                                   "--lengths, or --device=cpu when on a GPU"):
        cfg = parse_config(EvalConfig, sys.argv[1:] if argv is None else argv, prog="eval.py",
                           description=__doc__, allow_file=False)
        if cfg.task == "hellaswag" or cfg.head_importance or not cfg.ablate:  # what writes results: found writable
            check_writable(results_folder(cfg), "the results' folder",  # found before the scoring, not after it
                           "copy the run to a folder you can write (--ablate alone writes nothing)")
        if cfg.task == "hellaswag":
            print_hellaswag(score_hellaswag(cfg))
            return
        if cfg.ablate or cfg.head_importance:
            print_heads(score_heads(cfg))
            if cfg.head_importance:
                print(f"wrote {Path(cfg.out_dir) / 'head_importance.csv'} and head_importance.png", file=sys.stderr)
            return
        print_lengths(score_lengths(cfg))
        print(f"wrote {Path(cfg.out_dir) / 'length_eval.csv'} and length_eval.png", file=sys.stderr)


if __name__ == "__main__":
    main()
