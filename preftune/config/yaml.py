"""Reading a YAML configuration file safely: ``yaml.safe_load`` semantics, a key given twice refused,
a document too big or too deep once its aliases are expanded refused before anything is built from it,
and every error as a :class:`~preftune.config.values.ConfigError` naming the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from preftune.config.values import ConfigError, describe, shown_path

# Caps on a YAML config counted as expanded (a node reached through an alias counts each time it is
# reached). A real config has a few hundred values and a handful of levels; an alias bomb (anchors of
# anchors, ``*a`` repeated) a few hundred bytes long expands to millions.
MAX_NODES = 10_000
MAX_DEPTH = 50


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Unbuildable(Exception):
    """A value YAML's constructor cannot build (``!!bool 0``, ``!!timestamp x``, an integer of over 4,300
    digits): the node (for its line and tag) and the constructor's exception."""

    def __init__(self, node: yaml.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error

# What a constructor raises for a value it cannot build (its own ConstructorError aside).
_BUILD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, except that a key given twice in one mapping is an error (plain
    YAML keeps the last silently). Merge keys (``<<: *base``) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise _DuplicateKey(None, None, f"duplicate key {describe(key)} (first given on line {first})",
                                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        """The base class's, with a value its constructor cannot build raised as :class:`_Unbuildable` (with
        the innermost node, so the error names the line)."""
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, _Unbuildable, ConfigError):
            raise
        except _BUILD_ERRORS as exc:
            raise _Unbuildable(node, exc) from None


def check_size(root: yaml.Node | None, path: str | Path) -> None:
    """The composed document ``root`` has at most :data:`MAX_NODES` nodes and :data:`MAX_DEPTH` levels
    counted as expanded, else ConfigError naming the file and the top-level key (and its line) where a
    cap was passed. Stops as soon as a cap is passed, so an alias bomb costs no more than a small file."""
    if root is None:
        return
    stack: list[tuple[yaml.Node, int, yaml.Node | None]] = [(root, 1, None)]
    count = 0
    while stack:
        node, depth, key = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            what = (f"more than {MAX_NODES:,} values" if count > MAX_NODES else f"nested more than {MAX_DEPTH} "
                    f"levels deep")
            where = f"{path}:{key.start_mark.line + 1}" if key is not None else str(path)
            under = f" under {describe(key.value, 40)}" if isinstance(key, yaml.ScalarNode) else ""
            raise ConfigError(f"{where}: {what}{under} once its YAML aliases are expanded; a config needs "
                              f"far fewer (an alias bomb?)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1, key) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                top = key_node if node is root else key
                stack.extend(((key_node, depth + 1, top), (value_node, depth + 1, top)))


def load_yaml(path: str | Path) -> Any:
    """A YAML file read safely (:class:`UniqueKeyLoader`) within :func:`check_size`'s caps, or ConfigError
    naming the file and line."""
    name = shown_path(path)
    text, loader = _read_text(Path(path), name), None
    try:
        loader = UniqueKeyLoader(text)  # checks that every character is printable
        root = loader.get_single_node()
        check_size(root, name)
        return None if root is None else loader.construct_document(root)
    except _DuplicateKey as exc:
        raise ConfigError(f"{name}:{exc.problem_mark.line + 1}: {exc.problem}; YAML would keep only the last, "
                          f"so say it once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()
        raise ConfigError(f"{where}: invalid YAML ({problem[0] if problem else 'unreadable'})") from None
    except _Unbuildable as exc:
        node, tag = exc.node, exc.node.tag.replace("tag:yaml.org,2002:", "!!")
        shown = f" {describe(node.value, 40)}" if isinstance(node, yaml.ScalarNode) else ""
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: invalid YAML value {tag}{shown} "
                          f"({_first_line(exc.error)})") from None
    except ConfigError:
        raise
    except _BUILD_ERRORS as exc:  # raised outside any one value's constructor
        raise ConfigError(f"{name}: invalid YAML value ({_first_line(exc)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_text(path: Path, name: str) -> str:
    """The file's text, or ConfigError saying why it cannot be read (``name``: the path as messages show it)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {name}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {name}: a folder, not a YAML file") from None
    except OSError as exc:  # unreadable: permissions, an I/O error, a name too long
        raise ConfigError(f"--config {name}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:  # a NUL byte in the name
        raise ConfigError(f"--config {name}: cannot read it ({exc})") from None


def _first_line(exc: Exception) -> str:
    """An exception's type and the first line of its text, at most 80 characters of it."""
    text = (str(exc).splitlines() or [""])[0][:80]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_options(path: str | Path) -> dict:
    """A YAML file of option: value pairs (an empty file: none), or ConfigError naming the file."""
    loaded = load_yaml(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{shown_path(path)}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded


def dump_yaml(values: dict) -> str:
    """YAML text of ``values`` in their order (safe_dump: plain types only)."""
    return yaml.safe_dump(values, sort_keys=False)
