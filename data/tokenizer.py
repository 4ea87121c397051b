"""
Tokenizers: text <-> token ids, and a small JSON spec that rebuilds each one.

The spec is written into meta.json by data/prepare.py and into every checkpoint by train.py, so a
checkpoint alone is enough to sample from: no data folder, no pickle.

- char: one token per distinct character of the corpus (the vocabulary is the sorted characters).
- gpt2: GPT-2's byte-level BPE through tiktoken (its r50k_base ranks, which give GPT-2's ids).
"""

from __future__ import annotations

import re

import numpy as np

from glimpse.errors import GlimpseError

GPT2_ENCODING = "r50k_base"  # tiktoken's file of GPT-2's merge ranks; same ids as its "gpt2" encoding


# half of a UTF-16 surrogate pair: a str can hold one alone (JSON's "\ud83d", a text cut between the halves), but no
# UTF-8 text can, so no tokenizer encodes it
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def unencodable(text: str, e: UnicodeEncodeError) -> Exception:
    """What encoding text failed with, said in one line: the lone surrogate it holds, and where."""
    if not (lone := LONE_SURROGATE.search(text)):
        return e
    return GlimpseError(f"the text holds a lone surrogate \\u{ord(lone.group()):04x} at character {lone.start()}, "
                        "half of a pair that no UTF-8 text can hold: remove it, or join it to its other half")


def no_token(i: int) -> str:
    """What a dump names an id the tokenizer has no token for: a model's vocabulary padded past its tokenizer's
    (GPT-2's 50,257 to 50,304) has logits for them, and the logit lens or a prediction can land there."""
    return f"⟨no-token-{i}⟩"  # no spaces: a dump shows a token's spaces as ␣


class CharTokenizer:
    """Each character is a token; ids follow the sorted order of the vocabulary's characters."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise GlimpseError("a char vocabulary must not repeat characters")
        self.chars = "".join(sorted(chars))
        self.vocab_size = len(self.chars)
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def spec(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        """Token ids of text, as an array of dtype; a character outside the vocabulary is an error."""
        try:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point each
        except UnicodeEncodeError as e:
            raise unencodable(text, e) from None
        ids = np.searchsorted(self._codepoints, codes)
        ids_clipped = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codepoints[ids_clipped] != codes
        if unknown.any():
            missing = "".join(sorted({chr(c) for c in codes[unknown]}))
            # a shell passes "\n" on as a backslash and an n: say so where a newline was meant
            typed = ("; the text holds \\n as two characters, a backslash and an n, not a newline (in bash write "
                     "$'...\\n...', or give sample.py the text in a file, --start=FILE:path)"
                     if "\\" in missing and "\\n" in text else "")
            raise GlimpseError(
                f"characters not in this model's vocabulary: {missing!r}; a char-level model can only read the "
                f"characters it was trained on{typed}"
            )
        return ids.astype(dtype)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def token_strings(self, ids) -> list[str]:
        """The text of each token on its own (for attention dumps; no_token's name past the vocabulary)."""
        return [self.chars[i] if 0 <= i < self.vocab_size else no_token(i) for i in ids]


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens; <|endoftext|> is 50256)."""

    def __init__(self):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(GPT2_ENCODING)
        except Exception as e:  # tiktoken downloads the ranks on first use; offline that fails
            raise GlimpseError(
                f"could not load GPT-2's BPE ranks through tiktoken ({type(e).__name__}); offline, copy "
                "a local r50k_base.tiktoken into $TIKTOKEN_CACHE_DIR as docs/corpora.md shows"
            ) from None
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    @property
    def spec(self) -> dict:
        return {"kind": "gpt2", "encoding": GPT2_ENCODING}

    def encode(self, text: str, dtype=np.int64) -> np.ndarray:
        # a literal "<|endoftext|>" stays ordinary text, as in encode_ordinary, in a corpus and a prompt alike: the
        # model sees 50256 only where prepare.py puts it, between documents (the exported tokenizer agrees:
        # docs/gpt2.md); the numpy buffer skips building a Python list of every id
        try:
            return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(dtype)
        except UnicodeEncodeError as e:
            raise unencodable(text, e) from None

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        # one BPE token can hold part of a UTF-8 character, so streaming works on bytes
        return self.enc.decode_bytes(list(ids))

    def token_strings(self, ids) -> list[str]:
        """The text of each token on its own; bytes that are part of a UTF-8 character show as \\xNN (no_token's
        name past the vocabulary)."""
        return [self.enc.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")
                if 0 <= i < self.vocab_size else no_token(i) for i in ids]


Tokenizer = CharTokenizer | GPT2Tokenizer


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    """Rebuild the tokenizer that a meta.json or checkpoint describes."""
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise GlimpseError(f"unknown tokenizer kind {kind!r}; this version knows 'char' and 'gpt2'")
