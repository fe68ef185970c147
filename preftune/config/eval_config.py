"""Every ``preftune eval`` option as one dataclass field: its flags, YAML keys, Python keywords and checks.

Built from the same pieces as :class:`preftune.config.train_config.TrainConfig`
(:mod:`preftune.config.values`): ``preftune eval``'s flags are generated from these fields
(:func:`preftune.cli.eval.add_eval_flags`), ``preftune.evaluate(model, data, **options)`` takes their
names as keywords, ``preftune eval --config FILE.yaml`` reads them as keys, and
:meth:`EvalConfig.validate` checks every value (its range included) before a model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config.trl_names import RENAMED
from preftune.config.values import (
    DTYPES,
    NON_NEGATIVE,
    POSITIVE,
    SEEDS,
    ConfigError,
    Range,
    apply_options,
    check_fields,
    flag_name,
    located,
    option,
    read_options,
    shown_path,
)
from preftune.config.yaml import load_options
from preftune.model.precision import MIXED_PRECISION


@dataclass
class EvalConfig:
    # --- what is evaluated -------------------------------------------------------------------
    model: str | None = option(None, "Model to evaluate (folder, hub name or .gguf file).", group="model")
    ref_model: str | None = option(
        None, "The base / reference model (folder, hub name or .gguf); without it: raw log-prob preference, no NLL "
              "difference, no generation.", group="model")
    data: str | None = option(None, "Held-out preference pairs or response groups (any `preftune train` format).",
                              group="data")
    nll_data: str | None = option(None, "SFT file for the NLL check. Default: the chosen (a group's best) responses of --data.",
                                  group="data")
    max_length: int = option(1024, "Max prompt + completion tokens.", group="data", domain=POSITIVE)
    max_prompt_length: int | None = option(
        None, "Max prompt tokens. Default: no own limit; --max-length bounds prompt + completion, the prompt's start "
              "cut first, as in preftune train. A value you give must be < --max-length.", group="data",
        domain=POSITIVE)
    max_examples: int | None = option(None, "Use only the first N held-out records.", group="data", domain=POSITIVE)
    beta: float = option(0.1, "Implicit-reward scale (accuracy does not depend on it; margins and the DPO loss do).",
                         group="data", domain=Range(0, low_open=True))
    # --- generation, KL and win rate ---------------------------------------------------------
    generate: int = option(0, "Sample the first N prompts of --data with model and base; estimate KL(model || base) "
                              "and, with --judge, the win rate (0 = off; needs --ref-model).", group="generation",
                           domain=NON_NEGATIVE, metavar="N")
    judge: str | None = option(None, "Judge spec for the win rate (needs --generate): python:module:function, "
                                     "reward-model:PATH or openai:URL#MODEL.", group="generation")
    kl_samples: int = option(1, "Samples per prompt for the KL estimate (always drawn at temperature 1, top-p 1).",
                             group="generation", domain=POSITIVE)
    max_new_tokens: int = option(64, "Tokens per sample at most.", group="generation", domain=POSITIVE)
    temperature: float = option(1.0, "Sampling temperature; 0 = greedy.", group="generation", domain=NON_NEGATIVE)
    top_p: float = option(1.0, "Nucleus sampling threshold.", group="generation", domain=Range(0, 1, low_open=True))
    seed: int = option(0, "Sampling seed.", group="generation", domain=SEEDS)
    base_cache: str | None = option(
        None, "Keep the base's share of the work (its held-out log-probs, NLL, samples and their reward-model "
              "scores) in this JSON file and reuse it when another model is evaluated against the same base with "
              "the same data and settings (keyed by the base's weights and every setting; same results). Without "
              "--ref-model the model is taken as the base: its held-out pair log-probs are stored (or read back) "
              "as the base's for the evaluations against it.", group="generation", metavar="FILE.json")
    # --- compute -----------------------------------------------------------------------------
    batch_size: int = option(8, "Sequences per forward / generate call.", group="compute", domain=POSITIVE)
    dtype: str = option("float32", "Weights dtype.", DTYPES, group="compute")
    mixed_precision: str = option(
        "no", "Compute precision of the forwards and sampling, as in preftune train: auto = bf16 on GPUs and CPUs "
              "with bf16 matmul instructions, else no (log-softmax stays fp32). `preftune eval` defaults to auto, "
              "the Python functions to no.", MIXED_PRECISION, group="compute", cli_default="auto")
    trust_remote_code: bool = option(False, "Allow code from the model folder / hub.", group="compute")
    packing: bool = option(True, "Padding-free packed batches where the models take them (same results, faster).",
                           group="compute", flag=False)
    logit_chunk_size: int = option(1024, "Completion tokens per chunk of the output head.", group="compute",
                                   domain=POSITIVE, flag=False)
    device: str | None = option(None, "Torch device. Default: cuda when available, else cpu.", group="compute",
                                flag=False)

    def validate(self, judge_given: bool = False) -> "EvalConfig":
        """Check every value before anything is loaded; raise :class:`ConfigError` naming the option, the
        value and what is allowed (types, choices, ranges, then the combinations), and the file the option
        came from where it did. ``judge_given``: a Judge object comes with this config (Python callers), so
        --judge's combination rule applies."""
        try:
            return self._check(judge_given)
        except ConfigError as exc:
            raise ConfigError(located(self, str(exc))) from None

    def _check(self, judge_given: bool) -> "EvalConfig":
        """:meth:`validate`'s checks, in order; ConfigError at the first that fails."""
        check_fields(self)
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ConfigError(f"--{flag_name(name)} is required")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be < --max-length "
                              f"({self.max_length}) to leave room for the completion")
        if self.generate and self.ref_model is None:
            raise ConfigError("--generate compares samples of the model with the base's: it needs --ref-model")
        if (self.judge is not None or judge_given) and not self.generate:
            raise ConfigError("--judge is used on generated samples: also pass --generate N")
        return self

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        """Every option by name."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, options: dict[str, Any], source: str = "options") -> "EvalConfig":
        """Build from Python keywords (paths may be ``os.PathLike``), refusing an unknown name with its close
        matches or, for one of TRL's names, preftune's (not validated)."""
        cfg = cls()
        apply_options(cfg, options, source, renamed=RENAMED)
        return cfg

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "EvalConfig":
        """Build from a dict (YAML), refusing unknown keys with a suggestion and coercing types (not validated)."""
        kwargs = read_options(values, cls.fields(), source)
        cfg = cls(**kwargs)
        cfg.read_from = (source, dict(kwargs), {})  # validate() names the file in an error about its values
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvalConfig":
        """Options from a YAML file of ``preftune eval`` option names (not validated)."""
        return cls.from_dict(load_options(path), source=shown_path(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
