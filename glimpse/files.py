"""Writing a file whole or not at all: whoever reads it (another process checking an out_dir, a browser
open on a snapshot index, another node preparing the same dataset) sees the old file or the new one,
never half of one."""

from __future__ import annotations

import os
import socket
from pathlib import Path


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
