"""
Export a trained glimpse model to a Hugging Face GPT-2 folder, for transformers and the tools built on it.

    python export.py --out_dir=out-shakespeare-char --to=hf-shakespeare-char
    python -c "import transformers as t; print(t.pipeline('text-generation', 'hf-shakespeare-char')('ROMEO:'))"

writes into DIR:
  config.json              a GPT2LMHeadModel's config
  model.safetensors        the weights under GPT-2's names and in its layout, float32
  generation_config.json   GPT-2's end-of-text token (none for a char model), and max_length = n_positions
                           (block_size): without it transformers' text-generation pipeline asks for 256
                           new tokens, past the learned positions of a shorter model
                           (generate(max_new_tokens=...) then logs that max_new_tokens takes precedence,
                           which it does)
  tokenizer.json, tokenizer_config.json
                           the checkpoint's own tokenizer, GPT-2's BPE or the char-level one
so that AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load it, and
glimpse too (sample.py --init_from=DIR, train.py --init_from=DIR). transformers' GPT-2 has no window
that slides past its learned positions, as glimpse's generate has: there the prompt and the new tokens
fit in block_size together. It reads OUT_DIR/best.pt when there is one, else ckpt.pt (--checkpoint
chooses).

Only GPT-2's architecture exports: learned positions, LayerNorm, GELU and scaled dot-product scores, and
none of qk_norm, logit_softcap, value_embeds, unet or smear, with or without biases (a model without them
exports zeros, which add nothing) and with a tied or untied head. Writing the tokenizer needs transformers
(pip install transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from glimpse.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    Which,
    checkpoint_option,
    chosen_checkpoint,
    describe,
    load_checkpoint,
    model_from_checkpoint,
)
from glimpse.config import option, parse_config
from glimpse.errors import GlimpseError, user_errors
from glimpse.files import as_created
from glimpse.gpt2 import gpt2_settings, hf_config, hf_weights, unexportable
from glimpse.hf_tokenizer import hf_tokenizer, save_tokenizer
from glimpse.run_folder import is_run_config
from model import GPTConfig


@dataclass
class ExportConfig:
    out_dir: str = option("out", "folder of the training run to export")
    checkpoint: Which = checkpoint_option()
    to: str = option("", "the folder to write the Hugging Face model to (new or empty, unless --overwrite; never "
                         "the run's own --out_dir)")
    overwrite: bool = option(False, "write into a folder that already holds files, replacing those of the same names")

    def __post_init__(self):
        if not self.to:
            raise ValueError("give the folder to write with --to=DIR")


def check_destination(dest: Path, overwrite: bool, out_dir: Path):
    """The folder export writes (resolved): new, empty, or --overwrite given; never the run's own folder."""
    if dest == out_dir.resolve():
        raise GlimpseError(f"--to {str(dest)!r} is the run's own --out_dir, whose config.json is the run's: give "
                           "another folder")
    if not dest.name:
        raise GlimpseError(f"--to {str(dest)!r} is the filesystem's root; give a folder")
    if dest.exists() and not dest.is_dir():
        raise GlimpseError(f"--to {str(dest)!r} is a file; give a folder")
    if any((dest / name).exists() for name in (CHECKPOINT_NAME, BEST_NAME)) or is_run_config(dest / "config.json"):
        raise GlimpseError(f"--to {str(dest)!r} holds a training run (its checkpoints or its config.json, which the "
                           "export's would replace): give another folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise GlimpseError(f"--to {str(dest)!r} already holds files; give a new folder, or --overwrite to replace them")


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint as a Hugging Face GPT-2 folder at cfg.to; return that folder."""
    from safetensors.torch import save_file

    try:
        dest = Path(cfg.to).resolve()  # "." and "sub/.." name the folder itself: its temporary sibling needs its name
    except RuntimeError as e:  # Python before 3.13 says a symlink loop this way
        raise GlimpseError(f"--to={cfg.to}: {e}") from None
    check_destination(dest, cfg.overwrite, Path(cfg.out_dir))
    path = chosen_checkpoint(cfg.out_dir, cfg.checkpoint)
    state = load_checkpoint(path, "cpu", mmap=True)
    config = GPTConfig(**state["model_config"])
    if unexportable(config):
        raise GlimpseError(f"{path} has {', '.join(unexportable(config))}, which GPT-2 has no equivalent of: only "
                           f"models with {gpt2_settings()} export")
    print(f"exporting {describe(path, state)}", file=sys.stderr)
    tokenizer = hf_tokenizer(state["tokenizer"], config.block_size)  # before anything is written: it may fail
    model = model_from_checkpoint(state)

    # everything goes to a folder beside dest first, so that a failure half-way leaves dest as it was
    tmp = dest.with_name(f".{dest.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(hf_weights(model), tmp / "model.safetensors", metadata={"format": "pt"})
        as_created(tmp / "model.safetensors")
        hf = hf_config(config, tokenizer.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"],
                      "max_length": hf["n_positions"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        save_tokenizer(tokenizer, tmp)
        dest.mkdir(parents=True, exist_ok=True)
        written = sorted(f.name for f in tmp.iterdir())
        # a folder where a file goes would stop the replacing half-way, old files and new side by side
        if folders := [name for name in written if (dest / name).is_dir()]:
            raise GlimpseError(f"{dest / folders[0]} is a folder, where the export writes a file: remove it or give "
                               "another --to")
        for name in written:
            os.replace(tmp / name, dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {dest}: {', '.join(written)}", file=sys.stderr)  # not what else --overwrite left there
    return dest


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(ExportConfig, sys.argv[1:] if argv is None else argv,
                           prog="export.py", description=__doc__, allow_file=False)
        export(cfg)


if __name__ == "__main__":
    main()
