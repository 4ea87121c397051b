"""The attention viewer with many heads and long texts: layers inflated on demand, the layer x head
picker, and weights that read back as given.

The browser tests wait on events the page raises (data-ready, data-painted), never on a clock. How
fast GPT-2 small's scale is (12 layers x 12 heads x 1024 tokens) is measured, not tested:

    python -m tests.test_viewer_scale            # write time and size, diffuse and peaky attention
    python -m tests.test_viewer_scale --browser  # and, in Chromium, the time to the first heatmap
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from glimpse.render import colormap_bytes
from glimpse.viewer import sqrt_bytes, write_viewer
from tests.test_render import browser, open_viewer, sample_tokens, state, synthetic_attention, wait_painted  # noqa: F401

LAYERS, HEADS, T = 6, 8, 160  # 48 thumbnails; 4 canvas pixels per cell; thumbnails pooled 4 x 4


def causal_softmax(scores: np.ndarray) -> np.ndarray:
    """(..., T, T) float32 scores -> causal softmax weights, in place."""
    size = scores.shape[-1]
    scores[..., ~np.tri(size, dtype=bool)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def gpt2_scale_attention(kind: str, n_layer: int = 12, n_head: int = 12, size: int = 1024, seed: int = 0) -> np.ndarray:
    """float16 (n_layer, n_head, size, size) weights as a dump holds them, built a layer at a time.

    "diffuse": near-uniform rows, as a freshly initialised model gives; "peaky": scores with a standard
    deviation of 5 to 8, a sink on token 0 and a previous-token diagonal, closer to a trained GPT-2 and
    much harder to compress.
    """
    rng = np.random.default_rng(seed)
    attn = np.empty((n_layer, n_head, size, size), dtype=np.float16)
    later = np.arange(1, size)
    for layer in range(n_layer):
        if kind == "diffuse":
            scores = 0.02 * rng.standard_normal((n_head, size, size), dtype=np.float32)  # (H, T, T)
        else:
            scores = rng.uniform(5, 8, (n_head, 1, 1)).astype(np.float32) * rng.standard_normal(
                (n_head, size, size), dtype=np.float32)  # (H, T, T)
            scores[:, :, 0] += 8.0
            scores[:, later, later - 1] += 8.0
        attn[layer] = causal_softmax(scores)
    return attn


def expected_pixels(weights: np.ndarray, scale: str = "sqrt") -> np.ndarray:
    """(..., 3) uint8 RGB the viewer should draw for weights (...), above the diagonal aside."""
    index = sqrt_bytes(weights).astype(int)
    if scale == "linear":
        index = np.rint(index**2 / 255).astype(int)  # (b / 255)^2 back on a 0..255 scale
    return colormap_bytes()[index]


def heatmap_cells(page, canvas: str = "heatmap", cells: int = T) -> np.ndarray:
    """(cells, cells, 3) RGB at the centre of each cell of a canvas."""
    flat = page.evaluate(
        """([id, n]) => {
            const canvas = document.getElementById(id) || document.querySelector(id);
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            const step = canvas.width / n, out = [];
            for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
                const o = (Math.floor((q + 0.5) * step) * canvas.width + Math.floor((k + 0.5) * step)) * 4;
                out.push(pixels[o], pixels[o + 1], pixels[o + 2]);
            }
            return out;
        }""",
        [canvas, cells],
    )
    return np.array(flat, dtype=np.uint8).reshape(cells, cells, 3)


def assert_shows(page, attn: np.ndarray, layer: int, head: int, scale: str = "sqrt"):
    """The heatmap shows every cell of (layer, head) in its own colour, and the masked grey above."""
    wait_painted(page, layer, head, scale)
    cells = heatmap_cells(page)
    lower = np.tri(T, dtype=bool)
    assert np.array_equal(cells[lower], expected_pixels(attn[layer, head], scale)[lower])
    assert (cells[~lower] == [0xEE, 0xEE, 0xEE]).all()


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    attn = synthetic_attention(LAYERS, HEADS, T, seed=5).astype(np.float16)  # what a dump saves
    importance = {"loss_increase": np.arange(LAYERS * HEADS).reshape(LAYERS, HEADS) / 100}
    path = write_viewer(tmp_path_factory.mktemp("viewer") / "index.html", attn, sample_tokens(T), 50, {},
                        importance=importance)
    return path, attn


def test_a_head_of_another_layer_is_inflated_and_drawn_cell_for_cell(browser, dump):  # noqa: F811
    path, attn = dump
    page, errors, _ = open_viewer(browser, path)
    assert 0 in state(page)["inflated"]
    assert_shows(page, attn, 0, 0)
    page.click('#overview .thumb[data-layer="4"][data-head="5"]')  # whether inflated yet or not
    assert_shows(page, attn, 4, 5)
    page.keyboard.press("ArrowRight")  # within the layer
    assert_shows(page, attn, 4, 6)
    page.keyboard.press("ArrowDown")  # and the last layer
    assert_shows(page, attn, 5, 6)
    page.keyboard.press("s")
    assert_shows(page, attn, 5, 6, "linear")
    assert errors == []
    page.close()


def test_the_picker_has_a_thumbnail_per_head_pooled_by_the_maximum(browser, dump):  # noqa: F811
    path, attn = dump
    page, errors, _ = open_viewer(browser, path)
    titles = page.eval_on_selector_all("#overview .thumb", "nodes => nodes.map(n => n.title)")
    assert titles == [f"layer {layer} · head {head}" for layer in range(LAYERS) for head in range(HEADS)]
    costs = page.eval_on_selector_all('#overview .thumb[data-layer="3"] .cost', "ns => ns.map(n => n.textContent)")
    assert costs == [f"+{(3 * HEADS + head) / 100:.3f}" for head in range(HEADS)]  # named once, above them all
    assert "its entropy (nats) and Δloss without it" in page.inner_text("#picker-names")
    n = T // 4
    lower = np.tri(n, dtype=bool)
    for layer, head in [(0, 0), (2, 7), (5, 3)]:
        pooled = attn[layer, head].astype(np.float32).reshape(n, 4, n, 4).max(axis=(1, 3))  # (n, n)
        cells = heatmap_cells(page, f'#overview .thumb[data-layer="{layer}"][data-head="{head}"] canvas', n)
        assert np.array_equal(cells[lower], expected_pixels(pooled)[lower]), (layer, head)
        assert (cells[~lower] == [0xEE, 0xEE, 0xEE]).all()
    page.click('#overview .thumb[data-layer="2"][data-head="7"]')
    assert (state(page)["layer"], state(page)["head"]) == (2, 7)
    assert page.eval_on_selector_all(".thumb.selected", "nodes => nodes.map(n => n.title)") == ["layer 2 · head 7"]
    assert errors == []
    page.close()


def test_weights_read_back_as_given_within_the_quantisation(browser, dump):  # noqa: F811
    path, attn = dump
    page, errors, _ = open_viewer(browser, path)
    for layer, head in [(0, 1), (3, 6), (5, 7)]:
        shown = page.evaluate(
            """async ([layer, head, T]) => {
                await window.glimpseViewer.load(layer);
                return Array.from({length: T * T},
                                  (_, n) => window.glimpseViewer.weight(layer, head, Math.floor(n / T), n % T));
            }""",
            [layer, head, T],
        )
        assert np.abs(np.array(shown).reshape(T, T) - attn[layer, head]).max() < 0.004, (layer, head)

    # and as a person reads them: the readout under the mouse, on a layer other than the first
    page.click('#overview .thumb[data-layer="3"][data-head="2"]')
    wait_painted(page, 3, 2)
    box = page.locator("#overlay").bounding_box()
    for q, k in [(159, 0), (100, 99), (77, 30), (12, 12)]:
        page.mouse.move(box["x"] + (k + 0.5) / T * box["width"], box["y"] + (q + 0.5) / T * box["height"])
        text = page.inner_text("#readout")
        assert f"query #{q} " in text and f"key #{k} " in text
        # the one-byte weight, marked approximate, to the digits it holds
        assert abs(float(re.search(r": ≈([0-9.]+)$", text).group(1)) - attn[3, 2, q, k]) < 0.004 + 5e-4, text
    page.mouse.move(box["x"] + 120.5 / T * box["width"], box["y"] + 20.5 / T * box["height"])
    assert "cannot see" in page.inner_text("#readout")
    assert errors == []
    page.close()


def test_without_the_newest_browser_features(browser, dump):  # noqa: F811
    path, attn = dump
    older = browser.new_page()  # no Uint8Array.fromBase64 (Chromium before 140, Firefox before 133): atob
    errors = []
    older.on("pageerror", lambda error: errors.append(str(error)))
    older.add_init_script("delete Uint8Array.fromBase64")
    older.goto(path.as_uri())
    older.evaluate("window.glimpseViewer.select(2, 3)")
    assert_shows(older, attn, 2, 3)
    assert errors == []
    older.close()

    oldest = browser.new_page()  # no DecompressionStream at all: it says so instead of a blank page
    oldest.add_init_script("delete window.DecompressionStream")
    oldest.goto(path.as_uri())
    oldest.wait_for_function("document.getElementById('info').textContent.includes('cannot decode')")
    assert oldest.locator("#overview .thumb").count() == LAYERS * HEADS  # the picker needs no inflating
    oldest.close()


def test_a_small_dump_keeps_its_picker_above_the_heatmap(browser, tmp_path):  # noqa: F811
    attn = synthetic_attention(2, 2, 16)
    page, errors, _ = open_viewer(browser, write_viewer(tmp_path / "index.html", attn, sample_tokens(16), 6, {}))
    overview, heatmap = (page.locator(s).bounding_box() for s in ("#overview", "#heatmap"))
    assert overview["y"] + overview["height"] <= heatmap["y"]
    assert page.locator("#overview .thumb").count() == 4
    lower = np.tri(16, dtype=bool)
    assert np.array_equal(heatmap_cells(page, cells=16)[lower], expected_pixels(attn[0, 0])[lower])
    assert errors == []
    page.close()


def test_many_heads_put_the_picker_beside_the_text_and_a_phone_sees_the_whole_page(browser, dump, tmp_path):  # noqa: F811
    """Past three layers (or six heads) the picker goes to the text's column, below the text, so that the heatmap
    and the text stay side by side; on a phone's width nothing runs past the window: the heatmap and the
    thumbnails shrink, and a picker still wider than the window scrolls by itself (12 heads)."""
    path, _ = dump
    page, errors, _ = open_viewer(browser, path)
    overview, heatmap, tokens = (page.locator(s).bounding_box() for s in ("#overview", "#heatmap", "#tokens"))
    assert overview["x"] > heatmap["x"] + heatmap["width"] and overview["y"] > tokens["y"] + tokens["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 1500
    page.close()
    small = write_viewer(tmp_path / "small.html", synthetic_attention(2, 4, 64), sample_tokens(64), 6, {})
    wide = write_viewer(tmp_path / "wide.html", synthetic_attention(3, 12, 32), sample_tokens(32), 6, {})
    for shown in (path, small, wide):
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.on("pageerror", lambda error: errors.append(str(error)))
        phone.goto(shown.as_uri())
        phone.wait_for_function("document.body.dataset.ready === 'true'", timeout=10_000)
        assert phone.evaluate("document.documentElement.scrollWidth") == 390, shown.name
        assert phone.locator("#colorbar").bounding_box()["x"] + 72 <= 390
        phone.close()
    assert errors == []


def measure(browser_too: bool, repeats: int = 3):
    """Print what writing and opening a GPT-2 small sized viewer costs: median of repeats."""
    tokens = [f"t{i}" for i in range(1024)]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("diffuse", "peaky"):
            attn = gpt2_scale_attention(kind)
            path = Path(tmp) / f"{kind}.html"
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                write_viewer(path, attn, tokens, 512, {"kind": kind})
                seconds.append(time.perf_counter() - start)
            print(f"{kind}: write_viewer {statistics.median(seconds):.2f} s (median of {repeats}), "
                  f"index.html {path.stat().st_size / 1e6:.1f} MB")
            if browser_too:
                print(f"{kind}: first heatmap painted {statistics.median(open_seconds(path, repeats)):.2f} s "
                      f"after opening (median of {repeats})")


def open_seconds(path: Path, repeats: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    from tests.test_render import CHROMIUM, CHROMIUM_ARGS

    seconds = []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for _ in range(repeats):
            page = chromium.new_page(viewport={"width": 1500, "height": 1000})
            start = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_function("document.body.dataset.ready === 'true'", timeout=60_000, polling=10)
            seconds.append(time.perf_counter() - start)
            page.close()
        chromium.close()
    return seconds


if __name__ == "__main__":
    measure(browser_too="--browser" in sys.argv)
