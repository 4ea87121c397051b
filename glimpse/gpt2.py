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

Which of glimpse's tokenizers a folder's tokenizer.json reads, and the tokenizer files export.py writes:
glimpse/hf_tokenizer.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from glimpse.errors import GlimpseError
from glimpse.hf_tokenizer import GPT2_SPEC, folder_tokenizer
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
            pickled = next(folder.glob("pytorch_model*.bin"), None)  # the weights of older uploads, and shards
            if name == "model.safetensors" and pickled:
                raise GlimpseError(f"{folder} holds {pickled.name} but no model.safetensors, the only weights file "
                                   "glimpse reads (it runs no pickled code): save it as safetensors with transformers, "
                                   "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR)")
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
    if not isinstance(hf, dict):
        raise GlimpseError(f"{path} is JSON but not a config (an object of settings): it holds a {type(hf).__name__}")
    kind = hf.get("model_type")
    if kind != "gpt2":
        raise GlimpseError(f"{path} describes a {kind!r} model, not GPT-2 (model_type 'gpt2'): glimpse loads the "
                           "GPT-2 architecture only")
    sizes = {"n_positions": 1024, "vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768}  # GPT-2 small's
    sizes = {key: hf.get(key, default) for key, default in sizes.items()}
    for key, value in sizes.items():  # 2.0 or "2" would fail deep inside torch, or compare with a number
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GlimpseError(f"{path} sets {key}={json.dumps(value)}, which must be a whole number of 1 or more "
                               "(GPT-2 small's: n_positions 1024, vocab_size 50257, n_layer 12, n_head 12, n_embd 768)")
    if not isinstance(hf.get("tie_word_embeddings", True), bool):
        raise GlimpseError(f"{path} sets tie_word_embeddings={json.dumps(hf['tie_word_embeddings'])}, which must be "
                           "true or false")
    n_embd = sizes["n_embd"]
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
        return GPTConfig(block_size=sizes["n_positions"], vocab_size=sizes["vocab_size"], n_layer=sizes["n_layer"],
                         n_head=sizes["n_head"], n_embd=n_embd, dropout=0.0, bias=True,
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    except (ValueError, TypeError) as e:
        raise GlimpseError(f"{path}: {e}") from None


def read_weights(folder: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict of glimpse's GPT (its names, nn.Linear's layout), on the CPU. A file
    without a head is tied, config.tie_embeddings set to say so."""
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
    if not config.tie_embeddings and "lm_head.weight" not in state:
        # two parameters on one matrix would each get their own optimizer state, and export could not save them
        print(f"note: {path} holds no lm_head.weight though {folder / 'config.json'} unties the head "
              "(tie_word_embeddings: false): the head is tied to the token embeddings, as GPT-2's is (transformers "
              "would start it at random)", file=sys.stderr)
        config.tie_embeddings = True
    if config.tie_embeddings:
        state["lm_head.weight"] = state.get("transformer.wte.weight")  # tied: one matrix under both names
    missing = sorted(k for k in expected if state.get(k) is None)
    wrong = [k for k in expected if k not in missing and state[k].shape != expected[k]]
    if missing or wrong:
        what = f"no {missing[0]}" if missing else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not " \
                                                  f"{tuple(expected[wrong[0]])}"
        raise GlimpseError(f"{path} does not match its config.json: {what}")
    return state


def load_pretrained(source: str, device="cpu", block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """GPT-2 from --init_from=source (a Hub name or a folder), in eval mode; a block_size below its learned
    positions (GPT-2's 1,024) keeps the first block_size of them, one at or above keeps them all, and dropout is
    set for finetuning."""
    folder = pretrained_folder(source)
    config = read_config(folder)
    state = read_weights(folder, config)
    if block_size is not None and block_size < config.block_size:
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
    escaped = lambda c: "\\'" if c == "'" else repr(c)[1:-1]  # noqa: E731  (a tab as \t, once)
    shown = " and ".join(f"{what} '{''.join(escaped(c) for c in which)}'"
                         for what, which in (("lacks", lacks), ("adds", adds)) if which)
    raise GlimpseError(f"--init_from={source} reads {len(chars)} characters, and dataset {dataset}'s vocabulary "
                       f"{shown}, so its ids would stand for other characters: prepare the dataset from text of "
                       "exactly the model's characters")


FINETUNE_KEYS = ("block_size", "dropout")  # the model keys a finetuning run sets; the rest are the pretrained model's


def finetune_ignores(config: GPTConfig, asked: GPTConfig, defaults: GPTConfig) -> list[str]:
    """The model keys set for a finetuning run (asked differs from the defaults) that it does not train, as
    key=value: it takes the pretrained model's shape (config). A key set to its default cannot be told from one
    left alone, and is not named."""
    keys = [f.name for f in fields(GPTConfig) if f.name not in (*FINETUNE_KEYS, "vocab_size")]
    return [setting(k, getattr(asked, k)) for k in keys if getattr(asked, k) not in (getattr(defaults, k),
                                                                                      getattr(config, k))]


def setting(key: str, value) -> str:
    """key=value as a flag sets it (qk_norm=false)."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def unexportable(config: GPTConfig) -> list[str]:
    """The settings of config that GPT-2 has no equivalent of, as key=value; empty when it exports."""
    return [setting(k, getattr(config, k)) for k, v in GPT2_SWITCHES.items() if getattr(config, k) != v]


def gpt2_settings() -> str:
    """What a model must have to export, as a flag sets each."""
    return ", ".join(setting(k, v) for k, v in GPT2_SWITCHES.items())


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
