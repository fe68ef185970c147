"""Compare training variants: same base, same data, one report.

A sweep file (YAML) names the base model, the data, the options every variant shares and
what each variant changes::

    base: ./sft-model                # the model every variant starts from (and is compared with)
    data: train.jsonl
    eval_data: held_out.jsonl
    output_dir: runs/sweep
    common: {max_steps: 50, batch_size: 8, learning_rate: 5.0e-6}   # TrainConfig options
    variants:
      - {name: dpo-b0.05, loss: dpo, beta: 0.05}
      - {name: ipo, loss: ipo, beta: 0.5}
      - {name: simpo, loss: simpo}
    eval: {generate: 16, judge: "python:mymod:score"}   # evaluate_model options (optional)
    criterion: win_rate               # or eval_accuracy (default: win_rate when eval has a judge)
    isolate: true                     # one subprocess per variant (default; gives its peak memory)
    train_eval: true                  # also evaluate eval_data inside each run, before and after (default)

Relative paths are relative to the current directory, as for ``preftune train --config``.

:func:`run_compare` trains each variant into ``output_dir/<name>`` (:func:`preftune.training.loop.train`),
evaluates it against the base (:func:`preftune.evaluation.evaluate.evaluate_model`, the base as the
reference for every variant), and writes ``report.md``, ``report.html`` (self-contained),
``summary.json`` and the plots. Every variant's options are checked when the sweep file is read,
before any variant runs (:class:`ConfigError` naming the variant and the option). A variant that fails
while it runs is reported with its error and the sweep goes on (``preftune compare`` then exits 1
naming the failed variants, :func:`failure_line`). A variant's process ends with the sweep's, and a
sweep run again waits for a variant folder still held by a live process
(:func:`preftune.evaluation.sweep_variant.wait_for_folder`). A finished variant leaves ``done.json`` (its settings and results) and is
skipped when the sweep is run again with the same settings for it; when only the ``eval:``
settings changed, it is evaluated again without retraining. The base's share of each evaluation
(its log-probs of the held-out pairs, its NLL, its samples) is the same for every variant: the first
variant computes it into ``output_dir/base_cache.json`` and the others read it back
(:class:`preftune.evaluation.base_cache.BaseCache`; ``eval: {base_cache: false}`` turns that off).
Training shares the reference the same way: every variant with a fixed reference (not reference-free, not
TR-DPO, not ``precompute_ref``, one process) trains with ``share_ref_cache`` into ``output_dir/ref_cache``
(:class:`preftune.training.reference.SharedReference`), so a variant on the same pairs and reference as an
earlier one reads its reference log-probs instead of computing them; a ``share_ref_cache`` or
``ref_cache_dir`` the sweep file sets (in ``common`` or a variant) is kept (:func:`shares_reference`).

This module is the sweep's bookkeeping: the sweep file, which variants run again, the best variant
and the report's summary. Running one variant (in a child process by default) is
:mod:`preftune.evaluation.sweep_variant`; the plots and the report's Markdown / HTML are
:mod:`preftune.evaluation.sweep_report`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError
from preftune.config.yaml import load_yaml
from preftune.evaluation import sweep_report as report
from preftune.evaluation.metrics import wilson_interval
from preftune.evaluation.sweep_variant import (
    execute_variant,
    failed_record,
    reevaluate,
    run_in_process,
    run_isolated,
    wait_for_folder,
    write_json,
)

log = logging.getLogger("preftune")

CRITERIA = {
    "win_rate": "win rate of the variant's samples over the base's under the judge (a tie counts half)",
    "eval_accuracy": "held-out preference accuracy: implicit reward beta * (logp_variant - logp_base) of the "
                     "chosen response > the rejected one",
}
SWEEP_KEYS = ("base", "data", "eval_data", "output_dir", "common", "variants", "eval", "criterion", "isolate",
              "train_eval")
EVAL_OPTIONS = {"generate": int, "judge": str, "max_new_tokens": int, "temperature": float, "top_p": float,
                "seed": int, "batch_size": int, "beta": float, "kl_samples": int, "nll_data": str,
                "max_examples": int, "mixed_precision": str, "base_cache": bool}
SET_BY_SWEEP = ("model", "data", "eval_data", "output_dir", "overwrite_output_dir")  # TrainConfig fields the sweep file owns
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Sweep:
    path: Path
    base: str
    data: str
    eval_data: str
    output_dir: Path
    common: dict = field(default_factory=dict)
    variants: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    criterion: str = "eval_accuracy"
    isolate: bool = True
    train_eval: bool = True  # also evaluate eval_data inside each training run (before and after: curves)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file, every variant's options included; :class:`ConfigError` naming the key
    (and the variant) for anything wrong."""
    path = Path(path)
    raw = load_yaml(path)  # duplicate keys and alias bombs refused in one line, like every config file
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base, data, eval_data, output_dir, variants")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(SWEEP_KEYS)})")
    for key in ("base", "data", "eval_data", "output_dir"):
        if not raw.get(key):
            raise ConfigError(f"{path}: {key!r} is required")
    common = raw.get("common") or {}
    evaluation = raw.get("eval") or {}
    variants = raw.get("variants")
    for key, value in (("common", common), ("eval", evaluation)):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key!r} must be a mapping")
    fixed = sorted(set(k.replace("-", "_") for k in common) & set(SET_BY_SWEEP))
    if fixed:
        raise ConfigError(f"{path}: common: {fixed[0]!r} is set by the sweep (base / data / eval_data / output_dir)")
    TrainConfig.from_dict(common, source=f"{path}: common")  # unknown keys and types, early
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"{path}: 'variants' must be a non-empty list of {{name: ..., option: value}}")
    names = []
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            raise ConfigError(f"{path}: variants[{i}] needs a 'name' (a string)")
        if not _NAME.match(variant["name"]):
            raise ConfigError(f"{path}: variant name {variant['name']!r}: use letters, digits, '.', '_', '-' "
                              "(it names the variant's folder)")
        names.append(variant["name"])
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: variant name {duplicates[0]!r} is used twice")
    for key, value in evaluation.items():
        if key not in EVAL_OPTIONS:
            raise ConfigError(f"{path}: eval: unknown option {key!r} (allowed: {', '.join(EVAL_OPTIONS)})")
        if not isinstance(value, EVAL_OPTIONS[key]) and not (EVAL_OPTIONS[key] is float and isinstance(value, int)):
            raise ConfigError(f"{path}: eval: {key} expects {EVAL_OPTIONS[key].__name__}, got {value!r}")
    has_judge = bool(evaluation.get("generate")) and bool(evaluation.get("judge"))
    criterion = raw.get("criterion") or ("win_rate" if has_judge else "eval_accuracy")
    if criterion not in CRITERIA:
        raise ConfigError(f"{path}: criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    if criterion == "win_rate" and not has_judge:
        raise ConfigError(f"{path}: criterion win_rate needs eval: {{generate: N, judge: SPEC}}")
    sweep = Sweep(path=path, base=str(raw["base"]), data=str(raw["data"]), eval_data=str(raw["eval_data"]),
                  output_dir=Path(raw["output_dir"]), common=common, variants=variants, eval=evaluation,
                  criterion=criterion, isolate=bool(raw.get("isolate", True)),
                  train_eval=bool(raw.get("train_eval", True)))
    for variant in variants:  # each variant's training options, before any variant runs (cheap: no I/O)
        variant_spec(sweep, variant)
    return sweep


def variant_spec(sweep: Sweep, variant: dict) -> dict:
    """Everything one variant's run needs, as JSON-ready data; ConfigError naming the sweep file, the variant
    and the option for bad options."""
    name = variant["name"]
    where = f"{sweep.path}: variant {name}"
    options = {k: v for k, v in variant.items() if k != "name"}
    fixed = sorted(set(k.replace("-", "_") for k in options) & set(SET_BY_SWEEP))
    if fixed:
        raise ConfigError(f"{where}: {fixed[0]!r} is set by the sweep, not per variant")
    values = {"progress": False, **sweep.common, **options, "model": sweep.base, "data": sweep.data,
              # train_eval: false leaves the in-loop held-out passes out; the evaluation after training stays
              "eval_data": sweep.eval_data if sweep.train_eval else None,
              "output_dir": str(sweep.output_dir / name),
              # the sweep owns its variant folders: a variant trained again replaces what an earlier try left
              "overwrite_output_dir": True}
    try:
        cfg = TrainConfig.from_dict(values, source=where).validate()
        explicit = {k.replace("-", "_") for k in {**sweep.common, **options}}
        if "share_ref_cache" not in explicit and shares_reference(cfg):
            values["share_ref_cache"] = True
            if "ref_cache_dir" not in explicit:
                values["ref_cache_dir"] = str(sweep.output_dir / "ref_cache")
            cfg = TrainConfig.from_dict(values, source=where).validate()
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(where) else f"{where}: {text}") from None
    return {"name": name, "options": options, "train": cfg.to_dict(), "eval": dict(sweep.eval),
            "eval_data": sweep.eval_data}


def shares_reference(cfg: TrainConfig) -> bool:
    """Whether a variant reads its reference log-probs from the sweep's shared cache: it has a reference, one
    that stays fixed (not TR-DPO's), not precomputed whole, in one process."""
    return cfg.needs_reference and not cfg.sync_ref_model and not cfg.precompute_ref and cfg.num_processes <= 1


# ----------------------------------------------------------------------------- the sweep


def run_compare(config_path: str | Path) -> Path:
    """Train, evaluate and report every variant of the sweep file; the path of ``report.md``.

    A bad option of any variant raises :class:`ConfigError` before anything runs; a variant that fails
    while running is a failed row of the report (:func:`failure_line` says which).
    """
    sweep = load_sweep(config_path)
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    records = [variant_record(sweep, variant) for variant in sweep.variants]
    return write_report(sweep, records)


def variant_record(sweep: Sweep, variant: dict) -> dict:
    """Run one variant of the sweep (or reuse what an earlier run finished); its report row."""
    name = variant["name"]
    options = {k: v for k, v in variant.items() if k != "name"}
    spec = json.loads(json.dumps(variant_spec(sweep, variant)))  # as it reads back from done.json
    folder = sweep.output_dir / name
    busy = wait_for_folder(folder, name)  # a live earlier variant may still be finishing it
    if busy:
        log.warning("variant %s: %s", name, busy)
        return failed_record(name, options, busy)
    done = json.loads((folder / "done.json").read_text()) if (folder / "done.json").exists() else None
    if done is not None and done.get("spec") == spec:
        log.info("variant %s: finished earlier (%s); skipped", name, folder / "done.json")
        return {**done, "options": options, "status": "done (earlier run)"}
    if done is not None and done.get("spec", {}).get("train") == spec["train"]:
        log.info("variant %s: only the eval settings changed since its done.json; evaluating it again", name)
        return {**reevaluate(done, spec, folder), "options": options}
    if done is not None:
        log.info("variant %s: training settings changed since its done.json; running it again", name)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("done.json", "error.json", "metrics.jsonl", "summary.json"):  # metrics.jsonl is appended to
        (folder / stale).unlink(missing_ok=True)
    log.info("variant %s: training (%s)", name, ", ".join(f"{k}={v}" for k, v in options.items()) or "common")
    record = run_isolated(spec, folder) if sweep.isolate else run_in_process(spec, folder)
    record["options"] = options
    if record.get("error"):
        log.warning("variant %s failed: %s", name, record["error"])
    return record


def failure_line(records: list[dict]) -> str | None:
    """One line naming the variants that failed and why (``2 of 4 variants failed: a (error), b (error)``);
    None when none failed."""
    failed = [r for r in records if r.get("error")]
    if not failed:
        return None
    names = ", ".join(f"{r['name']} ({' '.join(str(r['error']).split())})" for r in failed)
    return f"{len(failed)} of {len(records)} variant{'s' if len(records) != 1 else ''} failed: {names}"


def _criterion_value(record: dict, criterion: str) -> tuple[float, float, float, int] | None:
    """(value, low, high, n) of a finished variant under ``criterion``; None without one."""
    evaluation = record.get("evaluation") or {}
    if criterion == "win_rate":
        rate = (evaluation.get("generation") or {}).get("win_rate")
        return (rate["rate"], rate["low"], rate["high"], rate["n"]) if rate else None
    pref = evaluation.get("preference")
    if not pref:
        return None
    low, high = wilson_interval(pref["accuracy"], pref["pairs"])
    return pref["accuracy"], low, high, pref["pairs"]


def best_variant(records: list[dict], criterion: str) -> tuple[str | None, str]:
    """The best variant's name under ``criterion`` and a sentence saying so (and how sure it is)."""
    scored = [(r["name"], v) for r in records if not r.get("error") and (v := _criterion_value(r, criterion))]
    if not scored:
        return None, f"No variant has a {criterion} value: no best variant."
    scored.sort(key=lambda item: item[1][0], reverse=True)
    name, (value, low, high, n) = scored[0]
    text = f"Best variant under {criterion}: {name} ({value:.3f}, 95% CI [{low:.3f}, {high:.3f}], n={n})."
    if len(scored) > 1:
        runner, (r_value, r_low, r_high, _) = scored[1]
        if r_value == value:
            text += f" Tied with {runner}: the first listed is named."
        elif r_high >= low:
            text += (f" Its interval overlaps the runner-up's ({runner}: {r_value:.3f} [{r_low:.3f}, {r_high:.3f}]): "
                     "the ranking is not statistically clear; evaluate more examples.")
    return name, text


def write_report(sweep: Sweep, records: list[dict]) -> Path:
    """Plots, report.md, report.html and summary.json in the sweep's output folder."""
    out = sweep.output_dir
    best, best_text = best_variant(records, sweep.criterion)
    finished = [r for r in records if not r.get("error")]
    images: dict[str, Path] = {}
    curves = report.training_curves_png(
        {r["name"]: report.read_metrics(out / r["name"] / "metrics.jsonl") for r in finished}, out / "curves.png")
    if curves:
        images["curves"] = curves
    use_win_rate = any(((r.get("evaluation") or {}).get("generation") or {}).get("win_rate") for r in finished)
    points = []
    for r in finished:
        gen = r["evaluation"].get("generation") or {}
        value = _criterion_value(r, "win_rate" if use_win_rate else "eval_accuracy")
        if gen.get("kl") is not None and value:
            points.append({"name": r["name"], "kl": gen["kl"], "kl_err": gen.get("kl_stderr"),
                           "y": value[0], "y_low": value[1], "y_high": value[2]})
    y_label = "win rate vs base (95% CI)" if use_win_rate else "held-out preference accuracy (95% CI)"
    frontier = report.frontier_png(points, out / "frontier.png", y_label, base_y=0.5 if use_win_rate else None)
    if frontier:
        images["frontier"] = frontier

    beta = sweep.eval.get("beta", 0.1)
    notes = [f"held-out acc: share of {sweep.eval_data} pairs whose implicit reward beta * (logp_variant - "
             f"logp_base) is higher for the chosen response; the base is the reference for every variant "
             f"(reference-free methods too); beta = {beta} (the accuracy does not depend on beta).",
             "NLL/token: mean negative log-likelihood per token of the held-out chosen responses "
             f"({sweep.eval.get('nll_data') or 'chosen side of eval_data'}); in brackets variant - base "
             "(> 0: the variant fits them worse than the base).",
             "train time: wall-clock seconds of preftune.training.loop.train for the variant (loading included)."]
    if sweep.isolate:
        notes.append("peak RSS: the peak resident set size of the variant's own process (Linux: VmHWM) "
                     "(python -m preftune.evaluation.sweep --run-variant), read when training ended: the peak resident "
                     "memory of Python, libraries, data, model, reference copy, optimizer state and activations "
                     "(evaluation, later, is not included). In brackets: how much training raised the peak "
                     "above the process's peak before training started (interpreter and imports).")
    else:
        notes.append("peak RSS: not reported (isolate: false runs every variant in one process, whose peak "
                     "memory can't be attributed to one variant).")
    if sweep.eval.get("generate"):
        notes.append(f"KL: Monte-Carlo KL(variant || base) in nats per sequence on the variant's samples for "
                     f"the first {sweep.eval['generate']} held-out prompts (± standard error). Win rate: the "
                     f"variant's sample vs the base's for each prompt, judge {sweep.eval.get('judge') or 'none'}, "
                     "ties count half, 95% Wilson interval.")
    else:
        notes.append("No KL and no win rate: set eval: {generate: N, judge: SPEC} to sample and judge; the "
                     "reward-vs-KL plot needs them.")
    if frontier and use_win_rate:
        notes.append("A base point (KL 0, win rate 0.5) anchors the reward-vs-KL plot: the base against itself.")
    summary = {"title": f"preftune comparison: {len(records)} variants from {sweep.base}", "base": sweep.base,
               "data": sweep.data, "eval_data": sweep.eval_data, "criterion": sweep.criterion,
               "criterion_text": f"{sweep.criterion}: {CRITERIA[sweep.criterion]}", "best": best,
               "best_text": best_text, "notes": notes, "rows": records,
               "captions": {"curves": "Training curves (each variant's metrics.jsonl)",
                            "frontier": f"Reward vs KL to the base ({y_label})"}}
    (out / "report.md").write_text(report.render_markdown(summary, {k: p.name for k, p in images.items()}))
    (out / "report.html").write_text(report.render_html(summary, images))
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "captions"})
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preftune.evaluation.sweep",
                                     description="Run a sweep (--config), or one variant of it (--run-variant, "
                                                 "used internally: one process per variant).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", metavar="SWEEP.yaml", help="sweep file (see `preftune compare --help`)")
    group.add_argument("--run-variant", metavar="SPEC.json", help="internal: train + evaluate one variant")
    parser.add_argument("--parent-pid", type=int, help="internal (--run-variant): end when this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.run_variant:
        return execute_variant(args.run_variant, args.parent_pid)
    path = run_compare(args.config)
    print(f"report: {path}")
    failed = failure_line(json.loads((path.parent / "summary.json").read_text())["rows"])
    if failed:
        print(f"preftune: error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
