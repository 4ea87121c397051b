"""
Tokenizing a corpus on every core (data/prepare.py's reading and writing are around it).

Each document, given whole or in parts, is cut into pieces of about CHUNK_CHARS characters where GPT-2's
pre-tokenizer would start a piece anyway (CUT), so that the pieces tokenized apart give the whole text's
tokens; the pieces are grouped into tasks and tokenized by a pool of processes, at most two tasks each in
flight, and come back in order.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import re
import signal
from collections import deque
from functools import lru_cache

import numpy as np

from data.tokenizer import Tokenizer, tokenizer_from_spec

CHUNK_CHARS = 1 << 20  # a task for a worker: documents (or pieces of a long one) of about 1M characters
# Where a long document is cut into pieces, tokenized apart: just before whitespace that a non-space follows.
# GPT-2's pre-tokenizer starts a piece there, and a text that ends in whitespace ends in the same piece
# ("a \n\nb" is "a", " \n", "\n", "b" whole; cut before the second "\n", both halves keep those pieces).
# Whitespace is Unicode's, as the tokenizer's regex has it: Python's \s also counts \x1c-\x1f.
CUT = re.compile(r"(?=[^\S\x1c-\x1f][\S\x1c-\x1f])")


def cutting() -> list:
    """How documents are cut into pieces: a rerun that cuts them otherwise counts other pieces, so its settings
    must differ."""
    return [CUT.pattern, CHUNK_CHARS]


def pieces(parts):
    """(text, (starts a document, input bytes)) per piece of about CHUNK_CHARS characters: each document,
    given whole or in parts, is cut at the first CUT past every CHUNK_CHARS, so the pieces are the same
    however the document was read."""
    text, start, seek, first, unsent = None, 0, 0, True, 0  # text[start:] of the document is not given out yet
    for part, size, starts_doc in parts:
        if starts_doc:
            if text is not None:
                yield text[start:], (first, unsent)
            text, start, seek, first, unsent = part, 0, 0, True, size
        else:  # keep only what is not given out: a cut is never sought twice in the same text
            text, seek, start, unsent = text[start:] + part, max(seek - start, 0), 0, unsent + size
        while cut := CUT.search(text, max(seek, start + CHUNK_CHARS)):
            yield text[start:cut.start()], (first, unsent)
            start, first, unsent = cut.start(), False, 0
        seek = len(text) - 1  # a cut needs the character after it: the last one is sought again
    if text is not None:
        yield text[start:], (first, unsent)


def skipped(items, n: int, bar):
    """items after the first n, which a resumed run has written already (read again, not tokenized)."""
    for i, item in enumerate(items):
        if i >= n:
            yield item
        else:
            bar.update(item[1][1])


def batched(items):
    """Tasks of about CHUNK_CHARS characters each."""
    task, chars = [], 0
    for item in items:
        task.append(item)
        chars += len(item[0])
        if chars >= CHUNK_CHARS:
            yield task
            task, chars = [], 0
    if task:
        yield task


def tokenized(items, spec: str, dtype: np.dtype, workers: int, start_method: str | None = None):
    """(infos, token arrays) per task, in order; a pool of workers tokenizes with at most 2 tasks each in
    flight, so memory stays bounded however fast the documents are read."""
    tasks = batched(items)
    head = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(head, tasks)
    if workers == 1 or len(head) < 2:  # a small corpus: no processes to start
        for task in tasks:
            yield [info for _, info in task], encode_task(spec, dtype, [text for text, _ in task])
        return
    # Ctrl-C reaches every process of the terminal's group: workers that died of it mid-task would leave the pool's
    # shutdown waiting on them for ever, so they ignore it, and the main process stops them
    pool = multiprocessing.get_context(start_method).Pool(workers, initializer=ignore_interrupts)
    window = deque()
    try:
        for task in tasks:
            texts = [text for text, _ in task]
            window.append(([info for _, info in task], pool.apply_async(encode_joined, (spec, dtype, texts))))
            if len(window) > 2 * workers:
                infos, result = window.popleft()
                yield infos, np.split(*result.get())[:-1]
        while window:
            infos, result = window.popleft()
            yield infos, np.split(*result.get())[:-1]
    except BaseException:  # Ctrl-C, or the reader stopped early: the tasks in flight (a few) finish first
        # Pool.terminate stops reading results at once, and a worker writing one larger than the pipe holds then
        # never lets go of the results' lock, which terminate itself waits for: close and join end it cleanly
        pool.close()
        pool.join()
        raise
    finally:
        pool.terminate()


def ignore_interrupts():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_task(spec: str, dtype: np.dtype, texts: list[str]) -> list[np.ndarray]:
    tokenizer = cached_tokenizer(spec)
    return [tokenizer.encode(text, dtype) for text in texts]


def encode_joined(spec: str, dtype: np.dtype, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """encode_task's arrays as one array and their ends: one object to send back, not one per document."""
    encoded = encode_task(spec, dtype, texts)
    return np.concatenate(encoded), np.cumsum([len(ids) for ids in encoded])


@lru_cache(maxsize=2)
def cached_tokenizer(spec: str) -> Tokenizer:  # once per worker process, not once per task
    return tokenizer_from_spec(json.loads(spec))
