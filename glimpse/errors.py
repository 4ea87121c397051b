"""Errors a user can fix print as one line, with no traceback, and exit non-zero."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path


class GlimpseError(Exception):
    """Something wrong with the user's input or environment; the message says how to fix it."""


@contextmanager
def user_errors():
    """Turn a GlimpseError raised inside the block into 'error: ...' on stderr and exit code 2."""
    try:
        yield
    except GlimpseError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def read_utf8(path: Path, what: str) -> str:
    """The text of a UTF-8 file, or a one-line error that names it as `what` ("input file", "prompt file")."""
    with reading(path, what):
        return path.read_text(encoding="utf-8")


@contextmanager
def reading(path: Path, what: str, offset=lambda error: 0):
    """Turn the errors of reading a UTF-8 file inside the block into one-line errors that name it as `what`;
    offset(error) is the byte of the file at which the bytes that failed to decode begin (0: read whole)."""
    try:
        yield
    except FileNotFoundError:
        raise GlimpseError(f"{what} {str(path)!r} not found") from None
    except IsADirectoryError:
        raise GlimpseError(f"{what} {str(path)!r} is a folder; give a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise GlimpseError(f"{what} {str(path)!r} is not UTF-8 text (byte {offset(e) + e.start}); convert it, "
                           "e.g. with iconv") from None
    except OSError as e:
        raise GlimpseError(f"could not read {what} {str(path)!r}: {e.strerror or e}") from None
