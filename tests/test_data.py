"""Data preparation and loading: token files, meta.json, tokenizers, and what goes wrong."""

import codecs
import json
import math
import os
import random
import socket
import tempfile
from fractions import Fraction

import numpy as np
import pytest
import torch

import data.prepare as prepare_module
import data.tokenize_parallel as tokenize_parallel
import train
from data.dataset import TokenData
from data.prepare import PrepareConfig, prepare
from data.tokenize_parallel import pieces
from data.tokenizer import CharTokenizer, GPT2Tokenizer, tokenizer_from_spec
from glimpse.errors import GlimpseError
from glimpse.files import write_atomic
from tests import conftest
from tests.conftest import R50K_CACHE_NAME, make_corpus, python
from tests.test_reliability import run_main

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # as tiktoken_ext fetches it


def read_split(folder, split, meta):
    """A split's tokens, its shards in meta.json's order, read with numpy alone."""
    return np.concatenate([np.fromfile(folder / s["file"], dtype=meta["dtype"]) for s in meta["shards"][split]])


def test_prepare_char_writes_bins_and_meta(tmp_path, corpus_file):
    folder = prepare(PrepareConfig(dataset="play", input=str(corpus_file), data_dir=str(tmp_path)))
    meta = json.loads((folder / "meta.json").read_text())
    text = corpus_file.read_text()
    assert meta["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(text)))}
    assert meta["vocab_size"] == len(set(text)) and meta["dtype"] == "uint16"
    train, val = read_split(folder, "train", meta), read_split(folder, "val", meta)
    assert len(train) == meta["train_tokens"] == int(len(text) * 0.9)  # the last 10% is validation
    assert len(val) == meta["val_tokens"] == len(text) - len(train)
    tokenizer = tokenizer_from_spec(meta["tokenizer"])
    assert tokenizer.decode(np.concatenate([train, val])) == text


def test_prepare_gpt2_matches_tiktoken(tmp_path, corpus_file, gpt2_ranks):
    import tiktoken

    folder = prepare(PrepareConfig(dataset="play", input=str(corpus_file), tokenizer="gpt2", data_dir=str(tmp_path)))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["vocab_size"] == 50257
    ids = np.concatenate([read_split(folder, "train", meta), read_split(folder, "val", meta)])
    expected = tiktoken.get_encoding("r50k_base").encode_ordinary(corpus_file.read_text())
    assert ids.tolist() == expected
    assert GPT2Tokenizer().decode(ids) == corpus_file.read_text()


@pytest.mark.parametrize("env", [{}, {"DATA_GYM_CACHE_DIR": "gym"}, {"TIKTOKEN_CACHE_DIR": "tiktoken"},
                                 {"TIKTOKEN_CACHE_DIR": "tiktoken", "DATA_GYM_CACHE_DIR": "gym"},
                                 {"TIKTOKEN_CACHE_DIR": "", "DATA_GYM_CACHE_DIR": "gym"}])
def test_gpt2_ranks_fixture_uses_tiktokens_own_cache(env, tmp_path, monkeypatch):
    """Without the shared copy, the gpt2_ranks fixture takes the file tiktoken itself would read from its
    cache, and finds none when tiktoken would have to download. Catches a fixture that looks at the shared
    copy only, or in another folder than tiktoken does."""
    import tiktoken.load

    monkeypatch.setattr(conftest, "GPT2_RANKS", tmp_path / "no-shared-copy")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # what gettempdir() answers, tiktoken included
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, folder in env.items():
        monkeypatch.setenv(name, str(tmp_path / folder) if folder else "")

    def no_download(url):
        raise OSError(f"tiktoken would download {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    for folder in ("tiktoken", "gym", "tmp/data-gym-cache"):  # a different file wherever tiktoken might look
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / R50K_CACHE_NAME).write_text(folder)
    for _ in range(2):  # then once more with the file found taken away
        try:
            expected = tiktoken.load.read_file_cached(R50K_URL)
        except OSError:
            expected = None
        found = conftest.find_gpt2_ranks()
        assert (found and found.read_bytes()) == expected
        if found:
            found.unlink()


def test_cut_pieces_tokenize_as_the_whole_text(gpt2_ranks, monkeypatch):
    """Cutting a long document for the workers must not change a single token: random texts of the characters
    GPT-2's pre-tokenizer treats apart, cut at every place CUT allows, give the whole text's tokens."""
    monkeypatch.setattr(tokenize_parallel, "CHUNK_CHARS", 1)  # a piece ends at every cut
    tokenizer = GPT2Tokenizer()
    rng = random.Random(0)
    alphabet = ["a", "Zé", "e\u0301", "中文", "7", "42", "\u0663", "'", "'s", "'S", "'ll", "'ve", "ll", ".", "!?", "_",
                "🎭", "\U0001d400", "<|endoftext|>", "\x00", "\xad", " ", "  ", "\n", "\r\n", "\n\n", "\t", "\r",
                "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u1680", "\u180e", "\u2003", "\u200b", "\u2028",
                "\u202f", "\u2060", "\u3000", "\ufeff"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(3000)]
    edges = ["a \x1cb", "a\x1c b", "x \x1f\x1cy", "it 's", "a\u3000 b"]
    for text in [*texts, *edges, make_corpus(40) + "\n\n\n  spaced\n\tTabs\nA\nB  \nC\n\nend"]:
        cut = [piece for piece, _ in pieces([(text, len(text), True)])]
        assert "".join(cut) == text
        assert np.concatenate([tokenizer.encode(p) for p in cut]).tolist() == tokenizer.encode(text).tolist(), cut
    assert len(cut) > 200  # the last text, English-like, is cut before almost every word


def test_large_vocabulary_uses_uint32(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF]
    corpus = tmp_path / "wide.txt"
    corpus.write_text("".join(chars) * 2, encoding="utf-8")
    folder = prepare(PrepareConfig(dataset="wide", input=str(corpus), data_dir=str(tmp_path)))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocab_size"] == len(chars) and meta["dtype"] == "uint32"
    assert read_split(folder, "train", meta).max() >= 65536


def test_the_token_dtype_is_uint16_while_every_id_fits_in_it():
    """Ids run from 0 to vocab_size - 1: uint16 holds them up to a vocabulary of 65,536 (half the disk of uint32),
    uint32 beyond."""
    from data.shards import token_dtype

    for vocab_size in (2, 65_535, 65_536, 65_537, 100_000):
        dtype = token_dtype(vocab_size)
        assert np.iinfo(dtype).max >= vocab_size - 1, vocab_size
        assert (dtype == np.uint16) == (vocab_size - 1 <= np.iinfo(np.uint16).max), vocab_size


def test_a_dataset_prepared_again_is_told_by_its_counts_and_names_the_documents_only_when_they_differ():
    """The checkpoint's record of a preparation against the folder's now: the same counts (whatever else an older
    record held) are no change; other token counts are said; other document counts are said with them."""
    from data.dataset import prepared_again

    now = {"documents": 3, "train_tokens": 9_000, "val_tokens": 1_000}
    assert prepared_again(None, now) == prepared_again("not a record", now) == ""  # older checkpoints, hand edits
    assert prepared_again({**now, "source": "play.txt"}, now) == ""
    assert prepared_again({**now, "val_tokens": 900, "train_tokens": 9_100}, now) == \
        "9,100 train and 900 val tokens then, 9,000 train and 1,000 val tokens now"
    assert prepared_again({**now, "documents": 2}, now) == \
        "2 documents, 9,000 train and 1,000 val tokens then, 3 documents, 9,000 train and 1,000 val tokens now"


def test_half_of_a_surrogate_pair_is_one_line_saying_where_with_either_tokenizer(gpt2_ranks):
    """A str can hold half of a UTF-16 pair (JSON's "\\ud83d", a text cut between the halves); no UTF-8 text can,
    so neither tokenizer encodes it: a one-line error that says where, not Python's UnicodeEncodeError."""
    for tokenizer in (CharTokenizer("abc"), GPT2Tokenizer()):
        with pytest.raises(GlimpseError) as error:
            tokenizer.encode("ab\ud83dc")
        assert str(error.value) == ("the text holds a lone surrogate \\ud83d at character 2, half of a pair that no "
                                    "UTF-8 text can hold: remove it, or join it to its other half")


def test_a_char_tokenizer_gives_utf_8_bytes_names_ids_past_its_vocabulary_and_refuses_a_spec_it_cannot_read():
    """sample.py streams a char model's tokens as their UTF-8 bytes; a dump names an id past the vocabulary (a
    padded one) rather than failing on it; and a spec (a meta.json's, a checkpoint's) of repeated characters or of a
    kind this version does not know is an error, not a tokenizer that reads otherwise."""
    text = "déjà vu 🎭 中文"
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text, np.uint16)
    assert ids.dtype == np.uint16 and tokenizer.decode_bytes(ids) == text.encode("utf-8")
    last = tokenizer.vocab_size - 1
    assert tokenizer.token_strings([0, last, last + 1]) == [tokenizer.chars[0], tokenizer.chars[-1],
                                                             f"⟨no-token-{last + 1}⟩"]
    with pytest.raises(GlimpseError, match="a char vocabulary must not repeat characters"):
        tokenizer_from_spec({"kind": "char", "chars": "abca"})
    for spec in ({"kind": "bpe", "encoding": "cl100k_base"}, {"chars": "abc"}):
        with pytest.raises(GlimpseError, match=f"unknown tokenizer kind {spec.get('kind')!r}; this version knows "
                                               "'char' and 'gpt2'"):
            tokenizer_from_spec(spec)


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc\n")
    assert tok.decode(tok.encode("cab\n")) == "cab\n"
    with pytest.raises(GlimpseError, match="'xz'"):
        tok.encode("axbz")
    with pytest.raises(GlimpseError) as error:  # each character named once, as Python writes it: a tab, a backslash
        tok.encode("a\tb\\c")
    assert str(error.value).startswith("characters not in this model's vocabulary: '\\t\\\\'; a char-level")
    assert "backslash" not in str(error.value)
    with pytest.raises(GlimpseError) as error:  # a backslash the model reads: no word about \n for another character
        CharTokenizer.from_text("ab\\n").encode("a\\nbé")
    assert str(error.value).endswith("'é'; a char-level model can only read the characters it was trained on")
    with pytest.raises(GlimpseError) as error:  # a shell's "\n": two characters where a newline was meant
        tok.encode("ab\\nc")
    assert "vocabulary: '\\\\n';" in str(error.value) and str(error.value).endswith(
        "the text holds \\n as two characters, a backslash and an n, not a newline (in bash write $'...\\n...', "
        "or give sample.py the text in a file, --start=FILE:path)")


def test_bad_inputs_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    for path, message in [(tmp_path / "nope.txt", "not found"), (empty, "holds no text"), (latin1, "not UTF-8")]:
        with pytest.raises(GlimpseError, match=message):
            prepare(PrepareConfig(dataset="x", input=str(path), data_dir=str(tmp_path)))
        assert not (tmp_path / "x").exists()  # a failed run leaves no dataset folder and no work in progress
    for alone in (False, True):  # the folders --data_dir asked for go too, with prepare.py's lock file in them
        with pytest.raises(GlimpseError, match="holds no text"):
            prepare(PrepareConfig(dataset="x", input=str(empty), data_dir=str(tmp_path / "new" / "deeper")),
                    alone=alone)
        assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="give its text with --input"):
        PrepareConfig(dataset="custom")
    for settings, said in [({"dataset": ".hidden"}, "dataset must be a plain folder name, got '.hidden'"),
                           ({"dataset": "a/b"}, "dataset must be a plain folder name, got 'a/b'"),
                           ({"val_fraction": 1.0}, "val_fraction must be at least 0 (0: the default) and below 1, "
                                                   "got 1"),
                           ({"workers": -1}, "workers must be >= 0, got -1")]:
        with pytest.raises(ValueError) as error:
            PrepareConfig(**{"dataset": "x", "input": str(latin1), **settings})
        assert str(error.value) == said


def test_a_data_dir_under_a_file_is_one_line(tmp_path, corpus_file, capsys):
    (tmp_path / "afile").write_text("notes")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("not a dataset")
    for data_dir, message in [(tmp_path / "afile", f"{str(tmp_path / 'afile')!r} is a file: --data_dir must be a "
                                                    "folder"),
                              (tmp_path / "afile" / "sub", f"{str(tmp_path / 'afile')!r} is a file: --data_dir"),
                              (tmp_path / "d", f"{str(tmp_path / 'd' / 'x')!r} is a file: move it, or choose another "
                                               "--dataset")]:
        line = run_main(prepare_module.main, ["--dataset=x", f"--input={corpus_file}", f"--data_dir={data_dir}"],
                        capsys)
        assert message in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile", "d", "x"]


def test_a_dataset_not_prepared_is_one_line_with_the_command_that_makes_it(tmp_path, monkeypatch):
    """The command names --data_dir where it is not the default data/ (run without it, it would prepare the dataset
    where train.py does not look), and no folder is made."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    for data_dir, command in [("data", "python data/prepare.py --dataset=mine --input=PATH"),
                              (str(elsewhere), f"python data/prepare.py --dataset=mine --data_dir={elsewhere} "
                                               "--input=PATH")]:
        with pytest.raises(GlimpseError) as error:
            prepare_module.ensure_dataset("mine", data_dir)
        meta = os.path.join(data_dir, "mine", "meta.json")
        assert str(error.value) == f"dataset 'mine' not found (no {meta}); make it with {command}"
    assert list(tmp_path.iterdir()) == []


def test_offline_download_says_to_pass_a_local_file(tmp_path, monkeypatch):
    # port 9 (discard) on loopback refuses the connection: a real failed download, no network needed
    monkeypatch.setitem(prepare_module.BUILTIN, "shakespeare_char", ("char", "http://127.0.0.1:9/input.txt"))
    with pytest.raises(GlimpseError, match=r"could not download .* --input=PATH") as error:
        prepare(PrepareConfig(dataset="shakespeare_char", data_dir=str(tmp_path)))
    assert str(error.value).endswith(f"python data/prepare.py --dataset=shakespeare_char --data_dir={tmp_path} "
                                     "--input=PATH/TO/input.txt")  # the folder it was asked to prepare in, too
    assert not (tmp_path / "shakespeare_char" / "meta.json").exists()


def test_prepare_leaves_other_nodes_temporary_files_alone(tmp_path, corpus_file, monkeypatch):
    """Nodes sharing a filesystem may prepare a built-in dataset at once: each writes temporary files of its
    own. Catches fixed temporary names (train.bin.part, ...), with which one node's os.replace moves another
    node's half-written file into place."""
    monkeypatch.setitem(prepare_module.BUILTIN, "shakespeare_char", ("char", corpus_file.as_uri()))  # a real fetch
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    others = ["input.part", "input.txt.part", "train.bin.part", "val.bin.part", "meta.json.part",
              "train.bin.node7.4242.part"]
    for name in others:
        (folder / name).write_text("another node's half-written file")
    prepare(PrepareConfig(dataset="shakespeare_char", data_dir=str(tmp_path)))
    for name in others:
        assert (folder / name).read_text() == "another node's half-written file"
    ours = ["input.txt", "train_000000.bin", "val_000000.bin", "meta.json"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(others + ours)  # no temporary file of ours
    text = corpus_file.read_text()
    assert (folder / "input.txt").read_text() == text
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.concatenate([read_split(folder, "train", meta), read_split(folder, "val", meta)])
    assert len(ids) == meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert tokenizer_from_spec(meta["tokenizer"]).decode(ids) == text


def test_a_failed_write_removes_its_own_temporary_file_only(tmp_path):
    """Catches a write that fails half-way (a full disk, say) leaving its temporary file behind."""
    (tmp_path / "train.bin.part").write_text("another node's")

    def disk_full(path):
        path.write_bytes(b"half a split")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path / "train.bin", disk_full)
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin.part"]
    assert (tmp_path / "train.bin.part").read_text() == "another node's"


def test_a_write_stopped_any_way_leaves_no_file_of_its_own_and_raises_what_stopped_it(tmp_path):
    """Ctrl-C half-way leaves no temporary file either; the temporary name is this host's and this process's own
    (two processes of one machine preparing a dataset each write their own); and a write refused before its
    temporary file exists raises its own error, not the missing file's."""
    names = []

    def interrupted(path):
        names.append(path.name)
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "meta.json", interrupted)
    assert list(tmp_path.iterdir()) == []
    assert names == [f"meta.json.{socket.gethostname()}.{os.getpid()}.part"]

    def refused(path):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(PermissionError, match="Permission denied"):
        write_atomic(tmp_path / "meta.json", refused)
    assert list(tmp_path.iterdir()) == []


def test_a_second_prepare_of_a_dataset_being_prepared_is_refused_at_once(tmp_path, corpus_file):
    """Two prepare.py runs of one dataset would write one staging folder, the second taking over the first's
    finished shards as its own and truncating the file it writes: the second says another process prepares it, and
    touches nothing; once the first is done (its lock gone with it), the same command runs."""
    import fcntl

    from data.prepare import preparing

    args = ["data/prepare.py", "--dataset=busy", f"--input={corpus_file}", f"--data_dir={tmp_path}"]
    with preparing(tmp_path, "busy"):  # as a prepare.py or train.py at work on it would hold it
        refused = python(*args)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr == (f"error: dataset 'busy' in {tmp_path} is being prepared by another process (a "
                                  "data/prepare.py, or a train.py that prepares it): let it finish, then run this "
                                  "again\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".busy.lock"]  # no dataset folder begun
    done = python(*args)
    assert done.returncode == 0, done.stderr
    assert TokenData(tmp_path / "busy").prepared["train_tokens"] > 0
    with open(tmp_path / ".busy.lock") as lock:  # released when prepare.py ended
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_refused_prepare_leaves_the_lock_of_the_one_at_work(tmp_path, corpus_file, monkeypatch):
    """A second prepare.py that found data_dir missing, made by the first a moment later, is refused: the lock file
    and the folder are the first's, not the failed start's to remove (a third would lock a new file beside it)."""
    data_dir = tmp_path / "new"
    late = [data_dir / "busy", data_dir]  # what missing_folders said before the first made them
    monkeypatch.setattr(prepare_module, "missing_folders", lambda path: list(late))
    with prepare_module.preparing(data_dir, "busy"):
        with pytest.raises(GlimpseError, match="is being prepared by another process"):
            prepare(PrepareConfig(dataset="busy", input=str(corpus_file), data_dir=str(data_dir)), alone=True)
        assert (data_dir / ".busy.lock").exists()


def test_a_validation_split_far_above_its_fraction_says_why_and_what_to_do(tmp_path, corpus_file, capsys):
    """Validation takes whole documents: of two books, one, half the text, where a tenth was asked for. prepare.py
    says so; with documents enough, or one document (its last tokens held out), it says nothing more."""
    books = tmp_path / "books"
    books.mkdir()
    text = corpus_file.read_text(encoding="utf-8")
    for n in (1, 2):
        (books / f"book{n}.txt").write_text(text, encoding="utf-8")
    prepare(PrepareConfig(dataset="two", input=str(books), data_dir=str(tmp_path / "data")))
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("note: validation holds 50% of the tokens: it takes whole documents, 1 of these 2; for a "
                       "share nearer 0.1, give more documents or ones of more even sizes, or join them into one file, "
                       "whose last 0.1 of the tokens is held out")
    share = Fraction("0.07")  # the split's rule: document d is held out when it raises ceil(n * share)
    val = {d for d in range(100) if math.ceil((d + 1) * share) > math.ceil(d * share)}
    assert len(val) == 7
    many = [json.dumps({"text": text if i in val else text[:200]}) + "\n" for i in range(100)]  # held-out ones long
    (tmp_path / "uneven.jsonl").write_text("".join(many), encoding="utf-8")
    prepare(PrepareConfig(dataset="uneven", input=str(tmp_path / "uneven.jsonl"), data_dir=str(tmp_path / "data"),
                          val_fraction=0.07))  # 7 of 100, counted as the split counts them (not ceil(100 * 0.07) = 8)
    assert "it takes whole documents, 7 of these 100; for a share nearer 0.07" in capsys.readouterr().err
    many = tmp_path / "many.jsonl"  # 40 documents: a tenth of them is near a tenth of the text
    many.write_text("".join(json.dumps({"text": text[i::40]}) + "\n" for i in range(40)), encoding="utf-8")
    near = tmp_path / "near.jsonl"  # a tenth of the documents, each half as long again as the others: 14% of the text
    near.write_text("".join(json.dumps({"text": text[:300] if i % 10 == 0 else text[:200]}) + "\n" for i in range(20)),
                    encoding="utf-8")
    for name, source, extra in (("one", corpus_file, {}), ("asked", books, {"val_fraction": 0.5}),
                                ("many", many, {}), ("near", near, {})):
        prepare(PrepareConfig(dataset=name, input=str(source), data_dir=str(tmp_path / "data"), **extra))
        assert "note:" not in capsys.readouterr().err, name


def test_prepare_cli_and_its_errors(tmp_path, corpus_file):
    ok = python("data/prepare.py", "--dataset=cli", f"--input={corpus_file}", f"--data_dir={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "meta.json").exists()
    bad = python("data/prepare.py", "--dataset=cli2", f"--input={tmp_path}/missing.txt", f"--data_dir={tmp_path}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --input ") and "Traceback" not in bad.stderr


def test_batches_are_shifted_windows(data_dir):
    data = TokenData(data_dir / "tiny")
    gen = torch.Generator().manual_seed(0)
    starts = data.random_starts("train", 8, 32, gen)
    x, y = data.batch("train", starts, 32)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = data.tokens("train")
    assert x[0].tolist() == tokens[starts[0]: starts[0] + 32].tolist()
    with pytest.raises(GlimpseError, match="fewer than block_size"):
        data.check_block_size(10**6)


def test_bins_that_do_not_match_meta_are_refused(tmp_path, corpus_file):
    folder = prepare(PrepareConfig(dataset="cut", input=str(corpus_file), data_dir=str(tmp_path)))
    with open(folder / "val_000000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(GlimpseError, match="does not match"):
        TokenData(folder)


def test_a_meta_json_that_prepare_did_not_write_is_one_line(tmp_path, corpus_file, capsys):
    folder = prepare(PrepareConfig(dataset="odd", input=str(corpus_file), data_dir=str(tmp_path)))
    meta = json.loads((folder / "meta.json").read_text())
    no_tokens = json.loads(json.dumps(meta))
    del no_tokens["shards"]["val"][0]["tokens"]
    for broken, said in [({k: v for k, v in meta.items() if k != "vocab_size"}, "has no 'vocab_size'"),
                         ({k: v for k, v in meta.items() if k != "tokenizer"}, "has no 'tokenizer'"),
                         (no_tokens, "has no 'tokens'"), ({**meta, "dtype": "words"}, "has a bad value"),
                         ({**meta, "shards": {"train": []}}, "has no 'val'"), (["a", "list"], "has a bad value")]:
        (folder / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(GlimpseError, match=f"{folder} is not a dataset data/prepare.py prepared: its meta.json "
                                               f"{said}.*; prepare it with python data/prepare.py --dataset=odd "
                                               f"--data_dir={tmp_path}$"):  # the folder it is in, too
            TokenData(folder)
    line = run_main(train.main, [f"--data_dir={tmp_path}", "--dataset=odd", f"--out_dir={tmp_path / 'out'}",
                                 "--device=cpu"], capsys)
    assert "is not a dataset data/prepare.py prepared" in line and not (tmp_path / "out").exists()


def test_gpt2_tokens_decoded_one_at_a_time_give_the_texts_bytes(gpt2_ranks):
    """sample.py streams each new token's bytes through an incremental UTF-8 decoder: a token may hold part of a
    character, so decode_bytes must give its bytes, not its text (which would be U+FFFD there)."""
    tokenizer = GPT2Tokenizer()
    text = "emoji 😀🎉 and 中文字符, déjà vu"
    ids = tokenizer.encode(text).tolist()
    pieces = [tokenizer.decode_bytes([i]) for i in ids]

    def whole_characters(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert not all(map(whole_characters, pieces))  # some tokens hold part of a character: the case that matters
    assert b"".join(pieces) == text.encode("utf-8")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    assert "".join(decoder.decode(p) for p in pieces) + decoder.decode(b"", final=True) == text


def test_a_split_of_exactly_block_size_tokens_is_refused_and_one_more_is_enough(tmp_path):
    """A window is block_size + 1 tokens (its inputs and its targets shifted by one). Catches a check one token
    short, which lets a split of block_size tokens through to a batch draw that has no window to draw from."""
    folder = tmp_path / "short"
    folder.mkdir()
    np.arange(50, dtype=np.uint16).tofile(folder / "train_000000.bin")
    np.arange(20, dtype=np.uint16).tofile(folder / "val_000000.bin")
    (folder / "meta.json").write_text(json.dumps({
        "tokenizer": {"kind": "char", "chars": "".join(map(chr, range(32, 132)))}, "vocab_size": 100,
        "dtype": "uint16", "shards": {split: [{"file": f"{split}_000000.bin", "tokens": n}]
                                      for split, n in (("train", 50), ("val", 20))}}))
    data = TokenData(folder)
    with pytest.raises(GlimpseError, match="the val split .* has 20 tokens, fewer than block_size \\+ 1 = 21"):
        data.check_block_size(20)
    data.check_block_size(19)
    starts = data.random_starts("val", 4, 19, torch.Generator().manual_seed(0))
    x, y = data.batch("val", starts, 19)
    assert x.tolist() == [list(range(19))] * 4 and y.tolist() == [list(range(1, 20))] * 4  # the one window there is
