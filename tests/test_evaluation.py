"""Scoring a model over a whole split: length_loss against a plain loop over windows; and the sums that
evaluation, HellaSwag and head removal add up on the model's device, in a type MPS has."""

import contextlib
import functools
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from data import hellaswag
from data.tokenizer import CharTokenizer
from glimpse import ablation, evaluation
from glimpse.distributed import Distributed
from glimpse.errors import GlimpseError
from glimpse.evaluation import length_loss, scored_windows
from glimpse.runtime import sum_dtype
from model import GPT, GPTConfig
from tests.conftest import Terminal
from tests.test_hellaswag import fixed_logits_model


def loss_by_hand(model, tokens: np.ndarray, length: int, step: int, max_tokens: int, first: int | None = None):
    """The targets tokens[first:first + max_tokens] (to the split's end), taken `step` at a time from first, each
    turn scored by the window of `length` tokens that ends with it, or when that would run past the split, by
    the window that ends with the split: the mean of -log softmax(logits)[target], and how many were scored.
    By default first is the first target that has length - step tokens before it."""
    first = length - step + 1 if first is None else first
    losses = []
    for target in range(first, min(len(tokens), first + max_tokens)):
        turn_ends = first + ((target - first) // step + 1) * step - 1  # the last target of this target's turn
        start = min(turn_ends - length, len(tokens) - 1 - length)  # the window holds tokens[start:start + length + 1]
        assert target - start - 1 >= length - step  # it sees at least length - step tokens before it
        window = torch.from_numpy(tokens[start:start + length + 1].astype(np.int64))
        log_probs = model(window[None, :-1])[0][0].log_softmax(dim=-1)  # (length, V)
        losses.append(-log_probs[target - start - 1, tokens[target]].item())
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("mode, stride, max_tokens, batch_size, n_tokens, first", [
    ("windows", 12, 100, 3, 100, None), ("sliding", 4, 100, 3, 100, None), ("sliding", 7, 100, 3, 100, None),
    ("sliding", 4, 30, 3, 100, None), ("sliding", 4, 100, 1, 100, None), ("windows", 12, 100, 1, 100, None),
    ("windows", 12, 100, 3, 97, None), ("windows", 12, 30, 3, 100, None), ("sliding", 4, 30, 3, 100, 21),
    ("sliding", 5, 100, 3, 100, 30), ("windows", 12, 50, 2, 100, 7)])
def test_length_loss_scores_the_tokens_each_mode_says(mode, stride, max_tokens, batch_size, n_tokens, first):
    """windows scores every token of non-overlapping windows; sliding moves by stride and scores only the
    last stride tokens of each one; over the whole split, the tokens after the last window are scored too
    (100 tokens leave 3 after twelve-token windows, 97 none); max_tokens is the count scored, not rounded up to
    whole windows (30 is not a multiple of 4 or 12); scoring can begin later (first), as eval.py's lengths
    do to score the same text. Catches sliding mode scoring whole windows (which counts the same tokens several
    times, most of them with little context), the split's last tokens left out or scored twice, and the
    filling of a last batch (most cases have a window count that their batch size does not divide) being scored."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, n_tokens).astype(np.uint16)
    length = 12
    step = length if mode == "windows" else stride
    with torch.no_grad():
        expected, expected_count = loss_by_hand(model, tokens, length, step, max_tokens, first)
    loss, count = length_loss(model, tokens, length, mode, stride, max_tokens, batch_size, "cpu",
                              contextlib.nullcontext(), first=first)
    assert count == expected_count
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n_tokens", [33, 40, 41, 42])
def test_windows_are_every_whole_non_overlapping_window_of_the_split(n_tokens):
    """windows() over more tokens than the split holds gives every window of length + 1 tokens that fits, length
    apart from the start, the last one included: inputs and their targets one token on."""
    length, tokens = 8, np.arange(n_tokens)
    inputs, targets = evaluation.windows(tokens, length, 10 * n_tokens, "cpu")
    starts = list(range(0, n_tokens - length, length))  # a window at s needs tokens[s:s + length + 1]
    assert inputs.tolist() == [list(range(s, s + length)) for s in starts]
    assert targets.tolist() == [list(range(s + 1, s + length + 1)) for s in starts]


@pytest.mark.parametrize("max_tokens", [1, 16, 17, 20, 24])
def test_windows_hold_max_tokens_targets_in_the_fewest_whole_windows(max_tokens):
    """A max_tokens that is no multiple of the length is rounded up to whole windows: at least max_tokens targets
    (where the split has them), and one window fewer would hold too few."""
    length, tokens = 8, np.arange(100)
    _, targets = evaluation.windows(tokens, length, max_tokens, "cpu")
    assert targets.numel() >= max_tokens > targets.numel() - length


@pytest.mark.parametrize("mode", ["windows", "sliding"])
def test_the_windows_scored_show_their_progress_on_a_terminal(monkeypatch, mode):
    """eval.py's long lengths are minutes of work on a CPU: a bar counts the windows, on a terminal only."""
    model = GPT(GPTConfig(block_size=12, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, 200).astype(np.uint16)
    windows = len(scored_windows(len(tokens), 12, mode, 4, 10_000)[0])  # 17 or 48: batches of 5 leave a remainder
    monkeypatch.setattr(evaluation, "tqdm", functools.partial(evaluation.tqdm, mininterval=0, miniters=1))
    monkeypatch.setattr(sys, "stderr", Terminal())
    with torch.no_grad():
        length_loss(model, tokens, 12, mode, 4, 10_000, 5, "cpu", contextlib.nullcontext(), show_progress=True)
    assert f"{mode}, 12 tokens" in sys.stderr.getvalue() and f" {windows}/{windows} " in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    with torch.no_grad():
        length_loss(model, tokens, 12, mode, 4, 10_000, 5, "cpu", contextlib.nullcontext())
    assert sys.stderr.getvalue() == ""


class DtypesMade(TorchDispatchMode):
    """Records the dtype of every tensor that an op makes while it is active."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes.update(t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def test_on_mps_the_sums_ask_for_no_float64(monkeypatch):
    """MPS has no float64 (making a float64 tensor there fails): with sum_dtype's answer for MPS, scoring a
    split, HellaSwag and removing heads make no float64 tensor at all; elsewhere the sums stay in float64."""
    assert sum_dtype("mps") == sum_dtype(torch.device("mps")) == torch.float32
    assert sum_dtype("cpu") == sum_dtype(torch.device("cuda", 1)) == torch.float64
    for module in (evaluation, ablation, hellaswag):
        monkeypatch.setattr(module, "sum_dtype", lambda device: sum_dtype("mps"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, 100).astype(np.uint16)
    x, y = torch.randint(20, (3, 12)), torch.randint(20, (3, 12))
    tokenizer = CharTokenizer(" abcd")
    examples = [hellaswag.Example("ab", ["a", "b", "c", "d"], 3)]
    chars_model = fixed_logits_model(tokenizer.chars)
    with DtypesMade() as made:
        length_loss(model, tokens, 12, "sliding", 4, 100, 3, "cpu", contextlib.nullcontext())
        ablation.mean_loss(model, x, y, None, contextlib.nullcontext(), 2)
        ablation.losses_per_head(model, x, y, torch.arange(12) >= 4, None, contextlib.nullcontext())
        ablation.head_means(model, x, 2, contextlib.nullcontext())
        hellaswag.evaluate(chars_model, examples, tokenizer, 8, "cpu", contextlib.nullcontext(), show_progress=False)
    assert torch.float32 in made.dtypes and torch.float64 not in made.dtypes


def test_the_evals_estimate_scores_its_fixed_batches_without_dropout(data_dir, tmp_path):
    """estimate_loss: each split's eval_iters batches, drawn once from seed + 1 and taken in turn, scored in eval
    mode (no dropout: the same number every time), the model handed back in the mode it came in."""
    from data.dataset import TokenData
    from glimpse.distributed import Distributed
    from tests.conftest import tiny_config

    cfg = tiny_config(data_dir, tmp_path, dropout=0.5, eval_iters=3, batch_size=4, block_size=16)
    data = TokenData(data_dir / "tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model_config(data.vocab_size))
    ctx = contextlib.nullcontext()
    for mode in (True, False):
        model.train(mode)
        first = evaluation.estimate_loss(model, data, cfg, torch.device("cpu"), ctx, Distributed())
        assert model.training is mode
        assert evaluation.estimate_loss(model, data, cfg, torch.device("cpu"), ctx, Distributed()) == first
    model.eval()
    with torch.no_grad():
        for split in ("train", "val"):
            starts = data.random_starts(split, 12, 16, torch.Generator().manual_seed(cfg.seed + 1))
            by_hand = [model(*data.batch(split, starts[i:i + 4], 16))[1] for i in (0, 4, 8)]
            assert first[split] == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)


@pytest.mark.parametrize("mode", [True, False])
def test_evaluating_hands_the_model_back_in_its_mode(mode):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, dropout=0.1)).train(mode)
    with evaluation.evaluating(model):
        assert not model.training and not any(m.training for m in model.modules())
    assert model.training is mode and all(m.training is mode for m in model.modules())


@pytest.mark.parametrize("setting,message", [
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(batch_size=0), "batch_size must be at least 1, got 0"),
    (dict(stride=-1), "stride must be 0 or more, got -1"),
    (dict(task="hellaswag", hellaswag_examples=-1), "hellaswag_examples must be 0 (all) or more, got -1"),
    # settings the chosen work would not read: each said, not dropped
    (dict(ablation="mean"), "--ablation picks how --ablate and --head_importance remove heads: give one of them, "
                            "or drop --ablation"),
    (dict(ablate="0.0", lengths="2"), "--lengths and --stride are the length task's, which --ablate and "
                                      "--head_importance does not run: drop them"),
    (dict(task="hellaswag", stride=8), "--lengths and --stride are the length task's, which --task=hellaswag does "
                                       "not run: drop them"),
    (dict(hellaswag_examples=5), "--hellaswag_file and --hellaswag_examples are read by --task=hellaswag only: add "
                                 "it, or drop them"),
    (dict(ablate="0.0", wandb_log=True), "--wandb_log logs the length table, head importance and HellaSwag; "
                                         "--ablate's two losses are printed only: drop --wandb_log"),
])
def test_eval_settings_out_of_range_or_unused_are_one_clear_error(setting, message):
    from eval import EvalConfig

    with pytest.raises(ValueError) as error:
        EvalConfig(**setting)
    assert str(error.value) == message


def test_eval_scores_each_length_once_in_the_order_given():
    from eval import EvalConfig

    assert EvalConfig(lengths="4,1,4,2").multiples() == [4, 1, 2]  # 4 twice wrote its rows twice to the CSV
    for zero in ("0", "1,0", "-1"):  # no context at all, or less than none
        with pytest.raises(ValueError, match="lengths must be positive multiples of block_size"):
            EvalConfig(lengths=zero).multiples()


def test_eval_py_scores_a_short_split_to_its_end_in_nats_and_bits(trained, tmp_path):
    """Asked for more tokens than the validation split holds, each mode scores every target it can and says how
    many: non-overlapping windows from the split's second token, sliding ones (half a window a turn, by default)
    from the first with half a window of context before it. Bits per token are the nats over ln 2."""
    import math
    import shutil
    from pathlib import Path

    import eval as eval_script
    from data.dataset import TokenData

    cfg, _ = trained
    out = shutil.copytree(cfg.out_dir, tmp_path / "run")  # a copy: eval.py writes its table into the run
    rows = eval_script.score_lengths(eval_script.EvalConfig(out_dir=str(out), lengths="1", max_tokens=10**7,
                                                            device="cpu", dtype="float32"))
    n, block_size = len(TokenData(Path(cfg.data_dir) / cfg.dataset).tokens("val")), cfg.model.block_size
    assert n < 10**7 and {r["mode"]: r["tokens_scored"] for r in rows} == {
        "windows": n - 1, "sliding": n - 1 - (block_size - block_size // 2)}
    for r in rows:
        assert r["bits_per_token"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)


def test_eval_py_scores_the_dataset_it_is_given_in_place_of_the_runs_own(trained, tmp_path, corpus_file):
    """--data_dir and --dataset pick another dataset to score: a copy of the run's own under another name scores
    as the run's own does; one of another tokenizer is refused, named."""
    import shutil
    from pathlib import Path

    import eval as eval_script
    from data.prepare import PrepareConfig, prepare

    cfg, _ = trained
    out = shutil.copytree(cfg.out_dir, tmp_path / "run")  # a copy: eval.py writes its table into the run
    settings = dict(out_dir=str(out), lengths="1", max_tokens=64, device="cpu", dtype="float32")
    own = eval_script.score_lengths(eval_script.EvalConfig(**settings))
    shutil.copytree(Path(cfg.data_dir) / cfg.dataset, tmp_path / "data" / "copy")
    copy = eval_script.score_lengths(eval_script.EvalConfig(**settings, data_dir=str(tmp_path / "data"),
                                                            dataset="copy"))
    assert copy == own
    (tmp_path / "upper.txt").write_text(corpus_file.read_text().upper())
    prepare(PrepareConfig(dataset="upper", input=str(tmp_path / "upper.txt"), data_dir=str(tmp_path / "data")))
    with pytest.raises(GlimpseError, match=f"^dataset {tmp_path / 'data' / 'upper'} uses another tokenizer than "
                                           "the checkpoint; pick its own dataset$"):
        eval_script.score_lengths(eval_script.EvalConfig(**settings, data_dir=str(tmp_path / "data"),
                                                         dataset="upper"))


def test_a_pretrained_models_hellaswag_results_go_to_a_folder_named_after_it():
    """eval.py --init_from=FOLDER --task=hellaswag without --out_dir writes eval-FOLDERNAME/, not into the default
    run folder; with --out_dir, there."""
    from pathlib import Path

    from eval import EvalConfig, results_folder

    assert results_folder(EvalConfig(task="hellaswag", init_from="/models/gpt2-tiny")) == Path("eval-gpt2-tiny")
    assert results_folder(EvalConfig(task="hellaswag", init_from=".")) == Path(f"eval-{Path.cwd().name}")
    assert results_folder(EvalConfig(task="hellaswag", init_from="/models/gpt2-tiny/..")) == Path("eval-models")
    assert results_folder(EvalConfig(task="hellaswag", init_from="gpt2", out_dir="mine")) == Path("mine")
    assert results_folder(EvalConfig(out_dir="run")) == Path("run")


@pytest.mark.parametrize("mode", ["windows", "sliding"])
def test_a_split_of_exactly_one_window_is_scored_not_refused(mode):
    """length + 1 tokens hold one window, its inputs and their targets one token on: both ways of cutting windows
    take it (windows() for eval.py's head removal and bench.py, scored_windows for the length study and the final
    score), and refuse one token fewer."""
    length, stride = 8, 4
    tokens = np.arange(length + 1)
    inputs, targets = evaluation.windows(tokens, length, 100, "cpu")
    assert inputs.tolist() == [list(range(length))] and targets.tolist() == [list(range(1, length + 1))]
    starts, scored_from, scored_to = scored_windows(length + 1, length, mode, stride, 100)
    context = 0 if mode == "windows" else length - stride
    assert (starts.tolist(), scored_from.tolist(), scored_to.tolist()) == ([0], [context], [length])
    for cut_short in (lambda: evaluation.windows(tokens[:-1], length, 100, "cpu"),
                      lambda: scored_windows(length, length, mode, stride, 100)):
        with pytest.raises(GlimpseError, match="has 8 tokens, too few for a context of 8"):
            cut_short()


def test_every_length_scores_from_the_first_target_the_longest_can_score_with_its_full_context():
    """Sliding windows of L tokens moved by s leave each target at least L - s before it: lengths 8 and 16 moved by 4
    score from tokens[13], the first with 12 before it, not later (a target of the text left out at every length);
    non-overlapping windows from tokens[1]; a stride past a length leaves it no context. A start before a length's
    first target with its full context is refused, not scored with less."""
    assert evaluation.first_target([8, 16], "sliding", 4) == 13
    assert evaluation.first_target([8, 16], "windows", 4) == 1
    assert evaluation.first_target([4], "sliding", 8) == 1
    starts, scored_from, _ = scored_windows(100, 16, "sliding", 4, 20, first=13)
    assert starts[0] == 0 and scored_from[0] == 12  # tokens[13], the 13th target of the window from tokens[0]
    with pytest.raises(ValueError, match=r"scores no target before tokens\[13\], not 12"):
        scored_windows(100, 16, "sliding", 4, 20, first=12)


class OwnShare(Distributed):
    """One of two processes with the collective left out: sum hands back this process's own part of the sums."""

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value


def test_in_lockstep_a_batch_of_padding_alone_adds_nothing_to_the_sums():
    """Under fsdp the processes score their shares in lockstep, the shorter ones padded: 9 windows, one at a time,
    leave the second process a last batch of padding alone, which scores no target (its loss, a mean over none, is
    NaN). It must add nothing, so that each process's sums are finite and add up to the whole split's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=12, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, 100).astype(np.uint16)
    assert len(scored_windows(len(tokens), 12, "windows", 12, 100)[0]) == 9
    whole = length_loss(model, tokens, 12, "windows", 12, 100, 1, "cpu", contextlib.nullcontext())
    shares = [length_loss(model, tokens, 12, "windows", 12, 100, 1, "cpu", contextlib.nullcontext(),
                          ddp=OwnShare(rank=rank, world_size=2, lockstep=True)) for rank in (0, 1)]
    assert all(np.isfinite(loss) for loss, _ in shares)
    assert sum(count for _, count in shares) == whole[1]
    assert sum(loss * count for loss, count in shares) / whole[1] == pytest.approx(whole[0], rel=1e-6)
