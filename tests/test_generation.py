"""Generation: how much context each step sees as the window slides, and what sample_next may draw."""

import math

import pytest
import torch

from glimpse.generation import generate, sample_next
from model import GPT, GPTConfig


@pytest.mark.parametrize("block_size", [8, 9])
@pytest.mark.parametrize("prompt_len", [1, 12])
def test_a_slid_window_keeps_at_least_half_a_window_of_context(block_size, prompt_len):
    """After a slide, each step's logits come from half a window or more, never from more than one; the window
    slides only when it is full, and keeps its recent half.

    Catches a window that slides by refilling from too few tokens (one, say): generation would then go on
    predicting from almost no context every block_size steps; and one that keeps too many (all but one): each
    slide runs the kept tokens through the model again, so it would do that every other token, as slow as no
    KV cache at all."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = torch.randint(0, 20, (2, prompt_len))
    gen = torch.Generator().manual_seed(0)
    first_start, slid, checked, slides, last = None, False, 0, 0, None
    for step in generate(model, tokens, 5 * block_size, generator=gen):
        context = tokens.size(1) - step.window_start  # tokens the logits were computed from
        if first_start is None:
            first_start = step.window_start
        elif step.window_start != last[0]:  # a slide: from a full window to its recent half
            assert last[1] == block_size and context == block_size // 2, (last, context)
            slides += 1
        slid = slid or step.window_start != first_start
        assert 1 <= context <= block_size
        if slid:
            assert context >= block_size // 2, (step.window_start, tokens.size(1))
            checked += 1
        last = step.window_start, context
        tokens = torch.cat([tokens, step.token], 1)
    assert checked > 2 * block_size and slides >= 4  # the window slid several times, and each slide was checked


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) if v > -math.inf else 0.0 for v in values]
    return [e / sum(exps) for e in exps]


def frequencies(draws: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, N) draws of token ids -> (R, vocab_size) share of each token in each row."""
    return torch.nn.functional.one_hot(draws, vocab_size).double().mean(dim=1)


def nucleus_by_hand(row: list[float], top_k: int, top_p: float) -> list[float]:
    """The distribution top-k then top-p leave for one row of logits, written out with plain lists."""
    kth = sorted(row, reverse=True)[top_k - 1]
    probs = softmax([v if v >= kth else -math.inf for v in row])
    kept, mass = set(), 0.0
    for token in sorted(range(len(row)), key=lambda t: -probs[t]):
        if mass >= top_p:  # the tokens already kept reach top_p: this one and the rest are dropped
            break
        kept.add(token)
        mass += probs[token]
    return [p / mass if t in kept else 0.0 for t, p in enumerate(probs)]


def test_top_k_and_top_p_sample_from_the_right_tokens_of_each_row():
    """top-k then top-p on unsorted logits, each row in its own order, against a by-hand nucleus.

    Catches a top-p mask applied in sorted order instead of vocabulary order: it drops the tokens at the
    positions of the unlikely ones, whichever tokens those are."""
    base = [2.0, 1.6, 1.2, 1.0, 0.7, 0.2, -1.0, -2.0]
    gen = torch.Generator().manual_seed(0)
    rows = [[base[i] for i in torch.randperm(len(base), generator=gen).tolist()] for _ in range(4)]
    top_k, top_p, n = 6, 0.8, 4000
    logits = torch.tensor(rows).repeat_interleave(n, dim=0)  # (4n, V): each row n times
    draws = sample_next(logits, 1.0, top_k=top_k, top_p=top_p, generator=gen).view(len(rows), n)
    expected = torch.tensor([nucleus_by_hand(row, top_k, top_p) for row in rows], dtype=torch.float64)
    assert ((expected > 0).sum(dim=1) == 4).all()  # the nucleus is the 4 likeliest of each row, at >= 10% each
    observed = frequencies(draws, len(base))
    assert torch.equal(observed > 0, expected > 0)  # exactly the nucleus can be drawn
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.03)


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """Four equal tokens, top_p = 0.5: the first two hold exactly half, the smallest set that reaches p, so the
    third is dropped (a nucleus that needs more than p would keep it)."""
    draws = sample_next(torch.zeros(2000, 4), 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert len(set(draws.flatten().tolist())) == 2  # which two of the tied four is the sort's choice


def test_temperature_reshapes_the_distribution():
    """Samples at temperature T follow softmax(logits / T): sharper below 1, flatter above.

    Catches a temperature that is ignored (or applied the wrong way round)."""
    logits = [2.0, 1.0, 0.0, -1.0]
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        draws = sample_next(torch.tensor([logits]).repeat(20000, 1), temperature, generator=gen)  # (20000, 1)
        observed = frequencies(draws.view(1, -1), len(logits))[0]
        expected = torch.tensor(softmax([v / temperature for v in logits]), dtype=torch.float64)
        torch.testing.assert_close(observed, expected, rtol=0, atol=0.015)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_a_tiny_temperature_samples_the_likeliest_token(temperature):
    """Below about 1e-38 logits / temperature overflowed float32 to inf, and sampling died on NaN probabilities;
    its limit is greedy decoding, with top-k and top-p too."""
    logits = torch.tensor([[2.0, 5.0, -1.0, 4.9], [-3.0, -2.5, -2.0, -40.0], [1e30, 0.0, -1e30, 1e29]])
    gen = torch.Generator().manual_seed(0)
    for top_k, top_p in ((None, None), (2, None), (None, 0.5), (3, 0.9)):
        token = sample_next(logits.repeat(100, 1), temperature, top_k, top_p, gen)  # (300, 1)
        assert token.view(100, 3).eq(torch.tensor([1, 2, 0])).all()
    with pytest.raises(RuntimeError, match="probability tensor contains"):  # a NaN is not turned into a draw
        sample_next(torch.tensor([[1.0, float("nan"), 3.0, 2.0]]), temperature)


def test_a_prompt_longer_than_the_window_is_read_through_a_whole_window():
    """The first step of a prompt past block_size reads its last block_size tokens, every one of them.

    Catches a prefill that starts one token late: the first prediction would lose the prompt's oldest token in
    view, yet stay a forward over its own (shorter) window, as every other test of the window checks."""
    torch.manual_seed(0)
    block_size = 8
    model = GPT(GPTConfig(block_size=block_size, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()
    prompt = torch.randint(0, 20, (2, 13))
    first = next(generate(model, prompt, 1, temperature=0))
    assert first.window_start == 13 - block_size
    with torch.no_grad():
        expected = model(prompt[:, -block_size:])[0][:, -1]  # (2, vocab_size)
    torch.testing.assert_close(first.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=3),
                                      dict(temperature=2.0, top_p=0.9)])
def test_a_vocabulary_padded_past_the_tokenizers_never_samples_its_padding(settings):
    """A model whose vocabulary is padded past its tokenizer's (GPT-2's 50,257 to 50,304) has logits for ids no
    tokenizer can write out: made the likeliest by far here, they are still never sampled."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False)).eval()
    with torch.no_grad():  # logits v for token v whatever the model reads: the padding's (15 to 19) the highest
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = torch.arange(20, dtype=torch.float32)
    prompt = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        padded = [step.token for step in generate(model, prompt, 12, **settings)]
        kept = [step.token for step in generate(model, prompt, 12, **settings, vocab_size=15)]
    assert (torch.cat(padded) >= 15).float().mean() > 0.5  # what the padding would take without vocab_size
    assert (torch.cat(kept) < 15).all()


def test_a_top_p_too_small_for_float32_keeps_the_likeliest_token():
    """top_p = 1e-300 passes the check 0 < top_p, but is 0 to float32: the likeliest token, which top-p always
    keeps, was dropped with the rest and sampling failed on a row of zeros."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    for _ in range(5):
        assert sample_next(logits, 1.0, top_p=1e-300).tolist() == [[1], [0]]


def test_a_one_token_window_slides_to_the_newest_token():
    """A model of block_size 1 (any positive size is allowed) keeps one token when its window slides, not half of
    one rounded down to none: each step predicts from the newest token alone, where an empty window would be an
    input of no tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = torch.randint(0, 20, (2, 3))
    for step in generate(model, tokens, 4, generator=torch.Generator().manual_seed(0)):
        assert step.window_start == tokens.size(1) - 1
        with torch.no_grad():
            expected = model(tokens[:, -1:])[0][:, -1]  # (2, vocab_size)
        torch.testing.assert_close(step.logits, expected, rtol=1e-5, atol=1e-5)
        tokens = torch.cat([tokens, step.token], 1)


def test_under_bfloat16_autocast_the_logits_are_sampled_in_float32():
    """Sampling runs under the run's autocast (bfloat16 by default on a GPU), where the head's logits come out in
    bfloat16: a softmax and top-p's running sum in its 8 bits of mantissa would draw from a distribution off by
    percents. Each step's logits, what sample_next draws from, are float32."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.zeros(1, 3, dtype=torch.long))[0].dtype == torch.bfloat16  # what the head hands over
        steps = list(generate(model, torch.zeros(1, 3, dtype=torch.long), 10, top_p=0.9,
                              generator=torch.Generator().manual_seed(0)))
    assert all(step.logits.dtype == torch.float32 for step in steps)

