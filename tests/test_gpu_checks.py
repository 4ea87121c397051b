"""scripts/gpu_checks.sh rehearsed on the CPU (tests/gpu_rehearsal.py stands in for python): every step runs,
its line in summary.txt says how it went and what it measured, and the picture and the archive are written; a
budget too short for a step skips it and says so."""

from __future__ import annotations

import json
import re
import sys
import tarfile

from tests.conftest import REPO, python, run_script

STEPS = ["speedrun_1", "speedrun_2", "speedrun_3", "recipe_2000", "bench_124m_compiled", "bench_124m_eager",
         "bench_124m_vocab50304", "ddp_200", "fsdp_200", "fsdp_compiled_200", "fsdp_100", "fsdp_resume_200",
         "speedrun_cuda_graphs", "speedrun_no_dropout", "speedrun_batch64", "gpu_tests", "fsdp_tests"]
TRAINING = [s for s in STEPS if not s.startswith(("bench", "gpu_tests", "fsdp_tests"))]


def rehearse(tmp_path, corpus_file, seconds: int):
    data = tmp_path / "data"
    prepared = python("data/prepare.py", "--dataset=shakespeare_char", f"--input={corpus_file}", f"--data_dir={data}")
    assert prepared.returncode == 0, prepared.stderr
    run = run_script("bash", "scripts/gpu_checks.sh", str(tmp_path / "checks"), str(seconds), timeout=900,
                     env={"PYTHON": f"{sys.executable} {REPO / 'tests' / 'gpu_rehearsal.py'}", "DATA_DIR": str(data)})
    return run, (tmp_path / "checks" / "summary.txt").read_text()


def test_every_step_of_the_gpu_checks_runs_and_reports(tmp_path, corpus_file):
    run, summary = rehearse(tmp_path, corpus_file, 900)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split(":")[0]: line for line in summary.splitlines() if re.match(r"\w+: exit \d+", line)}
    assert list(lines) == STEPS, summary
    assert all(": exit 0," in lines[step] for step in STEPS), summary
    for step in TRAINING:  # the greps of what train.py prints: its steps and seconds, its whole-split loss
        assert re.search(r"\d+ steps in [\d.]+ s of training final val loss \d\.\d{4}", lines[step]), lines[step]
    assert summary.count("train_step | torch") == 3 and "a step profiled" in summary  # bench.py's tables, profiles
    assert re.search(r"^fsdp vs ddp: largest train-loss difference \d\.\d\de[-+]\d+ over the 4 logs", summary, re.M)
    assert re.search(r"^speedrun_3: 11 evals over [\d.]+ s, best val \d\.\d{4}, whole split", summary, re.M)
    assert f"drawn in {tmp_path / 'checks' / 'speedrun_vs_recipe.png'}" in summary
    assert "speedrun_cuda_graphs: 0 graphs left unrecorded" in summary and "done in" in summary.splitlines()[-1]
    assert (tmp_path / "checks" / "speedrun_vs_recipe.png").read_bytes()[:4] == b"\x89PNG"
    with tarfile.open(tmp_path / "checks" / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{step}.log" for step in STEPS} <= names and "runs/recipe/metrics.jsonl" in names
    assert not any(name.endswith((".pt", ".dcp")) for name in names)  # the weights are left out
    runs = sorted((tmp_path / "checks" / "runs").glob("*/config.json"))
    assert len(runs) == 11 and all(json.loads(c.read_text())["data_dir"] == str(tmp_path / "data") for c in runs)


def test_a_budget_too_short_for_a_step_skips_it_and_says_so(tmp_path, corpus_file):
    run, summary = rehearse(tmp_path, corpus_file, 30)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^speedrun_1: skipped \(\d+ s left, needs about 60\)$", summary, re.M), summary
    assert "fsdp_tests: skipped" in summary and ": exit " not in summary  # nothing ran
