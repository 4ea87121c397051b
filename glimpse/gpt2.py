"""
GPT-2 in and out: Hugging Face GPT-2 folders (config.json and model.safetensors) to glimpse models and back.

glimpse's GPT with its default switches is GPT-2's architecture, with its modules under GPT-2's own
names (transformer.h.0.attn.c_attn, ...), so a checkpoint maps onto it name for name. Two things
differ on disk:
  - GPT-2 holds its four projections (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) as Conv1D
    layers, whose weight is (in, out): the transpose of nn.Linear's (out, in);
  - the original upload names its tensors without the "transformer." prefix and keeps the causal
    mask as a buffer (attn.bias); transformers' own save_pretrained writes the prefix and no mask.

Pretrained weights come from the Hugging Face Hub through huggingface_hub, which keeps them in its
cache (HF_HOME; HF_HUB_OFFLINE=1 reads the cache only), and are read with safetensors: a format of
plain tensors, never a pickle. A folder named like a Hub model (./gpt2) that holds config.json and
model.safetensors is read as the folder. Exporting (export.py) writes the same layout back.

A folder's tokenizer.json says which of glimpse's tokenizers it reads: GPT-2's BPE, or a char-level
vocabulary as export.py writes it. glimpse takes one only after the folder's own tokenizer (through the
tokenizers library) has encoded a sample text to the ids glimpse's gives, so a folder whose tokenizer
glimpse would read differently is refused rather than sampled from with the wrong ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from data.tokenizer import GPT2_ENCODING, GPT2Tokenizer, tokenizer_from_spec
from glimpse.errors import GlimpseError
from model import GPT, GPTConfig

PRETRAINED = {  # --init_from names -> Hub repositories
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
FILES = ("config.json", "model.safetensors")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation, as model.py's MLP has it
# the switches GPT-2 has, with its values: a model with anything else has no GPT-2 equivalent
GPT2_SWITCHES = {"pos_encoding": "learned", "norm": "layernorm", "activation": "gelu", "attn_score": "scaled_dot",
                 "qk_norm": False, "logit_softcap": 0.0,
                 "value_embeds": 0, "unet": False, "smear": False}
GPT2_SPEC = {"kind": "gpt2", "encoding": GPT2_ENCODING}
GPT2_VOCAB_SIZE = 50257
# what a GPT-2 tokenizer.json must encode as glimpse does: accents, emoji, CJK, runs of spaces, tabs, CRLF, digits
# and contractions, each a case GPT-2's pattern splits its own way (a literal <|endoftext|> is not here: see
# hf_tokenizer)
GPT2_PROBE = "ROMEO: Café naïve — déjà vu 😀🎉 中文字符\n\n   runs   of  spaces\t tab\r\nit's 1234 , isn't it ? end "


def download_hint(name: str) -> str:
    repo = PRETRAINED.get(name, PRETRAINED["gpt2"])
    return (f"on a machine with a network run `hf download {repo} {' '.join(FILES)} --local-dir DIR`, "
            "then pass --init_from=DIR")


def is_hub_name(source: str) -> bool:
    """Whether --init_from=source names a model on the Hub: one of PRETRAINED, unless a folder of that name holds a
    Hugging Face model (config.json and model.safetensors), which wins: a folder downloaded as ./gpt2 must not send
    an offline run to the Hub's cache, while a training run's out_dir named gpt2 (its own config.json) is no model."""
    return source in PRETRAINED and not all((Path(source) / name).is_file() for name in FILES)


def pretrained_folder(source: str) -> Path:
    """The folder holding config.json and model.safetensors for --init_from=source: a Hub name, or a path."""
    if is_hub_name(source):
        from huggingface_hub import snapshot_download

        try:  # huggingface_hub honours HF_HOME and HF_HUB_OFFLINE itself
            return Path(snapshot_download(PRETRAINED[source], allow_patterns=list(FILES)))
        except Exception as e:  # no network and nothing cached: huggingface_hub raises one of several kinds
            raise GlimpseError(f"{source}'s weights are not in the Hugging Face cache and could not be downloaded "
                               f"({type(e).__name__}): {download_hint(source)}") from None
    folder = Path(source)
    if not folder.is_dir():
        names = ", ".join(PRETRAINED)
        raise GlimpseError(f"--init_from={source!r} is neither a pretrained model ({names}) nor a folder holding a "
                           "Hugging Face GPT-2 config.json and model.safetensors")
    for name in FILES:
        if not (folder / name).is_file():
            raise GlimpseError(f"{folder} has no {name}: a Hugging Face GPT-2 folder holds {' and '.join(FILES)} "
                               f"({download_hint('gpt2')})")
    return folder


def read_config(folder: Path) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config.json, or a GlimpseError naming what is not GPT-2."""
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GlimpseError(f"{path} is not a readable JSON config ({type(e).__name__})") from None
    kind = hf.get("model_type")
    if kind != "gpt2":
        raise GlimpseError(f"{path} describes a {kind!r} model, not GPT-2 (model_type 'gpt2'): glimpse loads the "
                           "GPT-2 architecture only")
    n_embd = hf.get("n_embd", 768)
    differs = {  # settings GPT-2 checkpoints could have but glimpse's GPT does not compute
        "activation_function": hf.get("activation_function", "gelu_new") not in GPT2_GELUS,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is not False,
        "add_cross_attention": hf.get("add_cross_attention", False) is not False,
    }
    if any(differs.values()):
        keys = ", ".join(f"{k}={hf.get(k)!r}" for k, bad in differs.items() if bad)
        raise GlimpseError(f"{path} sets {keys}, which glimpse's GPT-2 does not have")
    try:
        return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                         n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd, dropout=0.0,
                         bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))
    except (ValueError, TypeError) as e:
        raise GlimpseError(f"{path}: {e}") from None


def read_weights(folder: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict of glimpse's GPT (its names, nn.Linear's layout), on the CPU."""
    from safetensors import SafetensorError, safe_open

    path = folder / "model.safetensors"
    with torch.device("meta"):  # the shapes glimpse's GPT of this config has, at no cost in memory
        expected = {name: p.shape for name, p in GPT(config).state_dict().items()}
    state = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped: pages are read on first use
            for name in f.keys():
                ours = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
                if ours in expected:  # not the causal masks that older uploads hold as attn.bias
                    # float32 whatever the file holds: training runs autocast over float32 weights (a float16
                    # gradient cannot be unscaled), and the mechanism's trace feeds float32 back into the model
                    tensor = f.get_tensor(name).float()
                    # a transposed view, not a copy: matmuls read either layout at the same speed
                    state[ours] = tensor.t() if ours.endswith(CONV1D) else tensor
    except (SafetensorError, OSError) as e:
        raise GlimpseError(f"{path} is truncated or not a safetensors file ({str(e).splitlines()[0]})") from None
    if config.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("transformer.wte.weight")  # tied: one matrix under both names
    missing = sorted(k for k in expected if state.get(k) is None)
    wrong = [k for k in expected if k not in missing and state[k].shape != expected[k]]
    if missing or wrong:
        what = f"no {missing[0]}" if missing else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not " \
                                                  f"{tuple(expected[wrong[0]])}"
        raise GlimpseError(f"{path} does not match its config.json: {what}")
    return state


def load_pretrained(source: str, device="cpu", block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """GPT-2 from --init_from=source (a Hub name or a folder), in eval mode; block_size below GPT-2's 1,024
    keeps the first block_size learned positions, and dropout is set for finetuning."""
    folder = pretrained_folder(source)
    config = read_config(folder)
    state = read_weights(folder, config)
    if block_size is not None and block_size != config.block_size:
        if block_size > config.block_size:
            raise GlimpseError(f"block_size={block_size} is longer than {source}'s {config.block_size} learned "
                               "positions: give block_size <= that")
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size].clone()
        config.block_size = block_size
    config.dropout = dropout
    return GPT.with_weights(config, state).to(device).eval()


def pretrained_state(source: str, model: GPT) -> dict:
    """What sample.py and eval.py read from a checkpoint, for a pretrained model: its shape, its tokenizer
    (see pretrained_tokenizer), and no training behind it."""
    return {"model_config": asdict(model.config), "tokenizer": pretrained_tokenizer(source, model.config.vocab_size),
            "train_config": {}, "iter_num": None, "val_loss": None, "pretrained": source}


def pretrained_tokenizer(source: str, vocab_size: int) -> dict:
    """The tokenizer spec of --init_from=source: GPT-2's BPE for a Hub name (only its weights are fetched),
    else the one its folder holds (folder_tokenizer)."""
    return dict(GPT2_SPEC) if is_hub_name(source) else folder_tokenizer(Path(source), vocab_size)


def folder_tokenizer(folder: Path, vocab_size: int) -> dict:
    """The spec of glimpse's tokenizer that encodes as folder/tokenizer.json does, or a GlimpseError.

    A folder without one holds weights alone, as download_hint fetches GPT-2's: GPT-2's BPE when the
    vocabulary has room for it.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        if vocab_size >= GPT2_VOCAB_SIZE:
            return dict(GPT2_SPEC)
        raise GlimpseError(f"{folder} has no tokenizer.json, and its {vocab_size:,}-token vocabulary is not GPT-2's "
                           f"{GPT2_VOCAB_SIZE:,}: put the tokenizer.json it was trained with beside its weights "
                           "(export.py writes one)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GlimpseError(f"reading {path} needs the tokenizers library: pip install tokenizers") from None
    try:
        theirs = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers reports a malformed file as a bare Exception
        raise GlimpseError(f"{path} is not a readable tokenizer file ({str(e).splitlines()[0][:200]})") from None
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


def check_finetune_tokenizer(source: str, folder: Path, data_spec: dict, dataset: str):
    """Finetuning reads the dataset's ids with the pretrained model's tokenizer: they must be the same one."""
    spec = pretrained_tokenizer(source, read_config(folder).vocab_size)
    if spec == data_spec:
        return
    if spec["kind"] == "gpt2":
        raise GlimpseError(f"--init_from={source} reads GPT-2's BPE tokens, but dataset {dataset} is tokenized by "
                           f"{data_spec['kind']}: finetune on a GPT-2 BPE dataset, such as --dataset=shakespeare")
    chars = spec["chars"]
    if data_spec["kind"] != "char":
        raise GlimpseError(f"--init_from={source} reads {len(chars)} characters, one token each, but dataset {dataset} "
                           f"is tokenized by {data_spec['kind']}: finetune on a char-level dataset of those characters")
    lacks, adds = sorted(set(chars) - set(data_spec["chars"])), sorted(set(data_spec["chars"]) - set(chars))
    shown = " and ".join(f"{what} {''.join(repr(c)[1:-1] for c in which)!r}"
                         for what, which in (("lacks", lacks), ("adds", adds)) if which)
    raise GlimpseError(f"--init_from={source} reads {len(chars)} characters, and dataset {dataset}'s vocabulary "
                       f"{shown}, so its ids would stand for other characters: prepare the dataset from text of "
                       "exactly the model's characters")


def unexportable(config: GPTConfig) -> list[str]:
    """The settings of config that GPT-2 has no equivalent of, as key=value; empty when it exports."""
    return [f"{k}={getattr(config, k)}" for k, v in GPT2_SWITCHES.items() if getattr(config, k) != v]


def hf_config(config: GPTConfig, eos_token_id: int | None) -> dict:
    """config.json of the GPT2LMHeadModel that computes what a glimpse model of this config computes."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "use_cache": True, "dtype": "float32"}


def hf_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layout, in float32; biases a bias=False model
    lacks are zeros (adding 0 changes nothing), and a tied head is written once, as transformer.wte."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # safetensors stores a tensor once; transformers ties it back on load
    out = {}
    for name, tensor in state.items():
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D) else tensor.contiguous()
        if not model.config.bias and name.endswith(".weight") and not name.endswith(("wte.weight", "wpe.weight",
                                                                                     "lm_head.weight")):
            width = tensor.shape[0]  # nn.Linear (out, in) and LayerNorm (C,): out is the bias's length
            out[name.removesuffix(".weight") + ".bias"] = torch.zeros(width)
    return out


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
