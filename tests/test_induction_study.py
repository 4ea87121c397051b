"""scripts/induction_study.py: its generated text, a short study end to end, and its errors."""

import json
import sys

from tests.conftest import REPO
from tests.test_reliability import run_main

sys.path.insert(0, str(REPO / "scripts"))
import induction_study  # noqa: E402
from induction_study import StudyConfig, make_documents  # noqa: E402


def test_repeats_documents_are_a_random_string_twice():
    docs = make_documents(StudyConfig(chars=5000, chain_share=0.0, min_len=5, max_len=9))
    assert sum(map(len, docs)) >= 5000
    for doc in docs:
        half = len(doc) // 2
        assert 5 <= half <= 9 and doc[:half] == doc[half:]
    assert len({doc[:5] for doc in docs}) > len(docs) * 0.9  # fresh strings, not one string over and over


def test_a_gap_of_random_characters_can_separate_the_copies():
    docs = make_documents(StudyConfig(chars=5000, chain_share=0.0, min_len=5, max_len=5, max_gap=7))
    gaps = [len(doc) - 10 for doc in docs]
    assert all(doc[:5] == doc[-5:] for doc in docs)
    assert min(gaps) == 0 and max(gaps) == 7  # every gap from none to max_gap turns up


def test_chains_follow_one_fixed_map_two_characters_on():
    docs = make_documents(StudyConfig(chars=5000, chain_share=1.0, chain_p=1.0))
    follows = {}
    for doc in docs:
        assert 8 <= len(doc) <= 32
        for a, c in zip(doc, doc[2:]):
            assert follows.setdefault(a, c) == c  # the same character always leads to the same one two later
    noisy = make_documents(StudyConfig(chars=5000, chain_share=1.0, chain_p=0.5))
    kept = [follows.get(a) == c for doc in noisy for a, c in zip(doc, doc[2:])]
    assert 0.4 < sum(kept) / len(kept) < 0.7  # half the steps follow the map (a random pick rarely does)


def test_a_short_study_trains_each_model_and_probes_it_at_each_length(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [f"--out={out}", "--max_iters=10", "--chars=6000", "--n_head=2", "--probe_tokens=6,20", "--max_gap=5"]
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
    assert "2 layer(s), probe length" in printed and "layer 1 head 1 induction (peak)" in printed
    before = (out / "1-layer" / "ckpt.pt").read_bytes()
    assert "holds a trained model already" in run_main(induction_study.main, argv, capsys)
    assert (out / "1-layer" / "ckpt.pt").read_bytes() == before  # nothing retrained over it


def test_study_settings_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "study"
    assert "must be divisible by n_head" in run_main(induction_study.main, [f"--out={out}", "--n_head=3"], capsys)
    assert "pos_encoding must be one of" in run_main(induction_study.main, [f"--out={out}", "--pos_encoding=x"], capsys)
    assert not out.exists()
    (tmp_path / "a_file").write_text("keep me")
    assert "cannot make the study's folder" in run_main(induction_study.main, [f"--out={tmp_path / 'a_file'}"], capsys)
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert "layers must be positive whole numbers" in run_main(induction_study.main, ["--layers=0,x"], capsys)
    assert "min_len <= max_len" in run_main(induction_study.main, ["--min_len=9", "--max_len=5"], capsys)
    assert "need max_gap >= 0 and chars >= 1000" in run_main(induction_study.main, ["--max_gap=-1"], capsys)
    assert "probe_tokens must be whole numbers from 2 to 32" in run_main(induction_study.main, ["--probe_tokens=8,40"],
                                                                          capsys)
    assert "chain_share and chain_p are probabilities" in run_main(induction_study.main, ["--chain_p=1.5"], capsys)
