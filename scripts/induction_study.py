"""
Do induction heads form? Train small models on generated repeated sequences, then probe every head.

    python scripts/induction_study.py                          # 1 and 2 layers, 3000 steps each: ~2 minutes
    python scripts/induction_study.py --layers=2 --max_iters=8000 --pos_encoding=learned

An induction head needs two layers: a head in layer 0 copies each token's predecessor into its
position, and a head in a later layer matches the current token against those copies, attends to
the position just after the earlier occurrence and copies what it finds. The text trained on mixes
two kinds of document, in characters from an alphabet of --vocab symbols (64 by default):

    repeats  a random string of min_len to max_len characters, then (after 0 to max_gap random ones) the
             same string again: the second copy can be predicted only by finding where the current
             character occurred before
    chains   each character is, with probability chain_p, a fixed permutation of the character two
             back (else random): predicting it needs the previous character, which rewards a
             previous-token head in layer 0 on its own

The script writes the text, prepares it as a char-level dataset, trains one model per --layers with
train.py, and probes each at several lengths of repeated random string (sample.py --probe=induction
does the same at one length): every head's induction score, the offset it weighs most from the
query token's earlier occurrence (+1 is induction, 0 the token itself), and the loss on the first and
second copy. Everything goes to --out, the tables also to induction_study.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable

import numpy as np  # noqa: E402

from data.prepare import PrepareConfig, prepare  # noqa: E402
from glimpse.attention import induction_probe  # noqa: E402
from glimpse.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint  # noqa: E402
from glimpse.config import option, parse_config  # noqa: E402
from glimpse.errors import GlimpseError, user_errors  # noqa: E402
from train import TrainConfig, train  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@#"  # 64 symbols, one token each


@dataclass
class StudyConfig:
    out: str = option("out-induction-study", "folder for the text, the dataset, every run and the table")
    layers: str = option("1,2", "layer counts to train, comma-separated: one model each")
    n_head: int = option(1, "heads per layer")
    n_embd: int = option(64, "width of the residual stream")
    vocab: int = option(64, "symbols in the generated text, at most 64")
    pos_encoding: str = option("rope", "position encoding of every model")
    max_iters: int = option(3000, "training steps per model")
    batch_size: int = option(16, "sequences of 64 characters per step")
    chars: int = option(2_000_000, "characters of generated text (the last 10% is validation)")
    chain_share: float = option(0.4, "fraction of documents that are chains; the rest are repeats")
    chain_p: float = option(0.5, "in a chain, the chance that a character follows from the one two back")
    min_len: int = option(8, "shortest random string of a repeats document")
    max_len: int = option(24, "longest random string of a repeats document")
    max_gap: int = option(0, "random characters between a string and its copy: 0 to max_gap, so that no one "
                             "distance back finds the copy's source")
    probe_tokens: str = option("8,16,24,32", "lengths of the probe's random string (repeated once), comma-separated: "
                                            "an induction head scores at every length, a head that looks a fixed "
                                            "distance back only near that distance")
    seed: int = option(0, "seeds the text and every model")

    def __post_init__(self):
        counts = self.layers.split(",")
        if not all(c.isdigit() and int(c) > 0 for c in counts):
            raise ValueError(f"layers must be positive whole numbers separated by commas, got {self.layers!r}")
        if not 2 <= self.min_len <= self.max_len:
            raise ValueError(f"need 2 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if self.max_gap < 0 or self.chars < 1000:
            raise ValueError(f"need max_gap >= 0 and chars >= 1000, got max_gap={self.max_gap}, chars={self.chars}")
        if not (0 <= self.chain_share <= 1 and 0 <= self.chain_p <= 1):
            raise ValueError("chain_share and chain_p are probabilities: keep them in [0, 1]")
        if not 2 <= self.vocab <= len(ALPHABET):
            raise ValueError(f"vocab must be 2 to {len(ALPHABET)}, got {self.vocab}")
        lengths = self.probe_tokens.split(",")
        if not all(n.isdigit() and 2 <= int(n) <= 32 for n in lengths):
            raise ValueError(f"probe_tokens must be whole numbers from 2 to 32 (the models see 64 characters), "
                             f"got {self.probe_tokens!r}")


def make_documents(cfg: StudyConfig) -> list[str]:
    """repeats and chains documents, cfg.chars characters in all (or one document more)."""
    rng = np.random.default_rng(cfg.seed)
    symbols = np.array(list(ALPHABET[: cfg.vocab]))
    perm = rng.permutation(cfg.vocab)  # the chains' fixed map from a character to the one two later
    docs, total = [], 0
    while total < cfg.chars:
        if rng.random() < cfg.chain_share:
            ids = list(rng.integers(cfg.vocab, size=2))
            for _ in range(rng.integers(8, 33) - 2):
                ids.append(perm[ids[-2]] if rng.random() < cfg.chain_p else rng.integers(cfg.vocab))
            doc = "".join(symbols[ids])
        else:
            string = "".join(symbols[rng.integers(cfg.vocab, size=rng.integers(cfg.min_len, cfg.max_len + 1))])
            gap = "".join(symbols[rng.integers(cfg.vocab, size=rng.integers(cfg.max_gap + 1))])
            doc = string + gap + string
        docs.append(doc)
        total += len(doc)
    return docs


def train_config(cfg: StudyConfig, n_layer: int, out: Path) -> TrainConfig:
    """The training settings of the model with n_layer layers: Muon, no dropout, 64-character windows."""
    return TrainConfig(
        out_dir=str(out / f"{n_layer}-layer"), dataset="repeats", data_dir=str(out / "data"), device="cpu",
        dtype="float32", seed=cfg.seed, batch_size=cfg.batch_size, block_size=64, max_iters=cfg.max_iters,
        lr_decay_iters=cfg.max_iters, eval_interval=cfg.max_iters, eval_iters=10, log_interval=100,
        attn_log_interval=0, n_layer=n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=False,
        pos_encoding=cfg.pos_encoding, optimizer="muon", muon_lr=0.02, learning_rate=3e-3, min_lr=3e-4,
        warmup_iters=50, weight_decay=0.0, beta2=0.95)


def run(cfg: StudyConfig) -> list[dict]:
    out = Path(cfg.out)
    for n_layer in map(int, cfg.layers.split(",")):
        try:  # every model's settings are checked before anything is written or trained
            train_config(cfg, n_layer, out)
        except ValueError as e:
            raise GlimpseError(str(e)) from None
        if checkpoint_path(out / f"{n_layer}-layer").exists():
            raise GlimpseError(f"{out / f'{n_layer}-layer'} holds a trained model already: "
                               "pick another --out, or delete that folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GlimpseError(f"cannot make the study's folder --out={out} ({e.strerror}): "
                           "give a folder you can write") from None
    text_path = out / "repeats.txt"
    text_path.write_text("".join(make_documents(cfg)), encoding="utf-8")  # back to back
    prepare(PrepareConfig(dataset="repeats", input=str(text_path), tokenizer="char", data_dir=str(out / "data")))
    rows = []
    for n_layer in map(int, cfg.layers.split(",")):
        run_dir = out / f"{n_layer}-layer"
        train(train_config(cfg, n_layer, out))
        model = model_from_checkpoint(load_checkpoint(checkpoint_path(run_dir)))
        rows.append({"n_layer": n_layer, "probes": [probe_summary(model, int(n), cfg.seed)
                                                    for n in cfg.probe_tokens.split(",")]})
    (out / "induction_study.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


def probe_summary(model, n: int, seed: int) -> dict:
    """induction_probe at one length, with each head's peak offset (where it looks most, +1: induction)."""
    probe = induction_probe(model, n_tokens=n, batch=32, seed=seed)
    heads = [{"layer": layer, "head": head, "induction": score,
              "peak_offset": probe["peak_offsets"][layer][head],
              "peak_weight": max(probe["offsets"][layer][head])}
             for layer, scores in enumerate(probe["induction"]) for head, score in enumerate(scores)]
    return {"n_tokens": n, "first_copy_loss": probe["first_copy_loss"],
            "second_copy_loss": probe["second_copy_loss"], "heads": heads}


def report(rows: list[dict]) -> str:
    """One table per model: a column per probe length, a row per head plus the two losses."""
    lines = []
    for row in rows:
        probes = row["probes"]
        lines.append(f"{str(row['n_layer']) + ' layer(s), probe length':<34}" + "".join(
            f"{p['n_tokens']:>14d}" for p in probes))
        lines.append(f"{'  loss, first / second copy':<34}" + "".join(
            f"{p['first_copy_loss']:>7.2f} /{p['second_copy_loss']:>5.2f}" for p in probes))
        for i, head in enumerate(probes[0]["heads"]):
            cells = "".join(f"{p['heads'][i]['induction']:>8.2f} ({p['heads'][i]['peak_offset']:+3d})" for p in probes)
            label = f"  layer {head['layer']} head {head['head']} induction (peak)"
            lines.append(f"{label:<34}" + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(StudyConfig, sys.argv[1:] if argv is None else argv, prog="scripts/induction_study.py",
                           description=__doc__, allow_file=False)
        print(report(run(cfg)))


if __name__ == "__main__":
    main()
