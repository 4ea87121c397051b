"""
Training runs side by side: their validation loss against the seconds of training each took, in one
picture, and when each first reached a target loss.

    python scripts/compare_runs.py --runs=out-shakespeare-char-gpu-speedrun,out-shakespeare-char
    python scripts/compare_runs.py --runs=a,b --target=1.4697 --out=speedrun.png

Each run is an out_dir that train.py wrote: its metrics.jsonl has the evals' val loss at their steps and,
at every log step, train_seconds, the seconds spent in training steps so far (evals, snapshots and
checkpoints left out; a resumed run's counting on from its checkpoint). An eval's seconds are those of
the log record at its step, or read off the line between the log records around it. The whole-split
score at a run's end (final_val_loss) is drawn as a star. Runs of different batch sizes or models take
steps of different lengths, so seconds, not steps, are what the picture compares.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable

import numpy as np  # noqa: E402

from glimpse.config import option, parse_config  # noqa: E402
from glimpse.errors import GlimpseError, user_errors  # noqa: E402
from glimpse.files import check_writable, write_atomic  # noqa: E402
from glimpse.tracking import read_records  # noqa: E402


@dataclass
class CompareConfig:
    runs: str = option("", "the runs' out_dirs, comma-separated (each with the metrics.jsonl train.py wrote)")
    target: float = option(0.0, "a validation loss to reach: drawn as a line, and each run's first eval at or below "
                                "it reported (0: none)")
    out: str = option("runs.png", "where the picture goes")

    def __post_init__(self):
        if not [r for r in self.runs.split(",") if r.strip()]:
            raise ValueError("--runs names no run: give the out_dirs to compare, e.g. --runs=out-a,out-b")
        if self.target < 0:
            raise ValueError(f"target must be a loss (positive), or 0 for none; got {self.target:g}")
        if Path(self.out).suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, e.g. --out=runs.png; got {self.out!r}")


@dataclass
class Curve:
    """One run's validation losses against its seconds of training."""
    name: str
    steps: list[int]  # each eval's step
    seconds: list[float]  # the training seconds at that step
    val_loss: list[float]
    final: tuple[float, float] | None  # (seconds, whole-split val loss) at the run's end, if it scored one


def curve(folder: Path, name: str | None = None) -> Curve:
    """A run's Curve, read from folder/metrics.jsonl; name: what the report and the legend call it (the folder's
    name by default)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise GlimpseError(f"{folder} has no metrics.jsonl: --runs takes the out_dirs of train.py's runs")
    records = read_records(path)

    def values(key: str) -> list[tuple[int, float]]:  # a loss that was not finite (null, NaN) leaves no point
        return [(r["iter"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    clock, evals, final = dict(values("train_seconds")), values("val_loss"), values("final_val_loss")
    if not evals:
        raise GlimpseError(f"{path} holds no eval (val_loss) yet: compare runs once they have evaluated")
    if not clock and any(step > 0 for step, _ in evals):
        raise GlimpseError(f"{path} has no train_seconds: it was written before train.py recorded them, or the run "
                           f"stopped before its first log step; train it again to compare it by seconds")
    steps = [step for step, _ in evals]
    return Curve(name or folder.resolve().name or str(folder), steps, seconds_at(steps, clock),
                 [v for _, v in evals], (seconds_at([final[-1][0]], clock)[0], final[-1][1]) if final else None)


def seconds_at(steps: list[int], clock: dict[int, float]) -> list[float]:
    """The training seconds at each step, read off the line through the log records' (step, train_seconds) from
    (0, 0) (a resumed run's metrics.jsonl keeps the records before its resume); a step past the last log record
    gets that record's seconds."""
    known = sorted(clock.items())
    if not known or known[0][0] > 0:
        known.insert(0, (0, 0.0))
    xs, ys = zip(*known)
    return [float(s) for s in np.interp(steps, xs, ys)]


def reached(c: Curve, target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first eval at or below target, or None."""
    return next(((step, s) for step, s, v in zip(c.steps, c.seconds, c.val_loss) if v <= target), None)


def report(curves: list[Curve], target: float) -> list[str]:
    """A line per run: its evals, best val loss, whole-split score, and when it first reached target."""
    lines = []
    for c in curves:
        best = min(c.val_loss)
        evals = f"{len(c.val_loss)} eval{'s' if len(c.val_loss) > 1 else ''}"
        line = f"{c.name}: {evals} over {c.seconds[-1]:.1f} s, best val {best:.4f}"
        if c.final:
            line += f", whole split {c.final[1]:.4f} at {c.final[0]:.1f} s"
        if target:
            hit = reached(c, target)
            line += f"; reached {target:g} at step {hit[0]:,}, {hit[1]:.1f} s" if hit else f"; did not reach {target:g}"
        lines.append(line)
    return lines


def figure(curves: list[Curve], target: float):
    """The picture: each run's val loss against seconds of training, its whole-split score a star."""
    from matplotlib.figure import Figure  # imported here: the report needs no matplotlib

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    for c in curves:
        (line,) = ax.plot(c.seconds, c.val_loss, "o-", markersize=3, label=c.name)
        if c.final:
            ax.plot(*c.final, "*", color=line.get_color(), markersize=12,
                    label=f"{c.name}, whole split: {c.final[1]:.4f}")
    if target:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    lows = [v for c in curves for v in c.val_loss[1:]] or [v for c in curves for v in c.val_loss]
    lows += [c.final[1] for c in curves if c.final] + ([target] if target else [])
    ax.set_ylim(min(lows) - 0.05, max(lows) + 0.1)  # step 0's untrained loss off the top
    ax.set_xlabel("seconds of training (evals, snapshots and checkpoints left out)")
    ax.set_ylabel("val loss (nats per token)")
    ax.set_title("validation loss against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compare(cfg: CompareConfig) -> list[str]:
    """Read the runs, draw cfg.out, return the report's lines."""
    out = Path(cfg.out)
    check_writable(out.parent, "--out's folder", "give --out a path you can write")
    if out.is_dir():
        raise GlimpseError(f"--out {str(out)!r} is a folder: give a .png file's path")
    folders = [Path(name.strip()) for name in cfg.runs.split(",") if name.strip()]
    names = [f.resolve().name or str(f) for f in folders]
    clash = len(set(names)) < len(names)  # two out_dirs of one name (a/out, b/out): called as given instead
    curves = [curve(f, str(f) if clash else None) for f in folders]
    fig = figure(curves, cfg.target)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
    except OSError as e:
        raise GlimpseError(f"could not write {out}: {e.strerror or e}") from None
    return report(curves, cfg.target) + [f"drawn in {out}"]


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(CompareConfig, sys.argv[1:] if argv is None else argv, prog="scripts/compare_runs.py",
                           description=__doc__, allow_file=False)
        for line in compare(cfg):
            print(line)


if __name__ == "__main__":
    main()
