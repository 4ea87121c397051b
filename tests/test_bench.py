"""bench.py runs every benchmark and reports what it measured, with the configuration that produced it."""

import json
import re
import sys
from dataclasses import fields
from types import SimpleNamespace
from typing import get_args, get_type_hints

import pytest
import torch

from bench import READ_BY, BenchConfig, bench_head_importance, profile_lines, report
from bench_presets import preset_config, train_step_fn
from glimpse import timing
from glimpse.comparisons import prepare_beside_tiktoken
from glimpse.errors import GlimpseError
from tests.conftest import python, run_script

RECIPE = "config/shakespeare_char_recipe.toml"


def bench_json(*args):
    run = python("bench.py", "--repeats=1", "--json", *args)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def printed_table(result: dict, capsys) -> list[str]:
    """The table bench.py prints in place of a --json run's result, under the configuration that run recorded."""
    report(BenchConfig(**result["config"]), result)
    return capsys.readouterr().out.splitlines()


def figures(lines: list[str], unit: str) -> dict[str, float]:
    """The attention_dump table's rows of one unit ("ms" or "MB"): each part's name and its figure."""
    return {m[1]: float(m[2]) for m in (re.fullmatch(rf"  (\S+) +([\d.]+) {unit}", line) for line in lines) if m}


# a train_step or sample table's row: the model's shape, batch, device, dtype, optimizer, ms, tokens/s, then (train_step
# only) MFU and peak MB, then the speed against the first row, the preset, and what sets the row apart
ROW = re.compile(r"  (\d+L \d+H \d+C T\d+) +(\d+) +(\S+) +(\S+) +(\S+) +([\d.]+) +([\d,]+) +(?:(\S+) +(\S+) +)?"
                 r"([\d.]+)x  (\S+)( \(\d+ shards\))?(  \(no KV cache\))?")


def table_rows(lines: list[str]) -> list[re.Match]:
    rows = [ROW.fullmatch(line) for line in lines[2:]]
    assert all(rows), lines
    return rows


def assert_row_is_the_run(row: re.Match, r: dict):
    """A row's figures are its run's in the JSON, in the table's units (ms, not seconds)."""
    m = r["model"]
    assert row[1] == f"{m['n_layer']}L {m['n_head']}H {m['n_embd']}C T{m['block_size']}"
    assert (int(row[2]), row[3], row[4], row[5]) == (r.get("batch_size", 1), r["device"], r["dtype"],
                                                     r.get("optimizer", "-"))
    assert float(row[6]) == pytest.approx(r["seconds"] * 1000, abs=0.051)
    assert float(row[7].replace(",", "")) == pytest.approx(r["tokens_per_sec"], abs=0.51)
    assert float(row[10]) == pytest.approx(r["vs_first"], abs=0.0051) and row[11] == r["preset"]


def test_attention_dump_reports_each_part(capsys):
    threads = 1 if torch.get_num_threads() > 1 else 2  # not torch's default here, so --threads shows
    result = bench_json("--what=attention_dump", "--tokens=16", f"--threads={threads}")
    assert result["benchmark"] == "attention_dump" and result["environment"]["torch"]
    assert result["config"]["tokens"] == 16 and result["environment"]["threads"] == threads
    assert result["model"]["n_layer"] == preset_config("config/shakespeare_char_cpu.toml").model.n_layer  # the default
    assert result["model"]["block_size"] == 16
    seconds = result["seconds"]
    assert set(seconds) == {"weights", "npz_and_heads_json", "html_viewer", "dump_without_pngs", "layer_pngs",
                            "trace", "mechanism_dump_without_pngs", "data_total"}
    assert all(s > 0 for s in seconds.values())
    assert seconds["data_total"] == pytest.approx(seconds["weights"] + seconds["npz_and_heads_json"])
    sizes = result["megabytes"]  # the plain dump's files, the mechanism's beside them (not over them), the PNGs
    assert {"attention.npz", "index.html", "mechanism_attention.npz", "mechanism_index.html",
            "layer_pngs"} <= set(sizes)
    assert sizes["mechanism_attention.npz"] > sizes["attention.npz"] > 0 and sizes["layer_pngs"] > 0
    memory = result["memory"]
    assert memory["peak_beyond_before_mb"] == pytest.approx(memory["peak_mb"] - memory["before_dump_mb"])
    assert memory["peak_with_mechanism_mb"] >= memory["peak_mb"] >= memory["before_dump_mb"] > 0  # peaks only grow

    lines = printed_table(result, capsys)  # the table gives the same figures, in ms and MB
    m = result["model"]
    assert lines[0].endswith("median of 1")
    assert lines[1] == f"  {m['n_layer']} layers x {m['n_head']} heads, n_embd {m['n_embd']}, 16 tokens"
    assert figures(lines, "ms") == pytest.approx({name: s * 1000 for name, s in seconds.items()}, abs=0.051)
    assert figures(lines, "MB") == pytest.approx(sizes, abs=0.051)
    peak, beyond, with_mechanism = (int(n.replace(",", "")) for n in re.fullmatch(
        r"  peak memory ([\d,]+) MB, ([\d,]+) MB beyond the model's process before the dump; ([\d,]+) MB with "
        r"the mechanism's dump", lines[-1]).groups())
    assert (peak, beyond, with_mechanism) == pytest.approx(
        (memory["peak_mb"], memory["peak_beyond_before_mb"], memory["peak_with_mechanism_mb"]), abs=0.51)


@pytest.mark.parametrize("what,extra", [("train_step", []), ("sample", ["--new_tokens=5"])])
def test_presets_are_compared_in_one_run_with_their_overrides(what, extra):
    override = f"{RECIPE}:dtype=bfloat16:n_layer=2:batch_size=6:gradient_accumulation_steps=2"  # 12 sequences a step
    presets = f"{RECIPE},{override},config/shakespeare_char_speedrun.toml"
    result = bench_json(f"--what={what}", f"--preset={presets}", *extra)
    first, overridden, speedrun = result["runs"]
    assert [r["preset"] for r in result["runs"]] == presets.split(",")
    assert first["model"]["n_layer"] == 4 and overridden["model"]["n_layer"] == 2
    assert speedrun["model"]["qk_norm"] is True  # the preset's own flags are what runs
    assert first["vs_first"] == 1.0
    for r in result["runs"]:
        assert r["device"] == "cpu"  # the presets' own device
        assert r["seconds"] > 0 and r["tokens_per_sec"] > 0
        assert r["vs_first"] == pytest.approx(first["seconds"] / r["seconds"])
        cfg = preset_config(r["preset"])  # a step's tokens (every micro-step's), or the tokens sampled
        tokens = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps if what == "train_step" else 5
        assert r["tokens_per_sec"] == pytest.approx(tokens / r["seconds"])
    if what == "train_step":
        assert (first["dtype"], overridden["dtype"], speedrun["optimizer"]) == ("float32", "bfloat16", "muon")


@pytest.mark.parametrize("preset,says", [("config/nope.toml", "config/nope.toml"), (",", "names no preset")])
def test_a_bad_preset_is_a_one_line_error(preset, says):
    run = python("bench.py", "--what=train_step", "--repeats=1", f"--preset={preset}")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and says in run.stderr


def test_uncached_times_each_preset_without_the_cache_beside_it(capsys):
    presets = f"{RECIPE},{RECIPE}:n_layer=2"
    result = bench_json("--what=sample", "--new_tokens=5", "--uncached", f"--preset={presets}")
    runs = result["runs"]
    assert [(r["preset"], r["kv_cache"]) for r in runs] == [
        (RECIPE, True), (RECIPE, False), (f"{RECIPE}:n_layer=2", True), (f"{RECIPE}:n_layer=2", False)]
    assert [r["model"]["n_layer"] for r in runs] == [4, 4, 2, 2]
    assert all(r["tokens_per_sec"] > 0 for r in runs)
    lines = printed_table(result, capsys)
    assert lines[1].split() == ["model", "batch", "device", "dtype", "optim", "ms/run", "tokens/s", "vs", "first",
                                "preset"]  # no MFU or peak memory for sampling
    for row, r in zip(table_rows(lines), runs, strict=True):
        assert_row_is_the_run(row, r)
        assert row[8] is None and row[12] is None and bool(row[13]) is not r["kv_cache"]
    table = python("bench.py", "--what=sample", "--new_tokens=5", "--uncached", "--repeats=1", f"--preset={RECIPE}")
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if RECIPE in line]
    assert len(rows) == 2 and "(no KV cache)" not in rows[0] and rows[1].endswith("(no KV cache)")


def test_head_importance_is_timed_beside_one_intact_scoring():
    result = bench_json("--what=head_importance", "--val_tokens=2000")
    assert result["scorings"] == 1 + 3 * 4 and result["tokens_scored"] == 15 * 128  # the CPU preset's model
    assert result["ratio"] == pytest.approx(result["seconds"]["head_importance"] / result["seconds"]["intact"])
    assert bench_json("--what=head_importance", "--val_tokens=128", "--repeats=1")["tokens_scored"] == 128  # one window
    short = python("bench.py", "--what=head_importance", "--val_tokens=127")
    assert short.returncode == 2 and short.stderr.strip().count("\n") == 0
    assert "--val_tokens=127 is fewer than one window of the preset's block_size (128)" in short.stderr


def test_head_importance_names_each_timing_by_what_it_timed(monkeypatch, capsys):
    """The removals do the work of many scorings, the intact scoring of one: with a clock that counts the rows the
    model's linear layers take (the work done, not the machine's speed), the removals' figure is the larger, and the
    table gives each figure in ms, the scorings and the ratio as the result holds them."""
    rows = [0]

    def count(module, args, output):
        if isinstance(module, torch.nn.Linear):
            rows[0] += args[0].numel() // args[0].size(-1)

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: float(rows[0])))
    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        cfg = BenchConfig(what="head_importance", val_tokens=256, repeats=1)
        result = bench_head_importance(cfg)
    finally:
        hook.remove()
    s = result["seconds"]
    assert 0 < s["intact"] < s["head_importance"] and result["ratio"] == s["head_importance"] / s["intact"]
    report(cfg, result)
    header, line = capsys.readouterr().out.splitlines()
    assert header == f"head_importance | torch {torch.__version__}, {torch.get_num_threads()} threads, median of 1"
    assert line == (f"  3 layers x 4 heads, 256 tokens in 128-token windows: intact {s['intact'] * 1000:.0f} ms, every "
                    f"head removed alone (13 scorings) {s['head_importance'] * 1000:.0f} ms, {result['ratio']:.2f}x")


def test_gpt2_is_compared_with_transformers_in_one_run(capsys):
    pytest.importorskip("transformers")
    result = bench_json("--what=gpt2", "--gpt2_n_layer=1", "--new_tokens=4", "--prompt_tokens=8")
    assert result["model"]["n_embd"] == 768 and result["model"]["n_layer"] == 1  # GPT-2 small's width
    assert result["max_abs_logit_diff"]["imported"] < 1e-4 and result["max_abs_logit_diff"]["exported"] < 1e-4
    assert result["same_tokens"] is True
    s = result["seconds"]
    assert result["speedup"]["sample"] == pytest.approx(s["transformers_sample"] / s["glimpse_sample"])
    assert result["speedup"]["load"] == pytest.approx(s["transformers_load_to_first_token"]
                                                      / s["glimpse_load_to_first_token"])
    assert result["tokens_per_sec"] == pytest.approx({"glimpse": 4 / s["glimpse_sample"],
                                                      "transformers": 4 / s["transformers_sample"]})
    shape, load, sampling = printed_table(result, capsys)[1:]  # the table: each figure beside its own name
    diffs = result["max_abs_logit_diff"]
    assert shape.endswith(f"imported {diffs['imported']:.1e}, exported {diffs['exported']:.1e}")
    assert load == (f"  load to first token: glimpse {s['glimpse_load_to_first_token']:.2f} s, transformers "
                    f"{s['transformers_load_to_first_token']:.2f} s ({result['speedup']['load']:.2f}x)")
    assert sampling.startswith("  greedy sampling, 4 tokens after 8: ")
    assert sampling.endswith(f"({result['speedup']['sample']:.2f}x), same tokens: True")


def test_gpt2_logit_diffs_measure_the_import_and_the_export(monkeypatch):
    """Each max |logit diff| compares glimpse with transformers across one crossing: a weight read wrong on import
    shows in the imported figure, and one written wrong on export in the exported one (the final LayerNorm's bias
    shifted by 0.5 each time: the logits move by 0.5 times the sum of each token's embedding)."""
    pytest.importorskip("transformers")
    import glimpse.gpt2
    from glimpse.comparisons import gpt2_beside_transformers

    load, export = glimpse.gpt2.load_pretrained, glimpse.gpt2.hf_weights

    def load_shifted(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.transformer.ln_f.bias += 0.5
        return model

    def export_shifted(model):
        weights = export(model)
        weights["transformer.ln_f.bias"] = weights["transformer.ln_f.bias"] + 0.5
        return weights

    monkeypatch.setattr(glimpse.gpt2, "load_pretrained", load_shifted)
    monkeypatch.setattr(glimpse.gpt2, "hf_weights", export_shifted)
    result = gpt2_beside_transformers(n_layer=1, prompt_tokens=4, new_tokens=1, repeats=1)
    assert result["max_abs_logit_diff"]["imported"] > 1e-2 and result["max_abs_logit_diff"]["exported"] > 1e-2


def test_attention_dump_at_gpt2_shape_reports_sizes_and_memory(capsys):
    result = bench_json("--what=attention_dump", "--shape=gpt2", "--tokens=32", "--pngs=false", "--mechanism=false")
    assert (result["model"]["n_layer"], result["model"]["n_head"], result["model"]["vocab_size"]) == (12, 12, 50257)
    assert result["model"]["block_size"] == 32  # the dump's length, not GPT-2's 1,024
    assert result["environment"]["threads"] == torch.get_num_threads()  # no --threads: torch's default, as here
    assert set(result["seconds"]) == {"weights", "npz_and_heads_json", "html_viewer", "dump_without_pngs", "data_total"}
    assert not any(name.startswith(("layer_pngs", "mechanism_")) for name in result["megabytes"])
    assert result["megabytes"]["attention.npz"] > 0 and result["megabytes"]["index.html"] > 0
    memory = result["memory"]
    assert memory["peak_mb"] >= memory["before_dump_mb"] and "peak_with_mechanism_mb" not in memory
    assert printed_table(result, capsys)[-1].endswith("MB beyond the model's process before the dump")


def test_prepare_is_timed_beside_a_one_process_loop_on_the_same_tokens(gpt2_ranks, capsys):
    result = bench_json("--what=prepare", "--corpus_mb=1")
    assert result["megabytes"] >= 1 and result["documents"] > 8 and result["tokens"] > 100_000  # counts agreed
    assert result["speedup"] > 0 and result["peak_mb"] > 0
    s = result["seconds"]
    assert result["tokens_per_sec"] == pytest.approx({"loop": result["tokens"] / s["loop"],
                                                      "prepare": result["tokens"] / s["prepare"]})
    assert result["speedup"] == pytest.approx(s["loop"] / s["prepare"])  # how many times faster prepare.py is
    t = result["tokens_per_sec"]
    assert printed_table(result, capsys)[1] == (
        f"  {result['megabytes']:.0f} MB in 8 .jsonl files, {result['tokens']:,} tokens: prepare.py "
        f"{t['prepare']:,.0f} tokens/s, one-process tiktoken loop {t['loop']:,.0f} tokens/s "
        f"({result['speedup']:.2f}x); peak memory {result['peak_mb']:,.0f} MB")


def test_prepare_is_timed_on_one_txt_file_read_in_blocks(gpt2_ranks, capsys):
    result = bench_json("--what=prepare", "--corpus_mb=1", "--corpus_files=txt", "--repeats=1")
    assert result["layout"] == "txt" and result["documents"] == 1 and result["tokens"] > 100_000  # counts agreed
    assert result["peak_mb"] > 0
    assert f" MB in one .txt file, {result['tokens']:,} tokens: " in printed_table(result, capsys)[1]


def test_prepare_timing_is_refused_when_the_two_counts_disagree(gpt2_ranks, monkeypatch):
    """The two sides must tokenize the same documents into the same tokens, or their speeds compare nothing:
    a loop that drops each document's first token is caught."""
    import data.tokenizer

    class Short(data.tokenizer.GPT2Tokenizer):
        def __init__(self):
            super().__init__()
            full = self.enc
            self.enc = type("Enc", (), {"encode_ordinary": staticmethod(lambda text: full.encode_ordinary(text)[1:])})

    monkeypatch.setattr(data.tokenizer, "GPT2Tokenizer", Short)  # the loop's tokenizer; prepare.py runs its own
    with pytest.raises(GlimpseError, match=r"prepare.py wrote [\d,]+ document tokens, the loop counted"):
        prepare_beside_tiktoken(corpus_mb=1, repeats=1)


def test_train_step_is_timed_on_one_file_beside_shards(capsys):
    result = bench_json("--what=train_step", "--shards=1,4", f"--preset={RECIPE}")
    one, four = result["runs"]
    assert (one["shards"], four["shards"]) == (1, 4)  # the datasets the steps read were cut as asked
    assert one["preset"] == four["preset"] == RECIPE and four["tokens_per_sec"] > 0
    lines = printed_table(result, capsys)
    assert lines[1].split() == ["model", "batch", "device", "dtype", "optim", "ms/step", "tokens/s", "MFU", "peak",
                                "MB", "vs", "first", "preset"]
    for row, r in zip(table_rows(lines), result["runs"], strict=True):
        assert_row_is_the_run(row, r)
        assert (row[8], row[9], row[12], row[13]) == ("-", "-", f" ({r['shards']} shards)", None)  # the CPU: no MFU
    gpu = dict(one, mfu=0.4251, peak_mb=1234.4)  # the figures a GPU's step adds: a share of its peak, and MB
    row = table_rows(printed_table(dict(result, runs=[gpu]), capsys))[0]
    assert (row[8], row[9]) == ("42.5%", "1,234")
    bad = python("bench.py", "--what=train_step", "--shards=1,0")
    assert bad.returncode == 2 and "shards must be positive" in bad.stderr
    empty = python("bench.py", "--what=prepare", "--corpus_mb=0")
    assert empty.returncode == 2 and "corpus_mb must be at least 1" in empty.stderr
    no_layers = python("bench.py", "--what=gpt2", "--gpt2_n_layer=0")
    assert no_layers.returncode == 2
    assert no_layers.stderr.strip() == "error: gpt2_n_layer must be at least 1, got 0"
    for flags, says in [(["--what=gpt2", "--prompt_tokens=600"], "prompt_tokens + new_tokens is 1100"),
                        (["--repeats=0"], "error: repeats must be at least 1, got 0"),  # the one setting, named
                        (["--threads=-1"], "error: threads must be 0 (torch's default) or more, got -1"),
                        (["--what=sample", "--vocab_size=0"], "vocab_size must be at least 1")]:
        refused = python("bench.py", *flags)
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and says in refused.stderr


@pytest.mark.parametrize("settings,says", [
    ({"tokens": 0}, "tokens must be at least 1, got 0"),
    ({"profile_steps": 0}, "profile_steps must be at least 1, got 0"),
    ({"what": "gpt2", "prompt_tokens": 0}, "prompt_tokens must be at least 1, got 0"),
    ({"what": "gpt2", "prompt_tokens": 1000, "new_tokens": 25}, "prompt_tokens + new_tokens is 1025"),
    ({"what": "attention_dump", "profile": "."}, "--profile is read by --what=train_step only, not by "
                                                 "--what=attention_dump: drop it"),
    ({"what": "sample", "shards": "1,16"}, "--shards is read by --what=train_step only, not by --what=sample"),
    ({"what": "sample", "shape": "gpt2"}, "--shape is read by --what=attention_dump only"),
    ({"what": "prepare", "new_tokens": 20}, "--new_tokens is read by --what=sample and --what=gpt2 only, not by "
                                            "--what=prepare"),
    ({"what": "train_step", "corpus_files": "txt"}, "--corpus_files is read by --what=prepare only"),
])
def test_settings_out_of_range_are_refused_before_anything_runs(settings, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        BenchConfig(**settings)


def test_every_setting_read_by_some_benchmarks_only_is_refused_elsewhere_and_named_in_its_help():
    """READ_BY's benchmarks are those each setting's --help line starts with: a setting another benchmark is given is
    refused rather than dropped (--shards given to --what=sample once ended in a traceback), and its default is
    taken anywhere."""
    whats = get_args(get_type_hints(BenchConfig)["what"])

    def named(help_line: str) -> tuple[str, ...]:  # "sample and gpt2: ..." -> ("sample", "gpt2")
        names = tuple(help_line.split(":")[0].split(" and "))
        return names if set(names) <= set(whats) else ()

    assert {f.name: named(f.metadata["help"]) for f in fields(BenchConfig) if named(f.metadata["help"])} == READ_BY
    for name in READ_BY:
        for what in whats:
            assert BenchConfig(what=what, **{name: BenchConfig.__dataclass_fields__[name].default}).what == what


def test_gpt2_may_generate_up_to_its_last_position():
    assert BenchConfig(what="gpt2", prompt_tokens=1000, new_tokens=24).new_tokens == 24  # 1,024 positions in all


def test_train_step_times_full_size_steps_when_the_preset_ramps_up(tmp_path):
    """The tokens and FLOPs bench.py counts per step are the full batch's: the steps it times must be too, not
    the batch and sequence ramps' smaller first steps."""
    preset = f"{RECIPE}:batch_warmup_iters=1000:seq_warmup_iters=1000"
    model, info, step, tokens = train_step_fn(preset, BenchConfig().vocab_size, tmp_path)
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    for _ in range(3):
        step()
    full = (info["batch_size"], info["block_size"])
    assert shapes == [full] * 3 and tokens == full[0] * full[1]


def test_profile_writes_each_presets_ops_and_splits_the_step_by_kind(tmp_path):
    presets = f"{RECIPE},config/shakespeare_char_speedrun.toml"
    result = bench_json("--what=train_step", f"--preset={presets}", f"--profile={tmp_path}", "--profile_steps=2")
    adamw, muon = result["runs"]
    for r, optimizer in ((adamw, "AdamW"), (muon, "Muon")):
        assert r["mfu"] is None and r["peak_mb"] is None  # the CPU: no known peak, no allocator count
        p = r["profile"]
        assert p["clock"] == "cpu" and p["wall_ms"] > 0
        assert 0 < p["busy_ms"] <= p["wall_ms"]  # self times: no op's time counted twice (inclusive times would be)
        assert p["kinds_ms"]["matmul"] > 0 and p["kinds_ms"]["attention"] > 0 and p["optimizer_step_ms"] > 0
        table, trace = (tmp_path / f for f in p["files"])
        assert "aten::mm" in table.read_text() and f"Optimizer.step#{optimizer}.step" in table.read_text()
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert f"Optimizer.step#{optimizer}.step" in names
        line, files = profile_lines(r, str(tmp_path)).split("\n")  # the table's two lines: figures, then files
        wall, busy, kinds, step = re.fullmatch(rf"  {re.escape(r['preset'])}: ([\d.]+) ms a step profiled, CPU busy "
                                               r"([\d.]+) ms: (.+); the optimizer's step ([\d.]+) ms \(inclusive\)",
                                               line).groups()
        assert [float(wall), float(busy), float(step)] == pytest.approx(
            [p["wall_ms"], p["busy_ms"], p["optimizer_step_ms"]], abs=0.051)
        shown = {kind: float(ms) for kind, ms in (part.rsplit(" ", 1) for part in kinds.split(", "))}
        assert shown == pytest.approx({kind: ms for kind, ms in p["kinds_ms"].items() if ms}, abs=0.051)  # none at 0
        assert list(shown.values()) == sorted(shown.values(), reverse=True)  # the costliest kind first
        assert files == "    " + ", ".join(str(tmp_path / f) for f in p["files"])
    assert [p.name for p in sorted(tmp_path.iterdir())] == [
        "0_shakespeare_char_recipe.trace.json", "0_shakespeare_char_recipe.txt",
        "1_shakespeare_char_speedrun.trace.json", "1_shakespeare_char_speedrun.txt"]
    table = python("bench.py", "--what=train_step", "--repeats=1", f"--preset={RECIPE}", f"--profile={tmp_path}")
    assert "a step profiled, CPU busy" in table.stdout and "matmul" in table.stdout
    wrong = python("bench.py", "--what=sample", f"--profile={tmp_path}")
    assert wrong.returncode == 2 and wrong.stderr.strip() == ("error: --profile is read by --what=train_step only, "
                                                              "not by --what=sample: drop it")
    a_file = tmp_path / "0_shakespeare_char_recipe.txt"
    before = a_file.read_text()
    into_file = python("bench.py", "--what=train_step", f"--profile={a_file}")
    assert into_file.returncode == 2 and into_file.stderr.strip() == (f"error: --profile={a_file} is a file: give a "
                                                                      "folder to write the profiles to")
    assert a_file.read_text() == before
    inside_file = python("bench.py", "--what=train_step", f"--profile={a_file / 'profiles'}")
    assert inside_file.returncode == 2 and inside_file.stderr.strip() == (
        f"error: --profile={a_file / 'profiles'} is inside {a_file}, which is a file: give a folder to write the "
        "profiles to")
    assert a_file.read_text() == before


def test_the_gpu_checks_refuse_a_machine_without_one_in_one_line(tmp_path):
    """scripts/gpu_checks.sh runs on GPU machines only; here it must stop before it writes anything."""
    # on a GPU machine too: with its GPUs hidden, as on a machine without one (not the 540 s of checks)
    run = run_script("bash", "scripts/gpu_checks.sh", str(tmp_path / "checks"),
                     env={"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2 and not (tmp_path / "checks").exists()
    assert run.stderr.strip() == ("error: PyTorch sees no CUDA GPU here; these checks are for a machine with NVIDIA "
                                  "GPUs")
    bad = run_script("bash", "scripts/gpu_checks.sh", str(tmp_path / "checks"), "ten")
    assert bad.returncode == 2 and not (tmp_path / "checks").exists()
    assert bad.stderr.strip() == "error: SECONDS must be a whole number of seconds, got 'ten'"


def test_timings_leave_out_the_warm_up_run_and_take_the_median_of_the_rest(monkeypatch):
    """Each function runs once untimed (first-call allocations, lazy imports), then its median over the repeats is
    what bench.py reports, which one slow run does not move; timed in turns, each function gets its own times. The
    clock is one the functions advance by set amounts."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def taking(*seconds):
        durations = iter(seconds)
        return lambda: now.__setitem__(0, now[0] + next(durations))

    assert timing.median_seconds(taking(100.0, 1.0, 5.0, 2.0), 3) == 2.0  # the warm-up's 100 s, then 1, 5 and 2
    cpu = torch.device("cpu")
    medians = timing.interleaved_medians([taking(50.0, 1.0, 3.0, 2.0), taking(70.0, 10.0, 30.0, 20.0)], [cpu, cpu], 3)
    assert medians == [2.0, 20.0]
