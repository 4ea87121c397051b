"""
Turn a text corpus of any size into the token shards train.py reads.

    python data/prepare.py --dataset=shakespeare_char             # downloads tiny Shakespeare
    python data/prepare.py --dataset=shakespeare_char --input=input.txt   # offline, from a local copy
    python data/prepare.py --dataset=mybooks --input=books/ --tokenizer=gpt2   # .txt .jsonl(.gz/.zst) .parquet
    python data/prepare.py --dataset=fineweb_edu                  # streamed through Hugging Face datasets

Documents (a .txt file, a JSON line, a parquet row: data/sources.py) are tokenized in parallel on every
core (data/tokenize_parallel.py), joined by GPT-2's <|endoftext|> (char-level: --separator) and written to
DATA_DIR/NAME/ as train_NNNNNN.bin and val_NNNNNN.bin shards of --shard_tokens tokens (uint16 when the
vocabulary fits, else uint32). Validation is whole documents: the first ones up to --val_tokens, or a
--val_fraction of them spread evenly (the first n documents hold ceil(n * fraction): one in every ten at
0.1, starting with the first); a corpus of a single document keeps its last --val_fraction of tokens instead.
meta.json (tokenizer, vocabulary, shards and their token counts) is written last, so its presence
means the dataset is complete. Work in progress lives in NAME/.preparing-HOST/ with the finished
shards: after a crash the same command keeps them and writes the rest, the same tokens as one run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shards import Progress, Router, publish, token_dtype  # noqa: E402
from data.sources import Documents, HubDocuments, input_files  # noqa: E402
from data.tokenize_parallel import cutting, pieces, skipped, tokenized  # noqa: E402
from data.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer  # noqa: E402
from glimpse.config import option, parse_config  # noqa: E402
from glimpse.errors import GlimpseError, user_errors  # noqa: E402
from glimpse.files import missing_folders, nearest_existing, remove_empty, write_atomic  # noqa: E402

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class Hub(NamedTuple):
    """A corpus on the Hugging Face Hub: load_dataset(path, name, data_files=...)'s train split, streamed."""
    path: str
    name: str | None = None
    data_files: str | None = None


BUILTIN = {  # name -> (tokenizer, where its text comes from)
    "shakespeare_char": ("char", SHAKESPEARE_URL),
    "shakespeare": ("gpt2", SHAKESPEARE_URL),
    "openwebtext": ("gpt2", Hub("Skylion007/openwebtext")),
    "fineweb_edu": ("gpt2", Hub("HuggingFaceFW/fineweb-edu", "sample-10BT")),  # its 10B-token sample
}
VAL_FRACTION = 0.1  # of the documents held out for validation, when neither --val_tokens nor --val_fraction is given
HUB_VAL_TOKENS = 10_000_000  # the streamed built-ins' validation tokens then


@dataclass
class PrepareConfig:
    dataset: str = option("", "dataset name: its files go to DATA_DIR/NAME/, replacing any there (empty: "
                              "shakespeare_char, unless --input is given, which needs a name)")
    input: str = option("", "a file, folder or glob of .txt, .jsonl(.gz/.zst), .parquet (built-ins fetch theirs "
                            "if empty)")
    tokenizer: Literal["auto", "char", "gpt2"] = option(
        "auto", "char or gpt2 (GPT-2 BPE); auto: the built-in dataset's own, char for other inputs"
    )
    data_dir: str = option("data", "folder that holds one sub-folder per dataset")
    text_column: str = option("text", "the JSON field or parquet column that holds each document's text")
    separator: str = option("\n\n", "char-level: the text put between documents (GPT-2 BPE puts <|endoftext|>)")
    shard_tokens: int = option(100_000_000, "tokens per shard file")
    val_tokens: int = option(0, "validation: the first whole documents, until they hold at least this many tokens "
                                "(0: --val_fraction of them)")
    val_fraction: float = option(0.0, "validation: this fraction of the documents, spread evenly, when "
                                      "--val_tokens is 0 (0: a tenth; the streamed built-ins, whose tenth would be "
                                      "a billion tokens, hold out their first 10M tokens instead; their files given "
                                      "with --input, a tenth)")
    workers: int = option(0, "tokenizing processes (0: one per core)")
    skip_bad_lines: bool = option(False, "count and skip .jsonl lines (and records of a streamed built-in) that are "
                                         "not UTF-8 or not JSON, lack the text field, or whose text is not a string "
                                         "or holds a lone surrogate (\\ud83d), and parquet rows whose text is null")

    def __post_init__(self):
        if not self.dataset and self.input:  # the default's name would replace tiny Shakespeare with this text
            raise ValueError("--input needs --dataset=NAME, the folder under --data_dir its dataset goes to")
        self.dataset = self.dataset or "shakespeare_char"
        if "/" in self.dataset or self.dataset.startswith("."):
            raise ValueError(f"dataset must be a plain folder name, got {self.dataset!r}")
        if not self.input and self.dataset not in BUILTIN:
            raise ValueError(
                f"dataset {self.dataset!r} is not built in ({', '.join(BUILTIN)}): "
                "give its text with --input=PATH"
            )
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be at least 1, got {self.shard_tokens}")
        if self.val_tokens and self.val_fraction:
            raise ValueError("give one of --val_tokens and --val_fraction: the first is used when both are")
        if self.separator != "\n\n" and self.tokenizer == "gpt2":
            raise ValueError("--separator joins documents char-level; GPT-2 BPE joins them with <|endoftext|>: "
                             "drop --separator")
        if self.val_tokens < 0:
            raise ValueError(f"val_tokens must be 0 (use --val_fraction) or more, got {self.val_tokens}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be at least 0 (0: the default) and below 1, got {self.val_fraction:g}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


def prepare(cfg: PrepareConfig, start_method: str | None = None, alone: bool = False) -> Path:
    """Read (or download or stream), tokenize, split and write one dataset; return its folder.

    start_method: how the tokenizing processes start (multiprocessing's; None: the platform's default). A run
    that fails on bad input removes the folders it made (data_dir, NAME/) when nothing was written in them.
    alone: take the dataset's lock first, refusing to start while another process prepares it (prepare.py's
    way; train.py takes the lock itself, waiting its turn, before it calls this).
    """
    out = Path(cfg.data_dir) / cfg.dataset
    existing = nearest_existing(out)
    if not existing.is_dir():
        raise GlimpseError(f"{str(existing)!r} is a file: " + ("move it, or choose another --dataset" if existing == out
                           else "--data_dir must be a folder, or a path where one can be made"))
    made = missing_folders(out)
    held = False  # the lock, when alone: a process refused it leaves another's lock file alone
    try:
        with preparing(out.parent, cfg.dataset, wait=False) if alone else contextlib.nullcontext():
            held = alone
            return make_dataset(cfg, out, start_method)
    except GlimpseError:
        if held and out.parent in made:  # its lock file in a data_dir made here: a mistyped --data_dir goes whole
            lock_file(out.parent, cfg.dataset).unlink(missing_ok=True)
        remove_empty(made)  # those still empty: never a folder another process has written in
        raise


def lock_file(data_dir: Path, dataset: str) -> Path:
    return data_dir / f".{dataset}.lock"


@contextlib.contextmanager
def preparing(data_dir: Path, dataset: str, wait: bool = True):
    """Hold the machine's lock on preparing dataset in data_dir (a file beside it, .NAME.lock), so that no two
    processes write its staging folder at once: with wait, take it in turn (train.py's processes: the first
    prepares, the others find it done); without, refuse at once while another holds it. The OS releases it when
    the process ends, however it ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_file(data_dir, dataset), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise GlimpseError(f"dataset {dataset!r} in {data_dir} is being prepared by another process (a "
                               "data/prepare.py, or a train.py that prepares it): let it finish, then run this "
                               "again") from None
        yield


def make_dataset(cfg: PrepareConfig, out: Path, start_method: str | None) -> Path:
    """prepare's work, into the dataset folder out."""
    kind = cfg.tokenizer
    if kind == "auto":
        kind = BUILTIN[cfg.dataset][0] if cfg.dataset in BUILTIN else "char"
    source = cfg.input or BUILTIN[cfg.dataset][1]
    if isinstance(source, Hub):
        documents = HubDocuments(source.path, source.name, cfg.text_column, source.data_files, cfg.skip_bad_lines)
        total = None  # a stream's size is not known ahead
    else:
        if not cfg.input:
            source = str(out / "input.txt")
            if not (out / "input.txt").exists():
                download(BUILTIN[cfg.dataset][1], out / "input.txt", "offline, pass a local copy: "
                         f"{prepare_command(out)} --input=PATH/TO/input.txt")  # with its --data_dir
        documents = Documents(input_files(source), cfg.text_column, cfg.skip_bad_lines)
        total = documents.total_bytes
    if not cfg.val_tokens and not cfg.val_fraction:  # neither chosen
        streamed = isinstance(source, Hub)
        cfg = replace(cfg, val_tokens=HUB_VAL_TOKENS) if streamed else replace(cfg, val_fraction=VAL_FRACTION)
    if kind == "char":
        chars, n_docs = set(), 0
        for text, _, starts_doc in tqdm(documents, desc="reading the characters", unit="part", disable=None):
            chars.update(text)
            n_docs += starts_doc and bool(text)  # an empty document is none (data/shards.py's Router)
        tokenizer = CharTokenizer("".join(chars | (set(cfg.separator) if n_docs > 1 else set())))
    else:
        tokenizer = GPT2Tokenizer()
    # what decides the tokens and the pieces a rerun counts past: the same settings, or a fresh start
    settings = {"source": str(source), "tokenizer": tokenizer.spec, "cut": cutting(), **asdict(cfg),
                "empty_documents": "none"}  # counted as documents before: a staging folder from then starts afresh
    if isinstance(documents, Documents):  # a file added to or gone from a folder or glob is another corpus
        settings["files"] = [str(p) for p in documents.files]
    settings.pop("workers")  # how many processes tokenize changes nothing in what is written
    # nor does skipping bad lines before the first one: a run stopped by a bad line can go on with --skip_bad_lines
    settings.pop("skip_bad_lines")
    write_shards(out, tokenizer, documents, total, cfg, settings, start_method)
    if bad_lines := documents.bad_lines:
        print(f"skipped {bad_lines:,} bad line{'s' if bad_lines > 1 else ''} (--skip_bad_lines)", file=sys.stderr)
    return out


def prepare_command(folder: Path, source: str = "") -> str:
    """The command that makes the dataset in folder: its --data_dir unless the default, and --input=source when
    source is given (PATH, or the input a meta.json names, if it is still there)."""
    command = f"python data/prepare.py --dataset={folder.name}"
    if folder.parent != Path("data"):
        command += f" --data_dir={folder.parent}"
    return command + (f" --input={source}" if source == "PATH" or source and Path(source).exists() else "")


def ensure_dataset(name: str, data_dir: str) -> Path:
    """The dataset's folder, preparing a built-in dataset first if it is not there yet.

    Its tokenizing processes are spawned, not forked: the callers (train.py, the studies) hold torch's threads,
    and a forked child gets the parent's memory without its threads, so a lock one of them held stays held.
    """
    folder = Path(data_dir) / name
    if (folder / "meta.json").exists():
        return folder
    if name in BUILTIN:
        print(f"preparing dataset {name!r} in {folder} ...", file=sys.stderr)
        return prepare(PrepareConfig(dataset=name, data_dir=data_dir), start_method="spawn")
    raise GlimpseError(f"dataset {name!r} not found (no {folder / 'meta.json'}); make it with "
                       f"{prepare_command(folder, 'PATH')}")


def download(url: str, dest: Path, offline_hint: str):
    """Fetch url to dest, atomically; offline this fails with offline_hint (how to pass a local file), leaving no
    folder made for dest behind."""
    print(f"downloading {url} ...", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(e, "reason", e)
        raise GlimpseError(f"could not download {url} ({reason}); {offline_hint}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, lambda tmp: tmp.write_bytes(body))


def write_shards(out: Path, tokenizer: Tokenizer, documents: Iterable, total_bytes: int | None, cfg: PrepareConfig,
                 settings: dict, start_method: str | None = None):
    """Tokenize documents (each pass reads them afresh: data/sources.py) in parallel, route whole documents to
    train or val, write shards, then meta.json."""
    staging = out / f".preparing-{socket.gethostname()}"  # one per host: nodes on a shared filesystem never meet
    progress = Progress.resume(staging, settings, token_dtype(tokenizer.vocab_size), cfg.shard_tokens)
    if progress.items:
        print(f"resuming: {progress.shards_kept()} finished shards kept in {staging}", file=sys.stderr)
    router = Router(progress.writers, separator_ids(tokenizer, cfg.separator), cfg.val_tokens, cfg.val_fraction,
                    progress.docs, progress.split)
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"preparing {cfg.dataset}", disable=None)
    items = skipped(pieces(documents), progress.items, bar)
    try:
        try:
            tokenize_into(router, progress, bar, tokenized(items, json.dumps(tokenizer.spec), progress.dtype, workers,
                                                           start_method))
        except GlimpseError as e:  # bad input, met part-way through the corpus
            raise stopped(staging, router, bar, str(e), "the input is fixed") from None
        bar.close()
        try:
            router.finish(settings["source"])  # the last shards, or a corpus of one document held whole until now
        except GlimpseError:  # the whole corpus was read: the same command would end the same way
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as e:
        why = out_of_room(e, out)
        if why is None:
            raise
        raise stopped(staging, router, bar, why, "there is room") from None
    meta = {"tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size, "dtype": progress.dtype.name,
            "source": settings["source"], "documents": router.docs}
    publish(out, staging, progress.writers, meta)
    held = meta["val_tokens"] / max(1, meta["train_tokens"] + meta["val_tokens"])
    fraction = 0.0 if cfg.val_tokens else float(router.val_share)
    if router.docs > 1 and held > 2 * fraction > 0:  # whole documents, so few or so uneven that they miss the share
        print(f"note: validation holds {held:.0%} of the tokens: it takes whole documents, "
              f"{math.ceil(router.docs * router.val_share):,} of these {router.docs:,}; for a share nearer "
              f"{fraction:g}, give more documents or ones of more even sizes, or join them into one file, whose last "
              f"{fraction:g} of the tokens is held out", file=sys.stderr)


def tokenize_into(router: Router, progress: Progress, bar: tqdm, batches):
    """Route every tokenized piece to its split's shards, saving progress each time a shard is finished."""
    start, saved_shards = time.perf_counter(), progress.shards_kept()
    for infos, encoded in batches:
        for (starts_doc, size), ids in zip(infos, encoded):
            router.add(ids, starts_doc)
            progress.items += 1
            bar.update(size)
            if progress.shards_kept() > saved_shards:  # a shard is finished: a rerun starts after this piece
                progress.save(router.docs, router.split)
                saved_shards = progress.shards_kept()
        tokens = sum(w.count for w in progress.writers.values())
        bar.set_postfix_str(f"{router.docs:,} docs, {tokens:,} tokens, "
                            f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")


def stopped(staging: Path, router: Router, bar: tqdm, why: str, rerun_when: str) -> GlimpseError:
    """The error that ends a preparation part-way, its files closed. Its staging folder goes when it holds no
    finished shard a rerun could keep (giving a full disk its room back); else it stays, and the error says so."""
    bar.close()
    router.close()
    if not (staging / "progress.json").exists():
        shutil.rmtree(staging, ignore_errors=True)
        return GlimpseError(why)
    return GlimpseError(f"{why} (the finished shards stay in {staging}: the same command, once {rerun_when}, goes "
                        "on from them)")


def out_of_room(e: OSError, out: Path) -> str | None:
    """What to say of an OSError that is the dataset's disk out of room (full, or the user's quota spent); None
    for another (a full /dev/shm refusing the workers' locks is ENOSPC too, with room left where out is)."""
    if e.errno == errno.EDQUOT:
        return f"the disk quota where {out} is written is used up: free some space, or prepare into another --data_dir"
    if e.errno == errno.ENOSPC and shutil.disk_usage(out).free < 2**20:  # a write fails with ENOSPC when none is left
        return f"the disk holding {out} is full: free some space, or prepare into another --data_dir"
    return None


def separator_ids(tokenizer: Tokenizer, separator: str) -> np.ndarray:
    if isinstance(tokenizer, GPT2Tokenizer):
        return np.array([tokenizer.eot_token])
    return tokenizer.encode(separator) if set(separator) <= set(tokenizer.chars) else np.array([], dtype=np.int64)


def main(argv: list[str] | None = None):
    with user_errors(interrupted="the same command goes on from any shards already finished",
                     out_of_memory="ask for less: fewer --workers (each tokenizes its documents in memory)"):
        cfg = parse_config(
            PrepareConfig, sys.argv[1:] if argv is None else argv,
            prog="data/prepare.py", description=__doc__, allow_file=False,
        )
        prepare(cfg, alone=True)


if __name__ == "__main__":
    main()
