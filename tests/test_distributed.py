"""DDP through torchrun with gloo on CPU: two processes train exactly as one does."""

import sys

import pytest

from tests.conftest import python, run_script
from tests.test_train import read_metrics

SETTINGS = ["--dataset=tiny", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
            "--batch_size=4", "--gradient_accumulation_steps=4", "--dropout=0.0", "--max_iters=12",
            "--eval_interval=6", "--eval_iters=4", "--log_interval=1", "--learning_rate=3e-3"]


def torchrun(nproc: int, *args: str):
    return run_script(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      "train.py", *args, env={"OMP_NUM_THREADS": "1"})


def test_two_processes_match_one(tmp_path, data_dir):
    """Same global batch (4 micro-steps of 4): rank r takes micro-steps r, r + 2; gradients averaged."""
    one = python("train.py", *SETTINGS, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *SETTINGS, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    single, double = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["iter"] for r in single] == [r["iter"] for r in double] and len(single) == 12 + 3 + 1
    for a, b in zip(single, double):
        for key in ("train_loss", "val_loss", "eval_train_loss", "final_val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)
    steps = [r for r in single if "train_loss" in r]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]  # it did learn


def test_accumulation_must_divide_among_processes(tmp_path, data_dir):
    run = torchrun(2, *SETTINGS, "--gradient_accumulation_steps=3", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path}")
    assert run.returncode != 0
    assert "gradient_accumulation_steps (3) must be a multiple of the number of processes (2)" in run.stderr
