"""
Turn a text corpus into the token files train.py reads.

    python data/prepare.py --dataset=shakespeare_char             # downloads tiny Shakespeare
    python data/prepare.py --dataset=shakespeare_char --input=input.txt   # offline, from a local copy
    python data/prepare.py --dataset=mybooks --input=books.txt --tokenizer=gpt2

writes data/NAME/train.bin and val.bin (token ids: uint16 when the vocabulary fits, else uint32; the
last 10% of the tokens is validation) and data/NAME/meta.json (tokenizer spec, vocabulary size,
counts). meta.json is written last, so its presence means the dataset is complete.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer  # noqa: E402
from glimpse.config import option, parse_config  # noqa: E402
from glimpse.errors import GlimpseError, user_errors  # noqa: E402

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
BUILTIN = {  # name -> (tokenizer, where its text comes from)
    "shakespeare_char": ("char", SHAKESPEARE_URL),
    "shakespeare": ("gpt2", SHAKESPEARE_URL),
}
VAL_FRACTION = 0.1
CHUNK_CHARS = 1 << 20  # encode in pieces of about 1M characters, for the progress bar


@dataclass
class PrepareConfig:
    dataset: str = option("shakespeare_char", "dataset name: its files go to DATA_DIR/NAME/")
    input: str = option("", "UTF-8 text file to build from (built-in datasets download theirs if empty)")
    tokenizer: Literal["auto", "char", "gpt2"] = option(
        "auto", "char or gpt2 (GPT-2 BPE); auto: the built-in dataset's own, char for other inputs"
    )
    data_dir: str = option("data", "folder that holds one sub-folder per dataset")

    def __post_init__(self):
        if not self.dataset or "/" in self.dataset or self.dataset.startswith("."):
            raise ValueError(f"dataset must be a plain folder name, got {self.dataset!r}")
        if not self.input and self.dataset not in BUILTIN:
            raise ValueError(
                f"dataset {self.dataset!r} is not built in ({', '.join(BUILTIN)}): "
                "give its text with --input=PATH"
            )


def prepare(cfg: PrepareConfig) -> Path:
    """Read (or download), tokenize, split and write one dataset; return its folder."""
    out = Path(cfg.data_dir) / cfg.dataset
    kind = cfg.tokenizer
    if kind == "auto":
        kind = BUILTIN[cfg.dataset][0] if cfg.dataset in BUILTIN else "char"
    source = cfg.input or str(out / "input.txt")
    if not cfg.input and not (out / "input.txt").exists():
        download(BUILTIN[cfg.dataset][1], out / "input.txt", cfg.dataset)
    text = read_text(Path(source))
    tokenizer = CharTokenizer.from_text(text) if kind == "char" else GPT2Tokenizer()
    ids = encode(tokenizer, text)
    write_dataset(out, tokenizer, ids, source)
    return out


def ensure_dataset(name: str, data_dir: str) -> Path:
    """The dataset's folder, preparing a built-in dataset first if it is not there yet."""
    folder = Path(data_dir) / name
    if (folder / "meta.json").exists():
        return folder
    if name in BUILTIN:
        print(f"preparing dataset {name!r} in {folder} ...", file=sys.stderr)
        return prepare(PrepareConfig(dataset=name, data_dir=data_dir))
    raise GlimpseError(
        f"dataset {name!r} not found (no {folder / 'meta.json'}); make it with "
        f"python data/prepare.py --dataset={name} --input=PATH"
    )


def download(url: str, dest: Path, name: str):
    """Fetch url to dest, atomically; offline this fails with a hint to pass a local file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} ...", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(e, "reason", e)
        raise GlimpseError(
            f"could not download {url} ({reason}); offline, pass a local copy: "
            f"python data/prepare.py --dataset={name} --input=PATH/TO/input.txt"
        ) from None
    write_atomic(dest, lambda tmp: tmp.write_bytes(body))


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GlimpseError(f"input file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise GlimpseError(f"input {str(path)!r} is a folder; give a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise GlimpseError(
            f"input file {str(path)!r} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv"
        ) from None
    if not text:
        raise GlimpseError(f"input file {str(path)!r} is empty")
    return text


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """All of text's token ids, encoded in pieces so that a progress bar can follow large inputs."""
    pieces = list(safe_chunks(text, CHUNK_CHARS))
    bar = tqdm(total=len(text), unit="char", unit_scale=True, desc="tokenizing", disable=len(pieces) < 2)
    ids = []
    for piece in pieces:
        ids.append(tokenizer.encode(piece))
        bar.update(len(piece))
    bar.close()
    return np.concatenate(ids)


def safe_chunks(text: str, size: int):
    """Split text into pieces of about `size` characters that tokenize as the whole text does.

    A cut is made only after a newline that has a non-space character on both sides: GPT-2's
    pre-tokenizer never joins such a newline with its neighbours, so no BPE token spans the cut.
    """
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) - 1 and not (
            text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace()
        ):
            cut += 1
        if cut >= len(text) - 1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def write_dataset(out: Path, tokenizer: Tokenizer, ids: np.ndarray, source: str):
    """Split ids into train/val and write the two .bin files, then meta.json."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    splits = {"train": ids[:n_train], "val": ids[n_train:]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the dataset is incomplete until meta.json is back
    for split, part in splits.items():
        write_atomic(out / f"{split}.bin", part.astype(dtype).tofile)
    meta = {
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "train_tokens": int(len(splits["train"])),
        "val_tokens": int(len(splits["val"])),
        "source": source,
    }
    write_atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8"))
    print(
        f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
        f"vocabulary {tokenizer.vocab_size:,} ({tokenizer.spec['kind']})",
        file=sys.stderr,
    )


def write_atomic(dest: Path, write):
    """Call write(path) on a temporary file beside dest, then move it into place in one step.

    The temporary name holds this host's name and process id: nodes that prepare the same dataset on a
    shared filesystem each write their own file, never into another's half-written one. A write that
    fails removes its own temporary file.
    """
    tmp = dest.with_name(f"{dest.name}.{socket.gethostname()}.{os.getpid()}.part")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(
            PrepareConfig, sys.argv[1:] if argv is None else argv,
            prog="data/prepare.py", description=__doc__, allow_file=False,
        )
        prepare(cfg)


if __name__ == "__main__":
    main()
