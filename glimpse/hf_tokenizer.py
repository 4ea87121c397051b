"""
Tokenizer files in and out: a Hugging Face tokenizer.json read as the spec of one of glimpse's tokenizers
(a folder to sample from or finetune, glimpse/gpt2.py), and glimpse's tokenizers built as Hugging Face fast
tokenizers (export.py).

A folder's tokenizer.json (or, without one, transformers' GPT-2 tokenizer files vocab.json and merges.txt)
says which of glimpse's tokenizers it reads: GPT-2's BPE, or a char-level vocabulary as export.py writes it.
glimpse takes one only after the folder's own tokenizer (through the tokenizers library, or transformers for
vocab.json and merges.txt) has encoded a sample text to the ids glimpse's gives, so a folder whose tokenizer
glimpse would read differently is refused rather than sampled from with the wrong ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.tokenizer import GPT2_ENCODING, GPT2Tokenizer, tokenizer_from_spec
from glimpse.errors import GlimpseError

GPT2_SPEC = {"kind": "gpt2", "encoding": GPT2_ENCODING}
GPT2_VOCAB_SIZE = 50257
# what a GPT-2 tokenizer.json must encode as glimpse does: accents, emoji, CJK, runs of spaces, tabs, CRLF, digits
# and contractions, each a case GPT-2's pattern splits its own way (a literal <|endoftext|> is not here: see
# hf_tokenizer)
GPT2_PROBE = "ROMEO: Café naïve — déjà vu 😀🎉 中文字符\n\n   runs   of  spaces\t tab\r\nit's 1234 , isn't it ? end "


def folder_tokenizer(folder: Path, vocab_size: int) -> dict:
    """The spec of glimpse's tokenizer that encodes as the folder's own does, or a GlimpseError.

    The folder's tokenizer is its tokenizer.json, or else transformers' GPT-2 tokenizer files (vocab.json and
    merges.txt, as older uploads hold them). A folder with neither holds weights alone, as glimpse/gpt2.py's
    download_hint fetches GPT-2's: GPT-2's BPE when the vocabulary has room for it.
    """
    path = folder / "tokenizer.json"
    if path.is_file():
        theirs = read_tokenizer_json(path)
    elif (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
        path = folder / "vocab.json"  # what the errors below name
        theirs = read_vocab_and_merges(folder)
    elif vocab_size >= GPT2_VOCAB_SIZE:
        return dict(GPT2_SPEC)
    else:
        raise GlimpseError(f"{folder} has no tokenizer.json, and its {vocab_size:,}-token vocabulary is not GPT-2's "
                           f"{GPT2_VOCAB_SIZE:,}: put the tokenizer.json it was trained with beside its weights "
                           "(export.py writes one)")
    vocab = theirs.get_vocab(with_added_tokens=True)  # {token: id}
    spec = None
    if len(vocab) == GPT2_VOCAB_SIZE and vocab.get("<|endoftext|>") == GPT2_VOCAB_SIZE - 1 and vocab == gpt2_vocab():
        spec, probe = dict(GPT2_SPEC), GPT2_PROBE
    elif all(len(t) == 1 for t in vocab):  # one character a token: the ids must be in sorted order, as the probe checks
        chars = "".join(sorted(vocab))
        spec, probe = {"kind": "char", "chars": chars}, chars + chars[::-1] + chars
    if spec is None or not encodes_alike(theirs, spec, probe):
        raise GlimpseError(f"{path} is a tokenizer glimpse cannot reproduce (it reads GPT-2's BPE and char-level "
                           "vocabularies as export.py writes them): put beside the weights the tokenizer.json they "
                           "were trained with, or load the folder with transformers")
    if tokenizer_from_spec(spec).vocab_size > vocab_size:
        raise GlimpseError(f"{path} has {len(vocab):,} tokens, more than the {vocab_size:,} of the model beside it")
    return spec


def read_tokenizer_json(path: Path):
    """A tokenizer.json as a tokenizers.Tokenizer, or a GlimpseError."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GlimpseError(f"reading {path} needs the tokenizers library: pip install tokenizers") from None
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers reports a malformed file as a bare Exception
        raise GlimpseError(f"{path} is not a readable tokenizer file ({str(e).splitlines()[0][:200]})") from None


def read_vocab_and_merges(folder: Path):
    """The tokenizer transformers makes of a folder's vocab.json and merges.txt (and its tokenizer_config.json,
    which may add a prefix space), as a tokenizers.Tokenizer, or a GlimpseError."""
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise GlimpseError(f"{folder} has no tokenizer.json and no {missing[0]} beside its other tokenizer file: "
                           "put the tokenizer files it was trained with beside its weights")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise GlimpseError(f"reading {folder}'s vocab.json and merges.txt needs transformers: pip install "
                           "transformers (or put a tokenizer.json beside them)") from None
    try:
        return AutoTokenizer.from_pretrained(folder).backend_tokenizer
    except Exception as e:  # transformers raises many kinds for files it cannot read
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise GlimpseError(f"{folder}'s vocab.json and merges.txt are not a readable tokenizer ({cause})") from None


def gpt2_vocab() -> dict[str, int]:
    """GPT-2's vocabulary as a Hugging Face tokenizer.json spells it: each token's bytes as GPT-2's stand-in
    characters for bytes (transformers' bytes_to_unicode), and <|endoftext|>."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:
        raise GlimpseError("reading a GPT-2 tokenizer.json needs transformers: pip install transformers") from None
    enc, symbols = GPT2Tokenizer().enc, bytes_to_unicode()  # {byte: character}
    vocab = {"".join(symbols[b] for b in enc.decode_single_token_bytes(i)): i for i in range(enc.eot_token)}
    vocab["<|endoftext|>"] = enc.eot_token
    return vocab


def encodes_alike(theirs, spec: dict, text: str) -> bool:
    """Whether a tokenizers.Tokenizer encodes text (post-processing included) to the ids glimpse's tokenizer of
    spec gives, and decodes them back to text."""
    ids = tokenizer_from_spec(spec).encode(text).tolist()
    try:
        return theirs.encode(text).ids == ids and theirs.decode(ids, skip_special_tokens=False) == text
    except Exception:  # tokenizers raises a bare Exception where it cannot encode text, as for an unknown character
        return False


def hf_tokenizer(spec: dict, block_size: int):
    """The Hugging Face fast tokenizer that gives the ids glimpse's tokenizer of this spec gives.

    GPT-2's BPE is built by transformers' converter for tiktoken encodings from the same merge ranks
    tiktoken reads; the char-level one is a word-level vocabulary of single characters (tokenizers).
    A literal "<|endoftext|>" in text is ordinary text to both, as to glimpse's (data/tokenizer.py):
    split_special_tokens, saved in tokenizer_config.json, keeps transformers from matching it as the
    special token, which stays the end of text that generation stops at.
    """
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise GlimpseError("export.py writes the tokenizer files with transformers: pip install transformers") from None
    if spec["kind"] == "char":
        tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(spec["chars"])}))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character a token
        tokenizer.decoder = decoders.Fuse()  # and back, with nothing between them
        special = {}
    else:
        GPT2Tokenizer()  # fails with the offline hint if tiktoken cannot read the ranks
        from tiktoken_ext.openai_public import r50k_base

        encoding = r50k_base()

        class Ranks(TikTokenConverter):
            def load_tiktoken_bpe(self, url):  # the ranks in hand, not a file to read
                return encoding["mergeable_ranks"]

        tokenizer = Ranks(pattern=encoding["pat_str"]).converted()
        (eot,) = encoding["special_tokens"]
        tokenizer.add_special_tokens([eot])  # <|endoftext|>, id 50256: after the 50,256 ranks
        special = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "split_special_tokens": True}
    # clean_up_tokenization_spaces would drop the space before punctuation on decoding: text must come back whole
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=block_size,
                                   clean_up_tokenization_spaces=False, **special)


def save_tokenizer(tokenizer, folder: Path):
    """tokenizer.save_pretrained(folder), its class named as every transformers since 4 reads it: transformers 5
    names its fast tokenizers' class TokenizersBackend, which transformers 4's AutoTokenizer does not know."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
