"""
Benchmarks whose figures the README quotes, each the median of several timed runs after a warm-up.

    python bench.py --what=attention_dump                       # a 256-token dump, CPU preset model
    python bench.py --what=attention_dump --tokens=64 --json

attention_dump times each part of what sample.py does per sample when it dumps attention: the
explicit forward that returns every layer's and head's weights, writing attention.npz and
heads.json, drawing the layer PNGs, and writing the HTML viewer. The model has the shape of
--preset (random weights: the cost does not depend on their values) with block_size = --tokens.
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
from train import TrainConfig


@dataclass
class BenchConfig:
    what: Literal["attention_dump"] = option("attention_dump", "which benchmark to run")
    preset: str = option("config/shakespeare_char_cpu.toml", "training preset whose model shape is measured")
    tokens: int = option(256, "context length of the dump (the model's block_size is set to it)")
    vocab_size: int = option(65, "vocabulary size (65: tiny Shakespeare's characters)")
    repeats: int = option(5, "timed runs; the median is reported")
    threads: int = option(0, "torch threads (0: torch's default)")
    json: bool = option(False, "print JSON instead of a table")

    def __post_init__(self):
        if self.tokens < 1 or self.repeats < 1 or self.threads < 0:
            raise ValueError("tokens and repeats must be at least 1, threads 0 or more")


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
    model = GPT(model_config).eval()
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


def environment(cfg: BenchConfig) -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "repeats": cfg.repeats}


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv, prog="bench.py",
                           description=__doc__, allow_file=False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        result = {"benchmark": cfg.what, "config": asdict(cfg), "environment": environment(cfg),
                  **bench_attention_dump(cfg)}
        if cfg.json:
            print(json.dumps(result, indent=1))
            return
        m = result["model"]
        print(f"attention dump: {m['n_layer']} layers x {m['n_head']} heads, n_embd {m['n_embd']}, "
              f"{cfg.tokens} tokens | torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"median of {cfg.repeats}")
        for name, s in result["seconds"].items():
            print(f"  {name:<22} {s * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
