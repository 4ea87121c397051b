"""scripts/compare_runs.py: runs' val loss against their seconds of training, the report of when each reached a
target, a real training run read as train.py wrote it, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, python

sys.path.insert(0, str(REPO / "scripts"))
import compare_runs  # noqa: E402


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def fast_and_slow(tmp_path: Path) -> tuple[Path, Path]:
    """Two runs: fast reaches 1.45 at step 15, between its log steps (1.0 s at 10, 2.0 s at 20); slow never does."""
    fast = write_run(tmp_path / "fast", [
        {"iter": 0, "val_loss": 4.0}, {"iter": 10, "train_loss": 2.0, "train_seconds": 1.0},
        {"iter": 15, "val_loss": 1.4}, {"iter": 20, "train_loss": 1.5, "train_seconds": 2.0},
        {"iter": 30, "train_loss": 1.3, "train_seconds": 4.0}, {"iter": 30, "val_loss": 1.3},
        {"iter": 30, "final_val_loss": 1.35}])
    slow = write_run(tmp_path / "slow", [
        {"iter": 0, "val_loss": 4.0}, {"iter": 10, "train_loss": 2.5, "train_seconds": 5.0},
        {"iter": 20, "train_loss": 2.0, "train_seconds": 10.0}, {"iter": 20, "val_loss": 1.5}])
    return fast, slow


def test_runs_are_compared_by_seconds_of_training_and_when_they_reached_the_target(tmp_path, trained, capsys):
    fast, slow = fast_and_slow(tmp_path)
    cfg, _ = trained
    out = tmp_path / "pictures" / "runs.png"
    compare_runs.main([f"--runs={fast},{slow},{cfg.out_dir}", "--target=1.45", f"--out={out}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fast: 3 evals over 4.0 s, best val 1.3000, whole split 1.3500 at 4.0 s; reached 1.45 at " \
                       "step 15, 1.5 s"  # 1.5 s: half way between the log steps around step 15
    assert lines[1] == "slow: 2 evals over 10.0 s, best val 1.5000; did not reach 1.45"
    assert compare_runs.reached(compare_runs.curve(fast), 1.4) == (15, 1.5)  # at the target counts as reached
    assert lines[3] == f"drawn in {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # train.py's own records: an eval at every log step, each at that log record's seconds, rising
    real = compare_runs.curve(Path(cfg.out_dir))
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    clock = {r["iter"]: r["train_seconds"] for r in records if "train_seconds" in r}
    assert real.steps == [0, 50, 100, 150] and real.seconds == [0.0] + [clock[s] for s in real.steps[1:]]
    assert all(a < b for a, b in zip(real.seconds, real.seconds[1:])) and real.final[0] == clock[150]
    assert lines[2].startswith(f"{real.name}: 4 evals over {clock[150]:.1f} s")

    # the picture draws what the report says: each run's losses at its seconds, its star, the target
    fig = compare_runs.figure([compare_runs.curve(fast), compare_runs.curve(slow)], 1.45)
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert drawn["fast"] == ([0.0, 1.5, 4.0], [4.0, 1.4, 1.3]) and drawn["slow"] == ([0.0, 10.0], [4.0, 1.5])
    assert drawn["fast, whole split: 1.3500"] == ([4.0], [1.35]) and drawn["target 1.45"][1] == [1.45, 1.45]


def test_the_clock_between_log_steps_and_past_the_last(tmp_path):
    """Between log records, and from (0, 0) to the first, the seconds are read off a line; a step past the last log
    record keeps that record's seconds rather than run on."""
    assert compare_runs.seconds_at([10, 20, 25], {10: 3.0, 20: 5.0}) == [3.0, 5.0, 5.0]
    assert compare_runs.seconds_at([0, 5], {10: 3.0}) == [0.0, 1.5]


def test_a_run_is_reported_by_its_best_eval_and_last_whole_split_score_and_drawn_with_its_scores_in_view(tmp_path,
                                                                                                        capsys):
    """A run whose loss rose again by its end reports its best eval, not its last; a run resumed past its end scored
    the whole split twice, and the later score is the one at its end. The picture's loss axis leaves step 0's
    untrained loss off the top and keeps the stars and the target in view. --runs may have spaces after its
    commas, and --out may be a .PNG."""
    resumed = write_run(tmp_path / "resumed", [
        {"iter": 0, "val_loss": 4.0}, {"iter": 10, "train_seconds": 1.0}, {"iter": 10, "val_loss": 1.2},
        {"iter": 10, "final_val_loss": 1.25}, {"iter": 20, "train_seconds": 3.0}, {"iter": 20, "val_loss": 1.6},
        {"iter": 20, "final_val_loss": 1.1}])
    other = write_run(tmp_path / "other", [{"iter": 0, "val_loss": 5.0}, {"iter": 10, "train_seconds": 2.0},
                                           {"iter": 10, "val_loss": 2.0}])
    compare_runs.main([f"--runs={resumed}, {other}", "--target=0.9", f"--out={tmp_path / 'RUNS.PNG'}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["resumed: 3 evals over 3.0 s, best val 1.2000, whole split 1.1000 at 3.0 s; did not reach 0.9",
                         "other: 2 evals over 2.0 s, best val 2.0000; did not reach 0.9"]
    assert (tmp_path / "RUNS.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = [compare_runs.curve(resumed), compare_runs.curve(other)]
    # from the lowest of the evals past step 0, the stars and the target, to the highest of them
    assert compare_runs.figure(curves, 0.9).axes[0].get_ylim() == pytest.approx((0.9 - 0.05, 2.0 + 0.1))
    assert compare_runs.figure(curves, 0.0).axes[0].get_ylim() == pytest.approx((1.1 - 0.05, 2.0 + 0.1))


def test_bad_runs_and_outputs_are_refused_in_one_line(tmp_path):
    fast, _ = fast_and_slow(tmp_path)
    old = write_run(tmp_path / "old", [{"iter": 0, "val_loss": 4.0}, {"iter": 10, "train_loss": 2.0},
                                       {"iter": 10, "val_loss": 2.0}])  # written before train_seconds
    unevaluated = write_run(tmp_path / "unevaluated", [{"iter": 10, "train_loss": 2.0, "train_seconds": 1.0}])
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.png").mkdir()
    for args, said in (
        ([f"--runs={tmp_path / 'nothing'}"], "has no metrics.jsonl: --runs takes the out_dirs of train.py's runs"),
        ([f"--runs={old}"], "has no train_seconds: it was written before train.py recorded them"),
        ([f"--runs={unevaluated}"], "holds no eval (val_loss) yet"),
        (["--runs= ,"], "--runs names no run"),
        ([f"--runs={fast}", "--target=-1"], "target must be a loss"),
        ([f"--runs={fast}", f"--out={tmp_path / 'a_file' / 'runs.png'}"], "is a file; give --out a path you can write"),
        ([f"--runs={fast}", "--out="], "--out must name a .png file"),
        ([f"--runs={fast}", "--out=."], "--out must name a .png file"),
        ([f"--runs={fast}", f"--out={tmp_path / 'runs.svg'}"], "--out must name a .png file"),
        ([f"--runs={fast}", f"--out={fast.parent}/"], "--out must name a .png file"),
        ([f"--runs={fast}", f"--out={tmp_path / 'folder.png'}"], "is a folder: give a .png file's path"),
    ):
        out = [] if any(a.startswith("--out=") for a in args) else [f"--out={tmp_path / 'runs.png'}"]
        result = python("scripts/compare_runs.py", *args, *out)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert not (tmp_path / "runs.png").exists()


def test_losses_that_are_not_finite_leave_no_point_and_runs_of_one_name_are_told_apart(tmp_path, capsys):
    """A blown-up eval (NaN, which json reads) is not drawn; two out_dirs both called out are named by their paths."""
    a = write_run(tmp_path / "a" / "out", [{"iter": 0, "val_loss": 4.0}, {"iter": 10, "train_seconds": 1.0},
                                           {"iter": 10, "val_loss": float("nan")}, {"iter": 20, "train_seconds": 2.0},
                                           {"iter": 20, "val_loss": 2.0}])
    b = write_run(tmp_path / "b" / "out", [{"iter": 0, "val_loss": 4.0}])
    assert compare_runs.curve(a).val_loss == [4.0, 2.0]
    compare_runs.main([f"--runs={a},{b}", f"--out={tmp_path / 'runs.png'}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"{a}: 2 evals over 2.0 s, best val 2.0000", f"{b}: 1 eval over 0.0 s, best val 4.0000"]
