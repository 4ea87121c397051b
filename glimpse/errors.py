"""Errors a user can fix print as one line, with no traceback, and exit non-zero."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


class GlimpseError(Exception):
    """Something wrong with the user's input or environment; the message says how to fix it."""


class UserExit(SystemExit):
    """The exit a GlimpseError ends a script with: status 2, and the message, for a caller that reports it."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


_caller_reports = ContextVar("caller_reports", default=False)


INTERRUPTED = 130  # the shell's status for a command that Ctrl-C (SIGINT, 2) stopped: 128 + 2


@contextmanager
def user_errors(interrupted: str = "", out_of_memory: str = ""):
    """Turn a GlimpseError (or an OSError, or running out of memory) raised inside the block into 'error: ...' on
    stderr and exit code 2 (UserExit), and Ctrl-C into one line, 'interrupted' and what to do next (interrupted),
    and exit code 130. out_of_memory says which settings ask for less memory."""
    try:
        yield
    except BrokenPipeError:  # a reader that closed the pipe (`| head`): the script stops as Unix tools do
        raise
    except (GlimpseError, OSError, MemoryError, RuntimeError) as e:
        # an OSError is the machine's answer about a path no check foresaw (a full disk, a read-only mount, a name
        # too long, a symlink loop): the user's to fix too, so one line naming the path, not a traceback; so is
        # memory that settings asked for and the machine does not have
        if isinstance(e, RuntimeError) and not is_out_of_memory(e):  # a bug's error keeps its traceback
            raise
        message = (str(e) if isinstance(e, GlimpseError) else os_error_message(e) if isinstance(e, OSError)
                   else out_of_memory_message(e, out_of_memory))
        if not _caller_reports.get():
            print(f"error: {message}", file=sys.stderr)
        raise UserExit(message) from None
    except KeyboardInterrupt:
        # Ctrl-C reaches every process torchrun started on the machine: the first of them says it (read from the
        # environment here: glimpse/distributed.py, which owns it, imports this module)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print("\ninterrupted" + (f": {interrupted}" if interrupted else ""), file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


def is_out_of_memory(e: BaseException) -> bool:
    """Whether e says torch could not allocate: torch.OutOfMemoryError on a GPU (read by name: this module does not
    import torch), the CPU allocator's RuntimeError, MPS's. Code that takes a RuntimeError for a damaged file asks
    this first, and lets such an error through to user_errors."""
    return isinstance(e, RuntimeError) and (type(e).__name__ == "OutOfMemoryError" or any(
        words in str(e) for words in ("DefaultCPUAllocator", "can't allocate memory", "MPS backend out of memory")))


def out_of_memory_message(e: MemoryError | RuntimeError, advice: str) -> str:
    """'out of memory: what torch said (its first sentences: the size asked for, the device's); advice'."""
    said = (str(e).strip().splitlines() or [""])[0]
    said = re.sub(r"^\[enforce fail at [^\]]*\] [^.]*\. ", "", said)  # the CPU allocator's source line
    # torch goes on about fragmentation and settings that lift the device's limit (MPS's "may cause system
    # failure"): the size asked for and the device's memory are kept, its advice left out
    sentences = re.split(r"(?<=\.) (?=[A-Z])", said)
    said = " ".join(s for s in sentences[:3] if not s.startswith(("Use ", "If ", "See ", "Including ", "Process ")))
    said = re.sub(r"allocate (\d+) bytes", lambda m: f"allocate {size(int(m[1]))}", said)  # the CPU's, in bytes
    said = said.rstrip(".")
    return f"out of memory{': ' + said if said else ''}; {advice or 'the machine has too little memory for this'}"


def size(n_bytes: int) -> str:
    """'2.5 GiB', '300.0 MiB': a size as people read it."""
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


def os_error_message(e: OSError) -> str:
    """'could not use PATH: what the system said', for an OSError (its path, when it names one)."""
    reason = e.strerror or str(e) or type(e).__name__
    paths = " and ".join(repr(str(p)) for p in (e.filename, e.filename2) if p is not None)
    return f"could not use {paths}: {reason}" if paths else f"{reason} ({type(e).__name__})"


@contextmanager
def reported_by_caller():
    """Inside the block, user_errors leaves printing its message to the caller, who catches the UserExit.

    Under torchrun every process meets the same bad setting; the caller lets one of them print it.
    """
    token = _caller_reports.set(True)
    try:
        yield
    finally:
        _caller_reports.reset(token)


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
