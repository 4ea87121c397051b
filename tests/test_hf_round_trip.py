"""glimpse -> Hugging Face -> glimpse: an exported folder reads back into glimpse with its own tokenizer, for
sampling and finetuning; transformers' generate on it gives the same greedy text, and its pipeline and generate
stay within the learned positions; its tokenizer and glimpse's read a literal <|endoftext|> alike; tokenizers
glimpse cannot reproduce are one line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import export  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from data.tokenizer import GPT2_ENCODING, GPT2Tokenizer  # noqa: E402
from glimpse.checkpoint import load_trained  # noqa: E402
from glimpse.config import build  # noqa: E402
from glimpse.errors import GlimpseError  # noqa: E402
from glimpse.hf_tokenizer import folder_tokenizer  # noqa: E402
from model import GPTConfig  # noqa: E402
from tests.conftest import make_corpus, tiny_config  # noqa: E402
from tests.test_gpt2 import UNICODE, bpe_data, glimpse_checkpoint  # noqa: E402
from tests.test_reliability import run_main  # noqa: E402

PROMPT = "ROMEO:"
GPT2_SPEC = {"kind": "gpt2", "encoding": "r50k_base"}


def export_run(out_dir, dest: Path) -> Path:
    export.export(build(export.ExportConfig, dict(out_dir=str(out_dir), to=str(dest))))
    return dest


@pytest.fixture(scope="module")
def char_folder(trained, tmp_path_factory) -> Path:
    """The session's trained char model, exported."""
    cfg, _ = trained
    return export_run(cfg.out_dir, tmp_path_factory.mktemp("hf") / "char")


def glimpse_greedy(new_tokens: int, **source) -> str:
    """sample.py's greedy text from a checkpoint (out_dir=) or a Hugging Face folder (init_from=)."""
    cfg = build(sample.SampleConfig, dict(start=PROMPT, num_samples=1, max_new_tokens=new_tokens, temperature=0.0,
                                          dump_attention=False, **source))
    (text,) = sample.sample(cfg, out=io.StringIO())
    return text


def transformers_greedy(folder: Path, new_tokens: int) -> str:
    """transformers' own greedy generate on the folder, every new token whatever it is (no stop at the end of
    text, as sample.py has none)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    model.generation_config.eos_token_id = None
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0])


def test_char_model_round_trips_through_hugging_face(trained, char_folder):
    cfg, _ = trained
    new_tokens = cfg.model.block_size - len(PROMPT)  # transformers' GPT-2 stops at its learned positions
    ours = glimpse_greedy(new_tokens, out_dir=cfg.out_dir)
    assert len(ours) == len(PROMPT) + new_tokens  # a char model: one character a token
    assert glimpse_greedy(new_tokens, init_from=str(char_folder)) == ours
    assert transformers_greedy(char_folder, new_tokens) == ours
    # the tokenizer glimpse read from the folder is the checkpoint's own
    _, state, *_ = load_trained("", "auto", "cpu", "float32", "x", init_from=str(char_folder))
    assert state["tokenizer"] == load_trained(cfg.out_dir, "auto", "cpu", "float32", "x")[1]["tokenizer"]
    # every file of the export as readable as any file the user writes: the weights too (safetensors writes 0600)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in char_folder.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "model.safetensors" in modes


def test_gpt2_model_round_trips_through_hugging_face(tmp_path, gpt2_ranks):
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)
    out = glimpse_checkpoint(tmp_path / "run", config, GPT2_SPEC)
    folder = export_run(out, tmp_path / "hf")
    ours = glimpse_greedy(40, out_dir=str(out))
    assert glimpse_greedy(40, init_from=str(folder)) == ours
    assert transformers_greedy(folder, 40) == ours
    assert folder_tokenizer(folder, config.vocab_size) == GPT2_SPEC


def test_finetune_exported_char_model(char_folder, data_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    last = train.train(tiny_config(data_dir, out, init_from=str(char_folder), max_iters=2, eval_interval=2,
                                   eval_iters=1, attn_log_interval=0))
    assert last["iter"] == 2
    state = torch.load(out / "best.pt", weights_only=True)
    assert state["pretrained"] == str(char_folder)
    assert state["tokenizer"] == json.loads((data_dir / "tiny" / "meta.json").read_text())["tokenizer"]
    # a block_size longer than the export's learned positions (a preset's 256 beside a small model) trains at the
    # model's own length, and says so
    positions = json.loads((char_folder / "config.json").read_text())["n_positions"]
    capsys.readouterr()
    longer = train.train(tiny_config(data_dir, tmp_path / "longer", init_from=str(char_folder), max_iters=1,
                                     eval_interval=1, eval_iters=1, attn_log_interval=0, block_size=positions + 32))
    assert longer["iter"] == 1 and f"note: block_size={positions + 32} is longer than {char_folder}'s {positions} " \
        f"learned positions, so the run trains at {positions}\n" in capsys.readouterr().out
    assert torch.load(tmp_path / "longer" / "ckpt.pt", weights_only=True)["model_config"]["block_size"] == positions
    # a char dataset of other characters: its ids would mean other characters, refused in one line
    other = make_corpus(300).lower() + "%\t"
    (tmp_path / "other.txt").write_text(other, encoding="utf-8")
    prepare(PrepareConfig(dataset="other", input=str(tmp_path / "other.txt"), data_dir=str(tmp_path / "data")))
    refused = tmp_path / "refused"
    line = run_main(train.main, [f"--init_from={char_folder}", "--dataset=other", f"--data_dir={tmp_path / 'data'}",
                                 f"--out_dir={refused}", "--block_size=16", "--device=cpu", "--max_iters=1"], capsys)
    chars = set(state["tokenizer"]["chars"])
    lacks, adds = "".join(sorted(chars - set(other))), "".join(sorted(set(other) - chars))
    assert lacks and adds.startswith("\t%")  # the upper case; a tab and '%' with the letters only the names had
    assert f"reads {len(chars)} characters, and dataset other's vocabulary lacks '{lacks}' and adds '\\t{adds[1:]}'" \
        in line  # the tab written as \t, once
    assert not (refused / "ckpt.pt").exists() and not (refused / "best.pt").exists()


def test_an_export_given_as_a_runs_out_dir_says_to_give_it_as_init_from(char_folder, capsys):
    """An export holds config.json and model.safetensors, no best.pt: sample.py and eval.py read it through
    --init_from, which the error says, rather than to train one first."""
    import eval as eval_script

    expected = (f"error: {char_folder} holds a Hugging Face model (an export, a download), not a glimpse run's "
                f"checkpoints: give it as --init_from={char_folder} (sample.py; eval.py for --task=hellaswag)")
    assert run_main(sample.main, [f"--out_dir={char_folder}", "--device=cpu"], capsys) == expected
    assert run_main(eval_script.main, [f"--out_dir={char_folder}", "--device=cpu"], capsys) == expected
    (char_folder / "config.json").rename(char_folder / "config.json.away")  # weights alone are no model folder
    try:
        assert "train one first" in run_main(sample.main, [f"--out_dir={char_folder}", "--device=cpu"], capsys)
    finally:
        (char_folder / "config.json.away").rename(char_folder / "config.json")


def test_finetune_exported_char_model_on_bpe_dataset_is_refused(char_folder, tmp_path, gpt2_ranks, capsys):
    data = bpe_data(tmp_path)
    line = run_main(train.main, [f"--init_from={char_folder}", "--dataset=bpe", f"--data_dir={data}",
                                 f"--out_dir={tmp_path / 'out'}", "--block_size=16", "--device=cpu", "--max_iters=1"],
                    capsys)
    assert "characters, one token each, but dataset bpe is tokenized by gpt2" in line, line
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_tokenizers_glimpse_cannot_reproduce_are_one_line(char_folder, tmp_path, capsys):
    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(char_folder, folder)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        change(spec)
        (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        return folder

    lowercase = variant("lowercase", lambda t: t.update(normalizer={"type": "Lowercase"}))
    words = variant("words", lambda t: t["model"]["vocab"].update({"ROMEO": len(t["model"]["vocab"])}))
    unsorted = variant("unsorted", lambda t: t["model"].update(vocab={c: len(t["model"]["vocab"]) - 1 - i for c, i in
                                                                      t["model"]["vocab"].items()}))
    # one character more than the model's vocabulary, in sorted order: a prompt holding it has no embedding
    wider = variant("wider", lambda t: t["model"]["vocab"].update({"~": len(t["model"]["vocab"])}))
    malformed = tmp_path / "malformed"
    shutil.copytree(char_folder, malformed)
    (malformed / "tokenizer.json").write_text("{not json", encoding="utf-8")
    bare = tmp_path / "bare"
    shutil.copytree(char_folder, bare)
    (bare / "tokenizer.json").unlink()
    vocab_size = json.loads((bare / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    for folder, expected in [(lowercase, "is a tokenizer glimpse cannot reproduce"),
                             (words, "is a tokenizer glimpse cannot reproduce"),
                             (unsorted, "is a tokenizer glimpse cannot reproduce"),
                             (wider, f"has {vocab_size + 1} tokens, more than the {vocab_size} of the model beside it"),
                             (malformed, "is not a readable tokenizer file"),
                             (bare, f"has no tokenizer.json, and its {vocab_size}-token vocabulary is not GPT-2's")]:
        line = run_main(sample.main, [f"--init_from={folder}", "--max_new_tokens=1", "--dump_attention=false"], capsys)
        assert expected in line, (folder.name, line)


def test_transformers_own_gpt2_tokenizer_reads_as_gpt2(tmp_path, gpt2_ranks):
    """transformers' GPT-2 tokenizer read from vocab.json and merges.txt, the files of GPT-2's own upload, is
    GPT-2's BPE to glimpse; with add_prefix_space (a space put before the text) it is not."""
    exported = export_run(glimpse_checkpoint(tmp_path / "run", GPTConfig(block_size=16, n_layer=1, n_head=2,
                                                                         n_embd=16), GPT2_SPEC), tmp_path / "hf")
    bpe = json.loads((exported / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "vocab.json").write_text(json.dumps({**bpe["vocab"], "<|endoftext|>": 50256}), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (upload / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for prefix_space in (False, True):
        folder = tmp_path / f"prefix_space_{prefix_space}"
        shutil.copytree(exported, folder)
        (folder / "tokenizer.json").unlink()
        tokenizer = transformers.GPT2TokenizerFast.from_pretrained(upload, add_prefix_space=prefix_space)
        tokenizer.save_pretrained(folder)
        if not prefix_space:
            assert tokenizer.encode(UNICODE) == GPT2Tokenizer().encode(UNICODE).tolist()
            assert folder_tokenizer(folder, 50257) == GPT2_SPEC
        else:
            with pytest.raises(GlimpseError, match="is a tokenizer glimpse cannot reproduce"):
                folder_tokenizer(folder, 50257)


def test_vocab_json_and_merges_txt_without_a_tokenizer_json_are_read_for_what_they_are(tmp_path, gpt2_ranks):
    """A folder whose tokenizer is vocab.json and merges.txt alone (older uploads, GPT-2 models of other
    languages) is read through transformers: GPT-2's own files are GPT-2's BPE; the same tokens with other ids, or
    one file without the other, are refused, not sampled as GPT-2's BPE because the vocabulary has its size."""
    exported = export_run(glimpse_checkpoint(tmp_path / "run", GPTConfig(block_size=16, n_layer=1, n_head=2,
                                                                         n_embd=16), GPT2_SPEC), tmp_path / "hf")
    bpe = json.loads((exported / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = {**bpe["vocab"], "<|endoftext|>": 50256}
    merges = "#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]) + "\n"
    tokens = sorted(vocab, key=vocab.get)
    shuffled = dict(zip(tokens, [*reversed(range(50256)), 50256]))  # the same tokens, other ids
    for name, ids in (("gpt2", vocab), ("other", shuffled), ("no_merges", vocab)):
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        for made in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / made).unlink(missing_ok=True)
        (folder / "vocab.json").write_text(json.dumps(ids), encoding="utf-8")
        if name != "no_merges":
            (folder / "merges.txt").write_text(merges, encoding="utf-8")
    assert folder_tokenizer(tmp_path / "gpt2", 50257) == GPT2_SPEC
    with pytest.raises(GlimpseError, match="vocab.json is a tokenizer glimpse cannot reproduce"):
        folder_tokenizer(tmp_path / "other", 50257)
    with pytest.raises(GlimpseError, match="no tokenizer.json and no merges.txt"):
        folder_tokenizer(tmp_path / "no_merges", 50257)


def test_literal_end_of_text_is_ordinary_text_in_both_tokenizers(tmp_path, gpt2_ranks):
    out = glimpse_checkpoint(tmp_path / "run", GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16), GPT2_SPEC)
    theirs = transformers.AutoTokenizer.from_pretrained(export_run(out, tmp_path / "hf"))
    ours = GPT2Tokenizer()
    text = "The end.<|endoftext|>A new start <|endoftext|>\n<|endoftext|>"
    ids = ours.encode(text).tolist()
    assert ours.eot_token not in ids  # ordinary text: '<', '|', 'end', ...
    assert theirs.encode(text) == theirs(text).input_ids == ids
    assert theirs.eos_token_id == ours.eot_token == 50256  # the token itself, for generation to stop at
    assert theirs.decode([*ids, 50256]) == ours.decode([*ids, 50256]) == text + "<|endoftext|>"


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_pipeline_and_generate_stay_within_n_positions(kind, char_folder, tmp_path, request):
    if kind == "gpt2":
        request.getfixturevalue("gpt2_ranks")
        out = glimpse_checkpoint(tmp_path / "run", GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16),
                                 GPT2_SPEC)
        folder = export_run(out, tmp_path / "hf")
    else:
        folder = char_folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    n_positions = model.config.n_positions
    assert n_positions == 32  # shorter than the 256 new tokens the pipeline asks for by default
    # the pipeline with its defaults, as export.py's docstring shows it; sampling may end at <|endoftext|>
    (generated,) = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)(PROMPT,
                                                                                            return_tensors=True)
    prompt_ids = tokenizer(PROMPT).input_ids
    assert list(generated["generated_token_ids"][:len(prompt_ids)]) == prompt_ids
    assert len(prompt_ids) < len(generated["generated_token_ids"]) <= n_positions
    inputs = tokenizer(PROMPT, return_tensors="pt")
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = said.append
    hf_logger = logging.getLogger("transformers")  # transformers logs to its own logger, which does not propagate
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        hf_logger.removeHandler(handler)
    assert out.shape[1] <= inputs.input_ids.shape[1] + 5
    # nothing but the note that max_new_tokens wins over the folder's max_length
    assert all("`max_new_tokens` will take precedence" in r.getMessage() for r in said), said
    assert [str(w.message) for w in warned] == []
    # without a length generate stops at the model's learned positions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generation_config.eos_token_id = None
        assert model.generate(**inputs, do_sample=False, min_new_tokens=1).shape[1] == n_positions


def test_a_folder_of_weights_alone_reads_as_gpt2_exactly_at_gpt2s_vocabulary(tmp_path):
    """What download_hint fetches (config.json and model.safetensors, no tokenizer files) is GPT-2's BPE when the
    vocabulary is GPT-2's 50,257 tokens or more, and refused below it, where GPT-2's ids would not fit."""
    gpt2 = {"kind": "gpt2", "encoding": GPT2_ENCODING}
    assert folder_tokenizer(tmp_path, 50257) == gpt2 == folder_tokenizer(tmp_path, 50304)  # a padded one too
    with pytest.raises(GlimpseError, match="its 50,256-token vocabulary is not GPT-2's 50,257"):
        folder_tokenizer(tmp_path, 50256)
