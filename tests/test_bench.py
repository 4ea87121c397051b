"""bench.py runs every benchmark and reports what it measured, with the configuration that produced it."""

import json

import pytest

from tests.conftest import python


@pytest.mark.parametrize("what,extra", [("attention_dump", ["--tokens=16"]), ("train_step", []),
                                        ("sample", ["--new_tokens=5"])])
def test_bench_reports_json(what, extra):
    run = python("bench.py", f"--what={what}", "--repeats=1", "--json", *extra)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["benchmark"] == what and result["environment"]["torch"]
    assert result["model"]["n_layer"] == 4 and all(s > 0 for s in result["seconds"].values())
    if what != "attention_dump":
        assert result["tokens_per_sec"] > 0
