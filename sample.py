"""
Generate text from a trained checkpoint, streaming it as it comes.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out-shakespeare-char --ablate=1.0,2.3      # generate without heads 1.0 and 2.3
    python sample.py --out_dir=out-shakespeare-char --head_importance    # each head's cost, on its thumbnail
    python sample.py --out_dir=out-shakespeare-char --mechanism          # queries, keys, values, scores in the viewer
    python sample.py --init_from=gpt2 --start="The meaning of life is" --probe=induction   # pretrained GPT-2
    python sample.py --help

The checkpoint alone is enough: the tokenizer travels inside it, so no data folder is needed. It
reads OUT_DIR/best.pt (the lowest validation loss) when there is one, else ckpt.pt; --checkpoint chooses.
--init_from=gpt2 (gpt2-medium, gpt2-large, gpt2-xl, or a folder holding a Hugging Face GPT-2's
config.json and model.safetensors) samples from pretrained GPT-2 instead, fetched into the Hugging
Face cache on first use. Generation uses a KV cache; past block_size the context window slides
(see glimpse/generation.py).
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import torch

from data.tokenizer import tokenizer_from_spec
from glimpse.ablation import (
    Ablation,
    AblationKind,
    ablation_option,
    check_removals,
    head_means,
    losses_per_head,
    parse_heads,
)
from glimpse.attention import dump_text, dump_window
from glimpse.checkpoint import Which, check_one_model, checkpoint_option, load_trained
from glimpse.config import option, parse_config
from glimpse.errors import GlimpseError, read_utf8, user_errors
from glimpse.files import check_writable
from glimpse.generation import generate
from glimpse.induction import induction_probe
from glimpse.runtime import Device, Dtype, autocast, device_option, dtype_option
from glimpse.tracking import Tracker


@dataclass
class SampleConfig:
    out_dir: str = option("out", "folder of the training run to sample from")
    checkpoint: Which = checkpoint_option()
    init_from: str = option("", "sample from pretrained GPT-2 instead of OUT_DIR: gpt2, gpt2-medium, gpt2-large, "
                                "gpt2-xl (from the Hugging Face Hub or its cache), or a folder holding a Hugging "
                                "Face GPT-2 config.json and model.safetensors (a folder named gpt2 holding one wins "
                                "over the Hub's gpt2)")
    start: str = option("\n", "the prompt (default: a newline), or FILE:path to read it from a file")
    num_samples: int = option(3, "how many samples to draw, one after another")
    max_new_tokens: int = option(500, "tokens to generate per sample")
    temperature: float = option(0.8, "below 1: safer, above 1: wilder; 0: always the likeliest token")
    top_k: int | None = option(200, "sample only among the k likeliest tokens (none: all)")
    top_p: float = option(1.0, "sample only among the likeliest tokens whose probabilities add up to p")
    seed: int = option(1337, "random seed: the same seed gives the same samples")
    device: Device = device_option()
    dtype: Dtype = dtype_option()
    dump_attention: bool = option(True, "write each sample's attention (npz, heads.json, PNGs, HTML viewer)")
    dump_dir: str = option("", "where the dumps go, one sample_<i>/ each (empty: OUT_DIR/attention, or "
                               "attention-NAME/ with --init_from)")
    mechanism: bool = option(False, "also dump how each head computed its weights: queries, keys, values, scores, "
                                    "what it moved from each token, each head's share of the predicted token's logit "
                                    "and the logit lens (docs/attention.md; larger dumps)")
    pngs: bool = option(True, "also draw each layer's heatmap PNGs in the dumps (slow at long texts: "
                              "docs/gpt2.md; the HTML viewer needs none of them)")
    probe: Literal["none", "induction"] = option(
        "none", "induction: also score every head on repeated random tokens (induction) and on the samples' "
        "text (previous-token, sink)"
    )
    ablate: str = option("", "remove these heads (layer.head, comma-separated: 1.0,2.3) while generating and in the "
                             "dumps, to read what the text loses without them")
    ablation: AblationKind = ablation_option("the prompt (for --head_importance and the probe: their own text)")
    head_importance: bool = option(False, "score each sample's text with every head removed alone, and show each "
                                          "head's loss increase on its thumbnail in the viewer")
    wandb_log: bool = option(False, "log the dumps to the wandb run that trained the checkpoint (or a new one)")

    def __post_init__(self):
        check_removals(self.ablate, self.ablation, self.head_importance)
        check_one_model(self.init_from, self.checkpoint)
        if self.init_from and self.out_dir != "out":
            raise ValueError(f"--out_dir names a run to sample from, but --init_from={self.init_from} samples another "
                             "model: give one of them (--dump_dir sets where the dumps go)")
        if self.head_importance and not self.dump_attention:
            raise ValueError("--head_importance shows in the attention dumps: drop --dump_attention=false")
        if self.mechanism and not self.dump_attention:
            raise ValueError("--mechanism goes into the attention dumps: drop --dump_attention=false")
        if self.mechanism and self.ablate:
            raise ValueError("--mechanism shows the intact model's heads at work: drop --ablate (or dump the "
                             "mechanism in a run of its own)")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must not be negative, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or none to turn it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def read_prompt(start: str) -> str:
    """The prompt text: start itself, or the contents of the file that FILE:path names."""
    if not start.startswith("FILE:"):
        try:  # bytes that are not UTF-8 reach Python's argv as lone surrogates, which no tokenizer can encode
            start.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GlimpseError(f"--start is not UTF-8 text (byte {len(start[:e.start].encode('utf-8'))}): give the "
                               "prompt in UTF-8, e.g. converted with iconv, or from a UTF-8 file with "
                               "--start=FILE:path") from None
        return start
    if not start[len("FILE:"):]:  # Path("") is the current folder, which would be named as a folder
        raise GlimpseError("--start=FILE: names no file: give its path, --start=FILE:prompt.txt")
    return read_utf8(Path(start[len("FILE:"):]), "prompt file")


def sample(cfg: SampleConfig, out: TextIO | None = None) -> list[str]:
    """Draw cfg.num_samples continuations of the prompt; stream each to out (stdout); return them."""
    out = out or sys.stdout
    model, state, device, dtype = load_trained(cfg.out_dir, cfg.checkpoint, cfg.device, cfg.dtype, "sampling from",
                                               cfg.init_from)
    tokenizer = tokenizer_from_spec(state["tokenizer"])
    prompt = read_prompt(cfg.start)
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        raise GlimpseError("the prompt is empty: give some text with --start (a newline is fine)")
    idx = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    config, ctx = model.config, autocast(device, dtype)
    heads = None  # the heads --ablate removes, for generation and the dumps alike
    if cfg.ablate:
        value = head_means(model, idx[:, -config.block_size:], 1, ctx) if cfg.ablation == "mean" else None
        if value is not None and idx.size(1) == 1:  # the default prompt, a newline: a "mean" of one output
            print("note: --ablation=mean puts in each removed head's mean output over the prompt, here one token "
                  "(its output at that token alone): give a longer --start for a mean worth the name",
                  file=sys.stderr)
        heads = Ablation.of(parse_heads(cfg.ablate, config.n_layer, config.n_head), config.n_layer, config.n_head,
                             value, device)

    dump_dir = Path(cfg.dump_dir or default_dump_dir(cfg))
    if cfg.dump_attention or cfg.probe != "none":  # found now, not after the samples were generated
        check_writable(dump_dir, "--dump_dir", "give --dump_dir a folder you can write, or --dump_attention=false")
    if cfg.probe == "induction" and config.block_size < 4:
        raise GlimpseError(f"the induction probe repeats at least 2 tokens: block_size {config.block_size} "
                           "is too short for it")
    tracker = Tracker.for_checkpoint(state, "sample", wandb_log=cfg.wandb_log)
    if cfg.dump_attention or cfg.probe != "none":
        clear_earlier_dumps(dump_dir, cfg)
    samples, sample_heads = [], []  # the text and the head metrics of each sample
    for i in range(cfg.num_samples):
        with ctx:
            text, generated = stream_sample(model, tokenizer, prompt, idx, cfg, generator, heads, out)
        samples.append(text)
        if cfg.dump_attention:
            folder, text_ids = dump_dir / f"sample_{i}", [*ids.tolist(), *generated]
            importance = text_importance(model, text_ids, cfg.ablation, ctx) if cfg.head_importance else None
            metrics = dump_text(model, tokenizer, text_ids, len(ids), dump_meta(state, cfg, i), folder, heads=heads,
                                importance=importance, pngs=cfg.pngs, mechanism=cfg.mechanism)
            tracker.log_attention(folder, metrics, prefix=f"sample_{i}")
            sample_heads.append(metrics)
    if cfg.probe == "induction":
        report_probe(model, sample_heads, dump_dir, cfg, out, tokenizer.vocab_size)
    tracker.close()
    if cfg.dump_attention:
        last = f" to sample_{cfg.num_samples - 1}/index.html" if cfg.num_samples > 1 else ""
        block_size = config.block_size
        cut = len(ids) + cfg.max_new_tokens > block_size  # the model attends over block_size tokens at most
        window = f" (each text's last {block_size:,} tokens, the model's block_size)" if cut else ""
        print(f"attention dumps: {dump_dir}/sample_0/index.html{last}{window}", file=sys.stderr)
    return samples


def stream_sample(model, tokenizer, prompt: str, idx: torch.Tensor, cfg: SampleConfig, generator, heads,
                  out: TextIO) -> tuple[str, list[int]]:
    """One continuation of the prompt (its ids idx (1, T)), written to out token by token as it is drawn, then a
    separator line: (the prompt and continuation as text, the continuation's ids)."""
    # a BPE token can end half-way through a UTF-8 character: decode the byte stream incrementally
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, generated = [prompt], []
    out.write(prompt)
    for step in generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator, heads,
                         tokenizer.vocab_size):
        generated.append(step.token[0, 0].item())
        pieces.append(decoder.decode(tokenizer.decode_bytes(generated[-1:])))
        out.write(pieces[-1])
        out.flush()
    pieces.append(decoder.decode(b"", final=True))
    out.write(pieces[-1] + "\n---------------\n")
    out.flush()
    return "".join(pieces), generated


def clear_earlier_dumps(dump_dir: Path, cfg: SampleConfig):
    """Remove what an earlier sample.py left in dump_dir that this run writes no new copy of: when it dumps, the
    dumps of samples past its count, and a probe file when it does not probe. Beside this run's they would pass for
    its own (the probe file holds every head's mass on the samples it was run with). A run with the dumps turned
    off leaves the earlier ones."""
    earlier = sorted((int(folder.name.removeprefix("sample_")), folder) for folder in dump_dir.glob("sample_*")
                     if folder.name.removeprefix("sample_").isdigit() and (folder / "attention.npz").is_file())
    gone = [folder for index, folder in earlier if index >= cfg.num_samples] if cfg.dump_attention else []
    probe = dump_dir / "probe_induction.json"
    if cfg.probe != "induction" and probe.is_file():
        gone.append(probe)
    try:
        for path in gone:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    except OSError as e:
        raise GlimpseError(f"could not remove an earlier run's {path} ({e.strerror or e}): remove it, or give "
                           "--dump_dir another folder") from None
    if gone:
        print(f"removed an earlier run's {', '.join(path.name for path in gone)} from {dump_dir}: a dump folder "
              "holds one run's", file=sys.stderr)


def default_dump_dir(cfg: SampleConfig) -> Path:
    """OUT_DIR/attention for a checkpoint; attention-NAME for a pretrained model, kept apart from any run."""
    if cfg.init_from:  # named after the model's folder (--init_from=. too)
        return Path(f"attention-{Path(os.path.abspath(cfg.init_from)).name or 'model'}")
    return Path(cfg.out_dir) / "attention"


def text_importance(model, text_ids: list[int], ablation: str, ctx) -> dict | None:
    """Each head's loss increase on the dumped window of a sample's text when it alone is removed."""
    window = torch.tensor(dump_window(model, text_ids), device=next(model.parameters()).device)
    if len(window) < 2:
        return None  # one token predicts nothing
    inputs, targets = window[None, :-1], window[None, 1:]  # (1, T - 1) each
    value = head_means(model, inputs, 1, ctx) if ablation == "mean" else None
    every = torch.ones(inputs.size(1), dtype=torch.bool, device=inputs.device)  # (T - 1,): every target scored
    intact, losses = losses_per_head(model, inputs, targets, every, value, ctx, show_progress=True)
    return {"ablation": ablation, "tokens_scored": inputs.size(1), "intact_loss": intact, "loss": losses.tolist(),
            "loss_increase": (losses - intact).tolist()}


def dump_meta(state: dict, cfg: SampleConfig, i: int) -> dict:
    """What a dump was made from: the model, the checkpoint, the sampling settings and any heads removed."""
    settings = {k: getattr(cfg, k) for k in ("start", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p")}
    removed = {"ablated_heads": [f"{layer}.{head}" for layer, head in parse_heads(cfg.ablate)],
               "ablation": cfg.ablation} if cfg.ablate else {}
    return {"model_config": state["model_config"], "iter": state.get("iter_num"), "val_loss": state.get("val_loss"),
            "sampling": settings, "seed": cfg.seed, "sample": i, "tokenizer": state["tokenizer"], **removed}


def report_probe(model, text_heads: list[dict], dump_dir: Path, cfg: SampleConfig, out: TextIO,
                 vocab_size: int | None = None):
    """Print and save every head's induction score, and its previous-token and sink mass on the samples.

    text_heads holds each sample's head metrics (none when the dumps were turned off). The table ends with a
    legend of its columns and a verdict: which heads are induction heads, and what the repeat costs with and
    without them. The random tokens are drawn from the tokenizer's vocab_size (none: the model's).
    """
    probe = induction_probe(model, seed=cfg.seed, ablation=cfg.ablation, vocab_size=vocab_size)
    ceiling = probe["induction_ceiling"]
    out.write(f"\ninduction probe: {probe['n_tokens']} random tokens of {probe['vocab_size']:,} ({probe['draw']}), "
              f"repeated; loss on the first copy {probe['first_copy_loss']:.3f}, on the second "
              f"{probe['second_copy_loss']:.3f}\n")
    out.write("layer head  induction  peak  prev_token  sink  without\n")
    probe["heads"] = []
    for layer, scores in enumerate(probe["induction"]):
        for head, score in enumerate(scores):
            on_text = [t["layers"][layer]["heads"][head] for t in text_heads]  # one per sample
            prev = float(np.mean([h["prev_token"] for h in on_text])) if on_text else None
            sink = float(np.mean([h["first_token"] for h in on_text])) if on_text else None
            peak = probe["peak_offsets"][layer][head]
            without = probe["second_copy_loss_without"][layer][head]
            probe["heads"].append({"layer": layer, "head": head, "induction": score, "peak_offset": peak,
                                   "prev_token_on_samples": prev, "first_token_on_samples": sink,
                                   "second_copy_loss_without": without})
            shown = f"{prev:10.3f}  {sink:5.3f}" if on_text else "         -      -"
            out.write(f"{layer:5d} {head:4d}  {score:9.3f}  {peak:+4d}  {shown}  {without:7.3f}\n")
    samples = "the samples' text" if text_heads else "the samples' text (-: no dumps to read it from)"
    n = probe["n_tokens"]  # at 2 tokens the previous token's offset is +1, induction's
    previous = f"+{n - 1} the query's previous token, " if n > 2 else ""
    out.write(f"  induction   weight on what followed the query token's earlier occurrences; a perfect induction "
              f"head: {ceiling:.3f}\n"
              "  peak        offset weighed most from the query token's place in the first copy: +1 induction, "
              f"0 the same token, {previous}+{n} the query itself\n"
              f"  prev_token  weight on the token just before, on {samples}\n"
              f"  sink        weight on the first token, on {samples}\n"
              f"  without     the second copy's loss with that head removed ({cfg.ablation} ablation); intact "
              f"{probe['second_copy_loss']:.3f}\n"
              f"verdict: {probe['verdict']}\n")
    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / "probe_induction.json").write_text(json.dumps(probe, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None):
    try:
        with user_errors(out_of_memory="ask for less: --mechanism=false (its dump holds every head's q, k and v), "
                                       "a shorter --start, or --device=cpu when on a GPU"):
            cfg = parse_config(SampleConfig, sys.argv[1:] if argv is None else argv,
                               prog="sample.py", description=__doc__, allow_file=False)
            sample(cfg)
    except BrokenPipeError:
        # the reader went away (sample.py | head): stop without a word, as Unix tools do. stdout now points at
        # /dev/null, or Python's own flush of it at exit would fail on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)  # what a shell reports for a tool the closed pipe stopped


if __name__ == "__main__":
    main()
