"""wandb logging in offline mode: the run records the config and every scalar train.py logged."""

import re
import shutil
from pathlib import Path

from glimpse.checkpoint import checkpoint_path, load_checkpoint
from tests.conftest import files_in, python
from tests.test_hellaswag import own_text_examples, write_examples
from tests.test_train import read_metrics
from tests.wandb_records import logged_config, logged_history, logged_project


def test_offline_run_records_config_and_scalars(tmp_path, data_dir):
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=20",
                 "--eval_interval=10", "--eval_iters=2", "--log_interval=5", "--wandb_log=true",
                 "--wandb_run_name=offline-test", env=env)
    assert run.returncode == 0, run.stderr
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    config = logged_config(run_dir)
    assert config["n_embd"] == 16 and config["max_iters"] == 20 and config["wandb_run_name"] == "offline-test"
    history = logged_history(run_dir)
    # wandb merges what is logged at one step (a step's record and an eval's) into one row
    expected = {}
    for record in read_metrics(out):
        expected.setdefault(record["iter"], {}).update(record)
    assert [row["_step"] for row in history] == sorted(expected) == [0, 5, 10, 15, 20]
    for row in history:
        for key, value in expected[row["_step"]].items():
            if key != "iter":
                assert row[key] == value, (row["_step"], key)
        assert "iter" not in row  # the step is wandb's own _step, not a metric beside it
    assert "val_loss" in history[-1] and "train_loss" in history[-1]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, data_dir):
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    args = [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_interval=10", "--eval_iters=2",
            "--log_interval=5", "--wandb_log=true", "--attn_log_interval=0"]
    first = python("train.py", *args, "--max_iters=10", env=env)
    assert first.returncode == 0, first.stderr
    second = python("train.py", *args, "--max_iters=20", "--init_from=resume", env=env)
    assert second.returncode == 0, second.stderr
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]  # one run id
    assert [row["_step"] for row in logged_history(runs[1])] == [15, 20]
    # a stretch without wandb in between does not lose the run: the checkpoint keeps its id
    third = python("train.py", *args, "--max_iters=30", "--init_from=resume", "--wandb_log=false", env=env)
    fourth = python("train.py", *args, "--max_iters=40", "--init_from=resume", env=env)
    assert third.returncode == 0 and fourth.returncode == 0, third.stderr + fourth.stderr
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and len({run.name.split("-")[-1] for run in runs}) == 1


def test_a_resume_behind_what_its_wandb_run_logged_goes_on_in_a_new_wandb_run(tmp_path, data_dir):
    """A run killed between checkpoints has logged past its checkpoint; wandb drops a resumed run's records at
    steps below its last, so the steps retraced would be lost there: they go to a new wandb run, which the
    checkpoint then names (a later resume goes on in it)."""
    import shutil

    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    args = [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_interval=10", "--eval_iters=2",
            "--log_interval=5", "--wandb_log=true", "--attn_log_interval=0", "--final_eval=false"]
    assert python("train.py", *args, "--max_iters=10", env=env).returncode == 0
    shutil.copy(checkpoint_path(out), tmp_path / "step10.pt")
    first_id = load_checkpoint(checkpoint_path(out))["wandb_run_id"]
    assert python("train.py", *args, "--max_iters=20", "--init_from=resume", env=env).returncode == 0
    shutil.copy(tmp_path / "step10.pt", checkpoint_path(out))  # as if killed after step 20 was logged, unsaved
    behind = python("train.py", *args, "--max_iters=20", "--init_from=resume", env=env)
    assert behind.returncode == 0, behind.stderr
    new_id = load_checkpoint(checkpoint_path(out))["wandb_run_id"]
    assert new_id != first_id
    assert f"wandb: run {first_id} logged up to step 20, past the checkpoint" in behind.stdout
    assert f"goes on in a new wandb run, {new_id}" in behind.stdout
    (new_run,) = (tmp_path / "wandb").glob(f"offline-run-*-{new_id}")
    assert [row["_step"] for row in logged_history(new_run)] == [15, 20]
    onwards = python("train.py", *args, "--max_iters=30", "--init_from=resume", env=env)
    assert onwards.returncode == 0 and "wandb: run" not in onwards.stdout, onwards.stderr
    assert load_checkpoint(checkpoint_path(out))["wandb_run_id"] == new_id


def test_a_resume_that_logs_at_its_checkpoints_step_again_goes_on_in_a_new_wandb_run(tmp_path, data_dir):
    """A resumed wandb run takes only steps after its last, and the old run logged at the checkpoint's step: a
    resume that logs there again (the final eval of a run killed during it, a step's eval after a checkpoint taken
    before it) goes on in a new wandb run; one that logs only later steps stays in the old one."""
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    args = [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_interval=10", "--eval_iters=2",
            "--log_interval=5", "--wandb_log=true", "--attn_log_interval=0", "--max_iters=10"]
    assert python("train.py", *args, env=env).returncode == 0
    first_id = load_checkpoint(checkpoint_path(out))["wandb_run_id"]
    metrics = out / "metrics.jsonl"  # as if stopped in its final eval: step 10's eval logged, the final one not
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(line for line in lines if "final_val_loss" not in line))
    again = python("train.py", *args, "--init_from=resume", env=env)  # the final eval at step 10
    assert again.returncode == 0, again.stderr
    said = re.search(f"wandb: run {first_id} logged up to step 10, the checkpoint's, which this run logs again, .*: "
                     r"this run goes on in a new wandb run, (\w+)\n", again.stdout)
    assert said, again.stdout
    (new_run,) = (tmp_path / "wandb").glob(f"offline-run-*-{said[1]}")
    assert [(row["_step"], "final_val_loss" in row) for row in logged_history(new_run)] == [(10, True)]
    # launched once more, the finished run has nothing to log: it goes on in its wandb run, logging nothing there
    done = python("train.py", *args, "--init_from=resume", env=env)
    assert done.returncode == 0 and "wandb: run" not in done.stdout, done.stderr
    assert "as the run logged it at step 10" in done.stdout
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"), key=lambda run: run.stat().st_mtime)
    assert len(runs) == 3 and runs[-1].name.endswith(first_id) and logged_history(runs[-1]) == []
    # it saved no checkpoint (no step taken): a resume that trains on logs steps 11 on, in the first wandb run
    onwards = python("train.py", *args, "--init_from=resume", "--final_eval=false", "--max_iters=15", env=env)
    assert onwards.returncode == 0 and "wandb: run" not in onwards.stdout, onwards.stderr
    assert load_checkpoint(checkpoint_path(out))["wandb_run_id"] == first_id


def no_login_env(home: Path) -> dict:
    """The environment of a machine that never ran `wandb login`, logging online."""
    return {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(home), "WANDB_DIR": str(home),
            "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_SILENT": "true", "NETRC": str(home / "netrc")}


def test_wandb_without_a_login_is_one_line_and_leaves_the_history_alone(tmp_path, data_dir):
    """Online logging on a machine that never ran `wandb login`: one line saying what to do, before metrics.jsonl
    or config.json is touched (a resume keeps the history past its checkpoint, and the settings it was started
    with); a fresh run leaves no config.json to pass for a run's."""
    out = tmp_path / "out"
    args = [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_interval=5", "--eval_iters=2",
            "--log_interval=5"]
    first = python("train.py", *args, "--max_iters=10", "--always_save_checkpoint=false")
    assert first.returncode == 0, first.stderr
    history, settings = (out / "metrics.jsonl").read_bytes(), (out / "config.json").read_bytes()
    no_login = no_login_env(tmp_path)
    resumed = python("train.py", *args, "--max_iters=20", "--init_from=resume", "--wandb_log=true", env=no_login)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    (line,) = resumed.stderr.strip().splitlines()
    assert line.startswith("error: wandb could not start a run (") and "WANDB_MODE=offline" in line, line
    assert (out / "metrics.jsonl").read_bytes() == history and (out / "config.json").read_bytes() == settings
    named = python("train.py", *args, "--max_iters=20", "--init_from=resume", "--wandb_log=true",
                   "--wandb_project=a/b c", env={**no_login, "WANDB_MODE": "offline"})  # offline: no login to blame
    (line,) = named.stderr.strip().splitlines()
    assert named.returncode == 2 and line.startswith("error: wandb could not start a run (Invalid project name") \
        and line.endswith("give --wandb_project another name"), line
    bogus = python("train.py", *args, "--max_iters=20", "--init_from=resume", "--wandb_log=true",
                   env={**no_login, "WANDB_MODE": "bogus"})  # wandb's settings refuse it before any login
    (line,) = bogus.stderr.strip().splitlines()  # the modes wandb lists are its own, from version to version
    assert bogus.returncode == 2 and line.startswith("error: wandb refused its mode setting (") and \
        "'offline'" in line and line.endswith("fix WANDB_MODE in the environment (or the --wandb_ flag that sets it), "
                                              "or drop --wandb_log"), line
    assert (out / "metrics.jsonl").read_bytes() == history and (out / "config.json").read_bytes() == settings
    fresh = python("train.py", *[a.replace(str(out), str(tmp_path / "fresh")) for a in args], "--max_iters=10",
                   "--wandb_log=true", env=no_login)
    assert fresh.returncode == 2 and not (tmp_path / "fresh" / "config.json").exists(), fresh.stderr


def test_eval_without_a_wandb_login_stops_before_scoring_and_writes_nothing(tmp_path, trained):
    """eval.py --wandb_log=true on a machine without a login stops at once, as train.py does: not after minutes of
    scoring, with its CSV rewritten and a HellaSwag record appended that a second try would append again."""
    cfg, _ = trained
    out = tmp_path / "run"
    shutil.copytree(cfg.out_dir, out)
    examples = write_examples(tmp_path / "val.jsonl", own_text_examples(5))
    before = files_in(out)
    for task in (["--head_importance"], ["--task=length"], ["--task=hellaswag", f"--hellaswag_file={examples}"]):
        run = python("eval.py", f"--out_dir={out}", "--device=cpu", "--max_tokens=256", *task, "--wandb_log=true",
                     env=no_login_env(tmp_path))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("error: wandb could not start a run ("), run.stderr
        assert files_in(out) == before, task


def test_eval_logs_its_results_to_the_run_that_trained_the_checkpoint(tmp_path, data_dir):
    """Each of eval.py's studies goes into the trained run's own wandb run (resumed by its id), under its keys."""
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=10",
                 "--eval_interval=10", "--eval_iters=2", "--wandb_log=true", "--attn_log_interval=0",
                 "--wandb_project=glimpse-elsewhere", env=env)
    assert run.returncode == 0, run.stderr
    (trained_run,) = (tmp_path / "wandb").glob("offline-run-*")
    run_id = trained_run.name.split("-")[-1]
    assert logged_project(trained_run) == "glimpse-elsewhere"
    examples = write_examples(tmp_path / "val.jsonl", own_text_examples(3))
    studies = {"--head_importance": {"head_importance/table", "head_importance/heatmap"},
               "--task=length": {"length_eval/table", "length_eval/sliding_table"},
               "--task=hellaswag": {"hellaswag_acc", "hellaswag_acc_norm"}}
    for flag, keys in studies.items():
        before = set((tmp_path / "wandb").glob("offline-run-*"))
        extra = [f"--hellaswag_file={examples}"] if flag == "--task=hellaswag" else []
        run = python("eval.py", f"--out_dir={out}", "--device=cpu", "--max_tokens=256", flag, *extra,
                     "--wandb_log=true", env=env)
        assert run.returncode == 0, run.stderr
        (new,) = set((tmp_path / "wandb").glob("offline-run-*")) - before
        assert new.name.split("-")[-1] == run_id, flag  # the checkpoint's run, not a new one
        assert logged_project(new) == "glimpse-elsewhere", flag  # in the project it was trained in
        logged = set().union(*logged_history(new))  # a table's or image's fields under its key: KEY/_type, ...
        assert all(key in logged or f"{key}/_type" in logged for key in keys), (flag, sorted(logged))
