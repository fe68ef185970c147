"""One variant of a sweep: train it, evaluate it against the base, record the result.

A variant runs in its own Python process (:func:`run_isolated`: ``python -m preftune.evaluation.sweep
--run-variant spec.json``, so its peak memory is its own) or in the sweep's process
(:func:`run_in_process`, ``isolate: false``). Either way it leaves ``done.json`` (its settings and
results) in its folder, or a failed record naming the error; :func:`reevaluate` evaluates a variant
trained earlier again without retraining. The spec a variant runs from is built by
:func:`preftune.evaluation.sweep.variant_spec`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from preftune.common.files import write_atomic
from preftune.common.process import peak_rss_mb
from preftune.config.eval_config import EvalConfig
from preftune.config.train_config import TrainConfig
from preftune.evaluation.evaluate import evaluate_model
from preftune.evaluation.report_table import to_json
from preftune.training.loop import train

log = logging.getLogger("preftune")


def run_variant(spec: dict) -> dict:
    """Train one variant and evaluate it against the base; its ``done.json`` record."""
    cfg = TrainConfig.from_dict(spec["train"], source=f"variant {spec['name']}").validate()
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()  # read now: evaluation (which loads the base too) comes after
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"name": spec["name"], "spec": spec, "status": "done", "error": None, "steps": result.steps,
            "train_seconds": seconds, "peak_rss_mb": peak,
            "train_rss_mb": max(0.0, peak - rss_before) if peak is not None else None,
            "peak_gpu_mb": gpu, "evaluation": evaluate_variant(spec)}


def evaluate_variant(spec: dict) -> dict:
    """The trained variant in ``spec["train"]["output_dir"]`` against the base, with ``spec["eval"]``."""
    cfg = TrainConfig.from_dict(spec["train"], source=f"variant {spec['name']}")
    options = dict(spec["eval"])
    options.setdefault("batch_size", cfg.batch_size)
    options.setdefault("mixed_precision", cfg.mixed_precision)  # evaluated in the precision it was trained in
    # the base's share of the evaluation (its held-out log-probs, NLL, samples, their reward-model scores) is
    # computed by the first variant and read back by the others (base_cache.BaseCache: keyed by the base's
    # weights and every setting)
    options["base_cache"] = (str(Path(cfg.output_dir).parent / "base_cache.json")
                             if options.pop("base_cache", True) else None)
    data = spec.get("eval_data") or cfg.eval_data  # train_eval: false leaves it out of the training config
    eval_cfg = EvalConfig.from_options(
        {**options, "model": cfg.output_dir, "data": data, "ref_model": cfg.model, "max_length": cfg.max_length,
         "max_prompt_length": cfg.max_prompt_length, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code},
        f"variant {spec['name']}: eval")
    return evaluate_model(eval_cfg)


def reevaluate(done: dict, spec: dict, folder: Path) -> dict:
    """A variant trained earlier under the same training settings: evaluate it again, keep its training."""
    try:
        evaluation = evaluate_variant(spec)
    except Exception as exc:
        log.exception("variant %s: evaluation failed", spec["name"])
        return failed_record(spec["name"], spec["options"], error_text(exc))
    record = {**done, "spec": spec, "evaluation": evaluation}
    write_json(folder / "done.json", record)
    return {**record, "status": "done (trained earlier, evaluated again)"}


def write_json(path: Path, value: dict) -> None:
    """``value`` as JSON at ``path``, written atomically (non-finite floats as null)."""
    write_atomic(path, to_json(value))


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def execute_variant(spec_path: str | Path) -> int:
    """Child entry (``python -m preftune.evaluation.sweep --run-variant SPEC``): writes done.json or error.json."""
    spec_path = Path(spec_path)
    folder = spec_path.parent
    spec = json.loads(spec_path.read_text())
    try:
        record = run_variant(spec)
    except Exception as exc:  # reported in the sweep's table; the traceback stays in the log
        traceback.print_exc()
        write_json(folder / "error.json", {"name": spec["name"], "error": error_text(exc)})
        return 1
    write_json(folder / "done.json", record)
    return 0


def run_isolated(spec: dict, folder: Path) -> dict:
    """Run the variant in its own Python process, so its peak RSS is its own."""
    spec_path = folder / "spec.json"
    write_json(spec_path, spec)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = folder / "run.log"
    with open(log_path, "w") as log_file:
        code = subprocess.run([sys.executable, "-m", "preftune.evaluation.sweep", "--run-variant", str(spec_path)],
                              stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode
    if (folder / "done.json").exists():
        return json.loads((folder / "done.json").read_text())
    if (folder / "error.json").exists():
        error = json.loads((folder / "error.json").read_text())["error"]
    else:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        error = f"process exited with code {code}" + (f": {lines[-1]}" if lines else "")
    return failed_record(spec["name"], spec["options"], f"{error} (log: {log_path})")


def run_in_process(spec: dict, folder: Path) -> dict:
    """Run the variant in this process (``isolate: false``); its record has no peak RSS."""
    try:
        record = run_variant(spec)
    except Exception as exc:
        log.exception("variant %s failed", spec["name"])
        return failed_record(spec["name"], spec["options"], error_text(exc))
    record.update(peak_rss_mb=None, train_rss_mb=None)  # this process's peak is not the variant's
    write_json(folder / "done.json", record)
    return record


def failed_record(name: str, options: dict, error: str) -> dict:
    """The record of a variant that did not finish: its name, options and error."""
    return {"name": name, "options": options, "status": "failed", "error": error, "evaluation": None}
