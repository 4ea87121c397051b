"""scripts/induction_study.py: its generated text, a short study end to end, its errors, and a real
training run in which two layers grow an induction head and one layer does not."""

import json
import sys

import pytest

from tests.conftest import REPO
from tests.test_reliability import run_main

sys.path.insert(0, str(REPO / "scripts"))
import induction_study  # noqa: E402
from induction_study import StudyConfig, make_documents, run  # noqa: E402


def test_documents_repeat_one_fresh_random_string_of_varying_length():
    cfg = StudyConfig(chars=20_000, doc_len=100, min_len=5, max_len=9)
    docs = make_documents(cfg)
    assert sum(map(len, docs)) >= 20_000 and all(len(doc) == 100 for doc in docs)
    periods = []
    for doc in docs:
        periods.append(next(n for n in range(1, 101) if doc[n:] == doc[:-n]))  # the shortest self-matching shift
    assert set(periods) <= set(range(5, 10)) and len(set(periods)) >= 4  # no single distance back finds the copy
    assert len({doc[:5] for doc in docs}) > len(docs) * 0.9  # a fresh string each time, not one over and over


def test_a_short_study_trains_each_model_and_probes_it_at_each_length(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [f"--out={out}", "--max_iters=10", "--chars=6000", "--n_head=2", "--probe_tokens=6,20"]
    induction_study.main(argv)
    printed = capsys.readouterr().out
    rows = json.loads((out / "induction_study.json").read_text())
    assert [row["n_layer"] for row in rows] == [1, 2]
    for row in rows:
        assert (out / f"{row['n_layer']}-layer" / "ckpt.pt").exists()
        assert [p["n_tokens"] for p in row["probes"]] == [6, 20]
        for probe in row["probes"]:
            assert len(probe["heads"]) == 2 * row["n_layer"]  # every head of every layer
            n = probe["n_tokens"]
            for head in probe["heads"]:
                assert -(n - 1) <= head["peak_offset"] <= n and 0 < head["peak_weight"] <= 1
                assert head["peak_weight"] > 1 / (2 * n)  # the most of 2n offsets whose weights add up to 1
    assert "2 layer(s), probe length" in printed and "layer 1 head 1 induction (peak)" in printed
    assert "a perfect induction head scores" in printed
    for row in rows:
        for probe in row["probes"]:  # 64 symbols: every probe length draws its string without repeats
            assert probe["draw"] == "without repeats" and probe["induction_ceiling"] == 1.0
            assert all("prev_token_on_probe" in head and "prev_token" not in head for head in probe["heads"])
    before = (out / "1-layer" / "ckpt.pt").read_bytes()
    assert "holds a trained model already" in run_main(induction_study.main, argv, capsys)
    assert (out / "1-layer" / "ckpt.pt").read_bytes() == before  # nothing retrained over it


def test_study_settings_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "study"

    def refusal(*flags: str) -> str:  # into tmp_path: a setting let through would train a study there, not here
        return run_main(induction_study.main, [f"--out={out}", *flags], capsys)

    assert "must be divisible by n_head" in refusal("--n_head=3")
    assert "pos_encoding must be one of" in refusal("--pos_encoding=x")
    assert refusal("--max_iters=0").endswith("max_iters must be at least 1, got 0")  # not eval_interval, derived
    assert not out.exists()
    (tmp_path / "a_file").write_text("keep me")
    assert "cannot make the study's folder" in run_main(induction_study.main, [f"--out={tmp_path / 'a_file'}"], capsys)
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert "layers must be positive whole numbers" in refusal("--layers=0,x")
    assert "layers must be positive whole numbers" in refusal("--layers=\u00b2")
    assert "names a layer count more than once" in refusal("--layers=1,2,1")
    with pytest.raises(ValueError, match="names a layer count more than once"):  # the same count, written twice
        StudyConfig(layers="2,02")
    assert "min_len <= max_len" in refusal("--min_len=9", "--max_len=5")
    assert "two copies in the models' 64-character window" in refusal("--max_len=40")
    assert "max_len <= doc_len / 2" in refusal("--max_len=20", "--doc_len=30")
    assert "chars must be at least 1000" in refusal("--chars=10")
    assert "probe_tokens must be whole numbers from 2 to 32" in refusal("--probe_tokens=8,40")
    assert not out.exists()


def test_two_layers_learn_an_induction_head_and_one_layer_does_not(tmp_path):
    """A real training run of the study's default settings (1,500 steps each, under a minute on 2 cores)."""
    rows = run(StudyConfig(out=str(tmp_path / "study")))  # probes at lengths 8, 16, 24 and 32
    one, two = rows
    for probe in two["probes"]:  # at every length: a layer-1 head that looks at +1, and copies
        best = max((h for h in probe["heads"] if h["layer"] == 1), key=lambda h: h["induction"])
        assert best["induction"] > 0.5 and best["peak_offset"] == 1, probe
        assert probe["verdict"].startswith(f"induction head {best['layer']}.{best['head']} "), probe
        assert probe["second_copy_loss"] < 0.5 * probe["first_copy_loss"], probe
    for probe in one["probes"]:  # one layer cannot match a token against what preceded another one
        assert max(h["induction"] for h in probe["heads"]) < 0.3, probe
        assert probe["second_copy_loss"] > 0.6 * probe["first_copy_loss"], probe
        assert "circuit" not in probe and probe["verdict"].startswith("no induction head"), probe
    for probe in two["probes"]:  # the circuit needs both halves: without either, the repeat is as hard as new text
        circuit = probe["circuit"]
        assert circuit["induction"]["head"] == "1.0" and circuit["prev_token"]["head"] == "0.0"
        assert circuit["induction"]["second_copy_loss_without"] > 0.8 * probe["first_copy_loss"], probe
        assert circuit["prev_token"]["second_copy_loss_without"] > 0.8 * probe["first_copy_loss"], probe


def test_with_two_heads_a_layer_an_idle_head_can_go(tmp_path):
    """The defaults have one head a layer, so no head is idle; with two, the heads that neither look at the
    previous token nor induct cost the second copy little."""
    rows = run(StudyConfig(out=str(tmp_path / "study"), n_head=2, layers="2"))
    for probe in rows[0]["probes"]:
        circuit = probe["circuit"]
        assert circuit["prev_token"]["second_copy_loss_without"] > 0.8 * probe["first_copy_loss"], probe
        assert circuit["idle"]["second_copy_loss_without"] < probe["second_copy_loss"] + 0.3, probe


def test_the_circuit_names_each_head_by_where_it_looks():
    """The induction head is a later layer's best inductor, however well a layer-0 head scores (it has no
    previous-token head before it to read); the previous-token head is layer 0's; the idle one, of the rest, looks
    least at either. Each is reported with what removing it costs the second copy."""
    from scripts.induction_study import circuit

    def head(layer, index, induction, prev):
        return {"layer": layer, "head": index, "induction": induction, "prev_token_on_probe": prev,
                "second_copy_loss_without": 1.0 + layer + index / 10}

    heads = [head(0, 0, 0.9, 0.2), head(0, 1, 0.1, 0.7), head(1, 0, 0.6, 0.1), head(1, 1, 0.05, 0.8),
             head(1, 2, 0.2, 0.3)]
    assert circuit(heads) == {"induction": {"head": "1.0", "second_copy_loss_without": 2.0},
                              "prev_token": {"head": "0.1", "second_copy_loss_without": 1.1},
                              "idle": {"head": "1.2", "second_copy_loss_without": 2.2}}
    assert "idle" not in circuit(heads[1:3])  # one head a layer: none left over


def test_the_study_table_keeps_every_row_in_its_columns():
    """The longest label, the second copy without the previous-token head, pushed its row's numbers right."""
    from scripts.induction_study import report

    heads = [{"layer": 0, "head": 0, "induction": 0.11, "peak_offset": 1}]
    circuit = {"induction": {"second_copy_loss_without": 4.28, "head": "1.0"},
               "prev_token": {"second_copy_loss_without": 4.12, "head": "0.0"}}
    probe = {"n_tokens": 8, "first_copy_loss": 4.27, "second_copy_loss": 3.5, "induction_ceiling": 1.0,
             "heads": heads, "circuit": circuit}
    lines = report([{"n_layer": 2, "probes": [probe, probe]}]).splitlines()
    assert len(lines) == 6 and len({len(line) for line in lines}) == 1, "\n".join(lines)
