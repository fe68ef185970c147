"""The field machinery every configuration shares: an option is a dataclass field made by :func:`option`.

A field's ``metadata["help"]`` is its ``--help`` text, ``metadata["choices"]`` its allowed values and
``metadata["domain"]`` (a :class:`Range`) the interval a number must lie in. :func:`coerce` turns a YAML
or command-line value into the field's type, :func:`check_field` checks a value against the field, and
:func:`read_options` builds a config's keywords from a mapping, refusing unknown names with the closest
known one. :class:`preftune.config.train_config.TrainConfig` and
:class:`preftune.config.eval_config.EvalConfig` are both built from these pieces, so their flags, YAML
keys, Python keywords and docs tables are generated the same way and never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from preftune.common.text import suggest

# value lists more than one configuration (or TRL's names) draw from
DTYPES = ("float32", "bfloat16", "float16", "auto")
SCHEDULERS = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


def describe(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters (cut with ``...``).

    Built piece by piece and stopped once past ``limit``, so a huge, deeply nested or self-containing
    value (a YAML alias bomb, a list holding itself) costs no more than a short one; a value that fits
    reads exactly as its ``repr``.
    """
    text, size = [], 0
    for piece in _repr_pieces(value):
        text.append(piece)
        size += len(piece)
        if size > limit:
            break
    shown = "".join(text)
    return shown if len(shown) <= limit else shown[:max(limit - 3, 0)] + "..."


def shown_path(path: str | os.PathLike) -> str:
    """A path as an error message shows it: as it is, or -- holding a control character (a newline) or over
    200 characters long -- as its bounded :func:`describe`, so the message stays one short line."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text if text.isprintable() and len(text) <= 200 else describe(text, 120)


def _repr_pieces(value: Any):
    """The fragments of ``repr(value)`` in order, generated lazily (containers one item at a time)."""
    if type(value) in (list, tuple, set, frozenset, dict):
        if isinstance(value, (set, frozenset)) and not value:
            yield f"{type(value).__name__}()"
            return
        opening, closing = {list: "[]", tuple: "()", dict: "{}"}.get(type(value), "{}")
        yield opening if type(value) is not frozenset else "frozenset({"
        for i, item in enumerate(value.items() if isinstance(value, dict) else value):
            if i:
                yield ", "
            if isinstance(value, dict):
                yield from _repr_pieces(item[0])
                yield ": "
                item = item[1]
            yield from _repr_pieces(item)
        if type(value) is tuple and len(value) == 1:
            yield ","
        yield closing if type(value) is not frozenset else "})"
    elif isinstance(value, (str, bytes, bytearray)) and len(value) > 200:
        yield repr(value[:200])[:-1]  # the opening quote and the start; never the closing quote
        yield "..."
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 600:
        yield f"<an integer of {value.bit_length()} bits>"
    else:
        yield repr(value)


@dataclass(frozen=True)
class Range:
    """The interval a numeric option must lie in; ``None`` leaves that side open-ended.

    ``low_open`` / ``high_open`` exclude the bound itself; ``why`` is added to the error message.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self, integer: bool) -> str:
        """``> 0``, ``>= 0``, ``in [0, 0.5)``; a positive integer is said so."""
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            if integer and self.low == 0 and self.low_open:
                return "a positive integer"
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SEEDS = Range(0, 2**32 - 1, why="the seed range of numpy and python's random")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def option(default, help: str, choices=None, group: str = "training", const=None, booleans=None,
           domain: Range | None = None, flag: bool = True, cli_default=dataclasses.MISSING,
           metavar: str | None = None, comma_list: bool = False):
    """A configuration field with its help text, choices, range and CLI details in ``metadata``.

    ``const``: the value of the bare flag (``--gradient-checkpointing`` = on); ``booleans``: (value for
    true, value for false) of a field that once was a bool; ``flag=False``: a Python/YAML option with no
    command-line flag; ``cli_default``: the flag's default where it differs from the Python default;
    ``metavar``: the flag's placeholder in ``--help``; ``comma_list``: a comma-separated text option, which
    a YAML file or the Python API may also give as a list (``[q_proj, v_proj]`` -> ``"q_proj,v_proj"``).
    """
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if domain is not None:  # check_field(): the value must lie in it
        meta["domain"] = domain
    if const is not None:
        meta["const"] = const
    if booleans is not None:
        meta["booleans"] = booleans
    if not flag:
        meta["flag"] = False
    if cli_default is not dataclasses.MISSING:
        meta["cli_default"] = cli_default
    if metavar is not None:
        meta["metavar"] = metavar
    if comma_list:
        meta["comma_list"] = True
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """A field's command-line spelling: ``max_length`` -> ``max-length``."""
    return name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """The base python type of a field (``int | None`` -> int)."""
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return typ
    raise TypeError(f"unsupported field type {text}")


def as_bool(value: Any, flag: str, source: str = "config") -> bool:
    """A YAML/CLI boolean (true/false, yes/no, on/off, 1/0), or ConfigError naming the option."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise ConfigError(f"{source}: --{flag_name(flag)} expects true or false, got {describe(value)}")


def coerce(f: dataclasses.Field, value: Any, source: str = "config") -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the option."""
    typ = field_type(f)
    optional = "None" in str(f.type)
    booleans = f.metadata.get("booleans")
    if booleans and (isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no", "1", "0")):
        value = booleans[0] if str(value).lower() in ("true", "yes", "1") else booleans[1]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{source}: --{flag_name(f.name)} needs a value")
    try:
        if typ is bool:
            return as_bool(value, f.name, source)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        return _text(f, value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: --{flag_name(f.name)} expects {typ.__name__}, got {describe(value, 40)}") \
            from None


def _text(f: dataclasses.Field, value: Any) -> str:
    """A text field's value: scalars as text; a list of scalars joined with commas for a ``comma_list`` field;
    any other list or mapping is a TypeError (never its Python repr as text)."""
    if isinstance(value, (list, tuple)) and f.metadata.get("comma_list"):
        if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return ",".join(str(v) for v in value)
        raise TypeError
    if isinstance(value, (list, tuple, dict, set)):
        raise TypeError
    return str(value)


def check_field(f: dataclasses.Field, value: Any) -> None:
    """One field's value: its type, its choices, finite, inside its ``domain``."""
    flag, typ, optional = flag_name(f.name), field_type(f), "None" in str(f.type)
    if value is None:
        if not optional:
            raise ConfigError(f"--{flag} needs a value")
        return
    numeric = typ in (int, float)
    if isinstance(value, bool) != (typ is bool) or (numeric and not isinstance(value, (int, float))) or \
            (typ is int and not isinstance(value, int)) or (typ is str and not isinstance(value, str)):
        raise ConfigError(f"--{flag} expects {typ.__name__}, got {describe(value)}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"--{flag}: {describe(value)} is not one of {', '.join(choices)}")
    if numeric and not math.isfinite(value):
        raise ConfigError(f"--{flag} must be a finite number (got {describe(value)})")
    domain = f.metadata.get("domain")
    if domain is not None and value not in domain:
        why = f"; {domain.why}" if domain.why else ""
        raise ConfigError(f"--{flag} must be {domain.describe(typ is int)} (got {describe(value)}){why}")


def check_fields(config) -> None:
    """:func:`check_field` for every field of the dataclass instance ``config``."""
    for f in dataclasses.fields(config):
        check_field(f, getattr(config, f.name))


def read_options(values: dict, known: dict[str, dataclasses.Field], source: str) -> dict[str, Any]:
    """The keywords of a config from a mapping of option: value (YAML): names with ``-`` or ``_``,
    each coerced to its field's type; an unknown name is refused with the closest known one."""
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: option names must be text, got {describe(key)}")
        name = key.replace("-", "_")
        if name not in known:
            close = suggest(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown option {describe(key)}{hint}")
        kwargs[name] = coerce(known[name], value, source)
    return kwargs


def apply_options(config, options: dict[str, Any], source: str, renamed: dict[str, str] | None = None) -> None:
    """Python keywords set on the dataclass instance ``config``, each coerced to its field's type (an
    ``os.PathLike`` as text). An unknown name is refused naming the close matches (or, for a key of
    ``renamed`` -- TRL's names -- preftune's name for it), before any value is set."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    check_names(options, fields, source, renamed)
    for name, value in options.items():
        if field_type(fields[name]) is str and value is not None and not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{source}: {name} expects a path or text, got {type(value).__name__}")
        setattr(config, name, coerce(fields[name], os.fspath(value) if isinstance(value, os.PathLike) else value,
                                     source))


def check_names(options: dict[str, Any], known, source: str, renamed: dict[str, str] | None = None) -> None:
    """Every name of ``options`` is one of ``known``, else ConfigError naming the close matches (or, for
    a key of ``renamed``, the name it has here)."""
    for name in options:
        if name not in known:
            hint = _keyword_hint(name, list(known), renamed or {})
            raise ConfigError(f"{source}: unknown option {describe(name)}{hint}")


def _keyword_hint(name: str, known: list[str], renamed: dict[str, str]) -> str:
    if name in renamed and renamed[name] in known:
        return f" (TRL's name; preftune's is {renamed[name]!r})"
    close = suggest(name, known, n=3, cutoff=0.6)
    return f" (close matches: {', '.join(close)})" if close else f" (options: {', '.join(sorted(known))})"


def located(config, message: str) -> str:
    """An error ``message`` about ``config`` (a dataclass config) led by the file the option it is about came
    from: the option is the flag the message starts with; the file, ``config.read_from`` = ``(source,
    {name: value read}, {name: the TRL key it was read as})``, set where the config is built from a file. A
    value given after the file (a command-line flag, a Python keyword) is not the file's: the message is kept."""
    read = getattr(config, "read_from", None)
    flag = re.match(r"--([a-z0-9][a-z0-9-]*)", message)
    if read is None or flag is None:
        return message
    source, values, origins = read
    name = flag.group(1).replace("-", "_")
    if name not in values or getattr(config, name, None) != values[name]:
        return message
    return f"{source}: {origins[name] + ' -> ' if name in origins else ''}{message}"


def flags_markdown(config_class, flags_only: bool = True) -> str:
    """A Markdown table of a config's options: flag (with ``--no-`` for booleans), default, help, choices
    and range. ``flags_only`` leaves out options that have no command-line flag."""
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(config_class):
        if flags_only and not f.metadata.get("flag", True):
            continue
        flag = "--" + flag_name(f.name)
        if field_type(f) is bool:
            flag += f" / --no-{flag_name(f.name)}"
        choices, domain = f.metadata.get("choices"), f.metadata.get("domain")
        text = f.metadata.get("help", "") + (f" One of: {', '.join(choices)}." if choices else "")
        text += f" Must be {domain.describe(field_type(f) is int)}." if domain else ""
        lines.append(f"| `{flag}` | `{f.metadata.get('cli_default', f.default)}` | {text} |")
    return "\n".join(lines)
