"""
Train short, test long: one model per position encoding, evaluated at 1x to 8x its training length.

    python scripts/length_study.py                       # 5 encodings x 2 seeds (docs/length.md: how long)
    python scripts/length_study.py --max_iters=300 --seeds=1   # a quick look

Each model has the recipe preset's shape and settings (config/shakespeare_char_recipe.toml: 4 layers,
4 heads, 128 wide, block_size 64, AdamW, float32) and trains for the same number of steps on
char-level tiny Shakespeare. eval.py then scores each on the validation split at --lengths multiples
of 64. The script writes, in --out:

    <encoding>-seed<n>/          each run (checkpoint, metrics, length_eval.csv/png)
    length_study.csv / .md       every run's losses, and the table of means over seeds
    length_study.png             validation loss against context length, one line per encoding
    dumps/<encoding>-<k>x/       the attention of the same validation text at 1x and 4x block_size
    length_study_attention.png   those dumps' last layers side by side (learned has no 4x, so no row)
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.dataset import TokenData  # noqa: E402
from data.prepare import ensure_dataset  # noqa: E402
from eval import EvalConfig, score_lengths  # noqa: E402
from glimpse.attention import attention_weights, write_dump  # noqa: E402
from glimpse.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint  # noqa: E402
from glimpse.config import build, option, parse_config, read_toml  # noqa: E402
from glimpse.errors import GlimpseError, user_errors  # noqa: E402
from model import POS_ENCODINGS  # noqa: E402
from train import TrainConfig, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class StudyConfig:
    out: str = option("out-length-study", "folder for every run and the study's table and plot")
    encodings: str = option(",".join(POS_ENCODINGS), "position encodings to compare, comma-separated")
    seeds: int = option(2, "seeds per encoding (1337, 1338, ...)")
    max_iters: int = option(1000, "training steps per model (the same for every encoding)")
    lengths: str = option("1,2,4,8", "evaluation lengths, as multiples of block_size")
    max_tokens: int = option(8192, "validation tokens scored per length and mode")
    data_dir: str = option("data", "where shakespeare_char is (prepared on first use)")

    def __post_init__(self):
        unknown = set(self.encodings.split(",")) - set(POS_ENCODINGS)
        if not self.encodings.strip():
            raise ValueError(f"encodings must name at least one of {', '.join(POS_ENCODINGS)}")
        if unknown:
            raise ValueError(f"unknown encodings {', '.join(sorted(unknown))}: choose from {', '.join(POS_ENCODINGS)}")
        if len(set(self.encodings.split(","))) < len(self.encodings.split(",")):
            raise ValueError(f"encodings names an encoding more than once: {self.encodings!r}")
        for name in ("seeds", "max_iters", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        EvalConfig(lengths=self.lengths)  # the same check of the lengths as eval.py


def run(cfg: StudyConfig) -> list[dict]:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GlimpseError(f"cannot make the study's folder --out={out} ({e.strerror}): give a folder you can "
                           "write") from None
    preset = read_toml(TrainConfig, str(REPO / "config" / "shakespeare_char_recipe.toml"))
    # the longest length must fit the validation split: found out now, not after every model has trained
    val_tokens, longest = len(TokenData(ensure_dataset("shakespeare_char", cfg.data_dir)).tokens("val")), \
        max(EvalConfig(lengths=cfg.lengths).multiples()) * preset["block_size"]
    if longest + 1 > val_tokens:
        raise GlimpseError(f"--lengths reach {longest:,} tokens, more than the validation split's {val_tokens:,}: "
                           "give smaller --lengths")
    rows = []
    for encoding in cfg.encodings.split(","):
        for seed in range(1337, 1337 + cfg.seeds):
            run_dir = out / f"{encoding}-seed{seed}"
            ckpt = checkpoint_path(run_dir)
            trained = load_checkpoint(ckpt)["iter_num"] if ckpt.exists() else 0
            if trained > cfg.max_iters:  # reused, it would stand in the tables for a model of fewer steps
                raise GlimpseError(f"{run_dir} holds a model trained for {trained:,} steps, more than --max_iters="
                                   f"{cfg.max_iters:,}: pick another --out, or the --max_iters it was trained with")
            done = trained == cfg.max_iters
            if not done:  # a re-run of a stopped study resumes its unfinished runs
                train(build(TrainConfig, {**preset, "out_dir": str(run_dir), "data_dir": cfg.data_dir,
                                          "pos_encoding": encoding, "seed": seed, "max_iters": cfg.max_iters,
                                          "lr_decay_iters": cfg.max_iters, "always_save_checkpoint": True,
                                          "attn_log_interval": 0,
                                          "init_from": "resume" if ckpt.exists() else "scratch"}))
            lengths = cfg.lengths if encoding != "learned" else "1"  # learned has no positions past 64
            # the weights after the last step, as every model trains for the same steps (best.pt may be earlier)
            for row in score_lengths(EvalConfig(out_dir=str(run_dir), lengths=lengths, max_tokens=cfg.max_tokens,
                                                checkpoint="last")):
                rows.append({**row, "seed": seed})
        dump_lengths(out, encoding, cfg)
    write_tables(out, rows)
    plot(out, rows)
    plot_dumps(out, cfg.encodings.split(","))
    return rows


def dump_lengths(out: Path, encoding: str, cfg: StudyConfig):
    """The same validation text, at 1x and 4x block_size, through the first seed's model."""
    state = load_checkpoint(checkpoint_path(out / f"{encoding}-seed1337"))
    model = model_from_checkpoint(state).eval()
    data = TokenData(ensure_dataset("shakespeare_char", cfg.data_dir))
    tokenizer = data.tokenizer()
    for k in (1, 4) if encoding != "learned" else (1,):
        ids = data.tokens("val")[:k * model.config.block_size].astype(np.int64)
        attn = attention_weights(model, torch.from_numpy(ids))
        meta = {"pos_encoding": encoding, "length": len(ids), "multiple": k, "iter": state["iter_num"]}
        write_dump(out / "dumps" / f"{encoding}-{k}x", attn, ids, tokenizer.token_strings(ids), len(ids), meta)


def summary(rows: list[dict]) -> dict[tuple[str, str, int], tuple[float, float, float]]:
    """(encoding, mode, multiple) -> (mean, min, max) of the validation loss over seeds."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["pos_encoding"], r["mode"], r["multiple"]), []).append(r["val_loss"])
    return {k: (statistics.mean(v), min(v), max(v)) for k, v in groups.items()}


def write_tables(out: Path, rows: list[dict]):
    with open(out / "length_study.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summary(rows)
    multiples = sorted({r["multiple"] for r in rows})
    lines = []
    # eval.py's modes, in the words its docs use: "windows" is already a noun, "sliding" is not
    for mode, name in (("sliding", "sliding windows"), ("windows", "non-overlapping windows")):
        lines += [f"\n{name}: validation loss (nats/char), mean over seeds [min, max]\n",
                  "| encoding | " + " | ".join(f"{m}x ({m * 64})" for m in multiples) + " |",
                  "|---|" + "---|" * len(multiples)]
        for encoding in dict.fromkeys(r["pos_encoding"] for r in rows):
            cells = []
            for m in multiples:
                if (encoding, mode, m) in table:
                    mean, lo, hi = table[(encoding, mode, m)]
                    cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")
                else:
                    cells.append("n/a")
            lines.append(f"| {encoding} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "length_study.md").write_text(text, encoding="utf-8")
    print(text)


def plot(out: Path, rows: list[dict]):
    from matplotlib.figure import Figure

    table = summary(rows)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for encoding in dict.fromkeys(r["pos_encoding"] for r in rows):
        points = sorted((m, v) for (e, mode, m), v in table.items() if e == encoding and mode == "sliding")
        xs = [m for m, _ in points]
        ax.errorbar(xs, [v[0] for _, v in points], yerr=[[v[0] - v[1] for _, v in points],
                    [v[2] - v[0] for _, v in points]], marker="o", capsize=3, label=encoding)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context / training context (64 characters)")
    ax.set_ylabel("validation loss, sliding windows (nats/char)")
    ax.set_title("Train short, test long: tiny Shakespeare, char-level")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "length_study.png")


def plot_dumps(out: Path, encodings: list[str]):
    """length_study_attention.png: the last layer's attention, averaged over heads, at 1x and 4x length.

    One row per encoding that can run longer; the same text in both columns, the 1x one being its
    first quarter. sqrt colour scale, as in the viewer.
    """
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    from glimpse.attention import load_dump

    # this study's encodings only: an earlier study in the same --out left dumps of others
    encodings = [e for e in POS_ENCODINGS if e in encodings and (out / "dumps" / f"{e}-4x").exists()]
    if not encodings:  # learned positions alone: nothing runs past its training length
        return
    fig = Figure(figsize=(7, 3.2 * len(encodings)), dpi=110)
    for row, encoding in enumerate(encodings):
        for col, k in enumerate((1, 4)):
            attn = load_dump(out / "dumps" / f"{encoding}-{k}x")["attn"].astype(np.float32)
            ax = fig.add_subplot(len(encodings), 2, 2 * row + col + 1)
            ax.imshow(attn[-1].mean(0), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
            ax.set_title(f"{encoding}, {attn.shape[-1]} tokens ({k}x)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("last layer, mean over heads: rows are queries, columns keys")
    fig.tight_layout()
    fig.savefig(out / "length_study_attention.png")


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(StudyConfig, sys.argv[1:] if argv is None else argv, prog="scripts/length_study.py",
                           description=__doc__, allow_file=False)
        run(cfg)


if __name__ == "__main__":
    main()
