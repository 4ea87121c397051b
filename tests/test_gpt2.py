"""GPT-2 in and out, against transformers as the reference: import (logits, attention, greedy generation),
finetuning, export (logits, tokenizers, pipeline), the Hub cache offline, and bad input.

transformers builds GPT-2 models with random weights offline, so nothing is downloaded. The shape is
small (2 layers, 64 wide) with GPT-2's own vocabulary; GPT-2 small's shape goes through bench.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import export  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from data.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402
from glimpse.attention import dump_text, load_dump  # noqa: E402
from glimpse.checkpoint import load_trained, save_checkpoint  # noqa: E402
from glimpse.config import build, parse_config  # noqa: E402
from glimpse.errors import GlimpseError  # noqa: E402
from glimpse.generation import generate  # noqa: E402
from glimpse.gpt2 import hf_config, hf_weights, load_pretrained, pretrained_folder, read_config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tests.conftest import REPO, make_corpus, python, tiny_config  # noqa: E402
from tests.test_reliability import run_main  # noqa: E402
from tests.test_render import embedded_data  # noqa: E402

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)
UNICODE = "Café naïve — déjà vu 😀🎉 中文字符\n\n   runs   of  spaces\t tab\r\nit 's here , isn't it ? end "


def reference(tie: bool = True, seed: int = 0):
    """A random GPT2LMHeadModel, its biases and LayerNorm gains random too (transformers starts them at 0 and 1)
    so that one read wrongly, or into the wrong layer norm, shows."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE, tie_word_embeddings=tie,
                                                              attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif ".ln_" in name and name.endswith("weight"):  # ln_1, ln_2, ln_f
                p.normal_(1, 0.1)
    return hf


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(the reference model, the folder save_pretrained wrote)."""
    hf = reference()
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf.save_pretrained(folder)
    return hf, folder


def original_layout(src: Path, dest: Path) -> Path:
    """The folder as the original GPT-2 upload lays it out: no "transformer." prefix, the mask as a buffer, and a
    config.json from before tie_word_embeddings (GPT-2 ties its head, as transformers' default has it)."""
    dest.mkdir()
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (dest / "config.json").write_text(json.dumps(config))
    state = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    for layer in range(SHAPE["n_layer"]):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(64, 64))[None, None]
    save_file(state, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("layout", ["save_pretrained", "original"])
def test_imported_logits_equal_transformers(hf_folder, tmp_path, layout):
    hf, folder = hf_folder
    if layout == "original":
        folder = original_layout(folder, tmp_path / "original")
    model = load_pretrained(str(folder))
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
    assert ours.shape == theirs.shape == (2, 64, SHAPE["vocab_size"])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 is: one matrix that finetuning moves


def test_untied_head_imports(tmp_path):
    hf = reference(tie=False, seed=3)
    hf.save_pretrained(tmp_path / "untied")
    model = load_pretrained(str(tmp_path / "untied"))
    assert not model.config.tie_embeddings
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    ids = torch.arange(40)[None] * 7
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting,value", [
    ("layer_norm_epsilon", 1e-6), ("n_inner", 100), ("activation_function", "relu"), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True)])
def test_a_gpt2_config_glimpse_would_compute_otherwise_is_refused(tmp_path, setting, value):
    """GPT-2 checkpoints may set what glimpse's GPT does not compute: loaded, they would give other logits."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
                                                      setting: value}))
    with pytest.raises(GlimpseError, match=re.escape(f"sets {setting}={value!r}, which glimpse's GPT-2 does not")):
        read_config(tmp_path)


@pytest.mark.parametrize("setting,value", [
    ("n_layer", 2.0), ("n_head", "4"), ("n_positions", None), ("vocab_size", 0), ("n_embd", True),
    ("tie_word_embeddings", "yes")])
def test_a_gpt2_config_whose_sizes_are_not_whole_numbers_is_one_line_naming_the_key(tmp_path, setting, value):
    """A config.json written by hand or by another tool (2.0 for 2) once failed deep inside torch with a traceback,
    or in a comparison that named no key."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
                                                      setting: value}))
    said = f"config.json sets {setting}={json.dumps(value)}, which must be "
    with pytest.raises(GlimpseError, match=re.escape(said)):
        read_config(tmp_path)


def test_a_config_that_spells_out_gpt2s_own_settings_is_read(tmp_path):
    """Configs may write GPT-2's own values out rather than leave them to the defaults: an n_inner of 4 x n_embd
    (GPT-2's MLP width), a layer_norm_epsilon of 1e-5, gelu_pytorch_tanh. Each is what glimpse computes."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": 256, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_pytorch_tanh", "scale_attn_weights": True}))
    config = read_config(tmp_path)
    assert (config.n_embd, config.n_head, config.n_layer) == (64, 4, 2)


def test_weights_of_another_shape_than_the_config_are_named_in_one_line(hf_folder, tmp_path):
    """A config.json edited to 32 positions beside weights of 64: the error names the tensor and both shapes, where
    loading on would fail in load_state_dict with a traceback of every mismatch."""
    _, folder = hf_folder
    shutil.copytree(folder, tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "n_positions": 32}))
    with pytest.raises(GlimpseError, match=re.escape("does not match its config.json: transformer.wpe.weight is "
                                                     "(64, 64), not (32, 64)")):
        load_pretrained(str(tmp_path / "edited"))


def test_a_folder_without_config_json_says_so_whatever_weights_it_holds(tmp_path):
    """The pickled-weights hint is for a folder lacking model.safetensors: one that lacks config.json is told that,
    even when it holds a pytorch_model.bin beside its safetensors."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(GlimpseError, match="has no config.json: a Hugging Face GPT-2 folder holds config.json and "
                                           "model.safetensors"):
        pretrained_folder(str(tmp_path))


@pytest.mark.parametrize("bias,tie", [(False, False), (False, True), (True, False)])
def test_export_writes_exactly_the_tensors_gpt2lmheadmodel_has(bias, tie):
    """A model without biases exports zero biases for GPT-2's layers, but none for lm_head, which has no bias in
    GPT2LMHeadModel: a tensor transformers does not know is reported as unused at every load."""
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, bias=bias, tie_embeddings=tie))
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(model.config, 0)))
    expected = set(theirs.state_dict()) - ({"lm_head.weight"} if tie else set())  # a tied head is written once
    assert set(hf_weights(model)) == {k for k in expected if not k.endswith(".attn.bias")}  # no causal masks


def test_a_config_that_does_not_say_is_tied_as_gpt2s_own_are(tmp_path):
    """The original GPT-2 configs have no tie_word_embeddings: transformers' default, tied, is what they mean."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2}))
    assert read_config(tmp_path).tie_embeddings is True
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
                                                      "tie_word_embeddings": False}))
    assert read_config(tmp_path).tie_embeddings is False


def test_an_untied_config_whose_file_has_no_head_loads_tied_and_says_so(tmp_path, capsys):
    """config.json unties the head but model.safetensors holds none: the head is the embeddings' one matrix, as
    GPT-2's, and the model says it is tied (two parameters on one matrix got two optimizer states, and export
    could not save them)."""
    hf = reference(tie=False, seed=3)
    hf.save_pretrained(tmp_path / "untied")
    weights = load_file(tmp_path / "untied" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "untied" / "model.safetensors", metadata={"format": "pt"})
    model = load_pretrained(str(tmp_path / "untied"))
    assert model.config.tie_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len({p.data_ptr() for p in model.parameters()})
    assert "holds no lm_head.weight though" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_folder_saved_in_half_precision_loads_in_float32(tmp_path, dtype):
    """Weights saved in 16 bits are read as float32, as glimpse's training (a float16 gradient cannot be unscaled)
    and the mechanism's trace need; the values are the file's own."""
    hf = reference(seed=4).to(dtype)
    hf.save_pretrained(tmp_path / "half")
    model = load_pretrained(str(tmp_path / "half"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.arange(40)[None] * 11
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf.float()(ids).logits, atol=1e-4, rtol=0)


def test_dumped_attention_equals_transformers_output_attentions(hf_folder, tmp_path, gpt2_ranks):
    hf, folder = hf_folder
    model = load_pretrained(str(folder))
    tokenizer = GPT2Tokenizer()
    ids = tokenizer.encode(make_corpus(20))[:64].tolist()
    dump_text(model, tokenizer, ids, 5, {"test": True}, tmp_path / "dump", pngs=False)
    dumped = load_dump(tmp_path / "dump")["attn"]  # (n_layer, n_head, T, T) float16
    with torch.no_grad():
        theirs = hf(torch.tensor([ids]), output_attentions=True).attentions
    assert dumped.shape == (2, 4, 64, 64)
    for layer, weights in enumerate(theirs):
        np.testing.assert_allclose(dumped[layer].astype(np.float32), weights[0].numpy(), atol=1e-3, rtol=0)


def test_greedy_generation_equals_transformers_generate(hf_folder, tmp_path, gpt2_ranks):
    hf, folder = hf_folder
    prompt = "ROMEO: the night is"
    ids = GPT2Tokenizer().encode(prompt).tolist()
    hf.generation_config.eos_token_id = None  # a random model may say <|endoftext|>: generate all 50 regardless
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False, pad_token_id=0)[0, len(ids):]
    model, *_ = load_trained("", "auto", "cpu", "float32", "sampling from", init_from=str(folder))
    ours = [step.token.item() for step in generate(model, torch.tensor([ids]), 50, temperature=0.0)]
    assert len(ours) == 50 and ours == theirs.tolist()
    # and the script, as a user runs it: the same text
    cfg = build(sample.SampleConfig, dict(init_from=str(folder), start=prompt, num_samples=1, max_new_tokens=50,
                                          temperature=0.0, dump_dir=str(tmp_path / "dumps"), pngs=False))
    (text,) = sample.sample(cfg, out=io.StringIO())
    assert text == GPT2Tokenizer().decode([*ids, *ours])
    assert (tmp_path / "dumps" / "sample_0" / "attention.npz").exists()


def test_a_vocabulary_padded_past_gpt2s_samples_gpt2s_tokens_only(tmp_path, gpt2_ranks):
    """A folder whose vocabulary is padded past GPT-2's 50,257 (to 50,304, for speed) is GPT-2's BPE: its padding's
    logits, however high, are never sampled (no tokenizer could write them out), nor its ids drawn by the probe."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SHAPE, "vocab_size": 50304})).eval()
    with torch.no_grad():  # every logit 0 but the padding's, 20: whatever the text, the padding is the likeliest
        for p in hf.parameters():
            p.zero_()
        hf.transformer.ln_f.bias[0] = 1.0
        hf.transformer.wte.weight[50257:, 0] = 20.0  # tied: the head's rows too
    hf.save_pretrained(tmp_path / "padded")
    cfg = build(sample.SampleConfig, dict(init_from=str(tmp_path / "padded"), start="ROMEO:", num_samples=1,
                                          max_new_tokens=4, temperature=0.0, mechanism=True, pngs=False,
                                          dump_dir=str(tmp_path / "dumps"), probe="induction"))
    out = io.StringIO()
    (text,) = sample.sample(cfg, out=out)
    assert text == "ROMEO:!!!!"  # the likeliest of GPT-2's tokens: all at 0, the first, "!"
    assert "induction probe: 32 random tokens of 50,257 (without repeats)" in out.getvalue()
    # the model itself predicts the padding, and the dump's panels name it for what it is
    dump = load_dump(tmp_path / "dumps" / "sample_0")
    assert (dump["predicted"] >= 50257).all()
    page = embedded_data((tmp_path / "dumps" / "sample_0" / "index.html").read_text(encoding="utf-8"))
    assert page["vocab"]["50257"] == "⟨no-token-50257⟩"


def test_named_model_comes_from_the_hub_cache_offline(hf_folder, tmp_path, gpt2_ranks):
    """--init_from=gpt2 reads huggingface_hub's cache under HF_HOME; offline and uncached it says what to do."""
    _, folder = hf_folder
    repo = tmp_path / "hf_home" / "hub" / "models--openai-community--gpt2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": str(gpt2_ranks)}
    args = [str(REPO / "sample.py"), "--init_from=gpt2", "--start=Hello", "--num_samples=1", "--max_new_tokens=5",
            "--dump_attention=false"]
    done = python(*args, env=env, cwd=tmp_path)  # not the checkout's: a ./gpt2 folder there would be read instead
    assert done.returncode == 0, done.stderr
    assert "sampling from gpt2 (3.32M parameters)" in done.stderr
    missing = python(*args, env={**env, "HF_HOME": str(tmp_path / "empty")}, cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    (line,) = missing.stderr.strip().splitlines()
    assert "not in the Hugging Face cache" in line and "hf download openai-community/gpt2" in line


def test_a_folder_named_like_a_hub_model_is_read_as_the_folder(trained, tmp_path):
    """./gpt2 holding a Hugging Face folder (as `hf download ... --local-dir gpt2` makes it) is that folder, offline
    too, tokenizer included: here an exported char model, whose text GPT-2's BPE would not give."""
    cfg, _ = trained
    export.main([f"--out_dir={cfg.out_dir}", f"--to={tmp_path / 'gpt2'}"])
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(REPO / "sample.py"), "--init_from=gpt2", "--start=ROMEO:", "--num_samples=1",
            "--max_new_tokens=8", "--temperature=0", "--dump_attention=false"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    folder_text = sample.sample(build(sample.SampleConfig, dict(init_from=str(tmp_path / "gpt2"), start="ROMEO:",
                                                                num_samples=1, max_new_tokens=8, temperature=0.0,
                                                                dump_attention=False)), out=io.StringIO())[0]
    assert done.stdout.startswith(folder_text)
    # a training run's out_dir of that name holds a config.json of its own, but no model: the name is the Hub's
    shutil.copytree(cfg.out_dir, tmp_path / "runs" / "gpt2")
    hub = subprocess.run(args, cwd=tmp_path / "runs", env=env, capture_output=True, text=True, timeout=300)
    assert hub.returncode == 2 and "not in the Hugging Face cache" in hub.stderr


def bpe_data(tmp_path: Path) -> Path:
    (tmp_path / "play.txt").write_text(make_corpus(600), encoding="utf-8")
    prepare(PrepareConfig(dataset="bpe", input=str(tmp_path / "play.txt"), data_dir=str(tmp_path / "data"),
                          tokenizer="gpt2"))
    return tmp_path / "data"


def test_finetune_resume_and_sample(hf_folder, tmp_path, gpt2_ranks, capsys):
    hf, folder = hf_folder
    data = bpe_data(tmp_path)
    out = tmp_path / "ft"
    settings = dict(dataset="bpe", init_from=str(folder), block_size=32, dropout=0.1, batch_size=4, max_iters=4,
                    eval_interval=2, eval_iters=2, learning_rate=1e-3, warmup_iters=0, attn_log_interval=4, bias=False)
    first = train.train(tiny_config(data, out, **settings))
    # tiny_config's n_head=2 and n_embd=32 and bias=false do not apply, and the run says so as flags spell them;
    # n_layer=2 is GPT-2's own here
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: finetuning")]
    assert note == [f"note: finetuning trains {folder}'s shape, so n_head=2, n_embd=32, bias=false did not apply (of "
                    "the model keys, only block_size and dropout do)"]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["pretrained"] == str(folder)
    assert {k: state["model_config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == dict(
        n_layer=2, n_head=4, n_embd=64, block_size=32)  # GPT-2's shape, whatever the model keys said
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    assert (out / "attention").is_dir()
    # the weights moved from GPT-2's, starting from them: step 0's loss is the pretrained model's
    start = load_pretrained(str(folder))
    assert not torch.equal(torch.load(out / "best.pt", weights_only=True)["model"]["transformer.h.0.mlp.c_fc.weight"],
                           start.transformer.h[0].mlp.c_fc.weight)
    # resuming takes the shape from the checkpoint, not from the model keys (which say 2 layers of 32 here)
    again = train.train(tiny_config(data, out, **{**settings, "init_from": "resume", "max_iters": 6}))
    assert again["iter"] == 6 and first["iter"] == 4
    assert "n_head=2, n_embd=32, bias=false did not apply" in capsys.readouterr().out  # said on resuming too
    assert {k: json.loads((out / "config.json").read_text())[k] for k in ("n_head", "n_embd")} == dict(n_head=4,
                                                                                                      n_embd=64)
    model, saved, *_ = load_trained(out, "last", "cpu", "float32", "sampling from")
    assert saved["pretrained"] == str(folder) and model.config.n_embd == 64


def test_finetune_preset_trains_a_step(hf_folder, tmp_path, gpt2_ranks):
    _, folder = hf_folder
    cfg = parse_config(train.TrainConfig, [str(REPO / "config" / "finetune_shakespeare.toml"), f"--init_from={folder}",
                                           f"--data_dir={bpe_data(tmp_path)}", "--dataset=bpe", "--block_size=32",
                                           f"--out_dir={tmp_path / 'out'}", "--max_iters=1", "--eval_iters=1",
                                           "--device=cpu"], prog="train.py", description="")
    last = train.train(cfg)
    assert last["iter"] == 1 and np.isfinite(last["val_loss"]) and (tmp_path / "out" / "best.pt").exists()


def test_imported_model_trains_like_a_glimpse_one(hf_folder):
    """Built on the meta device with its weights assigned: every parameter is real, trainable and tied; a shorter
    block_size keeps GPT-2's first positions, and the dropout asked for acts in training."""
    hf, folder = hf_folder
    model = load_pretrained(str(folder), block_size=16, dropout=0.1)
    ids = torch.arange(16)[None] * 13
    with torch.no_grad():  # 16 tokens at positions 0..15: GPT-2's own logits
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids)[0], model(ids)[0])  # two dropout masks
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 64)
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    loss = model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))[1]
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def glimpse_checkpoint(path: Path, config: GPTConfig, tokenizer: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(0, 0.1)  # LayerNorms and biases away from their initial 1 and 0
    save_checkpoint(path / "best.pt", {"model": model.state_dict(), "model_config": asdict(config),
                                       "tokenizer": tokenizer, "train_config": {}, "iter_num": 0, "val_loss": None})
    return path


def exported_logits_match(out_dir: Path, dest: Path, ids: torch.Tensor):
    export.export(build(export.ExportConfig, dict(out_dir=str(out_dir), to=str(dest))))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dest).eval()
    model, *_ = load_trained(out_dir, "auto", "cpu", "float32", "x")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids)[0], atol=1e-4, rtol=0)


def test_export_trained_char_model(trained, tmp_path):
    cfg, _ = trained
    dest = tmp_path / "hf-char"
    text = make_corpus(3)
    ours = CharTokenizer(load_trained(cfg.out_dir, "auto", "cpu", "float32", "x")[1]["tokenizer"]["chars"])
    exported_logits_match(Path(cfg.out_dir), dest, torch.from_numpy(ours.encode(text)[None, :32]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(dest)
    assert tokenizer.encode(text) == ours.encode(text).tolist()
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # a class every transformers since 4 knows: 5's own name for it, TokenizersBackend, is unknown to 4's
    assert json.loads((dest / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    spaced = "the moon . a sun .\n"  # a space before punctuation, which transformers' clean-up would drop
    assert tokenizer.decode(tokenizer.encode(spaced)) == spaced
    generated = transformers.pipeline("text-generation", model=str(dest))("ROMEO:", max_new_tokens=10,
                                                                          do_sample=False)
    assert generated[0]["generated_text"].startswith("ROMEO:") and len(generated[0]["generated_text"]) == 16


def test_export_without_biases_and_untied(tmp_path):
    config = GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=32, bias=False,
                       tie_embeddings=False)
    out = glimpse_checkpoint(tmp_path / "run", config, {"kind": "char", "chars": "".join(chr(65 + i)
                                                                                          for i in range(40))})
    exported_logits_match(out, tmp_path / "hf", torch.arange(32)[None] % 40)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" in weights and not weights["transformer.h.0.attn.c_attn.bias"].any()
    # and back into glimpse (sample.py --init_from=DIR), untied: a config.json that does not say so reads as tied
    back, ours = load_pretrained(str(tmp_path / "hf")), load_trained(out, "auto", "cpu", "float32", "x")[0]
    assert not back.config.tie_embeddings
    ids = torch.arange(32)[None] % 40
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], ours(ids)[0], atol=1e-5, rtol=0)


def test_export_gpt2_tokenizer_round_trips_unicode(tmp_path, gpt2_ranks):
    config = GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)
    out = glimpse_checkpoint(tmp_path / "run", config, {"kind": "gpt2", "encoding": "r50k_base"})
    ids = torch.tensor([GPT2Tokenizer().encode(UNICODE).tolist()])
    exported_logits_match(out, tmp_path / "hf", ids)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode(UNICODE) == ids[0].tolist()
    assert tokenizer.decode(tokenizer.encode(UNICODE)) == UNICODE
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.model_max_length == 64  # truncation=True cuts a text to the model's n_positions
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 50256
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")  # what generate() stops at
    assert (generation.eos_token_id, generation.bos_token_id, generation.max_length) == (50256, 50256, 64)


def test_an_exported_file_gets_the_mode_the_users_umask_gives_a_new_file(tmp_path):
    """safetensors writes its file readable by its owner alone: the export gives it what any file the user creates
    gets, whatever the umask (not one fixed mode that matches the usual 022 alone)."""
    from glimpse.files import as_created

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    for umask, mode in ((0o002, 0o664), (0o027, 0o640), (0o022, 0o644)):
        weights.chmod(0o600)
        before = os.umask(umask)
        try:
            as_created(weights)
        finally:
            os.umask(before)
        assert weights.stat().st_mode & 0o777 == mode, oct(umask)


@pytest.mark.parametrize("to", [".", "sub/.."])
def test_export_to_a_path_that_names_the_current_folder(to, trained, tmp_path, monkeypatch):
    cfg, _ = trained
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    export.main([f"--out_dir={Path(cfg.out_dir).resolve()}", f"--to={to}"])
    assert sorted(p.name for p in here.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # no temporary folder left beside it


def test_an_overwrite_that_cannot_finish_replaces_nothing(trained, tmp_path, capsys):
    """--overwrite onto a folder where a file the export writes is a folder: refused before any file is replaced
    (it stopped half-way, the old config.json and weights already replaced, with a traceback)."""
    cfg, _ = trained
    dest = tmp_path / "hf"
    export.main([f"--out_dir={cfg.out_dir}", f"--to={dest}"])
    (dest / "tokenizer.json").unlink()
    (dest / "tokenizer.json").mkdir()
    (dest / "config.json").write_text("{}")  # an older export's, say: it must stay as it is
    before = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
    line = run_main(export.main, [f"--out_dir={cfg.out_dir}", f"--to={dest}", "--overwrite"], capsys)
    assert line == f"error: {dest / 'tokenizer.json'} is a folder, where the export writes a file: remove it or give " \
                   "another --to"
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} == before
    assert not (tmp_path / ".hf.export-tmp").exists()


def test_an_export_interrupted_before_goes_on_over_the_folder_it_left_beside_its_destination(tmp_path):
    """An export killed half-way leaves its temporary folder beside --to: the next one starts that folder afresh
    (not a FileExistsError), writes the whole export, and leaves no temporary folder behind. Its weights carry the
    format mark transformers reads safetensors by."""
    config = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=16)
    out = glimpse_checkpoint(tmp_path / "run", config, {"kind": "char", "chars": "abcdefghij"})
    left = tmp_path / ".hf.export-tmp"  # as the interrupted export left it
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    export.export(build(export.ExportConfig, dict(out_dir=str(out), to=str(tmp_path / "hf"))))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in (tmp_path / "hf").iterdir()}
    assert not left.exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:  # transformers 4 refuses a file
        assert f.metadata() == {"format": "pt"}  # without this mark; 5 no longer asks


def test_export_refuses_the_runs_own_folder_named_relatively(trained, tmp_path, monkeypatch, capsys):
    """--out_dir=run --to=run, typed from the folder above: the same folder, however each is spelled, so the
    run's config.json stays the run's, --overwrite or not."""
    cfg, _ = trained
    run = shutil.copytree(cfg.out_dir, tmp_path / "run")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    for to in ("run", "./run/", str(run)):
        line = run_main(export.main, ["--out_dir=run", f"--to={to}", "--overwrite"], capsys)
        assert "is the run's own --out_dir" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # another run's folder, with its checkpoints or (stopped before the first) its config.json alone: refused too
    other = shutil.copytree(run, tmp_path / "other")
    started, weights = tmp_path / "started", tmp_path / "weights"  # a run's config.json alone; its ckpt.pt alone
    for folder, name in ((started, "config.json"), (weights, "ckpt.pt")):
        folder.mkdir()
        shutil.copy(run / name, folder)
    folders = (other, started, weights)
    kept = {p: p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}
    for to in folders:
        line = run_main(export.main, ["--out_dir=run", f"--to={to}", "--overwrite"], capsys)
        assert line.endswith("holds a training run (its checkpoints or its config.json, which the export's would "
                             "replace): give another folder"), line
    assert {p: p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()} == kept


def test_bad_input_is_one_line_and_writes_nothing(hf_folder, tmp_path, data_dir, trained, gpt2_ranks, capsys):
    _, folder = hf_folder
    no_config, no_weights, llama, truncated, pickled, listed = (
        tmp_path / n for n in ("no_config", "no_weights", "llama", "cut", "pickled", "listed"))
    for f in (no_config, no_weights, llama, truncated, pickled, listed):
        shutil.copytree(folder, f)
    (listed / "config.json").write_text("[1]")  # JSON, but no settings
    (no_config / "config.json").unlink()
    (no_weights / "model.safetensors").unlink()
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # what older uploads hold: not read
    trainer = tmp_path / "trainer"  # a transformers Trainer's checkpoint folder: *.pt and *.bin of its own
    shutil.copytree(pickled, trainer)
    for name in ("optimizer.pt", "scheduler.pt", "training_args.bin"):
        (trainer / name).write_bytes(b"")
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    for source, expected in [(no_config, "has no config.json"), (no_weights, "has no model.safetensors"),
                             (llama, "describes a 'llama' model, not GPT-2"), (truncated, "is truncated"),
                             ("gpt3", "is neither a pretrained model (gpt2, gpt2-medium"),
                             (pickled, "holds pytorch_model.bin but no model.safetensors, the only weights file"),
                             (trained[0].out_dir, "holds a glimpse run's checkpoints, not a Hugging Face GPT-2 folder: "
                                                  "read it with --out_dir"),
                             (trainer, "holds pytorch_model.bin but no model.safetensors"),
                             (listed, "is JSON but not a config (an object of settings): it holds a list")]:
        assert expected in run_main(sample.main, [f"--init_from={source}", "--max_new_tokens=1"], capsys), source
    assert "holds a glimpse run's checkpoints" in run_main(  # finetuning from a run's folder: --out_dir's resume
        train.main, [f"--init_from={trained[0].out_dir}", f"--out_dir={tmp_path / 'never'}"], capsys)
    # finetuning GPT-2 on a char-level dataset
    out = tmp_path / "ft"
    line = run_main(train.main, [f"--init_from={folder}", "--dataset=tiny", f"--data_dir={data_dir}",
                                 f"--out_dir={out}", "--block_size=16", "--device=cpu"], capsys)
    assert "reads GPT-2's BPE tokens, but dataset tiny is tokenized by char" in line
    assert not (out / "ckpt.pt").exists() and not (out / "best.pt").exists()
    # exporting an architecture GPT-2 does not have
    odd = GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=2, n_embd=16, pos_encoding="rope",
                    norm="rmsnorm", qk_norm=True)
    odd_run = glimpse_checkpoint(tmp_path / "odd", odd, {"kind": "char", "chars": "abcdefghij"})
    line = run_main(export.main, [f"--out_dir={odd_run}", f"--to={tmp_path / 'never'}"], capsys)
    assert "pos_encoding=rope, norm=rmsnorm, qk_norm=true, which GPT-2 has no equivalent of: only models with " \
        "pos_encoding=learned, norm=layernorm, activation=gelu, attn_score=scaled_dot, qk_norm=false, " \
        "logit_softcap=0.0, value_embeds=0, unet=false, smear=false export" in line
    assert not (tmp_path / "never").exists()
    # --to a folder that holds files: refused, and the files stay as they were
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cfg, _ = trained
    line = run_main(export.main, [f"--out_dir={cfg.out_dir}", f"--to={full}"], capsys)
    assert "already holds files" in line and "--overwrite" in line
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "mine"
    assert run_main(export.main, [f"--out_dir={cfg.out_dir}"], capsys).endswith("with --to=DIR")
    # --to the run's own folder, whose config.json is the training run's: refused, --overwrite or not
    run_files = {p: p.read_bytes() for p in Path(cfg.out_dir).rglob("*") if p.is_file()}
    for flags in ([], ["--overwrite"]):
        line = run_main(export.main, [f"--out_dir={cfg.out_dir}", f"--to={cfg.out_dir}/.", *flags], capsys)
        assert "is the run's own --out_dir" in line and "--overwrite" not in line
    assert {p: p.read_bytes() for p in Path(cfg.out_dir).rglob("*") if p.is_file()} == run_files
    export.main([f"--out_dir={cfg.out_dir}", f"--to={full}", "--overwrite"])
    assert (full / "notes.txt").read_text() == "mine" and (full / "model.safetensors").exists()
    wrote = capsys.readouterr().err.splitlines()[-1]  # the files the export wrote, not what was there before
    assert wrote.startswith(f"wrote {full}: config.json") and "model.safetensors" in wrote and "notes.txt" not in wrote
