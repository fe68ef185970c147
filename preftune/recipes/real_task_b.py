"""The real recipe's Task B, Anthropic HH-RLHF harmless: the data split by prompt (:func:`task_b_data`), a
reward model (:func:`task_b_reward_model`), the sweep of methods on one budget (:func:`task_b_sweep`) and the
task's DPO result on the whole DPO part (:func:`task_b_dpo`), each judged by the reward model."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import yaml

from preftune.common.text import duration
from preftune.recipes.real_config import DEFAULT_HH_DATA, RealRecipeConfig
from preftune.recipes.real_training import evaluate, train_stage


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
    dpo_rows, dpo = rm.train_rows, None  # dpo: the DPO part's rows, once read
    if cfg.b_dpo_pairs is not None and dpo_rows > cfg.b_dpo_pairs:
        dpo = [row for _, row in read_rows(data / "hh_dpo.jsonl")][:cfg.b_dpo_pairs]
        dpo_rows = write_rows(data / "hh_dpo.jsonl", dpo)
    rows = {"held_out": held.eval_rows, "rm": rm.eval_rows, "dpo": dpo_rows}
    files = {"held_out": "data/hh_held_out.jsonl", "rm": "data/hh_rm.jsonl", "dpo": "data/hh_dpo.jsonl"}
    if cfg.b_sweep_pairs:  # the DPO part in two: the sweep's rows, then the rest (the task's DPO continues on it)
        if not 0 < cfg.b_sweep_pairs < dpo_rows:
            raise ValueError(f"b_sweep_pairs {cfg.b_sweep_pairs}: the DPO part has {dpo_rows} pairs; the sweep's "
                             "share must leave some for the task's DPO to continue on")
        if dpo is None:
            dpo = [row for _, row in read_rows(data / "hh_dpo.jsonl")]
        rows["sweep"] = write_rows(data / "hh_dpo_sweep.jsonl", dpo[:cfg.b_sweep_pairs])
        rows["dpo_rest"] = write_rows(data / "hh_dpo_rest.jsonl", dpo[cfg.b_sweep_pairs:])
        files.update(sweep="data/hh_dpo_sweep.jsonl", dpo_rest="data/hh_dpo_rest.jsonl")
    return {"source": str(source), "converted": converted.written, "bad_records": converted.bad_records,
            "rows": rows, "files": files}


def task_b_reward_model(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """Train the reward model; its held-out accuracy and the base's raw log-prob preference accuracy (the base's
    held-out pair log-probs kept in the sweep's base cache, where its first variant reads them back)."""
    held_out = out / "data" / "hh_held_out.jsonl"
    train_stage(cfg, out / "b_rm", base, out / "data" / "hh_rm.jsonl", "reward", cfg.b_rm_learning_rate,
                cfg.b_rm_epochs, cfg.b_rm_max_steps)
    from preftune.evaluation.metrics import wilson_interval

    def summary(preference: dict) -> dict:
        low, high = wilson_interval(preference["accuracy"], preference["pairs"])
        return {"pairs": preference["pairs"], "accuracy": preference["accuracy"], "accuracy_low": low,
                "accuracy_high": high, "accuracy_definition": preference["accuracy_definition"]}

    return {"reward_model": summary(evaluate(cfg, out / "b_rm", held_out)["preference"]),
            "base_raw": summary(evaluate(cfg, base, held_out, base_cache=out / "b_sweep" / "base_cache.json")[
                "preference"])}


def b_judge(out: Path) -> str:
    """Task B's judge spec: the run's reward model (the sweep's and the whole-part DPO's, one spec)."""
    return f"reward-model:{(out / 'b_rm').resolve()}"


def sweep_file(cfg: RealRecipeConfig, out: Path, base: Path) -> Path:
    """Write the compare sweep (``b_sweep.yaml``): every variant from the base on the DPO part."""
    data = out / "data"
    part = "hh_dpo_sweep.jsonl" if cfg.b_sweep_pairs else "hh_dpo.jsonl"
    sweep = {"base": str(base.resolve()), "data": str((data / part).resolve()),
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


def sweep_dpo(cfg: RealRecipeConfig, out: Path) -> tuple[Path, int] | None:
    """The sweep's finished plain DPO variant the task's DPO continues -> (its model folder, its steps), or
    None: with ``b_sweep_pairs`` unset, or no variant trained DPO at ``b_dpo_beta`` with the common settings,
    or that variant did not finish."""
    from preftune.methods.table import parse

    if not cfg.b_sweep_pairs:
        return None
    dpo_beta = parse("dpo").default("beta", 0.1)  # a variant's beta when it names none (as TrainConfig sets it)
    for variant in cfg.b_variants:
        if variant.get("loss") == "dpo" and set(variant) <= {"name", "loss", "beta"} and \
                variant.get("beta", dpo_beta) == cfg.b_dpo_beta:
            folder = out / "b_sweep" / variant["name"]
            summary = folder / "summary.json"
            if (folder / "config.json").is_file() and summary.is_file():
                return folder, int(json.loads(summary.read_text())["steps"])
    return None


def task_b_dpo(cfg: RealRecipeConfig, out: Path, base: Path) -> dict:
    """DPO on the whole DPO part, evaluated against the base as a sweep variant is (same data, judge and
    settings, so the base's share is read back from the sweep's base cache when it is there).

    With ``b_sweep_pairs``, the sweep's dpo variant has trained on the DPO part's first rows: the run continues
    from it on the rest (reference: still the base), so the model has seen every DPO pair once and its steps
    are the sweep's plus these. Otherwise (or when the sweep has no finished dpo variant) it trains from the
    base on the whole part. Reference log-probs go through the sweep's shared reference cache
    (``b_sweep/ref_cache``): rows already there are read, the rest computed and added."""
    started = time.perf_counter()
    start = sweep_dpo(cfg, out)
    model, data, steps_before = base, out / "data" / "hh_dpo.jsonl", 0
    if start is not None:
        (model, steps_before), data = start, out / "data" / "hh_dpo_rest.jsonl"
    result = train_stage(cfg, out / "b_dpo", model, data, "dpo", cfg.b_learning_rate,
                         cfg.b_epochs, cfg.b_dpo_max_steps, beta=cfg.b_dpo_beta, own_process=True,
                         share_ref_cache=True,
                         ref_cache_dir=str(out / "b_sweep" / "ref_cache"),
                         **({"ref_model": str(base)} if start is not None else {}))
    train_seconds = time.perf_counter() - started
    evaluation = evaluate(cfg, out / "b_dpo", out / "data" / "hh_held_out.jsonl", ref_model=base,
                          generate=cfg.b_eval_prompts, judge=b_judge(out),
                          max_new_tokens=cfg.b_max_new_tokens, base_cache=out / "b_sweep" / "base_cache.json")
    extra = {"continued_from": f"b_sweep/{start[0].name}", "steps_before": steps_before,
             "steps_continued": result.steps} if start is not None else {}
    return result_row("dpo (whole part)", evaluation, options={"loss": "dpo", "beta": cfg.b_dpo_beta},
                      status="done", error=None, steps=steps_before + result.steps,
                      train_seconds=round(train_seconds, 1), base_cache=evaluation.get("base_cache"), **extra)


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
