"""Attention pictures: a PNG per layer, and the HTML viewer, driven in a real headless Chromium.

The attention is synthetic but real: a softmax over random scores under the causal mask, with head 0
pushed towards the previous token and head 1 towards the first, so their drawings must differ.
The browser tests skip when Chromium or playwright is missing; CI installs both.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from glimpse.attention import head_metrics
from glimpse.render import (
    AXES_NOTE,
    GENERATED_COLOR,
    MAX_LABELLED_TOKENS,
    layer_figure,
    token_label,
    write_importance_image,
    write_layer_images,
)
from glimpse.viewer import sqrt_bytes, viewer_html, write_viewer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path(os.environ.get("GLIMPSE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# text a tokenizer can hand back: whitespace, a partial UTF-8 byte, HTML and matplotlib specials
SAMPLE_TOKENS = ["ROMEO", ":", "\n", " the", "\t", "\\xe2", "<b>", "&amp;", '"q"', "$x$", "</script>", "é", "",
                 " night", ".", "\r\n", "a_b", "{}", "%d", "'"]


def synthetic_attention(n_layer: int, n_head: int, T: int, seed: int = 0) -> np.ndarray:
    """(n_layer, n_head, T, T) causal softmax weights; head 0 looks one token back, head 1 at token 0."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_layer, n_head, T, T))  # (L, H, T, T)
    positions = np.arange(1, T)
    scores[:, 0, positions, positions - 1] += 8.0
    if n_head > 1:
        scores[:, 1, :, 0] += 8.0
    scores[..., ~np.tril(np.ones((T, T), dtype=bool))] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def sample_tokens(T: int) -> list[str]:
    return [SAMPLE_TOKENS[i % len(SAMPLE_TOKENS)] for i in range(T)]


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()  # the whole file decodes: no truncated chunk
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_token_label_makes_whitespace_and_control_characters_visible():
    assert token_label("\n") == "⏎"
    assert token_label(" the") == "␣the"
    assert token_label("\t\r") == "⇥\\x0d"
    # what shows as nothing, or breaks a label's line: separators, zero widths, spaces other than " "
    assert [token_label(t) for t in ("\u2028", "a\u2029b", "\u200b", "\xa0", "\u3000", "\x85", "\U000e0001")] == \
        ["\\u2028", "a\\u2029b", "\\u200b", "\\xa0", "\\u3000", "\\x85", "\\U000e0001"]
    assert token_label("é日本🙂") == "é日本🙂"  # what shows stays as it is
    assert token_label("") == "∅"
    assert token_label("\\xe2") == "\\xe2"  # an escape the tokenizer already wrote out stays as it is
    assert token_label("abcdefghijklmnop", limit=8) == "abcdefg…"
    assert token_label("abcdefgh", limit=8) == "abcdefgh"  # a label of exactly the limit is whole


def test_layer_images_with_token_labels(tmp_path):
    attn = synthetic_attention(n_layer=2, n_head=3, T=24)
    paths = write_layer_images(tmp_path / "png", attn, sample_tokens(24), prompt_len=10)
    assert paths == [tmp_path / "png" / "layer_0.png", tmp_path / "png" / "layer_1.png"]
    pixels = [read_png(p) for p in paths]
    for image in pixels:
        height, width, _ = image.shape
        assert 600 <= width <= 4000 and 300 <= height <= 3000
        assert image.std() > 20  # drawn, not a blank canvas
    assert not np.array_equal(pixels[0], pixels[1])  # the layers' weights differ, so must their pictures


def test_every_head_labels_its_rows_and_columns_with_the_tokens_generated_ones_in_red():
    attn = synthetic_attention(n_layer=1, n_head=2, T=6)
    labels = ["a", "$x$", "b", "c", "d", "e"]  # "$x$" stays text, not a formula
    fig = layer_figure(attn[0], layer=0, labels=labels, prompt_len=4)
    heads = [ax for ax in fig.axes if ax.get_title()]
    assert len(heads) == 2
    # the title says what the dashed lines and the red labels mark
    assert fig._suptitle.get_text().endswith("(dashed lines: the prompt's end; generated tokens in red)")
    for ax in heads:
        columns = [t for t in ax.texts if t.get_rotation() == 90]  # below the heatmap, one per key
        rows = [t for t in ax.texts if t.get_rotation() == 0 and t.get_text() != AXES_NOTE]  # left, one per query
        (note,) = [t for t in ax.texts if t.get_text() == AXES_NOTE]  # which way is which, in the masked corner
        assert "query ↓" in AXES_NOTE and "key →" in AXES_NOTE
        box = note.get_window_extent(FigureCanvasAgg(fig).get_renderer())
        corners = ax.transData.inverted().transform(box.corners())  # (key, query) of each corner of the note
        assert all(key > query + 0.5 for key, query in corners)  # on masked cells only, covering no weight
        for texts in (columns, rows):
            assert [t.get_text() for t in texts] == labels
            assert [t.get_color() == GENERATED_COLOR for t in texts] == [False] * 4 + [True] * 2
        assert [t.get_position()[0] for t in columns] == list(range(6))  # each under its own key
        assert [t.get_position()[1] for t in rows] == list(range(6))
    for T in (2, 64):  # the fewest tokens and the most that get labels: the note still covers masked cells only
        fig = layer_figure(synthetic_attention(1, 1, T)[0], layer=0, labels=["x"] * T, prompt_len=T)
        assert "dashed" not in fig._suptitle.get_text()  # no generated tokens: no line to explain
        (ax,) = [ax for ax in fig.axes if ax.get_title()]
        (note,) = [t for t in ax.texts if t.get_text() == AXES_NOTE]
        box = note.get_window_extent(FigureCanvasAgg(fig).get_renderer())
        corners = ax.transData.inverted().transform(box.corners())
        assert all(key > query + 0.5 for key, query in corners), T


def test_each_layers_png_draws_that_layers_weights(tmp_path):
    """Layer 1's picture changes with layer 1's weights alone: its title would tell two pictures apart even if every
    layer drew layer 0's heatmaps."""
    attn = synthetic_attention(n_layer=2, n_head=2, T=12)
    same = attn.copy()
    same[1] = same[0]
    _, own = write_layer_images(tmp_path / "own", attn, sample_tokens(12), prompt_len=6)
    _, copied = write_layer_images(tmp_path / "copied", same, sample_tokens(12), prompt_len=6)
    assert not np.array_equal(read_png(own), read_png(copied))


def test_five_heads_wrap_into_rows_of_at_most_four_panels():
    """Rows of at most four panels, evenly filled: five heads make rows of three and two, not one strip of five."""
    fig = layer_figure(synthetic_attention(1, 5, 100)[0], layer=0, labels=["x"] * 100, prompt_len=100)
    heads = [ax for ax in fig.axes if ax.get_title()]
    rows = sorted({round(ax.get_position().y0, 6) for ax in heads}, reverse=True)
    assert [sum(round(ax.get_position().y0, 6) == y for ax in heads) for y in rows] == [3, 2]


def test_layer_images_for_long_sequences_wrap_heads_into_rows(tmp_path):
    attn = synthetic_attention(n_layer=1, n_head=6, T=100, seed=1)
    (path,) = write_layer_images(tmp_path, attn, sample_tokens(100), prompt_len=40)
    image = read_png(path)
    height, width, _ = image.shape
    assert height > 0.5 * width  # 6 heads: two rows of three, not one strip of six
    assert width <= 3000 and image.std() > 20


def test_a_long_layer_is_pooled_by_the_maximum_and_keeps_its_diagonal_on_the_sqrt_scale():
    """Past one pixel per token the PNG pools blocks of cells: by their maximum, so that a head that looks only at
    its own token still draws its diagonal at full strength (a mean would fade it to a fraction), and a block that
    straddles the diagonal is drawn (it holds keys the queries see), not greyed as masked."""
    T = 400
    attn = np.eye(T)[None]  # (1, T, T): each token on itself alone
    fig = layer_figure(attn, layer=0, labels=[str(i) for i in range(T)], prompt_len=T)
    (ax,) = [ax for ax in fig.axes if ax.get_title()]
    unlabelled = layer_figure(attn, layer=0, labels=[str(i) for i in range(T)], prompt_len=100)
    assert unlabelled._suptitle.get_text().startswith("layer 0 · 400 tokens: 100 prompt, 300 generated (dashed lines: "
                                                      "the prompt's end) ·")  # no labels to colour red
    (image,) = ax.images
    shown = image.get_array()  # (n, n) masked: the pooled weights as drawn
    n = shown.shape[0]
    assert n < T  # pooled into blocks of cells
    assert not shown.mask.diagonal().any() and (shown.data.diagonal() == 1.0).all()
    below = np.tril(np.ones((n, n), dtype=bool), -1)
    assert not shown.mask[below].any() and (shown.data[below] == 0).all()
    assert shown.mask[~np.tril(np.ones((n, n), dtype=bool))].all()  # blocks wholly above the diagonal: masked


def test_a_pooled_length_that_is_no_multiple_of_the_block_still_greys_every_masked_block():
    """401 tokens pool into blocks of 2 with one token of padding: the last column of blocks above the diagonal holds
    a masked key and padding, and stays grey (padding copies the edge, adding no key a query could see)."""
    T = 401
    fig = layer_figure(np.eye(T)[None], layer=0, labels=[str(i) for i in range(T)], prompt_len=T)
    (ax,) = [ax for ax in fig.axes if ax.get_title()]
    shown = ax.images[0].get_array()
    n = shown.shape[0]
    assert n * 2 - 1 == T  # pooled by 2, the last block half padding
    assert shown.mask[~np.tril(np.ones((n, n), dtype=bool))].all()
    assert not shown.mask.diagonal().any()


def test_an_unpooled_picture_draws_the_diagonal_and_greys_only_the_keys_after_each_query():
    """A token sees itself: the diagonal holds weights, drawn; only the cells above it are grey."""
    T = 8
    fig = layer_figure(np.eye(T)[None], layer=0, labels=list("abcdefgh"), prompt_len=T)
    (ax,) = [ax for ax in fig.axes if ax.get_title()]
    shown = ax.images[0].get_array()
    assert shown.shape == (T, T)
    assert (shown.mask == np.triu(np.ones((T, T), dtype=bool), k=1)).all()
    bar = fig.axes[-1]  # the colour bar, labelled in real weights at the square root scale's useful steps
    np.testing.assert_allclose(bar.get_yticks(), [0, 0.01, 0.05, 0.1, 0.25, 0.5, 1])


def test_a_picture_of_generated_tokens_only_draws_no_prompt_divider():
    """prompt_len 0 (a dump of generated tokens alone): no dashed line along the picture's edge, nor a title that
    explains one."""
    fig = layer_figure(synthetic_attention(1, 1, 8)[0], layer=0, labels=list("abcdefgh"), prompt_len=0)
    (ax,) = [ax for ax in fig.axes if ax.get_title()]
    assert not ax.collections
    assert "dashed" not in fig._suptitle.get_text()


def test_layer_images_colour_the_square_root_of_the_weight_and_mark_where_generation_began():
    """The colour bar says √ scale: a weight of 0.25 takes viridis' colour at 0.5. The dashed divider runs between
    the last prompt token and the first generated one, below the diagonal only."""
    T, prompt_len = 8, 5
    fig = layer_figure(synthetic_attention(1, 1, T)[0], layer=0, labels=list("abcdefgh"), prompt_len=prompt_len)
    (ax,) = [ax for ax in fig.axes if ax.get_title()]
    (image,) = ax.images
    viridis = colormaps["viridis"]
    for weight in (0.0, 0.04, 0.25, 1.0):
        np.testing.assert_allclose(image.to_rgba(np.array([[weight]]))[0, 0], viridis(np.sqrt(weight)), atol=1 / 255)
    segments = [segment for lines in ax.collections for segment in lines.get_segments()]
    edge = prompt_len - 0.5
    drawn = sorted(np.round(segment, 6).tolist() for segment in segments)
    assert drawn == sorted([[[edge, edge], [edge, T - 0.5]], [[-0.5, edge], [edge, edge]]])  # down, then across


def test_the_head_importance_picture_is_white_at_0_red_for_a_cost_blue_for_a_help(tmp_path):
    """A diverging scale centred on 0: a head whose removal changes nothing is white, not the blue of a head whose
    removal helps (a scale from the smallest increase to the largest drew it so whenever no head helped)."""
    path = write_importance_image(tmp_path / "importance.png", np.array([[0.0, 0.8], [0.4, 0.0]]), "loss increase")
    pixels = read_png(path).astype(int).reshape(-1, 3)

    def count(fraction: float) -> int:  # pixels in RdBu_r's colour at fraction of the way from -0.8 to +0.8
        colour = np.rint(255 * np.array(colormaps["RdBu_r"](fraction)[:3]))
        return int((np.abs(pixels - colour).max(axis=1) <= 2).sum())

    assert count(0.5) > 5000 and count(1.0) > 2000 and count(0.75) > 2000  # two cells of 0, one of +0.8, one +0.4
    assert count(0.0) < 500  # deep blue only at the foot of the colour bar: no head here helps


def test_the_head_importance_scale_is_as_deep_on_each_side_as_the_largest_change(tmp_path):
    """A head whose removal helps by 0.8 and one that costs 0.4: the scale spans -0.8 to +0.8, so the cost is drawn
    half as red as the help is blue (a scale from the largest increase alone would saturate both)."""
    path = write_importance_image(tmp_path / "importance.png", np.array([[0.0, -0.8], [0.4, 0.0]]), "loss increase")
    pixels = read_png(path).astype(int).reshape(-1, 3)

    def count(fraction: float) -> int:
        colour = np.rint(255 * np.array(colormaps["RdBu_r"](fraction)[:3]))
        return int((np.abs(pixels - colour).max(axis=1) <= 2).sum())

    assert count(0.0) > 2000 and count(0.75) > 2000 and count(1.0) < 500


def test_layer_images_of_a_single_token(tmp_path):
    attn = np.ones((1, 2, 1, 1))
    (path,) = write_layer_images(tmp_path, attn, ["hi"], prompt_len=1)
    assert read_png(path).shape[0] > 100


def test_mismatched_inputs_are_refused(tmp_path):
    attn = synthetic_attention(1, 2, 8)
    with pytest.raises(ValueError, match="tokens"):
        viewer_html(attn, sample_tokens(7), 3, {})
    with pytest.raises(ValueError, match="prompt_len"):
        write_layer_images(tmp_path, attn, sample_tokens(8), prompt_len=9)
    with pytest.raises(ValueError, match=r"attn\[:, 0\]"):
        viewer_html(attn[:, None], sample_tokens(8), 3, {})
    with pytest.raises(ValueError, match=r"must be \(n_layer, n_head, T, T\), got shape \(1, 2, 8, 7\)"):
        write_layer_images(tmp_path, attn[..., :7], sample_tokens(8), prompt_len=3)  # keys that are not the queries
    with pytest.raises(ValueError, match="empty dimension"):
        write_layer_images(tmp_path, attn[:, :0], sample_tokens(8), prompt_len=3)
    broken = attn.copy()
    broken[0, 1, 5, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        viewer_html(broken, sample_tokens(8), 3, {})
    assert not any(tmp_path.iterdir())  # refused before any picture is written


class ScriptCollector(HTMLParser):
    """The page's <script> elements as the browser's tokenizer would split them."""

    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self.open: dict | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.open = dict(attrs)
            self.scripts.append((self.open, ""))

    def handle_data(self, data):
        if self.open is not None:
            self.scripts[-1] = (self.open, self.scripts[-1][1] + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self.open = None


def embedded_data(html: str) -> dict:
    parser = ScriptCollector()
    parser.feed(html)
    (data_text,) = [text for attrs, text in parser.scripts if attrs.get("id") == "glimpse-data"]
    assert len(parser.scripts) == 2  # the data and the viewer's code: no token opened another
    return json.loads(data_text)


def test_viewer_is_self_contained_and_carries_the_weights():
    attn = synthetic_attention(n_layer=2, n_head=3, T=30)
    tokens = sample_tokens(30)
    html = viewer_html(attn, tokens, 12, {"iter": 500, "temperature": np.float32(0.8), "loss": float("nan"),
                                          "window": (np.int64(0), 30), "source": Path("data") / "play.txt"})
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"https?://|@import|url\(", html, re.IGNORECASE)
    data = embedded_data(html)
    assert data["tokens"] == tokens and data["prompt_len"] == 12
    assert data["meta"] == {"iter": 500, "temperature": pytest.approx(0.8), "loss": None, "window": [0, 30],
                            "source": str(Path("data") / "play.txt")}
    # the labels show each token's whitespace and control characters, as the pictures' labels do
    assert data["labels"] == [token_label(t) for t in tokens] and "⏎" in data["labels"][2]
    # each layer's packed lower triangle inflates and decodes to the weights, one byte of sqrt(w) each
    assert len(data["weights"]) == 2
    packed = np.stack([np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8).reshape(3, -1)
                       for text in data["weights"]])  # (L, H, T(T+1)/2)
    rows, cols = np.tril_indices(30)
    decoded = (packed / 255.0) ** 2
    assert np.abs(decoded - attn[:, :, rows, cols]).max() < 0.004
    # 30 tokens fit a thumbnail whole: the thumbnails are the same bytes, square, 0 above the diagonal
    assert data["thumbnail_block"] == 1
    thumbnails = np.frombuffer(base64.b64decode(data["thumbnails"]), dtype=np.uint8).reshape(2, 3, 30, 30)
    assert np.array_equal(thumbnails[:, :, rows, cols], packed)
    assert not thumbnails[:, :, ~np.tri(30, dtype=bool)].any()


def test_viewer_thumbnails_keep_a_thin_diagonal_when_pooled():
    T = 200
    attn = np.zeros((1, 1, T, T), dtype=np.float16)
    attn[0, 0, np.arange(T), np.arange(T)] = 1.0  # each token only on itself: a one-cell-wide line
    data = embedded_data(viewer_html(attn, sample_tokens(T), 0, {}))
    block = data["thumbnail_block"]
    n = -(-T // block)
    assert block == 5 and n <= 48
    thumbnails = np.frombuffer(base64.b64decode(data["thumbnails"]), dtype=np.uint8).reshape(n, n)
    assert np.array_equal(thumbnails, 255 * np.eye(n, dtype=np.uint8))  # max-pooled: the diagonal at full strength


def test_attended_by_counts_every_later_query_the_last_one_too_in_chromium(tmp_path, browser):
    """Each token weighs itself and the first token half each, but the last one weighs token 5 alone: hovering
    token 5, the last token is the query that weighs it most. The highlights are as strong as the colour scale
    draws their weights: √w under the √ scale."""
    T = 12
    attn = np.zeros((1, 1, T, T), dtype=np.float32)
    attn[0, 0, 0, 0] = 1.0
    for q in range(1, T - 1):
        attn[0, 0, q, [0, q]] = 0.5
    attn[0, 0, T - 1, 5] = 1.0
    page, errors, _ = open_viewer(browser, write_viewer(tmp_path / "viewer.html", attn, sample_tokens(T), 0, {}))
    page.hover('#tokens .tok[data-i="5"]')
    attended = next(line for line in page.inner_text("#info").splitlines() if line.startswith("attended by"))
    assert re.findall(r"#(\d+) ", attended) == [str(T - 1), "5"], attended
    highlighted = page.evaluate("""() => Array.from(document.querySelectorAll("#tokens .tok.key, #tokens .tok.query"),
        (span) => [+span.dataset.i, +span.dataset.w, getComputedStyle(span).backgroundColor])""")
    assert [i for i, _, _ in highlighted] == [0, T - 1]
    assert [w for _, w, _ in highlighted] == pytest.approx([0.5, 1.0], abs=4e-3)  # the page's one-byte weights
    for _, w, colour in highlighted:
        alpha = float(re.fullmatch(r"rgba\(\d+, \d+, \d+, ([0-9.]+)\)", colour).group(1))
        assert alpha == pytest.approx(0.85 * math.sqrt(w), abs=2e-3), (w, colour)
    assert errors == []
    page.close()


def test_viewer_embeds_how_many_earlier_tokens_the_window_left_out():
    attn = synthetic_attention(n_layer=1, n_head=1, T=8)
    assert embedded_data(viewer_html(attn, sample_tokens(8), 2, {}, cut=6))["cut"] == 6
    assert embedded_data(viewer_html(attn, sample_tokens(8), 2, {}))["cut"] == 0


def test_viewer_quantises_float16_and_float32_alike():
    attn = synthetic_attention(n_layer=2, n_head=2, T=40, seed=3).astype(np.float32)
    tokens = sample_tokens(40)
    as_float32 = embedded_data(viewer_html(attn, tokens, 8, {}))
    as_float16 = embedded_data(viewer_html(attn.astype(np.float16), tokens, 8, {}))
    for a, b in zip(as_float32["weights"], as_float16["weights"]):
        bytes32, bytes16 = (np.frombuffer(zlib.decompress(base64.b64decode(x)), dtype=np.uint8) for x in (a, b))
        assert np.abs(bytes32.astype(int) - bytes16).max() <= 1  # float16's own rounding, at most one step


def test_weights_outside_0_to_1_quantise_to_the_ends_of_the_byte():
    """Weights a little past 1 or below 0 (rounding, or numbers that are not softmax weights) are clipped, not
    wrapped round the byte (1.5 would be 312, 56 as a byte)."""
    weights = np.array([-0.5, 0.0, 0.25, 1.0, 1.5])
    for dtype in (np.float32, np.float16):
        assert sqrt_bytes(weights.astype(dtype)).tolist() == [0, 0, 128, 255, 255], dtype


def test_viewer_for_a_typical_dump_stays_small():
    attn = synthetic_attention(n_layer=6, n_head=6, T=256)
    assert len(viewer_html(attn, sample_tokens(256), 64, {})) < 3_000_000


def test_token_text_cannot_break_out_of_the_page():
    tokens = ["</script><script>window.pwned = 1</script>", "<!--", "</SCRIPT >", "<img src=x onerror=alert(1)>"]
    attn = synthetic_attention(1, 1, len(tokens))
    html = viewer_html(attn, tokens, 2, {"note": "</script>"}, heads=None)
    assert "<script>window.pwned" not in html and "<img src=x" not in html
    assert embedded_data(html)["tokens"] == tokens


# --- the viewer in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GLIMPSE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_viewer(browser, path: Path):
    """A page showing the viewer at path, with lists collecting its errors and the URLs it requested."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors, requests = [], []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri())
    page.wait_for_function("document.body.dataset.ready === 'true'", timeout=10_000)
    return page, errors, requests


def test_the_viewer_writes_what_a_page_shows_as_nothing_and_counts_in_words_in_chromium(tmp_path, browser):
    """Tokens that show as nothing or break a line (U+2028 and U+2029, a zero width, a no-break space) get a visible
    label on the axes, in the readout and in the text; one layer and one head read as such; a text the model only
    read (nothing generated) has no prompt/generated legend; the readout quotes the tokens it names."""
    tokens = ["a", "\u2028", "\u2029", "\u200b", "\xa0", " ", "\n", ":"]
    T = len(tokens)
    page, errors, _ = open_viewer(browser, write_viewer(tmp_path / "odd.html", synthetic_attention(1, 1, T), tokens,
                                                        T, {}))
    labels = page.eval_on_selector_all("#col-labels .lab", "labels => labels.map(l => l.textContent)")
    assert labels == [token_label(t) for t in tokens] == ["a", "\\u2028", "\\u2029", "\\u200b", "\\xa0", "␣", "⏎",
                                                          ":"]
    shown = page.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => s.textContent)")
    assert shown[1:5] == ["\\u2028", "\\u2029", "\\u200b", "\xa0"]  # a space other than " " flows as one
    assert page.inner_text("#summary") == f"1 layer × 1 head · {T} tokens"
    assert not page.locator("#legend").is_visible()
    page.click('#tokens .tok[data-i="1"]')
    assert page.inner_text("#info").splitlines()[0] == "token #1 \\u2028"  # no "(prompt)": nothing was generated
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + (1.5 / T) * box["width"], box["y"] + (7.5 / T) * box["height"])
    assert re.fullmatch(r"query #7 ‘:’ → key #1 ‘\\u2028’: ≈[0-9.]+", page.inner_text("#readout"))
    assert errors == []
    page.close()


@pytest.mark.parametrize("T", [64, 65])
def test_the_viewer_labels_the_axes_up_to_64_tokens_as_the_pngs_do_in_chromium(tmp_path, browser, T):
    """Training's snapshots take 64 tokens by default, and train.py --help says their labels show up to 64."""
    tokens = [chr(ord("a") + i % 26) for i in range(T)]
    page, errors, _ = open_viewer(browser, write_viewer(tmp_path / "page.html", synthetic_attention(1, 2, T), tokens,
                                                        T - 4, {}))
    assert page.locator("#col-labels .lab").count() == page.locator("#row-labels .lab").count() == \
        (T if T <= MAX_LABELLED_TOKENS else 0)
    assert page.inner_text("#summary") == f"1 layer × 2 heads · {T} tokens ({T - 4} prompt, 4 generated)"
    assert page.locator("#legend").is_visible() and errors == []
    page.close()


def wait_painted(page, layer: int, head: int, scale: str = "sqrt"):
    """Wait until the heatmap shows (layer, head): a layer not inflated yet is painted a moment later."""
    page.wait_for_function(f"document.body.dataset.painted === '{layer},{head},{scale}'", timeout=10_000)


def state(page) -> dict:
    return page.evaluate("window.glimpseViewer.state()")


def heatmap_pixels(page) -> str:
    return page.evaluate("document.getElementById('heatmap').toDataURL()")


def cell_colour(page, q: int, k: int) -> list[int]:
    """RGB at the centre of heatmap cell (query q, key k)."""
    return page.evaluate(
        """([q, k]) => {
            const canvas = document.getElementById("heatmap");
            const cell = canvas.width / window.glimpseViewer.state().T;
            const pixel = canvas.getContext("2d").getImageData((k + 0.5) * cell, (q + 0.5) * cell, 1, 1);
            return Array.from(pixel.data.slice(0, 3));
        }""",
        [q, k],
    )


def test_viewer_in_chromium(tmp_path, browser):
    T = 24
    attn = synthetic_attention(n_layer=2, n_head=3, T=T)
    heads = head_metrics(attn)
    path = write_viewer(tmp_path / "viewer.html", attn, sample_tokens(T), 10, {"iter": 500}, heads=heads)
    page, errors, requests = open_viewer(browser, path)

    assert state(page)["layer"] == 0 and state(page)["head"] == 0
    assert all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests
    # what is drawn is the data: viridis is bright (yellow) for 1, dark (purple) for ~0
    assert sum(cell_colour(page, 12, 11)) > 400 and sum(cell_colour(page, 12, 0)) < 300  # head 0: previous token
    first = heatmap_pixels(page)

    page.select_option("#head", "1")
    assert state(page)["head"] == 1
    assert sum(cell_colour(page, 12, 0)) > 400 and sum(cell_colour(page, 12, 11)) < 300  # head 1: first token
    second = heatmap_pixels(page)
    assert second != first
    entropy = heads["layers"][0]["heads"][1]["entropy"]
    assert page.inner_text('#metrics tr[data-metric="entropy"] td.value') == f"{entropy:.3f}"

    page.select_option("#layer", "1")
    wait_painted(page, 1, 1)
    assert state(page)["layer"] == 1 and heatmap_pixels(page) not in (first, second)
    page.click('#overview .thumb[data-layer="1"][data-head="2"]')
    assert state(page)["head"] == 2
    current = page.evaluate("""() => [...document.querySelectorAll('#overview .current')].map(
        (e) => [e.classList.contains('layer-axis') ? 'layer' : 'head', e.dataset.layer ?? e.dataset.head])""")
    assert sorted(current) == [["head", "2"], ["layer", "1"]]  # the picker's labels in bold: its layer, its head
    page.evaluate("document.activeElement.blur()")  # arrows on a focused select belong to the select
    page.keyboard.press("ArrowLeft")
    assert (state(page)["layer"], state(page)["head"]) == (1, 1)
    page.keyboard.press("ArrowUp")
    wait_painted(page, 0, 1)
    page.keyboard.press("ArrowDown")
    wait_painted(page, 1, 1)

    # the weights the page decoded are the ones it was given
    shown = page.evaluate(
        """([layer, head, T]) => Array.from(
            {length: T * T}, (_, n) => window.glimpseViewer.weight(layer, head, Math.floor(n / T), n % T))""",
        [1, 1, T],
    )
    assert np.abs(np.array(shown).reshape(T, T) - attn[1, 1]).max() < 0.004

    # hovering a token highlights what it attends to (before it) and what attends to it (after it)
    page.select_option("#layer", "0")
    page.select_option("#head", "0")
    wait_painted(page, 0, 0)
    overlay_before = page.evaluate("document.getElementById('overlay').toDataURL()")
    page.hover('#tokens .tok[data-i="12"]')
    assert state(page)["hover"] == 12
    token = lambda i: page.locator(f'#tokens .tok[data-i="{i}"]')
    assert "self" in token(12).get_attribute("class")
    assert "key" in token(11).get_attribute("class") and float(token(11).get_attribute("data-w")) > 0.5
    assert "query" in token(13).get_attribute("class") and float(token(13).get_attribute("data-w")) > 0.5
    assert "query" not in (token(20).get_attribute("class") or "")  # token 20 looks at 19, hardly at 12
    for i, kind in ((11, "--key"), (13, "--query")):  # the colours the legend gives each kind
        colour = token(i).evaluate("span => getComputedStyle(span).backgroundColor")
        legend = page.evaluate(f"getComputedStyle(document.documentElement).getPropertyValue('{kind}')")
        assert re.findall(r"\d+", colour)[:3] == re.findall(r"\d+", legend)[:3], (i, colour, legend)
    # the row outline runs along token 12's keys, 0 to 12, and stops at the diagonal
    edge = page.evaluate("""([i, T]) => {
        const c = document.getElementById('overlay'), cell = c.width / T, ctx = c.getContext('2d');
        return Array.from({length: T}, (_, k) => Array.from(
            ctx.getImageData(Math.floor((k + 0.5) * cell), Math.floor(i * cell), 1, 1).data))}""", [12, T])
    assert all(np.abs(np.subtract(edge[k][:3], [230, 115, 0])).max() <= 2 and edge[k][3] > 100 for k in range(12)), \
        edge[:12]
    assert all(edge[k][3] == 0 for k in range(14, T)), edge[14:]
    assert page.evaluate("document.getElementById('overlay').toDataURL()") != overlay_before
    assert "attends to" in page.inner_text("#info")
    # "attended by": the later queries that weigh token 12 most, heaviest first; head 0 reads the token before, so
    # query 13 leads, with its weight on 12 (the one-byte picture's, marked approximate)
    attended = next(line for line in page.inner_text("#info").splitlines() if line.startswith("attended by"))
    listed = [(int(j), float(w)) for j, w in re.findall(r"#(\d+) \S+ ≈([0-9.]+)", attended)]
    assert len(listed) == 5 and listed[0][0] == 13 and all(j >= 12 for j, _ in listed)
    assert [w for _, w in listed] == sorted((w for _, w in listed), reverse=True)
    for j, w in listed:
        assert abs(w - attn[0, 0, j, 12]) < 0.004 + 5e-4, (j, w)

    # hovering a heatmap cell names it and follows its query row
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + (3.5 / T) * box["width"], box["y"] + (7.5 / T) * box["height"])
    assert state(page)["hover"] == 7
    assert "#7" in page.inner_text("#readout") and "#3" in page.inner_text("#readout")
    page.mouse.move(box["x"] + box["width"] + 300, box["y"] + box["height"] + 50)  # out of the heatmap
    assert state(page)["hover"] is None

    page.click('#tokens .tok[data-i="16"]')  # pinned: the highlight stays for the screenshot
    assert state(page)["pinned"] and "pinned" in token(16).get_attribute("class")
    screenshot = tmp_path / "viewer.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert read_png(screenshot).shape[1] >= 1000
    assert errors == []
    page.close()


def test_viewer_with_hostile_tokens_and_a_long_text_in_chromium(tmp_path, browser):
    hostile = ["</script><script>window.pwned = 1</script>", "<img src=x onerror=\"window.pwned = 2\">", "<!--",
               "</SCRIPT >", "\u2028", "]]>", "&lt;"]
    T = 300
    tokens = hostile + sample_tokens(T - len(hostile))
    path = write_viewer(tmp_path / "viewer.html", synthetic_attention(1, 2, T), tokens, 100, {"note": "</script>"})
    page, errors, _ = open_viewer(browser, path)
    assert page.evaluate("window.pwned === undefined") and page.locator("img").count() == 0
    for i, text in enumerate(hostile):  # as text, not markup; U+2028, a line break that shows as nothing, escaped
        assert page.locator(f'#tokens .tok[data-i="{i}"]').text_content() == text.replace("\u2028", "\\u2028")
    assert page.evaluate("document.getElementById('heatmap').width") == 2 * T  # two canvas pixels per token
    assert page.locator("#tokens .tok.gen").count() == T - 100
    page.keyboard.press("[")  # the last token pinned from the keyboard: its box scrolls it into view
    assert (state(page)["hover"], state(page)["pinned"]) == (T - 1, True)
    seen = page.evaluate(f"""() => {{
        const box = document.getElementById('tokens').getBoundingClientRect();
        const span = document.querySelector('#tokens .tok[data-i="{T - 1}"]').getBoundingClientRect();
        return [document.getElementById('tokens').scrollTop, span.top >= box.top && span.bottom <= box.bottom];
    }}""")
    assert seen[0] > 0 and seen[1], seen
    assert errors == []
    page.close()


def test_viewer_shows_each_heads_loss_increase_on_its_thumbnail_in_chromium(tmp_path, browser):
    attn = synthetic_attention(n_layer=2, n_head=3, T=12)
    importance = {"intact_loss": 1.0, "loss_increase": [[0.5, -0.02, 0.0], [0.125, 0.25, 1.5]]}
    path = write_viewer(tmp_path / "viewer.html", attn, sample_tokens(12), 4, {}, head_metrics(attn), importance)
    page, errors, _ = open_viewer(browser, path)
    costs = lambda layer: page.eval_on_selector_all(  # noqa: E731
        f'#overview .thumb[data-layer="{layer}"] .cost', "nodes => nodes.map(n => n.textContent)")
    assert costs(0) == ["Δloss +0.500", "Δloss −0.020", "Δloss 0.000"]  # one row of thumbnails per layer
    assert costs(1) == ["Δloss +0.125", "Δloss +0.250", "Δloss +1.500"]
    colours = page.eval_on_selector_all('#overview .thumb[data-layer="0"] .cost',
                                        "nodes => nodes.map(n => getComputedStyle(n).color)")
    # red, blue where removal helps, grey where it changes nothing at three decimals
    assert colours == ["rgb(178, 24, 43)", "rgb(33, 102, 172)", "rgb(102, 102, 102)"]
    page.click('#overview .thumb[data-layer="1"][data-head="2"]')
    assert (state(page)["layer"], state(page)["head"]) == (1, 2)
    assert page.eval_on_selector_all("#overview .thumb.selected", "nodes => nodes.map(n => n.title)") == [
        "layer 1 · head 2"]
    plain = write_viewer(tmp_path / "plain.html", attn, sample_tokens(12), 4, {}, head_metrics(attn))
    page2, errors2, _ = open_viewer(browser, plain)
    assert page2.eval_on_selector_all("#overview .thumb .cost", "nodes => nodes.length") == 0  # no scores, no captions
    assert not errors and not errors2
