"""
bench.py's --what=train_step and --what=sample: several presets built as train.py and sample.py build them,
then timed in turn, round after round, so that a machine that speeds up or slows down shifts them all alike.

train_step_fn sets up each preset's Run as train.py does (glimpse/run.py's setup, compiling included) over
a dataset of random tokens and times train.py's own train_step; sample_fn times generation with the KV cache,
or without it. Beside bench.py rather than in glimpse/, since it runs train.py's train_step.
"""

from __future__ import annotations

import io
import tempfile
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.shards import write_dataset
from data.tokenizer import CharTokenizer
from glimpse.config import parse_config
from glimpse.distributed import Distributed
from glimpse.generation import generate, sample_next
from glimpse.run import setup
from glimpse.runtime import resolve_device
from glimpse.timing import interleaved_medians, profile_steps
from glimpse.train_config import TrainConfig
from model import GPT
from train import train_step


def preset_config(preset: str, **settings: str) -> TrainConfig:
    """A preset as train.py reads it: PATH, or PATH:key=value:key=value with command-line overrides
    (and settings after those)."""
    path, *overrides = preset.split(":")
    flags = [f"--{o}" for o in overrides] + [f"--{k}={v}" for k, v in settings.items()]
    return parse_config(TrainConfig, [path, *flags], prog="train.py", description="")


def preset_model(preset: str, vocab_size: int) -> tuple[TrainConfig, GPT]:
    train_cfg = preset_config(preset)
    torch.manual_seed(0)
    return train_cfg, GPT(train_cfg.model_config(vocab_size))


def train_step_fn(preset: str, vocab_size: int, tmp: Path, shards: int = 1):
    """train.py's own train_step on the preset's Run, over a dataset of random tokens in tmp, in `shards` shards."""
    name = f"bench{len(list(tmp.iterdir()))}"
    rng = np.random.default_rng(0)
    chars = "".join(chr(32 + i) for i in range(vocab_size))
    ids = rng.integers(vocab_size, size=200_000)
    train_cfg = preset_config(preset, out_dir=str(tmp / name), data_dir=str(tmp / "data"), dataset=name,
                              wandb_log="false", init_from="scratch")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # their progress lines would mix with ours
        write_dataset(tmp / "data" / name, CharTokenizer(chars), ids, "random tokens", shards=shards)
        run = setup(train_cfg, Distributed())
    lr = train_cfg.learning_rate
    full_size_from = max(train_cfg.batch_warmup_iters, train_cfg.seq_warmup_iters)

    def step():
        run.iter_num = full_size_from  # every timed step past the ramps, at the full size the tokens below count
        train_step(run, lr)

    tokens = train_cfg.batch_size * train_cfg.model.block_size * train_cfg.gradient_accumulation_steps
    setup_info = {"device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."),
                  "optimizer": train_cfg.optimizer, "compile": train_cfg.compile, "batch_size": train_cfg.batch_size,
                  "block_size": train_cfg.model.block_size, "shards": len(run.data.splits["train"]),
                  "flops_per_step": tokens * run.model.flops_per_token(), "peak_flops": run.peak}
    return run.model, setup_info, step, tokens


def sample_fn(preset: str, vocab_size: int, new_tokens: int, cache: bool = True):
    train_cfg, model = preset_model(preset, vocab_size)
    device = resolve_device(train_cfg.device)
    model.to(device).eval()
    prompt = torch.randint(vocab_size, (1, model.config.block_size), device=device)  # a full window from the start

    def generate_cached():
        for _ in generate(model, prompt, new_tokens, temperature=1.0, top_k=200,
                                generator=torch.Generator(device=device).manual_seed(0)):
            pass

    @torch.inference_mode()
    def generate_uncached():
        # what generation costs without a cache: every token runs the last block_size tokens through the network
        generator, tokens = torch.Generator(device=device).manual_seed(0), prompt
        for _ in range(new_tokens):
            logits = model(tokens[:, -model.config.block_size:])[0][:, -1]  # (1, vocab_size)
            tokens = torch.cat((tokens, sample_next(logits, 1.0, 200, generator=generator)), dim=1)

    setup_info = {"device": str(device), "dtype": "float32", "new_tokens": new_tokens, "kv_cache": cache}
    return model, setup_info, generate_cached if cache else generate_uncached, new_tokens


def bench_presets(what: str, presets: list[str], vocab_size: int, repeats: int, *, shard_counts: list[int],
                  new_tokens: int, uncached: bool, profile_dir: str, profiled_steps: int) -> dict:
    """train_step (each preset on each of shard_counts) or sample (with the KV cache and, if uncached, then
    without it) for every preset, interleaved, repeats rounds; speeds relative to the first. With profile_dir,
    train_step then records profiled_steps steps of each there with torch.profiler."""
    with ExitStack() as stack:  # train_step's dataset lives in a temporary folder until the last profile
        if what == "train_step":
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            run_presets = [p for p in presets for _ in shard_counts]
            built = [train_step_fn(p, vocab_size, tmp, shards) for p in presets for shards in shard_counts]
        else:  # each preset with the cache and, with --uncached, then without it
            caches = (True, False) if uncached else (True,)
            run_presets = [p for p in presets for _ in caches]
            built = [sample_fn(p, vocab_size, new_tokens, cache) for p in presets for cache in caches]
        devices = [torch.device(info["device"]) for _, info, _, _ in built]
        seconds = interleaved_medians([fn for _, _, fn, _ in built], devices, repeats)
        runs = []
        for i, (preset, (model, info, fn, tokens), s, device) in enumerate(zip(run_presets, built, seconds, devices)):
            run = {"preset": preset, "model": asdict(model.config), **info, "seconds": s,
                   "tokens_per_sec": tokens / s, "vs_first": seconds[0] / s}
            if what == "train_step":
                run["mfu"] = info["flops_per_step"] / s / info["peak_flops"] if info["peak_flops"] else None
                run["peak_mb"] = step_peak_mb(fn, device)
                if profile_dir:
                    run["profile"] = profile_steps(fn, device, profiled_steps, Path(profile_dir),
                                                   f"{i}_{Path(preset.split(':')[0]).stem}")
            runs.append(run)
        return {"runs": runs}


def step_peak_mb(fn, device: torch.device) -> float | None:
    """The GPU memory allocated at the peak of one more run of fn, in MB (what every preset's run holds resident
    included); None off CUDA, where torch keeps no such count."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20
