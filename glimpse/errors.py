"""Errors a user can fix print as one line, with no traceback, and exit non-zero."""

from __future__ import annotations

import sys
from contextlib import contextmanager


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
