"""Shared fixtures: small generated corpora, a prepared char dataset and a tiny trained checkpoint.

Tests make their own data; the only outside file they use is GPT-2's BPE ranks, copied from
../shared/data when present, else taken as tiktoken takes them: from its cache, or downloaded into it
(tests that need them skip, with tiktoken's error, when that fails too).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tiktoken.load

from data.prepare import PrepareConfig, prepare
from glimpse.config import build
from train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
# metrics.jsonl's wall-clock figures: two runs of the same steps differ in these alone (mfu only with a known peak)
CLOCKED = {"tokens_per_sec", "mfu", "train_seconds"}
GPT2_RANKS = REPO.parent / "shared" / "data" / "gpt2.tiktoken"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # where tiktoken gets them
R50K_CACHE_NAME = hashlib.sha1(R50K_URL.encode()).hexdigest()  # tiktoken's cache names a file by its URL's hash


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


def run_script(*args: str, env: dict | None = None, timeout: int = 300,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command from the repository root (or cwd) as a user would, capturing its output.

    The command runs in a session of its own, which a timeout (or Ctrl-C) stops whole: SIGTERM to every
    process in it, then SIGKILL to those left a minute later. Killing the command alone (subprocess.run's
    way) would leave what it started running, taking the cores the tests after it need: a script's children,
    those under `timeout` (a process group of their own), torchrun's workers (sessions of their own, which
    torchrun stops on SIGTERM).
    """
    full_env = {**os.environ, **(env or {})}
    with subprocess.Popen(list(args), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            stop_session(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop_session(proc: subprocess.Popen):
    """SIGTERM to every process of proc's session, and SIGKILL to those still there once proc has ended or a
    minute has passed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pass


def session_members(sid: int) -> list[int]:
    """The processes of session sid, from /proc (Linux); elsewhere, its leader alone."""
    if not os.path.isdir("/proc"):
        return [sid]
    members = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.getsid(int(name)) == sid:
                members.append(int(name))
        except OSError:  # ended meanwhile
            pass
    return members


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, where tqdm's bars with disable=None show."""

    def isatty(self):
        return True


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_script(sys.executable, *args, **kwargs)


# what a developer's shell may hold that would change what a test sees: a wandb run id every new run would take,
# a torchrun launch that every training run (and subprocess) would join, a Hugging Face cache elsewhere
OUTSIDE_SETTINGS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
                    "HF_DATASETS_OFFLINE")


@pytest.fixture(scope="session", autouse=True)
def own_environment(tmp_path_factory):
    """Tests (and the scripts they start) see none of OUTSIDE_SETTINGS nor any WANDB_ setting, and a Hugging Face
    home of their own, which `datasets` writes its cache and locks into; tests that need a setting set it."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [*OUTSIDE_SETTINGS, *(n for n in os.environ if n.startswith(("WANDB_", "TORCHELASTIC_")))]:
            patch.delenv(name, raising=False)
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


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
    """A tiny model trained once for the whole session: (its config, its last evaluation). Tests that write
    into a run (dumps, studies) copy it first: at the session's end its folder must hold what training made."""
    cfg = tiny_config(data_dir, tmp_path_factory.mktemp("out"))
    last = train(cfg)
    made = files_in(cfg.out_dir)
    yield cfg, last
    now = files_in(cfg.out_dir)
    changed = sorted({name for name, _ in now ^ made})
    assert not changed, f"a test changed the session's trained run, which other tests read: {changed}"


def files_in(folder: str | Path) -> set[tuple[str, str]]:
    """(path under folder, sha256) of every file under folder."""
    return {(str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in Path(folder).rglob("*") if p.is_file()}


def tiktoken_cache() -> Path | None:
    """The folder tiktoken reads its downloads from (the rules of tiktoken/load.py); None when caching is off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(folder) if folder else None  # an empty TIKTOKEN_CACHE_DIR turns tiktoken's cache off


def gpt2_ranks_or_why() -> tuple[Path | None, str]:
    """GPT-2's BPE ranks as a file, or None and why not: the shared copy if there is one, else the file in
    tiktoken's cache, which tiktoken downloads there first when it is not cached, as a user's run would."""
    if GPT2_RANKS.exists():
        return GPT2_RANKS, ""
    try:
        ranks = tiktoken.load.read_file_cached(R50K_URL)  # the cache, else a download into it
    except Exception as e:  # no network, a proxy, a cache folder it cannot write: whatever tiktoken meets
        return None, (f"GPT-2 BPE ranks: no copy at {GPT2_RANKS}, none in tiktoken's cache, and tiktoken could not "
                      f"download them ({type(e).__name__}: {e})")
    cache = tiktoken_cache()
    if cache is not None and (cache / R50K_CACHE_NAME).is_file():
        return cache / R50K_CACHE_NAME, ""
    kept = Path(tempfile.mkdtemp(prefix="gpt2-ranks-")) / R50K_CACHE_NAME  # tiktoken's cache is off
    kept.write_bytes(ranks)
    return kept, ""


def find_gpt2_ranks() -> Path | None:
    """GPT-2's BPE ranks as a file (gpt2_ranks_or_why), or None."""
    return gpt2_ranks_or_why()[0]


@pytest.fixture(scope="session")
def gpt2_ranks_file() -> Path:
    """GPT-2's BPE ranks, looked for (and downloaded) once a session; tests that need them skip without them."""
    ranks, why_not = gpt2_ranks_or_why()
    if ranks is None:
        pytest.skip(why_not)
    return ranks


@pytest.fixture
def gpt2_ranks(gpt2_ranks_file, tmp_path, monkeypatch):
    """Point tiktoken at a cache folder holding GPT-2's BPE ranks, so that no test downloads them again."""
    if gpt2_ranks_file.name == R50K_CACHE_NAME:
        cache = gpt2_ranks_file.parent
    else:
        cache = tmp_path / "tiktoken-cache"  # tiktoken finds a cached file by its URL's hash, not by this name
        cache.mkdir()
        shutil.copy(gpt2_ranks_file, cache / R50K_CACHE_NAME)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache
