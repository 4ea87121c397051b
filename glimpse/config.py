"""
Typed configs from three layers: dataclass defaults < a TOML file < --key=value flags.
A script may put recorded settings above the file's (train.py: a resume's, those its checkpoint was saved with).

Each script declares one dataclass whose fields carry their own help (`option(default, help)`);
`parse_config` reads argv into it, parsing every value by its field's type, so that a wrong key or
a wrong value fails at once with a message that names it, before any work starts.

A field made with `nested(factory, help)` holds another such dataclass (train.py's `model`, a
GPTConfig): the fields of that class that carry help are keys too, by their own names (`--n_layer`,
`n_layer = 4` in a TOML file), so each option is declared once, where it is used.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from glimpse.errors import GlimpseError

PRESETS = Path(__file__).resolve().parents[1] / "config"  # the repository's preset files
INT64 = range(-2**63, 2**63)  # the integers a setting may hold: TOML's, and what a counter, a seed or torch takes


def option(default: Any, help: str):
    """A dataclass field with a default and the help line that --help shows for it."""
    return dataclasses.field(default=default, metadata={"help": help})


def nested(factory, help: str):
    """A field that holds another config dataclass, built by factory(); its keys join the outer ones."""
    return dataclasses.field(default_factory=factory, metadata={"help": help, "nested": True})


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: the field behind it, its type, its default, and the nested field it sits in."""

    field: dataclasses.Field
    type: Any
    default: Any
    group: str | None  # the name of the nested field that holds it; None: a field of the outer class


def config_keys(cls) -> dict[str, Key]:
    """Every key of cls by name, in declaration order: its own fields, and those of its nested fields."""
    table: dict[str, Key] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("nested"):
            table[f.name] = Key(f, hints[f.name], _default(f), None)
            continue
        inner, base = hints[f.name], _default(f)
        inner_hints = typing.get_type_hints(inner)
        for g in dataclasses.fields(inner):
            if "help" not in g.metadata:
                continue  # not a user's choice (GPTConfig.vocab_size comes from the dataset)
            assert g.name not in table, f"{g.name} is a key twice"
            table[g.name] = Key(g, inner_hints[g.name], getattr(base, g.name), f.name)
    return table


def config_values(cfg) -> dict[str, Any]:
    """cfg as flat key: value pairs, the keys a TOML file or the flags take (build turns them back into cfg).

    What a run records of its config (config.json, the checkpoint, wandb), so that each value sits
    under the name a user sets it by.
    """
    values = {}
    for name, key in config_keys(type(cfg)).items():
        values[name] = getattr(getattr(cfg, key.group) if key.group else cfg, name)
    return values


def parse_config(cls, argv: list[str], *, prog: str, description: str, allow_file: bool = True,
                 recorded: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
                 fixed: Collection[str] = ()):
    """Build cls from argv: an optional CONFIG.toml, then --key=value flags, later ones winning.

    recorded, when given, maps (the file's values, the flags') to settings that go between the two: above the
    defaults and the file, below the flags; an error that names a recorded key says it was recorded (the user did
    not type it), and of a key in fixed (one the recorded run cannot change: a resume's model shape), that the flag
    that clashes with it must go rather than it. Prints help and exits 0 on -h/--help. Raises GlimpseError on
    anything it cannot use.
    """
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, prog, description, allow_file))
        raise SystemExit(0)
    preset: dict[str, Any] = {}
    values: dict[str, Any] = {}  # the flags'
    flags: list[str] = []
    for arg in argv:
        if arg.startswith("--"):
            flags.append(arg)
        elif allow_file and not flags and not preset:
            preset = read_toml(cls, arg)
        else:
            where = "before any --key=value flag" if allow_file else "here"
            raise GlimpseError(
                f"unexpected argument {arg!r}: pass settings as --key=value"
                + (f" (a CONFIG.toml may come first, {where})" if allow_file else "")
            )
    for flag in flags:
        key, eq, raw = flag[2:].partition("=")
        key = key.replace("-", "_")
        _key(cls, key)
        if not eq:
            if _field_type(cls, key) is not bool:
                raise GlimpseError(f"--{key} needs a value: write --{key}=VALUE")
            raw = "true"  # a bare boolean flag switches it on
        values[key] = parse_value(cls, key, raw)
    kept = recorded(preset, values) if recorded is not None else {}
    try:
        return build(cls, {**preset, **kept, **values})
    except GlimpseError as e:  # a flag may clash with a value the user did not type this time
        named = [key for key in kept if re.search(rf"\b{key}\b", str(e))]
        if not named:
            raise
        free, held = [key for key in named if key not in fixed], [key for key in named if key in fixed]
        remarks = []
        if free:
            remarks.append(f"{recorded_as(free, kept)}; "
                           f"{'a flag replaces it' if len(free) == 1 else 'flags replace them'}")
        if held:
            remarks.append(f"{recorded_as(held, kept)}, which the run keeps: leave out the flag that clashes with "
                           f"{'it' if len(held) == 1 else 'them'}")
        raise GlimpseError(f"{e} ({'; '.join(remarks)})") from None


def recorded_as(keys: list[str], values: dict[str, Any]) -> str:
    """'low=8, step=1 are the run's recorded settings': the keys with their values as a flag spells them (true, not
    True)."""
    one = len(keys) == 1
    return (", ".join(f"{key}={json.dumps(values[key])}" for key in keys)
            + f" {'is' if one else 'are'} the run's recorded setting{'' if one else 's'}")


def build(cls, values: dict[str, Any]):
    """cls from flat key: value pairs, nested keys going into their nested field's default.

    The dataclasses' own validation errors become GlimpseErrors.
    """
    table = {key: _key(cls, key) for key in values}
    outer = {key: value for key, value in values.items() if table[key].group is None}
    try:
        for f in dataclasses.fields(cls):
            if f.metadata.get("nested"):
                inner = {key: value for key, value in values.items() if table[key].group == f.name}
                outer[f.name] = dataclasses.replace(_default(f), **inner)
        return cls(**outer)
    except (ValueError, TypeError) as e:
        raise GlimpseError(str(e)) from None


def read_toml(cls, path: str) -> dict[str, Any]:
    """The key = value pairs of a TOML file, checked against cls's fields and types."""
    p = Path(path)
    if p.suffix != ".toml":
        raise GlimpseError(f"config file {path!r} should be a .toml file (settings go as --key=value)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM, as some Windows editors save one, is no TOML
    except FileNotFoundError:
        files = _toml_files_near(p)
        near = _nearest(p.name, files)
        hint = f"did you mean {files[near]}?" if near else "presets live in config/"
        raise GlimpseError(f"config file {path!r} not found; {hint}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GlimpseError(f"config file {path!r} is not valid TOML: {e}") from None
    except OSError as e:  # a folder, a file it may not read
        raise GlimpseError(f"config file {path!r} cannot be read: {e.strerror}") from None
    for key, value in data.items():
        _key(cls, key, where=f" in {path}")
        data[key] = check_value(cls, key, value, where=f" in {path}")
    return data


def recorded_values(cls, data: dict, where: str, given=()) -> dict[str, Any]:
    """The settings config_values recorded (a dict of key: value), checked as a TOML file's are, but for the keys
    given (set otherwise). Keys cls no longer has (a record of an older version) are left out: they set nothing."""
    table = config_keys(cls)
    try:
        return {key: check_value(cls, key, value, where=f" in {where}") for key, value in data.items()
                if key in table and key not in given}
    except GlimpseError as e:
        raise GlimpseError(f"{e}: give the setting as a flag") from None


def parse_value(cls, key: str, raw: str) -> Any:
    """Parse the text of a --key=value flag as the type of field `key`."""
    typ = _field_type(cls, key)
    if _is_optional(typ) and raw.lower() in ("none", "null", ""):
        return None
    base = _strip_optional(typ)
    if base is bool:
        low = raw.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise GlimpseError(f"--{key} takes true or false (or 1 / 0), got {raw!r}")
    if base in (int, float):
        try:
            value = base(raw)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) if base is float else value in INT64):
            # nan and inf parse as floats but mean no setting; an integer past 64 bits fits no counter or seed
            kind = "an integer (of at most 64 bits)" if base is int else "a finite number"
            raise GlimpseError(f"--{key} takes {kind}, got {raw[:40]!r}" + ("..." if len(raw) > 40 else ""))
        return value
    return check_value(cls, key, raw, where="")


def check_value(cls, key: str, value: Any, where: str) -> Any:
    """Check an already-typed value (from TOML, or a string flag) against field `key`'s type."""
    typ = _field_type(cls, key)
    if value is None and _is_optional(typ):
        return None
    base = _strip_optional(typ)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise GlimpseError(f"{key}{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        # TOML's integers are 64 bits, but a reader may take more: none fits a counter, a seed or a float setting
        digits = str(value)
        raise GlimpseError(f"{key}{where} must be an integer of at most 64 bits, got {digits[:40]}"
                           + ("..." if len(digits) > 40 else ""))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, float) and not math.isfinite(value):  # TOML writes nan and inf too
        raise GlimpseError(f"{key}{where} must be a finite number, got {value!r}")
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise GlimpseError(f"{key}{where} must be {_type_name(typ)}, got {value!r}")
    return value


def config_help(cls, prog: str, description: str, allow_file: bool = True) -> str:
    """The --help text: usage, what the script does, and every key with its default and meaning."""
    usage = f"usage: python {prog} {'[CONFIG.toml] ' if allow_file else ''}[--key=value ...]"
    lines = [usage, "", description.strip(), "", "keys (--key=default  meaning):"]
    table = config_keys(cls)
    heads = {name: f"--{name}={_show(key.default)}" for name, key in table.items()}
    width = min(36, max(map(len, heads.values())) + 2)
    groups = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata.get("nested")}
    group = None
    for name, key in table.items():
        if key.group != group:  # a nested field's keys under a heading of their own
            group = key.group
            lines.append(f"{group}: {groups[group]}" if group else "")
        typ = _strip_optional(key.type)
        choices = f" [{_type_name(key.type)}]" if typing.get_origin(typ) is Literal else ""
        head = heads[name]
        pad = "\n" + " " * (width + 2) if len(head) >= width else " " * (width - len(head))
        text = textwrap.wrap(key.field.metadata.get("help", "") + choices, width=max(40, 110 - width),
                             break_on_hyphens=False)  # flags and choices such as max-autotune whole
        lines.append(f"  {head}{pad}" + ("\n" + " " * (width + 2)).join(text))
    return "\n".join(lines)


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _show(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    return _typed_in_a_shell(value) if isinstance(value, str) else str(value)


def _typed_in_a_shell(text: str) -> str:
    r"""text as a shell user would type it, so that a default in --help can be copied: flags are taken
    literally (--start="\n" is a backslash and an n), so a newline shows as bash's $'\n'."""
    if text.isprintable():
        return shlex.quote(text)
    special = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}
    escaped = "".join(special.get(c, c if c.isprintable() else f"\\U{ord(c):08x}") for c in text)
    return f"$'{escaped}'"


def _nearest(word: str, choices) -> str | None:
    """The choice most like word (a mistyped key or path), or None when none is close."""
    near = difflib.get_close_matches(word, list(choices), n=1)
    return near[0] if near else None


def _toml_files_near(path: Path) -> dict[str, str]:
    """The .toml files a mistyped config path may have meant, by file name: those in the folder it names, then
    the presets, each written as the user would type it (in the folder as given; the presets from here)."""
    folder = path.parent if path.parent.is_dir() else None
    found = {f.name: str(path.parent / f.name) for f in sorted(folder.glob("*.toml"))} if folder else {}
    for preset in sorted(PRESETS.glob("*.toml")):
        found.setdefault(preset.name, os.path.relpath(preset))
    return found


def _key(cls, key: str, where: str = "") -> Key:
    table = config_keys(cls)
    if key not in table:
        near = _nearest(key, table)
        hint = f"; did you mean {near}?" if near else "; see --help for the list"
        raise GlimpseError(f"unknown config key {key!r}{where}{hint}")
    return table[key]


def _field_type(cls, key: str):
    return _key(cls, key).type


def _is_optional(typ) -> bool:
    return typing.get_origin(typ) in (Union, types.UnionType) and type(None) in typing.get_args(typ)


def _strip_optional(typ):
    if _is_optional(typ):
        (rest,) = [t for t in typing.get_args(typ) if t is not type(None)]
        return rest
    return typ


def _type_name(typ) -> str:
    base = _strip_optional(typ)
    if typing.get_origin(base) is Literal:
        name = "|".join(map(str, typing.get_args(base)))
    else:
        name = {bool: "true/false", int: "integer", float: "number", str: "text"}.get(base, str(base))
    return name + (" or none" if _is_optional(typ) else "")
