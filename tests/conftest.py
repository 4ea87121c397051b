"""Shared fixtures: small generated corpora, a prepared char dataset and a tiny trained checkpoint.

Tests make their own data; the only outside file they use is GPT-2's BPE ranks, copied from
../shared/data when present, else read from tiktoken's own cache if it holds them (tests that need them
skip with a reason otherwise).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from data.prepare import PrepareConfig, prepare
from glimpse.config import build
from train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
GPT2_RANKS = REPO.parent / "shared" / "data" / "gpt2.tiktoken"
R50K_CACHE_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # tiktoken's cache key for r50k_base


def make_corpus(n_lines: int = 1500, seed: int = 0) -> str:
    """A small made-up play: regular enough that a tiny model learns it in a few hundred steps."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    words = "the a my thy love night day sweet fair moon sun light dark heart sleep dream".split()
    lines = []
    for _ in range(n_lines):
        lines.append(f"{rng.choice(names)}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + ".\n")
    return "\n".join(lines)


def train_config(**settings) -> TrainConfig:
    """A TrainConfig from flat keys, model keys (n_layer=...) included, as a TOML file or flags give them."""
    return build(TrainConfig, settings)


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A model and run small enough for a test: about 30k parameters, a few seconds on CPU."""
    settings = dict(
        out_dir=str(out_dir), dataset="tiny", data_dir=str(data_dir), device="cpu", dtype="float32",
        batch_size=16, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
        max_iters=150, eval_interval=50, eval_iters=5, log_interval=10, warmup_iters=10,
        lr_decay_iters=150, learning_rate=3e-3, min_lr=3e-4,
    )
    settings.update(overrides)
    return train_config(**settings)


def run_script(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command from the repository root as a user would, capturing its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(list(args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_script(sys.executable, *args, **kwargs)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file) -> Path:
    """A data folder holding the char-level dataset 'tiny' made from the generated play."""
    root = tmp_path_factory.mktemp("data")
    prepare(PrepareConfig(dataset="tiny", input=str(corpus_file), data_dir=str(root)))
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir) -> tuple[TrainConfig, dict]:
    """A tiny model trained once for the whole session: (its config, its last evaluation)."""
    cfg = tiny_config(data_dir, tmp_path_factory.mktemp("out"))
    return cfg, train(cfg)


def tiktoken_cache() -> Path | None:
    """The folder tiktoken reads its downloads from (the rules of tiktoken/load.py); None when caching is off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(folder) if folder else None  # an empty TIKTOKEN_CACHE_DIR turns tiktoken's cache off


def find_gpt2_ranks() -> Path | None:
    """GPT-2's BPE ranks: the shared copy if there is one, else the file tiktoken has cached, else None."""
    if GPT2_RANKS.exists():
        return GPT2_RANKS
    cache = tiktoken_cache()
    if cache is not None and (cache / R50K_CACHE_NAME).is_file():
        return cache / R50K_CACHE_NAME
    return None


@pytest.fixture
def gpt2_ranks(tmp_path, monkeypatch):
    """Point tiktoken at a local copy of GPT-2's BPE ranks, so no download is attempted."""
    ranks = find_gpt2_ranks()
    if ranks is None:
        cache = tiktoken_cache()
        cached = cache / R50K_CACHE_NAME if cache else "tiktoken's cache (off: TIKTOKEN_CACHE_DIR is empty)"
        pytest.skip(f"GPT-2 BPE ranks found neither at {GPT2_RANKS} nor at {cached}")
    if ranks == GPT2_RANKS:
        cache = tmp_path / "tiktoken-cache"  # tiktoken finds a cached file by its URL's hash, not by this name
        cache.mkdir()
        shutil.copy(GPT2_RANKS, cache / R50K_CACHE_NAME)
    else:
        cache = ranks.parent
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache
