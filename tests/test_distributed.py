"""DDP through torchrun with gloo on CPU: two processes train exactly as one does."""

import re
import socket
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import CLOCKED, REPO, python, run_script
from tests.test_train import read_metrics

# float32 on every CPU: runs across process layouts are compared to float32's rounding. Under bfloat16 (dtype=auto on
# CPUs with AMX) the keys' bias, whose true gradient is zero, gets a rounding noise that Adam turns into whole steps.
SETTINGS = ["--dataset=tiny", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=4", "--dropout=0.0", "--max_iters=12",
            "--eval_interval=6", "--eval_iters=4", "--log_interval=1", "--learning_rate=3e-3"]


def torchrun(nproc: int, *args: str, env: dict | None = None):
    return run_script(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      "train.py", *args, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("log_interval", [1, 4])  # every 4 steps: the checkpoint at step 6 falls between two logs
def test_two_processes_match_one(tmp_path, data_dir, log_interval):
    """Same global batch (4 micro-steps of 4): rank r takes micro-steps r, r + 2; gradients averaged. A checkpoint
    between log steps averages the loss so far over the processes for the resumed run: the loss logged next must
    still be the mean of its steps."""
    settings = [*SETTINGS, f"--log_interval={log_interval}", f"--data_dir={data_dir}"]
    one = python("train.py", *settings, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *settings, f"--out_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    single, double = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["iter"] for r in single] == [r["iter"] for r in double] and len(single) == 12 // log_interval + 3 + 1
    for a, b in zip(single, double):
        for key in ("train_loss", "val_loss", "eval_train_loss", "final_val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)
        if "final_val_loss" in a:  # the whole split, scored in shares: every window once
            assert b["final_val_tokens"] == a["final_val_tokens"]
    steps = [r for r in single if "train_loss" in r]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]  # it did learn


def test_two_processes_resume_exactly_with_dropout(tmp_path, data_dir):
    """Each process draws its own dropout masks; a resumed run must give each one its own streams back."""
    from glimpse.checkpoint import checkpoint_path, load_checkpoint, saved_rank_states

    with_dropout = [*SETTINGS, "--dropout=0.2", f"--data_dir={data_dir}"]
    assert_two_processes_resume_exactly(tmp_path, with_dropout, stop_at=6)
    ranks = saved_rank_states(load_checkpoint(checkpoint_path(tmp_path / "straight"))["rng"])
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # seeded apart, not alike
    # launched again, the finished run has no step to take, and its final eval stands on every process alike: none
    # waits in the final eval's collectives for another that skipped it
    logged = read_metrics(tmp_path / "straight")
    again = torchrun(2, "--init_from=resume", f"--out_dir={tmp_path / 'straight'}")
    assert again.returncode == 0 and "as the run logged it at step 12 (metrics.jsonl)" in again.stdout, again.stderr
    assert read_metrics(tmp_path / "straight") == logged


def assert_two_processes_resume_exactly(tmp_path, settings: list[str], stop_at: int):
    """Two processes straight through, and stopped at step stop_at then resumed, log the same records. The resume is
    given its folder and the last step alone: the run's own settings come from its checkpoint, under torchrun too."""
    straight = torchrun(2, *settings, f"--out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    half = torchrun(2, *settings, f"--max_iters={stop_at}", f"--out_dir={tmp_path / 'halves'}")
    assert half.returncode == 0, half.stderr
    max_iters = [flag for flag in settings if flag.startswith("--max_iters=")][-1]
    preset = tmp_path / "preset.toml"
    preset.write_text("learning_rate = 0.5\n")  # the run's own rate stands over it, as one process says
    rest = torchrun(2, str(preset), "--init_from=resume", max_iters, f"--out_dir={tmp_path / 'halves'}")
    assert rest.returncode == 0, rest.stderr
    noted = re.findall(r"note: a resume takes the run's own settings over a preset's: learning_rate \S+ \(the "
                       r"preset's 0\.5\) \(a flag changes a training setting; the model's shape and the "
                       r"optimizer's kind stay the checkpoint's\)\n", rest.stdout)
    assert len(noted) == 1, rest.stdout  # said once, not by every process
    strip = lambda rs: [{k: v for k, v in r.items() if k not in CLOCKED} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "halves")) == strip(read_metrics(tmp_path / "straight"))


def test_two_processes_share_one_time_budget(tmp_path, data_dir):
    """Under --max_time the processes agree at each log step on the slowest clock, and so on the learning rate and
    the step to stop at: were each to follow its own, one would stop while the other waits for it in a collective."""
    run = torchrun(2, *SETTINGS, "--max_iters=1000000", "--max_time=1.5", "--log_interval=2", "--eval_interval=1000000",
                   "--warmup_iters=0", f"--data_dir={data_dir}", f"--out_dir={tmp_path}")  # lr decays from the start
    assert run.returncode == 0, run.stderr
    assert len(re.findall(r"the 1.5 s budget bought [\d,]+ steps", run.stdout)) == 1, run.stdout
    steps = [r for r in read_metrics(tmp_path) if "train_loss" in r]
    assert steps[-1]["budget_used"] > steps[0]["budget_used"] and steps[-1]["lr"] < steps[len(steps) // 2]["lr"]


def test_a_failure_of_rank_0_alone_reaches_every_process(tmp_path):
    """on_main runs work on rank 0 and tells the others whether it failed: each raises, and none is left waiting in
    its next collective for a rank 0 that stopped."""
    run = torchrun_script(tmp_path, """
        dist.init_process_group("gloo")
        from glimpse.distributed import Distributed
        ddp = Distributed(rank, rank, 2)
        assert ddp.on_main(lambda: 42, "counting") == (42 if rank == 0 else None)
        def broken():
            raise ValueError("a full disk")
        say = lambda text: os.write(1, f"rank {rank}: {text}\\n".encode())  # one write: the ranks' lines never mix
        try:
            ddp.on_main(broken, "writing the snapshot")
        except Exception as e:
            say(f"{type(e).__name__}: {e}")
        dist.barrier()
        say("past the barrier")
    """)
    assert run.returncode == 0, run.stderr
    assert sorted(line for line in run.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0: ValueError: a full disk", "rank 0: past the barrier",
        "rank 1: GlimpseError: rank 0 failed while writing the snapshot; its error says why",
        "rank 1: past the barrier"]


def test_on_two_machines_each_process_knows_its_rank_in_the_job(tmp_path):
    """Two torchrun launchers joined as two machines of one process each: both are local rank 0, one of them the
    job's rank 0, the one that writes."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from glimpse.distributed import exit_when_done_under_torchrun, init_distributed, machines
        with exit_when_done_under_torchrun():
            ddp = init_distributed("cpu")
            print("ranks", ddp.rank, ddp.local_rank, ddp.world_size, ddp.is_main, machines(), flush=True)
    """))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=glimpse-test", str(script)]
    with ThreadPoolExecutor(2) as pool:  # both at once, each stopped whole by run_script should it hang
        runs = list(pool.map(lambda _: run_script(*launch, env={"OMP_NUM_THREADS": "1"}, timeout=240), range(2)))
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    shown = sorted(line for run in runs for line in run.stdout.splitlines() if line.startswith("ranks "))
    assert shown == ["ranks 0 0 2 True 2", "ranks 1 0 2 False 2"], [run.stdout for run in runs]


def test_ctrl_c_under_torchrun_says_interrupted_once_a_machine(monkeypatch, capsys):
    """Ctrl-C reaches every process torchrun started on the machine: the first of them (LOCAL_RANK 0) says it."""
    from glimpse.errors import user_errors

    for local_rank, said in (("0", "\ninterrupted: the same command goes on\n"), ("1", "")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as stop, user_errors(interrupted="the same command goes on"):
            raise KeyboardInterrupt
        assert stop.value.code == 130 and capsys.readouterr().err == said, local_rank


def test_accumulation_must_divide_among_processes(tmp_path, data_dir):
    run = torchrun(2, *SETTINGS, "--gradient_accumulation_steps=3", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path}")
    assert run.returncode != 0
    assert "gradient_accumulation_steps (3) must be a multiple of the number of processes (2)" in run.stderr


@pytest.mark.parametrize("ending, status", [("raise SystemExit(0)", 0), ("raise SystemExit(3)", 3),
                                            ("raise SystemExit", 0), ("sys.exit('stopped: a message')", 1),
                                            ("raise RuntimeError('broken')", 1)])
def test_each_process_ends_with_its_status_and_no_teardown(tmp_path, ending, status):
    """DDP keeps its gloo group's worker threads alive to the end. Were Python's teardown to run, one still
    letting go of a collective's tensors would abort a finished run now and then: each process must end
    with its status at once (1 and the traceback for an error), its output written and no exit handler run.
    A failing process alone: torchrun stops the others the moment one fails, before they may have printed."""
    script = tmp_path / "ends.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, sys
        sys.path.insert(0, {str(REPO)!r})
        from glimpse.distributed import exit_when_done_under_torchrun
        atexit.register(print, "teardown")
        with exit_when_done_under_torchrun():
            print("done")
            {ending}
    """))
    nproc = 1 if status else 2
    run = run_script(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                     str(script))
    assert run.stdout.count("done") == nproc and "teardown" not in run.stdout, run.stdout + run.stderr
    assert run.returncode == (0 if status == 0 else 1)  # torchrun's own status: 1 when a process failed
    if status:
        assert f"exitcode  : {status}" in run.stderr
    if "RuntimeError" in ending:
        assert "RuntimeError: broken" in run.stderr  # the process's traceback
    if "message" in ending:  # Python's own way: the message on stderr, status 1
        assert run.stderr.startswith("stopped: a message\n")  # before torchrun's own report of the failure


def torchrun_script(tmp_path, body: str, nproc: int = 2):
    """Run body as a script in nproc processes under torchrun, inside train.py's two context managers."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        sys.path.insert(0, {repo!r})
        import torch.distributed as dist
        from glimpse.errors import GlimpseError, user_errors
        from glimpse.distributed import exit_when_done_under_torchrun
        rank = int(os.environ["RANK"])
        with exit_when_done_under_torchrun(), user_errors():
        """).format(repo=str(REPO)) + textwrap.indent(textwrap.dedent(body), "    "))
    return run_script(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      str(script), env={"OMP_NUM_THREADS": "1"})


def error_lines(run) -> list[str]:
    return re.findall(r"^error.*$", run.stderr, re.MULTILINE)


def test_a_bad_setting_prints_once_and_no_process_a_traceback(tmp_path):
    """Every process meets the same bad flag: one line from rank 0 (also in torchrun's summary, in place of a
    link to its docs), each process ending with status 2 or stopped by torchrun before it got there."""
    run = torchrun(2, *SETTINGS, "--batch_size=0", f"--out_dir={tmp_path}")
    assert run.returncode == 1  # torchrun's own status when a process failed
    assert error_lines(run) == ["error: batch_size must be at least 1, got 0"], run.stderr
    assert "traceback : error: batch_size must be at least 1, got 0" in run.stderr
    assert f'File "{REPO / "train.py"}' not in run.stderr and f'File "{REPO / "glimpse"}' not in run.stderr
    assert set(re.findall(r"exitcode  : (-?\d+)", run.stderr)) <= {"2", "-15"}, run.stderr


def test_rank_zero_prints_a_bad_setting_that_another_process_met_first(tmp_path):
    """Rank 1 fails first and says nothing: it waits for rank 0, which prints its own line of the same error."""
    run = torchrun_script(tmp_path, """
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        if rank == 0:
            store.wait(["test/rank 1 failed"])
        else:
            store.set("test/rank 1 failed", "1")
        raise GlimpseError(f"a bad setting, met by rank {rank}")
    """)
    assert error_lines(run) == ["error: a bad setting, met by rank 0"], run.stderr
    assert set(re.findall(r"exitcode  : (-?\d+)", run.stderr)) <= {"2", "-15"}, run.stderr


def test_a_process_stopped_by_another_s_bad_setting_stays_quiet(tmp_path):
    """Rank 1 waits in a collective for rank 0, which stops for a bad setting: the collective fails on rank 1,
    and its gloo traceback would bury the one line that matters."""
    run = torchrun_script(tmp_path, """
        dist.init_process_group("gloo")
        if rank == 0:
            raise GlimpseError("a bad setting")
        dist.barrier()
    """)
    assert error_lines(run) == ["error: a bad setting"], run.stderr
    assert "RuntimeError" not in run.stderr and f'File "{tmp_path}' not in run.stderr, run.stderr
    assert set(re.findall(r"exitcode  : (-?\d+)", run.stderr)) <= {"2", "-15"}, run.stderr


def test_an_error_of_one_process_alone_is_still_printed(tmp_path):
    """Rank 0 finishes and reports nothing: after waiting for it, rank 1 prints its own error, naming its rank.
    (The wait is cut from its 30 s to 3: rank 0 never reports here, so its length changes nothing else.)"""
    run = torchrun_script(tmp_path, """
        import glimpse.distributed
        glimpse.distributed.REPORT_WAIT_S = 3.0
        if rank == 1:
            raise GlimpseError("a file only rank 1 reads is missing")
    """)
    assert error_lines(run) == ["error (rank 1): a file only rank 1 reads is missing"], run.stderr
    assert re.findall(r"exitcode  : (-?\d+)", run.stderr) == ["2"], run.stderr


def test_shares_cover_every_item_once_and_in_lockstep_come_out_equal_in_number():
    from glimpse.distributed import Distributed

    shares = [Distributed(rank=r, world_size=3).share(range(7)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    padded = [Distributed(rank=r, world_size=3, lockstep=True).share(range(7)) for r in range(3)]
    assert padded == [[0, 3, 6], [1, 4, None], [2, 5, None]]
    assert Distributed(lockstep=True).share(["a", "b"]) == ["a", "b"]  # one process: everything, nothing padded
