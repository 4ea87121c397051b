"""
Benchmarks whose figures the README quotes, each the median of several timed runs after a warm-up.

    python bench.py --what=attention_dump                       # a 256-token dump, CPU preset model
    python bench.py --what=attention_dump --tokens=64 --json
    python bench.py --what=train_step                           # ms per step and tokens/s of a preset
    python bench.py --what=sample --preset=config/shakespeare_char.toml --new_tokens=500

attention_dump times each part of what sample.py does per sample when it dumps attention: the
explicit forward that returns every layer's and head's weights, writing attention.npz and
heads.json, drawing the layer PNGs, and writing the HTML viewer. The model has the shape of
--preset (random weights: the cost does not depend on their values) with block_size = --tokens.

train_step times one optimizer step (forward, backward, clipping, AdamW) of the preset's model at
its own batch_size and block_size, on random tokens; sample times GPT.generate (KV cache, sliding
window) producing --new_tokens tokens after a prompt that already fills the context.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from glimpse import render
from glimpse.attention import attention_weights, head_metrics, write_dump
from glimpse.config import option, parse_config, read_toml
from glimpse.errors import user_errors
from model import GPT
from train import TrainConfig, configure_optimizer


@dataclass
class BenchConfig:
    what: Literal["attention_dump", "train_step", "sample"] = option("attention_dump", "which benchmark to run")
    preset: str = option("config/shakespeare_char_cpu.toml", "training preset whose model shape is measured")
    tokens: int = option(256, "attention_dump: context length of the dump (the model's block_size is set to it)")
    new_tokens: int = option(500, "sample: tokens generated per timed run")
    vocab_size: int = option(65, "vocabulary size (65: tiny Shakespeare's characters)")
    repeats: int = option(5, "timed runs; the median is reported")
    threads: int = option(0, "torch threads (0: torch's default)")
    json: bool = option(False, "print JSON instead of a table")

    def __post_init__(self):
        if self.tokens < 1 or self.repeats < 1 or self.threads < 0 or self.new_tokens < 1:
            raise ValueError("tokens, new_tokens and repeats must be at least 1, threads 0 or more")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy imports are not what a user waits for each time
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_attention_dump(cfg: BenchConfig) -> dict:
    train_cfg = TrainConfig(**read_toml(TrainConfig, cfg.preset))
    model_config = train_cfg.model_config(cfg.vocab_size)
    model_config.block_size = cfg.tokens
    torch.manual_seed(0)
    model = GPT(model_config).eval()  # block_size changed, so not preset_model()
    ids = torch.randint(cfg.vocab_size, (cfg.tokens,))
    tokens = [chr(97 + i % 26) for i in ids.tolist()]
    attn, _ = attention_weights(model, ids)
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


def preset_model(cfg: BenchConfig) -> tuple[TrainConfig, GPT]:
    train_cfg = TrainConfig(**read_toml(TrainConfig, cfg.preset))
    torch.manual_seed(0)
    return train_cfg, GPT(train_cfg.model_config(cfg.vocab_size))


def bench_train_step(cfg: BenchConfig) -> dict:
    train_cfg, model = preset_model(cfg)
    model.train()
    optimizer = configure_optimizer(model, train_cfg, torch.device("cpu"))
    x, y = torch.randint(cfg.vocab_size, (2, train_cfg.batch_size, train_cfg.block_size))

    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, cfg.repeats)
    tokens = train_cfg.batch_size * train_cfg.block_size
    return {"model": asdict(model.config), "seconds": {"step": seconds}, "tokens_per_sec": tokens / seconds}


def bench_sample(cfg: BenchConfig) -> dict:
    _, model = preset_model(cfg)
    model.eval()
    prompt = torch.randint(cfg.vocab_size, (1, model.config.block_size))  # the window is full from the start

    def generate():
        for _ in model.generate(prompt, cfg.new_tokens, temperature=1.0, top_k=200,
                                generator=torch.Generator().manual_seed(0)):
            pass

    seconds = median_seconds(generate, cfg.repeats)
    return {"model": asdict(model.config), "seconds": {"generate": seconds}, "tokens_per_sec": cfg.new_tokens / seconds}


def environment(cfg: BenchConfig) -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "repeats": cfg.repeats}


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv, prog="bench.py",
                           description=__doc__, allow_file=False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = {"attention_dump": bench_attention_dump, "train_step": bench_train_step, "sample": bench_sample}
        result = {"benchmark": cfg.what, "config": asdict(cfg), "environment": environment(cfg), **run[cfg.what](cfg)}
        if cfg.json:
            print(json.dumps(result, indent=1))
            return
        m = result["model"]
        print(f"{cfg.what}: {m['n_layer']} layers x {m['n_head']} heads, n_embd {m['n_embd']}, block_size "
              f"{m['block_size']} | torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"median of {cfg.repeats}")
        for name, s in result["seconds"].items():
            print(f"  {name:<22} {s * 1000:9.1f} ms")
        if "tokens_per_sec" in result:
            print(f"  {'tokens per second':<22} {result['tokens_per_sec']:9,.0f}")


if __name__ == "__main__":
    main()
