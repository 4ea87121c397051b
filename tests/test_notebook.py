"""The walkthrough notebook, run top to bottom in a real Jupyter kernel, and the Python API it stands on.

docs/attention_walkthrough.ipynb trains its own model (about a minute on 2 cores), so the notebook runs once per
session; each test reads what one part of it printed and checks it against the notes or against glimpse's API
on the checkpoint the notebook trained.
"""

import base64
import copy
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from glimpse.checkpoint import best_path, checkpoint_path, load_checkpoint
from glimpse.errors import GlimpseError
from glimpse.notebook import Model, load
from model import GPT, GPTConfig
from tests.conftest import REPO, python
from tests.test_render import browser  # noqa: F401  (the Chromium fixture)

NOTEBOOK = REPO / "docs" / "attention_walkthrough.ipynb"
TEXT = "kQ7xbR2m" * 3  # the notebook's text, a string repeated
QUERY = 11  # the notebook's query: the string's 'x' in its second copy


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(the notebook's code cells as (source, printed text, output mime types), the folder it trained in)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path_factory.mktemp("walkthrough")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel is this Python's (a user's own "python3" kernel may run another interpreter, without glimpse's
    # packages), and inherits this process's environment: the model and its data go to a temporary folder
    from ipykernel.kernelspec import install

    kernels = tmp_path_factory.mktemp("kernels")
    install(kernel_name="python3", prefix=str(kernels))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))  # searched before the user's own kernels
        env.setenv("GLIMPSE_WALKTHROUGH_OUT", str(out))
        nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    cells = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
            data = {k: v for o in cell.outputs if "data" in o for k, v in o["data"].items()}
            cells.append((cell.source, printed, data))
    return cells, out


def cell(executed, marker: str) -> tuple[str, dict]:
    """What the code cell whose source holds marker printed, and its rich outputs."""
    cells, _ = executed
    found = [(printed, data) for source, printed, data in cells if marker in source]
    assert len(found) == 1, f"one cell should hold {marker!r}"
    return found[0]


def test_the_training_cell_prints_a_line_per_log_step_and_no_bar(executed):
    """A notebook's output is no terminal: train.py draws no bar there (its redraws would fill the saved notebook)
    but prints a line at each log step, 100 steps apart in the study's settings."""
    printed, _ = cell(executed, "final = train(")
    steps = [int(n) for n in re.findall(r"^step (\d+): loss \d\.\d{4}, [\d,]+ tokens/s(?:, about [\d.]+ (?:s|min|h) "
                                        r"of steps left)?$", printed, re.MULTILINE)]
    assert steps == list(range(100, 1501, 100)), printed
    assert "train:" not in printed and "\r" not in printed


def test_the_toy_example_prints_the_lecture_notes_numbers(executed):
    printed, _ = cell(executed, "dot_scores(q, keys")
    first, second = printed.strip().splitlines()
    assert "weights [0.4431 0.3224 0.2345]  context [0.5604 0.4396]" in first
    assert "weights [0.3296 0.4075 0.2629]  context [0.4611 0.5389]" in second


def test_the_training_cell_shows_the_runs_loss_picture(executed):
    _, out = executed
    _, data = cell(executed, "final = train(")
    picture = (out / "2-layer" / "loss.png").read_bytes()
    assert base64.b64decode(data["image/png"]) == picture


def test_the_model_trained_in_the_notebook_has_the_induction_head_it_takes_apart(executed):
    _, out = executed
    printed, _ = cell(executed, "probe = model.induction()")
    layer, head = map(int, re.search(r"the induction head: layer (\d+), head (\d+)", printed).groups())
    model = load(out / "2-layer")
    scores = np.array(model.induction()["induction"])
    assert (layer, head) == np.unravel_index(scores.argmax(), scores.shape)
    assert layer == 1 and scores[layer, head] > 0.5  # an induction head needs a layer before it


def test_the_induction_probe_from_python_gives_sample_pys_numbers(tmp_path, trained):
    """model.induction() draws the random tokens sample.py --probe=induction draws at its default seed: one probe,
    the same scores and verdict (a learner compares the two)."""
    import json

    cfg, _ = trained
    run = python("sample.py", f"--out_dir={cfg.out_dir}", "--max_new_tokens=2", "--num_samples=1", "--pngs=false",
                 "--probe=induction", f"--dump_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    printed = json.loads((tmp_path / "probe_induction.json").read_text())
    probe = load(cfg.out_dir).induction()
    assert probe["verdict"] == printed["verdict"]
    for key in ("induction", "prev_token_on_probe", "second_copy_loss_without"):
        np.testing.assert_allclose(probe[key], printed[key], rtol=1e-5, err_msg=key)


def test_one_head_taken_apart_shows_the_traced_numbers(executed):
    _, out = executed
    printed, _ = cell(executed, "step = run.step(layer, head, query)")
    layer, head = map(int, re.search(r"the induction head: layer (\d+), head (\d+)",
                                     cell(executed, "probe = model.induction()")[0]).groups())
    run = load(out / "2-layer").run(TEXT)
    rows = [line.split() for line in printed.splitlines() if re.match(r"^\s+\d+\s+'", line)]
    assert [int(r[0]) for r in rows] == list(range(QUERY + 1))  # every key the query may see, none after it
    table = np.array([[float(x) for x in r[2:]] for r in rows])  # q.k, scaled, weight, moved
    q, k = run.q[layer, head, QUERY], run.k[layer, head, : QUERY + 1]
    assert np.allclose(table[:, 0], k @ q, atol=1e-3)
    assert np.allclose(table[:, 1], k @ q / np.sqrt(q.size), atol=1e-3)
    assert np.allclose(table[:, 2], run.weights[layer, head, QUERY, : QUERY + 1], atol=1e-3)
    assert np.allclose(table[:, 3], run.head_out_norm[layer, head, QUERY, : QUERY + 1], atol=1e-3)
    # the induction head looks where the notebook says: at 'b', which followed the earlier 'x'
    assert table[:, 2].argmax() == 4 and "most weight on key 4 ('b')" in cell(executed, "the full row of scores")[0]
    checks = cell(executed, "the full row of scores")[0]
    assert "softmax(scores) equals the weights: True" in checks
    assert "weights @ values equals the context vector: True" in checks


def test_the_heads_shares_and_the_rest_sum_to_the_logit_and_the_lens_ends_at_the_prediction(executed):
    printed, _ = cell(executed, 'run.attribution["heads"][:, :, query]')
    total, logit = map(float, re.search(r"heads \+ rest = (-?[\d.]+)\s+logit = (-?[\d.]+)", printed).groups())
    assert total == pytest.approx(logit, abs=2e-3)
    predicted = re.search(r"predicted after position 11 : '(.)'", printed).group(1)
    assert predicted == "b"
    assert re.search(r"after block 1: '(.)'", printed).group(1) == predicted


def test_the_guesses_sit_under_what_they_guessed_and_the_repeats_are_guessed(executed):
    _, out = executed
    printed, _ = cell(executed, "guesses = ")
    lines = printed.splitlines()
    text_line, guessed_line, right_line = (next(line for line in lines if line.startswith(start))
                                           for start in ("the text:", "the model guessed:", "right after"))
    guesses = guessed_line[text_line.index(TEXT) + 1:]  # guess i under character i + 1
    run = load(out / "2-layer").run(TEXT)
    assert guesses == "".join(run.text_of(run.predicted[:-1]))
    # the text says the model guesses every character once the first copy and one more have gone by
    assert all(guesses[i - 1] == TEXT[i] for i in range(9, len(TEXT)))
    assert right_line == f"right after the first copy and its next character: {len(TEXT) - 9} of {len(TEXT) - 9}"


def test_removing_either_half_of_the_circuit_costs_the_repeats(executed):
    printed, _ = cell(executed, "model.loss(text)")
    intact, without_induction, without_prev = map(float, re.search(
        r"intact ([\d.]+), without the induction head \d\.\d ([\d.]+), without the previous-token head \d\.\d "
        r"([\d.]+)", printed).groups())
    assert without_induction > intact + 0.2 and without_prev > intact + 0.2
    # the notebook's text: the previous-token head adds little straight to the prediction, and is needed all the same
    _, out = executed
    model = load(out / "2-layer")
    prev = int(np.array(model.induction()["prev_token_on_probe"])[0].argmax())
    assert f"the previous-token head 0.{prev} " in printed
    shares = model.run(TEXT).attribution["heads"][:, :, QUERY]  # (layer, head)
    assert abs(shares[0, prev]) < 0.25 * shares[1].max()


def test_the_viewer_shows_in_the_notebooks_output_cell_offline(executed, browser, tmp_path):  # noqa: F811
    _, data = cell(executed, "run.show()")
    assert "<iframe srcdoc=" in data["text/html"]
    assert len(data["text/plain"]) < 200  # what a plain frontend shows: what the output is, not the page again
    # the output cell as Jupyter renders it: the HTML inside a page; the viewer in the iframe must come up
    page_file = tmp_path / "cell.html"
    page_file.write_text(f"<!doctype html><html><body>{data['text/html']}</body></html>", encoding="utf-8")
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_file.as_uri())
    frame = page.frames[1]
    frame.wait_for_function("document.body.dataset.ready === 'true'", timeout=20_000)
    assert frame.evaluate("window.glimpseViewer.state().T") == len(TEXT)
    assert all(url.startswith(("file:", "about:", "data:")) for url in requests)  # nothing from a network
    frame.evaluate("window.glimpseViewer.setMode('scores')")  # a choice the page cannot keep in an address
    frame.wait_for_function("document.body.dataset.paintedMode === 'scores'", timeout=20_000)
    assert errors == []
    page.close()


def test_loading_a_missing_folder_or_one_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(GlimpseError, match="no folder"):
        load(tmp_path / "nowhere")
    with pytest.raises(GlimpseError, match="neither a glimpse checkpoint"):
        load(tmp_path)


def test_the_ways_out_of_a_load_error_are_load_s_arguments_not_the_scripts_flags(tmp_path, trained):
    """The scripts' messages name flags; from Python the same advice names load()'s arguments."""
    cfg, _ = trained
    with pytest.raises(GlimpseError) as error:
        load(cfg.out_dir, device="gpu")
    assert str(error.value) == "device must be one of auto, cpu, cuda, mps or one torch names (cuda:1); got 'gpu'"
    for device in ("cpu:0", torch.device("cpu")):  # torch's own names for a device are taken as torch takes them
        assert next(load(cfg.out_dir, device=device).gpt.parameters()).device.type == "cpu"
    if not torch.cuda.is_available():  # torch's names for a GPU too: checked before the checkpoint is read
        for device, said in (("cuda", "cuda"), (torch.device("cuda"), "cuda"), ("cuda:1", "cuda:1")):
            with pytest.raises(GlimpseError) as error:
                load(cfg.out_dir, device=device)
            assert str(error.value) == f'device={said} but PyTorch sees no CUDA GPU; use device="cpu" (or "auto")'
    elif torch.cuda.device_count() < 8:  # a GPU past the machine's
        with pytest.raises(GlimpseError) as error:
            load(cfg.out_dir, device="cuda:7")
        assert str(error.value).endswith('numbered from 0; use device="cuda" (or "auto")')
    if not torch.backends.mps.is_available():
        with pytest.raises(GlimpseError, match="^device=mps but this PyTorch has no MPS backend"):
            load(cfg.out_dir, device=torch.device("mps"))
    shutil.copy(best_path(cfg.out_dir), best_path(tmp_path))  # a run whose ckpt.pt is gone
    with pytest.raises(GlimpseError) as error:
        load(tmp_path, checkpoint="last")
    assert str(error.value) == (f"no checkpoint at {checkpoint_path(tmp_path)}; train one first (python train.py ...) "
                                "or fix the folder given to load()")
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}  # gpt2 neither in the cache nor fetched
    missing = python("-c", "from glimpse.notebook import load; load('gpt2')", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].endswith("--local-dir DIR`, then pass DIR to load()")


def test_a_checkpoint_the_scripts_would_refuse_is_refused_here_too(trained):
    cfg, _ = trained
    with pytest.raises(GlimpseError, match="checkpoint must be one of auto, best, last, got 'lats'"):
        load(cfg.out_dir, checkpoint="lats")
    assert load(cfg.out_dir, checkpoint="last").state["iter_num"] == load_checkpoint(checkpoint_path(cfg.out_dir))[
        "iter_num"]


def test_a_damaged_best_checkpoint_names_the_argument_that_reads_the_other(tmp_path, trained):
    """The scripts say --checkpoint=last; from Python it is load's argument."""
    cfg, _ = trained
    shutil.copy(checkpoint_path(cfg.out_dir), checkpoint_path(tmp_path))
    best_path(tmp_path).write_bytes(b"junk")
    with pytest.raises(GlimpseError) as error:
        load(tmp_path)
    assert str(error.value) == (f"{best_path(tmp_path)} is corrupt or truncated (struct.error); read ckpt.pt "
                                'instead with load(..., checkpoint="last")')
    assert load(tmp_path, checkpoint="last").state["iter_num"] == load_checkpoint(checkpoint_path(tmp_path))["iter_num"]


def test_sample_mechanism_refuses_what_it_cannot_show(tmp_path, trained):
    cfg, _ = trained
    for flags, why in ((["--ablate=0.0"], "drop --ablate"), (["--dump_attention=false"], "drop --dump_attention")):
        result = python("sample.py", f"--out_dir={cfg.out_dir}", "--mechanism", f"--dump_dir={tmp_path / 'd'}",
                        "--max_new_tokens=2", *flags)
        assert result.returncode == 2 and why in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "d").exists()


def test_sample_mechanism_writes_a_dump_the_api_reads_alike(tmp_path, trained):
    from glimpse.attention import load_dump
    from glimpse.mechanism import load_mechanism

    cfg, _ = trained
    result = python("sample.py", f"--out_dir={cfg.out_dir}", "--mechanism", f"--dump_dir={tmp_path}",
                    "--start=ROMEO:", "--max_new_tokens=40", "--num_samples=1", "--pngs=false")
    assert result.returncode == 0, result.stderr
    dump, mechanism = load_dump(tmp_path / "sample_0"), load_mechanism(tmp_path / "sample_0")
    run = load(cfg.out_dir).run(dump["token_ids"].tolist())
    assert int(dump["cut"]) == 46 - 32 and len(dump["token_ids"]) == 32  # 6 + 40 tokens, a window of 32
    for key in ("q", "k", "v", "scores", "head_out_norm"):
        assert np.allclose(mechanism[key], getattr(run, key), atol=1e-5)  # -inf above the diagonal in both
    assert (mechanism["predicted"] == run.predicted).all()


def test_a_run_of_ids_outside_the_vocabulary_or_of_none_is_one_clear_error(trained):
    cfg, _ = trained
    model = load(cfg.out_dir)
    vocab = model.tokenizer.vocab_size
    for ids, why in (([vocab], f"token id {vocab} "), ([3, -1], "token id -1 "), ([], "no token ids")):
        for call in (model.run, model.loss):
            with pytest.raises(GlimpseError, match=why) as error:
                call(ids)
            message = str(error.value)
            assert "\n" not in message and f"0 to {vocab - 1}" in message
    assert model.run([0, vocab - 1]).shape[2] == 2  # the ends of the range are fine
    with pytest.raises(GlimpseError, match="^a loss needs at least two tokens: one to read, one to predict$"):
        model.loss([3])
    assert model.run(iter([0, 1, 2])).shape[2] == 3 and model.run(np.arange(3)).shape[2] == 3  # any one sequence
    for ids in ([[0, 1], [2, 3]], [1.7, 2.0]):  # a batch is not one text; 1.7 is no token id
        with pytest.raises(GlimpseError, match="token ids must be one sequence of whole numbers"):
            model.run(ids)


def test_a_model_with_more_rows_than_its_tokenizer_has_tokens_takes_the_tokenizers_ids_alone(trained):
    """A vocabulary padded past the tokenizer's (GPT-2's 50,257 tokens in 50,304 rows): an id with a row but no
    token has no text to show, and is refused as outside the vocabulary."""
    cfg, _ = trained
    loaded = load(cfg.out_dir)
    vocab = loaded.tokenizer.vocab_size
    padded = GPT(GPTConfig(**{**asdict(loaded.config), "vocab_size": vocab + 8})).eval()
    model = Model(padded, loaded.state)
    assert model.vocab_size == vocab
    with pytest.raises(GlimpseError, match=f"token id {vocab} is outside this model's vocabulary"):
        model.run([0, vocab])


def test_the_removals_arguments_are_checked_and_named_as_python_names_them(trained):
    """A notebook passes ablate= and ablation=, not the scripts' flags: errors name the argument, and an ablation
    the probe does not know is refused (it removed heads as zero does, under the name given)."""
    model = load(trained[0].out_dir)
    with pytest.raises(GlimpseError) as error:
        model.loss("ROMEO:", ablate="2.0")
    assert str(error.value) == "ablate names layer 2, but the model has 2 layers (0 to 1)"
    with pytest.raises(GlimpseError) as error:
        model.loss("ROMEO:", ablate="1")
    assert str(error.value).startswith("ablate takes heads as layer.head")
    for ablation in ("zeros", "", "Mean"):
        with pytest.raises(GlimpseError) as error:
            model.induction(n_tokens=4, ablation=ablation)
        assert str(error.value) == f"ablation must be zero, mean or None (no removals), got {ablation!r}"
    assert "second_copy_loss_without" not in model.induction(n_tokens=4, ablation=None)
    assert model.induction(n_tokens=4, ablation="mean")["ablation"] == "mean"


def test_a_learners_slips_are_one_line_errors_not_wrong_answers(trained, tmp_path):
    """What a learner may well type: bytes read from a file, probabilities where ids go, a float for a whole
    number, a checkpoint's file for its folder, a run still before its first checkpoint, a dump's parent folder.
    Each is a GlimpseError saying what to give instead, never a traceback from numpy or torch, nor a silently
    other answer (list(b"Hi") is ids 72 and 105; int(0.93) is token 0)."""
    from glimpse.attention import load_dump, load_layer

    cfg, _ = trained
    model = load(cfg.out_dir)
    slips = [
        (lambda: model.run(b"ROMEO:"), "the text is bytes: decode it first"),
        (lambda: model.run(None), "give a text (a str) or its token ids (a list of whole numbers); got NoneType"),
        (lambda: model.run("RO\ud83dMEO:"), "the text holds a lone surrogate \\ud83d at character 2, half of a pair "
                                            "that no UTF-8 text can hold: remove it, or join it to its other half"),
        (lambda: model.loss("ROMEO:", ablate=1), "ablate takes heads as a str"),
        (lambda: model.induction(4.0), "n_tokens and seed must be whole numbers"),
        (lambda: model.induction(4, seed="a"), "n_tokens and seed must be whole numbers"),
        (lambda: load(best_path(cfg.out_dir)), f"is a checkpoint: give its run's folder, load({str(cfg.out_dir)!r})"),
    ]
    run = model.run("ROMEO: " * 10)  # 70 characters: the last 32, block_size, are traced
    assert run.cut == 38 and len(repr(run)) < 300 and "38 cut before" in repr(run)
    slips += [
        (lambda: run.text_of(run.lens_probs[-1, 0]), "token ids must be whole numbers; got float32"),
        (lambda: run.step(0, 0, 40), "within 2 layers, 2 heads and 32 tokens (the text's last 32 tokens: query 0 is "
                                     "its token 38); got layer 0, head 0, query 40"),
        (lambda: run.moved(2), "layer must be a whole number from 0 to 1 (the model's 2 layers); got 2"),
        (lambda: run.save(tmp_path / "d", prompt_len="3"), "prompt_len must be a whole number of tokens; got '3'"),
    ]
    snapshots = tmp_path / "attention" / "iter_0"  # a run's snapshot slider, over its iter_<step> folders
    snapshots.mkdir(parents=True)
    slips.append((lambda: run.save(tmp_path / "attention"), "holds a training run's attention snapshots"))
    (tmp_path / "dumps" / "sample_0").mkdir(parents=True)  # sample.py's dumps, one folder each
    slips.append((lambda: run.save(tmp_path / "dumps"), "holds sample.py's dumps, one sample_<i> folder each: save "
                                                          "into a folder of its own, such as"))
    slips.append((lambda: run.step(True, 0, 0), "layer, head and query must be whole numbers; got True, 0, 0"))
    (tmp_path / "live").mkdir()  # a run's folder before its first checkpoint: only its config.json
    shutil.copy(Path(cfg.out_dir) / "config.json", tmp_path / "live")
    slips.append((lambda: load(tmp_path / "live"), "is a training run with no best.pt or ckpt.pt yet"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    slips.append((lambda: load(tmp_path / "hf", checkpoint="last"), "checkpoint='last' picks one of a training run's"))
    dump = run.save(tmp_path / "dump")
    slips += [(lambda: load_dump(tmp_path), f"no attention.npz in {tmp_path}: give a dump's folder"),
              (lambda: load_layer(dump, 2), "layer must be a whole number from 0 to 1 (the dump's 2 layers); got 2")]
    for slip, says in slips:
        with pytest.raises(GlimpseError) as error:
            slip()
        assert says in str(error.value) and "\n" not in str(error.value), (says, str(error.value))
    before = run.scores[1, 0, 5].copy()
    step = run.step(1, 0, 5)
    step["scores"] -= 1.0  # redoing the softmax in place leaves the trace as it was
    assert np.array_equal(run.scores[1, 0, 5], before, equal_nan=True)
    assert load_dump(dump / "attention.npz")["cut"] == 38 and type(load_dump(dump)["cut"]) is int


def test_a_viewer_page_reads_as_what_it_is_not_as_the_whole_page(trained):
    cfg, _ = trained
    page = load(cfg.out_dir).run("ROMEO:").show()
    assert len(page.html) > 50_000 and "<html" in page.html  # the page is all there, for the notebook
    text = repr(page)
    assert len(text) < 200 and "<!doctype" not in text and f"{len(page.html):,}" in text and ".save(" in text


def test_a_runs_step_checks_its_arguments(trained, tmp_path):
    cfg, _ = trained
    run = load(cfg.out_dir).run("ROMEO:")
    with pytest.raises(GlimpseError, match="within 2 layers"):
        run.step(5, 0, 0)
    with pytest.raises(GlimpseError, match="whole numbers; got 0, 1, 2.0"):
        run.step(0, 1, 2.0)
    assert run.step(np.int64(0), 1, 2)["tokens"] == list("ROM")  # numpy's integers are whole numbers too
    for query in (-1, 6):  # "ROMEO:" has tokens 0 to 5
        with pytest.raises(GlimpseError, match=f"within 2 layers, 2 heads and 6 tokens; got layer 0, head 0, "
                                               f"query {query}"):
            run.step(0, 0, query)
    vocab = run.model.tokenizer.vocab_size
    with pytest.raises(GlimpseError, match=f"token id -1 .* 0 to {vocab - 1}"):
        run.text_of([0, -1])  # not the last token's text
    with pytest.raises(GlimpseError, match=f"token id {vocab} "):
        run.text_of(np.array([[0], [vocab]]))
    top = run.lens_ids[-1]  # (T, k): the logit lens's top tokens at each position, read in that shape
    assert run.text_of(top) == [[run.text_of([i])[0] for i in row] for row in top.tolist()] and len(top) == 6
    assert run.text_of(run.token_ids) == list("ROMEO:") and run.text_of(3) == run.text_of([3])
    assert Path(run.save(tmp_path / "api-dump") / "attention.npz").is_file()
    assert not list((tmp_path / "api-dump").glob("*.png"))  # pictures only when asked: they cost seconds
    assert (run.save(tmp_path / "with-pictures", pngs=True) / "layer_0.png").is_file()
    page = tmp_path / "pages" / "run.html"
    assert run.show().save(page) == page and page.read_text(encoding="utf-8") == run.show().html
    (tmp_path / "a-file").write_text("")
    with pytest.raises(GlimpseError) as error:  # a one-line error, not NotADirectoryError from deep in the dump
        run.save(tmp_path / "a-file" / "dump")
    assert str(error.value) == (f"the dump's folder {str(tmp_path / 'a-file' / 'dump')!r} cannot be made: "
                                f"{str(tmp_path / 'a-file')!r} is a file; give save() a folder you can write")
    with pytest.raises(GlimpseError) as error:
        run.show().save(tmp_path / "a-file" / "run.html")
    assert str(error.value) == (f"the page's folder {str(tmp_path / 'a-file')!r} is a file; give save() a path you "
                                "can write")
    with pytest.raises(GlimpseError) as error:  # a name no folder can have, which only making the folder finds
        run.save(tmp_path / ("x" * 300))
    assert str(error.value) == f"could not use {str(tmp_path / ('x' * 300))!r}: File name too long", str(error.value)
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:  # "~/..." is the home folder, as load() reads it
        patch.setenv("HOME", str(home))
        assert run.save("~/dump") == home / "dump" and (home / "dump" / "index.html").is_file()
        assert run.show().save("~/run.html") == home / "run.html"
        assert (home / "run.html").read_text(encoding="utf-8") == run.show().html
    assert 'height: 300px;' in run.show(height=np.int64(300))._repr_html_()
    for height in ("300px", '300" onload="alert(1)', 0, 2.5, True):  # it goes into the frame's style attribute
        with pytest.raises(GlimpseError) as error:
            run.show(height=height)
        assert str(error.value) == f"height must be a whole number of pixels; got {height!r}"


def test_a_hugging_face_folder_loads_and_runs_as_the_checkpoint_it_was_exported_from(tmp_path, trained):
    import export
    from glimpse.config import build

    cfg, _ = trained
    folder = export.export(build(export.ExportConfig, dict(out_dir=cfg.out_dir, to=str(tmp_path / "hf"))))
    ours, theirs = load(cfg.out_dir), load(folder)
    assert theirs.tokenizer.encode("ROMEO:").tolist() == ours.tokenizer.encode("ROMEO:").tolist()
    a, b = ours.run("ROMEO: what light"), theirs.run("ROMEO: what light")
    for key in ("q", "k", "v", "scores", "weights", "head_out_norm", "logit"):
        assert np.allclose(getattr(a, key), getattr(b, key), atol=1e-5), key
    assert a.text_of(a.predicted) == b.text_of(b.predicted)


CHARS = "abcdefghijklmnopqrstuvw"


def random_model(**config) -> Model:
    """A Model as load() returns one, over a char vocabulary, with random weights whose heads attend sharply."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=12, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=16, **config)).eval()
    with torch.no_grad():  # every weight well off its initial value: scores of a few units, not hundredths
        for p in gpt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return Model(gpt, {"tokenizer": {"kind": "char", "chars": CHARS}, "model_config": asdict(gpt.config)}, "random")


@pytest.mark.parametrize("pos_encoding", ["learned", "alibi"])
def test_a_runs_step_under_additive_scores_shows_no_dot_product(pos_encoding):
    """Additive scores (v . tanh(W_q q + W_k k)) take no q . k: a step offers none rather than numbers that are
    not the head's, and its scores are the traced ones. ALiBi's penalty is in them as in any score, and the step
    gives it: without it the distance's share of the scores would read as the network's."""
    run = random_model(attn_score="additive", pos_encoding=pos_encoding).run("kaqbwkaqbw")
    step = run.step(1, 0, 6)
    assert step["dots"] is None and step["q_times_k"] is None and step["scale"] is None
    if pos_encoding == "alibi":  # head 0 of 2: slope 2^-4, the steepest
        np.testing.assert_array_equal(step["penalty"], -np.arange(6, -1, -1) / 16)
    else:
        assert step["penalty"] is None
    np.testing.assert_array_equal(step["scores"], run.scores[1, 0, 6, :7])
    np.testing.assert_allclose(step["context"], step["weights"] @ step["values"], atol=1e-5)


def test_the_walkthroughs_probe_and_step_cells_read_a_model_without_induction_heads_or_dot_products(capsys):
    """A learner who points the walkthrough at a model of another kind (here random additive scores under ALiBi)
    gets the probe's cell saying there is no induction head, naming the highest-scoring head instead, and the
    step's table with no q . k (nan) and the traced scores, ALiBi's penalty in them. The cells run as Jupyter
    would run them, in one namespace, with the model the learner loaded."""
    import nbformat

    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    probe_cell, = [c for c in cells if "probe = model.induction()" in c]
    step_cell, = [c for c in cells if "step = run.step(layer, head, query)" in c]
    model = random_model(attn_score="additive", pos_encoding="alibi")
    run = model.run("kaqbwkaqbwka")  # 12 tokens: the notebook's query 11 is the last
    scope = {"np": np, "model": model, "run": run}
    exec(compile(probe_cell, "probe cell", "exec"), scope)
    probe = model.induction()
    scores = np.array(probe["induction"])
    assert probe["induction_heads"] == [] and probe["verdict"].startswith("no induction head")  # random weights
    layer, head = np.unravel_index(scores.argmax(), scores.shape)
    assert f"no induction head; the highest score: layer {layer}, head {head}\n" in capsys.readouterr().out
    exec(compile(step_cell, "step cell", "exec"), scope)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"^\s+\d+\s+'", line)]
    assert [int(r[0]) for r in rows] == list(range(12))
    assert all(r[2] == "nan" for r in rows)  # q . k
    np.testing.assert_allclose([float(r[3]) for r in rows], run.scores[layer, head, 11], atol=1e-3)  # scaled
    penalty = run.step(layer, head, 11)["penalty"]
    assert penalty is not None and penalty[0] < 0  # in the scores the table shows


@pytest.mark.parametrize("variant", [{}, {"attn_score": "dot"}, {"pos_encoding": "alibi"}])
def test_a_runs_step_is_the_lectures_computation_by_hand(variant):
    """Every number run.step hands a learner, recomputed in numpy from the traced q, k, v and c_proj's weight."""
    model = random_model(**variant)
    run = model.run("kaqbwkaqbw")
    layer, head, query = 1, 1, 6
    step = run.step(layer, head, query)
    q, keys, values = (a.astype(np.float64) for a in (run.q[layer, head, query], run.k[layer, head, : query + 1],
                                                     run.v[layer, head, : query + 1]))
    hs = q.size
    scale = 1.0 if variant.get("attn_score") == "dot" else 1 / np.sqrt(hs)
    assert step["scale"] == pytest.approx(scale) and step["masked"] == 10 - query - 1
    assert step["tokens"] == list("kaqbwka")
    np.testing.assert_allclose(step["q_times_k"], keys * q, rtol=1e-6)
    np.testing.assert_allclose(step["dots"], keys @ q, rtol=1e-5, atol=1e-6)
    penalty = np.zeros(query + 1)
    if variant.get("pos_encoding") == "alibi":  # -slope x distance back, slope 2^(-8 (h + 1) / H)
        penalty = -2.0 ** (-8 * (head + 1) / 2) * (query - np.arange(query + 1))
        np.testing.assert_allclose(step["penalty"], penalty, atol=1e-5)
    else:
        assert step["penalty"] is None
    scores = keys @ q * scale + penalty
    np.testing.assert_allclose(step["scores"], scores, rtol=1e-5, atol=1e-5)
    assert np.abs(scores).max() > 1  # sharp enough for a wrong scale to show
    weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    np.testing.assert_allclose(step["weights"], weights, atol=1e-6)
    np.testing.assert_allclose(step["weighted_values"], weights[:, None] * values, atol=1e-6)
    np.testing.assert_allclose(step["context"], weights @ values, atol=1e-5)
    w_o = model.gpt.transformer.h[layer].attn.c_proj.weight.detach().double().numpy()[:, head * hs:(head + 1) * hs]
    moved = weights * np.linalg.norm(values @ w_o.T, axis=-1)  # ||weight_j v_j W_O,h||
    np.testing.assert_allclose(step["moved_norm"], moved, rtol=1e-5)
    assert step["top_moved_key"] == moved.argmax()
    steps = [run.step(*at) for at in np.ndindex(*run.q.shape[:2], 10)]  # every layer, head and query
    apart = [s for s in steps if s["moved_norm"].argmax() != s["weights"].argmax()]  # the heaviest key moved less
    assert apart and all(s["top_moved_key"] == s["moved_norm"].argmax() for s in apart)


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"pos_encoding": "rope"},
                                     {"qk_norm": True, "pos_encoding": "rope", "norm": "rmsnorm"}])
def test_a_runs_step_gives_q_and_k_as_w_q_x_made_them_before_qk_norm_and_rope(variant):
    """The lecture's q is W_q x: a step gives that (x the block's normalised input, read off ln_1 by a hook of
    the test's own), then qk_norm's RMS-normalised times its gain, which rope rotates into the q the scores take:
    a turn by an angle growing with the position, none at position 0, lengths kept."""
    model = random_model(**variant)
    layer, head, query, hs, C = 1, 1, 6, 8, 16
    seen = []
    hook = model.gpt.transformer.h[layer].ln_1.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        run = model.run("kaqbwkaqbw")
    finally:
        hook.remove()
    step = run.step(layer, head, query)
    qk_norm, rope = variant.get("qk_norm", False), variant.get("pos_encoding") == "rope"
    # a stage the model does not have is q and k themselves, kept once
    assert (run.q_projected is None) == (run.k_projected is None) == (not qk_norm and not rope)
    assert (run.q_normed is None) == (run.k_normed is None) == (not (qk_norm and rope))
    x = seen[0][0].double().numpy()  # (T, C)
    attn = model.gpt.transformer.h[layer].attn
    w, b = attn.c_attn.weight.detach().double().numpy(), attn.c_attn.bias
    b = b.detach().double().numpy() if b is not None else np.zeros(3 * C)
    channels = slice(head * hs, (head + 1) * hs)
    q = x[query] @ w[:C][channels].T + b[:C][channels]  # (hs,): W_q x
    keys = x[: query + 1] @ w[C:2 * C][channels].T + b[C:2 * C][channels]  # (query + 1, hs): W_k x
    np.testing.assert_allclose(step["query_projected"], q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step["keys_projected"], keys, rtol=1e-5, atol=1e-5)
    if variant.get("qk_norm"):
        rms = lambda a: np.sqrt((a ** 2).mean(-1, keepdims=True) + 1e-5)  # noqa: E731
        q = q / rms(q) * attn.q_norm.weight.detach().double().numpy()
        keys = keys / rms(keys) * attn.k_norm.weight.detach().double().numpy()
        np.testing.assert_allclose(step["query_normed"], q, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step["keys_normed"], keys, rtol=1e-5, atol=1e-5)
    else:
        assert step["query_normed"] is None and step["keys_normed"] is None
    if variant.get("pos_encoding") == "rope":
        np.testing.assert_allclose(step["keys"][0], keys[0], rtol=1e-5, atol=1e-5)  # position 0: no turn
        np.testing.assert_allclose(np.linalg.norm(step["keys"], axis=-1), np.linalg.norm(keys, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(step["query"]), np.linalg.norm(q), rtol=1e-5)
        assert np.abs(step["query"] - q).max() > 0.1  # turned
    else:  # without rope, the scores take them as they are
        np.testing.assert_allclose(step["query"], q, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step["keys"], keys, rtol=1e-5, atol=1e-5)


def test_a_models_loss_is_the_next_token_cross_entropy_by_hand_with_heads_removed():
    """model.loss reads the last block_size + 1 tokens and predicts each from those before it; ablate="1.0"
    removes layer 1's head 0 (an independent way: a copy whose c_proj ignores that head's columns)."""
    model = random_model()
    ids = [CHARS.index(c) for c in "kaqbwkaqbwmnopkaqbw"]  # 19 tokens: past the 12 + 1 the loss reads

    def by_hand(gpt: GPT) -> float:
        window = ids[-13:]
        with torch.no_grad():
            logits = gpt(torch.tensor(window[:-1])[None])[0][0].double().numpy()  # (12, V)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        return -log_probs[np.arange(12), window[1:]].mean()

    assert model.loss(ids) == pytest.approx(by_hand(model.gpt), rel=1e-5)
    without = copy.deepcopy(model.gpt)
    with torch.no_grad():
        without.transformer.h[1].attn.c_proj.weight[:, 0:8] = 0.0  # head 0 of layer 1, 8 channels a head
    assert model.loss(ids, ablate="1.0") == pytest.approx(by_hand(without), rel=1e-5)
    assert model.loss(ids, ablate="1.0") != pytest.approx(model.loss(ids), rel=1e-4)  # the head matters


def test_a_long_runs_dump_keeps_the_window_and_the_prompt_left_in_it(tmp_path):
    from glimpse.attention import load_dump

    model = random_model()
    text = "kaqbwkaqbwmnopkaqbw"  # 19 characters: the run keeps the last 12, 7 are cut
    run = model.run(text)
    assert run.cut == 7 and run.tokens == list(text[7:])
    dump = load_dump(run.save(tmp_path / "d", prompt_len=10))
    assert int(dump["cut"]) == 7 and dump["tokens"] == list(text[7:])
    assert dump["prompt_len"] == 3  # the prompt's last 3 tokens are in the window
    assert load_dump(run.save(tmp_path / "e"))["prompt_len"] == 12  # no prompt given: the whole window is the text
    assert load_dump(run.save(tmp_path / "f", prompt_len=5))["prompt_len"] == 0  # the whole prompt was cut
    model.state["iter_num"] = 70  # a checkpoint's step: the dump's meta names it
    assert load_dump(run.save(tmp_path / "g"))["meta"]["iter"] == 70
    (tmp_path / "notes" / "sample_ideas").mkdir(parents=True)  # a folder of that name that is no sample.py dump
    assert run.save(tmp_path / "notes") == tmp_path / "notes"


def test_the_viewer_page_goes_into_its_output_cells_frame_whole():
    """The page is the frame's srcdoc attribute: its quotes escaped, or the attribute would end at the first."""
    from glimpse.notebook import Inline

    frame = Inline('<p title="a">b & c</p>', height=300)._repr_html_()
    assert frame.startswith('<iframe srcdoc="&lt;p title=&quot;a&quot;&gt;b &amp; c&lt;/p&gt;" style="width: 100%; '
                            'height: 300px;')
