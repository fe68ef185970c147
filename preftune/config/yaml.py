"""Reading a YAML configuration file safely: ``yaml.safe_load`` semantics, a key given twice refused,
and every error as a :class:`~preftune.config.values.ConfigError` naming the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from preftune.config.values import ConfigError


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


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
                    raise _DuplicateKey(None, None, f"duplicate key {key!r} (first given on line {first})",
                                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """A YAML file read safely (:class:`UniqueKeyLoader`), or ConfigError naming the file and line."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}; YAML would keep only the last, "
                          f"so say it once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()
        raise ConfigError(f"{where}: invalid YAML ({problem[0] if problem else 'unreadable'})") from None


def load_options(path: str | Path) -> dict:
    """A YAML file of option: value pairs (an empty file: none), or ConfigError naming the file."""
    loaded = load_yaml(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded


def dump_yaml(values: dict) -> str:
    """YAML text of ``values`` in their order (safe_dump: plain types only)."""
    return yaml.safe_dump(values, sort_keys=False)
