"""Nothing lost: crash-safe checkpoints, signals, NaN stops, clear one-line errors, safe loading."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import sample
import train
from glimpse.checkpoint import best_path, checkpoint_path, describe, load_checkpoint, refusal_reason
from glimpse.errors import GlimpseError
from glimpse.run_folder import check_out_dir
from glimpse.runtime import StopRequest
from model import GPT
from tests.conftest import REPO, files_in, make_corpus, python, tiny_config
from tests.test_train import read_metrics

TINY = ["--dataset=tiny", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
        "--batch_size=4", "--eval_iters=2", "--attn_log_interval=0"]


def start_training(data_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged(out: Path) -> list[dict]:
    """The complete lines of a running (or killed) run's metrics.jsonl; a line cut off mid-write is left out."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def wait_for(condition, what: str, timeout: float = 120):
    """Wait for an event of a running process (a deadline only so that a broken run fails the test)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"no {what} after {timeout}s")


def wait_for_steps(out: Path, n: int):
    wait_for(lambda: len(logged(out)) >= n, f"{n} metrics lines in {out}")


def wait_for_step(out: Path, step: int):
    wait_for(lambda: any(r["iter"] >= step and "train_loss" in r for r in logged(out)), f"step {step} in {out}")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_9_at_random_moments_never_leaves_an_unreadable_checkpoint(tmp_path, data_dir):
    """Checkpoint every step through checkpoint_interval_s alone (no eval saves) and kill -9 the run again
    and again, each time a random number of steps after it started or resumed."""
    out = tmp_path / "out"
    rng = random.Random(0)
    args = ["--max_iters=1000000", "--eval_interval=1000000", "--log_interval=1", "--checkpoint_interval_s=0.001"]
    for _ in range(4):
        start = load_checkpoint(checkpoint_path(out))["iter_num"] if checkpoint_path(out).exists() else 0
        proc = start_training(data_dir, out, *args, *(["--init_from=resume"] if start else []))
        wait_for_step(out, start + rng.randint(3, 40))  # somewhere in the stream of saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL  # the run really was killed mid-way
        assert load_checkpoint(checkpoint_path(out))["iter_num"] > start  # whole, loadable and newer
    last = load_checkpoint(checkpoint_path(out))["iter_num"]
    args[0] = f"--max_iters={last + 20}"
    done = python("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, *args, "--init_from=resume")
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(checkpoint_path(out))["iter_num"] == last + 20
    iters = [r["iter"] for r in read_metrics(out) if "train_loss" in r]
    assert iters == sorted(set(iters)) and iters[-1] == last + 20  # resumed runs continue the log, never repeat it


def test_a_run_printing_into_a_pipe_sends_each_line_as_it_is_printed(tmp_path, data_dir):
    """Into a file or a pipe Python buffers stdout by blocks: a log (`> log 2>&1`, `| tee`) would get a run's lines
    long after they were printed, or at its end. Each line comes as it is printed: this one long before the end."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    with subprocess.Popen([sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *TINY,
                           "--max_iters=20000", "--log_interval=1000", "--eval_interval=100000"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            first = next((line for line in proc.stdout if line.startswith("step ") and ": loss " in line), "")
            proc.send_signal(signal.SIGTERM)  # the run stops at its next step, saving its checkpoint
            err = proc.stderr.read()
        finally:
            proc.kill()
    assert first.startswith("step 1000: loss "), err
    assert proc.returncode == 143, err  # still running when the line came, not printing it at its end
    assert load_checkpoint(checkpoint_path(tmp_path))["iter_num"] < 20000


@pytest.mark.parametrize("always", [True, False])
def test_always_save_checkpoint_decides_whether_evals_write_ckpt_pt(tmp_path, data_dir, always):
    """Killed between evals: ckpt.pt is there from the last eval, or (always_save_checkpoint=false) not at all;
    best.pt is there either way."""
    out = tmp_path / "out"
    proc = start_training(data_dir, out, "--max_iters=1000000", "--eval_interval=20", "--log_interval=1",
                          f"--always_save_checkpoint={str(always).lower()}")
    wait_for_step(out, 42)  # past the evals of steps 20 and 40, and their saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    evals = {r["iter"] for r in logged(out) if "val_loss" in r and r["iter"] > 0}
    assert load_checkpoint(best_path(out))["iter_num"] in evals
    if always:
        assert load_checkpoint(checkpoint_path(out))["iter_num"] in evals - {20}
    else:
        assert not checkpoint_path(out).exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_checkpoint_and_exit_cleanly(tmp_path, data_dir, sig, code):
    out = tmp_path / "out"
    proc = start_training(data_dir, out, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1")
    wait_for_steps(out, 5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    # what the signal does is said (on stderr, at once: see the next test)
    assert f"{sig.name}: stopping with a checkpoint once the step or eval under way ends; Ctrl-C again to quit at " \
        "once without one" in stderr.splitlines()
    state = load_checkpoint(checkpoint_path(out))
    assert state["iter_num"] >= 4
    # its val loss is step 0's, the last eval's, and the line the scripts print on loading it says so
    assert state["val_loss_step"] == 0
    assert describe(out, state) == f"{out} (step {state['iter_num']}, val loss {state['val_loss']:.4f} at step 0)"
    resumed = python("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--init_from=resume",
                     f"--max_iters={state['iter_num'] + 3}", "--eval_interval=100000", "--log_interval=1")
    assert resumed.returncode == 0, resumed.stderr
    final = load_checkpoint(checkpoint_path(out))
    assert final["iter_num"] == state["iter_num"] + 3
    assert describe(out, final) == f"{out} (step {final['iter_num']}, val loss {final['val_loss']:.4f})"  # its own


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process pid has a handler of its own for sig (Linux's /proc: Python handles SIGTERM only once told)."""
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE).group(1)
    return bool(int(caught, 16) >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal handlers from /proc")
def test_a_signal_during_a_long_eval_is_answered_at_once(tmp_path, data_dir):
    """Step 0's eval of 10^6 batches (minutes): Ctrl-C is answered while it runs, saying that the run stops once the
    eval ends and how to quit now; the second Ctrl-C quits."""
    out = tmp_path / "out"
    proc = start_training(data_dir, out, "--max_iters=10", "--eval_iters=1000000")
    try:
        wait_for(lambda: catches(proc.pid, signal.SIGTERM), "the run's signal handlers")  # set as the loop starts
        err = []  # stderr's lines as they come, read beside the test
        threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: any(line.startswith("SIGINT: ") for line in err), "the signal's line on stderr")
        assert ("SIGINT: stopping with a checkpoint once the step or eval under way ends; Ctrl-C again to quit at once "
                "without one\n") in err
        assert proc.poll() is None and not logged(out)  # the eval goes on: no record of it yet
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        wait_for(lambda: any("interrupted" in line for line in err), "interrupted")
        assert proc.returncode == 130
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal handlers from /proc")
def test_a_signal_in_the_last_steps_eval_stops_before_the_final_eval_with_stderr_gone(tmp_path, data_dir):
    """The last step's eval under way (max_iters=0: step 0 is the last) when Ctrl-C comes: the run stops as the
    message says, with a checkpoint and exit 130, not after the final eval with 0. And stderr closed by then (a
    `| tee` the same Ctrl-C ended) does not turn the message into an error that loses the checkpoint."""
    out = tmp_path / "out"
    proc = start_training(data_dir, out, "--max_iters=0", "--eval_iters=3000")
    try:
        wait_for(lambda: catches(proc.pid, signal.SIGTERM), "the run's signal handlers")
        proc.stderr.close()
        proc.send_signal(signal.SIGINT)
        said = proc.stdout.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, said
    assert f"stopped by SIGINT at step 0; checkpoint saved: continue with --init_from=resume --out_dir={out}\n" \
        in said and "final val loss" not in said
    assert load_checkpoint(checkpoint_path(out))["iter_num"] == 0


def test_a_second_signal_stops_at_once_and_the_handlers_are_put_back():
    """The first SIGINT is remembered (the run checkpoints at the end of its step); a second one, for a user who
    does not want to wait for the save, stops at once; afterwards Ctrl-C is Python's own again."""
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGINT  # the signal that asked for the checkpoint
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_the_first_signal_is_said_once_a_machine_and_a_thread_may_ask_for_stops_without_handling_them(
        monkeypatch, capfd):
    """torchrun sends the signal to every process of the machine: the first (LOCAL_RANK 0) says it. Off the main
    thread (training started from a notebook's thread), where Python lets no code handle signals, a StopRequest
    takes none, rather than failing."""
    for local_rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        stop = StopRequest()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
        finally:
            stop.restore()
        err = capfd.readouterr().err
        assert ("SIGINT: stopping with a checkpoint once the step or eval under way ends" in err) == said, local_rank
    made = []
    thread = threading.Thread(target=lambda: made.append(StopRequest()))
    thread.start()
    thread.join()
    assert len(made) == 1 and made[0].previous == {} and made[0].signum is None


def test_nan_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, data_dir):
    out = tmp_path / "out"
    train.train(tiny_config(data_dir, out, max_iters=20, eval_interval=10, attn_log_interval=0))
    before = {p: digest(p) for p in (checkpoint_path(out), best_path(out))}
    exploded = python("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--init_from=resume",
                      "--n_layer=2", "--n_embd=32", "--block_size=32", "--batch_size=16",
                      "--max_iters=60", "--eval_interval=10", "--log_interval=1", "--learning_rate=1e30",
                      "--grad_clip=0", "--warmup_iters=0")
    assert exploded.returncode == 2
    assert "Traceback" not in exploded.stderr
    message = exploded.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the ") and " at step " in message
    assert f"{checkpoint_path(out)} and {best_path(out)} kept as they were" in message
    assert {p: digest(p) for p in before} == before


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "evil"
    out.mkdir()
    torch.save({"model": Payload(), "model_config": {}}, checkpoint_path(out))
    result = python("sample.py", f"--out_dir={out}", "--max_new_tokens=1")
    assert result.returncode == 2 and "refused by the safe loader (Trying to load unsupported GLOBAL " in result.stderr
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr  # not torch's advice to run it
    assert not marker.exists()
    # a file that is no checkpoint at all, read whole (train.py's resume) or memory-mapped (sample.py's way, which
    # takes a file that is no zip for torch's format before 1.6 and reads it whole)
    (tmp_path / "garbage").mkdir()
    checkpoint_path(tmp_path / "garbage").write_text("garbage\n")
    for mmap in (False, True):
        with pytest.raises(GlimpseError, match=r"refused by the safe loader \(Unsupported operand .*\): it is not a "
                                               r"glimpse checkpoint") as error:
            load_checkpoint(checkpoint_path(tmp_path / "garbage"), mmap=mmap)
        assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_the_safe_loaders_refusal_keeps_what_it_found_and_not_torchs_advice():
    """torch's refusal wraps what it found in advice to load the file unsafely or to allow more globals, which would
    run or trust what the file holds: the error keeps the finding alone, its first sentence, as torch 2.13 words
    both kinds of refusal."""
    advice = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
              "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` "
              "will likely succeed, but it can result in arbitrary code execution.\n")
    docs = "\n\nCheck the documentation of torch.load to learn more about types accepted by default with weights_only."
    blocked = advice + "\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked." + docs
    assert refusal_reason(blocked) == "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
    allowlist = (advice + "Please file an issue with the following so that we can make `weights_only=True` compatible "
                 "with your use case: WeightsUnpickler error: \n\nUnsupported global: GLOBAL shop.Basket was not an "
                 "allowed global by default. Please use `torch.serialization.add_safe_globals([shop.Basket])` to "
                 "allowlist this global if you trust this class/function." + docs)
    assert refusal_reason(allowlist) == "Unsupported global: GLOBAL shop.Basket was not an allowed global by default"


def test_a_damaged_best_pt_points_to_ckpt_pt_only_where_there_is_one(tmp_path):
    """A best.pt that cannot be read says to read the run's ckpt.pt instead, where the run has one; alone, it says
    to use another checkpoint, not to read one that is not there."""
    best_path(tmp_path).write_bytes(b"junk\n")
    with pytest.raises(GlimpseError, match=r"is corrupt or truncated \(KeyError\); use another checkpoint$"):
        load_checkpoint(best_path(tmp_path))
    checkpoint_path(tmp_path).write_bytes(b"junk\n")
    with pytest.raises(GlimpseError, match=r"\(KeyError\); read ckpt.pt instead with --checkpoint=last$"):
        load_checkpoint(best_path(tmp_path))


def run_main(main, argv, capsys) -> str:
    """Run a script's main as the command line would; return its one error line (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    return err[-1]


def test_training_input_errors_are_one_line_and_overwrite_nothing(tmp_path, data_dir, corpus_file, capsys):
    out = tmp_path / "out"
    train.train(tiny_config(data_dir, out, max_iters=10, eval_interval=10, attn_log_interval=0, n_layer=1,
                            n_head=2, n_embd=16, block_size=16, batch_size=4))  # the shape TINY asks for
    files = files_in(out)
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY]
    cases = [
        (common + ["--max_iters=20"], "exists: continue it with --init_from=resume"),
        (common + ["--init_from=resume", "--n_layer=3"], "n_layer=3 contradicts the checkpoint's n_layer=1"),
        (common + ["--init_from=resume", "--n_embd=32"], "n_embd=32 contradicts"),
        (common + ["--init_from=resume", "--block_size=100000"], "fewer than block_size + 1"),
        (common + ["--init_from=resume", "--dataset=nothing"], "dataset 'nothing' not found"),
        # a resume that would end before its checkpoint (a typo of max_iters) stops, its config.json left as it was
        (common + ["--init_from=resume", "--max_iters=5"], "the checkpoint is at step 10, past --max_iters=5: raise "
                                                            "--max_iters to go on (the run that wrote it had 10)"),
        (common + ["--block_size=0"], "block_size must be a positive integer, got 0"),
        (common + ["--batch_size=0"], "batch_size must be at least 1"),
        (common + ["--n_embd=30", "--n_head=4"], "divisible by n_head"),
        (common + ["--dropout=1.5"], "dropout must be in [0, 1)"),
        (common + ["--learning_rate=-1"], "learning_rate must be positive, got -1"),  # one key and its value, named
        (common + ["--grad_clip=-0.5"], "grad_clip must not be negative, got -0.5"),
        (common + ["--min_lr=-1e-4"], "min_lr must not be negative, got -0.0001"),
        (common + ["--hellaswag_file=val.jsonl"], "--hellaswag_file is read when --hellaswag_interval is set"),
        (common + ["--weight_decay=-0.1"], "weight_decay must not be negative, got -0.1"),
        (common + ["--init_from= "], "init_from must be scratch, resume, gpt2 (or gpt2-medium, -large, -xl) or a"),
        (common + ["--init_from=resume", "--device=cuda"] if not torch.cuda.is_available()
         else common + ["--dtype=x"], "cuda" if not torch.cuda.is_available() else "dtype must be one of"),
    ]
    for argv, expected in cases:
        assert expected in run_main(train.main, argv, capsys), argv
    # a checkpoint whose tokenizer differs from the dataset's
    other = tmp_path / "other_data"
    from data.prepare import PrepareConfig, prepare

    (tmp_path / "upper.txt").write_text(corpus_file.read_text().upper())
    prepare(PrepareConfig(dataset="tiny", input=str(tmp_path / "upper.txt"), data_dir=str(other)))
    assert f"tokenizer does not match dataset {other / 'tiny'}, not the one it was trained on, " \
        f"{Path(data_dir) / 'tiny'}: a resume takes the run's own settings" in run_main(
        train.main, [f"--data_dir={other}", f"--out_dir={out}", *TINY, "--init_from=resume"], capsys)
    assert files_in(out) == files  # nothing was overwritten
    # the run's own dataset, prepared again since from another corpus: said so, not that its flags differ
    again = tmp_path / "again"
    train.train(tiny_config(other, again, max_iters=2, eval_interval=2, attn_log_interval=0, n_layer=1, n_head=2,
                            n_embd=16, block_size=16, batch_size=4))
    prepare(PrepareConfig(dataset="tiny", input=str(corpus_file), data_dir=str(other)))
    assert f"dataset {other / 'tiny'} was prepared again since the checkpoint was written (or is another folder of " \
        "that name), with another tokenizer than its (char): prepare it as the run had it to resume" in run_main(
        train.main, [f"--data_dir={other}", f"--out_dir={again}", *TINY, "--init_from=resume"], capsys)
    import eval as eval_script  # its length eval reads the run's own dataset: named as prepared again too

    assert f"dataset {other / 'tiny'}, where the run trained, uses another tokenizer than the checkpoint now: it " \
        "was prepared again since (or is another folder of that name)" in run_main(eval_script.main, [
            f"--out_dir={again}", "--device=cpu", "--lengths=1"], capsys)


def overcommits() -> bool:
    """Whether Linux grants any allocation (vm.overcommit_memory 1): a model too big for the machine would then be
    killed when it touches the memory, not refused when it asks for it."""
    setting = Path("/proc/sys/vm/overcommit_memory")
    return setting.is_file() and setting.read_text().strip() == "1"


@pytest.mark.skipif(overcommits(), reason="this machine grants every allocation (vm.overcommit_memory=1)")
def test_asking_for_more_memory_than_the_machine_has_is_one_line_that_says_what_to_lower(tmp_path, data_dir, trained,
                                                                                         capsys):
    out = tmp_path / "out"  # a model of 2.8 TB in float32: its first layer's weights alone are more than any RAM
    error = run_main(train.main, [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--n_embd=480000"], capsys)
    # torch's own words, without the C++ source line before them
    assert error.startswith("error: out of memory: DefaultCPUAllocator: can't allocate memory"), error
    assert re.search(r"allocate [\d,.]+ GiB", error) and "--batch_size" in error and "--n_embd" in error, error
    assert not out.exists()  # refused before the run made its folder
    import eval as eval_script

    cfg, _ = trained  # the Python list of a batch's windows cannot be made
    error = run_main(eval_script.main, [f"--out_dir={cfg.out_dir}", "--lengths=1", "--batch_size=100000000000"],
                     capsys)
    assert error == ("error: out of memory; ask for less: a smaller --batch_size (windows per forward pass) or "
                     "shorter --lengths, or --device=cpu when on a GPU"), error


def test_a_gpus_out_of_memory_is_one_line_with_torchs_size_and_free_memory_and_other_errors_are_left_alone(capsys):
    from glimpse.errors import UserExit, user_errors

    said = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.25 "
            "GiB is free. Including non-PyTorch memory, this process has 77.93 GiB memory in use. Of the allocated "
            "memory 76.1 GiB is allocated by PyTorch. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.\nSee documentation for Memory "
            "Management")
    with pytest.raises(UserExit) as stop, user_errors(out_of_memory="lower --batch_size"):
        raise torch.OutOfMemoryError(said)
    assert stop.value.code == 2
    assert stop.value.message == ("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                  "capacity of 79.19 GiB of which 1.25 GiB is free; lower --batch_size")
    assert capsys.readouterr().err == f"error: {stop.value.message}\n"
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"), user_errors():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # a bug's error keeps its traceback
    assert capsys.readouterr().err == ""
    # MPS's and Windows' wordings: the sizes kept, torch's advice to lift the device's limit left out
    from glimpse.errors import out_of_memory_message

    mps = RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: "
                       "18.13 GB). Tried to allocate 2.00 GB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 "
                       "to disable upper limit for memory allocations (may cause system failure).")
    assert out_of_memory_message(mps, "less") == (
        "out of memory: MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: "
        "18.13 GB). Tried to allocate 2.00 GB on private pool; less")
    windows = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 314572800 bytes.")
    assert out_of_memory_message(windows, "less") == ("out of memory: DefaultCPUAllocator: not enough memory: you "
                                                      "tried to allocate 300.0 MiB; less")
    assert out_of_memory_message(MemoryError(), "") == "out of memory; the machine has too little memory for this"


def test_a_one_line_error_names_both_paths_of_a_move_and_sizes_from_a_gibibyte_in_gib(tmp_path):
    """A move the system refuses names both its paths; one without a path says what kind of error it was; a size
    reads in GiB from exactly 1 GiB on; a folder given for a text file is said to be one."""
    from glimpse.errors import os_error_message, read_utf8, size

    moved = OSError(18, "Invalid cross-device link", "/data/a.part", None, "/mnt/a")
    assert os_error_message(moved) == "could not use '/data/a.part' and '/mnt/a': Invalid cross-device link"
    assert os_error_message(OSError(28, "No space left on device")) == "No space left on device (OSError)"
    assert (size(2**30), size(2**30 - 2**20)) == ("1.0 GiB", "1,023.0 MiB")
    with pytest.raises(GlimpseError) as error:
        read_utf8(tmp_path, "prompt file")
    assert str(error.value) == f"prompt file {str(tmp_path)!r} is a folder; give a UTF-8 text file"


def test_a_checkpoint_too_big_for_the_device_is_out_of_memory_not_corrupt(trained, tmp_path, monkeypatch,
                                                                          capsys):
    """torch.load onto a full GPU raises torch.OutOfMemoryError (a RuntimeError): the loads that call every
    RuntimeError a damaged file let it through, to the out-of-memory line. (No GPU here: torch.load raises it.)"""
    cfg, _ = trained

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 3.25 MiB is free. Including non-PyTorch memory, this process "
                                     "has 79.18 GiB memory in use.")

    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", full)
        error = run_main(sample.main, [f"--out_dir={cfg.out_dir}", "--max_new_tokens=2"], capsys)
    assert error.startswith("error: out of memory: CUDA out of memory. Tried to allocate 20.00 MiB.") and \
        "corrupt" not in error and "--mechanism=false" in error, error
    # read whole, the weights may still not fit where the model is built, or where a resume puts them
    with monkeypatch.context() as patched:
        patched.setattr(GPT, "with_weights", full)
        error = run_main(sample.main, [f"--out_dir={cfg.out_dir}", "--max_new_tokens=2"], capsys)
    assert error.startswith("error: out of memory: CUDA out of memory.") and "cannot build" not in error, error
    out = tmp_path / "out"
    shutil.copytree(cfg.out_dir, out)
    files = files_in(out)
    for where in (torch.nn.Module, torch.optim.Optimizer):
        with monkeypatch.context() as patched:
            patched.setattr(where, "load_state_dict", full)
            error = run_main(train.main, ["--init_from=resume", f"--out_dir={out}", "--max_iters=200"], capsys)
        assert error.startswith("error: out of memory: CUDA out of memory.") and "does not fit" not in error, error
        assert "--batch_size" in error and files_in(out) == files


def test_a_second_run_in_a_folder_a_run_is_training_in_is_refused_and_changes_nothing(tmp_path, data_dir, capsys):
    """A resume started while the run still trains (or the same --out_dir given twice) would interleave records and
    checkpoints with it, and drop its newest records as if stale: it is refused before it writes anything, and the
    folder is free again once the first run ends, however it ends."""
    # the same --out_dir given twice (no checkpoint yet), and a resume of a run whose checkpoint is written
    for name, every, second in (("twice", 1000000, []), ("out", 5, ["--init_from=resume"])):
        out = tmp_path / name
        first = start_training(data_dir, out, "--max_iters=1000000", f"--eval_interval={every}", "--log_interval=1")
        try:
            wait_for_step(out, 6)  # past the eval of step 5 and its checkpoint, where there is one
            error = run_main(train.main, [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, *second], capsys)
            assert error == (f"error: another train.py is training in {out}: wait for it to end (or stop it), or give "
                             "this run another --out_dir"), name
            assert first.poll() is None  # the first run goes on
        finally:
            first.kill()  # however it ends, the lock goes with the process
            first.wait()
        steps = [r["iter"] for r in logged(out) if "train_loss" in r]
        assert steps == sorted(set(steps)) and len(steps) >= 6  # one run's records, none dropped or repeated
    resumed = python("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--init_from=resume",
                     f"--max_iters={load_checkpoint(checkpoint_path(out))['iter_num'] + 2}", "--eval_interval=100000")
    assert resumed.returncode == 0, resumed.stderr
    # a run that fails before it writes anything takes back the folder it made
    fresh = tmp_path / "fresh" / "run"  # both folders made for it
    assert "dataset 'nothing' not found" in run_main(train.main, [f"--data_dir={data_dir}", f"--out_dir={fresh}",
                                                                  *TINY, "--dataset=nothing"], capsys)
    assert not (tmp_path / "fresh").exists()


def test_paths_the_system_refuses_are_one_line_errors_naming_them(tmp_path, data_dir, trained, capsys):
    """Paths no check foresaw, which the operating system refuses (a name past 255 bytes, a file where a folder
    must go, a folder under a file): one line that names the path and says why, exit 2, no traceback."""
    import export

    cfg, _ = trained
    long_name = tmp_path / ("x" * 300)
    line = run_main(train.main, [f"--data_dir={data_dir}", f"--out_dir={long_name}", *TINY], capsys)
    assert line == f"error: could not use {str(long_name)!r}: File name too long"
    loop = tmp_path / "loop"
    loop.symlink_to("loop")  # mkdir took a link to nothing for a folder that exists
    line = run_main(train.main, [f"--data_dir={data_dir}", f"--out_dir={loop}", *TINY], capsys)
    assert line == f"error: --out_dir {loop} is a link to nothing (loop): remove it or name another"
    line = run_main(train.main, [f"--data_dir={data_dir}", f"--out_dir={loop / 'run'}", *TINY], capsys)
    assert line == f"error: --out_dir {loop / 'run'} is under {loop}, which is a link to nothing (loop): remove " \
                   "it or name another"
    line = run_main(sample.main, [f"--out_dir={loop}"], capsys)
    assert line.startswith(f"error: no best.pt or ckpt.pt in {loop} (a link to nothing): train one first")
    (tmp_path / "dumps").mkdir()
    (tmp_path / "dumps" / "sample_0").write_text("a file where the first dump's folder goes")
    line = run_main(sample.main, [f"--out_dir={cfg.out_dir}", "--max_new_tokens=2", "--num_samples=1",
                                  f"--dump_dir={tmp_path / 'dumps'}"], capsys)
    assert line.startswith(f"error: could not use {str(tmp_path / 'dumps' / 'sample_0')!r}")
    (tmp_path / "afile").write_text("")
    line = run_main(export.main, [f"--out_dir={cfg.out_dir}", f"--to={tmp_path / 'afile' / 'hf'}"], capsys)
    assert line.startswith("error: could not use ") and "Not a directory" in line


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KB tmpfs, mounted for the test (root only): a disk that fills up as a checkpoint is written."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_run(tmp_path, trained):
    """The session's trained run on a tmpfs mounted read-only (root only), as a run on another user's disk is."""
    cfg, _ = trained
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        for name in ("ckpt.pt", "best.pt", "config.json", "metrics.jsonl"):
            shutil.copy(Path(cfg.out_dir) / name, folder / name)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:  # lazily: the checkpoints read there are memory-mapped by models this process may still hold
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_a_read_only_folder_is_refused_before_the_work_not_after_it(read_only_run, capsys):
    """sample.py generated every sample, eval.py scored every window, before finding they could not write."""
    import eval as eval_script

    for main, argv, place, instead in [
            (sample.main, ["--max_new_tokens=2"], f"--dump_dir '{read_only_run / 'attention'}' cannot be written (in "
             f"'{read_only_run}')", "give --dump_dir a folder you can write, or --dump_attention=false"),
            (eval_script.main, ["--lengths=1"], f"the results' folder '{read_only_run}' cannot be written",
             "copy the run to a folder you can write (--ablate alone writes nothing)")]:
        error = run_main(main, [f"--out_dir={read_only_run}", "--device=cpu", *argv], capsys)
        assert error == f"error: {place}: it is read-only to this user; {instead}", error
    # the samples were not generated first: nothing on stdout before the error
    with pytest.raises(SystemExit):
        sample.main([f"--out_dir={read_only_run}", "--device=cpu", "--max_new_tokens=2"])
    assert capsys.readouterr().out == ""
    # what writes nothing still runs there: sampling without dumps, the loss without a head
    assert sample.main([f"--out_dir={read_only_run}", "--device=cpu", "--max_new_tokens=2",
                        "--dump_attention=false"]) is None
    assert eval_script.main([f"--out_dir={read_only_run}", "--device=cpu", "--ablate=0.0"]) is None


def test_a_checkpoint_that_fills_the_disk_is_an_os_error_and_keeps_the_old_one(small_disk):
    """torch's writer meets a short write as a RuntimeError ('unexpected pos'), which slipped past train.py's
    handler as a traceback: it is an OSError (ENOSPC) now, the half-written file gone and the old one whole."""
    from glimpse.checkpoint import save_checkpoint

    (small_disk / "best.pt").write_bytes(b"the previous checkpoint")
    with pytest.raises(OSError) as raised:
        save_checkpoint(small_disk / "best.pt", {"w": torch.randn(100, 1000)})  # 400 KB
    assert raised.value.errno == 28 and "is the disk full?" in str(raised.value)
    assert [p.name for p in small_disk.iterdir()] == ["best.pt"]
    assert (small_disk / "best.pt").read_bytes() == b"the previous checkpoint"


def test_a_preparation_that_fills_the_disk_says_so_keeps_the_dataset_and_gives_the_room_back(small_disk, tmp_path,
                                                                                              capsys):
    from data.prepare import main as prepare_main

    (tmp_path / "small.txt").write_text(make_corpus(300))  # about 14 kB: it fits
    prepare_main(["--dataset=play", f"--input={tmp_path / 'small.txt'}", f"--data_dir={small_disk}"])
    dataset = files_in(small_disk / "play")
    rng = random.Random(0)
    (tmp_path / "big.txt").write_text("".join(rng.choice("abcdefgh \n") for _ in range(400_000)))  # one document
    line = run_main(prepare_main, ["--dataset=play", f"--input={tmp_path / 'big.txt'}", f"--data_dir={small_disk}"],
                    capsys)
    assert line == f"error: the disk holding {small_disk / 'play'} is full: free some space, or prepare into " \
                   "another --data_dir"
    assert files_in(small_disk / "play") == dataset  # the old dataset whole, and no staging folder taking the room
    docs = "".join(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(500))}) + "\n"
                   for _ in range(800))  # 400 kB in documents: shards are finished before the disk is full
    (tmp_path / "docs.jsonl").write_text(docs)
    line = run_main(prepare_main, ["--dataset=docs", f"--input={tmp_path / 'docs.jsonl'}", f"--data_dir={small_disk}",
                                   "--shard_tokens=20000"], capsys)
    staging = next((small_disk / "docs").glob(".preparing-*"))
    assert line.endswith(f"is full: free some space, or prepare into another --data_dir (the finished shards stay in "
                         f"{staging}: the same command, once there is room, goes on from them)")
    assert (staging / "progress.json").exists() and (staging / "train_000000.bin").stat().st_size == 2 * 20000  # uint16


def test_out_dirs_a_run_cannot_use_are_refused_and_left_whole(tmp_path, data_dir, capsys):
    """A run that could not continue, or would overwrite what is not its own, stops in one line before it writes
    anything: the folder it was pointed at (a finished run's metrics.jsonl included) is left as it was."""
    import export

    out = tmp_path / "out"
    train.train(tiny_config(data_dir, out, max_iters=10, eval_interval=5, attn_log_interval=0, n_layer=1,
                            n_head=2, n_embd=16, block_size=16, batch_size=4))  # the shape TINY asks for
    only_best = shutil.copytree(out, tmp_path / "only_best")  # killed before its first ckpt.pt
    checkpoint_path(only_best).unlink()
    weights_only = shutil.copytree(out, tmp_path / "weights_only")
    shutil.copy(best_path(out), checkpoint_path(weights_only))
    damaged = shutil.copytree(out, tmp_path / "damaged")  # an optimizer state that no longer fits
    state = torch.load(checkpoint_path(damaged), weights_only=True)
    state["optimizer"]["param_groups"].pop()
    torch.save(state, checkpoint_path(damaged))
    edited = shutil.copytree(out, tmp_path / "edited")  # its settings no longer a table
    state = torch.load(checkpoint_path(edited), weights_only=True)
    torch.save({**state, "train_config": ["n_layer", 1]}, checkpoint_path(edited))
    hf = tmp_path / "hf"
    export.main([f"--out_dir={out}", f"--to={hf}"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    records = tmp_path / "records"  # another program's metrics and picture, with no config.json
    records.mkdir()
    (records / "metrics.jsonl").write_text('{"iter": 3, "loss": 1.0}\n')
    (records / "loss.png").write_bytes(b"not ours")
    (tmp_path / "a_file").write_text("notes")
    capsys.readouterr()
    files = files_in(tmp_path)
    cases = [
        ([f"--out_dir={only_best}"], "from a run that stopped before saving ckpt.pt"),
        ([f"--out_dir={only_best}", "--init_from=resume"], "has best.pt but no ckpt.pt"),
        ([f"--out_dir={weights_only}", "--init_from=resume"], "holds weights without the training state"),
        ([f"--out_dir={damaged}", "--init_from=resume"], "does not fit the run it would resume"),
        ([f"--out_dir={hf}", f"--init_from={hf}"], "is the folder --init_from reads the pretrained model from"),
        # before GPT-2's weights are fetched (gigabytes): a finetune run again instead of resumed
        ([f"--out_dir={out}", "--init_from=gpt2"], "ckpt.pt exists: continue it with --init_from=resume"),
        ([f"--out_dir={foreign}"], "is not a glimpse run's config.json"),
        ([f"--out_dir={records}"], "metrics.jsonl is not a glimpse training run's (no run config.json beside it)"),
        ([f"--out_dir={tmp_path / 'a_file'}"], "is a file, not a folder"),
        (["--out_dir= "], "out_dir must name a folder"),
        # a typo of resume is no missing folder, and is named before the out_dir's checkpoint is
        ([f"--out_dir={out}", "--init_from=resum"], "--init_from=resum is neither scratch nor resume nor a folder: did "
                                                    "you mean --init_from=resume?"),
        ([f"--out_dir={out}", "--init_from=resume", "--optimizer=muon"],
         "a resume takes the run's own settings, those its checkpoint was saved with"),
        ([f"--out_dir={edited}", "--init_from=resume"], "holds its run's settings as list, not the table a run saves"),
        ([f"--out_dir={tmp_path / 'typo'}", "--init_from=resume"],
         f"no checkpoint at {tmp_path / 'typo' / 'ckpt.pt'} (no such folder), so nothing to resume: give the"),
    ]
    for argv, expected in cases:
        assert expected in run_main(train.main, [f"--data_dir={data_dir}", *TINY, *argv], capsys), argv
    # what needs no checkpoint read is refused before any data is prepared: shakespeare_char, which is not in this
    # data_dir, is neither downloaded nor looked for
    unprepared = tmp_path / "unprepared"
    early = cases[:2] + cases[4:9] + cases[10:11] + cases[-1:] + [
        ([f"--out_dir={tmp_path / 'new'}", f"--init_from={out}"], "holds a glimpse run's checkpoints")]
    for argv, expected in early:
        assert expected in run_main(train.main, [f"--data_dir={unprepared}", *TINY, "--dataset=shakespeare_char",
                                                 *argv], capsys), argv
    assert not unprepared.exists() and not (tmp_path / "new").exists() and not (tmp_path / "typo").exists()
    assert files_in(tmp_path) == files  # nothing written, nothing lost


def test_what_a_new_run_finds_in_its_out_dir_decides_whether_it_may_start_there(tmp_path, monkeypatch):
    """Beside the refusals train.py says: a folder reached through a link is a folder; a run's own config.json and
    records (a run stopped before its first checkpoint) and an empty metrics.jsonl (one stopped before its first
    log) are no other program's; a config.json a run did not write, whatever its shape, is refused, and so is a
    loss.png without a run's config.json; the pretrained folder is refused however the path is spelled."""
    def refused(out_dir: Path, init_from: str = "scratch") -> str | None:
        try:
            check_out_dir(out_dir, init_from)
        except GlimpseError as e:
            return str(e)
        return None

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert refused(tmp_path / "link") is None and refused(tmp_path / "link" / "run") is None
    stopped = tmp_path / "stopped"  # config.json and records, no checkpoint
    stopped.mkdir()
    (stopped / "config.json").write_text(json.dumps({"init_from": "scratch", "max_iters": 10, "out_dir": "stopped"}))
    (stopped / "metrics.jsonl").write_text('{"iter": 0, "train_loss": 4.2}\n')
    (stopped / "loss.png").write_bytes(b"its picture")
    assert refused(stopped) is None
    early = tmp_path / "early"  # stopped between metrics.jsonl's start and config.json
    early.mkdir()
    (early / "metrics.jsonl").write_text("")
    assert refused(early) is None
    for name, content in [("partial", {"init_from": "scratch", "max_iters": 10}), ("listed", [1, 2])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(content))
        assert f"{tmp_path / name / 'config.json'} is not a glimpse run's config.json" in refused(tmp_path / name)
    (tmp_path / "a_folder" / "config.json").mkdir(parents=True)
    assert "is not a glimpse run's config.json" in refused(tmp_path / "a_folder")
    (tmp_path / "picture").mkdir()
    (tmp_path / "picture" / "loss.png").write_bytes(b"not ours")
    assert refused(tmp_path / "picture").startswith(f"{tmp_path / 'picture' / 'loss.png'} is not a glimpse training")
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path)
    assert "is the folder --init_from reads the pretrained model from" in refused(Path("hf"), str(tmp_path / "hf"))
    assert "is the folder --init_from reads" in refused(Path("link"), str(real))


def test_dataset_errors(tmp_path, corpus_file, capsys):
    folder = tmp_path / "d" / "nometa"
    folder.mkdir(parents=True)
    assert "not found" in run_main(train.main, [f"--data_dir={tmp_path / 'd'}", "--dataset=nometa",
                                                f"--out_dir={tmp_path / 'o'}", *TINY[1:]], capsys)
    (tmp_path / "short.txt").write_text("abcdefghij" * 3)
    from data.prepare import main as prepare_main

    prepare_main(["--dataset=short", f"--input={tmp_path / 'short.txt'}", f"--data_dir={tmp_path / 'd'}"])
    capsys.readouterr()
    message = run_main(train.main, [f"--data_dir={tmp_path / 'd'}", "--dataset=short", f"--out_dir={tmp_path / 'o'}",
                                    *TINY[1:]], capsys)
    assert "the val split" in message and "fewer than block_size + 1 = 17" in message
    assert message.endswith("use a smaller --block_size, or prepare it again with a larger --val_tokens or "
                            "--val_fraction")
    # shards shorter than a window: more text would not help, bigger shards do
    prepare_main(["--dataset=shards", f"--input={tmp_path / 'short.txt'}", f"--data_dir={tmp_path / 'd'}",
                  "--shard_tokens=10"])
    capsys.readouterr()
    message = run_main(train.main, [f"--data_dir={tmp_path / 'd'}", "--dataset=shards", f"--out_dir={tmp_path / 'o'}",
                                    *TINY[1:]], capsys)
    assert "the train split" in message and "in its longest shard" in message
    assert message.endswith("use a smaller --block_size, or prepare it again with a larger --shard_tokens")
    # a meta.json that is not JSON, or not even text
    for name, content in (("broken", b'{"vocab_size": '), ("binary", bytes(range(256)))):
        (tmp_path / "d" / name).mkdir()
        (tmp_path / "d" / name / "meta.json").write_bytes(content)
        message = run_main(train.main, [f"--data_dir={tmp_path / 'd'}", f"--dataset={name}",
                                        f"--out_dir={tmp_path / 'o'}", *TINY[1:]], capsys)
        assert f"{tmp_path / 'd' / name / 'meta.json'} is not valid JSON (" in message, message


def test_sampling_input_errors(tmp_path, trained, capsys):
    cfg, _ = trained
    good = [f"--out_dir={cfg.out_dir}", "--max_new_tokens=2", "--dump_attention=false"]
    truncated = tmp_path / "cut"
    truncated.mkdir()
    data = checkpoint_path(cfg.out_dir).read_bytes()
    checkpoint_path(truncated).write_bytes(data[: len(data) // 2])
    best_cut = tmp_path / "best_cut"  # best.pt cut short beside a whole ckpt.pt: the error says how to read that one
    best_cut.mkdir()
    checkpoint_path(best_cut).write_bytes(data)
    best_path(best_cut).write_bytes(data[: len(data) // 2])
    edited = {}  # checkpoints with glimpse's keys, edited by hand: a model this glimpse cannot build
    for name, edit in (("key", lambda s: s["model_config"].update(bogus=1)),
                       ("shape", lambda s: s["model_config"].update(n_layer=s["model_config"]["n_layer"] + 1)),
                       ("untokenized", lambda s: s.pop("tokenizer")), ("named", lambda s: s.update(tokenizer="char")),
                       ("short", lambda s: (s["model_config"].update(block_size=3),  # a model of 3 positions
                                            s["model"].update({"transformer.wpe.weight":
                                                               s["model"]["transformer.wpe.weight"][:3]})))):
        state = load_checkpoint(checkpoint_path(cfg.out_dir))
        edit(state)
        edited[name] = tmp_path / f"edited_{name}"
        edited[name].mkdir()
        torch.save(state, checkpoint_path(edited[name]))
    cases = [
        ([f"--out_dir={edited['key']}", "--max_new_tokens=2"], "model this glimpse cannot build (GPTConfig.__init__() "
                                                               "got an unexpected keyword argument 'bogus')"),
        ([f"--out_dir={edited['shape']}", "--max_new_tokens=2"], "model this glimpse cannot build (Error(s) in "
                                                                 "loading state_dict for GPT: Missing key(s)"),
        ([f"--out_dir={edited['untokenized']}"], "ckpt.pt is not a glimpse checkpoint (no tokenizer); use another"),
        ([f"--out_dir={edited['named']}"], "ckpt.pt names no tokenizer glimpse knows ('char'); use another checkpoint"),
        ([f"--out_dir={tmp_path / 'none'}"], f"no best.pt or ckpt.pt in {tmp_path / 'none'} (no such folder): train"),
        ([f"--out_dir={truncated / 'ckpt.pt'}"], "ckpt.pt (a file, not a folder): train one first"),
        ([f"--out_dir={tmp_path}"], f"no best.pt or ckpt.pt in {tmp_path}: train one first"),
        ([f"--out_dir={tmp_path / 'none'}", "--checkpoint=last"], "ckpt.pt (no such folder); train one first"),
        ([f"--out_dir={truncated}", "--checkpoint=best"], f"no {truncated / 'best.pt'}: this run has no eval"),
        ([f"--out_dir={truncated}"], "ckpt.pt is corrupt or truncated (RuntimeError); use another checkpoint"),
        ([f"--out_dir={best_cut}"], "best.pt is corrupt or truncated (RuntimeError); read ckpt.pt instead with "
                                    "--checkpoint=last"),
        (good + ["--start=ROMEO: Ω€"], "'Ω€'"),
        (good + ["--start=Ω\udcff"], "--start is not UTF-8 text (byte 2)"),  # how Python's argv holds b"\xce\xa9\xff"
        (good + ["--temperature=-1"], "temperature must be 0 (greedy) or more"),
        (good + ["--top_k=0"], "top_k must be at least 1"),
        (good + ["--top_p=0"], "top_p must be in (0, 1]"),
        (good + ["--top_p=1.5"], "top_p must be in (0, 1]"),
        (good + ["--head_importance"], "--head_importance shows in the attention dumps"),  # not a silent no-op
        (good + ["--start=FILE:/nonexistent/prompt.txt"], "prompt file '/nonexistent/prompt.txt' not found"),
        (good + ["--start=FILE:"], "--start=FILE: names no file: give its path"),
        ([f"--out_dir={edited['short']}", "--probe=induction"], "the induction probe repeats at least 2 tokens: "
                                                                "block_size 3 is too short for it"),
        ([f"--out_dir={cfg.out_dir}", "--max_new_tokens=2", f"--dump_dir={truncated / 'ckpt.pt'}"], "is a file"),
        ([f"--out_dir={cfg.out_dir}", "--max_new_tokens=2", f"--dump_dir={truncated / 'ckpt.pt' / 'a' / 'b'}"],
         f"cannot be made: {str(truncated / 'ckpt.pt')!r} is a file"),  # it failed after the first sample
    ]
    for argv, expected in cases:
        assert expected in run_main(sample.main, argv, capsys), argv


@pytest.mark.parametrize("junk, kind", [
    (b"junk\n", "KeyError"),  # the bytes read as opcodes: a memo entry that was never stored
    (b"a", "IndexError"),  # an append to an empty stack
    (b"\x80NX", "struct.error"),  # after a warning about pickle protocol 78: a length cut short
    (b"X\x05\x00\x00\x00\xff\xfe\xfd\xfc\xfb.", "UnicodeDecodeError"),  # a string that is not UTF-8
])
def test_damaged_bytes_are_one_line_however_the_unpickler_fails(tmp_path, trained, capsys, junk, kind):
    """A file that is not a zip archive goes to torch's older unpickler, which fails on damage in many ways; each is
    the one line of a damaged checkpoint, without the warning torch prints for the protocol named in the bytes."""
    cfg, _ = trained
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(checkpoint_path(cfg.out_dir), checkpoint_path(folder))
    best_path(folder).write_bytes(junk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = run_main(sample.main, [f"--out_dir={folder}", "--max_new_tokens=2", "--dump_attention=false"],
                           capsys)
    assert message == f"error: {best_path(folder)} is corrupt or truncated ({kind}); read ckpt.pt instead with " \
                      "--checkpoint=last"
    assert not caught, [str(w.message) for w in caught]
    checkpoint_path(folder).write_bytes(junk)  # a resume given its folder alone reads the run's settings there first
    message = run_main(train.main, ["--init_from=resume", f"--out_dir={folder}", f"--data_dir={tmp_path / 'data'}"],
                       capsys)
    assert message == f"error: {checkpoint_path(folder)} is corrupt or truncated ({kind}); use another checkpoint"
    assert not (tmp_path / "data").exists()  # the default dataset was not fetched first, for settings never read


def test_sampling_into_a_pipe_its_reader_closes_stops_quietly(tmp_path, trained):
    """`sample.py | head -c 10`: the prompt alone is more than a pipe holds, so sample.py is still writing when the
    reader closes it, and stops as Unix tools do: nothing on stderr but what it said before, 128 + SIGPIPE."""
    cfg, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(make_corpus(3000))  # about 120 kB: a pipe holds 64 kB
    with subprocess.Popen([sys.executable, "sample.py", f"--out_dir={cfg.out_dir}", f"--start=FILE:{prompt}",
                           "--max_new_tokens=5", "--dump_attention=false"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.read(10) == prompt.read_text()[:10]
        proc.stdout.close()
        err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert err.startswith("sampling from ") and err.count("\n") == 1, err


def test_length_results_it_cannot_write_are_one_line(tmp_path, trained, capsys):
    import eval as eval_script

    cfg, _ = trained
    out = shutil.copytree(cfg.out_dir, tmp_path / "run")
    (out / "length_eval.csv").mkdir()  # in the way of the file
    line = run_main(eval_script.main, [f"--out_dir={out}", "--lengths=1", "--max_tokens=256"], capsys)
    assert line == f"error: could not write the length evaluation to {out}: Is a directory"


def test_a_failing_rank_brings_ddp_down(tmp_path, data_dir):
    """kill -9 one of two torchrun workers: the whole run stops with a clear report instead of hanging."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_iters=100000", "--eval_interval=100000",
         "--log_interval=1", "--gradient_accumulation_steps=2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_steps(out, 3)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and worker_rank(int(p), out) == "1"]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "train.py FAILED" in stderr and "exitcode  : -9" in stderr


@pytest.mark.parametrize("blocker,flags,message", [
    ("attention", ["--attn_log_interval=5"], "could not write the attention snapshot"),
    ("ckpt.pt.tmp", ["--checkpoint_interval_s=0.001"], "could not write"),
])
def test_an_error_on_rank_0_stops_every_rank_at_once(tmp_path, data_dir, blocker, flags, message):
    """Rank 0 alone draws snapshots and writes checkpoints; when that fails, the other rank must not wait for
    it in the next collective (for gloo's half-hour timeout) but fail with it."""
    out = tmp_path / "out"
    out.mkdir()
    if blocker == "attention":
        (out / "attention").write_text("a file where the snapshots' folder should be")
    else:
        (out / blocker).mkdir()  # the checkpoint's temporary file cannot be opened for writing
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_iters=100000", "--eval_interval=100000",
         "--log_interval=1", "--gradient_accumulation_steps=2", *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=240)  # a hang runs into this and fails the test
    finally:
        proc.kill()
    assert proc.returncode != 0
    # rank 0 prints the error once; rank 1, stopped by it rather than left waiting, exits without repeating it
    assert f"error: {message}" in stderr and "error: rank 0 failed while" not in stderr, stderr
    assert 'train.py", line' not in stderr, stderr  # one line each; the only traceback is torchrun's own


def worker_rank(pid: int, out_dir: Path) -> str | None:
    """The RANK a process was started with, if it is a torchrun worker of this test (training into out_dir: not
    one of another run's on the same machine)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    ours = b"train.py" in cmdline and f"--out_dir={out_dir}".encode() in cmdline
    if not ours or b"torch.distributed.run" in cmdline:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


def test_length_study_refuses_what_it_could_not_finish_before_it_trains(tmp_path, data_dir, capsys):
    """An --out it cannot make, lengths past the validation split, or a model of the same name trained for more
    steps than asked: each is one line, before any model trains."""
    sys.path.insert(0, str(REPO / "scripts"))
    import length_study

    (tmp_path / "file").write_text("")
    shutil.copytree(data_dir / "tiny", tmp_path / "data" / "shakespeare_char")  # a small stand-in, prepared
    common = [f"--data_dir={tmp_path / 'data'}", "--encodings=rope", "--seeds=1", "--max_iters=2"]
    line = run_main(length_study.main, [*common, f"--out={tmp_path / 'file' / 'study'}"], capsys)
    assert line.startswith(f"error: cannot make the study's folder --out={tmp_path / 'file' / 'study'}")
    line = run_main(length_study.main, [*common, f"--out={tmp_path / 'long'}", "--lengths=1,100000"], capsys)
    assert "--lengths reach 6,400,000 tokens, more than the validation split's" in line
    assert not (tmp_path / "long" / "rope-seed1337").exists()  # nothing trained
    run = tmp_path / "trained" / "rope-seed1337"
    train.train(tiny_config(data_dir, run, max_iters=3, eval_interval=3, attn_log_interval=0))
    line = run_main(length_study.main, [*common, f"--out={tmp_path / 'trained'}"], capsys)
    assert "holds a model trained for 3 steps, more than --max_iters=2" in line


def test_length_study_checks_its_settings(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import length_study

    assert "unknown encodings bogus" in run_main(length_study.main, ["--encodings=rope,bogus"], capsys)
    assert "names an encoding more than once" in run_main(length_study.main, ["--encodings=rope,alibi,rope"], capsys)
    assert "lengths must be whole numbers" in run_main(length_study.main, ["--lengths=1,x"], capsys)
    assert run_main(length_study.main, ["--seeds=0"], capsys).endswith("seeds must be at least 1, got 0")
    assert "encodings must name at least one of learned" in run_main(length_study.main, ["--encodings="], capsys)
