"""The viewer's mechanism: the scores and moved modes, the step-by-step panel, the logit attribution and
lens, the window's cut, the URL hash, and the training snapshots' slider, in a real headless Chromium.

The mechanism is a real trace (glimpse/mechanism.py) of a small random-weight model whose queries and
keys are scaled up so that its heads attend sharply; every number the page shows is compared with the
Mechanism's own. The browser tests skip when Chromium or playwright is missing, as test_render's do.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import zlib
from dataclasses import asdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from glimpse.attention import head_metrics, write_dump
from glimpse.mechanism import trace
from glimpse.positions import alibi_slopes
from glimpse.render import COLORMAP, colormap_bytes
from glimpse.viewer import drop_snapshots_after, viewer_html, write_snapshot_index, write_viewer
from model import GPT, GPTConfig
from tests.test_render import (  # noqa: F401
    ScriptCollector,
    browser,
    embedded_data,
    open_viewer,
    state,
    synthetic_attention,
)

WORDS = "abcdefghijklmnopqrst"  # a made-up character vocabulary: token id i is WORDS[i]


def sharp_model(n_tokens: int = 30, block_size: int = 24, seed: int = 0, **config) -> tuple[GPT, list[int]]:
    """A random 2-layer model whose heads attend sharply, and n_tokens random token ids."""
    torch.manual_seed(seed)
    model_config = GPTConfig(block_size=block_size, vocab_size=len(WORDS), n_layer=2, n_head=2, n_embd=16, **config)
    model = GPT(model_config)
    with torch.no_grad():  # sharp heads: scores of tenths, not the hundredths of a fresh model
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model_config.n_embd] *= 6.0
        for name, parameter in model.named_parameters():  # biases that count in the logit's attribution
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model, np.random.default_rng(seed).integers(0, len(WORDS), n_tokens).tolist()


def traced_model(n_tokens: int = 30, block_size: int = 24, seed: int = 0, **config):
    """(mechanism, meta, token_text) of sharp_model's model over its n_tokens random tokens; the window
    keeps the last block_size of them, so that cut = n_tokens - block_size."""
    model, ids = sharp_model(n_tokens, block_size, seed, **config)
    mechanism = trace(model, ids, [WORDS[i] for i in ids])
    return mechanism, {"model_config": asdict(model.config)}, lambda ids: [WORDS[i] for i in ids]


@pytest.fixture(scope="module")
def traced():
    return traced_model()


def write_mechanism_viewer(folder, traced, prompt_len: int = 6, name: str = "index.html"):
    mechanism, meta, token_text = traced
    return write_viewer(folder / name, mechanism.weights, mechanism.tokens, prompt_len, meta,
                        head_metrics(mechanism.weights), None, mechanism, mechanism.cut, token_text)


def on_page(x: float, digits: int = 3) -> str:
    """A number as the panels write it: JavaScript's toFixed (a tie rounds away from 0, where Python's format
    rounds to even), with a true minus sign, and none for a number that rounds to zero."""
    fixed = Decimal(float(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    fixed = abs(fixed) if fixed == 0 else fixed  # a number that rounds to zero has no sign on the page
    return f"{fixed:.{digits}f}".replace("-", "−")


def inflate(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))


# --- what the page carries ----------------------------------------------------------------------


def test_viewer_embeds_the_mechanism_only_when_given(traced):
    mechanism, meta, token_text = traced
    L, H, T = mechanism.shape
    plain = embedded_data(viewer_html(mechanism.weights, mechanism.tokens, 6, meta))
    assert set(plain) == {"n_layer", "n_head", "T", "prompt_len", "tokens", "labels", "meta", "heads", "importance",
                          "cut", "colormap", "masked", "weights", "thumbnails", "thumbnail_block"}  # as before
    data = embedded_data(viewer_html(mechanism.weights, mechanism.tokens, 6, meta, mechanism=mechanism,
                                     cut=mechanism.cut, token_text=token_text))
    assert set(data) == set(plain) | {"mechanism", "vocab"}
    packed = data["mechanism"]
    assert packed["bits"] == 16 and packed["head_dim"] == 8 and packed["attn_score"] == "scaled_dot"
    # each layer inflates to float16 high bytes, then low bytes, of q, k, v, value_out_norm: a dot-product
    # model's scores the page computes from q and k; additive attention's, which has none, travel after v
    rows, cols = np.tril_indices(T)
    additive = viewer_html(mechanism.weights, mechanism.tokens, 6,
                           {"model_config": {**meta["model_config"], "attn_score": "additive"}}, mechanism=mechanism)
    for score_fn, page_data in (("scaled_dot", packed), ("additive", embedded_data(additive)["mechanism"])):
        for layer, text in enumerate(page_data["layers"]):
            raw = np.frombuffer(inflate(text), dtype=np.uint8)
            n = raw.size // 2
            numbers = ((raw[:n].astype(np.uint16) << 8) | raw[n:]).view(np.float16).astype(np.float32)
            scores = [mechanism.scores[layer][:, rows, cols]] if score_fn == "additive" else []
            parts = [mechanism.q[layer], mechanism.k[layer], mechanism.v[layer], *scores,
                     mechanism.value_out_norm[layer]]
            expected = np.concatenate([part.ravel() for part in parts])
            np.testing.assert_allclose(numbers, expected, rtol=1e-3, atol=1e-4)
    numbers = np.frombuffer(inflate(packed["globals"]), dtype="<f4")
    shapes = dict((name, tuple(shape)) for name, shape in packed["globals_layout"])
    assert shapes["dla_heads"] == (L, H, T) and shapes["lens_ids"] == (L + 1, T, 5)
    assert numbers.size == sum(math.prod(shape) for shape in shapes.values())
    # the token texts travel only for the ids the panels name: predictions and the lens
    named = set(mechanism.predicted.tolist()) | set(mechanism.lens_ids.ravel().tolist())
    assert data["vocab"] == {str(i): WORDS[i] for i in sorted(named)}


def test_a_mechanism_past_float16_travels_in_float32(traced):
    mechanism, meta, _ = traced
    huge = dataclasses.replace(mechanism, q=mechanism.q * 1e6)  # past float16's 65504
    data = embedded_data(viewer_html(huge.weights, huge.tokens, 6, meta, mechanism=huge))
    assert data["mechanism"]["bits"] == 32
    numbers = np.frombuffer(inflate(data["mechanism"]["layers"][1]), dtype="<f4")
    np.testing.assert_array_equal(numbers[:huge.q[1].size], huge.q[1].ravel())
    # additive attention's scores travel too, and count
    additive = {"model_config": {**meta["model_config"], "attn_score": "additive"}}
    huge = dataclasses.replace(mechanism, scores=mechanism.scores * 1e6)
    data = embedded_data(viewer_html(huge.weights, huge.tokens, 6, additive, mechanism=huge))
    assert data["mechanism"]["bits"] == 32
    rows, cols = np.tril_indices(huge.shape[2])
    numbers = np.frombuffer(inflate(data["mechanism"]["layers"][1]), dtype="<f4")
    start = 3 * huge.q[1].size
    scores = numbers[start:start + huge.shape[1] * rows.size]
    np.testing.assert_array_equal(scores, huge.scores[1][:, rows, cols].ravel())


def test_a_mechanism_under_float16s_limit_travels_in_float16(traced):
    mechanism, meta, _ = traced
    large = dataclasses.replace(mechanism, q=mechanism.q * (60000 / np.abs(mechanism.q).max()))  # under 65504
    assert embedded_data(viewer_html(large.weights, large.tokens, 6, meta, mechanism=large))["mechanism"]["bits"] == 16


def test_a_dump_from_before_a_model_key_reads_as_that_keys_default(traced):
    """A model config without the keys of later versions (a dump saved before them) was built with their
    defaults: the page's mechanism follows GPTConfig's, not another guess."""
    mechanism, meta, _ = traced
    old = {key: value for key, value in meta["model_config"].items()
           if key not in ("attn_score", "pos_encoding", "qk_norm", "smear", "tie_embeddings", "logit_softcap")}
    packed = embedded_data(viewer_html(mechanism.weights, mechanism.tokens, 6, {"model_config": old},
                                       mechanism=mechanism))["mechanism"]
    default = GPTConfig()
    assert (packed["attn_score"], packed["pos_encoding"], packed["qk_norm"], packed["smear"],
            packed["tie_embeddings"], packed["logit_softcap"]) == (
        default.attn_score, default.pos_encoding, default.qk_norm, default.smear, default.tie_embeddings,
        float(default.logit_softcap or 0.0))
    assert packed["alibi_slopes"] is None  # ALiBi's penalty only for a model that has it
    alibi = {"model_config": {**meta["model_config"], "pos_encoding": "alibi"}}
    packed = embedded_data(viewer_html(mechanism.weights, mechanism.tokens, 6, alibi, mechanism=mechanism))
    assert packed["mechanism"]["alibi_slopes"] == pytest.approx(alibi_slopes(mechanism.shape[1]).tolist())


def test_the_panels_token_texts_are_short_labels(traced):
    """The predictions and the lens name their tokens in 16 characters at most, a longer text cut short with "…"."""
    mechanism, meta, _ = traced
    data = embedded_data(viewer_html(mechanism.weights, mechanism.tokens, 6, meta, mechanism=mechanism,
                                     token_text=lambda ids: [f"token {i} " + "x" * 40 for i in ids]))
    labels = data["vocab"].values()
    assert labels and all(len(label) == 16 and label.startswith("token") and label.endswith("…") for label in labels)


def test_dropping_later_snapshots_leaves_the_rest_and_what_is_no_snapshot(tmp_path):
    """A resume removes the snapshots after its checkpoint and the slider lists the rest; a file of that name, or a
    folder whose name only begins like a snapshot's (a copy kept aside), is not a snapshot and stays."""
    attention = tmp_path / "attention"
    for name in ("iter_0", "iter_10", "iter_20", "iter_30", "iter_20_kept", "notes"):
        (attention / name).mkdir(parents=True)
        (attention / name / "index.html").write_text("a viewer")
    (attention / "iter_40").write_text("a file")
    write_snapshot_index(attention)
    assert drop_snapshots_after(attention, 10) == [20, 30]
    assert sorted(p.name for p in attention.iterdir()) == ["index.html", "iter_0", "iter_10", "iter_20_kept",
                                                           "iter_40", "notes"]
    assert embedded_data_of(attention / "index.html", "glimpse-snapshots") == {"steps": [0, 10],
                                                                               "folders": ["iter_0", "iter_10"]}


def test_a_mechanism_of_another_shape_is_refused(traced):
    mechanism, meta, _ = traced
    with pytest.raises(ValueError, match="mechanism"):
        viewer_html(mechanism.weights[:1], mechanism.tokens, 6, meta, mechanism=mechanism)


def test_the_mechanism_of_a_char_model_at_128_tokens_stays_small():
    config = GPTConfig(block_size=128, vocab_size=65, n_layer=3, n_head=4, n_embd=128)  # the CPU preset's shape
    torch.manual_seed(1)
    mechanism = trace(GPT(config), np.random.default_rng(1).integers(0, 65, 128).tolist())
    meta = {"model_config": asdict(config)}
    plain = len(viewer_html(mechanism.weights, mechanism.tokens, 6, meta))
    full = len(viewer_html(mechanism.weights, mechanism.tokens, 6, meta, mechanism=mechanism))
    # float16 planes deflated: about 590 KB more for 3 x 4 heads of 32 numbers per token; float32 would be 1.2 MB
    assert full - plain < 800_000


# --- the modes --------------------------------------------------------------------------------------


def wait_mode(page, layer: int, head: int, mode: str):
    page.wait_for_function(f"document.body.dataset.painted?.startsWith('{layer},{head},') && "
                           f"document.body.dataset.paintedMode === '{mode}'", timeout=10_000)


def cell_rgb(page, q: int, k: int, dx: float = 0.5, dy: float = 0.5) -> np.ndarray:
    """RGB at (dx, dy) inside heatmap cell (query q, key k)."""
    return np.array(page.evaluate(
        """([q, k, dx, dy]) => {
            const canvas = document.getElementById("heatmap");
            const cell = canvas.width / window.glimpseViewer.state().T;
            const pixel = canvas.getContext("2d").getImageData((k + dx) * cell, (q + dy) * cell, 1, 1);
            return Array.from(pixel.data.slice(0, 3));
        }""", [int(q), int(k), float(dx), float(dy)]))


def colorbar_columns(page, *xs: int) -> np.ndarray:
    """(len(xs), height, 3): the colour bar canvas's pixel columns at xs, top to bottom."""
    return np.array(page.evaluate(
        """(xs) => {
            const bar = document.getElementById("colorbar");
            return xs.map((x) => {
                const data = bar.getContext("2d").getImageData(x, 0, 1, bar.height).data;
                return Array.from({ length: bar.height }, (_, y) => Array.from(data.slice(4 * y, 4 * y + 3)));
            });
        }""", list(xs)))


def check_colorbar(page, lut: np.ndarray, places: list[float]):
    """The bar runs from lut's top colour (the highest value) down to its first, and its ticks' marks sit at
    places, each a tick's height on the bar from 0 (the bottom) to 1 (the top)."""
    bar, marks = colorbar_columns(page, 5, 15)  # inside the bar; where the ticks' marks are drawn
    pad, span = 6, bar.shape[0] - 12  # the page's margins above and below the bar
    assert np.abs(bar[pad] - lut[255]).max() <= 3 and np.abs(bar[pad + span - 1] - lut[0]).max() <= 3
    ticks = [y for y in range(len(marks)) if (marks[y] == 0x44).all()]
    expected = sorted({round(pad + (1 - place) * (span - 1)) for place in places})
    assert len(ticks) == len(expected) and all(abs(y - e) <= 1 for y, e in zip(ticks, expected)), (ticks, expected)


def test_the_mode_switch_paints_scores_and_what_was_moved_in_chromium(tmp_path, browser, traced):  # noqa: F811
    mechanism, _, _ = traced
    T = mechanism.shape[2]
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    page.select_option("#head", "1")
    wait_mode(page, 0, 1, "weights")
    weights_picture = page.evaluate("document.getElementById('heatmap').toDataURL()")
    caption = page.inner_text("#mode-caption")
    assert "sums to 1" in caption and "probabilit" in caption
    # the caption says how the colours are drawn, and what the dashed lines at the prompt's end are
    assert "Coloured by √weight" in caption and "where the prompt ends" in caption
    page.select_option("#scale", "linear")
    page.wait_for_function("document.getElementById('mode-caption').innerText.includes('Coloured linearly')")
    page.select_option("#scale", "sqrt")
    assert page.evaluate("window.glimpseViewer.mode().range") == [0, 1]
    check_colorbar(page, colormap_bytes(COLORMAP), [math.sqrt(w) for w in (0, 0.01, 0.05, 0.1, 0.25, 0.5, 1)])

    page.select_option("#mode", "scores")
    wait_mode(page, 0, 1, "scores")
    assert page.evaluate("document.getElementById('heatmap').toDataURL()") != weights_picture
    scores = mechanism.scores[0, 1]  # (T, T), -inf above the diagonal
    span = np.abs(scores[np.tril_indices(T)]).max()
    low, high = page.evaluate("window.glimpseViewer.mode().range")
    assert low == pytest.approx(-span, rel=2e-3) and high == pytest.approx(span, rel=2e-3)  # centred on 0
    diverging = colormap_bytes("RdBu_r")
    check_colorbar(page, diverging, [0, 0.25, 0.5, 0.75, 1])  # -span to span, 0 in the middle
    for q, k in [(5, 0), (12, 7), (T - 1, T - 1), (20, 3)]:
        expected = diverging[int(np.clip(np.rint(127.5 + 127.5 * scores[q, k] / span), 0, 255))]
        assert np.abs(cell_rgb(page, q, k) - expected).max() <= 3, (q, k)
    for q in (0, 9, T - 1):  # a token's own key is seen: none of its cell hatched, its upper corner neither
        expected = diverging[int(np.clip(np.rint(127.5 + 127.5 * scores[q, q] / span), 0, 255))]
        assert np.abs(cell_rgb(page, q, q, 0.85, 0.15) - expected).max() <= 3, q
    for q, k in [(0, 1), (3, 20), (10, 11), (T - 2, T - 1)]:  # masked: hatched grey, whatever the score scale
        for dx, dy in [(0.2, 0.2), (0.5, 0.5), (0.8, 0.3)]:
            r, g, b = cell_rgb(page, q, k, dx, dy)
            assert r == g == b and r < 215, (q, k, r)  # grey, darker than white or the weights' #eeeeee
    caption = page.inner_text("#mode-caption")
    assert "masked" in caption and "−∞" in caption and "Only differences within a row matter" in caption
    # the readout under the mouse names the cell and its score: query row, key column
    box = page.locator("#overlay").bounding_box()
    for q, k in [(12, 7), (20, 3)]:
        page.mouse.move(box["x"] + (k + 0.5) / T * box["width"], box["y"] + (q + 0.5) / T * box["height"])
        text = page.inner_text("#readout")
        assert f"query #{q} " in text and f"key #{k} " in text
        assert float(re.search(r": score (\S+)$", text).group(1)) == pytest.approx(scores[q, k], rel=2e-3, abs=2e-3)
        assert re.search(r": score -?\d+\.\d{4}$", text), text  # four decimals, as the weights read

    page.select_option("#mode", "moved")
    wait_mode(page, 0, 1, "moved")
    moved = mechanism.head_out_norm[0, 1]
    assert page.evaluate("window.glimpseViewer.mode().range")[1] == pytest.approx(moved.max(), rel=5e-3)
    q, k = np.unravel_index(moved.argmax(), moved.shape)
    assert np.abs(cell_rgb(page, q, k) - colormap_bytes("magma")[255]).max() <= 3  # the most moved: the top colour
    assert "residual stream" in page.inner_text("#mode-caption") and "cancel" in page.inner_text("#mode-caption")
    shown = page.evaluate(f"Array.from({{length: {T}}}, (_, k) => window.glimpseViewer.value(0, 1, 15, k, 'moved'))")
    np.testing.assert_allclose(shown, moved[15], rtol=5e-3, atol=1e-5)
    page.mouse.move(box["x"] + 9.5 / T * box["width"], box["y"] + 15.5 / T * box["height"])  # query 15, key 9
    assert float(re.search(r": moved (\S+)$", page.inner_text("#readout")).group(1)) == pytest.approx(
        moved[15, 9], rel=5e-3, abs=1e-4)
    # each cell in magma at its fraction of the most moved, on the scale chosen, as the colour bar says
    fraction = moved / moved.max()
    middling = np.argwhere(np.tril((fraction > 0.03) & (fraction < 0.3)))[:4]  # where √ and linear differ most
    assert len(middling) == 4
    magma = colormap_bytes("magma")
    for scale, drawn in (("sqrt", np.sqrt(fraction)), ("linear", fraction)):
        page.select_option("#scale", scale)
        page.wait_for_function(f"document.body.dataset.painted === '0,1,{scale}'", timeout=10_000)
        for q, k in middling:
            assert np.abs(cell_rgb(page, q, k) - magma[int(np.rint(255 * drawn[q, k]))]).max() <= 3, (scale, q, k)
    assert page.evaluate("location.hash") == "#layer=0&head=1&mode=moved"
    assert errors == []
    page.close()


@pytest.mark.parametrize("grown", [0.01, 1, 10, 40])  # the head's scores in hundredths or less, tenths, units, tens
def test_the_colour_bar_labels_its_ticks_to_the_digits_the_scores_need_in_chromium(  # noqa: F811
        tmp_path, browser, traced, grown):  # noqa: F811
    mechanism, meta, token_text = traced
    larger = dataclasses.replace(mechanism, q=mechanism.q * grown)  # q·k, and so every score, grown times
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, (larger, meta, token_text)))
    page.evaluate("window.glimpseViewer.select(0, 1)")
    page.evaluate("window.glimpseViewer.setMode('scores')")
    wait_mode(page, 0, 1, "scores")
    shown = page.evaluate("window.glimpseViewer.mode()")
    span = shown["range"][1]
    T = mechanism.shape[2]
    assert span == pytest.approx(grown * np.abs(mechanism.scores[0, 1][np.tril_indices(T)]).max(), rel=0.01)
    assert (span < 0.1, span < 1, 1 <= span < 10, span >= 10)[[0.01, 1, 10, 40].index(grown)]  # each way met
    ticks, expected = [page_number(t) for t in shown["ticks"]], [-span, -span / 2, 0, span / 2, span]
    if span >= 1:  # to one or two decimals, as many in every label
        digits = 1 if span >= 10 else 2
        np.testing.assert_allclose(ticks, expected, atol=0.51 * 10**-digits)
        assert {len(t.split(".")[1]) if "." in t else 0 for t in shown["ticks"] if t != "0"} == {digits}
    else:  # two significant digits, however small: five ticks that differ, not a column of zeros
        np.testing.assert_allclose(ticks, expected, rtol=0.051)
        assert len(set(shown["ticks"])) == 5 and shown["ticks"][0].startswith("−"), shown["ticks"]
        assert all(len(t.lstrip("−0.").replace(".", "")) <= 2 for t in shown["ticks"] if t != "0"), shown["ticks"]
    assert errors == []
    page.close()


@pytest.mark.parametrize("made_by", ["sample", "ablated", "snapshot"])
def test_a_dump_without_mechanism_offers_weights_alone_in_chromium(tmp_path, browser, traced, made_by):  # noqa: F811
    """Where the mechanism comes from, for the dump at hand: sample.py --mechanism, which refuses --ablate (it
    shows the intact model), and a text of one's own for training's snapshots (they dump the weights alone)."""
    mechanism, meta, _ = traced
    meta = {**meta, **{"sample": {"sampling": {"start": "\n"}},
                       "ablated": {"sampling": {"start": "\n"}, "ablated_heads": ["0.1"], "ablation": "zero"},
                       "snapshot": {"iter": 100, "source": "the first 24 tokens of tiny's validation split"}}[made_by]}
    hint = {"sample": "dump with sample.py --mechanism",
            "ablated": "dump with sample.py --mechanism, without --ablate (it shows the intact model's heads)",
            "snapshot": "dump a text with sample.py --mechanism (training's snapshots hold the weights only)"}[made_by]
    path = write_viewer(tmp_path / "plain.html", mechanism.weights, mechanism.tokens, 6, meta)
    page, errors, _ = open_viewer(browser, path)
    disabled = page.eval_on_selector_all("#mode option", "options => options.map(o => [o.value, o.disabled])")
    assert disabled == [["weights", False], ["scores", True], ["moved", True]]
    assert page.inner_text("#mode-hint") == f"scores and moved: {hint}"
    page.evaluate("window.glimpseViewer.setMode('scores')")
    assert state(page)["mode"] == "weights" and page.inner_text("#note") == \
        f"This dump holds no mechanism to show scores: showing weights ({hint})."
    page.click('#tokens .tok[data-i="8"]')
    assert page.inner_text("#steps").endswith(f"the heads matter, and the logit lens: {hint}.")
    assert page.evaluate("window.glimpseViewer.steps()") is None
    assert errors == []
    page.close()


def test_an_unknown_mode_in_the_address_falls_back_to_weights_with_a_note_in_chromium(tmp_path, browser, traced):  # noqa: F811
    path = write_mechanism_viewer(tmp_path, traced)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(path.as_uri() + "#layer=1&head=1&mode=attention-rollout")
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=10_000)
    wait_mode(page, 1, 1, "weights")
    assert (state(page)["layer"], state(page)["head"], state(page)["mode"]) == (1, 1, "weights")
    note = page.locator("#note")
    assert note.is_visible() and "attention-rollout" in note.inner_text() and "weights" in note.inner_text()
    assert page.evaluate("location.hash") == "#layer=1&head=1&mode=weights"
    page.goto(path.as_uri() + "#layer=0&head=1&mode=scores")  # the hash changes: a known mode is taken as it is
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=10_000)
    wait_mode(page, 0, 1, "scores")
    assert page.inner_text("#note") == "" and not page.locator("#note").is_visible()
    page.goto(path.as_uri() + "#layer=7&head=1&mode=scores")  # a layer the model does not have: the last, said
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=10_000)
    wait_mode(page, 1, 1, "scores")
    assert page.inner_text("#note") == "This dump has no layer 7 (its layers are 0 to 1): showing layer 1, head 1."
    page.select_option("#head", "0")  # another choice: the note named the head shown before it, and goes
    wait_mode(page, 1, 0, "scores")
    assert page.inner_text("#note") == ""
    page.goto(path.as_uri() + "#layer=3&head=9&mode=rollout")  # every part of the address wrong: all said at once
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=10_000)
    wait_mode(page, 1, 1, "weights")
    note = page.inner_text("#note")
    assert note.startswith("This dump has no layer 3 (its layers are 0 to 1) and no head 9 (its heads are 0 to 1): "
                           "showing layer 1, head 1. Unknown viewer mode \"rollout\"")
    page.close()


# --- the panels -------------------------------------------------------------------------------------


def pin(page, layer: int, head: int, query: int) -> None:
    """Select (layer, head), click token query and wait for the panels to show it."""
    page.evaluate(f"window.glimpseViewer.select({layer}, {head})")
    if not (state(page)["pinned"] and state(page)["hover"] == query):
        page.click(f'#tokens .tok[data-i="{query}"]')
    page.wait_for_function(f"document.getElementById('steps').dataset.shown === '{layer},{head},{query}'",
                           timeout=10_000)


def test_the_steps_panel_shows_the_mechanisms_numbers_in_chromium(tmp_path, browser, traced):  # noqa: F811
    mechanism, _, _ = traced
    L, H, T = mechanism.shape
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    layer, head, i = 1, 0, 17
    pin(page, layer, head, i)
    steps = page.evaluate("window.glimpseViewer.steps()")
    q, k = mechanism.q[layer, head].astype(np.float64), mechanism.k[layer, head].astype(np.float64)  # (T, hs)
    hs = q.shape[1]
    np.testing.assert_allclose(steps["q"], q[i], rtol=1e-3, atol=1e-3)
    assert steps["scale"] == pytest.approx(1 / math.sqrt(hs)) and steps["kind"] == "scaled_dot"
    keys = steps["keys"]
    assert [key["j"] for key in keys] == list(range(T))
    dots = k @ q[i]  # (T,) q.k for every key, the masked ones too: the mask comes after
    np.testing.assert_allclose([key["qk"] for key in keys], dots, rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose([key["scaled"] for key in keys], dots / math.sqrt(hs), rtol=5e-3, atol=5e-3)
    visible = [key for key in keys if not key["masked"]]
    assert [key["j"] for key in visible] == list(range(i + 1))
    np.testing.assert_allclose([key["score"] for key in visible], mechanism.scores[layer, head, i, : i + 1],
                               rtol=2e-3, atol=2e-3)
    assert all(key["score"] == -math.inf and key["weight"] == 0 for key in keys[i + 1:])
    np.testing.assert_allclose([key["weight"] for key in keys], mechanism.weights[layer, head, i], atol=2e-3)
    np.testing.assert_allclose(steps["context"], mechanism.context[layer, head, i], rtol=1e-2, atol=2e-3)
    top = int(mechanism.head_out_norm[layer, head, i].argmax())
    assert top != mechanism.weights[layer, head, i].argmax()  # here the heaviest key is not the one that moved most
    assert steps["top_moved"]["key"] == top and steps["top_moved"]["token"] == mechanism.tokens[top]
    assert steps["top_moved"]["value"] == pytest.approx(mechanism.head_out_norm[layer, head, i, top], rel=1e-2)

    # the rows on screen: the 8 heaviest keys, the one that moved most and the first masked one, with the numbers
    heaviest = set(np.argsort(-mechanism.weights[layer, head, i])[:8].tolist())
    assert top not in heaviest and set(steps["listed"]) == heaviest | {top, i + 1}
    row = page.locator(f'#steps-table tr[data-key="{top}"]')
    assert "top" in row.get_attribute("class")
    assert on_page(keys[top]["weight"]) in row.inner_text() and on_page(keys[top]["score"]) in row.inner_text()
    assert "masked" in page.locator(f'#steps-table tr[data-key="{i + 1}"]').get_attribute("class")
    assert "−∞" in page.locator(f'#steps-table tr[data-key="{i + 1}"]').inner_text()
    assert f"moved most from key #{top}" in page.inner_text("#steps-moved")
    assert on_page(steps["context"][0]) in page.inner_text("#steps-context")
    shown = page.inner_text("#steps")
    assert f"× 1/√{hs} = × {1 / math.sqrt(hs):.4f}" in shown  # the recipe's factor, as the table divides by it
    assert f"… {T - 2 - i} more keys after the query" in shown  # the masked keys past the one listed
    page.check("#steps-all")  # every key, the masked ones greyed
    page.wait_for_function(f"window.glimpseViewer.steps().listed.length === {T}", timeout=10_000)
    assert page.locator("#steps-table tr.masked").count() == T - 1 - i
    assert errors == []
    page.close()


DRAWN_ROWS = """() => {
    const rgb = (e) => (getComputedStyle(e).backgroundColor.match(/\\d+/g) || []).slice(0, 3).map(Number);
    const seen = (e) => (e ? +getComputedStyle(e).opacity * seen(e.parentElement) : 1);  // faded by any ancestor
    const strip = (box) => ({ title: box.title, colours: Array.from(box.children, rgb),
                             cell: box.children.length ? box.children[0].getBoundingClientRect().width : 0,
                             opacity: seen(box) });
    const rows = Array.from(document.querySelectorAll('#steps-table tr'));
    const head = Array.from(rows[0].children, (th) => th.textContent);
    return {
        q: strip(document.querySelector('#steps .recipe .strip')),
        context: strip(document.querySelector('#steps-context .strip')),
        key: { ...strip(document.querySelector('#steps-key .strip')),
               text: document.querySelector('#steps-key').textContent },
        rows: rows.filter((tr) => tr.dataset.key !== undefined).map((tr) => ({
            key: +tr.dataset.key, masked: tr.classList.contains('masked'),
            cells: Object.fromEntries(Array.from(tr.children, (td, n) => [head[n], {
                text: td.textContent, colour: getComputedStyle(td).color.match(/\\d+/g).slice(0, 3).map(Number),
                strips: Array.from(td.querySelectorAll('.strip'), strip),
                bars: Array.from(td.querySelectorAll('.bar i'), (i) => ({ left: parseFloat(i.style.left),
                    width: parseFloat(i.style.width), colour: rgb(i) })),
            }])),
        })),
    };
}"""


def lut_index(colour, lut: np.ndarray) -> int:
    """Which entry of a colour map a colour on the page is (the nearest)."""
    return int(np.abs(lut.astype(int) - np.asarray(colour, dtype=int)).sum(axis=1).argmin())


def check_strip(shown: dict, values, span: float, lut: np.ndarray, name: str):
    """A strip on the page: a cell per number, coloured on the diverging scale of ±span, the numbers on hover."""
    values = np.asarray(values, dtype=np.float64)
    expected = np.clip(np.rint(127.5 + 127.5 * values / span), 0, 255)
    got = [lut_index(c, lut) for c in shown["colours"]]
    assert len(got) == len(values) and np.abs(np.array(got) - expected).max() <= 1, (name, got, expected.tolist())
    title, numbers = shown["title"].split(": ")
    assert title == name
    np.testing.assert_allclose([page_number(x) for x in numbers.split(" ")], values, atol=0.0051)  # 2 decimals


@pytest.mark.parametrize("where", ["a key holds the largest number", "the query holds the largest number"])
def test_the_steps_panel_draws_the_numbers_as_strips_and_bars_in_chromium(tmp_path, browser, traced, where):  # noqa: F811
    """Every strip and bar of the steps panel against the numbers it draws: q and each listed k_j on one scale
    (the largest of them), q⊙k_j on the products' own, weight·v_j and c_i on theirs; the q·k bars from the middle
    (red above 0, blue below, the largest filling its half), the weight bars from the left. The masked key's row
    is faded, with no weight·v_j (nothing moved)."""
    mechanism, _, _ = traced
    L, H, T = mechanism.shape
    half = lambda a: np.asarray(a, dtype=np.float16).astype(np.float64)  # noqa: E731  (the page's copy)
    if where.startswith("a key"):
        layer, head, i = 0, 0, 17  # its q·k of both signs
    else:  # the first query of a head whose q outgrows the keys up to the masked one listed
        layer, head, i = next((la, h, i) for la in range(L) for h in range(H) for i in range(T - 1)
                              if np.abs(mechanism.q[la, h, i]).max() > 1.2 * np.abs(mechanism.k[la, h, : i + 2]).max())
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    pin(page, layer, head, i)
    q = half(mechanism.q[layer, head, i])
    k, v = half(mechanism.k[layer, head]), half(mechanism.v[layer, head])  # (T, hs)
    assert (np.abs(q).max() > np.abs(k[: i + 2]).max()) == where.startswith("the query")  # each scale decided by it
    signs = set()
    for every_key in (False, True):  # the listed keys, then all of them: the scales follow what is on screen
        if every_key:
            page.check("#steps-all")
            page.wait_for_function(f"window.glimpseViewer.steps().listed.length === {T}", timeout=10_000)
        steps, drawn = page.evaluate("window.glimpseViewer.steps()"), page.evaluate(DRAWN_ROWS)
        signs |= check_drawn_steps(steps, drawn, q, k, v, i)
    assert signs == {True, False}  # q·k bars drawn in both directions
    assert errors == []
    page.close()


def check_drawn_steps(steps: dict, drawn: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray, i: int) -> set[bool]:
    """The steps panel's strips and bars (DRAWN_ROWS) against the numbers they draw; the signs of the q·k drawn."""
    lut = colormap_bytes("RdBu_r")
    keys, rows = steps["keys"], drawn["rows"]
    listed = [row["key"] for row in rows]
    assert listed == steps["listed"] and i + 1 in listed  # the first masked key is always listed
    weight = np.array([keys[j]["weight"] for j in listed])
    qk_span = max(np.abs(q).max(), np.abs(k[listed]).max())
    products = k[listed] * q  # (listed, hs)
    weighted = v[listed] * weight[:, None]
    v_span = max(np.abs(weighted).max(), np.abs(steps["context"]).max())
    dot_span = max(abs(keys[j]["qk"]) for j in listed)
    check_strip(drawn["q"], q, qk_span, lut, f"q_{i}")
    check_strip(drawn["context"], steps["context"], v_span, lut, f"c_{i}")
    check_strip(drawn["key"], [-1, -0.5, 0, 0.5, 1], 1, lut, "the colour scale")  # the strips' legend, on their map
    assert "blue below 0" in drawn["key"]["text"] and "red above" in drawn["key"]["text"]
    assert drawn["q"]["cell"] == min(4, 96 // q.shape[0])
    for n, (row, j) in enumerate(zip(rows, listed)):
        cells = row["cells"]
        check_strip(cells["k_j"]["strips"][0], k[j], qk_span, lut, f"k_{j}")
        check_strip(cells["q⊙k_j"]["strips"][0], products[n], np.abs(products).max(), lut, f"q⊙k_{j}")
        qk = keys[j]["qk"]
        (qk_bar,), (weight_bar,) = cells["q·k"]["bars"], cells["weight"]["bars"]
        width = min(1.0, abs(qk) / dot_span) * 30
        assert qk_bar["width"] == pytest.approx(width, abs=0.01) and qk_bar["colour"] == (
            [192, 57, 43] if qk >= 0 else [33, 102, 172]), (j, qk_bar)
        assert qk_bar["left"] == pytest.approx(30 if qk >= 0 else 30 - width, abs=0.01)
        assert (weight_bar["left"], weight_bar["width"]) == (0, pytest.approx(60 * keys[j]["weight"], abs=0.01))
        assert row["masked"] == (j > i)
        if row["masked"]:
            assert cells["weight·v_j"]["strips"] == [] and cells["moved"]["text"] == "0"
            assert cells["k_j"]["strips"][0]["opacity"] < 1 and min(cells["key"]["colour"]) > 150  # faded, grey
        else:
            check_strip(cells["weight·v_j"]["strips"][0], weighted[n], v_span, lut, f"weight·v_{j}")
            assert cells["k_j"]["strips"][0]["opacity"] == 1 and max(cells["key"]["colour"]) < 100
    assert max(bar["width"] for row in rows for bar in row["cells"]["q·k"]["bars"]) == pytest.approx(30)
    return {keys[j]["qk"] >= 0 for j in listed}


def steps_table(page) -> list[dict]:
    """#steps-table's rows as shown: {"key": j or None, "cells": {column: text}, "text": the row's text}."""
    return page.evaluate("""() => {
        const rows = Array.from(document.querySelectorAll('#steps-table tr'));
        const head = Array.from(rows[0].children, (th) => th.textContent);
        return rows.slice(1).map((tr) => ({
            key: tr.dataset.key === undefined ? null : +tr.dataset.key,
            masked: tr.classList.contains('masked'),
            cells: tr.dataset.key === undefined ? {} : Object.fromEntries(
                Array.from(tr.children, (td, n) => [head[n], td.textContent])),
            text: tr.textContent,
        }));
    }""")


def page_number(text: str) -> float:
    """A number as the panels write it (a true minus sign) back to a float."""
    return float(text.replace("−", "-").replace("≈", ""))


def test_a_small_amount_moved_reads_to_three_significant_digits_in_chromium(tmp_path, browser, traced):  # noqa: F811
    """What a head moves can be tiny (a big model, a faint head): under 0.01 the panel writes three significant
    digits (0.00412), never fewer (0.004) nor a zero."""
    mechanism, meta, token_text = traced
    layer, head, i = 1, 0, 17
    shrink = 0.008 / mechanism.head_out_norm[layer, head, i].max()  # the most moved: 0.008, the rest less
    small = dataclasses.replace(mechanism, value_out_norm=mechanism.value_out_norm * shrink)
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, (small, meta, token_text)))
    pin(page, layer, head, i)
    moved = [row["cells"]["moved"] for row in steps_table(page) if row["key"] is not None and not row["masked"]]
    assert sum(0.001 <= page_number(text) < 0.01 for text in moved) >= 2
    assert all(re.fullmatch(r"0\.0*[1-9]\d\d", text) for text in moved), moved
    assert errors == []
    page.close()


@pytest.mark.parametrize("query", [25, 39])  # keys before the first masked one skipped; the last query, none masked
def test_every_skipped_key_of_a_long_row_is_summed_up_in_chromium(tmp_path, browser, query):  # noqa: F811
    traced = traced_model(n_tokens=40, block_size=40, seed=0)
    mechanism = traced[0]
    layer, head = 1, 0
    weights = mechanism.weights[layer, head, query, : query + 1]
    listed = set(np.argsort(-weights)[:8].tolist()) | {int(mechanism.head_out_norm[layer, head, query].argmax())}
    assert weights[max(listed) + 1:].sum() > 0.1  # the keys after the last one listed weigh enough to be missed
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    pin(page, layer, head, query)
    rows = steps_table(page)
    shown = [row for row in rows if row["key"] is not None and not row["masked"]]
    assert {row["key"] for row in shown} == listed
    summaries = [row["text"] for row in rows if row["key"] is None and "masked" not in row["text"]]
    sums = [page_number(re.search(r"(?:sum to|weight) (\S+)$", text).group(1)) for text in summaries]
    total = sum(page_number(row["cells"]["weight"]) for row in shown) + sum(sums)
    assert total == pytest.approx(1.0, abs=0.0005 * (len(shown) + len(sums)))  # each rounded to 3 digits
    # the summary rows name every key left out, once, in order with the listed ones
    named = []
    for row in rows:
        if row["key"] is not None and not row["masked"]:
            named.append(row["key"])
        elif span := re.search(r"keys? #(\d+)(?:–#(\d+))?:", row["text"]):
            named += list(range(int(span.group(1)), int(span.group(2) or span.group(1)) + 1))
    assert named == list(range(query + 1))
    for text in summaries:  # one key left out is named alone: "key #7: weight", never "keys #7–#7"
        span = re.search(r"keys? #(\d+)(?:–#(\d+))?:", text)
        assert text.startswith("… key #") == (span.group(2) is None) and span.group(1) != span.group(2), text
    if query + 1 < mechanism.shape[2]:  # the first masked key still follows them
        assert rows[-2]["key"] == query + 1 and rows[-2]["masked"]
    assert errors == []
    page.close()


@pytest.mark.parametrize("variant,embeddings", [
    ({}, "token and position embeddings"),
    ({"pos_encoding": "rope"}, "token embeddings"),
    ({"pos_encoding": "sinusoidal"}, "token and position embeddings"),  # added to the token's, as learned ones are
    ({"pos_encoding": "alibi", "smear": True}, "token embeddings (with the smear's share of the previous token's)"),
    ({"tie_embeddings": False}, "token and position embeddings")])
def test_the_attribution_and_lens_say_what_their_parts_hold_in_chromium(tmp_path, browser, variant,  # noqa: F811
                                                                       embeddings):
    traced = traced_model(n_tokens=12, block_size=12, seed=1, **variant)
    mechanism = traced[0]
    # a prompt as long as the text: no generated tokens, so no dashed line for the caption to explain
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced, prompt_len=12))
    assert "dashed" not in page.inner_text("#mode-caption")
    pin(page, 1, 0, 7)
    parts = page.evaluate("window.glimpseViewer.attribution()")["parts"]
    assert parts[0]["name"] == embeddings
    assert parts[0]["value"] == pytest.approx(mechanism.attribution["embed"][7], rel=1e-5, abs=1e-6)
    box = page.inner_text("#attribution")
    assert "What each head adds straight to the prediction at query #7" in box
    assert "Direct shares only" in box and "--head_importance" in box
    # the lens's first row reads the token back through a tied head, and the page says so only then
    assert ("the first row mostly names the token itself" in page.inner_text("#lens")) == variant.get(
        "tie_embeddings", True)
    assert errors == []
    page.close()


def test_the_attribution_and_lens_panels_show_the_mechanisms_numbers_in_chromium(tmp_path, browser, traced):  # noqa: F811
    mechanism, _, _ = traced
    L, H, T = mechanism.shape
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    i = 11
    pin(page, 0, 1, i)
    shown = page.evaluate("window.glimpseViewer.attribution()")
    predicted = int(mechanism.predicted[i])
    assert shown["predicted"] == {"id": predicted, "text": WORDS[predicted]}
    assert shown["logit"] == pytest.approx(mechanism.logit[i], rel=1e-5)
    np.testing.assert_allclose(shown["heads"], mechanism.attribution["heads"][:, :, i], rtol=1e-5, atol=1e-6)
    parts = {part["name"]: part["value"] for part in shown["parts"]}
    assert parts["token and position embeddings"] == pytest.approx(mechanism.attribution["embed"][i], rel=1e-5)
    for layer in range(L):
        assert parts[f"layer {layer}: MLP"] == pytest.approx(mechanism.attribution["mlp"][layer, i], rel=1e-5, abs=1e-6)
    assert shown["sum"] == pytest.approx(mechanism.logit[i], rel=1e-4, abs=1e-4)  # the parts add up to the logit
    assert f"the logit is {on_page(mechanism.logit[i])}" in page.inner_text("#dla-sum")
    assert WORDS[predicted] in page.inner_text("#dla-predicted")
    cell = page.locator('#dla-grid td.cell[data-layer="1"][data-head="0"]')
    assert cell.inner_text() == on_page(mechanism.attribution["heads"][1, 0, i], 2)
    # each head's cell on a diverging scale centred on 0 (white), spanning ± the largest share: red raises the
    # logit, blue lowers it
    heads = mechanism.attribution["heads"][:, :, i]  # (L, H)
    assert heads.min() < 0 < heads.max()
    span, diverging = np.abs(heads).max(), colormap_bytes("RdBu_r")
    for (layer, head), x in np.ndenumerate(heads):
        background = page.locator(f'#dla-grid td.cell[data-layer="{layer}"][data-head="{head}"]').evaluate(
            "cell => getComputedStyle(cell).backgroundColor")
        expected = diverging[int(np.clip(np.floor(127.5 + 127.5 * x / span + 0.5), 0, 255))]
        assert np.abs(np.array(re.findall(r"\d+", background), dtype=int) - expected).max() <= 3, (layer, head, x)
    assert page.inner_text("#dla-predicted").endswith(f"(the text goes on with {mechanism.tokens[i + 1]})")
    # white numbers on the darkest cells, red or blue: the first query whose heads include a strongly negative one
    dark = next(q for q in range(T) if (mechanism.attribution["heads"][:, :, q] < -0.6 * np.abs(
        mechanism.attribution["heads"][:, :, q]).max()).any())
    for q in (dark, i):
        pin(page, 0, 1, q)
        heads_q = mechanism.attribution["heads"][:, :, q]
        for (layer, head), x in np.ndenumerate(heads_q):
            ink = page.locator(f'#dla-grid td.cell[data-layer="{layer}"][data-head="{head}"]').evaluate(
                "cell => getComputedStyle(cell).color")
            white = abs(x) > 0.6 * np.abs(heads_q).max()
            assert ink == ("rgb(255, 255, 255)" if white else "rgb(34, 34, 34)"), (q, layer, head, x)
    assert "selected" in page.locator('#dla-grid td.cell[data-layer="0"][data-head="1"]').get_attribute("class")
    cell.click()  # a cell selects its head; the panels follow
    page.wait_for_function(f"document.getElementById('steps').dataset.shown === '1,0,{i}'", timeout=10_000)
    assert (state(page)["layer"], state(page)["head"]) == (1, 0)
    assert "selected" in page.locator('#dla-grid td.cell[data-layer="1"][data-head="0"]').get_attribute("class")

    lens = page.evaluate("window.glimpseViewer.lens()")
    assert len(lens["rows"]) == L + 1
    assert "the likeliest next token and its probability, then the next four's" in page.inner_text("#lens")
    # row 0 reads the stream entering block 0, row l + 1 the stream leaving block l
    labels = [page.locator(f'#lens tr[data-row="{r}"] td').first.inner_text() for r in range(L + 1)]
    assert labels == ["embeddings (into block 0)"] + [f"after block {layer}" for layer in range(L)]
    for row, ids, probs in zip(lens["rows"], mechanism.lens_ids[:, i], mechanism.lens_probs[:, i]):
        assert [t["id"] for t in row["top"]] == ids.tolist()
        assert [t["text"] for t in row["top"]] == [WORDS[j] for j in ids]
        np.testing.assert_allclose([t["p"] for t in row["top"]], probs, rtol=1e-5)
    last = page.locator(f'#lens tr[data-row="{L}"]')
    assert WORDS[mechanism.lens_ids[L, i, 0]] in last.inner_text()
    assert f"{100 * mechanism.lens_probs[L, i, 0]:.1f}%" in last.inner_text()
    for r in range(L + 1):  # the runners-up in whole percents; the last block's row, the model's own, in bold
        row = page.locator(f'#lens tr[data-row="{r}"]')
        runners_up = zip(mechanism.lens_ids[r, i, 1:], mechanism.lens_probs[r, i, 1:])
        expected = " · ".join(f"{WORDS[j]} {on_page(100 * p, 0)}%" for j, p in runners_up)
        assert row.locator("td.also").inner_text() == expected
        weight = row.locator("td").first.evaluate("td => getComputedStyle(td).fontWeight")
        assert (weight == "600") == (r == L), (r, weight)
    pin(page, 1, 0, T - 1)  # the last token: no text goes on after it
    assert "the text goes on" not in page.inner_text("#dla-predicted")
    assert errors == []
    page.close()


def test_a_capped_models_attribution_shows_the_logit_before_and_after_the_cap_in_chromium(tmp_path, browser):  # noqa: F811
    model, ids = sharp_model(n_tokens=20, block_size=20, seed=3, logit_softcap=0.1)  # a cap that bites
    mechanism = trace(model, ids, [WORDS[i] for i in ids])
    traced = mechanism, {"model_config": asdict(model.config)}, lambda ids: [WORDS[i] for i in ids]
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor(ids)[None])  # (1, T, V), through the model's own cap
    i = 12
    predicted = int(mechanism.predicted[i])
    own = float(logits[0, i, predicted])
    assert abs(own - mechanism.logit[i]) > 0.05  # the cap changes this logit
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    pin(page, 0, 1, i)
    shown = page.evaluate("window.glimpseViewer.attribution()")
    assert shown["softcap"] == pytest.approx(0.1) and shown["capped_logit"] == pytest.approx(own, abs=1e-5)
    assert shown["logit"] == pytest.approx(mechanism.logit[i], rel=1e-5)
    assert shown["sum"] == pytest.approx(mechanism.logit[i], abs=1e-4)  # the parts sum to the logit before the cap
    predicted_line, total_line = page.inner_text("#dla-predicted"), page.inner_text("#dla-sum")
    assert f"logit {on_page(own)}" in predicted_line and "logit_softcap" in predicted_line
    assert f"{on_page(mechanism.logit[i])} before the cap" in predicted_line
    assert f"the logit before the cap is {on_page(mechanism.logit[i])}" in total_line
    assert "before the cap" in page.inner_text("#attribution .hint")
    assert errors == []
    page.close()


@pytest.mark.parametrize("variant", [dict(pos_encoding="rope", qk_norm=True), dict(pos_encoding="rope"),
                                     dict(qk_norm=True), {}])
def test_the_recipe_says_what_q_and_k_went_through_before_the_dot_product_in_chromium(tmp_path, browser, variant):  # noqa: F811
    traced = traced_model(n_tokens=12, block_size=12, seed=4, **variant)
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    pin(page, 0, 0, 5)
    origin = page.inner_text("#steps-qk")
    assert "ln_1" in origin  # every model: the projections of the block's normalised input
    assert "holds them as float16" in origin  # why its numbers may differ a little from the dump's float32 ones
    # in glimpse/self_attention.py's order (tests/test_mechanism.py's forward written out checks it): qk_norm, rope
    assert ("qk_norm" in origin) == variant.get("qk_norm", False)
    assert ("RoPE" in origin) == (variant.get("pos_encoding") == "rope")
    if len(variant) == 2:
        assert origin.index("qk_norm") < origin.index("RoPE")
    if variant:
        assert "W_q·x alone" in origin
    else:
        assert "RMS" not in origin and "position embeddings" in origin  # learned: positions came in the input
    # and the query at each stage before the scores took it: W_q·x, then qk_norm's where RoPE turns it after
    stages = page.eval_on_selector_all("li.stage", "items => items.map((li) => [li.dataset.stage, "
                                       "li.querySelector('.strip').title, li.textContent])")
    qk_norm, rope = variant.get("qk_norm", False), variant.get("pos_encoding") == "rope"
    expected = ["q_projected"] * (qk_norm or rope) + ["q_normed"] * (qk_norm and rope)
    assert [name for name, _, _ in stages] == expected
    mechanism = traced[0]
    for name, title, text in stages:
        values = getattr(mechanism, name)[0, 0, 5]
        shown = [float(x.replace("−", "-")) for x in title.split(": ")[1].split()]
        np.testing.assert_allclose(shown, values, atol=0.006 + 2e-3 * np.abs(values).max())  # float16, 2 places
        length = float(text.rsplit("length ", 1)[1].split()[0].replace("−", "-"))
        norm = float(np.linalg.norm(values))
        assert length == pytest.approx(norm, abs=0.002 + 2e-3 * norm)
    if variant.get("pos_encoding") == "rope":  # a turn keeps the length qk_norm (or the projection) gave
        last = getattr(mechanism, expected[-1])[0, 0, 5]
        query = page.inner_text("#steps li:has(.strip[title^='q_5'])")
        assert float(query.rsplit("length ", 1)[1].split()[0]) == pytest.approx(float(np.linalg.norm(last)), abs=0.01)
        # float16 copies of one vector's turns can round apart in the last digit shown: said where it says "keeps"
        assert "keeps the length; in this page's float16 copies, up to the last digit" in query
    assert errors == []
    page.close()


def signed_on_page(x: float) -> str:
    """A signed number as the page writes it: + before a positive one, none before a zero."""
    text = on_page(x)
    return ("+" if float(text.replace("−", "-")) > 0 else "") + text


@pytest.mark.parametrize("variant", [{}, {"pos_encoding": "alibi"}])
def test_a_number_shown_in_two_places_reads_the_same_in_both_in_chromium(tmp_path, browser, variant):  # noqa: F811
    traced = traced_model(n_tokens=40, block_size=40, seed=0, **variant)
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    layer, head, scaled = 1, 0, "÷√8"
    page.evaluate("window.glimpseViewer.showAllKeys(true)")  # every key's row
    for query in (25, 39):
        pin(page, layer, head, query)
        page.locator("#overlay").scroll_into_view_if_needed()  # its last rows can lie below the window
        box = page.locator("#overlay").bounding_box()
        rows = {row["key"]: row["cells"] for row in steps_table(page) if row["key"] is not None and not row["masked"]}
        assert sorted(rows) == list(range(query + 1))
        for j, cells in rows.items():
            if variant:  # ALiBi's penalty is -slope x distance, not the rounding noise of a difference
                slope = float(alibi_slopes(2)[head])
                assert cells["ALiBi"] == signed_on_page(-slope * (query - j)), (query, j, cells)
            else:  # the score is the scaled q.k: the same number in both columns
                assert cells[scaled] == cells["score"], (query, j, cells)
        # the weights the list under the text gives are the panel's
        info = page.inner_text("#info").splitlines()
        listed = re.findall(r"#(\d+) \S+ (\S+)", next(line for line in info if line.startswith("attends to")))
        assert len(listed) == 5
        for j, text in listed:
            assert text == rows[int(j)]["weight"], (query, j, text)
        # and so does the readout under the mouse, in more digits
        for j in (query, query - 1, 3):
            page.mouse.move(box["x"] + (j + 0.5) / 40 * box["width"], box["y"] + (query + 0.5) / 40 * box["height"])
            number = re.search(r": (\S+)$", page.inner_text("#readout")).group(1)
            assert on_page(float(number)) == rows[j]["weight"], (query, j, number)
        page.click(f'#tokens .tok[data-i="{query}"]')  # let go, for the next query
    assert errors == []
    page.close()


@pytest.mark.parametrize("variant", [{"attn_score": "dot"}, {"attn_score": "additive"}, {"pos_encoding": "alibi"},
                                     {"attn_score": "additive", "pos_encoding": "alibi"}])
def test_the_steps_follow_the_models_own_scoring_in_chromium(tmp_path, browser, variant):  # noqa: F811
    traced = traced_model(n_tokens=20, block_size=20, seed=2, **variant)
    mechanism = traced[0]
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    layer, head, i = 1, 1, 9
    pin(page, layer, head, i)
    steps = page.evaluate("window.glimpseViewer.steps()")
    keys = [key for key in steps["keys"] if not key["masked"]]
    np.testing.assert_allclose([key["score"] for key in keys], mechanism.scores[layer, head, i, : i + 1],
                               rtol=2e-3, atol=2e-3)
    dots = mechanism.k[layer, head].astype(np.float64) @ mechanism.q[layer, head, i]  # (T,)
    recipe = page.inner_text("#steps .recipe")
    if variant.get("attn_score") == "dot":  # not scaled: the score is q.k itself
        assert steps["scale"] == 1 and "not scaled" in recipe
        np.testing.assert_allclose([key["scaled"] for key in keys], dots[: i + 1], rtol=5e-3, atol=5e-3)
    if variant.get("attn_score") == "additive":  # no dot product to show: the scores alone
        assert all(key["qk"] is None for key in steps["keys"]) and "own small network" in recipe
        assert "q·k" not in page.inner_text("#steps-table tr >> nth=0")
    if variant.get("pos_encoding") == "alibi":  # a penalty of -slope x distance, beside the scaled q.k or the network's
        slope = float(alibi_slopes(2)[head])
        expected = [-slope * (i - key["j"]) for key in keys]
        np.testing.assert_allclose([key["penalty"] for key in keys], expected, atol=5e-3)
        assert "ALiBi" in recipe and "ALiBi" in page.inner_text("#steps-table tr >> nth=0")
        if variant.get("attn_score") == "additive":  # what the network gave is the score less the penalty
            np.testing.assert_allclose([key["network"] for key in keys],
                                       mechanism.scores[layer, head, i, : i + 1] - expected, rtol=2e-3, atol=2e-3)
            assert "w·tanh" in page.inner_text("#steps-table tr >> nth=0")
    assert errors == []
    page.close()


def test_the_window_says_what_was_cut_in_chromium(tmp_path, browser, traced):  # noqa: F811
    mechanism, _, _ = traced
    T = mechanism.shape[2]
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    assert mechanism.cut == 6
    text = page.inner_text("#window")
    assert f"last {T} tokens" in text and "6 tokens before them" in text and "block_size (24)" in text
    assert page.evaluate("document.body.dataset.cut") == "6" and state(page)["cut"] == 6
    whole = write_viewer(tmp_path / "whole.html", synthetic_attention(1, 1, 8), list("abcdefgh"), 3, {})
    page2, errors2, _ = open_viewer(browser, whole)
    assert not page2.locator("#window").is_visible() and page2.evaluate("document.body.dataset.cut") == "0"
    assert errors == [] and errors2 == []
    page.close()
    page2.close()


def test_the_keyboard_pins_tokens_and_the_controls_say_what_they_act_on_in_chromium(tmp_path, browser, traced):  # noqa: F811
    """[ and ] pin the token before or after the pinned one (the first or last when none is), so the panels
    open without a mouse; the pinned row clicked again lets go, as its token does; s leaves the scale alone in
    scores mode, which has none; the scale says what its root is of, and the thumbnails that they stay weights."""
    page, errors, _ = open_viewer(browser, write_mechanism_viewer(tmp_path, traced))
    T = state(page)["T"]
    page.hover('#tokens .tok[data-i="10"]')  # a token under the mouse is not pinned: ] starts from the first
    assert (state(page)["hover"], state(page)["pinned"]) == (10, False)
    for key, want in [("]", 0), ("]", 1), ("]", 2), ("[", 1), ("[", 0), ("[", 0), ("Escape", None), ("[", T - 1),
                      ("]", T - 1)]:
        page.keyboard.press(key)
        assert (state(page)["hover"], state(page)["pinned"]) == (want, want is not None), key
        if want is not None:  # the panels follow the pin
            page.wait_for_function(f"document.getElementById('steps').dataset.shown === '0,0,{want}'", timeout=10_000)
    L, H = state(page)["n_layer"], state(page)["n_head"]
    for key, want in [("ArrowUp", (L - 1, 0)), ("ArrowDown", (0, 0)), ("ArrowLeft", (0, H - 1)),
                      ("ArrowRight", (0, 0))]:
        page.keyboard.press(key)  # around in both directions
        assert (state(page)["layer"], state(page)["head"]) == want, key
    page.focus("#steps-all")  # a focused checkbox keeps the keys to itself
    for key in ("]", "ArrowRight", "Escape"):
        page.keyboard.press(key)
        assert (state(page)["hover"], state(page)["pinned"], state(page)["head"]) == (T - 1, True, 0), key
    page.locator("#steps-all").blur()
    page.keyboard.press("Escape")
    page.evaluate("window.scrollTo(0, 0)")  # focusing the checkbox scrolled it into view
    box = page.locator("#overlay").bounding_box()
    row = (3 + 0.5) / T * box["height"] + box["y"]
    page.mouse.click(box["x"] + 2, row)
    assert state(page)["pinned"] and state(page)["hover"] == 3
    page.mouse.move(box["x"] + 2, (5 + 0.5) / T * box["height"] + box["y"])  # over another row: the pin holds
    assert state(page)["pinned"] and state(page)["hover"] == 3
    page.mouse.click(box["x"] + 2, row)
    assert not state(page)["pinned"]
    assert page.inner_text("#thumbs-note") == "" and page.inner_text("#scale") .startswith("√ weight")
    page.evaluate("window.glimpseViewer.setMode('scores')")
    page.keyboard.press("s")
    assert state(page)["scale"] == "sqrt" and "weights" in page.inner_text("#thumbs-note")
    page.evaluate("window.glimpseViewer.setMode('moved')")
    page.keyboard.press("s")
    assert state(page)["scale"] == "linear" and page.locator("#scale option").first.inner_text() == "√ moved"
    assert errors == []
    page.close()


def test_an_address_that_names_no_head_says_so_in_chromium(tmp_path, browser):  # noqa: F811
    path = write_viewer(tmp_path / "v.html", synthetic_attention(2, 2, 8), list("abcdefgh"), 3, {})
    page, errors, _ = open_viewer(browser, path)
    page.goto(path.as_uri() + "#layer=-1&head=x")
    page.wait_for_function("document.body.dataset.ready", timeout=10_000)
    assert "layer=-1 and head=x are not a layer or head number" in page.inner_text("#note")
    page.evaluate("window.glimpseViewer.select(1, 1)")  # a choice made clears it
    assert page.inner_text("#note") == ""
    assert errors == []
    page.close()


def test_a_loss_change_that_rounds_to_zero_reads_as_neither_cost_nor_gain_in_chromium(tmp_path, browser):  # noqa: F811
    importance = {"loss_increase": [[-0.0001, 0.2], [-0.3, 0.0004]]}
    path = write_viewer(tmp_path / "v.html", synthetic_attention(2, 2, 8), list("abcdefgh"), 3, {},
                        importance=importance)
    page, errors, _ = open_viewer(browser, path)
    costs = page.eval_on_selector_all(".thumb .cost", "cs => cs.map(c => [c.textContent, c.className])")
    assert costs == [["Δloss 0.000", "cost none"], ["Δloss +0.200", "cost"], ["Δloss −0.300", "cost helps"],
                     ["Δloss 0.000", "cost none"]]
    assert errors == []
    page.close()


def test_heads_removed_while_sampling_are_marked_in_chromium(tmp_path, browser):  # noqa: F811
    """A removed head still computed weights, which the page draws as any head's: it says which heads the rest
    of the model never heard from, on the page, their thumbnails and the selected head's table."""
    meta = {"ablated_heads": ["1.0", "0.1"], "ablation": "mean"}
    write_dump(tmp_path / "removed", synthetic_attention(2, 2, 8), list(range(8)), list("abcdefgh"), 3, meta,
               pngs=False)
    page, errors, _ = open_viewer(browser, tmp_path / "removed" / "index.html")
    text = page.inner_text("#removed")
    assert "heads 1.0, 0.1 removed" in text and "replaced by its mean output" in text
    removed = page.eval_on_selector_all(".thumb.removed", "bs => bs.map(b => b.dataset.layer + '.' + b.dataset.head)")
    assert sorted(removed) == ["0.1", "1.0"]
    page.evaluate("window.glimpseViewer.select(1, 0)")
    assert "removed" in page.inner_text("#metrics tr >> nth=0")
    page.evaluate("window.glimpseViewer.select(1, 1)")
    assert "removed" not in page.inner_text("#metrics tr >> nth=0")
    intact, errors2, _ = open_viewer(browser, write_viewer(tmp_path / "intact.html", synthetic_attention(2, 2, 8),
                                                           list("abcdefgh"), 3, {}))
    assert not intact.locator("#removed").is_visible() and intact.locator(".thumb.removed").count() == 0
    assert errors == [] and errors2 == []
    page.close()
    intact.close()


# --- the training snapshots' slider -------------------------------------------------------------------


def test_the_snapshot_slider_keeps_the_head_across_steps_in_chromium(tmp_path, browser):  # noqa: F811
    attention = tmp_path / "attention"
    steps = [0, 50, 100, 1000]  # 1000 after 100: sorted by number, not by name
    for n, step in enumerate(reversed(steps)):
        attn = synthetic_attention(n_layer=2, n_head=3, T=16, seed=n)
        write_dump(attention / f"iter_{step}", attn, list(range(16)), [WORDS[i] for i in range(16)], 16,
                   {"iter": step}, pngs=False)
    (attention / "iter_7").mkdir()  # a snapshot whose dump was never finished: left out
    (attention / "notes").mkdir()
    index = write_snapshot_index(attention)
    assert index == attention / "index.html"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(index.as_uri())
    frame_ready = "document.getElementById('frame').dataset.loaded === 'iter_{}'"
    page.wait_for_function(frame_ready.format(1000), timeout=10_000)  # the latest snapshot first
    assert page.evaluate("JSON.parse(document.body.dataset.steps)") == steps
    assert page.inner_text("#step") == "step 1000"

    viewer = page.frame_locator("#frame")
    viewer.locator("#layer").select_option("1")
    viewer.locator("#head").select_option("2")
    page.wait_for_function("location.hash === '#step=1000&layer=1&head=2&mode=weights'", timeout=10_000)

    history = page.evaluate("history.length")
    page.locator("#slider").focus()
    for key, step in [("Home", 0), ("ArrowRight", 50)]:  # other snapshots, with the same head
        page.keyboard.press(key)
        page.wait_for_function(frame_ready.format(step), timeout=10_000)
        assert page.inner_text("#step") == f"step {step}"
        frame = page.frame(url=lambda url, step=step: f"iter_{step}/index.html" in url)
        frame.wait_for_function("document.body.dataset.painted === '1,2,sqrt'", timeout=10_000)
        assert frame.evaluate("window.glimpseViewer.state().head") == 2
    # no step is an entry of the tab's history: Back would change the frame's step under the slider's
    assert page.evaluate("history.length") == history

    page.evaluate("location.hash = '#step=100&layer=0&head=1&mode=weights'")  # an address typed by hand
    page.wait_for_function(frame_ready.format(100), timeout=10_000)
    assert page.inner_text("#step") == "step 100" and page.evaluate("document.getElementById('slider').value") == "2"
    frame = page.frame(url=lambda url: "iter_100/index.html" in url)
    frame.wait_for_function("document.body.dataset.painted === '0,1,sqrt'", timeout=10_000)
    viewer.locator("#layer").select_option("1")
    viewer.locator("#head").select_option("2")
    assert page.inner_text("#missing") == ""
    page.evaluate("location.hash = '#step=77&layer=1&head=2&mode=weights'")  # a step never taken: said, not hidden
    page.wait_for_function("document.getElementById('missing').textContent !== ''", timeout=10_000)
    assert page.inner_text("#missing") == "no snapshot of step 77 (the steps are 0 to 1000): showing step 100"
    assert page.inner_text("#step") == "step 100"

    page.click("#play")  # plays on to the last step, then stops
    page.wait_for_function(frame_ready.format(1000), timeout=30_000)
    page.wait_for_function("document.getElementById('play').textContent.includes('play')", timeout=10_000)
    frame = page.frame(url=lambda url: "iter_1000/index.html" in url)
    frame.wait_for_function("document.body.dataset.painted === '1,2,sqrt'", timeout=10_000)
    assert "layer=1&head=2" in page.evaluate("location.hash") and "step=1000" in page.evaluate("location.hash")
    assert page.inner_text("#missing") == ""  # said of the step asked for, until another is shown
    assert errors == []
    page.close()


def test_training_writes_the_snapshot_slider(trained):
    cfg, _ = trained  # snapshots at every eval: steps 0, 50, 100 and 150
    attention = Path(cfg.out_dir) / "attention"
    data = embedded_data_of(attention / "index.html", "glimpse-snapshots")
    assert data == {"steps": [0, 50, 100, 150], "folders": ["iter_0", "iter_50", "iter_100", "iter_150"]}
    assert all((attention / folder / "index.html").is_file() for folder in data["folders"])


def embedded_data_of(path: Path, element_id: str) -> dict:
    """The JSON inside <script id=element_id> of the page at path."""
    parser = ScriptCollector()
    parser.feed(path.read_text(encoding="utf-8"))
    (text,) = [text for attrs, text in parser.scripts if attrs.get("id") == element_id]
    return json.loads(text)
