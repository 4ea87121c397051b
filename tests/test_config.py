"""Config loading: defaults < TOML < flags, typed parsing, and errors that name the key."""

import os
import re
import subprocess
from dataclasses import dataclass, fields

import pytest

from bench import BenchConfig
from data.prepare import PrepareConfig
from eval import EvalConfig
from export import ExportConfig
from glimpse.config import (
    build,
    config_help,
    config_keys,
    config_values,
    option,
    parse_config,
    recorded_values,
)
from glimpse.errors import GlimpseError
from model import GPTConfig
from sample import SampleConfig
from scripts.induction_study import StudyConfig as InductionStudy
from scripts.length_study import StudyConfig as LengthStudy
from tests.conftest import REPO, python
from train import TrainConfig


def parse(argv, cls=TrainConfig):
    return parse_config(cls, argv, prog="x.py", description="test")


def test_precedence_defaults_then_file_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('n_layer = 3\nbatch_size = 8\nout_dir = "from-file"\n')
    cfg = parse([str(toml), "--batch_size=4"])
    assert cfg.model.n_layer == 3  # from the file
    assert cfg.batch_size == 4  # the flag wins over the file
    assert cfg.out_dir == "from-file"
    assert cfg.model.n_head == TrainConfig().model.n_head  # untouched: the default
    assert parse(["--n_layer=2", "--n_layer=5"]).model.n_layer == 5  # the later flag wins


def test_a_config_records_flat_and_builds_back_from_what_it_records():
    cfg = parse(["--n_layer=3", "--batch_size=5"])
    values = config_values(cfg)
    assert values["n_layer"] == 3 and values["batch_size"] == 5 and "model" not in values and "vocab_size" not in values
    assert build(TrainConfig, values) == cfg


@pytest.mark.parametrize("raw,value", [("true", True), ("TRUE", True), ("False", False), ("1", True), ("0", False)])
def test_booleans(raw, value):
    assert parse([f"--compile={raw}"]).compile is value


def test_bare_boolean_flag_means_true():
    assert parse(["--compile"]).compile is True


def test_a_flag_may_spell_its_key_with_dashes():
    assert parse(["--max-iters=7", "--n-layer=3", "--always-save-checkpoint=false"]) == parse(
        ["--max_iters=7", "--n_layer=3", "--always_save_checkpoint=false"])


def test_types_are_parsed_by_field():
    cfg = parse(["--learning_rate=3e-4", "--max_iters=7", "--dtype=float16", "--wandb_run_name=my run"])
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.max_iters, int)
    assert cfg.dtype == "float16" and cfg.wandb_run_name == "my run"
    assert parse(["--top_k=none"], SampleConfig).top_k is None
    assert parse(["--top_k=5"], SampleConfig).top_k == 5


def test_an_empty_value_clears_an_optional_setting():
    """--top_k= (nothing after the =) is a way to write none, as none and null are: an optional setting takes it as
    none, rather than refusing the empty text as no integer."""
    assert parse(["--top_k="], SampleConfig).top_k is None
    assert parse(["--attn_log_interval="]).attn_log_interval is None


def test_an_integer_setting_takes_every_64_bit_value_and_no_more():
    """TOML's integers are 64 bits, and a seed or a counter goes to torch as one: the largest and the smallest
    pass, one past the largest is refused as a flag and in a file alike."""
    assert parse([f"--seed={2**63 - 1}"]).seed == 2**63 - 1
    assert parse([f"--seed={-2**63}"]).seed == -2**63
    with pytest.raises(GlimpseError, match=re.escape(f"--seed takes an integer (of at most 64 bits), got '{2**63}'")):
        parse([f"--seed={2**63}"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--n_layr=3"], "unknown config key 'n_layr'; did you mean n_layer?"),
        (["--max_iters=ten"], "--max_iters takes an integer (of at most 64 bits), got 'ten'"),
        (["--seed=18446744073709551616"], "--seed takes an integer (of at most 64 bits), got '18446744073709551616'"),
        ([f"--batch_size={'9' * 400}"], f"--batch_size takes an integer (of at most 64 bits), got '{'9' * 40}'..."),
        (["--learning_rate=fast"], "--learning_rate takes a finite number"),
        (["--learning_rate=nan"], "--learning_rate takes a finite number, got 'nan'"),
        (["--max_time=inf"], "--max_time takes a finite number, got 'inf'"),
        (["--grad_clip=1e400"], "--grad_clip takes a finite number"),
        (["--compile=maybe"], "--compile takes true or false"),
        (["--device=tpu"], "device must be one of auto, cpu, cuda, mps"),
        (["--n_layer"], "--n_layer needs a value"),
        (["--n_embd=100", "--n_head=3"], "divisible by n_head"),
        (["--batch_size=0"], "batch_size must be at least 1"),
        (["--learning_rate=1e-4", "--min_lr=3e-4"], "min_lr (0.0003) is above learning_rate (0.0001)"),
        (["--warmup_iters=100", "--lr_decay_iters=50"], "lr_decay_iters (50) is not after warmup_iters (100)"),
        (["--warmup_iters=100", "--lr_decay_iters=100"], "lr_decay_iters (100) is not after warmup_iters (100)"),
        (["--beta2=1"], "beta1 and beta2 must be in [0, 1), got 0.9 and 1.0"),  # up front, not in AdamW later
        (["--beta1=1"], "beta1 and beta2 must be in [0, 1), got 1.0 and 0.99"),
        (["--log_interval=0"], "log_interval must be at least 1, got 0"),
        (["--budget_steps_per_s=-1"], "budget_steps_per_s must not be negative, got -1.0"),
        (["--max_time=-1"], "max_time must not be negative, got -1.0"),
        (["--checkpoint_interval_s=-1"], "checkpoint_interval_s must not be negative, got -1.0"),
        (["--learning_rate=0"], "learning_rate must be positive, got 0"),  # a run that never moves its weights
        (["--attn_log_interval=-1"], "attn_log_interval must be none, 0 (never) or positive, got -1"),
        (["--muon_lr=0"], "muon_lr must be positive and muon_momentum in [0, 1), got 0.0 and 0.95"),
        (["--muon_momentum=1"], "muon_lr must be positive and muon_momentum in [0, 1), got 0.02 and 1.0"),
        # max-autotune records CUDA graphs as reduce-overhead does, which fsdp's moving weights break
        (["--compile", "--compile_mode=max-autotune", "--fsdp"], "compile_mode=max-autotune records CUDA graphs"),
        (["stray"], "should be a .toml file"),
        (["--n_layer=2", "c.toml"], "unexpected argument 'c.toml'"),
    ],
)
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(GlimpseError, match=re.escape(message)):
        parse(argv)


@dataclass
class Window:
    low: int = option(0, "first position")
    step: int = option(1, "stride")
    high: int = option(10, "last position")
    hi: str = option("", "a key whose name is part of a word in the error, not a word of it")
    width: int = option(3, "a key the error does not name")

    def __post_init__(self):
        if self.low + self.step > self.high:
            raise ValueError(f"low ({self.low}) plus step ({self.step}) passes high ({self.high})")


def test_an_error_that_names_a_recorded_setting_says_it_was_recorded():
    """Recorded settings (a resume's) go under the flags: a flag may clash with one the user did not type, so the
    error says which of the keys it names were recorded, and not those the flags gave."""
    def recorded(preset, flags):
        return {key: value for key, value in {"low": 8, "step": 1, "hi": "x", "width": 2}.items() if key not in flags}

    def parse_recorded(argv):
        return parse_config(Window, argv, prog="x.py", description="test", recorded=recorded)

    assert parse_recorded([]) == Window(low=8, step=1, high=10, hi="x", width=2)
    with pytest.raises(GlimpseError) as e:
        parse_recorded(["--high=5"])
    assert str(e.value) == ("low (8) plus step (1) passes high (5) (low=8, step=1 are the run's recorded settings; "
                            "flags replace them)")
    with pytest.raises(GlimpseError) as e:
        parse_recorded(["--high=5", "--low=6"])
    assert str(e.value) == ("low (6) plus step (1) passes high (5) (step=1 is the run's recorded setting; a flag "
                            "replaces it)")
    with pytest.raises(GlimpseError) as e:
        parse_recorded(["--high=5", "--low=6", "--step=0"])  # none of the named keys was recorded
    assert str(e.value) == "low (6) plus step (0) passes high (5)"
    with pytest.raises(GlimpseError) as e:  # a key the recorded run keeps: the flag that clashes with it must go
        parse_config(Window, ["--high=5"], prog="x.py", description="test", recorded=recorded, fixed=("low", "hi"))
    assert str(e.value) == ("low (8) plus step (1) passes high (5) (step=1 is the run's recorded setting; a flag "
                            "replaces it; low=8 is the run's recorded setting, which the run keeps: leave out the flag "
                            "that clashes with it)")
    with pytest.raises(GlimpseError) as e:
        parse_config(Window, ["--high=5"], prog="x.py", description="test", recorded=recorded, fixed=("low", "step"))
    assert str(e.value) == ("low (8) plus step (1) passes high (5) (low=8, step=1 are the run's recorded settings, "
                            "which the run keeps: leave out the flag that clashes with them)")


def test_a_recorded_none_is_a_setting_and_keys_given_are_left_to_the_flags():
    """A run records attn_log_interval's default as null: a resume reads it back as none, where a check that took
    null for a missing integer would refuse every resume of a run that kept that default."""
    saved = {"attn_log_interval": None, "n_layer": 3, "max_iters": 40, "retired_key": 1}
    assert recorded_values(TrainConfig, saved, "ckpt.pt's settings", given={"max_iters"}) == {
        "attn_log_interval": None, "n_layer": 3}


def test_schedules_that_read_no_decay_step_are_accepted():
    # a time budget decays by the clock, a run that ends within its warmup never decays, and a run without
    # warmup may decay from its first step
    assert parse(["--max_time=60", "--warmup_iters=100", "--lr_decay_iters=50"]).lr_decay_iters == 50
    assert parse(["--max_iters=30", "--warmup_iters=40", "--lr_decay_iters=30"]).lr_decay_iters == 30
    # nor does a run whose warmup is as long as the run: its last step, 39, is still warming up
    assert parse(["--max_iters=40", "--warmup_iters=40", "--lr_decay_iters=30"]).lr_decay_iters == 30
    assert parse(["--warmup_iters=0", "--lr_decay_iters=0"]).lr_decay_iters == 0


def test_bad_toml_files(tmp_path):
    with pytest.raises(GlimpseError, match="not found"):
        parse([str(tmp_path / "missing.toml")])
    broken = tmp_path / "broken.toml"
    broken.write_text("n_layer = = 3\n")
    with pytest.raises(GlimpseError, match="not valid TOML"):
        parse([str(broken)])
    typo = tmp_path / "typo.toml"
    typo.write_text("learning_rat = 1e-3\n")
    with pytest.raises(GlimpseError, match="'learning_rat' in .*typo.toml; did you mean learning_rate"):
        parse([str(typo)])
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('n_layer = "six"\n')
    with pytest.raises(GlimpseError, match="n_layer in .*wrong.toml must be integer"):
        parse([str(wrong_type)])
    boolean = tmp_path / "bool.toml"  # Python's True is an int: n_layer = true would be one layer
    boolean.write_text("n_layer = true\n")
    with pytest.raises(GlimpseError, match="n_layer in .*bool.toml must be integer"):
        parse([str(boolean)])
    not_finite = tmp_path / "nan.toml"
    not_finite.write_text("min_lr = nan\n")
    with pytest.raises(GlimpseError, match="min_lr in .*nan.toml must be a finite number, got nan"):
        parse([str(not_finite)])
    bom = tmp_path / "bom.toml"  # as some Windows editors save a file: the mark is not TOML, the settings are
    bom.write_bytes("\ufeffn_layer = 2\n".encode("utf-8"))
    assert parse([str(bom)]).model.n_layer == 2
    huge = tmp_path / "huge.toml"  # past TOML's 64 bits, which Python's reader still takes
    huge.write_text("seed = 99999999999999999999999999\nmin_lr = 99999999999999999999999999\n")
    with pytest.raises(GlimpseError, match="seed in .*huge.toml must be an integer of at most 64 bits, got 9{26}$"):
        parse([str(huge)])
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(GlimpseError, match="folder.toml' cannot be read"):
        parse([str(folder)])


def test_a_mistyped_config_path_names_the_nearest_file(tmp_path):
    (tmp_path / "run.toml").write_text("n_layer = 2\n")
    with pytest.raises(GlimpseError, match=f"not found; did you mean {re.escape(str(tmp_path / 'run.toml'))}\\?$"):
        parse([str(tmp_path / "runn.toml")])
    preset = os.path.relpath(REPO / "config" / "shakespeare_char_cpu.toml")  # a preset, typed from here
    with pytest.raises(GlimpseError, match=f"not found; did you mean {re.escape(preset)}\\?$"):
        parse([str(tmp_path / "shakespeare_char_cpu.toml")])
    with pytest.raises(GlimpseError, match="'zzz.toml' not found; presets live in config/$"):
        parse(["zzz.toml"])
    typo = python("train.py", "config/shakespeare_char_cpuu.toml")  # as a user types it, from the repository
    assert typo.returncode == 2
    assert typo.stderr.strip() == ("error: config file 'config/shakespeare_char_cpuu.toml' not found; "
                                   "did you mean config/shakespeare_char_cpu.toml?")


def test_a_mistyped_path_names_the_file_in_its_own_folder_before_a_preset_of_that_name(tmp_path):
    """A folder of one's own presets may hold a file named as one of config/'s: the hint names the file in the
    folder the user typed, since that is the one they meant to edit."""
    (tmp_path / "shakespeare_char_cpu.toml").write_text("n_layer = 2\n")
    mine = re.escape(str(tmp_path / "shakespeare_char_cpu.toml"))
    with pytest.raises(GlimpseError, match=f"not found; did you mean {mine}\\?$"):
        parse([str(tmp_path / "shakespeare_char_cpuu.toml")])


def test_every_preset_loads():
    presets = sorted((REPO / "config").glob("*.toml"))
    assert presets
    for preset in presets:
        parse([str(preset)])


def test_help_lists_every_key_and_errors_are_one_line():
    result = python("train.py", "--help")
    assert result.returncode == 0
    model_keys = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]  # the dataset sets vocab_size
    train_keys = [f.name for f in fields(TrainConfig) if f.name != "model"]
    for name in train_keys + model_keys:
        assert f"--{name}=" in result.stdout
    assert "--vocab_size" not in result.stdout and "--model=" not in result.stdout
    bad = python("train.py", "--n_layr=3")
    assert bad.returncode != 0
    assert bad.stderr.strip() == "error: unknown config key 'n_layr'; did you mean n_layer?"


def test_help_is_printed_for_dash_h_as_for_dash_dash_help(capsys):
    """-h is the short form every command-line tool takes: it prints the help and exits 0 too, before any other
    argument is read."""
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--n_layr=3", flag])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: python x.py [CONFIG.toml] [--key=value ...]\n")


def test_help_shows_booleans_and_none_as_flags_spell_them():
    """Defaults in --help are written as a flag takes them (true, false, none), not as Python prints them."""
    text = config_help(TrainConfig, "x.py", "")
    assert "  --compile=false " in text and "  --always_save_checkpoint=true " in text
    assert "  --attn_log_interval=none " in text
    assert "=True" not in text and "=False" not in text and "=None" not in text


@dataclass
class LongHead:
    name: str = option("x" * 29, "what name sets")  # --name=xxx...: 36 characters, the widest column
    n: int = option(1, "what n sets")


def test_a_key_as_wide_as_the_column_has_its_help_on_the_next_line():
    """A key and default that fill the whole column would run into their help text: the help goes below."""
    lines = config_help(LongHead, "x.py", "").splitlines()
    at = lines.index(f"  --name={'x' * 29}")  # the key alone on its line
    assert lines[at + 1].strip() == "what name sets"


@dataclass
class ShellSpecials:
    """Defaults that a shell would split, expand or end early unless --help quotes them."""

    spaced: str = option("a b", "h")
    quoted: str = option("it's $HOME; `date` & *", "h")
    controls: str = option("tab\there\r\n\x01 it's a\\b", "h")
    wide: str = option("é 中", "h")


@pytest.mark.parametrize("cls", [TrainConfig, SampleConfig, EvalConfig, PrepareConfig, ExportConfig, BenchConfig,
                                 InductionStudy, LengthStudy, ShellSpecials])
def test_each_text_default_in_help_can_be_typed_back(cls):
    """--help shows each default as a shell user would type it: copied into bash, it gives the default back
    (a newline is $'\\n', since a flag's "\\n" would be a backslash and an n)."""
    text = config_help(cls, "x.py", "")
    keys = [name for name, key in config_keys(cls).items() if isinstance(key.default, str)]
    heads = [re.search(rf"^  (--{name}=.*?)(  |$)", text, re.MULTILINE).group(1) for name in keys]
    typed = subprocess.run(["bash", "-c", "printf '%s\\0' " + " ".join(heads)], capture_output=True,
                           check=True).stdout.decode().split("\0")[:-1]  # bytes: text mode would turn \r\n into \n
    assert len(typed) == len(keys)
    required = ["--to=hf"] if cls is ExportConfig else []  # export has no default folder to write to
    assert config_values(parse(typed + required, cls)) == config_values(parse(required, cls))
