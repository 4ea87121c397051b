"""
glimpse from Python: load a model, run a text through it, and get what every head computed as arrays, or
see it in the viewer inline in a notebook.

    from glimpse.notebook import load
    model = load("out-shakespeare-char-cpu")   # a training run's out_dir, a Hugging Face GPT-2 folder, or "gpt2"
    run = model.run("ROMEO:\\nBut soft, what light")
    run.show()                                 # the viewer, in the output cell

A Trace is a Mechanism (glimpse/mechanism.py: weights, scores, q, k, v, context, head_out_norm, the logit
attribution and the logit lens, as numpy arrays) that knows its model's tokenizer: run.step(layer, head,
query) takes one query through the lecture's computation, run.show() draws the same viewer that
sample.py writes, run.save(folder) writes the same dump. model.induction() and model.loss(text,
ablate="1.0") are the induction probe and a head removal that sample.py and eval.py run. Nothing here
computes attention a second time: every number comes from trace(), the model's own forward.
"""

from __future__ import annotations

import html
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from data.tokenizer import tokenizer_from_spec
from glimpse.ablation import Ablation, parse_heads
from glimpse.attention import head_metrics, write_dump
from glimpse.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_trained
from glimpse.errors import GlimpseError, os_error_message
from glimpse.evaluation import evaluating
from glimpse.files import check_writable, write_text
from glimpse.gpt2 import PRETRAINED
from glimpse.induction import induction_probe
from glimpse.masks import Masks
from glimpse.mechanism import Mechanism, trace
from glimpse.positions import alibi_slopes
from glimpse.run_folder import is_run_config
from glimpse.runtime import Device
from model import GPT

# what the scripts' messages say as a flag, and how load() takes it
AS_ARGUMENTS = (("--checkpoint=last", 'load(..., checkpoint="last")'),
                ("use --device=cpu (or auto)", 'use device="cpu" (or "auto")'),
                ("use --device=cuda (or auto)", 'use device="cuda" (or "auto")'),
                ("pass --init_from=DIR", "pass DIR to load()"),
                ("fix --out_dir", "fix the folder given to load()"))


def load(source: str | Path, checkpoint: str = "auto", device: str = "cpu") -> Model:
    """A model to run texts through: a training run's out_dir (its best.pt, else ckpt.pt; checkpoint="last"
    for ckpt.pt), a folder holding a Hugging Face GPT-2 (config.json and model.safetensors), or a
    pretrained name (gpt2, gpt2-medium, gpt2-large, gpt2-xl). A GlimpseError says what is missing."""
    if device not in get_args(Device):  # the scripts' --device is checked as it is parsed; an argument is not
        try:
            torch.device(device)  # a device of torch's own: cuda:1, a torch.device
        except (RuntimeError, TypeError):
            raise GlimpseError(f"device must be one of {', '.join(get_args(Device))} or one torch names (cuda:1); "
                               f"got {device!r}") from None
    source = str(source)
    folder = Path(source).expanduser()
    try:
        if (folder / BEST_NAME).is_file() or (folder / CHECKPOINT_NAME).is_file():  # an out_dir has a config.json too
            gpt, state, _, _ = load_trained(folder, checkpoint, device, "float32", "loaded")
        elif folder.is_file() and folder.name in (BEST_NAME, CHECKPOINT_NAME):
            which = "best" if folder.name == BEST_NAME else "last"
            raise GlimpseError(f"{folder} is a checkpoint: give its run's folder, load({str(folder.parent)!r}"
                               + (f", checkpoint={which!r})" if which == "last" else ")"))
        elif is_run_config(folder / "config.json"):  # a run writes it at its start, its checkpoints at its evals
            raise GlimpseError(f"{folder} is a training run with no {BEST_NAME} or {CHECKPOINT_NAME} yet: load it once "
                               "an eval has saved one")
        elif source in PRETRAINED or (folder / "config.json").is_file():
            if checkpoint != "auto":
                raise GlimpseError(f"checkpoint={checkpoint!r} picks one of a training run's checkpoints; {source} "
                                   "holds one model: leave checkpoint out")
            gpt, state, _, _ = load_trained("", "auto", device, "float32", "loaded", init_from=source)
        elif folder.is_dir():
            raise GlimpseError(f"{folder} holds neither a glimpse checkpoint ({BEST_NAME} or {CHECKPOINT_NAME}) nor "
                               "a Hugging Face GPT-2 (config.json): give a training run's out_dir or such a folder")
        else:
            raise GlimpseError(f"no folder {folder}: give a training run's out_dir, a Hugging Face GPT-2 folder, or "
                               f"one of {', '.join(PRETRAINED)}")
    except GlimpseError as e:
        message = str(e)
        for flag, argument in AS_ARGUMENTS:
            message = message.replace(flag, argument)
        raise GlimpseError(message) from None
    return Model(gpt, state, source)


@dataclass
class Model:
    """A GPT (gpt), the checkpoint it came from (state) and its tokenizer."""

    gpt: GPT
    state: dict = field(repr=False)
    source: str = ""

    def __post_init__(self):
        self.tokenizer = tokenizer_from_spec(self.state["tokenizer"])

    @property
    def config(self):
        return self.gpt.config

    def encode(self, text: str) -> list[int]:
        """The token ids of text; a GlimpseError for text the tokenizer cannot encode or an empty one."""
        ids = [int(i) for i in self.tokenizer.encode(text)]
        if not ids:
            raise GlimpseError("the text is empty: give at least one token")
        return ids

    def token_ids(self, text: str | list[int]) -> list[int]:
        """text's token ids, or text itself when it is ids; a GlimpseError for none, or for an id the tokenizer
        has no token for (the model would fail on it deep inside, or name it with an IndexError)."""
        if isinstance(text, str):
            return self.encode(text)
        if isinstance(text, bytes | bytearray):  # list(b"Hi") would be ids 72 and 105, another text entirely
            raise GlimpseError("the text is bytes: decode it first (text.decode('utf-8')), or give token ids as a list")
        try:
            ids = np.asarray(text if isinstance(text, np.ndarray) else list(text))
        except TypeError:
            raise GlimpseError(f"give a text (a str) or its token ids (a list of whole numbers); got "
                               f"{type(text).__name__}") from None
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise GlimpseError(f"token ids must be one sequence of whole numbers (a text's ids, not a batch); got "
                               f"{ids.dtype} of shape {ids.shape}")
        ids = self.known_ids(ids)
        if not ids:
            raise GlimpseError(f"no token ids: give at least one, each from 0 to {self.vocab_size - 1}")
        return ids

    @property
    def vocab_size(self) -> int:
        """How many token ids both the model and its tokenizer know."""
        return min(self.tokenizer.vocab_size, self.config.vocab_size)

    def known_ids(self, ids) -> list[int]:
        """ids (any shape) as a flat list of ints; a GlimpseError for one with no token (a negative one would
        silently count from the end)."""
        array = np.asarray(ids)
        if array.size and not np.issubdtype(array.dtype, np.integer):  # int(0.93) would be token 0, int("5") token 5
            raise GlimpseError(f"token ids must be whole numbers; got {array.dtype} (probabilities or weights are "
                               "not ids: lens_ids holds the logit lens's)")
        ids = [int(i) for i in np.ravel(array)]
        outside = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if outside is not None:
            raise GlimpseError(f"token id {outside} is outside this model's vocabulary: ids run from 0 to "
                               f"{self.vocab_size - 1}")
        return ids

    def run(self, text: str | list[int]) -> Trace:
        """What every head computed on text (or token ids): its last block_size tokens, traced."""
        ids = self.token_ids(text)
        mechanism = trace(self.gpt, ids, self.tokenizer.token_strings(ids))
        return Trace(**vars(mechanism), model=self)

    def induction(self, n_tokens: int | None = None, seed: int = 1337, ablation: str | None = "zero") -> dict:
        """The induction probe sample.py --probe=induction runs (glimpse/induction.py), on the random tokens seed
        draws: sample.py's probe takes its --seed, whose default this is, so the two give the same numbers."""
        try:
            n_tokens, seed = (None if n_tokens is None else operator.index(n_tokens)), operator.index(seed)
        except TypeError:
            raise GlimpseError(f"n_tokens and seed must be whole numbers (n_tokens may be None: half the "
                               f"model's block_size); got {n_tokens!r} and {seed!r}") from None
        return induction_probe(self.gpt, n_tokens, seed=seed, ablation=ablation, vocab_size=self.vocab_size)

    @torch.no_grad()
    def loss(self, text: str | list[int], ablate: str = "") -> float:
        """The mean next-token loss (nats) over text's last block_size + 1 tokens, with the heads ablate names
        (layer.head, comma-separated, as --ablate takes them) zero-ablated."""
        ids = self.token_ids(text)
        if len(ids) < 2:
            raise GlimpseError("a loss needs at least two tokens: one to read, one to predict")
        c, device = self.config, next(self.gpt.parameters()).device
        window = torch.tensor(ids[-(c.block_size + 1):], device=device)[None]  # (1, T + 1)
        heads = None
        if not isinstance(ablate, str):  # a head as 1.0 would be a float; two as (1, 0) a tuple
            raise GlimpseError(f"ablate takes heads as a str, layer.head, comma-separated ('1.0,2.3'); got {ablate!r}")
        if ablate:
            removed = parse_heads(ablate, c.n_layer, c.n_head, named="ablate")
            heads = Ablation.of(removed, c.n_layer, c.n_head, device=device)
        with evaluating(self.gpt):
            logits, _ = self.gpt(window[:, :-1], heads=heads)  # (1, T, V)
        return F.cross_entropy(logits[0].float(), window[0, 1:]).item()


@dataclass
class Trace(Mechanism):
    """A Mechanism (see glimpse/mechanism.py) with the model it came from."""

    model: Model | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # the dataclass's would print a summary of every array: pages of it in a cell
        n_layer, n_head, T = self.shape
        return (f"<glimpse Trace of {T} tokens through {n_layer} layers of {n_head} heads"
                + (f" (the text's last {T}, {self.cut} cut before)" if self.cut else "")
                + ": .weights, .scores, .q, .k, .v, .context, ...; .step(layer, head, query), .show(), .save(folder)>")

    def text_of(self, ids) -> list:
        """Each token id's own text, in the shape of ids (lists of lists for the logit lens's (T, k) lens_ids)."""
        shape = np.shape(ids)
        texts = self.model.tokenizer.token_strings(self.model.known_ids(ids))
        return np.array(texts, dtype=object).reshape(shape).tolist() if len(shape) > 1 else texts

    def step(self, layer: int, head: int, query: int) -> dict:
        """One query of one head through the lecture's steps, every number taken from the trace: its query
        vector and the keys it may see, as the scores take them and, before that, as W_q x and W_k x made them
        (projected) and as qk_norm left them (normed; None without qk_norm; rope rotates them after); q . k per
        key and the scale (None for additive scores, which take no dot product), ALiBi's penalty or None (in
        additive scores too: the head's network gave scores - penalty), the scores the softmax takes, the
        weights, the weighted values, the context vector, and the size of what the head moved from each key
        (moved_norm; top_moved_key the largest)."""
        n_layer, n_head, T = self.shape
        try:
            if any(isinstance(i, bool) for i in (layer, head, query)):  # True would be 1
                raise TypeError
            layer, head, query = (operator.index(i) for i in (layer, head, query))
        except TypeError:
            raise GlimpseError(f"layer, head and query must be whole numbers; got {layer!r}, {head!r}, {query!r}"
                               ) from None
        if not (0 <= layer < n_layer and 0 <= head < n_head and 0 <= query < T):
            window = f" (the text's last {T} tokens: query 0 is its token {self.cut})" if self.cut else ""
            raise GlimpseError(f"layer, head and query must be within {n_layer} layers, {n_head} heads and {T} "
                               f"tokens{window}; got layer {layer}, head {head}, query {query}")
        c = self.model.config
        q, keys = self.q[layer, head, query], self.k[layer, head, : query + 1]  # (hs,), (query + 1, hs)
        scale = {"scaled_dot": 1 / math.sqrt(q.size), "dot": 1.0}.get(c.attn_score)  # additive: no dot product
        dots = keys @ q if scale else None  # (query + 1,)
        scores = self.scores[layer, head, query, : query + 1]  # (query + 1,)
        weights = self.weights[layer, head, query, : query + 1]
        values = self.v[layer, head, : query + 1]  # (query + 1, hs)
        moved = weights * self.value_out_norm[layer, head, : query + 1]  # (query + 1,): head_out_norm's row
        penalty = None  # ALiBi's -slope x distance back, as the model's own masks add it (+ 0: not -0 at distance 0)
        if c.pos_encoding == "alibi":
            masks = Masks.build(query + 1, 0, "cpu", True, alibi_slopes(n_head))
            penalty = masks.penalty[head, query].numpy() + np.float32(0)  # (query + 1,)
        # a stage the trace did not keep is the next one itself: W_q x is q without qk_norm and rope, and
        # qk_norm's is q without rope after it
        q_projected = self.q_projected if self.q_projected is not None else self.q
        k_projected = self.k_projected if self.k_projected is not None else self.k
        q_normed = (self.q_normed if self.q_normed is not None else self.q) if c.qk_norm else None
        k_normed = (self.k_normed if self.k_normed is not None else self.k) if c.qk_norm else None
        step = {
            "query_projected": q_projected[layer, head, query],
            "keys_projected": k_projected[layer, head, : query + 1],
            "query_normed": q_normed[layer, head, query] if c.qk_norm else None,
            "keys_normed": k_normed[layer, head, : query + 1] if c.qk_norm else None,
            "query": q, "keys": keys, "tokens": self.tokens[: query + 1], "q_times_k": keys * q if scale else None,
            "dots": dots,
            "scale": scale, "penalty": penalty,
            "scores": scores, "masked": T - query - 1, "weights": weights, "values": values,
            "weighted_values": weights[:, None] * values, "context": self.context[layer, head, query],
            "moved_norm": moved, "top_moved_key": int(moved.argmax()),
        }
        # copies: a learner redoing a step in place (scores -= max) must not change the trace show() and save() draw
        return {key: value.copy() if isinstance(value, np.ndarray) else value for key, value in step.items()}

    def save(self, folder: str | Path, prompt_len: int | None = None, pngs: bool = False) -> Path:
        """The dump sample.py --mechanism writes (attention.npz, heads.json, index.html), into folder, in place
        of a dump there before (its layer_<l>.png and head_importance.json go too)."""
        folder = Path(folder).expanduser()  # as load() reads "~/..."
        try:
            check_writable(folder, "the dump's folder", "give save() a folder you can write")
            check_not_dumps(folder)
            write_dump(folder, self.weights, self.token_ids.tolist(), self.tokens, self.prompt_len(prompt_len),
                       self.meta(), pngs=pngs, mechanism=self, cut=self.cut,
                       token_text=self.model.tokenizer.token_strings)
        except OSError as e:  # what no check foresaw: a full disk, a name too long, root writing into /proc
            raise GlimpseError(os_error_message(e)) from None
        return folder

    def show(self, height: int = 760) -> Inline:
        """The viewer of this run, for a notebook's output cell, height pixels high (it is also a whole page:
        .html)."""
        if isinstance(height, bool) or not isinstance(height, int | np.integer) or height < 1:  # the iframe's style
            raise GlimpseError(f"height must be a whole number of pixels; got {height!r}")
        from glimpse.viewer import viewer_html  # matplotlib, which it imports, only once a picture is wanted

        page = viewer_html(self.weights, self.tokens, self.prompt_len(None), self.meta(), head_metrics(self.weights),
                           mechanism=self, cut=self.cut, token_text=self.model.tokenizer.token_strings)
        return Inline(page, int(height))

    def prompt_len(self, prompt_len: int | None) -> int:
        if prompt_len is None:
            return self.shape[2]
        try:
            return max(0, min(self.shape[2], operator.index(prompt_len) - self.cut))
        except TypeError:
            raise GlimpseError(f"prompt_len must be a whole number of tokens; got {prompt_len!r}") from None

    def meta(self) -> dict:
        state = self.model.state
        return {"model_config": state["model_config"], "iter": state.get("iter_num"), "val_loss": state.get("val_loss"),
                "source": self.model.source, "tokenizer": state["tokenizer"]}


def check_not_dumps(folder: Path):
    """A GlimpseError for a folder of dumps: training's snapshots (iter_<step>/, under the slider's index.html) or
    sample.py's (sample_<i>/, which a later sample.py run tidies): a dump beside them would replace or be lost
    among them."""
    held = {path.name.split("_")[0] for path in (folder.iterdir() if folder.is_dir() else ())
            if path.is_dir() and re.fullmatch(r"(iter|sample)_\d+", path.name)}
    if held:
        what = ("a training run's attention snapshots, whose index.html a dump would replace" if "iter" in held
                else "sample.py's dumps, one sample_<i> folder each")
        raise GlimpseError(f"{folder} holds {what}: save into a folder of its own, such as {folder / 'mine'}")


@dataclass
class Inline:
    """A viewer page that a notebook shows in its output cell: an iframe holding the whole page, which needs
    no network and no server (the page inflates its data itself)."""

    html: str
    height: int = 760

    def __repr__(self) -> str:  # a terminal, or a notebook's plain-text copy of the output, gets what it is
        return (f"<glimpse viewer page, {len(self.html):,} characters: a notebook shows it inline; .save(path) writes "
                "it to a file that opens in any browser>")

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width: 100%; height: {self.height}px; '
                'border: 1px solid #ddd"></iframe>')

    def save(self, path: str | Path) -> Path:
        """The page as a file that opens in any browser."""
        path = Path(path).expanduser()  # as load() reads "~/..."
        check_writable(path.parent, "the page's folder", "give save() a path you can write")
        write_text(path, self.html)
        return path
