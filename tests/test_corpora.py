"""Corpora of several formats, sharded: token counts against tiktoken, whole validation documents, resume
after kill -9, the built-ins through datasets on local parquet, training over shards (DDP too), bad input."""

import gzip
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tracemalloc
from contextlib import nullcontext
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import data.prepare as prepare_module
import data.shards as shards_module
import data.sources as sources_module
import data.tokenize_parallel as tokenize_parallel
from data.dataset import TokenData, gather_windows
from data.prepare import Hub, PrepareConfig, ensure_dataset, prepare
from data.sources import Documents, HubDocuments, input_files
from data.tokenize_parallel import pieces
from data.training_data import prepare_data
from glimpse.errors import GlimpseError
from glimpse.evaluation import length_loss
from model import GPT, GPTConfig
from tests.conftest import REPO, make_corpus, python, tiny_config
from tests.test_distributed import assert_two_processes_resume_exactly, torchrun
from tests.test_reliability import run_main


def documents(n: int, seed: int = 0) -> list[str]:
    """n short made-up documents, Unicode and runs of spaces included."""
    extras = ["café déjà vu", "emoji 🎭 and 中文", "  spaced   out\n\n\ttabbed", ""]
    return [make_corpus(3 + i % 5, seed=seed + i) + "\n" + extras[i % len(extras)] for i in range(n)]


def write_corpus(folder, docs: list[str]) -> list[str]:
    """docs spread over every format, in a folder; returns them in the order prepare.py reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True)
    a, b, c, d = np.array_split(np.arange(len(docs) - 1), 4)
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")  # one document
    lines = lambda ids: "".join(json.dumps({"id": int(i), "text": docs[i + 1]}) + "\n" for i in ids)  # noqa: E731
    (folder / "b.jsonl").write_text(lines(a), encoding="utf-8")
    (folder / "sub").mkdir()
    with gzip.open(folder / "sub" / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines(b))
    (folder / "sub" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(c).encode()))
    pq.write_table(pa.table({"id": [int(i) for i in d], "text": [docs[i + 1] for i in d]}), folder / "e.parquet",
                   row_group_size=3)
    (folder / "notes.md").write_text("not a corpus file")
    # sorted paths: a.txt, b.jsonl, e.parquet, sub/c.jsonl.gz, sub/d.jsonl.zst
    return [docs[0]] + [docs[i + 1] for i in (*a, *d, *b, *c)]


def split(folder, name):
    meta = json.loads((folder / "meta.json").read_text())
    return np.concatenate([np.fromfile(folder / s["file"], dtype=meta["dtype"]) for s in meta["shards"][name]])


def joined(enc, docs):
    out = []
    for i, doc in enumerate(docs):
        out += ([enc.eot_token] if i else []) + enc.encode_ordinary(doc)
    return out


def test_a_folder_of_every_format_is_sharded_with_whole_validation_documents(tmp_path, gpt2_ranks, monkeypatch):
    import tiktoken

    enc = tiktoken.get_encoding("r50k_base")
    docs = write_corpus(tmp_path / "corpus", documents(41))
    monkeypatch.setattr(tokenize_parallel, "CHUNK_CHARS", 2000)  # many tasks: the pool of 2 workers is used
    folder = prepare(PrepareConfig(dataset="mixed", input=str(tmp_path / "corpus"), tokenizer="gpt2",
                                   data_dir=str(tmp_path), shard_tokens=500, workers=2))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["documents"] == len(docs) == 41
    val_docs = [d for i, d in enumerate(docs) if i % 10 == 0]  # one in every 10, whole
    train_docs = [d for i, d in enumerate(docs) if i % 10]
    assert split(folder, "val").tolist() == joined(enc, val_docs)
    assert split(folder, "train").tolist() == joined(enc, train_docs)
    train_shards = meta["shards"]["train"]
    assert [s["tokens"] for s in train_shards[:-1]] == [500] * (len(train_shards) - 1) and len(train_shards) > 3
    assert 0 < train_shards[-1]["tokens"] <= 500 and meta["train_tokens"] == sum(s["tokens"] for s in train_shards)
    assert not list(folder.glob(".preparing-*"))  # the staging folder is gone


def long_text(paragraphs: int) -> str:
    """A long text with Windows line ends, multi-byte characters and runs of spaces, to read in small blocks."""
    return "\r\n".join(make_corpus(2, seed=i) + ("  déjà 🎭 vu" if i % 3 else "") for i in range(paragraphs))


@pytest.fixture
def small_blocks(monkeypatch):
    """A .txt file read 1,000 characters at a time (cutting words, characters' bytes and \\r\\n apart), cut
    into pieces of about 700, and a held document copied 333 tokens at a time."""
    monkeypatch.setattr(sources_module, "TXT_BLOCK", 1000)
    monkeypatch.setattr(tokenize_parallel, "CHUNK_CHARS", 700)
    monkeypatch.setattr(shards_module, "HELD_SLICE", 333)


def test_a_long_document_read_in_parts_is_cut_where_it_is_cut_whole(monkeypatch):
    monkeypatch.setattr(tokenize_parallel, "CHUNK_CHARS", 700)
    text = long_text(40).replace("\r\n", "\n") + "\n\n" + "x" * 3000  # a stretch with no place to cut
    whole = list(pieces([(text, len(text), True), ("next", 4, True)]))
    assert len(whole) > 5 and all(len(piece) >= 700 for piece, _ in whole[:-2])
    rng = np.random.default_rng(0)
    before_each_word = [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
    for n in range(21):  # random parts, and parts that end one character after a cut (whitespace, then a word)
        ends = np.cumsum(rng.integers(1, 900, size=len(text))) if n else np.array(before_each_word)
        bounds = [0, *[int(e) for e in ends if e < len(text)], len(text)]
        parts = [(text[a:b], b - a, a == 0) for a, b in zip(bounds, bounds[1:])] + [("next", 4, True)]
        cut = list(pieces(parts))
        assert [piece for piece, _ in cut] == [piece for piece, _ in whole]
        assert [starts for _, (starts, _) in cut] == [True] + [False] * (len(cut) - 2) + [True]
        assert sum(size for _, (_, size) in cut) == len(text) + 4  # every input byte counted once


def test_a_resumed_run_counts_the_input_bytes_of_the_pieces_it_skips_on_its_progress_bar():
    """A rerun reads again the pieces its finished shards hold, without tokenizing them: their bytes still count
    towards the bar's total, so it ends at the corpus's size."""
    from tqdm import tqdm

    items = [("ab", (True, 2)), ("cde", (False, 3)), ("f", (True, 1)), ("gh", (False, 2))]
    bar = tqdm(total=8, file=io.StringIO())
    assert list(tokenize_parallel.skipped(items, 2, bar)) == items[2:]
    assert bar.n == 5  # the two skipped: the rest is counted as it is tokenized


def test_a_long_txt_file_streams_in_blocks_and_keeps_its_last_tokens_for_validation(tmp_path, gpt2_ranks,
                                                                                    small_blocks):
    import tiktoken

    enc = tiktoken.get_encoding("r50k_base")
    text = long_text(120)
    (tmp_path / "one.txt").write_bytes(text.encode("utf-8"))
    folder = prepare(PrepareConfig(dataset="one", input=str(tmp_path / "one.txt"), tokenizer="gpt2",
                                   data_dir=str(tmp_path), shard_tokens=500, workers=2))
    ids = enc.encode_ordinary(text.replace("\r\n", "\n"))  # newlines read as a whole read reads them
    n_train = int(len(ids) * 0.9)
    assert len(ids) > 10 * 333
    assert split(folder, "train").tolist() == ids[:n_train]
    assert split(folder, "val").tolist() == ids[n_train:]
    assert not list(folder.glob(".preparing-*"))  # the held document's file went with the staging folder


def test_a_long_first_txt_file_goes_whole_to_validation(tmp_path, small_blocks):
    texts = [long_text(60).replace("\r\n", "\n"), make_corpus(20, seed=9)]
    (tmp_path / "corpus").mkdir()
    for name, text in zip(("a.txt", "b.txt"), texts):
        (tmp_path / "corpus" / name).write_text(text, encoding="utf-8")
    folder = prepare(PrepareConfig(dataset="two", input=str(tmp_path / "corpus"), data_dir=str(tmp_path),
                                   shard_tokens=1000))
    chars = json.loads((folder / "meta.json").read_text())["tokenizer"]["chars"]
    decode = lambda ids: "".join(chars[i] for i in ids)  # noqa: E731
    assert decode(split(folder, "val")) == texts[0] and decode(split(folder, "train")) == texts[1]


def test_a_bad_byte_deep_in_a_txt_file_is_named_by_its_place(tmp_path, small_blocks):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a" * 50000 + b"\xe9" + b"b" * 5000)
    with pytest.raises(GlimpseError, match=r"is not UTF-8 text \(byte 50000\)"):
        prepare(PrepareConfig(dataset="bad", input=str(bad), data_dir=str(tmp_path)))


def test_workers_and_shard_size_change_no_token(tmp_path, monkeypatch):
    docs = write_corpus(tmp_path / "corpus", documents(23, seed=5))
    monkeypatch.setattr(tokenize_parallel, "CHUNK_CHARS", 500)
    runs = {}
    for workers, shard_tokens in [(1, 10**6), (2, 777)]:
        runs[workers] = prepare(PrepareConfig(dataset=f"w{workers}", input=str(tmp_path / "corpus"), workers=workers,
                                              data_dir=str(tmp_path), shard_tokens=shard_tokens, separator="\n~\n"))
    for name in ("train", "val"):
        assert split(runs[1], name).tolist() == split(runs[2], name).tolist()
    meta = json.loads((runs[1] / "meta.json").read_text())
    assert set(meta["tokenizer"]["chars"]) == set("".join(docs)) | set("\n~")
    chars = meta["tokenizer"]["chars"]
    text = "".join(chars[i] for i in split(runs[1], "val"))
    assert text == "\n~\n".join(d for i, d in enumerate(docs) if i % 10 == 0)


@pytest.mark.parametrize("beyond,held", [(1, 2), (0, 1)])  # val_tokens one past the first document, or exactly it
def test_val_tokens_holds_out_the_first_documents(tmp_path, beyond, held):
    write_corpus(tmp_path / "corpus", documents(12))
    in_b = [json.loads(line)["text"] for line in (tmp_path / "corpus" / "b.jsonl").read_text("utf-8").splitlines()]
    folder = prepare(PrepareConfig(dataset="v", input=str(tmp_path / "corpus" / "*.jsonl"), data_dir=str(tmp_path),
                                   val_tokens=len(in_b[0]) + beyond))  # the glob: b.jsonl alone
    chars = json.loads((folder / "meta.json").read_text())["tokenizer"]["chars"]
    decode = lambda ids: "".join(chars[i] for i in ids)  # noqa: E731
    # whole documents until the count is reached: a first document of exactly val_tokens is enough alone
    assert decode(split(folder, "val")) == "\n\n".join(in_b[:held])
    assert decode(split(folder, "train")) == "\n\n".join(in_b[held:])


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5, 0.3, 0.6, 0.67, 0.9])
def test_val_fraction_holds_out_that_fraction_of_the_documents_spread_evenly(fraction, tmp_path):
    docs = [f"document {i}" for i in range(100)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    folder = prepare(PrepareConfig(dataset="f", input=str(tmp_path / "docs.jsonl"), data_dir=str(tmp_path),
                                   val_fraction=fraction))
    chars = json.loads((folder / "meta.json").read_text())["tokenizer"]["chars"]
    val, train = ("".join(chars[i] for i in split(folder, name)).split("\n\n") for name in ("val", "train"))
    share = Fraction(str(fraction))  # exact: 70 * 0.1 must be 7, not a float above it
    assert len(val) == math.ceil(100 * share) and val[0] == docs[0]
    assert sorted(val + train, key=docs.index) == docs
    for n in range(1, 101):  # every prefix of the corpus holds its share, not bunched at one end
        assert sum(docs.index(d) < n for d in val) == math.ceil(n * share)
    if (1 / fraction).is_integer():  # one in every 1 / fraction: the split these fractions have always given
        assert val == docs[::int(1 / fraction)]


def test_blank_rows_are_no_documents(tmp_path):
    """A table of lines with a blank row between them (as wikitext's are) splits its lines, one separator apart:
    blank rows neither take validation's turn (every tenth row here is blank) nor add separators."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"line {i}" for i in range(30)]
    rows = [""] + [row for doc in docs for row in (doc, "")]  # blank first, between, and last
    pq.write_table(pa.table({"text": rows}), tmp_path / "lines.parquet")
    folder = prepare(PrepareConfig(dataset="lines", input=str(tmp_path / "lines.parquet"), data_dir=str(tmp_path),
                                   val_fraction=0.1))
    meta = json.loads((folder / "meta.json").read_text())
    chars = meta["tokenizer"]["chars"]
    val, train = ("".join(chars[i] for i in split(folder, name)) for name in ("val", "train"))
    assert val == "\n\n".join(docs[::10]) and meta["documents"] == 30
    assert train == "\n\n".join(d for i, d in enumerate(docs) if i % 10)
    # one document among blank rows is a corpus of one document: split by its tokens, no separator in its vocabulary
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "abcdefghij" * 3, ""]))
    one = prepare(PrepareConfig(dataset="one", input=str(tmp_path / "one.jsonl"), data_dir=str(tmp_path)))
    chars = json.loads((one / "meta.json").read_text())["tokenizer"]["chars"]
    assert "".join(chars[i] for i in np.concatenate([split(one, "train"), split(one, "val")])) == "abcdefghij" * 3
    assert "\n" not in chars


def test_the_val_fraction_is_exact_over_many_documents():
    router = shards_module.Router({"train": None, "val": None}, np.array([]), 0, 0.67, docs=1)  # nothing held
    val = [doc for doc in range(3000) if router.assign(doc) == "val"]
    assert len(val) == 2010  # 3000 * 0.67 in floating point is 2010.0000000000002, which would round up to 2011


def test_a_val_fraction_that_leaves_no_training_documents_says_so(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(30)))
    with pytest.raises(GlimpseError, match=r"gives no train tokens \(30 documents\): lower --val_fraction$"):
        prepare(PrepareConfig(dataset="f", input=str(tmp_path / "docs.jsonl"), data_dir=str(tmp_path),
                              val_fraction=0.99))
    # documents that are all empty: no fraction would help, the corpus holds nothing
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(GlimpseError, match=r"empty.jsonl holds no text \(2 documents, all empty\): point --input"):
        prepare(PrepareConfig(dataset="e", input=str(tmp_path / "empty.jsonl"), data_dir=str(tmp_path)))
    assert not (tmp_path / "e").exists()  # the folder it made is gone with it
    for name in ("a.txt", "b.txt", "c.txt"):  # an empty .txt file is a document too, an empty one
        (tmp_path / "blank" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "blank" / name).write_text("")
    with pytest.raises(GlimpseError, match=r"blank holds no text \(3 documents, all empty\)"):
        prepare(PrepareConfig(dataset="e", input=str(tmp_path / "blank"), data_dir=str(tmp_path)))


def test_kill_9_then_rerun_writes_exactly_what_one_run_writes(tmp_path):
    corpus = tmp_path / "big.jsonl"
    docs = [make_corpus(20, seed=i) for i in range(6000)]  # about 4.2M characters
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    args = ["data/prepare.py", f"--input={corpus}", "--shard_tokens=2000000", "--workers=1"]
    whole = python(*args, "--dataset=whole", f"--data_dir={tmp_path}")
    assert whole.returncode == 0, whole.stderr
    staging = tmp_path / "cut" / f".preparing-{os.uname().nodename}"
    run = subprocess.Popen([sys.executable, *args, "--dataset=cut", f"--data_dir={tmp_path}"], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def written_past_the_save() -> bool:  # a shard is finished, and the next one's file has grown since
        try:
            saved = json.loads((staging / "progress.json").read_text())["splits"]["train"]
            partial = staging / f"train_{len(saved['shards']):06d}.bin.partial"
            return partial.stat().st_size > saved["partial"] * 2  # uint16 tokens
        except (OSError, ValueError):
            return False

    while not written_past_the_save() and run.poll() is None:
        pass
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "cut" / "meta.json").exists(), "the run ended before the kill: make the corpus bigger"
    again = python(*args, "--dataset=cut", f"--data_dir={tmp_path}")
    assert again.returncode == 0, again.stderr
    assert "resuming: " in again.stderr and "resuming: 0 " not in again.stderr
    assert_same_dataset(tmp_path / "cut", tmp_path / "whole")
    chars = json.loads((tmp_path / "whole" / "meta.json").read_text())["tokenizer"]["chars"]
    assert "".join(chars[i] for i in split(tmp_path / "whole", "train")) == "\n\n".join(
        d for i, d in enumerate(docs) if i % 10)


def test_a_folder_is_read_without_its_hidden_files_and_folders(tmp_path):
    """A notebook's .ipynb_checkpoints/ copy, an editor's .swp-like .txt: not the corpus, which they would repeat."""
    corpus = tmp_path / "corpus"
    for name in ("a.txt", "sub/b.jsonl", ".hidden.txt", ".ipynb_checkpoints/a-checkpoint.txt", "sub/.old/c.txt"):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text("x\n")
    assert input_files(str(corpus)) == [corpus / "a.txt", corpus / "sub" / "b.jsonl"]


def test_a_txt_file_is_read_as_text_with_its_line_ends_translated_and_no_byte_order_mark(tmp_path):
    """A file saved on Windows: the mark at its start is no character of the text (a char model would learn it
    as a token), and its line ends are those every reader of text gets, as for a .txt read whole."""
    (tmp_path / "windows.txt").write_bytes("\ufeffROMEO:\r\nBut soft!\rWhat light?\r\n".encode("utf-8"))
    folder = prepare(PrepareConfig(dataset="w", input=str(tmp_path / "windows.txt"), data_dir=str(tmp_path)))
    data = TokenData(folder)
    ids = np.concatenate([data.tokens(split)[:] for split in ("train", "val")]).astype(np.int64)  # val: the end
    assert data.tokenizer().decode(ids) == "ROMEO:\nBut soft!\nWhat light?\n"
    assert "\ufeff" not in json.loads((folder / "meta.json").read_text())["tokenizer"]["chars"]


def two_files(tmp_path, names: tuple[str, str] = ("a.txt", "b.txt")) -> dict:
    """A corpus folder of a short file and a long one (10 and 600 paragraphs), and prepare's settings for it:
    shards of 500 tokens, so that many finish, and one worker."""
    (tmp_path / "corpus").mkdir()
    for name, paragraphs in zip(names, (10, 600)):
        (tmp_path / "corpus" / name).write_text(long_text(paragraphs), encoding="utf-8")
    return dict(input=str(tmp_path / "corpus"), data_dir=str(tmp_path), shard_tokens=500, workers=1)


def stop_preparing(monkeypatch, dataset: str, settings: dict, at: int = 40) -> list[bool]:
    """Prepare dataset until its at-th piece, stopped there as Ctrl-C stops it (inside the long file, after shards
    finished); the next run goes through. Returns each piece's starts_doc."""
    add, calls = shards_module.Router.add, []

    def add_then_stop(router, ids, starts_doc):
        calls.append(starts_doc)
        if len(calls) == at:
            raise KeyboardInterrupt
        add(router, ids, starts_doc)

    monkeypatch.setattr(shards_module.Router, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(dataset=dataset, **settings))
    monkeypatch.setattr(shards_module.Router, "add", add)
    return calls


def assert_same_dataset(folder: Path, other: Path):
    """The same meta.json, and every shard it lists the same bytes."""
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == json.loads((other / "meta.json").read_text())
    for shard in (shard for shards in meta["shards"].values() for shard in shards):
        assert (folder / shard["file"]).read_bytes() == (other / shard["file"]).read_bytes()


def test_a_run_stopped_then_given_a_folder_with_another_file_starts_afresh(tmp_path, small_blocks, monkeypatch,
                                                                           capsys):
    """The finished shards hold the corpus as it was read: a file added to the folder (sorting first, here) makes
    the rerun another corpus, whose dataset must be its own, not the old shards followed by the new text."""
    settings = two_files(tmp_path, ("b.txt", "c.txt"))
    stop_preparing(monkeypatch, "cut", settings)
    assert (tmp_path / "cut" / f".preparing-{os.uname().nodename}" / "progress.json").exists()
    (tmp_path / "corpus" / "a.txt").write_text(long_text(40), encoding="utf-8")
    capsys.readouterr()
    cut = prepare(PrepareConfig(dataset="cut", **settings))
    assert "resuming: " not in capsys.readouterr().err
    assert_same_dataset(cut, prepare(PrepareConfig(dataset="whole", **settings)))


def test_a_streamed_built_in_that_cannot_be_reached_is_one_line_after_one_notice(tmp_path, gpt2_ranks):
    """Offline, the Hub client retries for some seconds and logs each retry: the user gets the line that says what
    is happening first, then the one error, and nothing of the client's. (A Hub address no server listens on
    stands in for a machine without a network.)"""
    run = python("data/prepare.py", "--dataset=fineweb_edu", f"--data_dir={tmp_path}",
                 env={"HF_ENDPOINT": "http://127.0.0.1:9", "TIKTOKEN_CACHE_DIR": str(gpt2_ranks)})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("streaming HuggingFaceFW/fineweb-edu from the Hugging Face Hub")
    assert lines[1].startswith("error: could not stream HuggingFaceFW/fineweb-edu") and "--input=PATH" in lines[1]
    assert not (tmp_path / "fineweb_edu").exists()


def test_ctrl_c_stops_the_tokenizing_processes_and_the_run(tmp_path):
    """Ctrl-C goes to every process of the terminal's group: a worker that died of it mid-task left the pool's
    shutdown waiting for it for ever, and Pool.terminate could wait for ever on a worker writing a result larger
    than the pipe holds (its results are tens of kB) once it had stopped reading them. Here the documents never
    end, so only the signal can stop the run; it comes at a dozen moments, after the 10th to the 21st result."""
    script = tmp_path / "endless.py"
    script.write_text(
        "import itertools, json, sys\nimport numpy as np\nfrom data.tokenize_parallel import tokenized\n"
        "spec = json.dumps({'kind': 'char', 'chars': 'ab '})\n"
        "items = ((('ab ' * 5000), i) for i in itertools.count())\n"
        "for n, _ in enumerate(tokenized(items, spec, np.dtype(np.uint16), 2)):\n"
        "    print(n, flush=True)\n")
    for after in range(10, 22):
        run = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            while (line := run.stdout.readline()) != f"{after}\n":  # the workers are busy
                assert line, f"the run ended before its result {after}"
            os.killpg(run.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
            _, stderr = run.communicate(timeout=120)  # a failure only: without the fix, it never ends
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        assert stderr.rstrip().endswith("KeyboardInterrupt") and "PoolWorker" not in stderr, (after, stderr[-3000:])


def test_ctrl_c_during_prepare_is_one_line_that_says_how_to_go_on(tmp_path, monkeypatch, capsys, corpus_file):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "make_dataset", interrupted)
    with pytest.raises(SystemExit) as stop:
        prepare_module.main(["--dataset=d", f"--input={corpus_file}", f"--data_dir={tmp_path}"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted: the same command goes on from any shards already finished"


@pytest.mark.parametrize("recut", [False, True])
def test_a_run_stopped_inside_a_long_document_resumes_to_the_same_bytes(tmp_path, small_blocks, monkeypatch, capsys,
                                                                         recut):
    """A shard can end inside a long document, cut in pieces: the rerun must know where the rest of it goes.
    A rerun that cuts documents otherwise (another version) counts other pieces: it starts afresh."""
    settings = two_files(tmp_path)
    whole = prepare(PrepareConfig(dataset="whole", **settings))
    calls = stop_preparing(monkeypatch, "cut", settings)
    assert calls.count(True) == 2  # both documents started: the stop is inside the second
    if recut:
        monkeypatch.setattr(tokenize_parallel, "CHUNK_CHARS", 500)
    capsys.readouterr()
    cut = prepare(PrepareConfig(dataset="cut", **settings))
    assert ("resuming: " in capsys.readouterr().err) != recut
    assert_same_dataset(cut, whole)


def test_a_run_stopped_then_given_other_workers_goes_on_to_the_same_bytes(tmp_path, small_blocks, monkeypatch, capsys):
    """How many processes tokenize changes no token: a rerun with another --workers keeps the finished shards."""
    settings = two_files(tmp_path)
    whole = prepare(PrepareConfig(dataset="whole", **settings))
    stop_preparing(monkeypatch, "cut", settings)
    capsys.readouterr()
    cut = prepare(PrepareConfig(dataset="cut", **{**settings, "workers": 2}))
    assert "resuming: " in capsys.readouterr().err
    assert_same_dataset(cut, whole)


def test_a_finished_shard_damaged_before_the_rerun_is_not_published(tmp_path, small_blocks, monkeypatch, capsys):
    """A finished shard in the staging folder that is no longer as long as progress.json says (a disk that lost
    its end): the rerun starts afresh rather than publish a dataset whose meta.json miscounts its tokens."""
    settings = two_files(tmp_path)
    whole = prepare(PrepareConfig(dataset="whole", **settings))
    stop_preparing(monkeypatch, "cut", settings)
    first = tmp_path / "cut" / f".preparing-{os.uname().nodename}" / "train_000000.bin"
    first.write_bytes(first.read_bytes()[:-2])  # one token short
    capsys.readouterr()
    cut = prepare(PrepareConfig(dataset="cut", **settings))
    assert "resuming: " not in capsys.readouterr().err
    assert_same_dataset(cut, whole)


def test_a_dataset_prepared_again_from_a_shorter_corpus_keeps_no_shard_of_the_old_one(tmp_path):
    """The old dataset's shards past the new one's count would otherwise stay beside it, taking disk space and
    passing for part of it to anyone listing the folder."""
    (tmp_path / "long.txt").write_text(make_corpus(400), encoding="utf-8")
    (tmp_path / "short.txt").write_text(make_corpus(40), encoding="utf-8")
    folder = prepare(PrepareConfig(dataset="d", input=str(tmp_path / "long.txt"), data_dir=str(tmp_path),
                                   shard_tokens=500))
    before = len(list(folder.glob("*.bin")))
    prepare(PrepareConfig(dataset="d", input=str(tmp_path / "short.txt"), data_dir=str(tmp_path), shard_tokens=500))
    meta = json.loads((folder / "meta.json").read_text())
    listed = sorted(shard["file"] for shards in meta["shards"].values() for shard in shards)
    assert sorted(p.name for p in folder.glob("*.bin")) == listed and len(listed) < before


def test_bad_input_deep_in_a_corpus_keeps_the_finished_shards_for_the_fixed_rerun(tmp_path, small_blocks,
                                                                                     gpt2_ranks, capsys):
    """Shards finished before a bad line are work a rerun can keep: they stay, and the one error line says where;
    a failure with nothing finished leaves nothing (test_data.py)."""
    lines = [json.dumps({"text": make_corpus(20, seed=i)}) for i in range(40)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join([*lines, "not json"]) + "\n")
    settings = dict(input=str(corpus), data_dir=str(tmp_path), tokenizer="gpt2", shard_tokens=500, workers=1)
    with pytest.raises(GlimpseError, match=rf"{corpus}:41 is not JSON") as error:  # before any shard is finished
        prepare(PrepareConfig(dataset="d", **{**settings, "shard_tokens": 10**6}))
    assert "finished shards" not in str(error.value) and not (tmp_path / "d").exists()
    staging = tmp_path / "d" / f".preparing-{socket.gethostname()}"
    with pytest.raises(GlimpseError, match=rf"{corpus}:41 is not JSON .*\(the finished shards stay in {staging}: "
                                           r"the same command, once the input is fixed, goes on from them\)$"):
        prepare(PrepareConfig(dataset="d", **settings))
    assert (staging / "progress.json").exists() and not (tmp_path / "d" / "meta.json").exists()
    corpus.write_text("\n".join([*lines, json.dumps({"text": "the last document"})]) + "\n")
    capsys.readouterr()
    fixed = prepare(PrepareConfig(dataset="d", **settings))
    assert "resuming: " in capsys.readouterr().err and not staging.exists()
    whole = prepare(PrepareConfig(dataset="whole", **settings))
    assert_same_dataset(fixed, whole)
    assert json.loads((fixed / "meta.json").read_text())["documents"] == 41
    # the other way out the error offers, --skip_bad_lines, goes on from the finished shards too
    corpus.write_text("\n".join([*lines, "not json"]) + "\n")
    with pytest.raises(GlimpseError, match="the finished shards stay in"):
        prepare(PrepareConfig(dataset="e", **settings))
    capsys.readouterr()
    skipped = prepare(PrepareConfig(dataset="e", **settings, skip_bad_lines=True))
    assert "resuming: " in capsys.readouterr().err
    assert json.loads((skipped / "meta.json").read_text())["documents"] == 40


def test_train_py_keeps_the_finished_shards_of_a_preparation_that_failed_in_a_new_data_dir(tmp_path, monkeypatch,
                                                                                             small_blocks, gpt2_ranks):
    """train.py prepares a built-in dataset into a --data_dir that may not exist yet, and removes that folder when
    the preparation fails; but not the shards a long preparation finished before a bad record, which a rerun keeps
    (data/prepare.py says so in its error). Here the built-in's own corpus is a local one, cut into small shards."""
    lines = [json.dumps({"text": make_corpus(20, seed=i)}) for i in range(40)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join([*lines, "not json"]) + "\n")
    import data.training_data

    monkeypatch.setattr(data.training_data, "ensure_dataset", lambda name, data_dir: prepare(PrepareConfig(
        dataset=name, data_dir=data_dir, input=str(corpus), tokenizer="gpt2", shard_tokens=500, workers=1)))
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(GlimpseError, match="the finished shards stay in"):
        prepare_data(tiny_config(data_dir, tmp_path / "out", dataset="shakespeare_char"))
    staging = data_dir / "shakespeare_char" / f".preparing-{socket.gethostname()}"
    assert (staging / "progress.json").exists() and list(staging.glob("train_*.bin"))


def test_a_builtin_streams_through_datasets(tmp_path, gpt2_ranks, monkeypatch):
    """fineweb_edu as datasets streams it, pointed at a local parquet of its layout (a text column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken

    docs = documents(15, seed=3)
    pq.write_table(pa.table({"text": docs, "score": [1.0] * 15}), tmp_path / "train.parquet")
    monkeypatch.setitem(prepare_module.BUILTIN, "fineweb_edu",
                        ("gpt2", Hub("parquet", None, str(tmp_path / "train.parquet"))))
    monkeypatch.setattr(prepare_module, "HUB_VAL_TOKENS", 60)  # the built-ins hold out their first documents
    folder = prepare(PrepareConfig(dataset="fineweb_edu", data_dir=str(tmp_path)))
    enc = tiktoken.get_encoding("r50k_base")
    held, count = 0, 0
    while count < 60:  # whole documents until validation has 60 tokens
        count, held = count + len(enc.encode_ordinary(docs[held])) + (held > 0), held + 1
    assert 1 < held < 15
    assert split(folder, "val").tolist() == joined(enc, docs[:held])
    assert split(folder, "train").tolist() == joined(enc, docs[held:])
    fraction = prepare(PrepareConfig(dataset="fineweb_edu", data_dir=str(tmp_path / "f"), val_fraction=0.2))
    assert split(fraction, "val").tolist() == joined(enc, docs[::5])  # a fraction asked for is what is held out
    tenth = prepare(PrepareConfig(dataset="fineweb_edu", data_dir=str(tmp_path / "t"), val_fraction=0.1))
    assert split(tenth, "val").tolist() == joined(enc, docs[::10])  # even when it is the local files' default
    streamed = HubDocuments("parquet", None, data_files=str(tmp_path / "train.parquet"))
    assert list(streamed) == [(doc, len(doc), True) for doc in docs]  # one record a document, its size in characters


def test_a_builtin_with_a_wrong_column_or_a_null_text_is_one_line(tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["the first document", None, "the third", "and a fourth one"]
    pq.write_table(pa.table({"text": texts, "score": [1.0] * 4}), tmp_path / "train.parquet")
    monkeypatch.setitem(prepare_module.BUILTIN, "fineweb_edu",
                        ("char", Hub("parquet", None, str(tmp_path / "train.parquet"))))
    argv = ["--dataset=fineweb_edu", f"--data_dir={tmp_path}", "--val_fraction=0.25"]
    line = run_main(prepare_module.main, [*argv, "--text_column=content"], capsys)
    assert "parquet has no column 'content' (its records have text, score): pick the text with --text_column" in line
    line = run_main(prepare_module.main, argv, capsys)
    assert "parquet's record 2 has null in its text field 'text', not a string; pass --skip_bad_lines" in line
    prepare_module.main([*argv, "--skip_bad_lines=true"])
    assert "skipped 1 bad line (--skip_bad_lines)" in capsys.readouterr().err
    assert json.loads((tmp_path / "fineweb_edu" / "meta.json").read_text())["documents"] == 3


def test_a_streamed_record_its_reader_cannot_parse_is_one_line_naming_the_local_route(tmp_path, monkeypatch, capsys):
    """JSON may spell half a surrogate pair alone: datasets' reader refuses the file, where a local --input names
    the line and can skip it."""
    corpus = tmp_path / "train.jsonl"
    corpus.write_text('{"text": "a first document"}\n{"text": "half a pair \\ud83d here"}\n', encoding="utf-8")
    monkeypatch.setitem(prepare_module.BUILTIN, "fineweb_edu", ("char", Hub("json", None, str(corpus))))
    line = run_main(prepare_module.main, ["--dataset=fineweb_edu", f"--data_dir={tmp_path}"], capsys)
    assert line.startswith("error: could not read json's records (") and "pass them with --input=PATH" in line
    assert not (tmp_path / "fineweb_edu" / "meta.json").exists()
    line = run_main(prepare_module.main, ["--dataset=local", f"--input={corpus}", f"--data_dir={tmp_path}"], capsys)
    assert "train.jsonl:2 has a lone surrogate \\ud83d" in line  # the route it names does name the line


def sharded_dataset(tmp_path, shard_tokens=4000):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": make_corpus(40, seed=i)}) + "\n" for i in range(40)),
                      encoding="utf-8")
    prepare(PrepareConfig(dataset="tiny", input=str(corpus), data_dir=str(tmp_path / "data"),
                          shard_tokens=shard_tokens))
    return tmp_path / "data"


def test_batches_cover_every_shard_and_never_cross_one(tmp_path):
    data = TokenData(sharded_dataset(tmp_path) / "tiny")
    shards = data.splits["train"]
    assert len(shards) > 3
    starts = data.random_starts("train", 4000, 16, torch.Generator().manual_seed(0))
    x, y = data.batch("train", starts, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    counts = data.window_counts("train", 16)
    ends = np.cumsum(counts)
    for start, row, target in zip(starts.tolist()[:200], x, y):
        shard = int(np.searchsorted(ends, start, side="right"))
        offset = start - (ends[shard] - counts[shard])
        assert row.tolist() == shards[shard][offset:offset + 16].tolist()
        assert target[-1] == shards[shard][offset + 16]  # the last target is still in the shard
    hit = np.searchsorted(ends, starts.numpy(), side="right")
    assert set(hit.tolist()) == set(range(len(shards)))


def test_every_window_of_every_shard_is_drawn_exactly_where_it_lies(tmp_path):
    """The windows are counted from the shards' lengths (each shard's last window included) and a start on a
    shard's first window maps to that shard, not the one before (a start there is drawn rarely at random)."""
    data = TokenData(sharded_dataset(tmp_path) / "tiny")
    shards = data.splits["train"]
    assert data.window_counts("train", 16).tolist() == [len(s) - 16 for s in shards]
    ends = np.cumsum([len(s) - 16 for s in shards])
    firsts = torch.from_numpy(np.concatenate(([0], ends[:-1])))  # each shard's first window
    lasts = torch.from_numpy(ends - 1)  # each shard's last window
    for starts, where in ((firsts, 0), (lasts, -17)):
        x, y = data.batch("train", starts, 16)
        for row, target, shard in zip(x, y, shards):
            window = shard[where:][:17] if where else shard[:17]
            assert row.tolist() == window[:16].tolist() and target.tolist() == window[1:].tolist()


def test_training_over_shards_with_ddp_resumes_exactly(tmp_path):
    data_dir = sharded_dataset(tmp_path)
    settings = ["--dataset=tiny", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
                "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=6", "--eval_interval=3",
                "--eval_iters=2", "--log_interval=1", f"--data_dir={data_dir}", "--attn_log_interval=0"]
    assert_two_processes_resume_exactly(tmp_path, settings, stop_at=3)


def test_older_single_file_datasets_still_load(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    np.arange(100, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "char", "chars": "".join(map(chr, range(
        32, 132)))}, "vocab_size": 100, "dtype": "uint16", "train_tokens": 100, "val_tokens": 20}))
    data = TokenData(folder)
    x, _ = data.batch("train", torch.tensor([5]), 8)
    assert x.tolist() == [list(range(5, 13))] and data.tokens("val")[:].tolist() == list(range(20))


def test_bad_corpora_are_one_line_errors_and_keep_the_dataset(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(30)))
    ok = python("data/prepare.py", "--dataset=d", f"--input={good}", f"--data_dir={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no corpus here")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json\n{"text": "after"}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "fine"}\n{"text": "café"}\n{"text": "after"}\n'.encode("latin-1"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "cols.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "null.parquet")
    not_text = {"int64": pa.array([1, 2]), "binary": pa.array([b"a", b"b"]), "list<element: string>": pa.array([["a"]])}
    for kind, column in not_text.items():
        pq.write_table(pa.table({"text": column}), tmp_path / f"{kind[:4]}.parquet")
    whole = gzip.compress(good.read_bytes() * 50)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    for args, message in [
        ([f"--input={tmp_path / 'empty'}"], "holds no .txt, .jsonl"),
        ([f"--input={tmp_path / 'gone'}/"], f"--input '{tmp_path / 'gone'}/' not found: no such file or folder"),
        (["--input=/dev/null"], "--input '/dev/null' is not a file or folder: save the corpus to a file"),
        ([f"--input={bad_line}"], f"{bad_line}:3 is not JSON (Expecting value); fix the line, or pass --skip_bad"),
        ([f"--input={latin1}"], f"{latin1}:2 is not UTF-8 text; convert the file (e.g. with iconv), or pass --skip"),
        ([f"--input={tmp_path / 'cols.parquet'}"], "has no column 'text' (it has content)"),
        ([f"--input={tmp_path / 'null.parquet'}"], "null.parquet's row 2 has null in its text column 'text'"),
        ([f"--input={tmp_path / 'cut.jsonl.gz'}"], "is truncated or not gzip"),
        *(([f"--input={tmp_path / f'{kind[:4]}.parquet'}"], f"column 'text' holds {kind}, not text (string)")
          for kind in not_text),
        ([f"--input={good}", "--shard_tokens=0"], "shard_tokens must be at least 1"),
        ([f"--input={good}", "--dataset="], "--input needs --dataset=NAME"),  # not tiny Shakespeare's name
        ([f"--input={good}", "--val_tokens=-5"], "val_tokens must be 0 (use --val_fraction) or more, got -5"),
        ([f"--input={good}", "--val_tokens=5", "--val_fraction=0.2"], "give one of --val_tokens and --val_fraction"),
        ([f"--input={good}", "--tokenizer=gpt2", "--separator=~"], "GPT-2 BPE joins them with <|endoftext|>: drop "
                                                                   "--separator"),
        ([f"--input={good}", "--val_fraction=1.5"], "val_fraction must be at least 0 (0: the default) and below 1, "
                                                     "got 1.5"),
    ]:
        run = python("data/prepare.py", "--dataset=d", *args, f"--data_dir={tmp_path}")
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("error: ") and message in run.stderr and run.stderr.count("\n") == 1, run.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before  # nothing lost
    skipping = python("data/prepare.py", "--dataset=s", f"--input={bad_line}", "--skip_bad_lines=true",
                      f"--data_dir={tmp_path}")
    assert skipping.returncode == 0 and "skipped 1 bad line" in skipping.stderr, skipping.stderr
    skipping = python("data/prepare.py", "--dataset=n", f"--input={tmp_path / 'null.parquet'}", "--skip_bad_lines=true",
                      f"--data_dir={tmp_path}")
    assert skipping.returncode == 0 and "skipped 1 bad line" in skipping.stderr, skipping.stderr
    assert json.loads((tmp_path / "n" / "meta.json").read_text())["documents"] == 2
    skipping = python("data/prepare.py", "--dataset=l", f"--input={latin1}", "--skip_bad_lines=true",
                      f"--data_dir={tmp_path}")
    assert skipping.returncode == 0 and "skipped 1 bad line" in skipping.stderr, skipping.stderr
    assert json.loads((tmp_path / "l" / "meta.json").read_text())["documents"] == 2


def test_text_column_picks_the_text_of_a_local_json_lines_file_too(tmp_path):
    """--text_column is not only the streamed built-ins': a local file's records are read by that field."""
    lines = [{"text": "zzzz", "content": f"doc {i} body"} for i in range(10)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    folder = prepare(PrepareConfig(dataset="tc", input=str(tmp_path / "c.jsonl"), data_dir=str(tmp_path),
                                   text_column="content"))
    data = TokenData(folder)
    tokenizer = data.tokenizer()
    assert "z" not in tokenizer.chars
    assert tokenizer.decode(data.tokens("val")[:].astype(np.int64)) == "doc 0 body"  # the first document, held out


def test_a_files_format_is_read_from_its_extension_in_any_case(tmp_path):
    """BOOK.TXT and notes.JsonL.GZ are a .txt and a .jsonl.gz, named alone, found in a folder or by a glob."""
    (tmp_path / "BOOK.TXT").write_text("a book", encoding="utf-8")
    with gzip.open(tmp_path / "notes.JsonL.GZ", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a note"}) + "\n")
    (tmp_path / "readme.md").write_text("not a corpus file")
    found = [tmp_path / "BOOK.TXT", tmp_path / "notes.JsonL.GZ"]
    assert input_files(str(tmp_path)) == input_files(str(tmp_path / "*")) == found
    assert input_files(str(found[0])) == found[:1]
    assert [text for text, _, _ in Documents(found)] == ["a book", "a note"]
    with pytest.raises(GlimpseError, match=r"input '.*readme.md' is none of .txt, .jsonl, .jsonl.gz, .jsonl.zst, "
                                           r".parquet: rename it or convert it$"):
        input_files(str(tmp_path / "readme.md"))  # named alone, a file of no known format is not read as JSON lines


def test_a_glob_gives_its_files_in_sorted_order_and_a_hidden_folder_above_the_input_hides_nothing(tmp_path):
    """The same input gives the same documents in the same order: a glob's files are sorted (the folder lists them
    in an order of its own: here they are made shuffled); and only what is hidden inside the folder named is left
    out, so a corpus kept under ~/.cache/ is read whole."""
    corpus = tmp_path / ".cache" / "corpus"
    corpus.mkdir(parents=True)
    names = [f"part-{i:02d}.jsonl" for i in range(30)]
    for name in np.random.default_rng(0).permutation(names):
        (corpus / name).write_text(json.dumps({"text": name}) + "\n")
    assert input_files(str(corpus / "part-*.jsonl")) == input_files(str(corpus)) == [corpus / n for n in names]
    assert [text for text, _, _ in Documents(input_files(str(corpus / "*")))] == names


def test_the_input_bytes_of_the_parts_add_up_to_the_files_sizes(tmp_path, small_blocks):
    """The progress bar counts each part's input bytes (compressed ones for .gz and .zst) towards total_bytes: every
    format's bytes are counted once, so the bar ends at its total; a long .txt read in blocks too."""
    write_corpus(tmp_path / "corpus", documents(41))
    (tmp_path / "corpus" / "long.txt").write_text(long_text(100), encoding="utf-8")
    docs = Documents(input_files(str(tmp_path / "corpus")))
    assert len(docs.files) == 6
    assert docs.total_bytes == sum(path.stat().st_size for path in docs.files)
    for path in docs.files:
        sizes = [size for _, size, _ in Documents([path])]
        assert all(size >= 0 for size in sizes) and sum(sizes) == pytest.approx(path.stat().st_size), path.name
    assert len([size for _, size, _ in Documents([tmp_path / "corpus" / "long.txt"])]) > 5  # read in blocks


@pytest.mark.parametrize("line, problem", [
    ('"a text alone"', "has no text field 'text'; name the field with --text_column=NAME"),
    ("7", "has no text field 'text'; name the field with --text_column=NAME"),
    ('{"body": "the text"}', "has no text field 'text'; name the field with --text_column=NAME"),
    ('{"text": 5}', "has int in its text field 'text', not a string; fix the line"),
    ('{"text": ["a", "b"]}', "has list in its text field 'text', not a string; fix the line"),
    ('{"text": null}', "has null in its text field 'text', not a string; fix the line"),
    ('{"text": "ab \\udc00 cd"}', "has a lone surrogate \\udc00 at character 3 of its text field 'text', half of a "
                                   "pair that no UTF-8 text can hold; fix the line"),
])
def test_a_json_line_without_a_text_string_is_named_with_what_to_do(tmp_path, line, problem):
    """A line that is no object, lacks the field, holds no string there, or a lone low surrogate (as well as a high
    one): named by its line, with what to do about it; --skip_bad_lines counts it and reads on. A whole pair is
    one character, read."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "pair \\ud83d\\ude00"}\n' + line + '\n{"text": "after"}\n', encoding="utf-8")
    with pytest.raises(GlimpseError) as error:
        list(Documents([path]))
    assert str(error.value) == f"{path}:2 {problem}, or pass --skip_bad_lines to count and skip such lines"
    skipping = Documents([path], skip_bad_lines=True)
    assert [text for text, _, _ in skipping] == ["pair \U0001f600", "after"] and skipping.bad_lines == 1


def test_a_jsonl_zst_file_that_is_not_zstandard_says_so(tmp_path):
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(json.dumps({"text": "saved uncompressed"}).encode() + b"\n")
    with pytest.raises(GlimpseError, match=f"^{path} is truncated or not zstandard \\(.*\\); download or compress it "
                                           "again$"):
        list(Documents([path]))


def test_a_jsonl_zst_file_cut_short_says_so_and_one_of_several_frames_reads_whole(tmp_path):
    """A download stopped half-way leaves a .zst that ends inside a frame: named, as a cut .gz is, not read as a
    shorter corpus. Cut where a block ends, the part before decompresses cleanly, which is how it went unnoticed.
    A file of several frames (zstd's own tools write them) is read to its last."""
    import zstandard

    lines = [(json.dumps({"text": f"document {i}"}) + "\n").encode() for i in range(10)]
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor().stream_writer(out, closefd=False)
    writer.write(b"".join(lines[:5]))
    writer.flush(zstandard.FLUSH_BLOCK)
    block_end = len(out.getvalue())  # five whole documents decompress from the bytes so far
    writer.write(b"".join(lines[5:]))
    writer.flush(zstandard.FLUSH_FRAME)
    whole = out.getvalue()
    frames = tmp_path / "frames.jsonl.zst"
    frames.write_bytes(whole + zstandard.ZstdCompressor().compress(b"".join(lines)))
    assert [text for text, _, _ in Documents([frames])] == [f"document {i % 10}" for i in range(20)]
    for cut in (block_end, len(whole) // 2, len(whole) - 1):
        path = tmp_path / f"cut{cut}.jsonl.zst"
        path.write_bytes(whole[:cut])
        with pytest.raises(GlimpseError, match=f"^{path} is truncated or not zstandard \\(the file ends inside a "
                                               "compressed frame\\); download or compress it again$"):
            list(Documents([path]))


@pytest.mark.parametrize("name", ["blank.jsonl", "blank.jsonl.gz"])
def test_blank_lines_between_json_lines_are_no_documents_and_no_bad_lines(tmp_path, name):
    """A .jsonl with empty or whitespace lines (between records, at the end) holds just its records; a bad line
    after them is still named by its line in the file."""
    body = '\n{"text": "first"}\n\n  \t\n{"text": "second"}\r\n\n'
    opener = gzip.open if name.endswith(".gz") else open
    with opener(tmp_path / name, "wt", encoding="utf-8", newline="") as f:
        f.write(body)
    docs = Documents([tmp_path / name])
    assert [text for text, _, _ in docs] == ["first", "second"] and docs.bad_lines == 0
    with opener(tmp_path / name, "at", encoding="utf-8", newline="") as f:
        f.write("not json\n")
    with pytest.raises(GlimpseError, match=f"{tmp_path / name}:7 is not JSON"):
        list(Documents([tmp_path / name]))


@pytest.mark.parametrize("name", ["gone.jsonl", "gone.jsonl.gz"])
def test_a_file_gone_before_it_is_read_is_a_one_line_error(tmp_path, name):
    """A file listed, then removed (or unreadable) before prepare.py reaches it."""
    with pytest.raises(GlimpseError, match=f"input file '{tmp_path / name}' not found"):
        list(Documents([tmp_path / name]))


def test_parquet_text_may_be_any_arrow_string_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["the first document", "a second one", "and a third"]
    for kind, column in {"large": pa.array(texts, pa.large_string()),
                         "categories": pa.array(texts).dictionary_encode()}.items():
        pq.write_table(pa.table({"text": column}), tmp_path / f"{kind}.parquet")
        folder = prepare(PrepareConfig(dataset=kind, input=str(tmp_path / f"{kind}.parquet"), data_dir=str(tmp_path)))
        assert json.loads((folder / "meta.json").read_text())["documents"] == 3


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_a_lone_surrogate_in_a_json_line_is_a_bad_line(tokenizer, tmp_path, request, capsys):
    """JSON spells half a surrogate pair alone ("\\ud83d"); no UTF-8 text holds it, so a tokenizer cannot read it."""
    if tokenizer == "gpt2":
        request.getfixturevalue("gpt2_ranks")
    corpus = tmp_path / "surrogate.jsonl"
    corpus.write_text('{"text": "the first document"}\n{"text": "hello \\ud83d world"}\n{"text": "the third"}\n'
                      '{"text": "and the fourth one"}\n')
    argv = ["--dataset=d", f"--input={corpus}", f"--data_dir={tmp_path}", f"--tokenizer={tokenizer}"]
    line = run_main(prepare_module.main, argv, capsys)
    assert f"{corpus}:2 has a lone surrogate \\ud83d at character 6 of its text field 'text'" in line, line
    assert "--skip_bad_lines" in line
    prepare_module.main([*argv, "--skip_bad_lines=true"])
    assert "skipped 1 bad line (--skip_bad_lines)" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["documents"] == 3


def test_a_shard_deleted_or_changed_after_preparation_is_named(tmp_path):
    folder = sharded_dataset(tmp_path) / "tiny"
    meta = json.loads((folder / "meta.json").read_text())
    second = folder / meta["shards"]["train"][1]["file"]
    with open(second, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(GlimpseError, match=f"{second.name} does not match .*deleted or changed"):
        TokenData(folder)
    second.unlink()
    with pytest.raises(GlimpseError, match=f"{second.name} does not match") as error:
        TokenData(folder)
    # the command that makes it again, as it was made: the folder it is in and the input it came from
    assert str(error.value).endswith(f"python data/prepare.py --dataset=tiny --data_dir={tmp_path / 'data'} "
                                     f"--input={tmp_path / 'docs.jsonl'}")
    (tmp_path / "docs.jsonl").unlink()  # the input gone too: the command names no file that is not there
    with pytest.raises(GlimpseError) as error:
        TokenData(folder)
    assert str(error.value).endswith(f"python data/prepare.py --dataset=tiny --data_dir={tmp_path / 'data'}")
    (folder / "meta.json").unlink()
    with pytest.raises(GlimpseError, match=r"meta.json not found: prepare the dataset with python data/prepare.py "
                                           r"--dataset=tiny --data_dir=.*, or point --data_dir at the folder"):
        TokenData(folder)


def test_a_split_of_many_shards_is_read_only_where_it_is_sliced(tmp_path):
    """A snapshot's 64 tokens, or the next batch of an eval's windows, must not copy the whole split."""
    folder = tmp_path / "three"
    folder.mkdir()
    rng = np.random.default_rng(0)
    shards = {"train": [rng.integers(0, 50, 5000, dtype=np.uint16)],
              "val": [rng.integers(0, 50, 200_000, dtype=np.uint16) for _ in range(3)]}
    meta = {"tokenizer": {"kind": "char", "chars": "".join(map(chr, range(65, 115)))}, "vocab_size": 50,
            "dtype": "uint16", "shards": {}}
    for split, arrays in shards.items():
        meta["shards"][split] = []
        for i, array in enumerate(arrays):
            array.tofile(folder / f"{split}_{i:06d}.bin")
            meta["shards"][split].append({"file": f"{split}_{i:06d}.bin", "tokens": len(array)})
    (folder / "meta.json").write_text(json.dumps(meta))
    data = TokenData(folder)
    val, whole = data.tokens("val"), np.concatenate(shards["val"])
    assert len(val) == len(whole) == 600_000
    for a, b in ((0, 64), (199_990, 200_010), (150_000, 450_000), (599_990, 700_000), (7, 7), (-10, None)):
        assert np.array_equal(val[a:b], whole[a:b])
    starts = np.array([0, 199_995, 399_990, 599_983])
    assert np.array_equal(gather_windows(val, starts, 17), gather_windows(whole, starts, 17))
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    assert length_loss(model, val, 16, "windows", 16, 2000, 8, "cpu", nullcontext()) == \
        length_loss(model, whole, 16, "windows", 16, 2000, 8, "cpu", nullcontext())
    tracemalloc.start()
    first = data.tokens("val")[:64].astype(np.int64)
    batch = gather_windows(data.tokens("val"), np.arange(8) * 17 + 199_950, 17)  # windows across a shard boundary
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first.tolist() == whole[:64].tolist() and batch.shape == (8, 17)
    assert peak < 20_000  # the split is 1.2 MB; these read a few hundred tokens


def builtin_source(data_dir, copies: int = 1):
    """A local input.txt for the built-in shakespeare_char, where prepare.py looks before downloading it."""
    (data_dir / "shakespeare_char").mkdir(parents=True)
    (data_dir / "shakespeare_char" / "input.txt").write_text(make_corpus(1500) * copies, encoding="utf-8")


def test_processes_of_a_machine_prepare_a_dataset_once_before_they_join_the_group(tmp_path):
    """Preparing inside the process group left the other processes in a barrier, whose watchdog (NCCL's: 10
    minutes) ends the job long before a real corpus is ready; now the machine's lock orders them first."""
    builtin_source(tmp_path / "data")
    run = torchrun(2, "--dataset=shakespeare_char", f"--data_dir={tmp_path / 'data'}", "--device=cpu",
                   "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
                   "--gradient_accumulation_steps=2", "--max_iters=2", "--eval_iters=1", "--attn_log_interval=0",
                   f"--out_dir={tmp_path / 'out'}")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("preparing dataset 'shakespeare_char'") == 1
    assert (tmp_path / "data" / "shakespeare_char" / "meta.json").exists()


def test_a_job_of_several_machines_refuses_a_dataset_it_would_wait_for(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", dataset="shakespeare_char")
    builtin_source(tmp_path / "data")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(GlimpseError, match=r"not prepared on this machine .* prepare it on every machine first "
                                           r"\(python data/prepare.py --dataset=shakespeare_char\)"):
        prepare_data(cfg)
    assert not (tmp_path / "data" / "shakespeare_char" / "meta.json").exists()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not say: taken as one machine, which prepares
    prepare_data(cfg)
    assert (tmp_path / "data" / "shakespeare_char" / "meta.json").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # prepared on this machine: the job goes on
    prepare_data(cfg)
    # a dataset of its own, not prepared: the command that makes it, with its --input, as a single machine is told
    with pytest.raises(GlimpseError, match=r"^dataset 'mine' not found \(no .*\); make it with python "
                                           r"data/prepare.py --dataset=mine --data_dir=.* --input=PATH$"):
        prepare_data(replace(cfg, dataset="mine"))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the dataset is tokenized in this process")
def test_a_dataset_prepared_under_train_py_starts_fresh_worker_processes(tmp_path, monkeypatch):
    """train.py holds torch's threads (and under torchrun NCCL's): its tokenizing workers are spawned, not forked
    copies of it. A forked worker would inherit this process's broken tokenizer below; a spawned one does not."""
    builtin_source(tmp_path / "data", copies=40)  # over two tasks of 1M characters: the pool starts

    def broken(spec):
        raise RuntimeError("a forked worker runs its parent's state")
    monkeypatch.setattr(tokenize_parallel, "cached_tokenizer", broken)
    folder = ensure_dataset("shakespeare_char", str(tmp_path / "data"))
    assert sum(len(s) for s in TokenData(folder).splits["train"]) > 1_500_000
