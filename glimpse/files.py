"""Writing a file whole or not at all: whoever reads it (another process checking an out_dir, a browser
open on a snapshot index, another node preparing the same dataset) sees the old file or the new one,
never half of one. write_text adds the folder, and turns the system's refusal into one line."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from glimpse.errors import GlimpseError


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


def nearest_existing(path: Path) -> Path:
    """path, or the nearest of its parents that exists ("." at worst for a relative path)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def missing_folders(path: Path) -> list[Path]:
    """The folders making path would make (path included), deepest first."""
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(folders: list[Path]):
    """Remove those of folders (deepest first) left empty: what a start that failed made and wrote nothing in."""
    for folder in folders:
        with contextlib.suppress(OSError):  # gone, or written in since by another process: left as it is
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def check_writable(folder: Path, what: str, instead: str):
    """A GlimpseError, before any work is done, for a folder that could not be written into: the nearest part of
    its path that exists is a file, or a folder this process may not write in (its permissions, a read-only disk).
    instead: what the user can do about it."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        how = "is a file" if existing == folder else f"cannot be made: {str(existing)!r} is a file"
        raise GlimpseError(f"{what} {str(folder)!r} {how}; {instead}")
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only filesystem refuses root too
        how = "" if existing == folder else f" (in {str(existing)!r})"
        raise GlimpseError(f"{what} {str(folder)!r} cannot be written{how}: it is read-only to this user; {instead}")


def as_created(path: Path):
    """Give path the permissions a file this process creates gets (its umask applied): safetensors writes its files
    readable by their owner alone, which another user loading an export could not read."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_text(path: Path, text: str):
    """Write text to path, making its folder first, through a new file (other processes checking the out_dir never
    read half of it, and a failure halfway leaves the old file whole); a failure (a full disk, no permission) is a
    one-line error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise GlimpseError(f"could not write {path}: {e.strerror or e}") from None
