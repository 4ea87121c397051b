"""
Where a corpus's documents come from: local files of several formats, or a Hugging Face dataset streamed.

    .txt                       one document per file
    .jsonl .jsonl.gz .jsonl.zst  one document per line, its text in a field (--text_column)
    .parquet                   one document per row, its text in a column (--text_column)

An input is a file, a folder (searched recursively) or a glob; its files are read in sorted order, so
the same input always gives the same documents in the same order. They come as parts, (text, input
bytes, starts a document): a record is one part, while a .txt file is read a block of TXT_BLOCK
characters at a time, so that a file of any size passes through in bounded memory. The input bytes
are what the progress bar counts when the total is known.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data.tokenizer import LONE_SURROGATE
from glimpse.errors import GlimpseError, reading

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
TXT_BLOCK = 1 << 22  # characters of a .txt file read at a time


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((f for f in sorted(FORMATS, key=len, reverse=True) if name.endswith(f)), None)


def input_files(spec: str) -> list[Path]:
    """The files an --input names: a file, a folder or a glob, in sorted order."""
    path = Path(spec)
    if path.is_dir():  # not hidden files or folders: editors' and notebooks' copies (.ipynb_checkpoints/)
        found = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        where = f"folder {spec!r}"
    elif path.is_file():
        if not file_format(path):
            raise GlimpseError(f"input {spec!r} is none of {', '.join(FORMATS)}: rename it or convert it")
        return [path]
    elif path.exists():  # a device or a pipe (/dev/null, <(zcat ...)): preparing sizes its input, may read it twice
        raise GlimpseError(f"--input {spec!r} is not a file or folder: save the corpus to a file and point --input "
                           "at it")
    else:
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file() and file_format(Path(p)))
        if not found and not glob.has_magic(spec):
            raise GlimpseError(f"--input {spec!r} not found: no such file or folder")
        where = f"glob {spec!r}"
    if not found:
        raise GlimpseError(f"{where} holds no {', '.join(FORMATS)} files: point --input at the corpus")
    return found


@dataclass
class Documents:
    """The documents of some files as parts, read lazily; bad_lines counts the JSON lines and parquet rows
    skipped."""

    files: list[Path]
    text_column: str = "text"
    skip_bad_lines: bool = False
    bad_lines: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def __iter__(self) -> Iterator[tuple[str, float, bool]]:  # (text, input bytes, starts a document)
        self.bad_lines = 0  # each pass over the files counts afresh
        for path in self.files:
            kind = file_format(path)
            if kind == ".txt":
                yield from txt_parts(path)
            elif kind == ".parquet":
                yield from ((text, size, True) for text, size in self.parquet(path))
            else:
                yield from ((text, size, True) for text, size in self.jsonl(path, kind))

    def jsonl(self, path: Path, kind: str):
        """Each line's text, and the bytes of the file (compressed ones too) read since the last text."""
        with reading(path, "input file"):  # an unreadable file; what is inside is judged below
            raw = open(path, "rb")
        try:
            with raw, open_lines(raw, path, kind) as lines:
                read = 0
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)  # bytes: no decoding of the whole line first
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        if self.skip_bad_lines:
                            self.bad_lines += 1
                            continue
                        problem = ("is not UTF-8 text; convert the file (e.g. with iconv)"
                                   if isinstance(e, UnicodeDecodeError) else f"is not JSON ({e.msg}); fix the line")
                        raise GlimpseError(f"{path}:{number} {problem}, or pass --skip_bad_lines to count and skip "
                                           "such lines") from None
                    if problem := not_text(record, self.text_column):
                        if self.skip_bad_lines:
                            self.bad_lines += 1
                            continue
                        raise GlimpseError(f"{path}:{number} {problem}; {fix_hint(problem, 'line')}, or pass "
                                           "--skip_bad_lines to count and skip such lines")
                    text = record[self.text_column]
                    position = raw.tell()
                    yield text, position - read
                    read = position
        except (EOFError, gzip.BadGzipFile, zlib.error, *zstd_errors()) as e:
            what = "gzip" if kind == ".jsonl.gz" else "zstandard"
            raise GlimpseError(f"{path} is truncated or not {what} ({e}); download or compress it again") from None

    def parquet(self, path: Path):
        import pyarrow as pa  # datasets' own dependency
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
            raise GlimpseError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
        columns = table.schema_arrow.names
        if self.text_column not in columns:
            raise GlimpseError(f"{path} has no column {self.text_column!r} (it has {', '.join(columns)}): "
                               "pick the text with --text_column=NAME")
        declared = table.schema_arrow.field(self.text_column).type
        kind = declared.value_type if pa.types.is_dictionary(declared) else declared  # categories read as strings
        string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16 and newer
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind)):
            raise GlimpseError(f"{path}'s column {self.text_column!r} holds {declared}, not text (string): pick the "
                               "text with --text_column=NAME, or convert the column")
        rows = max(table.metadata.num_rows, 1)
        per_row = path.stat().st_size / rows
        number = 0
        for batch in table.iter_batches(batch_size=1024, columns=[self.text_column]):
            for text in batch.column(0).to_pylist():
                number += 1
                if text is None:  # a missing value: held to the rule of a JSON line whose text is null
                    if self.skip_bad_lines:
                        self.bad_lines += 1
                        continue
                    raise GlimpseError(f"{path}'s row {number} has null in its text column {self.text_column!r}, "
                                       "not a string; fix the file, or pass --skip_bad_lines to count and skip such "
                                       "rows")
                yield text, per_row


def not_text(record, column: str) -> str | None:
    """Why a record (a JSON line's object) holds no document's text in its field column; None when it does."""
    if not isinstance(record, dict) or column not in record:
        return f"has no text field {column!r}"
    text = record[column]
    if not isinstance(text, str):
        return f"has {'null' if text is None else type(text).__name__} in its text field {column!r}, not a string"
    if lone := LONE_SURROGATE.search(text):
        return (f"has a lone surrogate \\u{ord(lone.group()):04x} at character {lone.start()} of its text field "
                f"{column!r}, half of a pair that no UTF-8 text can hold")
    return None


def fix_hint(problem: str, what: str) -> str:
    """What to do about a line or record (what) that not_text refuses."""
    return "name the field with --text_column=NAME" if problem.startswith("has no text field") else f"fix the {what}"


def txt_parts(path: Path) -> Iterator[tuple[str, int, bool]]:
    """A .txt file, one document, as blocks of TXT_BLOCK characters (the first one starts the document);
    newlines are translated as a whole read would (\\r\\n and \\r to \\n), and a byte-order mark that
    starts the file (some Windows editors write one) is not text, so it is dropped rather than made a token."""
    read = 0
    with reading(path, "input file"):
        raw = open(path, "rb")
    with raw, reading(path, "input file", lambda error: raw.tell() - len(error.object)):
        text = io.TextIOWrapper(raw, encoding="utf-8-sig")
        first = True
        while (block := text.read(TXT_BLOCK)) or first:
            position = raw.tell()
            yield block, position - read, first
            read, first = position, False


def zstd_errors() -> tuple:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def open_lines(raw, path: Path, kind: str):
    """The lines, as bytes, of a .jsonl file open as raw, decompressed as its name says."""
    if kind == ".jsonl.gz":
        return gzip.GzipFile(fileobj=raw)
    if kind == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise GlimpseError(f"{path} is zstandard-compressed: pip install zstandard") from None
        return io.BufferedReader(ZstdFrames(raw, zstandard.ZstdDecompressor()), buffer_size=1 << 16)
    return contextlib.nullcontext(raw)


class ZstdFrames(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame, and an EOFError where the file ends inside a frame.

    zstandard's stream_reader ends without a word where a cut file (a download stopped half-way) does, which
    would make a shorter corpus of it; its decompressobj says where a frame ends (eof), so a frame begun and
    not finished is found. gzip's reader raises the same EOFError for a cut .gz.
    """

    def __init__(self, raw, decompressor):
        self.raw, self.decompressor = raw, decompressor
        self.frame, self.in_frame = decompressor.decompressobj(), False
        self.pending, self.offset = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.pending):
            data = self.raw.read(1 << 17)
            if not data:
                if self.in_frame:
                    raise EOFError("the file ends inside a compressed frame")
                return 0
            self.pending, self.offset = memoryview(self.decompress(data)), 0
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = self.pending[self.offset:self.offset + n]
        self.offset += n
        return n

    def decompress(self, data: bytes) -> bytes:
        """data's decompressed bytes, starting a new frame after each one that ends in it."""
        out = []
        while data:
            self.in_frame = True
            out.append(self.frame.decompress(data))
            if not self.frame.eof:
                break
            data, self.frame, self.in_frame = self.frame.unused_data, self.decompressor.decompressobj(), False
        return b"".join(out)


@dataclass
class HubDocuments:
    """A Hugging Face dataset's train split, streamed with `datasets` (nothing downloaded whole first), one
    document a record; bad_lines counts the records skipped."""

    path: str
    name: str | None
    text_column: str = "text"
    data_files: str | None = None
    skip_bad_lines: bool = False
    bad_lines: int = 0

    def __iter__(self) -> Iterator[tuple[str, int, bool]]:  # (text, characters, starts a document)
        try:
            import datasets
            import pyarrow  # datasets' own dependency, whose errors a record it cannot parse raises
        except ImportError:
            raise GlimpseError("the built-in corpora stream through Hugging Face datasets: pip install datasets") \
                from None
        from huggingface_hub.utils import logging as hub_logging  # datasets' own dependency

        self.bad_lines = 0
        verbosity, hub_verbosity = datasets.logging.get_verbosity(), hub_logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of a failure would repeat the error below
        hub_logging.set_verbosity(hub_logging.CRITICAL)  # as would the Hub client's line per retry when offline
        print(f"streaming {self.path} from the Hugging Face Hub (offline, it fails after some retries: pass its "
              "files with --input=PATH)", file=sys.stderr)
        try:
            stream = datasets.load_dataset(self.path, name=self.name, split="train", streaming=True,
                                           data_files=self.data_files)
            for number, record in enumerate(stream, 1):
                if self.text_column not in record:  # every record has the dataset's columns: the name is wrong
                    raise GlimpseError(f"{self.path} has no column {self.text_column!r} (its records have "
                                       f"{', '.join(record)}): pick the text with --text_column=NAME")
                if problem := not_text(record, self.text_column):
                    if self.skip_bad_lines:
                        self.bad_lines += 1
                        continue
                    raise GlimpseError(f"{self.path}'s record {number} {problem}; pass --skip_bad_lines to count "
                                       "and skip such records")
                text = record[self.text_column]
                yield text, len(text), True
        except (ConnectionError, OSError) as e:
            raise GlimpseError(f"could not stream {self.path} ({str(e).splitlines()[0]}); offline, download its files "
                               "on a machine with a network and pass them with --input=PATH") from None
        except pyarrow.ArrowException as e:  # records datasets' reader cannot parse (JSON with a lone surrogate)
            raise GlimpseError(f"could not read {self.path}'s records ({str(e).splitlines()[0]}); download its files "
                               "and pass them with --input=PATH, which names the bad lines (--skip_bad_lines skips "
                               "them)") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
            hub_logging.set_verbosity(hub_verbosity)
