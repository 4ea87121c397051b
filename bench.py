"""
Benchmarks whose figures the README quotes, each the median of several timed runs after a warm-up.

    python bench.py --what=attention_dump                       # a 256-token dump, CPU preset model
    python bench.py --what=attention_dump --tokens=64 --json
    python bench.py --what=train_step --preset=config/shakespeare_char_recipe.toml,config/shakespeare_char_speedrun.toml
    python bench.py --what=sample --preset=config/shakespeare_char.toml --new_tokens=500

attention_dump times each part of what sample.py does per sample when it dumps attention: the
explicit forward that returns every layer's and head's weights, writing attention.npz and
heads.json, drawing the layer PNGs, and writing the HTML viewer. The model has the shape of
--preset (random weights: the cost does not depend on their values) with block_size = --tokens.

train_step times train.py's own train_step (drawing the batch, forward, backward, clipping, the
optimizer) on each preset's run as train.py sets it up: its model and flags, device, batch_size,
block_size, gradient accumulation, dtype and optimizer, over a dataset of random tokens; with
compile=true the model is compiled on the warm-up step, outside the timing.
head_importance times eval.py --head_importance (every head removed alone, copies of the windows
batched) beside one intact scoring of the same windows, on --val_tokens random tokens.
sample times GPT.generate (KV cache, sliding window, in float32) on the preset's device, producing
--new_tokens tokens after a prompt that already fills the context; --uncached also times each preset
generating without the cache, the whole window through the network for every token, so that the
cache's speedup comes from one run. On a GPU each timing waits for the device to finish.

--preset takes several presets, comma-separated: they are timed in turn, round after round, so a
machine that speeds up or slows down during the run shifts them all alike, and the table gives each
one's speed relative to the first. Compare ratios from one run; absolute figures drift between runs.
A preset may carry overrides, as train.py's --key=value flags do:
    --preset=config/shakespeare_char_recipe.toml,config/shakespeare_char_recipe.toml:dtype=bfloat16
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data.prepare import write_dataset
from data.tokenizer import CharTokenizer
from eval import EvalConfig
from glimpse import render
from glimpse.ablation import losses_per_head, mean_loss
from glimpse.attention import attention_weights, head_metrics, write_dump
from glimpse.config import option, parse_config
from glimpse.errors import user_errors
from glimpse.evaluation import windows
from glimpse.generation import sample_next
from glimpse.runtime import Distributed, autocast, resolve_device, resolve_dtype, synchronize
from model import GPT
from train import TrainConfig, setup, train_step


@dataclass
class BenchConfig:
    what: Literal["attention_dump", "train_step", "sample", "head_importance"] = option(
        "attention_dump", "which benchmark to run")
    preset: str = option("config/shakespeare_char_cpu.toml",
                         "training preset(s) whose model is measured; several, comma-separated, are compared; "
                         "PATH:key=value:key=value overrides a preset's keys as train.py's --key=value does")
    tokens: int = option(256, "attention_dump: context length of the dump (the model's block_size is set to it)")
    new_tokens: int = option(500, "sample: tokens generated per timed run")
    uncached: bool = option(False, "sample: also time each preset without the KV cache (the whole window through "
                                   "the network for every token), interleaved, for the cache's speedup in one run")
    vocab_size: int = option(65, "vocabulary size (65: tiny Shakespeare's characters)")
    val_tokens: int = option(111_540, "head_importance: tokens scored (111,540: tiny Shakespeare's validation split)")
    repeats: int = option(5, "timed runs; the median is reported")
    threads: int = option(0, "torch threads (0: torch's default)")
    json: bool = option(False, "print JSON instead of a table")

    def __post_init__(self):
        if self.tokens < 1 or self.repeats < 1 or self.threads < 0 or self.new_tokens < 1:
            raise ValueError("tokens, new_tokens and repeats must be at least 1, threads 0 or more")
        if not self.presets:
            raise ValueError("--preset names no preset: give one or more paths, comma-separated")
        missing = [p.split(":")[0] for p in self.presets if not Path(p.split(":")[0]).is_file()]
        if missing:
            raise ValueError(f"no preset file {missing[0]}: give paths such as config/shakespeare_char_cpu.toml")

    @property
    def presets(self) -> list[str]:
        return [p.strip() for p in self.preset.split(",") if p.strip()]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy imports are not what a user waits for each time
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_attention_dump(cfg: BenchConfig) -> dict:
    train_cfg = preset_config(cfg.presets[0])
    model_config = train_cfg.model_config(cfg.vocab_size)
    model_config.block_size = cfg.tokens
    torch.manual_seed(0)
    model = GPT(model_config).eval()  # block_size changed, so not preset_model()
    ids = torch.randint(cfg.vocab_size, (cfg.tokens,))
    tokens = [chr(97 + i % 26) for i in ids.tolist()]
    attn = attention_weights(model, ids)
    meta = {"bench": True}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parts = {
            "weights": lambda: attention_weights(model, ids),
            "npz_and_heads_json": lambda: write_dump(folder, attn, ids.tolist(), tokens, cfg.tokens, meta,
                                                     pictures=False),
            "layer_pngs": lambda: render.write_layer_images(folder, attn, tokens, cfg.tokens),
            "html_viewer": lambda: render.write_viewer(folder / "index.html", attn, tokens, cfg.tokens, meta,
                                                       head_metrics(attn)),
        }
        seconds = {name: median_seconds(fn, cfg.repeats) for name, fn in parts.items()}
    seconds["data_total"] = seconds["weights"] + seconds["npz_and_heads_json"]
    seconds["with_pictures_total"] = sum(seconds[k] for k in parts)
    return {"model": asdict(model_config), "seconds": seconds}


def bench_head_importance(cfg: BenchConfig) -> dict:
    """Every head removed alone (eval.py --head_importance) beside one intact scoring of the same windows."""
    train_cfg, model = preset_model(cfg.presets[0], cfg)
    device = resolve_device(train_cfg.device)
    model.to(device).eval()
    ctx = autocast(device, resolve_dtype(train_cfg.dtype, device))
    tokens = np.random.default_rng(0).integers(cfg.vocab_size, size=cfg.val_tokens + 1).astype(np.uint16)
    inputs, targets = windows(tokens, model.config.block_size, cfg.val_tokens, device)
    scored = torch.ones(model.config.block_size, dtype=torch.bool, device=device)
    intact = lambda: mean_loss(model, inputs, targets, None, ctx, EvalConfig().batch_size)  # noqa: E731
    every_head = lambda: losses_per_head(model, inputs, targets, scored, None, ctx)  # noqa: E731
    seconds = interleaved_medians([intact, every_head], [device, device], cfg.repeats)
    c = model.config
    return {"model": asdict(c), "tokens_scored": inputs.numel(), "scorings": 1 + c.n_layer * c.n_head,
            "seconds": {"intact": seconds[0], "head_importance": seconds[1]}, "ratio": seconds[1] / seconds[0]}


def preset_config(preset: str, **settings: str) -> TrainConfig:
    """A preset as train.py reads it: PATH, or PATH:key=value:key=value with command-line overrides
    (and settings after those)."""
    path, *overrides = preset.split(":")
    flags = [f"--{o}" for o in overrides] + [f"--{k}={v}" for k, v in settings.items()]
    return parse_config(TrainConfig, [path, *flags], prog="train.py", description="")


def preset_model(preset: str, cfg: BenchConfig) -> tuple[TrainConfig, GPT]:
    train_cfg = preset_config(preset)
    torch.manual_seed(0)
    return train_cfg, GPT(train_cfg.model_config(cfg.vocab_size))


def interleaved_medians(fns: list, devices: list[torch.device], repeats: int) -> list[float]:
    """Median seconds of each fn, timing them in turn, round after round, after one warm-up each."""
    for fn in fns:
        fn()  # warm-up: first-call allocations and lazy imports are not what a user waits for each time
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, device, ts in zip(fns, devices, times):
            t0 = time.perf_counter()
            fn()
            synchronize(device)  # GPU work runs asynchronously: wait for it before reading the clock
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def train_step_fn(preset: str, cfg: BenchConfig, tmp: Path):
    """train.py's own train_step on the preset's Run, over a dataset of random tokens in tmp."""
    name = f"bench{len(list(tmp.iterdir()))}"
    rng = np.random.default_rng(0)
    chars = "".join(chr(32 + i) for i in range(cfg.vocab_size))
    ids = rng.integers(cfg.vocab_size, size=200_000)
    train_cfg = preset_config(preset, out_dir=str(tmp / name), data_dir=str(tmp / "data"), dataset=name,
                              wandb_log="false", init_from="scratch")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # their progress lines would mix with ours
        write_dataset(tmp / "data" / name, CharTokenizer(chars), ids, "random tokens")
        run = setup(train_cfg, Distributed())
    lr = train_cfg.learning_rate

    def step():
        train_step(run, lr)

    tokens = train_cfg.batch_size * train_cfg.model.block_size * train_cfg.gradient_accumulation_steps
    setup_info = {"device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
                  "optimizer": train_cfg.optimizer, "compile": train_cfg.compile, "batch_size": train_cfg.batch_size,
                  "block_size": train_cfg.model.block_size}
    return run.model, setup_info, step, tokens


def sample_fn(preset: str, cfg: BenchConfig, cache: bool = True):
    train_cfg, model = preset_model(preset, cfg)
    device = resolve_device(train_cfg.device)
    model.to(device).eval()
    prompt = torch.randint(cfg.vocab_size, (1, model.config.block_size), device=device)  # a full window from the start

    def generate():
        for _ in model.generate(prompt, cfg.new_tokens, temperature=1.0, top_k=200,
                                generator=torch.Generator(device=device).manual_seed(0)):
            pass

    @torch.inference_mode()
    def generate_uncached():
        # what generation costs without a cache: every token runs the last block_size tokens through the network
        generator, tokens = torch.Generator(device=device).manual_seed(0), prompt
        for _ in range(cfg.new_tokens):
            logits = model(tokens[:, -model.config.block_size:])[0][:, -1]  # (1, vocab_size)
            tokens = torch.cat((tokens, sample_next(logits, 1.0, 200, generator=generator)), dim=1)

    setup = {"device": str(device), "dtype": "float32", "new_tokens": cfg.new_tokens, "kv_cache": cache}
    return model, setup, generate if cache else generate_uncached, cfg.new_tokens


def bench_presets(cfg: BenchConfig) -> dict:
    """train_step or sample for every preset of --preset, interleaved; speeds relative to the first."""
    with ExitStack() as stack:
        return _bench_presets(cfg, stack)


def _bench_presets(cfg: BenchConfig, stack: ExitStack) -> dict:
    if cfg.what == "train_step":
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        presets, built = cfg.presets, [train_step_fn(preset, cfg, tmp) for preset in cfg.presets]
    else:  # each preset with the cache and, with --uncached, then without it
        caches = (True, False) if cfg.uncached else (True,)
        presets = [p for p in cfg.presets for _ in caches]
        built = [sample_fn(p, cfg, cache) for p in cfg.presets for cache in caches]
    devices = [torch.device(setup["device"]) for _, setup, _, _ in built]
    seconds = interleaved_medians([fn for _, _, fn, _ in built], devices, cfg.repeats)
    runs = []
    for preset, (model, info, _, tokens), s in zip(presets, built, seconds):
        runs.append({"preset": preset, "model": asdict(model.config), **info, "seconds": s,
                     "tokens_per_sec": tokens / s, "vs_first": seconds[0] / s})
    return {"runs": runs}


def environment(cfg: BenchConfig) -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "repeats": cfg.repeats}


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv, prog="bench.py",
                           description=__doc__, allow_file=False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = {"attention_dump": bench_attention_dump, "head_importance": bench_head_importance}.get(
            cfg.what, bench_presets)
        result = {"benchmark": cfg.what, "config": asdict(cfg), "environment": environment(cfg), **run(cfg)}
        if cfg.json:
            print(json.dumps(result, indent=1))
            return
        print(f"{cfg.what} | torch {torch.__version__}, {torch.get_num_threads()} threads, median of {cfg.repeats}")
        if cfg.what == "head_importance":
            m, s = result["model"], result["seconds"]
            print(f"  {m['n_layer']} layers x {m['n_head']} heads, {result['tokens_scored']:,} tokens in "
                  f"{m['block_size']}-token windows: intact {s['intact'] * 1000:.0f} ms, every head removed alone "
                  f"({result['scorings']} scorings) {s['head_importance'] * 1000:.0f} ms, {result['ratio']:.2f}x")
            return
        if cfg.what == "attention_dump":
            m = result["model"]
            print(f"  {m['n_layer']} layers x {m['n_head']} heads, n_embd {m['n_embd']}, {m['block_size']} tokens")
            for name, s in result["seconds"].items():
                print(f"  {name:<22} {s * 1000:9.1f} ms")
            return
        unit = "ms/step" if cfg.what == "train_step" else "ms/run"
        print(f"  {'model':<20} {'batch':<6} {'device':<7} {'dtype':<9} {'optim':<6} {unit:>8} {'tokens/s':>9} "
              f"{'vs first':>8}  preset")
        for r in result["runs"]:
            m = r["model"]
            shape = f"{m['n_layer']}L {m['n_head']}H {m['n_embd']}C T{m['block_size']}"
            batch = str(r.get("batch_size", 1))
            print(f"  {shape:<20} {batch:<6} {r['device']:<7} {r['dtype']:<9} {r.get('optimizer', '-'):<6} "
                  f"{r['seconds'] * 1000:8.1f} "
                  f"{r['tokens_per_sec']:9,.0f} {r['vs_first']:7.2f}x  {r['preset']}"
                  + ("" if r.get("kv_cache", True) else "  (no KV cache)"))


if __name__ == "__main__":
    main()
