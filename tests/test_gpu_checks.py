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
TESTS = ["gpu_tests", "fsdp_tests"]  # the rehearsal leaves pytest out, exiting 5 as pytest does with no tests


def rehearse(tmp_path, corpus_file, seconds: int):
    """The script run with PYTHON=gpu_rehearsal.py from tmp_path, with OUT_FOLDER and DATA_DIR relative to it:
    they are the caller's, not the repository's the script moves to."""
    prepared = python("data/prepare.py", "--dataset=shakespeare_char", f"--input={corpus_file}",
                      f"--data_dir={tmp_path / 'data'}")
    assert prepared.returncode == 0, prepared.stderr
    run = run_script("bash", str(REPO / "scripts" / "gpu_checks.sh"), "checks", str(seconds), timeout=900,
                     cwd=tmp_path,
                     env={"PYTHON": f"{sys.executable} {REPO / 'tests' / 'gpu_rehearsal.py'}", "DATA_DIR": "data"})
    return run, (tmp_path / "checks" / "summary.txt").read_text()


def test_every_step_of_the_gpu_checks_runs_and_reports(tmp_path, corpus_file):
    checks = tmp_path / "checks"
    run, summary = rehearse(tmp_path, corpus_file, 900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| 2 GPU(s) | torch " in summary.splitlines()[0], summary
    lines = {line.split(":")[0]: line for line in summary.splitlines() if re.match(r"\w+: exit \d+", line)}
    assert list(lines) == STEPS, summary
    # each step's own exit code, and a failed step stops none after it
    assert all(": exit 0," in lines[step] for step in STEPS if step not in TESTS), summary
    assert all(": exit 5," in lines[step] for step in TESTS), summary
    for step in TRAINING:  # the greps of what train.py prints: its steps and seconds, its whole-split loss
        assert re.search(r"\d+ steps in [\d.]+ s of training final val loss \d\.\d{4}", lines[step]), lines[step]
    assert "| 2 steps in " in lines["fsdp_100"] and "| 2 steps in " in lines["fsdp_resume_200"]  # resumed at 2 of 4
    assert summary.count("train_step | torch") == 3 and "a step profiled" in summary  # bench.py's tables, profiles
    # the eager step is the compiled preset with compiling off, and the padded one asks for 50,304 tokens
    presets = re.findall(r"^ .*1\.00x  (config/gpt2_124m\.toml\S*)$", summary, re.M)
    assert [p.split(":device=")[0] for p in presets] == [
        "config/gpt2_124m.toml:hellaswag_interval=0", "config/gpt2_124m.toml:hellaswag_interval=0:compile=false",
        "config/gpt2_124m.toml:hellaswag_interval=0"], summary
    for step, vocab in [("compiled", 50257), ("eager", 50257), ("vocab50304", 50304)]:
        given = re.search(r"^rehearsal: given python (.*)$", (checks / "logs" / f"bench_124m_{step}.log").read_text(),
                          re.M)
        assert f"--vocab_size={vocab} " in given[1] and "--repeats=3 " in given[1], given[1]
    given = {step: (checks / "logs" / f"{step}.log").read_text().splitlines()[0] for step in TRAINING}
    assert "--compile=true" in given["fsdp_compiled_200"]  # what the rehearsal's uncompiled runs cannot tell
    assert given["speedrun_3"].endswith(" --eval_interval=50 --eval_iters=20")  # the curve: 11 evals of 20 batches
    # compiling's own logs, which the summary counts on a GPU: the recompiles, and the graphs left unrecorded
    assert given["speedrun_1"].startswith("rehearsal: given TORCH_LOGS=recompiles python")
    assert given["speedrun_cuda_graphs"].startswith("rehearsal: given TORCH_LOGS=cudagraphs,perf_hints python")
    assert re.search(r"^fsdp vs ddp: largest train-loss difference \d\.\d\de[-+]\d+ over the 4 logs", summary, re.M)
    assert re.search(r"^fsdp compiled vs ddp: largest train-loss difference \d\.\d\de[-+]\d+ over the 4 logs",
                     summary, re.M)
    assert re.search(r"^speedrun_3: 11 evals over [\d.]+ s, best val \d\.\d{4}, whole split.*1\.4697$", summary, re.M)
    assert re.search(r"^recipe: \d+ evals over .*1\.4697$", summary, re.M)  # nanoGPT's best val loss, the target
    assert f"drawn in {checks / 'speedrun_vs_recipe.png'}" in summary
    assert "speedrun_cuda_graphs: 0 graphs left unrecorded" in summary and "done in" in summary.splitlines()[-1]
    assert (checks / "speedrun_vs_recipe.png").read_bytes()[:4] == b"\x89PNG"
    assert "-k cuda" in (checks / "logs" / "gpu_tests.log").read_text()  # the GPU's tests only, not all of them
    with tarfile.open(checks / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{step}.log" for step in STEPS} <= names and "runs/recipe/metrics.jsonl" in names
    assert {f"logs/profile_124m_{mode}/0_gpt2_124m.txt" for mode in ("compiled", "eager")} <= names
    assert not any(name.endswith((".pt", ".dcp")) for name in names)  # the weights are left out
    assert "logs/prepare.log" not in names  # the dataset was there: nothing to prepare
    configs = {c.parent.name: json.loads(c.read_text()) for c in (checks / "runs").glob("*/config.json")}
    assert len(configs) == 11 and all(c["data_dir"] == str(tmp_path / "data") for c in configs.values())
    # what each run is for, in the settings the rehearsal leaves alone (its step counts are the script's / 50)
    assert [name for name, c in sorted(configs.items()) if c["fsdp"]] == ["fsdp", "fsdp_compiled", "fsdp_resumed"]
    assert configs["ddp"]["gradient_accumulation_steps"] == 2  # one micro-step for each of the 2 processes
    assert configs["speedrun_3"]["eval_interval"] == 50 // 50 and configs["speedrun_2"]["eval_interval"] == 100000
    assert configs["recipe"]["max_iters"] == 2000 // 50 and configs["recipe"]["attn_log_interval"] == 0
    assert configs["speedrun_cuda_graphs"]["compile_mode"] == "reduce-overhead"
    assert configs["speedrun_no_dropout"]["dropout"] == 0.0 < configs["speedrun_1"]["dropout"]  # the preset's own
    batch64 = configs["speedrun_batch64"]
    assert (batch64["batch_size"], batch64["max_iters"], batch64["lr_decay_iters"]) == (64, 800 // 50, 800 // 50)


def test_a_budget_too_short_for_a_step_skips_it_and_says_so(tmp_path, corpus_file):
    (tmp_path / "checks" / "runs" / "speedrun_1").mkdir(parents=True)  # a former run's, which a rerun clears
    run, summary = rehearse(tmp_path, corpus_file, 30)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^speedrun_1: skipped \(\d+ s left, needs about 60\)$", summary, re.M), summary
    assert "fsdp_tests: skipped" in summary and ": exit " not in summary  # nothing ran
    assert not (tmp_path / "checks" / "runs" / "speedrun_1").exists()
