"""The Python API for notebooks and scripts: ``preftune.train(...)`` and ``preftune.evaluate(...)``.

The same options as the command line, as keywords (a flag's name with underscores:
``--learning-rate`` is ``learning_rate=``), checked by the same :meth:`TrainConfig.validate`
before anything is loaded::

    import preftune
    result = preftune.train(model="./sft", data="pairs.jsonl", output_dir="runs/dpo1", loss="dpo", beta=0.1)
    result.eval_after["rewards/accuracies"]
    metrics = preftune.evaluate(model="runs/dpo1", ref_model="./sft", data="held_out.jsonl")
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from typing import Any

from preftune.config.train_config import ConfigError, TrainConfig, coerce, field_type


def train(config: str | os.PathLike | None = None, **options: Any):
    """Train as ``preftune train`` does and return its :class:`preftune.training.loop.TrainResult`.

    Args:
        config: a YAML file of options (preftune's or TRL's names), as ``--config``; the keywords
            override it.
        **options: any :class:`preftune.config.train_config.TrainConfig` field (``model``, ``data``,
            ``output_dir``, ``loss``, ``beta``, ``learning_rate``, ``max_steps``, ``report_to`` ...).

    Raises :class:`preftune.config.train_config.ConfigError` (a ``ValueError``) for an unknown keyword, naming
    the close matches, and for a bad value, before any model or data is loaded.
    """
    cfg = build_config(config, options, "preftune.train")
    if cfg.num_processes > 1:
        raise ConfigError("preftune.train: num_processes > 1 launches new processes; run `preftune train ... "
                          "--num-processes N` from a shell instead")
    from preftune.training.loop import train as run_training

    return run_training(cfg)


def build_config(config: str | os.PathLike | None, options: dict[str, Any], source: str) -> TrainConfig:
    """A validated TrainConfig: the YAML file (if any) overridden by ``options`` (field names)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in options:
        if name not in fields:
            raise ConfigError(f"{source}: unknown option {name!r}{_suggest(name, list(fields))}")
    cfg = TrainConfig.from_yaml(config) if config is not None else TrainConfig()
    for name, value in options.items():
        if field_type(fields[name]) is str and value is not None and not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{source}: {name} expects a path or text, got {type(value).__name__}")
        setattr(cfg, name, coerce(fields[name], os.fspath(value) if isinstance(value, os.PathLike) else value,
                                  source))
    cfg.given = getattr(cfg, "given", frozenset()) | set(options)
    return cfg.validate()


def evaluate(model: str | os.PathLike, data: str | os.PathLike, **options: Any) -> dict:
    """Evaluate as ``preftune eval`` does and return its result (the dict ``--json`` prints).

    Args:
        model: the model to evaluate (a folder, hub name or .gguf file).
        data: held-out preference pairs in any format ``preftune train`` reads.
        **options: ``preftune eval``'s other flags with underscores: ``ref_model``, ``nll_data``,
            ``generate``, ``judge``, ``beta``, ``max_length``, ``max_prompt_length``, ``max_examples``,
            ``batch_size``, ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``kl_samples``,
            ``dtype``, ``trust_remote_code``.
    """
    from preftune.evaluation.evaluate import evaluate_model

    allowed = [name for name in inspect.signature(evaluate_model).parameters if name not in ("model_path", "data")]
    for name in options:
        if name not in allowed:
            raise ConfigError(f"preftune.evaluate: unknown option {name!r}{_suggest(name, allowed)}")
    return evaluate_model(os.fspath(model), os.fspath(data), **options)


def _suggest(name: str, known: list[str]) -> str:
    from preftune.config.trl_names import RENAMED

    if name in RENAMED and RENAMED[name] in known:
        return f" (TRL's name; preftune's is {RENAMED[name]!r})"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (close matches: {', '.join(close)})" if close else f" (options: {', '.join(sorted(known))})"
