"""One variant of a sweep: train it, evaluate it against the base, record the result.

A variant runs in its own Python process (:func:`run_isolated`: ``python -m preftune.evaluation.sweep
--run-variant spec.json``, so its peak memory is its own) or in the sweep's process
(:func:`run_in_process`, ``isolate: false``). Either way it leaves ``done.json`` (its settings and
results) in its folder, or a failed record naming the error; :func:`reevaluate` evaluates a variant
trained earlier again without retraining. The spec a variant runs from is built by
:func:`preftune.evaluation.sweep.variant_spec`.

A variant's process never outlives the sweep that started it: on Linux the kernel sends it ``SIGKILL``
when the sweep's process dies (``prctl(PR_SET_PDEATHSIG)``, set between fork and exec), and on every
system the variant also watches its parent's pid and exits when it is gone (:func:`exit_with_parent`).
While it runs it holds ``<folder>/.preftune-variant.lock`` (:data:`VARIANT_LOCK`; the trainer inside it
holds the run folder's own lock): a sweep run again waits for a live owner of a variant's folder
(:func:`wait_for_folder`, up to :data:`BUSY_WAIT_SECONDS`) and takes over one whose owner is dead.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from preftune.common.files import pid_alive, write_atomic
from preftune.common.process import peak_rss_mb, run_child
from preftune.config.eval_config import EvalConfig
from preftune.config.train_config import TrainConfig
from preftune.evaluation.evaluate import evaluate_model
from preftune.evaluation.report_table import to_json
from preftune.training.loop import train
from preftune.training.run_folder import LOCK_NAME, RunLock, describe_lock, lock_owner

log = logging.getLogger("preftune")

VARIANT_LOCK = ".preftune-variant.lock"  # held by a variant's process for its whole life (training, evaluation)
BUSY_WAIT_SECONDS = 600.0  # how long a sweep waits for a live process that holds a variant's folder


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


def execute_variant(spec_path: str | Path, parent_pid: int | None = None) -> int:
    """Child entry (``python -m preftune.evaluation.sweep --run-variant SPEC``): writes done.json or error.json.

    With ``parent_pid`` (the sweep's process) it ends when that process is gone; it holds the
    folder's :data:`VARIANT_LOCK` while it runs.
    """
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    spec_path = Path(spec_path)
    folder = spec_path.parent
    spec = json.loads(spec_path.read_text())
    lock = None
    try:
        lock = RunLock.acquire(folder, VARIANT_LOCK)
        record = run_variant(spec)
    except Exception as exc:  # reported in the sweep's table; the traceback stays in the log
        traceback.print_exc()
        write_json(folder / "error.json", {"name": spec["name"], "error": error_text(exc)})
        return 1
    else:
        write_json(folder / "done.json", record)
        return 0
    finally:
        if lock is not None:
            lock.release()


def run_isolated(spec: dict, folder: Path) -> dict:
    """Run the variant in its own Python process, so its peak RSS is its own."""
    spec_path = folder / "spec.json"
    write_json(spec_path, spec)
    log_path = folder / "run.log"
    command = [sys.executable, "-m", "preftune.evaluation.sweep", "--run-variant", str(spec_path),
               "--parent-pid", str(os.getpid())]
    with open(log_path, "w") as log_file:
        code = run_child(command, stdout=log_file, stderr=subprocess.STDOUT)  # ends with us
    if (folder / "done.json").exists():
        return json.loads((folder / "done.json").read_text())
    if (folder / "error.json").exists():
        error = json.loads((folder / "error.json").read_text())["error"]
    else:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        error = f"process exited with code {code}" + (f": {lines[-1]}" if lines else "")
    return failed_record(spec["name"], spec["options"], f"{error} (log: {log_path})")


def exit_with_parent(parent_pid: int, every: float = 0.2) -> None:
    """End this process (at once, ``os._exit``) when process ``parent_pid`` is gone: a daemon thread checks
    every ``every`` seconds whether this process's parent changed (an orphan is re-parented) or that pid
    ended. Where the parent-death signal exists (Linux) it is a second guard; elsewhere the only one."""
    def watch() -> None:
        while os.getppid() == parent_pid and pid_alive(parent_pid):
            time.sleep(every)
        print(f"preftune: the sweep process {parent_pid} that started this variant is gone; stopping",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def wait_for_folder(folder: Path, name: str) -> str | None:
    """Wait while a live process holds the variant's folder (an earlier sweep's variant still running, or a
    trainer): None once it is free, else why it is still busy after :data:`BUSY_WAIT_SECONDS`. A lock left by
    a dead process is free (the variant's run takes it over), said in one log line."""
    deadline = time.monotonic() + BUSY_WAIT_SECONDS
    waiting = False
    while True:
        owners = [owner for lock in (VARIANT_LOCK, LOCK_NAME) if (owner := lock_owner(folder, lock))]
        live = [info for info, held in owners if held]
        if not live:
            if waiting:
                log.info("variant %s: %s is free now", name, folder)
            elif owners:
                log.info("variant %s: the process that held %s earlier is gone (%s): the folder is taken over",
                         name, folder, describe_lock(owners[0][0]))
            return None
        if time.monotonic() >= deadline:
            return (f"its folder {folder} is still in use by {describe_lock(live[0])} after waiting "
                    f"{BUSY_WAIT_SECONDS:g} s: run compare again when that process has finished (or stop it)")
        if not waiting:
            log.warning("variant %s: %s is in use by %s (an earlier compare's variant still running?); waiting "
                        "up to %g s for it to finish", name, folder, describe_lock(live[0]), BUSY_WAIT_SECONDS)
            waiting = True
        time.sleep(0.2)


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
