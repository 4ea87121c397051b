"""
Benchmarks whose figures README.md and docs/ quote, each the median of several timed runs after a warm-up.

    python bench.py --what=attention_dump                       # a 256-token dump, CPU preset model
    python bench.py --what=attention_dump --tokens=64 --json
    python bench.py --what=train_step --preset=config/shakespeare_char_recipe.toml,config/shakespeare_char_speedrun.toml
    python bench.py --what=sample --preset=config/shakespeare_char.toml --new_tokens=500

attention_dump times each part of what sample.py does per sample when it dumps attention: the
explicit forward that returns every layer's and head's weights, writing attention.npz and
heads.json, drawing the layer PNGs, and writing the HTML viewer; and, unless --mechanism=false,
the trace of sample.py --mechanism (glimpse/mechanism.py) and its whole dump, with the sizes of its
files. The model has the shape of --preset (random weights: the cost does not depend on their
values) with block_size = --tokens.

train_step times train.py's own train_step (drawing the batch, forward, backward, clipping, the
optimizer) on each preset's run as train.py sets it up: its model and flags, device, batch_size,
block_size, gradient accumulation, dtype and optimizer, over a dataset of random tokens; with
compile=true the model is compiled as train.py's setup compiles it, before any timed step. On a GPU
the table adds MFU (against the GPU's dense peak, as train.py reports it) and the peak memory of a step;
--profile=DIR then records a few steps of each preset with torch.profiler and says where a step's time
went (matmuls, attention, cross-entropy, norms, Triton kernels, copies, the optimizer's step):
    python bench.py --what=train_step --vocab_size=50257 --profile=p \\
        --preset=config/gpt2_124m.toml,config/gpt2_124m.toml:compile=false
prepare times python data/prepare.py --tokenizer=gpt2 (every core) on a generated corpus of 8 .jsonl
files (or one .txt file: --corpus_files=txt) beside a plain single-process tiktoken loop over the same
documents, and reports the peak resident memory of the largest prepare.py process.
head_importance times eval.py --head_importance (every head removed alone, copies of the windows
batched) beside one intact scoring of the same windows, on --val_tokens random tokens.
sample times glimpse.generation.generate (KV cache, sliding window, in float32) on the preset's device, producing
--new_tokens tokens after a prompt that already fills the context; --uncached also times each preset
generating without the cache, the whole window through the network for every token, so that the
cache's speedup comes from one run. On a GPU each timing waits for the device to finish.

--preset takes several presets, comma-separated: they are timed in turn (bench_presets.py), round after
round, so a machine that speeds up or slows down during the run shifts them all alike, and the table
gives each one's speed relative to the first. Compare ratios from one run; absolute figures drift
between runs.
A preset may carry overrides, as train.py's --key=value flags do:
    --preset=config/shakespeare_char_recipe.toml,config/shakespeare_char_recipe.toml:dtype=bfloat16
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bench_presets import bench_presets, preset_config, preset_model
from glimpse import render, viewer
from glimpse.ablation import losses_per_head, mean_loss
from glimpse.attention import attention_weights, head_metrics, write_dump
from glimpse.comparisons import gpt2_beside_transformers, prepare_beside_tiktoken
from glimpse.config import option, parse_config
from glimpse.errors import GlimpseError, user_errors
from glimpse.evaluation import BATCH_SIZE, windows
from glimpse.files import nearest_existing
from glimpse.mechanism import trace
from glimpse.runtime import runtime
from glimpse.timing import interleaved_medians, median_seconds, peak_resident_bytes, resident_bytes
from model import GPT, GPTConfig

# the settings only some benchmarks read (their --help lines start with those benchmarks' names)
READ_BY = {"tokens": ("attention_dump",), "shape": ("attention_dump",), "pngs": ("attention_dump",),
           "mechanism": ("attention_dump",), "new_tokens": ("sample", "gpt2"), "uncached": ("sample",),
           "prompt_tokens": ("gpt2",), "gpt2_n_layer": ("gpt2",), "val_tokens": ("head_importance",),
           "shards": ("train_step",), "corpus_mb": ("prepare",), "corpus_files": ("prepare",),
           "profile": ("train_step",), "profile_steps": ("train_step",)}


@dataclass
class BenchConfig:
    what: Literal["attention_dump", "train_step", "sample", "head_importance", "gpt2", "prepare"] = option(
        "attention_dump", "which benchmark to run")
    preset: str = option("config/shakespeare_char_cpu.toml",
                         "training preset(s) whose model is measured; several, comma-separated, are compared; "
                         "PATH:key=value:key=value overrides a preset's keys as train.py's --key=value does; "
                         "the model is the preset's shape with random weights (its init_from is not read)")
    tokens: int = option(256, "attention_dump: context length of the dump (the model's block_size is set to it)")
    shape: Literal["preset", "gpt2"] = option(
        "preset", "attention_dump: the first preset's model, or GPT-2 small's shape (12 layers of 12 heads, 768 wide, "
        "GPT-2's vocabulary; random weights)")
    pngs: bool = option(True, "attention_dump: also time the layer PNGs (seconds per layer at 1,024 tokens)")
    mechanism: bool = option(True, "attention_dump: also time and size the dump sample.py --mechanism writes (q, k, v, "
                                   "scores, what each head moved, logit attribution, logit lens)")
    new_tokens: int = option(500, "sample and gpt2: tokens generated per timed run")
    uncached: bool = option(False, "sample: also time each preset without the KV cache (the whole window through "
                                   "the network for every token), interleaved, for the cache's speedup in one run")
    prompt_tokens: int = option(64, "gpt2: tokens of the prompt the models generate after")
    gpt2_n_layer: int = option(12, "gpt2: layers of the GPT-2-shaped model (12: GPT-2 small)")
    vocab_size: int = option(65, "vocabulary size of the presets' models, which no preset sets (65: tiny "
                                 "Shakespeare's characters; 50257 for GPT-2's BPE)")
    val_tokens: int = option(111_540, "head_importance: tokens scored (111,540: tiny Shakespeare's validation split)")
    shards: str = option("1", "train_step: shard counts of the random-token dataset, comma-separated; each preset is "
                              "timed on each (1,16: one file beside 16 shards, interleaved)")
    corpus_mb: int = option(80, "prepare: megabytes of generated text (at 20 or less, starting "
                                "Python and the pool is a large share)")
    corpus_files: Literal["jsonl", "txt"] = option("jsonl", "prepare: the generated documents as 8 .jsonl files, or "
                                                            "joined in one .txt file (one document, read in blocks)")
    profile: str = option("", "train_step: a folder to write each preset's torch.profiler record to, after the timing "
                              "(the ops by self time on the device, a Chrome trace); the table gains the time per "
                              "step by kind of op. '' for none")
    profile_steps: int = option(3, "train_step: steps profiled per preset with --profile")
    repeats: int = option(5, "timed runs; the median is reported")
    threads: int = option(0, "torch threads (0: torch's default)")
    json: bool = option(False, "print JSON instead of a table")

    def __post_init__(self):
        for name in ("tokens", "new_tokens", "repeats", "profile_steps", "gpt2_n_layer", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (torch's default) or more, got {self.threads}")
        for name, readers in READ_BY.items():  # a setting the chosen benchmark does not read would go unnoticed
            if self.what not in readers and getattr(self, name) != BenchConfig.__dataclass_fields__[name].default:
                raise ValueError(f"--{name} is read by --what={' and --what='.join(readers)} only, not by "
                                 f"--what={self.what}: drop it")
        if self.profile:  # refused now rather than after the timing, when the profiles are written
            folder = Path(self.profile)
            existing = nearest_existing(folder)
            if not existing.is_dir():
                where = "" if existing == folder else f" is inside {existing}, which"
                raise ValueError(f"--profile={self.profile}{where} is a file: give a folder to write the profiles to")
        if not self.presets:
            raise ValueError("--preset names no preset: give one or more paths, comma-separated")
        missing = [p.split(":")[0] for p in self.presets if not Path(p.split(":")[0]).is_file()]
        if missing:
            raise ValueError(f"no preset file {missing[0]}: give paths such as config/shakespeare_char_cpu.toml")
        _ = self.shard_counts  # a malformed list fails here, before anything is built
        if self.what == "gpt2" and self.prompt_tokens + self.new_tokens > 1024:  # both models' learned positions
            raise ValueError(f"--what=gpt2 generates within GPT-2's 1,024 positions: prompt_tokens + new_tokens is "
                             f"{self.prompt_tokens + self.new_tokens}; lower either")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {self.vocab_size}")
        if self.corpus_mb < 1:
            raise ValueError(f"corpus_mb must be at least 1, got {self.corpus_mb}")

    @property
    def presets(self) -> list[str]:
        return [p.strip() for p in self.preset.split(",") if p.strip()]

    @property
    def shard_counts(self) -> list[int]:
        try:
            counts = [int(n) for n in self.shards.split(",") if n.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            raise ValueError(f"shards must be positive whole numbers, comma-separated (1,16), got {self.shards!r}")
        return counts


def bench_attention_dump(cfg: BenchConfig) -> dict:
    if cfg.shape == "gpt2":
        model_config = GPTConfig(block_size=cfg.tokens, vocab_size=50257)  # GPT-2 small: 12 x 12 heads, 768 wide
    else:
        model_config = replace(preset_config(cfg.presets[0]).model_config(cfg.vocab_size), block_size=cfg.tokens)
    torch.manual_seed(0)
    model = GPT(model_config).eval()  # block_size changed, so not preset_model()
    ids = torch.randint(model_config.vocab_size, (cfg.tokens,))
    tokens = [chr(97 + i % 26) for i in ids.tolist()]
    meta = {"bench": True}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def dump():  # what sample.py does per sample with --pngs=false: the weights, the data and the viewer
            write_dump(folder / "dump", attention_weights(model, ids), ids.tolist(), tokens, cfg.tokens, meta,
                       pngs=False)

        before = resident_bytes()
        dump()  # first: the process's peak memory is then the dump's
        peak = peak_resident_bytes()
        sizes = {f.name: f.stat().st_size for f in (folder / "dump").iterdir()}
        attn = attention_weights(model, ids)
        parts = {
            "weights": lambda: attention_weights(model, ids),
            "npz_and_heads_json": lambda: write_dump(folder, attn, ids.tolist(), tokens, cfg.tokens, meta,
                                                     pictures=False),
            "html_viewer": lambda: viewer.write_viewer(folder / "index.html", attn, tokens, cfg.tokens, meta,
                                                       head_metrics(attn)),
            "dump_without_pngs": dump,
        }
        if cfg.pngs:
            parts["layer_pngs"] = lambda: render.write_layer_images(folder, attn, tokens, cfg.tokens)
        if cfg.mechanism:
            def mechanism_dump():  # sample.py --mechanism --pngs=false: the trace, the data and the viewer
                traced = trace(model, ids.tolist(), tokens)
                write_dump(folder / "mechanism", traced.weights, ids.tolist(), tokens, cfg.tokens, meta, pngs=False,
                           mechanism=traced)

            mechanism_dump()
            peak_mechanism = peak_resident_bytes()
            sizes.update({f"mechanism_{f.name}": f.stat().st_size for f in (folder / "mechanism").iterdir()})
            parts.update({"trace": lambda: trace(model, ids.tolist(), tokens), "mechanism_dump_without_pngs":
                          mechanism_dump})
        seconds = {name: median_seconds(fn, cfg.repeats) for name, fn in parts.items()}
        if cfg.pngs:
            sizes["layer_pngs"] = sum(f.stat().st_size for f in folder.glob("layer_*.png"))
    seconds["data_total"] = seconds["weights"] + seconds["npz_and_heads_json"]
    memory = None if before is None else {"before_dump_mb": before / 2**20, "peak_mb": peak / 2**20,
                                          "peak_beyond_before_mb": (peak - before) / 2**20}
    if memory is not None and cfg.mechanism:  # the process's peak after the plain dump and then the mechanism's
        memory["peak_with_mechanism_mb"] = peak_mechanism / 2**20
    return {"model": asdict(model_config), "seconds": seconds, "megabytes": {k: v / 1e6 for k, v in sizes.items()},
            "memory": memory}


def bench_head_importance(cfg: BenchConfig) -> dict:
    """Every head removed alone (eval.py --head_importance) beside one intact scoring of the same windows."""
    train_cfg, model = preset_model(cfg.presets[0], cfg.vocab_size)
    device, _, ctx = runtime(train_cfg.device, train_cfg.dtype)
    model.to(device).eval()
    if cfg.val_tokens < model.config.block_size:  # windows' own message names eval.py's remedy
        raise GlimpseError(f"--val_tokens={cfg.val_tokens} is fewer than one window of the preset's block_size "
                           f"({model.config.block_size}): give at least that many")
    tokens = np.random.default_rng(0).integers(cfg.vocab_size, size=cfg.val_tokens + 1)  # int64: any vocabulary
    inputs, targets = windows(tokens, model.config.block_size, cfg.val_tokens, device)
    scored = torch.ones(model.config.block_size, dtype=torch.bool, device=device)
    intact = lambda: mean_loss(model, inputs, targets, None, ctx, BATCH_SIZE)  # noqa: E731
    every_head = lambda: losses_per_head(model, inputs, targets, scored, None, ctx)  # noqa: E731
    seconds = interleaved_medians([intact, every_head], [device, device], cfg.repeats)
    c = model.config
    return {"model": asdict(c), "tokens_scored": inputs.numel(), "scorings": 1 + c.n_layer * c.n_head,
            "seconds": {"intact": seconds[0], "head_importance": seconds[1]}, "ratio": seconds[1] / seconds[0]}


def environment(cfg: BenchConfig) -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "repeats": cfg.repeats}


def report(cfg: BenchConfig, result: dict):
    """Print a benchmark's result as a table."""
    print(f"{cfg.what} | torch {torch.__version__}, {torch.get_num_threads()} threads, median of {cfg.repeats}")
    if cfg.what == "head_importance":
        m, s = result["model"], result["seconds"]
        print(f"  {m['n_layer']} layers x {m['n_head']} heads, {result['tokens_scored']:,} tokens in "
              f"{m['block_size']}-token windows: intact {s['intact'] * 1000:.0f} ms, every head removed alone "
              f"({result['scorings']} scorings) {s['head_importance'] * 1000:.0f} ms, {result['ratio']:.2f}x")
        return
    if cfg.what == "prepare":
        t = result["tokens_per_sec"]
        files = "8 .jsonl files" if result["layout"] == "jsonl" else "one .txt file"
        print(f"  {result['megabytes']:.0f} MB in {files}, {result['tokens']:,} tokens: prepare.py "
              f"{t['prepare']:,.0f} tokens/s, one-process tiktoken loop {t['loop']:,.0f} tokens/s "
              f"({result['speedup']:.2f}x); peak memory "
              f"{result['peak_mb']:,.0f} MB")
        return
    if cfg.what == "gpt2":
        m, s, x = result["model"], result["seconds"], result["speedup"]
        print(f"  GPT-2 shape {m['n_layer']} layers x {m['n_head']} heads, {m['n_embd']} wide; max |logit diff| "
              f"imported {result['max_abs_logit_diff']['imported']:.1e}, exported "
              f"{result['max_abs_logit_diff']['exported']:.1e}")
        print(f"  load to first token: glimpse {s['glimpse_load_to_first_token']:.2f} s, transformers "
              f"{s['transformers_load_to_first_token']:.2f} s ({x['load']:.2f}x)")
        print(f"  greedy sampling, {cfg.new_tokens} tokens after {cfg.prompt_tokens}: glimpse "
              f"{result['tokens_per_sec']['glimpse']:.1f} tok/s, transformers "
              f"{result['tokens_per_sec']['transformers']:.1f} tok/s ({x['sample']:.2f}x), same tokens: "
              f"{result['same_tokens']}")
        return
    if cfg.what == "attention_dump":
        m = result["model"]
        print(f"  {m['n_layer']} layers x {m['n_head']} heads, n_embd {m['n_embd']}, {m['block_size']} tokens")
        for name, s in result["seconds"].items():
            print(f"  {name:<28} {s * 1000:9.1f} ms")
        for name, mb in result["megabytes"].items():
            print(f"  {name:<28} {mb:9.1f} MB")
        if result["memory"]:
            memory = result["memory"]
            print(f"  peak memory {memory['peak_mb']:,.0f} MB, "
                  f"{memory['peak_beyond_before_mb']:,.0f} MB beyond the model's process before the dump"
                  + (f"; {memory['peak_with_mechanism_mb']:,.0f} MB with the mechanism's dump"
                     if "peak_with_mechanism_mb" in memory else ""))
        return
    unit = "ms/step" if cfg.what == "train_step" else "ms/run"
    steps = cfg.what == "train_step"
    print(f"  {'model':<20} {'batch':<6} {'device':<7} {'dtype':<9} {'optim':<6} {unit:>8} {'tokens/s':>9} "
          + (f"{'MFU':>6} {'peak MB':>8} " if steps else "") + f"{'vs first':>8}  preset")
    for r in result["runs"]:
        m = r["model"]
        shape = f"{m['n_layer']}L {m['n_head']}H {m['n_embd']}C T{m['block_size']}"
        batch = str(r.get("batch_size", 1))
        mfu = f"{r['mfu']:6.1%}" if r.get("mfu") is not None else f"{'-':>6}"
        peak = f"{r['peak_mb']:8,.0f}" if r.get("peak_mb") is not None else f"{'-':>8}"
        print(f"  {shape:<20} {batch:<6} {r['device']:<7} {r['dtype']:<9} {r.get('optimizer', '-'):<6} "
              f"{r['seconds'] * 1000:8.1f} "
              f"{r['tokens_per_sec']:9,.0f} " + (f"{mfu} {peak} " if steps else "") + f"{r['vs_first']:7.2f}x  "
              f"{r['preset']}"
              + (f" ({r['shards']} shards)" if len(cfg.shard_counts) > 1 else "")
              + ("" if r.get("kv_cache", True) else "  (no KV cache)"))
    for r in result["runs"]:
        if "profile" in r:
            print(profile_lines(r, cfg.profile))


def profile_lines(r: dict, folder: str) -> str:
    """A preset's profile as two lines: where a step's time went by kind of op, and the files with the detail."""
    p = r["profile"]
    kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in sorted(p["kinds_ms"].items(), key=lambda kv: -kv[1]) if ms)
    return (f"  {r['preset']}: {p['wall_ms']:.1f} ms a step profiled, {p['clock'].upper()} busy {p['busy_ms']:.1f} ms:"
            f" {kinds}; the optimizer's step {p['optimizer_step_ms']:.1f} ms (inclusive)\n"
            f"    {', '.join(str(Path(folder) / f) for f in p['files'])}")


def main(argv: list[str] | None = None):
    with user_errors(out_of_memory="ask for less: a smaller batch or model in --preset (PATH:batch_size=8), "
                                   "fewer --tokens or --new_tokens"):
        cfg = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv, prog="bench.py",
                           description=__doc__, allow_file=False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = {"attention_dump": bench_attention_dump, "head_importance": bench_head_importance,
               "gpt2": lambda c: gpt2_beside_transformers(c.gpt2_n_layer, c.prompt_tokens, c.new_tokens, c.repeats),
               "prepare": lambda c: prepare_beside_tiktoken(c.corpus_mb, c.repeats, c.corpus_files)}.get(
            cfg.what, lambda c: bench_presets(c.what, c.presets, c.vocab_size, c.repeats, shard_counts=c.shard_counts,
                                              new_tokens=c.new_tokens, uncached=c.uncached, profile_dir=c.profile,
                                              profiled_steps=c.profile_steps))
        result = {"benchmark": cfg.what, "config": asdict(cfg), "environment": environment(cfg), **run(cfg)}
        if cfg.json:
            print(json.dumps(result, indent=1))
        else:
            report(cfg, result)


if __name__ == "__main__":
    main()
