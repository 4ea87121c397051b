"""FSDP2 (--fsdp=true) through torchrun with gloo on CPU: sharded training gives one process's and DDP's losses,
its checkpoints resume exactly and on another process count, and what reads a trained model reads them."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from glimpse.checkpoint import load_checkpoint, model_from_checkpoint
from glimpse.sharding import next_sharded_slot
from tests.conftest import REPO, python
from tests.test_distributed import SETTINGS, assert_two_processes_resume_exactly, error_lines, torchrun, torchrun_script
from tests.test_train import read_metrics

FSDP = [*SETTINGS, "--fsdp=true"]
EVALS = ["--eval_iters=3"]  # 3 batches: the two processes' shares differ in number
LOSSES = ("train_loss", "val_loss", "eval_train_loss", "final_val_loss")


def assert_same_losses(records: list[dict], expected: list[dict]):
    """The same records, losses equal within float tolerance (gradients are summed in another order)."""
    assert [r["iter"] for r in records] == [r["iter"] for r in expected]
    for a, b in zip(expected, records):
        assert set(a) == set(b), a["iter"]
        for key in LOSSES:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iter"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """The same 12 steps in one process, in two under DDP and in two under FSDP: their out_dirs."""
    root = tmp_path_factory.mktemp("fsdp")
    common = [f"--data_dir={data_dir}", *EVALS]
    one = python("train.py", *SETTINGS, *common, f"--out_dir={root / 'one'}")
    assert one.returncode == 0, one.stderr
    ddp = torchrun(2, *SETTINGS, *common, f"--out_dir={root / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr
    fsdp = torchrun(2, *FSDP, *common, f"--out_dir={root / 'fsdp'}")
    assert fsdp.returncode == 0, fsdp.stderr
    return {name: root / name for name in ("one", "ddp", "fsdp")}


def test_two_sharded_processes_match_one_and_ddp(runs):
    single = read_metrics(runs["one"])
    assert len(single) == 12 + 3 + 1  # every step logged, three evals, the final eval
    assert_same_losses(read_metrics(runs["fsdp"]), single)
    assert_same_losses(read_metrics(runs["fsdp"]), read_metrics(runs["ddp"]))
    final = [r for r in read_metrics(runs["fsdp"]) if "final_val_tokens" in r]
    assert final[0]["final_val_tokens"] == [r for r in single if "final_val_tokens" in r][0]["final_val_tokens"]


def test_sharded_run_writes_the_same_attention_snapshots(runs):
    """Rank 0 draws from a copy of the gathered weights: the same maps as the one-process run's."""
    for it in (0, 6, 12):
        one = np.load(runs["one"] / "attention" / f"iter_{it}" / "attention.npz")
        sharded = np.load(runs["fsdp"] / "attention" / f"iter_{it}" / "attention.npz")
        assert sorted(one.files) == sorted(sharded.files)
        for name in one.files:
            if np.issubdtype(one[name].dtype, np.floating):
                np.testing.assert_allclose(sharded[name], one[name], rtol=1e-4, atol=1e-5, err_msg=f"{it} {name}")


def test_sharded_checkpoints_hold_whole_weights(runs):
    """ckpt.pt and best.pt hold the whole model (gathered on rank 0), as one process's do; the optimizer state is
    in the folder of ckpt.dcp/ that ckpt.pt names."""
    for name in ("ckpt.pt", "best.pt"):
        sharded, single = load_checkpoint(runs["fsdp"] / name), load_checkpoint(runs["one"] / name)
        assert sharded["model"].keys() == single["model"].keys()
        for key, tensor in single["model"].items():
            torch.testing.assert_close(sharded["model"][key], tensor, rtol=1e-4, atol=1e-5)
        model_from_checkpoint(sharded)  # builds as any checkpoint does
    state = load_checkpoint(runs["fsdp"] / "ckpt.pt")
    assert "optimizer" not in state and (runs["fsdp"] / state["sharded"] / ".metadata").exists()


def test_sample_and_export_read_a_sharded_run(runs, tmp_path):
    pytest.importorskip("transformers")
    for which in ("best", "last"):
        sampled = python("sample.py", f"--out_dir={runs['fsdp']}", f"--checkpoint={which}", "--start=ROMEO:",
                         "--max_new_tokens=5", "--num_samples=1", "--device=cpu", f"--dump_dir={tmp_path / which}")
        assert sampled.returncode == 0 and "ROMEO:" in sampled.stdout, sampled.stderr
    exported = python("export.py", f"--out_dir={runs['fsdp']}", f"--to={tmp_path / 'hf'}")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_layer"] == 2


def test_two_sharded_processes_resume_exactly_with_dropout(tmp_path, data_dir):
    assert_two_processes_resume_exactly(tmp_path, [*FSDP, "--dropout=0.2", f"--data_dir={data_dir}"], stop_at=6)


@pytest.mark.parametrize("how", ["fsdp_one_process", "plain_python"])
def test_a_sharded_checkpoint_resumes_on_another_process_count(tmp_path, data_dir, runs, how):
    """Stopped at step 6 in two sharded processes, continued in one: DCP reshards the weights and AdamW state,
    and the rest of the run logs the straight run's losses within float tolerance."""
    settings = [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *EVALS]
    half = torchrun(2, *FSDP, *settings, "--max_iters=6")
    assert half.returncode == 0, half.stderr
    if how == "fsdp_one_process":
        rest = torchrun(1, *FSDP, *settings, "--init_from=resume")
    else:  # the run's own settings say fsdp=true, which plain Python cannot run: the resume says how to go on
        refused = python("train.py", *SETTINGS, *settings, "--init_from=resume")
        assert refused.returncode == 2 and refused.stderr.strip().endswith(
            "N=1 works too); or go on unsharded in this process with --fsdp=false"), refused.stderr
        rest = python("train.py", *SETTINGS, *settings, "--init_from=resume", "--fsdp=false")
    assert rest.returncode == 0, rest.stderr
    assert_same_losses(read_metrics(tmp_path), read_metrics(runs["fsdp"]))


def test_a_sharded_resume_trains_with_the_optimizer_settings_its_flags_give(tmp_path, data_dir, runs):
    """DCP's load, like torch's load_state_dict, brings back the saved optimizer groups' settings with their state:
    a sharded resume given --beta1=0.5 goes on as one unsharded process resumed with it does, not as the run
    left off."""
    settings = [f"--data_dir={data_dir}", *EVALS]
    losses = {}
    starts = {"sharded": lambda *a: torchrun(2, *FSDP, *a), "one": lambda *a: python("train.py", *SETTINGS, *a)}
    for name, start in starts.items():
        out = f"--out_dir={tmp_path / name}"
        assert start(*settings, out, "--max_iters=6").returncode == 0
        rest = start(*settings, out, "--init_from=resume", "--beta1=0.5")
        assert rest.returncode == 0, rest.stderr
        losses[name] = read_metrics(tmp_path / name)
    assert_same_losses(losses["sharded"], losses["one"])
    changed = [r for r in losses["sharded"] if r["iter"] > 6 and "train_loss" in r]
    left_off = {r["iter"]: r for r in read_metrics(runs["fsdp"]) if "train_loss" in r}
    assert changed and all(r["train_loss"] != left_off[r["iter"]]["train_loss"] for r in changed[1:])


def test_a_slot_written_again_by_fewer_processes_holds_their_shards_alone(tmp_path, data_dir):
    """Two processes save at step 6 into one slot; one process resumed saves at 12 into the other and at 18 into the
    first again, which is emptied first: no shard of the two-process save is left beside the new one."""
    settings = [*FSDP, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_iters=1", "--final_eval=false"]
    assert torchrun(2, *settings, "--max_iters=6").returncode == 0
    first = load_checkpoint(tmp_path / "ckpt.pt")["sharded"]
    assert sorted(p.name for p in (tmp_path / first).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    rest = torchrun(1, *settings, "--init_from=resume", "--max_iters=18")
    assert rest.returncode == 0, rest.stderr
    assert load_checkpoint(tmp_path / "ckpt.pt")["sharded"] == first
    assert sorted(p.name for p in (tmp_path / first).iterdir()) == [".metadata", "__0_0.distcp"]


def test_blocks_compiled_under_fsdp_train_as_the_eager_run_does(runs, tmp_path, data_dir):
    """--compile=true under fsdp compiles each block in place before sharding it (aot_eager: the same graphs,
    compiled in seconds): the same losses as the uncompiled sharded run, and the weights under their own names."""
    compiled = torchrun(2, *FSDP, *EVALS, "--compile=true", "--compile_backend=aot_eager", f"--data_dir={data_dir}",
                        f"--out_dir={tmp_path}", env={"TORCH_LOGS": "graph_code"})  # each compiled graph's code
    assert compiled.returncode == 0, compiled.stderr
    graphs = compiled.stderr.split("TRACED GRAPH")[1:]
    assert graphs and all("c_attn" in g or "attn" in g for g in graphs)  # the blocks' graphs
    assert not any("wte" in g or "lm_head" in g for g in graphs)  # and no other: the root runs eagerly
    # every graph at the steps' and evals' one shape (B, T, C): the process whose share of the 3 eval batches ran
    # out joins the other's forward with a batch of that shape, not a graph of its own
    assert set(re.findall(r'L_x_: "f32\[([\d, ]+)\]', compiled.stderr)) == {"4, 16, 32"}
    assert_same_losses(read_metrics(tmp_path), read_metrics(runs["fsdp"]))
    weights = load_checkpoint(tmp_path / "ckpt.pt")["model"]
    assert weights.keys() == load_checkpoint(runs["fsdp"] / "ckpt.pt")["model"].keys()


@pytest.mark.parametrize("flags, message", [
    (["--optimizer=muon"], "error: fsdp=true supports optimizer=adamw only"),
    (["--dtype=float16"], "error: fsdp=true does not support dtype=float16"),
])
def test_combinations_fsdp_cannot_run_are_one_line_errors(tmp_path, data_dir, flags, message):
    run = python("train.py", *FSDP, *flags, f"--data_dir={data_dir}", f"--out_dir={tmp_path}")
    assert run.returncode == 2 and run.stderr.startswith(message) and run.stderr.count("\n") == 1, run.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("first", [
    ["--hellaswag_interval=6", "--hellaswag_file=missing.jsonl"],  # not the HellaSwag file it would score
    ["--init_from=gpt2"],  # nor the weights it would fetch (gigabytes for gpt2-xl), here from an empty cache offline
])
def test_fsdp_needs_torchrun(tmp_path, data_dir, first):
    """Said first, before anything else of the run is read or fetched."""
    run = python(str(REPO / "train.py"), *FSDP, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *first,
                 env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: fsdp=true shards the model across torchrun's processes: launch train.py with torchrun (torchrun "
        "--standalone --nproc_per_node=N train.py ...; N=1 works too)"]


def test_a_checkpoint_written_without_fsdp_is_refused(runs, tmp_path, data_dir):
    out = tmp_path / "ddp"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((runs["ddp"] / "ckpt.pt").read_bytes())
    run = torchrun(2, *FSDP, "--init_from=resume", "--max_iters=13", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert error_lines(run) == [f"error: {out / 'ckpt.pt'} was written without fsdp: resume it with --fsdp=false, "
                                "or start a new out_dir"], run.stderr


def test_a_sharded_checkpoint_whose_folder_is_incomplete_is_refused_in_one_line(runs, tmp_path, data_dir):
    out = tmp_path / "copy"
    shutil.copytree(runs["fsdp"], out)
    slot = out / load_checkpoint(out / "ckpt.pt")["sharded"]  # the folder ckpt.pt goes with
    (slot / ".metadata").unlink()  # a copy cut short
    run = torchrun(2, *FSDP, "--init_from=resume", "--max_iters=13", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert error_lines(run) == [f"error: {slot} is missing or incomplete: the checkpoint's weights and optimizer "
                                "state are there; restore that folder, or start a new out_dir"], run.stderr


def test_each_block_is_sharded_on_its_own_and_float16_is_refused(tmp_path):
    """One FSDP unit per block, then the root: a block's whole weights are gathered for it alone, never the whole
    model's at once."""
    run = torchrun_script(tmp_path, """
        import torch
        from torch.distributed.fsdp import FSDPModule
        from glimpse.sharding import check_fsdp, shard
        from model import GPT, GPTConfig
        dist.init_process_group("gloo")
        model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=10))
        shard(model, model.transformer.h, torch.device("cpu"))
        units = [name or "root" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        os.write(1, f"rank {rank}: {units}\\n".encode())
        # the run's device, not the machine's accelerator (on a machine with a GPU, FSDP's own choice)
        assert {p.device_mesh.device_type for p in model.parameters()} == {"cpu"}
        check_fsdp(torch.bfloat16)
        dist.barrier()  # both ranks have said their units: the first to stop on the error below ends the other
        check_fsdp(torch.float16)
    """)
    units = sorted(line for line in run.stdout.splitlines() if line.startswith("rank "))
    assert units == [f"rank {r}: ['root', 'transformer.h.0', 'transformer.h.1', 'transformer.h.2']" for r in (0, 1)]
    assert error_lines(run) == ["error: fsdp=true does not support float16 (its loss scaler would skip steps on some "
                                "processes only): use --dtype=float32"], run.stderr


def test_hellaswag_before_any_other_forward_leaves_a_sharded_model_trainable(tmp_path):
    """A run resumed from a stop before a HellaSwag step's work scores HellaSwag first: the sharded model's first
    forward, whose gathered weights must stay ones that training steps can update."""
    run = torchrun_script(tmp_path, """
        import contextlib
        import torch
        from data.hellaswag import Example, evaluate
        from data.tokenizer import CharTokenizer
        from glimpse.sharding import shard
        from model import GPT, GPTConfig
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=27, n_layer=2, n_head=2, n_embd=16))
        shard(model, model.transformer.h, torch.device("cpu"))
        tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
        examples = [Example("the cat sat on", [" the mat", " a dog", " the sky", " it"], 0)] * 2
        scored = evaluate(model, examples, tokenizer, 16, torch.device("cpu"), contextlib.nullcontext(),
                          show_progress=False)
        assert scored["hellaswag_examples"] == 2, scored
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        x = torch.randint(0, 27, (2, 16))
        for _ in range(2):
            _, loss = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        dist.destroy_process_group()
    """, nproc=1)
    assert run.returncode == 0, run.stderr


def test_a_sharded_save_never_writes_the_folder_the_current_ckpt_pt_names():
    """Saves alternate between the two folders: a save into the one ckpt.pt names would, killed half way, leave
    ckpt.pt naming a folder of half-written shards and no whole pair anywhere."""
    assert next_sharded_slot(None) == "ckpt.dcp/a"  # the first save of a run
    assert next_sharded_slot("ckpt.dcp/a") == "ckpt.dcp/b" and next_sharded_slot("ckpt.dcp/b") == "ckpt.dcp/a"
