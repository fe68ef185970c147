"""``preftune iterate``: on-policy preference tuning in rounds, one command.

Each round n (1..R) runs five stages under :class:`preftune.recipes.stages.StageRunner`, writing into
``OUT/round-n/``:

1. **sample** — K responses per prompt of round n's slice of ``--prompts`` from the current policy (the
   starting model in round 1, round n-1's model after) -> ``samples.jsonl``;
2. **judge** — every response judged (scores, or a round robin for a pairwise judge), each verdict cached by
   (judge spec, prompt, response) in ``judge_cache.jsonl`` (:mod:`preftune.recipes.iterate_judge`) ->
   ``scores.jsonl``;
3. **pairs** — best vs worst per prompt (:func:`preftune.evaluation.pairs.best_vs_worst_pairs`, from the cache:
   no new judge call) -> ``pairs.jsonl``, and every response with its score -> ``groups.jsonl`` (response
   groups: what a group loss, or ``--groups``, trains on), ``pairs.json`` (kept / tied / empty);
4. **train** — :func:`preftune.training.loop.train` from the current policy on those pairs (or groups) with
   the given train options (any method) -> ``model/`` (a plain model folder) and ``train.json``; the reference
   is the previous round's policy or the base (``--reference``);
5. **measure** — on the held-out ``--eval-prompts`` (never trained on): one response per prompt (the same
   seed every round: common random numbers), its judge score, the win rate over the base and over the
   previous round with 95% Wilson intervals, KL(round || base) -> ``eval_samples.jsonl``, ``round.json``.

A ``base`` stage first measures the starting model (``OUT/round-0/``); a ``report`` stage last writes
``OUT/report.md``, ``OUT/metrics.json`` and ``OUT/iterate.svg`` (:mod:`preftune.recipes.iterate_report`).

Nothing is lost: every file is written atomically and a stage is finished when ``round-n/stages.json``
names it; ``--resume`` keeps the finished stages up to the first unfinished one and runs the rest (a stage
is deterministic given the seed, so a resumed run ends with the numbers of an uninterrupted one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from preftune.common.files import write_atomic
from preftune.recipes.iterate_config import IterateConfig, check_resume, per_round, round_prompts, settings
from preftune.recipes.iterate_judge import cached_judge
from preftune.recipes.iterate_report import measure_round, read_jsonl, write_jsonl, write_outputs
from preftune.recipes.stages import StageRunner, check_run_folder, clear_entries

STAGES = ("sample", "judge", "pairs", "train", "measure")
# Each stage's files in its round folder (cleared before it runs again; the judge cache never is).
STAGE_FILES = {"base": ("eval_samples.jsonl", "round.json"), "sample": ("samples.jsonl",),
               "judge": ("scores.jsonl",), "pairs": ("pairs.jsonl", "groups.jsonl", "pairs.json"),
               "train": ("model", "train.json"), "measure": ("eval_samples.jsonl", "round.json")}
TOP_FILES = ("settings.json", "metrics.json", "report.md", "iterate.svg")


@dataclass
class IterateResult:
    output_dir: Path
    metrics: dict  # everything in metrics.json
    rounds: int  # rounds measured
    stopped: bool  # --stop-when-no-gain ended the loop early


def run_iterate(cfg: IterateConfig, echo=print) -> IterateResult:
    """Run (or with ``cfg.resume`` go on with) the rounds into ``cfg.output_dir``; ``echo`` prints the stage lines.

    Raises ConfigError for bad settings (and other settings on ``--resume``), ValueError for bad prompts or a
    folder that holds something else, JudgeError (naming the prompt) when the judge fails.
    """
    from preftune.evaluation.judges.registry import make_judge
    from preftune.evaluation.prompts import read_prompts

    cfg.validate()
    judge = make_judge(cfg.judge) if isinstance(cfg.judge, str) else cfg.judge
    prompts, eval_prompts = read_prompts(cfg.prompts), read_prompts(cfg.eval_prompts)
    seen = {json.dumps(p) for p in prompts}
    shared = sum(json.dumps(p) in seen for p in eval_prompts)
    if shared:
        raise ValueError(f"--eval-prompts: {shared} of its {len(eval_prompts)} prompts are also in --prompts; the "
                         "held-out prompts must be ones no round trains on")
    count = per_round(cfg, len(prompts))
    out = prepare_output_dir(Path(cfg.output_dir), cfg.resume, settings(cfg, count), judge_entry(cfg, judge))
    return _Loop(cfg, out, judge, prompts, eval_prompts, count, echo).run()


def judge_entry(cfg: IterateConfig, judge) -> str | None:
    """The entry of ``cfg.output_dir`` that holds the judge's reward model (trained into the run folder, e.g.
    ``preftune train --loss reward --output-dir OUT/rm``), or None."""
    spec = getattr(judge, "spec", "") or ""
    if not spec.startswith("reward-model:"):
        return None
    try:
        return Path(spec.removeprefix("reward-model:")).resolve().relative_to(Path(cfg.output_dir).resolve()).parts[0]
    except (ValueError, IndexError):
        return None


def prepare_output_dir(out: Path, resume: bool, now: dict, judge_entry: str | None = None) -> Path:
    """``out`` ready for the run: a new folder gets ``settings.json``; an earlier run's is refused without
    ``--resume`` and with other settings (ConfigError naming them); foreign files are refused (but
    ``judge_entry``, the judge's reward model inside ``out``)."""
    entries = [*TOP_FILES, *(f"round-{n}" for n in range(1000)), *([judge_entry] if judge_entry else [])]
    check_run_folder(out, entries, "preftune iterate")
    if (out / "settings.json").is_file():
        if not resume:
            raise ValueError(f"--output-dir {out} holds an earlier preftune iterate run; add --resume to go on with "
                             "it, or choose a new folder")
        check_resume(out, now)
    elif any(out.glob("round-*")) or (out / "metrics.json").exists():
        raise ValueError(f"--output-dir {out} holds round folders but no settings.json; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "settings.json", json.dumps(now, indent=1))
    return out


def response_groups(samples: list[dict], scores: list[dict]) -> list[dict]:
    """Response groups (``{"prompt", "responses", "scores"}``, as ``preftune train`` reads them) of each prompt's
    non-empty responses, each text once with its judge score (or round-robin points); prompts with fewer than
    two such responses or all of them tied are left out."""
    groups = []
    for row, scored in zip(samples, scores):
        kept: dict[str, float] = {}
        for text, score in zip(row["samples"], scored["scores"]):
            if text.strip():
                kept.setdefault(text, score)
        if len(kept) >= 2 and len(set(kept.values())) > 1:
            groups.append({"prompt": row["prompt"], "responses": list(kept), "scores": list(kept.values())})
    return groups


def stage_name(n: int, stage: str) -> str:
    return "base" if stage == "base" else "report" if stage == "report" else f"round {n} {stage}"


class _Loop:
    """The rounds of one run: which stages are kept, the models in memory, each stage's body."""

    def __init__(self, cfg: IterateConfig, out: Path, judge, prompts: list, eval_prompts: list, count: int, echo):
        self.cfg, self.out, self.judge, self.echo = cfg, out, judge, echo
        self.prompts, self.eval_prompts, self.count = prompts, eval_prompts, count
        self.order = [(0, "base")] + [(n, s) for n in range(1, cfg.rounds + 1) for s in STAGES] + [(0, "report")]
        self.runner = StageRunner([stage_name(n, s) for n, s in self.order], echo, kept=self.kept(),
                                  before=self.before, after=None)
        self.models: dict[str, object] = {}
        self.judge_calls = 0

    # -------------------------------------------------------------------------------- bookkeeping

    def folder(self, n: int) -> Path:
        return self.out / f"round-{n}"

    def done(self, n: int) -> dict[str, float]:
        path = self.folder(n) / "stages.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def finish(self, n: int, stage: str, seconds: float) -> None:
        write_atomic(self.folder(n) / "stages.json", json.dumps({**self.done(n), stage: seconds}))

    def kept(self) -> dict[str, float]:
        """The finished stages up to the first unfinished one (their files all there), with their seconds."""
        kept = {}
        for n, stage in self.order[:-1]:
            seconds = self.done(n).get(stage)
            if seconds is None or not all((self.folder(n) / f).exists() for f in STAGE_FILES[stage]):
                break
            kept[stage_name(n, stage)] = seconds
        return kept

    def before(self, name: str) -> None:
        """Clear a stage's own files (and its entry in stages.json) before it runs."""
        n, stage = next((n, s) for n, s in self.order if stage_name(n, s) == name)
        if stage == "report":
            return
        self.folder(n).mkdir(parents=True, exist_ok=True)
        clear_entries(self.folder(n), STAGE_FILES[stage])
        done = {k: v for k, v in self.done(n).items() if k != stage}
        write_atomic(self.folder(n) / "stages.json", json.dumps(done))

    def stage(self, n: int, stage: str, title: str, body) -> None:
        name = stage_name(n, stage)
        self.runner.run(name, title, body)
        if name in self.runner.kept or stage == "report":
            return
        self.finish(n, stage, self.runner.stage_seconds()[name])

    def policy_path(self, n: int) -> str:
        """The model folder round ``n`` ends with (round 0: the starting model)."""
        return self.cfg.model if n == 0 else str(self.folder(n) / "model")

    def load(self, path: str):
        """``(model, tokenizer)``, the starting model and the latest policy kept in memory."""
        from preftune.model.loading import load_model, load_tokenizer

        if path not in self.models:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.models = {k: v for k, v in self.models.items() if k == self.cfg.model}
            self.models[path] = (load_model(path).to(device).eval(), load_tokenizer(path))
        return self.models[path]

    def compute_dtype(self, path: str):
        """The sampling / scoring precision: the training's ``mixed_precision`` (default ``auto``: bf16 where the
        CPU or GPU runs it fast, else the weights' dtype), resolved for the device ``path``'s model is on."""
        from preftune.model.precision import resolve_compute_dtype

        model, _ = self.load(path)
        return resolve_compute_dtype(self.cfg.train.get("mixed_precision", "auto"), next(model.parameters()).device)

    def cached(self, n: int):
        return cached_judge(self.judge, self.folder(n) / "judge_cache.jsonl", f"round {n}")

    # -------------------------------------------------------------------------------- the loop

    def run(self) -> IterateResult:
        import torch

        with torch.random.fork_rng(devices=[]):
            cfg, stopped, measured = self.cfg, False, 0
            self.stage(0, "base", f"the starting model on {len(self.eval_prompts)} held-out prompts",
                       lambda: self.measure(0))
            for n in range(1, cfg.rounds + 1):
                self.one_round(n)
                measured = n
                win = json.loads((self.folder(n) / "round.json").read_text())["win_vs_previous"]
                if cfg.stop_when_no_gain and win["low"] <= 0.5 <= win["high"]:
                    stopped = True
                    self.echo(f"\nround {n}: the win rate over round {n - 1} is {win['rate']:.3f} [{win['low']:.3f}, "
                              f"{win['high']:.3f}], its 95% interval includes 0.5: no gain; stopping "
                              "(--stop-when-no-gain)")
                    break
            result: dict = {}
            self.stage(0, "report", "report.md, metrics.json and iterate.svg",
                       lambda: result.update(write_outputs(self.out, measured, stopped, self.runner, self.judge_calls)))
        return IterateResult(self.out, result, measured, stopped)

    def one_round(self, n: int) -> None:
        cfg = self.cfg
        prompts = round_prompts(self.prompts, n, self.count, cfg.reuse_prompts)
        source = "the starting model" if n == 1 else f"round {n - 1}'s model"
        self.stage(n, "sample", f"{cfg.samples} responses to each of {len(prompts)} prompts from {source}",
                   lambda: self.sample(n, prompts))
        self.stage(n, "judge", f"every response judged by {self.judge.spec or self.judge!r}", lambda: self.score(n))
        self.stage(n, "pairs", "best vs worst response per prompt", lambda: self.pairs(n))
        self.stage(n, "train", f"{cfg.train.get('loss', 'dpo')} from {source} (reference: {cfg.reference})",
                   lambda: self.train(n))
        self.stage(n, "measure", f"round {n} on {len(self.eval_prompts)} held-out prompts", lambda: self.measure(n))

    # -------------------------------------------------------------------------------- the stages

    def sample(self, n: int, prompts: list) -> None:
        from preftune.evaluation.sampling import sample

        cfg = self.cfg
        model, tokenizer = self.load(self.policy_path(n - 1))
        texts = sample(model, tokenizer, prompts, n=cfg.samples, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1000 + n,
                       batch_size=cfg.sample_batch_size, compute_dtype=self.compute_dtype(self.policy_path(n - 1)))
        write_jsonl(self.folder(n) / "samples.jsonl", [{"prompt": p, "samples": s} for p, s in zip(prompts, texts)])

    def score(self, n: int) -> None:
        from preftune.evaluation.judges.base import ScoringJudge
        from preftune.evaluation.pairs import round_robin_points, scores_per_prompt

        rows = read_jsonl(self.folder(n) / "samples.jsonl")
        prompts, samples = [r["prompt"] for r in rows], [r["samples"] for r in rows]
        judge = self.cached(n)
        if isinstance(judge, ScoringJudge):
            values, kind = scores_per_prompt(judge, prompts, samples), "score"
        else:
            values, kind = round_robin_points(prompts, samples, judge), "round-robin points"
        self.judge_calls += judge.calls
        self.echo(f"  {judge.calls} judge verdicts asked ({len(prompts) * len(samples[0])} responses)")
        write_jsonl(self.folder(n) / "scores.jsonl", [{"prompt": p, "kind": kind, "scores": v}
                                                      for p, v in zip(prompts, values)])

    def pairs(self, n: int) -> None:
        from preftune.evaluation.pairs import best_vs_worst_pairs

        rows = read_jsonl(self.folder(n) / "samples.jsonl")
        judge = self.cached(n)
        pairs, ties = best_vs_worst_pairs([r["prompt"] for r in rows], [r["samples"] for r in rows], judge)
        self.judge_calls += judge.calls
        kept = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
        groups = response_groups(rows, read_jsonl(self.folder(n) / "scores.jsonl"))
        counts = {"prompts": len(rows), "pairs": len(kept), "skipped_ties": ties,
                  "skipped_empty": len(pairs) - len(kept), "groups": len(groups),
                  "trained_on": "groups" if self.on_groups() else "pairs"}
        self.echo(f"  {len(kept)} pairs kept ({ties} prompts tied, {counts['skipped_empty']} with an empty response)"
                  f"; {len(groups)} response groups")
        if not (groups if self.on_groups() else kept):
            raise ValueError(f"round {n}: no preference {counts['trained_on']} (every prompt's {self.cfg.samples} "
                             "responses tied or were empty); more --samples, a higher --temperature or a finer judge")
        write_jsonl(self.folder(n) / "pairs.jsonl", kept)
        write_jsonl(self.folder(n) / "groups.jsonl", groups)
        write_atomic(self.folder(n) / "pairs.json", json.dumps(counts))

    def on_groups(self) -> bool:
        """Whether the rounds train on response groups (``--groups``, or a group loss) instead of pairs."""
        from preftune.config.train_config import TrainConfig

        return self.cfg.groups or TrainConfig(loss=self.cfg.train.get("loss", "dpo"),
                                              loss_weights=self.cfg.train.get("loss_weights")).kind == "group"

    def train(self, n: int) -> None:
        from preftune.config.train_config import TrainConfig
        from preftune.training.loop import train
        from preftune.training.signals import TrainingInterrupted

        cfg = self.cfg
        options = {"loss": "dpo", **cfg.train}
        data = self.folder(n) / ("groups.jsonl" if self.on_groups() else "pairs.jsonl")
        train_cfg = TrainConfig(**options, model=self.policy_path(n - 1), data=str(data),
                                output_dir=str(self.folder(n) / "model"), seed=cfg.seed, progress=cfg.progress)
        train_cfg.given = frozenset(options) | {"model", "data", "output_dir", "seed", "progress"}
        if train_cfg.lora_r:  # each round's model a plain folder the next round starts from (new adapters)
            train_cfg.merge_lora = True
        if cfg.reference == "base" and n > 1 and train_cfg.needs_reference:
            train_cfg.ref_model = cfg.model
            train_cfg.given |= {"ref_model"}
        self.models.pop(self.policy_path(n), None)
        try:
            result = train(train_cfg)
        except TrainingInterrupted:  # Ctrl-C / SIGTERM: its checkpoint is not what the loop resumes from
            self.echo(f"  round {n}: training interrupted; the same command with --resume (not --resume-from) "
                      "goes on from this round's training, started over")
            raise
        summary = {"steps": result.steps, "final": {k: v for k, v in result.final_metrics.items()
                                                    if isinstance(v, (int, float))}}
        write_atomic(self.folder(n) / "train.json", json.dumps(summary))

    def measure(self, n: int) -> None:
        self.judge_calls += measure_round(self, n)
