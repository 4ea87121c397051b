"""
Do induction heads form? Train small models on generated repeated sequences, then probe every head.

    python scripts/induction_study.py                          # 1 and 2 layers, 1500 steps each: ~1 minute
    python scripts/induction_study.py --layers=2 --pos_encoding=rope     # the 2-layer model, rotary positions

An induction head needs two layers: a head in layer 0 copies each token's predecessor into its
position, and a head in a later layer matches the current token against those copies, attends to
the position just after the earlier occurrence and copies what it finds. The text trained on is
made of documents of --doc_len characters from an alphabet of --vocab symbols (64 by default), each
a fresh random string of min_len to max_len characters written over and over:

    kQ7xbkQ7xbkQ7xbkQ7xb...    Zp#1rTe9Zp#1rTe9Zp#1rTe9...

After its first copy, every character of a document can be predicted by finding where the current
character occurred before and reading what followed: induction. The string's length changes from
document to document, so no single distance back finds the source of the copy, and a head that
looks a fixed distance back (the shortcut a model takes when every copy sits at the same distance)
does not pay.

The script writes the text, prepares it as a char-level dataset, trains one model per --layers with
train.py, and probes each at several lengths of repeated random string (sample.py --probe=induction
does the same at one length): every head's induction score, the offset it weighs most from the
query token's earlier occurrence (+1 is induction, 0 the token itself), and the loss on the first and
second copy. For two layers it also removes heads (zero ablation, glimpse/ablation.py): the
second copy's loss without the induction head, without the layer-0 previous-token head, and without
an idle head, each picked by where it looks. Everything goes to --out, the tables also to
induction_study.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable

import numpy as np  # noqa: E402

from data.prepare import PrepareConfig, prepare  # noqa: E402
from glimpse.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint  # noqa: E402
from glimpse.config import build, option, parse_config  # noqa: E402
from glimpse.errors import GlimpseError, user_errors  # noqa: E402
from glimpse.induction import induction_probe  # noqa: E402
from train import TrainConfig, train  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@#"  # 64 symbols, one token each


@dataclass
class StudyConfig:
    out: str = option("out-induction-study", "folder for the text, the dataset, every run and the table")
    layers: str = option("1,2", "layer counts to train, comma-separated: one model each")
    n_head: int = option(1, "heads per layer")
    n_embd: int = option(64, "width of the residual stream")
    vocab: int = option(64, "symbols in the generated text, at most 64")
    pos_encoding: str = option("learned", "position encoding of every model")
    max_iters: int = option(1500, "training steps per model")
    batch_size: int = option(32, "sequences of 64 characters per step")
    learning_rate: float = option(1e-3, "AdamW's peak learning rate")
    chars: int = option(1_000_000, "characters of generated text (the last 10% is validation)")
    doc_len: int = option(512, "characters per document: one random string repeated to this length")
    min_len: int = option(4, "shortest random string")
    max_len: int = option(32, "longest random string: at most 32, so that two copies fit in a 64-character window")
    probe_tokens: str = option("8,16,24,32", "lengths of the probe's random string (repeated once), comma-separated: "
                                            "an induction head scores at every length, a head that looks a fixed "
                                            "distance back only near that distance")
    seed: int = option(0, "seeds the text and every model")

    def __post_init__(self):
        self.layer_counts(), self.probe_lengths()  # a malformed list fails here, before anything is written
        if not 2 <= self.min_len <= self.max_len <= min(32, self.doc_len // 2):
            raise ValueError(f"need 2 <= min_len <= max_len <= 32 (two copies in the models' 64-character window) "
                             f"and max_len <= doc_len / 2, got min_len={self.min_len}, max_len={self.max_len}, "
                             f"doc_len={self.doc_len}")
        if self.max_iters < 1:  # each model's one eval is at its last step
            raise ValueError(f"max_iters must be at least 1, got {self.max_iters}")
        if self.chars < 1000:
            raise ValueError(f"chars must be at least 1000, got {self.chars}")
        if not 2 <= self.vocab <= len(ALPHABET):
            raise ValueError(f"vocab must be 2 to {len(ALPHABET)}, got {self.vocab}")

    def layer_counts(self) -> list[int]:
        counts = self.layers.split(",")
        if not all(c.isascii() and c.isdigit() and int(c) > 0 for c in counts):
            raise ValueError(f"layers must be positive whole numbers separated by commas, got {self.layers!r}")
        if len(set(map(int, counts))) < len(counts):  # the second model would find the first one's out_dir
            raise ValueError(f"layers names a layer count more than once: {self.layers!r}")
        return [int(c) for c in counts]

    def probe_lengths(self) -> list[int]:
        lengths = self.probe_tokens.split(",")
        if not all(n.isascii() and n.isdigit() and 2 <= int(n) <= 32 for n in lengths):
            raise ValueError(f"probe_tokens must be whole numbers from 2 to 32 (the models see 64 characters), "
                             f"got {self.probe_tokens!r}")
        return [int(n) for n in lengths]


def make_documents(cfg: StudyConfig) -> list[str]:
    """Documents of cfg.doc_len characters, each a fresh random string repeated; cfg.chars characters in all,
    rounded up to whole documents."""
    rng = np.random.default_rng(cfg.seed)
    symbols = np.array(list(ALPHABET[: cfg.vocab]))
    docs = []
    for _ in range(-(-cfg.chars // cfg.doc_len)):
        string = symbols[rng.integers(cfg.vocab, size=rng.integers(cfg.min_len, cfg.max_len + 1))]  # (length,)
        docs.append("".join(np.resize(string, cfg.doc_len)))  # (doc_len,): the string over and over
    return docs


def train_config(cfg: StudyConfig, n_layer: int, out: Path) -> TrainConfig:
    """The training settings of the model with n_layer layers: AdamW, no dropout, 64-character windows."""
    return build(TrainConfig, dict(
        out_dir=str(out / f"{n_layer}-layer"), dataset="repeats", data_dir=str(out / "data"), device="cpu",
        dtype="float32", seed=cfg.seed, batch_size=cfg.batch_size, block_size=64, max_iters=cfg.max_iters,
        lr_decay_iters=cfg.max_iters, eval_interval=cfg.max_iters, eval_iters=10, log_interval=100,
        attn_log_interval=0, n_layer=n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=False,
        pos_encoding=cfg.pos_encoding, optimizer="adamw", learning_rate=cfg.learning_rate,
        min_lr=cfg.learning_rate / 10, warmup_iters=50, weight_decay=0.1, beta2=0.99))


def run(cfg: StudyConfig) -> list[dict]:
    out = Path(cfg.out)
    for n_layer in cfg.layer_counts():
        train_config(cfg, n_layer, out)  # every model's settings are checked before anything is written or trained
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
    for n_layer in cfg.layer_counts():
        run_dir = out / f"{n_layer}-layer"
        train(train_config(cfg, n_layer, out))
        model = model_from_checkpoint(load_checkpoint(checkpoint_path(run_dir)))
        rows.append({"n_layer": n_layer, "probes": [probe_summary(model, n, cfg.seed) for n in cfg.probe_lengths()]})
    (out / "induction_study.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


def probe_summary(model, n: int, seed: int) -> dict:
    """induction_probe at one length, with each head's peak offset (where it looks most, +1: induction) and
    the second copy's loss without it; for two layers or more, the circuit's removals side by side."""
    probe = induction_probe(model, n_tokens=n, batch=32, seed=seed, ablation="zero")
    heads = [{"layer": layer, "head": head, "induction": score,
              "prev_token_on_probe": probe["prev_token_on_probe"][layer][head],
              "peak_offset": probe["peak_offsets"][layer][head],
              "peak_weight": max(probe["offsets"][layer][head]),
              "second_copy_loss_without": probe["second_copy_loss_without"][layer][head]}
             for layer, scores in enumerate(probe["induction"]) for head, score in enumerate(scores)]
    summary = {"n_tokens": n, "draw": probe["draw"], "induction_ceiling": probe["induction_ceiling"],
               "first_copy_loss": probe["first_copy_loss"], "second_copy_loss": probe["second_copy_loss"],
               "heads": heads, "verdict": probe["verdict"]}
    if model.config.n_layer >= 2:
        summary["circuit"] = circuit(heads)
    return summary


def circuit(heads: list[dict]) -> dict:
    """The heads chosen by where they look, then what removing each costs the second copy.

    The induction head: a later layer's head with the highest induction score; the previous-token
    head: the layer-0 head that weighs the token before most; an idle head: of the others, the one
    with the least of either. Each is named by its attention alone, so its removal's cost is evidence,
    not the criterion it was picked by.
    """
    induction = max((h for h in heads if h["layer"] >= 1), key=lambda h: h["induction"])
    prev = max((h for h in heads if h["layer"] == 0), key=lambda h: h["prev_token_on_probe"])
    others = [h for h in heads if h is not induction and h is not prev]
    idle = min(others, key=lambda h: h["induction"] + h["prev_token_on_probe"]) if others else None
    name = lambda h: f"{h['layer']}.{h['head']}"  # noqa: E731
    roles = {"induction": induction, "prev_token": prev, **({"idle": idle} if idle else {})}
    return {role: {"head": name(h), "second_copy_loss_without": h["second_copy_loss_without"]}
            for role, h in roles.items()}


LABEL = 42  # the widest row label, "  second copy without previous-token head", and its column


def report(rows: list[dict]) -> str:
    """One table per model: a column per probe length, a row per head plus the two losses."""
    lines = []
    for row in rows:
        probes = row["probes"]
        lines.append(f"{str(row['n_layer']) + ' layer(s), probe length':<{LABEL}}" + "".join(
            f"{p['n_tokens']:>14d}" for p in probes))
        lines.append(f"{'  loss, first / second copy':<{LABEL}}" + "".join(
            f"{p['first_copy_loss']:>7.2f} /{p['second_copy_loss']:>5.2f}" for p in probes))
        lines.append(f"{'  a perfect induction head scores':<{LABEL}}" + "".join(
            f"{p['induction_ceiling']:>14.2f}" for p in probes))
        for i, head in enumerate(probes[0]["heads"]):
            cells = "".join(f"{p['heads'][i]['induction']:>8.2f} ({p['heads'][i]['peak_offset']:+3d})" for p in probes)
            label = f"  layer {head['layer']} head {head['head']} induction (peak)"
            lines.append(f"{label:<{LABEL}}" + cells)
        for role, label in (("induction", "induction head"), ("prev_token", "previous-token head"),
                            ("idle", "idle head")):
            if role in probes[0].get("circuit", {}):
                cells = "".join(f"{p['circuit'][role]['second_copy_loss_without']:>8.2f} "
                                f"({p['circuit'][role]['head']})" for p in probes)
                lines.append(f"{'  second copy without ' + label:<{LABEL}}" + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    with user_errors():
        cfg = parse_config(StudyConfig, sys.argv[1:] if argv is None else argv, prog="scripts/induction_study.py",
                           description=__doc__, allow_file=False)
        print(report(run(cfg)))


if __name__ == "__main__":
    main()
