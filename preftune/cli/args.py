"""What the sub-command parsers (``data``, ``label``, ``model``) share: ``type=`` callables for
argparse whose errors say what was expected, and the bare-command usage handler."""

from __future__ import annotations

import argparse


def print_usage(parser: argparse.ArgumentParser) -> int:
    """A command given without its sub-command: its help, exit code 2."""
    parser.print_help()
    return 2


def _number(text: str, cast, in_range, expects: str, range_text: str | None = None):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects {expects}, got {text!r}") from None
    if not in_range(value):
        raise argparse.ArgumentTypeError(f"expects {range_text or expects}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _number(text, float, lambda v: 0 <= v <= 1, "a number between 0 and 1")


def open_fraction(text: str) -> float:
    """A number in (0, 1)."""
    return _number(text, float, lambda v: 0 < v < 1, "a number between 0 and 1")


def port(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= 65535, "a port number", "a port number 0-65535")
