"""HellaSwag, completion style: losses checked by hand, a trained model finds the endings of its own training
text, the examples split across DDP processes add up to one process's score, GPT-2 folders, bad files."""

import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch

from data import hellaswag
from data.hellaswag import Example, ending_losses, evaluate, read_examples, rows
from data.tokenizer import CharTokenizer
from glimpse.errors import GlimpseError
from model import GPT, GPTConfig
from tests.conftest import make_corpus, python
from tests.test_distributed import torchrun
from tests.test_gpt2 import reference
from tests.test_reliability import run_main
from tests.test_train import read_metrics


def write_examples(path, examples: list[dict]):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


def fixed_logits_model(chars: str) -> GPT:
    """A model whose logits are v for token v at every position, whatever it reads: every weight is zero but
    ln_f's bias (1 in dimension 0) and the embedding of token v (v in dimension 0), tied to lm_head."""
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=16, n_layer=1, n_head=1, n_embd=4, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = torch.arange(len(chars), dtype=torch.float32)
    return model.eval()


def test_summed_and_mean_losses_are_the_hand_computed_ones():
    tokenizer = CharTokenizer(" abcd")  # ids: ' '=0, a=1, b=2, c=3, d=4
    model = fixed_logits_model(tokenizer.chars)
    lse = math.log(sum(math.exp(v) for v in range(5)))  # the loss of token v is lse - v

    example = Example("ab", ["c", "ddddd", "d", "a"], label=1)
    tokens, mask = rows(example, tokenizer, block_size=16)
    assert tokens[2].tolist()[:4] == [1, 2, 0, 4] and mask[2].tolist()[:5] == [False, False, True, True, False]
    summed, mean = ending_losses(model, tokens, mask, torch.autocast("cpu", enabled=False))
    # each ending is read after a space: " c" is tokens 0 and 3, " ddddd" is 0 and five 4s
    want_summed = [2 * lse - 3, 6 * lse - 20, 2 * lse - 4, 2 * lse - 1]
    want_mean = [s / n for s, n in zip(want_summed, (2, 6, 2, 2))]
    assert summed.tolist() == pytest.approx(want_summed, rel=1e-5)
    assert mean.tolist() == pytest.approx(want_mean, rel=1e-5)
    # the lowest sum is " d" (index 2), the lowest mean " ddddd" (index 1, the label)
    result = evaluate(model, [example], tokenizer, 16, "cpu", torch.autocast("cpu", enabled=False), show_progress=False)
    assert (result["hellaswag_acc"], result["hellaswag_acc_norm"]) == (0.0, 1.0)
    assert result["hellaswag_examples"] == 1 and result["hellaswag_skipped"] == 0


def test_a_long_context_loses_its_start_and_unreadable_examples_are_skipped():
    tokenizer = CharTokenizer(" abcd")
    tokens, mask = rows(Example("abcd" * 10, ["a", "bb", "c", "d"], 0), tokenizer, block_size=8)
    assert tokens.shape == (4, 9)  # block_size inputs and their targets
    assert tokens[1].tolist() == tokenizer.encode("cdabcd bb").tolist()  # the context's last tokens, then " bb"
    assert mask[1].sum() == 3 and mask[0].sum() == 2
    assert rows(Example("xyz", ["a", "b", "c", "d"], 0), tokenizer, 8) is None  # x, y, z: not in the vocabulary
    assert rows(Example("", ["a", "b", "c", "d"], 0), tokenizer, 8) is None  # nothing to predict an ending from
    # an ending longer than the window: its last tokens are scored, after the one context token left before them
    tokens, mask = rows(Example("ab", ["abcdabcd", "a", "b", "c"], 0), tokenizer, block_size=4)
    assert tokens[0].tolist() == tokenizer.encode("babcd").tolist()
    assert mask[0].tolist() == [False, True, True, True, True]
    model = fixed_logits_model(tokenizer.chars)
    result = evaluate(model, [Example("xyz", ["a"] * 4, 0), Example("ab", ["a", "b", "c", "d"], 3),
                              Example("", ["d", "c", "b", "a"], 0)], tokenizer, 8,
                      "cpu", torch.autocast("cpu", enabled=False), show_progress=False)
    assert (result["hellaswag_examples"], result["hellaswag_skipped"]) == (1, 2)
    assert result["hellaswag_acc"] == 1.0  # " d" has the lowest loss of the four
    with pytest.raises(GlimpseError, match="could read none"):
        evaluate(model, [Example("xyz", ["a"] * 4, 0)], tokenizer, 8, "cpu", torch.autocast("cpu", enabled=False),
                 show_progress=False)


def test_a_training_run_whose_model_reads_no_hellaswag_example_stops_before_it_starts(tmp_path, data_dir):
    """Every score would fail, the first after step 0's eval: the run is refused before it writes anything."""
    file = write_examples(tmp_path / "val.jsonl", [{"ctx": "ΩΩ", "endings": ["Ω", "ΩΩ", "Ω Ω", "ΩΩΩ"], "label": 0}])
    out = tmp_path / "out"
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--max_iters=4",
                 "--hellaswag_interval=2", f"--hellaswag_file={file}")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        "error: the model's tokenizer could read none of the HellaSwag examples (1); score a model with GPT-2's BPE "
        "tokens")
    assert not out.exists()


def own_text_examples(n: int, seed: int = 0) -> list[dict]:
    """Contexts and endings cut from lines of the generated play the tiny model trains on; the three wrong
    endings are the real one's characters shuffled."""
    rng = random.Random(seed)
    lines = [line for line in make_corpus().split("\n\n") if len(line.split()) >= 6][:n]
    examples = []
    for line in lines:
        words = line.split(" ")
        context, ending = " ".join(words[:3]), " ".join(words[3:])
        wrong = ["".join(rng.sample(ending, len(ending))) for _ in range(3)]
        label = rng.randrange(4)
        examples.append({"ctx": context, "endings": wrong[:label] + [ending] + wrong[label:], "label": label})
    return examples


def test_a_trained_model_knows_the_endings_of_its_training_text(tmp_path, trained):
    cfg, _ = trained
    cfg = replace(cfg, out_dir=str(tmp_path / "run"))  # a copy: the session's run stays as other tests expect it
    shutil.copytree(trained[0].out_dir, cfg.out_dir)
    before = read_metrics(cfg.out_dir)
    file = write_examples(tmp_path / "val.jsonl", own_text_examples(40))
    run = python("eval.py", f"--out_dir={cfg.out_dir}", "--task=hellaswag", f"--hellaswag_file={file}", "--device=cpu")
    assert run.returncode == 0, run.stderr
    assert "over 40 examples" in run.stdout
    record = read_metrics(cfg.out_dir)[-1]
    assert read_metrics(cfg.out_dir)[:-1] == before  # the training run's records are kept
    assert record["hellaswag_examples"] == 40 and record["iter"] == cfg.max_iters
    assert record["hellaswag_acc"] >= 0.9 and record["hellaswag_acc_norm"] >= 0.9  # chance is 0.25
    assert f"acc {record['hellaswag_acc']:.4f}, acc_norm {record['hellaswag_acc_norm']:.4f}" in run.stdout
    limited = python("eval.py", f"--out_dir={cfg.out_dir}", "--task=hellaswag", f"--hellaswag_file={file}",
                     "--hellaswag_examples=7", "--device=cpu")
    assert limited.returncode == 0 and read_metrics(cfg.out_dir)[-1]["hellaswag_examples"] == 7


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_training_scores_hellaswag_with_the_examples_split_across_processes(tmp_path, data_dir, sharded):
    # 13 readable examples and two that are not, one in each process's share: the shares differ in number (8 and
    # 7), and under fsdp a process that skips an example, or whose share has run out, must still join the others'
    # forwards
    unreadable = {"ctx": "\u00e9\u00e9\u00e9", "endings": ["a", "b", "c", "d"], "label": 0}
    readable = own_text_examples(13)
    file = write_examples(tmp_path / "val.jsonl", [*readable[:5], unreadable, *readable[5:], unreadable])
    settings = ["--dataset=tiny", f"--data_dir={data_dir}", "--device=cpu", "--n_layer=1", "--n_head=2",
                "--n_embd=16", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2",
                "--max_iters=4", "--eval_interval=2", "--eval_iters=2", "--log_interval=1", "--attn_log_interval=0",
                "--hellaswag_interval=2", f"--hellaswag_file={file}", "--dropout=0.0"]
    one = python("train.py", *settings, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *settings, *(["--fsdp=true"] if sharded else []), f"--out_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    scores = [[r for r in read_metrics(tmp_path / name) if "hellaswag_acc" in r] for name in ("one", "two")]
    assert [r["iter"] for r in scores[0]] == [0, 2, 4] == [r["iter"] for r in scores[1]]
    for a, b in zip(*scores):
        assert a["hellaswag_examples"] == b["hellaswag_examples"] == 13  # every example scored once
        assert a["hellaswag_skipped"] == b["hellaswag_skipped"] == 2
        assert b["hellaswag_acc"] == pytest.approx(a["hellaswag_acc"])  # the same weights: the same answers
        assert b["hellaswag_acc_norm"] == pytest.approx(a["hellaswag_acc_norm"])


def test_pretrained_gpt2_folders_are_scored_into_a_folder_of_their_own(tmp_path, gpt2_ranks):
    folder = tmp_path / "gpt2-tiny"
    reference().save_pretrained(folder)
    no_context = {"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}  # one BPE token each: nothing to score
    file = write_examples(tmp_path / "val.jsonl", [*own_text_examples(5), no_context])
    out = tmp_path / "scores"
    run = python("eval.py", f"--init_from={folder}", "--task=hellaswag", f"--hellaswag_file={file}",
                 f"--out_dir={out}", env={"TIKTOKEN_CACHE_DIR": str(gpt2_ranks)})
    assert run.returncode == 0, run.stderr
    assert "over 5 examples (1 skipped: text its tokenizer cannot read, or no context)" in run.stdout
    record = read_metrics(out)[-1]
    assert record["hellaswag_examples"] == 5 and record["hellaswag_skipped"] == 1 and record["iter"] == 0
    assert 0 <= record["hellaswag_acc_norm"] <= 1
    assert record["init_from"] == str(folder)  # whose score it is, in a folder that may hold a run's own records


@pytest.mark.parametrize("line,says", [
    ("not json", "val.jsonl:2 is not a HellaSwag example"),
    (json.dumps({"ctx": "a", "endings": ["a", "b"], "label": 0}), "val.jsonl:2 has 2 endings"),
    (json.dumps({"ctx": "a", "endings": ["a", None, "c", "d"], "label": 0}), "val.jsonl:2 is not a HellaSwag"),
    (json.dumps({"ctx": "a", "endings": "abcd", "label": 0}), "val.jsonl:2 is not a HellaSwag"),  # not four letters
    (json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1.7}), "val.jsonl:2 is not a HellaSwag"),
    (json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 4}), "val.jsonl:2 has 4 endings and label 4"),
    (json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"], "label": -1}), "val.jsonl:2 has 4 endings and label -1"),
])
def test_a_bad_hellaswag_file_is_a_one_line_error(tmp_path, trained, line, says, capsys):
    import eval as eval_script

    good = json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 1})
    (tmp_path / "val.jsonl").write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(GlimpseError, match=says):
        read_examples(tmp_path / "val.jsonl")
    cfg, _ = trained  # eval.py's main as its command line runs it (one command below runs it as a process)
    assert says in run_main(eval_script.main, [f"--out_dir={cfg.out_dir}", "--task=hellaswag",
                                               f"--hellaswag_file={tmp_path / 'val.jsonl'}"], capsys)


def test_blank_lines_are_no_examples_and_a_label_may_be_spelled_as_a_string_but_not_as_true(tmp_path):
    """Blank lines are skipped (the lines after them keep their numbers); a label of "2" is 2, as the Hugging Face copy
    of the file spells it, but true is no label, though Python counts it as 1; a file of no example says so."""
    good = {"ctx": "a man", "endings": ["a", "b", "c", "d"]}
    path = tmp_path / "val.jsonl"
    path.write_text(f"\n{json.dumps({**good, 'label': 1})}\n  \n{json.dumps({**good, 'label': '2'})}\n\n")
    assert [(e.context, e.label) for e in read_examples(path)] == [("a man", 1), ("a man", 2)]
    path.write_text(f"{json.dumps({**good, 'label': 1})}\n\n{json.dumps({**good, 'label': True})}\n")
    with pytest.raises(GlimpseError, match=f"^{path}:3 is not a HellaSwag example"):
        read_examples(path)
    path.write_text("\n \n")
    with pytest.raises(GlimpseError, match=f"^{path} holds no HellaSwag examples$"):
        read_examples(path)


def test_a_hellaswag_file_or_task_eval_py_cannot_score_is_a_one_line_error(trained):
    cfg, _ = trained
    missing = python("eval.py", f"--out_dir={cfg.out_dir}", "--task=hellaswag", "--hellaswag_file=/nope.jsonl")
    assert missing.returncode == 2 and "HellaSwag file '/nope.jsonl' not found" in missing.stderr
    wrong = python("eval.py", "--init_from=gpt2", "--task=length")
    assert wrong.returncode == 2 and "--init_from scores pretrained GPT-2 on --task=hellaswag" in wrong.stderr


def test_a_download_that_fails_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Offline, the one line says how to pass a local copy, and no empty data/hellaswag/ is left (port 9 on loopback
    refuses the connection: a real failed download)."""
    monkeypatch.setattr(hellaswag, "VAL_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")
    with pytest.raises(GlimpseError, match=r"could not download .*; offline, pass a local copy with --hellaswag_file"):
        hellaswag.val_file("", str(tmp_path / "data"))
    assert list(tmp_path.iterdir()) == []
    dest = tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl"  # downloaded before: read as it is, offline too
    dest.parent.mkdir(parents=True)
    dest.write_text("the copy downloaded before")
    assert hellaswag.val_file("", str(tmp_path / "data")) == dest
    assert dest.read_text() == "the copy downloaded before"


def test_the_gpt2_124m_preset_is_gpt2_small_and_runs_its_schedule_shrunk(tmp_path, corpus_file, gpt2_ranks):
    from data.prepare import PrepareConfig, prepare
    from glimpse.config import parse_config
    from train import TrainConfig, train

    preset = ["config/gpt2_124m.toml"]
    full = parse_config(TrainConfig, preset, prog="train.py", description="")
    shape = full.model
    assert (shape.n_layer, shape.n_head, shape.n_embd, shape.block_size) == (12, 12, 768, 1024)
    assert full.batch_size * shape.block_size * full.gradient_accumulation_steps == 524_288  # 0.5M tokens a step
    assert (full.dtype, full.compile, full.dataset, full.device) == ("bfloat16", True, "fineweb_edu", "cuda")
    assert full.hellaswag_interval and full.hellaswag_interval % full.eval_interval == 0
    with torch.device("meta"):  # the shape alone, no weights
        gpt2_small = GPT(full.model_config(50257))
    assert gpt2_small.num_params() == 123_552_768  # GPT-2 small's count without the input embedding

    prepare(PrepareConfig(dataset="bpe", input=str(corpus_file), tokenizer="gpt2", data_dir=str(tmp_path)))
    file = write_examples(tmp_path / "val.jsonl", own_text_examples(6))
    shrunk = parse_config(TrainConfig, [*preset, f"--data_dir={tmp_path}", "--dataset=bpe", "--device=cpu",
                                        "--dtype=float32", "--compile=false", "--n_layer=1", "--n_head=2",
                                        "--n_embd=16", "--block_size=32", "--batch_size=2", "--max_iters=4",
                                        "--eval_interval=2", "--hellaswag_interval=2", f"--hellaswag_file={file}",
                                        "--eval_iters=2", "--attn_log_interval=0", f"--out_dir={tmp_path / 'out'}"],
                          prog="train.py", description="")
    last = train(shrunk)
    assert last["iter"] == 4 and math.isfinite(last["final_val_loss"])
    records = read_metrics(tmp_path / "out")
    assert [r["iter"] for r in records if "hellaswag_acc_norm" in r] == [0, 2, 4]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 4]


def test_scores_reach_wandb_from_training_and_from_eval(tmp_path, data_dir):
    from tests.wandb_records import logged_history

    file = write_examples(tmp_path / "val.jsonl", own_text_examples(4))
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    out = tmp_path / "out"
    run = python("train.py", f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4", "--max_iters=4",
                 "--eval_interval=2", "--eval_iters=2", "--attn_log_interval=0", "--wandb_log=true",
                 "--hellaswag_interval=4", f"--hellaswag_file={file}", env=env)
    assert run.returncode == 0, run.stderr
    (train_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = logged_history(train_dir)
    scored = {row["_step"]: row["hellaswag_acc_norm"] for row in history if "hellaswag_acc_norm" in row}
    by_metrics = {r["iter"]: r["hellaswag_acc_norm"] for r in read_metrics(out) if "hellaswag_acc_norm" in r}
    assert scored == by_metrics and sorted(scored) == [0, 4]
    again = python("eval.py", f"--out_dir={out}", "--task=hellaswag", f"--hellaswag_file={file}", "--wandb_log=true",
                   env=env)
    assert again.returncode == 0, again.stderr
    (eval_dir,) = set((tmp_path / "wandb").glob("offline-run-*")) - {train_dir}
    (row,) = [r for r in logged_history(eval_dir) if "hellaswag_acc_norm" in r]  # train.py's name for it
    assert row["hellaswag_acc_norm"] == read_metrics(out)[-1]["hellaswag_acc_norm"]
    assert row["hellaswag_examples"] == 4
