"""The Python API for notebooks and scripts: ``preftune.train(...)``, ``preftune.evaluate(...)`` and
``preftune.iterate(...)``.

The same options as the command line, as keywords (a flag's name with underscores:
``--learning-rate`` is ``learning_rate=``), checked by the same :meth:`TrainConfig.validate` /
:meth:`EvalConfig.validate` before anything is loaded::

    import preftune
    result = preftune.train(model="./sft", data="pairs.jsonl", output_dir="runs/dpo1", loss="dpo", beta=0.1)
    result.eval_after["rewards/accuracies"]
    metrics = preftune.evaluate(model="runs/dpo1", ref_model="./sft", data="held_out.jsonl")
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from preftune.config.eval_config import EvalConfig
from preftune.config.train_config import TrainConfig
from preftune.config.trl_names import RENAMED
from preftune.config.values import ConfigError, apply_options, check_names


def train(config: str | os.PathLike | None = None, **options: Any):
    """Train as ``preftune train`` does and return its :class:`preftune.training.loop.TrainResult`.

    Args:
        config: a YAML file of options (preftune's or TRL's names), as ``--config``; the keywords
            override it.
        **options: any :class:`preftune.config.train_config.TrainConfig` field (``model``, ``data``,
            ``output_dir``, ``loss``, ``beta``, ``learning_rate``, ``max_steps``, ``report_to`` ...).

    Raises :class:`preftune.config.values.ConfigError` (a ``ValueError``) for an unknown keyword, naming
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
    check_names(options, {f.name for f in dataclasses.fields(TrainConfig)}, source, renamed=RENAMED)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"{source}: config expects a path to a YAML file, got {type(config).__name__}")
    cfg = TrainConfig.from_yaml(os.fspath(config)) if config is not None else TrainConfig()
    apply_options(cfg, options, source, renamed=RENAMED)
    cfg.given = getattr(cfg, "given", frozenset()) | set(options)
    return cfg.validate()


def evaluate(model: str | os.PathLike, data: str | os.PathLike, **options: Any) -> dict:
    """Evaluate as ``preftune eval`` does and return its result (the dict ``--json`` prints).

    Args:
        model: the model to evaluate (a folder, hub name or .gguf file).
        data: held-out preference pairs in any format ``preftune train`` reads.
        **options: any :class:`preftune.config.eval_config.EvalConfig` field, i.e. ``preftune eval``'s
            other flags with underscores (``ref_model``, ``nll_data``, ``generate``, ``judge``, ``beta``,
            ``max_length``, ``max_prompt_length``, ``max_examples``, ``batch_size``, ``max_new_tokens``,
            ``temperature``, ``top_p``, ``seed``, ``kl_samples``, ``base_cache``, ``dtype``,
            ``mixed_precision``, ``trust_remote_code``) plus ``packing``, ``logit_chunk_size`` and
            ``device``. ``judge`` may also be a :class:`preftune.evaluation.judges.base.Judge`.

    Raises :class:`preftune.config.values.ConfigError` for an unknown keyword (naming the close matches)
    and for a bad value or combination, before any model or data is loaded.
    """
    judge = options.get("judge")
    if judge is not None and not isinstance(judge, str):  # a Judge object, not a spec
        if not callable(getattr(judge, "compare", None)):
            raise ConfigError(f"preftune.evaluate: judge expects a judge spec (text) or a Judge object, got "
                              f"{type(judge).__name__}")
        options = {name: value for name, value in options.items() if name != "judge"}
    else:
        judge = None
    cfg = EvalConfig.from_options({"model": model, "data": data, **options}, "preftune.evaluate")
    cfg.validate(judge_given=judge is not None)
    from preftune.evaluation.evaluate import evaluate_model

    return evaluate_model(cfg, judge=judge)


def iterate(model: str | os.PathLike, prompts: str | os.PathLike, eval_prompts: str | os.PathLike, judge,
            output_dir: str | os.PathLike, **options: Any):
    """On-policy rounds as ``preftune iterate`` runs them; returns its
    :class:`preftune.recipes.iterate.IterateResult` (``metrics``: what ``OUT/metrics.json`` holds).

    Args:
        model: the starting policy (a model folder or hub name); every round is measured against it.
        prompts / eval_prompts: training prompts and held-out prompts (a ``.txt``, one a line, or any file
            ``preftune train`` reads).
        judge: a judge spec (``python:...``, ``reward-model:PATH``, ``openai:URL#MODEL``) or a
            :class:`preftune.evaluation.judges.base.Judge`.
        output_dir: the run folder (``OUT/round-N/``, ``report.md``, ``metrics.json``).
        **options: the loop's settings (``rounds``, ``samples``, ``prompts_per_round``, ``reuse_prompts``,
            ``reference``, ``max_new_tokens``, ``temperature``, ``top_p``, ``sample_batch_size``,
            ``kl_samples``, ``seed``, ``stop_when_no_gain``, ``resume``, ``progress``) and any
            :class:`TrainConfig` field every round trains with (``loss``, ``beta``, ``learning_rate``,
            ``lora_r`` ...).

    Raises ConfigError for an unknown keyword (naming the close matches) or a bad value, and on ``resume``
    with other settings than the run in ``output_dir`` was started with.
    """
    from preftune.recipes.iterate import run_iterate
    from preftune.recipes.iterate_config import IterateConfig

    loop_names = {f.name for f in dataclasses.fields(IterateConfig)} - {"train", "model", "prompts", "eval_prompts",
                                                                       "judge", "output_dir"}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    check_names(options, loop_names | train_names, "preftune.iterate", renamed=RENAMED)
    loop = {k: v for k, v in options.items() if k in loop_names}
    train = {k: v for k, v in options.items() if k not in loop_names}
    checked = TrainConfig()
    apply_options(checked, train, "preftune.iterate", renamed=RENAMED)  # each value coerced as `preftune train` does
    train = {name: getattr(checked, name) for name in train}
    cfg = IterateConfig(model=os.fspath(model), prompts=os.fspath(prompts), eval_prompts=os.fspath(eval_prompts),
                        judge=judge, output_dir=os.fspath(output_dir), train=train, **loop)
    return run_iterate(cfg)
