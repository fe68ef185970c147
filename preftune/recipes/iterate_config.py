"""``preftune iterate``'s settings (:class:`IterateConfig`), each round's prompts, and the ``--resume`` check.

* :class:`IterateConfig` — the loop's own settings plus ``train``, the :class:`TrainConfig` options every
  round trains with (any method, LoRA, ...; not ``model``/``data``/``output_dir``/``ref_model``, which the
  loop sets).
* :func:`round_prompts` — round n's slice of the training prompts (or the same prompts with ``reuse_prompts``).
* :func:`settings` / :func:`check_resume` — what a run records in ``OUT/settings.json`` and the one-line
  refusal (a :class:`ConfigError`, exit 2) when ``--resume`` is given other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from preftune.config.values import ConfigError

REFERENCES = ("previous", "base")
# TrainConfig fields the loop sets itself (or that do not fit a loop of runs).
LOOP_SET = ("model", "data", "output_dir", "ref_model", "resume_from", "num_processes", "overwrite_output_dir",
            "progress", "seed")
# Settings a resumed run may change: more rounds, another stop rule, the progress bars.
FREE = ("rounds", "stop_when_no_gain", "resume", "progress")


@dataclass
class IterateConfig:
    """One ``preftune iterate`` run: ``rounds`` of sample -> judge -> pairs -> train -> measure."""

    model: str  # the starting policy (and the base every round is measured against)
    prompts: str  # training prompts (a .txt, one a line, or any file `preftune generate` reads)
    eval_prompts: str  # held-out prompts: measured on every round, never trained on
    judge: object  # a judge spec (python:/reward-model:/openai:) or a Judge
    output_dir: str
    rounds: int = 2
    samples: int = 4  # responses per prompt per round (best vs worst makes a pair)
    prompts_per_round: int | None = None  # None: all prompts split evenly over the rounds (or all, reused)
    reuse_prompts: bool = False  # every round samples the same prompts
    groups: bool = False  # train on response groups (every response, its score) instead of best-vs-worst pairs
    reference: str = "previous"  # the reference of each round's training: the previous round's policy, or the base
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    sample_batch_size: int = 32
    kl_samples: int = 2  # KL(round || base): samples per held-out prompt
    eval_pairs: str | None = None  # held-out pairs: preference accuracy and NLL regression of each round vs the start
    seed: int = 0
    stop_when_no_gain: bool = False  # end when the win rate over the previous round's 95% CI includes 0.5
    resume: bool = False
    progress: bool = True
    train: dict = field(default_factory=dict)  # TrainConfig options of every round's training

    def validate(self) -> "IterateConfig":
        """Raises ConfigError (one line) for a bad value, before anything is loaded."""
        for name in ("rounds", "samples", "max_new_tokens", "sample_batch_size", "kl_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if self.samples < 2:
            raise ConfigError(f"--samples must be >= 2 (a best and a worst response per prompt), got {self.samples}")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ConfigError(f"--prompts-per-round must be a positive integer, got {self.prompts_per_round}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"--reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ConfigError(f"need --temperature > 0 and 0 < --top-p <= 1, got {self.temperature} and {self.top_p}")
        loop_set = sorted(set(self.train) & set(LOOP_SET))
        if loop_set:
            raise ConfigError(f"--{loop_set[0].replace('_', '-')}: preftune iterate sets it for every round "
                              "(the model, pairs, output folder and reference: see --reference)")
        for name in ("model", "prompts", "eval_prompts", "judge", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        return self


def round_prompts(prompts: list, n: int, per_round: int, reuse: bool) -> list:
    """Round ``n``'s (1-based) prompts: the n-th slice of ``per_round`` prompts, or the first ``per_round``
    every round with ``reuse``."""
    start = 0 if reuse else (n - 1) * per_round
    return prompts[start:start + per_round]


def per_round(cfg: IterateConfig, n_prompts: int) -> int:
    """The prompts each round samples; ValueError when ``--prompts`` has too few for the rounds."""
    count = cfg.prompts_per_round or (n_prompts if cfg.reuse_prompts else n_prompts // cfg.rounds)
    need = count if cfg.reuse_prompts else count * cfg.rounds
    if count < 1 or need > n_prompts:
        raise ValueError(f"--prompts {cfg.prompts} has {n_prompts} prompts; {cfg.rounds} rounds of "
                         f"{max(count, 1)} fresh prompts need {max(need, cfg.rounds)} (fewer --prompts-per-round, "
                         "or --reuse-prompts)")
    return count


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (the prompts a run was started on); '' when it is not a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if Path(path).is_file() else ""


def settings(cfg: IterateConfig, count: int) -> dict:
    """What ``OUT/settings.json`` records: every setting (JSON-able), the resolved prompts per round and the
    prompt files' digests."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    values.update({f"train.{k}": v for k, v in values.pop("train").items()})
    values["judge"] = cfg.judge if isinstance(cfg.judge, str) else (getattr(cfg.judge, "spec", "") or repr(cfg.judge))
    values.update(prompts_per_round=count, prompts_digest=file_digest(cfg.prompts),
                  eval_prompts_digest=file_digest(cfg.eval_prompts),
                  eval_pairs_digest=file_digest(cfg.eval_pairs) if cfg.eval_pairs else "")
    return json.loads(json.dumps(values, default=str))


def check_resume(out: Path, now: dict) -> None:
    """ConfigError (one line) naming every setting that differs from the earlier run's ``settings.json``."""
    before = json.loads((out / "settings.json").read_text())
    differ = sorted(k for k in set(now) | set(before) if k not in FREE and now.get(k) != before.get(k))
    if differ:
        said = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in differ)
        raise ConfigError(f"--resume: the run in {out} was started with other settings ({said}); give the same "
                          "ones, or run without --resume into a new --output-dir")
