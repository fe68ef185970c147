"""The one training loop, on ``accelerate``: every method, one path.

Read top to bottom: set up (data, model, reference, batches, optimizer) -> for each
optimizer step: micro-batches -> log-probs -> objective -> backward -> clip -> step ->
log / evaluate / checkpoint -> save the final model. What the run writes and reads back
(checkpoints, resume, the final model, metrics.jsonl) is in :mod:`preftune.training.run_state`; the run
folder's lock, identity and re-run rules in :mod:`preftune.training.run_folder`; the numerical guard in
:mod:`preftune.training.divergence`.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from preftune.common.files import write_atomic
from preftune.config.train_config import TrainConfig
from preftune.data.load import read_examples
from preftune.data.order import balanced_split, batch_indices, mixed_label_batches
from preftune.methods.losses.unpaired import kto_weight_warning
from preftune.methods.objective import compute_objective
from preftune.model.loading import add_lora, check_vocab, load_model, load_tokenizer
from preftune.model.logprobs import LogProbModel
from preftune.model.memory_policy import enable_checkpointing, plan_memory, training_state_bytes
from preftune.model.packing import make_collate, model_row_cost, packing_decision  # make_collate: benchmarks wrap it
from preftune.model.precision import check_trainable_dtype, compute_dtype, resolve_dtype, resolve_mixed_precision
from preftune.training import checkpoint as ckpt
from preftune.training.divergence import StepGuard, TrainingDiverged, weights_norm  # noqa: F401 (TrainingDiverged: raised by the loop)
from preftune.training.reference import (
    AdapterOffReference,
    CachedReference,
    ModelReference,
    cache_key,
    compute_reference_table,
    examples_fingerprint,
    load_cache,
    save_cache,
)
from preftune.training.run_folder import RunFolder, claim_output_dir
from preftune.training.run_state import MetricsLog, progress_bar, resume, save_final, save_training_state, summary_json

log = logging.getLogger("preftune")


class TrainingInterrupted(SystemExit):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a checkpoint was written.

    A ``SystemExit`` with code 130 (SIGINT) or 143 (SIGTERM): the CLI exits with it and no
    traceback (the log line says how to resume), and ``except Exception`` does not swallow it.
    ``checkpoint`` is the folder to resume from (``None`` on ranks other than the main one).
    """

    def __init__(self, message: str, checkpoint: Path | None, step: int, code: int):
        super().__init__(code)
        self.message, self.checkpoint, self.step = message, checkpoint, step

    def __str__(self) -> str:
        return self.message


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict = field(default_factory=dict)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says. The output folder is claimed first (its lock held until the run ends
    however it ends; a folder holding another run refused): :func:`preftune.training.run_folder.claim_output_dir`."""
    cfg.validate()
    handlers = StopOnSignal.handlers()
    with claim_output_dir(cfg) as run:
        try:
            return _train(cfg, run)
        finally:  # however it ended (a full disk mid-loop too), Ctrl-C and SIGTERM work as before
            StopOnSignal.put_back(handlers)


def _train(cfg: TrainConfig, run: RunFolder) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    precision, precision_why = resolve_mixed_precision(cfg.mixed_precision, "cuda" if torch.cuda.is_available()
                                                       else "cpu")
    compute = compute_dtype(precision)
    # cpu=True where there is no GPU: under torchrun, accelerate then runs gloo DDP over CPU processes.
    # mixed_precision: accelerate's loss scaler for fp16, FSDP's param dtype; our forwards autocast themselves.
    _forget_other_precision(precision)
    accelerator = Accelerator(gradient_accumulation_steps=1, cpu=not torch.cuda.is_available(),
                              mixed_precision=precision)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    metrics_log = None
    if main:  # claim_output_dir made the folder; run.set_data writes config.yaml and run.json
        from preftune.training.trackers import with_trackers  # --report-to: the rows also go to each tracker

        metrics_log = with_trackers(MetricsLog(out), cfg, out)
        if not cfg.max_grad_norm:  # 0 or none: no clipping, as in HF Trainer; said, not silent
            log.info("gradient clipping off (--max-grad-norm %s)", cfg.max_grad_norm)

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    reading = dict(kind=cfg.kind, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   skip_bad_records=cfg.skip_bad_records, limit=cfg.max_examples, kl_partners=cfg.method.kl_partners,
                   seed=cfg.seed)
    train_examples, train_report = read_examples(tokenizer, cfg.data, main, **reading)
    run.set_data(examples_fingerprint(train_examples), cfg.data)  # a resumed checkpoint must have seen this data
    eval_examples = read_examples(tokenizer, cfg.eval_data, main, **reading)[0] if cfg.eval_data else []
    if "desirable_weight" in cfg.method.fields and main:  # class balance of thumbs-up/down data
        n_pos = sum(1 for e in train_examples if e.label)
        warning = kto_weight_warning(n_pos, len(train_examples) - n_pos, cfg.desirable_weight, cfg.undesirable_weight)
        if warning:
            log.warning(warning)

    # ---- model and reference --------------------------------------------------------------
    model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code, cfg.load_in_4bit,
                       head=cfg.method.model_head)
    if cfg.method.model_head == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # transformers' classifier finds the last token by it
    reference_model = None
    if cfg.needs_reference and (cfg.ref_model or not cfg.lora_r):
        # Default reference: the policy's starting weights, as a separate frozen copy.
        if cfg.ref_model:
            reference_model = load_model(cfg.ref_model, cfg.ref_dtype or cfg.dtype, cfg.attn_implementation,
                                         cfg.trust_remote_code)
        else:
            reference_model = copy.deepcopy(model)
            if cfg.ref_dtype:
                reference_model.to(resolve_dtype(cfg.ref_dtype))
    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed)
    check_trainable_dtype(model)
    check_vocab(tokenizer, model, train_examples + eval_examples)
    if main:
        log.info("precision: %s (%s); trained weights and AdamW state %s; log-softmax and losses float32",
                 {"no": "no mixed precision", "bf16": "bf16 compute (autocast)",
                  "fp16": "fp16 compute (autocast) with loss scaling"}[precision], precision_why,
                 ", ".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()
                                   if p.requires_grad})))
    model.to(accelerator.device)

    packing = cfg.packing
    if packing:
        ok, reason = packing_decision(model, reference_model)  # every model the packed batches reach
        if ok:
            log.info("packing on: %s", reason)
        else:
            log.warning("packing off: %s; using padded batches", reason)
            packing = False
    collate = make_collate(tokenizer.pad_token_id, packing, cfg.pack_tokens, cfg.train_on_prompt, model_row_cost(model))

    reference = None
    if cfg.needs_reference:
        if reference_model is not None:
            reference_model.to(accelerator.device)
            held = str(next(reference_model.parameters()).dtype).replace("torch.", "")
            reference = ModelReference(reference_model, policy=model, chunk_size=cfg.logit_chunk_size,
                                       description=f"frozen copy of {cfg.ref_model or cfg.model} ({held})",
                                       compute_dtype=compute, ld_alpha=cfg.ld_alpha, syncs=cfg.sync_ref_model)
        else:
            reference = AdapterOffReference(model, chunk_size=cfg.logit_chunk_size, compute_dtype=compute,
                                            ld_alpha=cfg.ld_alpha)
        if cfg.precompute_ref:
            reference = precompute(cfg, reference, train_examples, eval_examples, collate, accelerator, precision)
            del reference_model
            reference_model = None
            gc.collect()
        if main:
            log.info("reference: %s", reference.description)

    # ---- batches, optimizer, schedule --------------------------------------------------------
    world = accelerator.num_processes
    global_batch = cfg.batch_size * world

    @functools.lru_cache(maxsize=2)
    def epoch_batches(epoch: int) -> list[list[int]]:
        """This epoch's global batches (each cut into per-rank slices of batch_size)."""
        if cfg.kind == "unpaired":
            return mixed_label_batches(train_examples, global_batch, cfg.seed, epoch)
        return batch_indices(train_examples, global_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                             length_grouped=cfg.length_grouped)

    micro_per_epoch = len(epoch_batches(0))
    memory_plan = plan_memory(cfg, model, train_examples, epoch_batches(0), packing, accelerator.device, compute,
                              state_bytes=training_state_bytes(model, reference_model))
    if memory_plan.every_n_layers:
        enable_checkpointing(model, memory_plan.every_n_layers)
    if main:
        log.info("gradient checkpointing %s: %s", "on" if memory_plan.every_n_layers else "off", memory_plan.why)
    checkpointing = memory_plan.checkpointing
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # "constant" is constant after the warmup (transformers' plain "constant" would skip the warmup)
    schedule = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # The log-prob forward as one module, so DDP/FSDP wrap the call that really runs (their
    # gradient sync and parameter gathering hook into its forward).
    model, optimizer = accelerator.prepare(LogProbModel(model, cfg.logit_chunk_size, memory_plan.head_cache_bytes,
                                                        compute_dtype=compute, with_log_sum_sq=cfg.use_weighting), optimizer)
    # FSDP replaces each parameter with a sharded one: clip (and checkpoint) what the prepared model holds.
    trainable = [p for p in model.parameters() if p.requires_grad]
    if isinstance(reference, AdapterOffReference):
        reference.forward = model  # through the wrapper, whose forward gathers FSDP shards

    step = 0
    sharded = accelerator.distributed_type == "FSDP"
    guard = StepGuard(cfg.max_bad_steps, initial_norm=weights_norm(trainable, sharded, accelerator.reduce))
    method_state: dict = {}  # what a method keeps across batches (BCO's running mean reward); checkpointed
    if run.resume_path:
        saved = resume(cfg, accelerator, model, optimizer, scheduler, run)
        step = int(saved["step"])
        guard.restore(saved, step)
        method_state.update({key: tuple(value) for key, value in (saved.get("method_state") or {}).items()})

    evaluator = partial(evaluate_examples, cfg=cfg, reference=reference, collate=collate, accelerator=accelerator,
                        state=method_state)
    eval_before = {}
    if eval_examples and step == 0:
        eval_before = evaluator(model, eval_examples)
        if main:
            metrics_log.write({"step": 0, **{f"eval/{k}": v for k, v in eval_before.items()}})

    # ---- the loop ------------------------------------------------------------------------------
    stop = StopOnSignal(first_step=step)  # Ctrl-C / SIGTERM: checkpoint after this step, then exit
    bar = progress_bar(total_steps, step, cfg.loss, enabled=main and cfg.progress)  # plain lines off a terminal
    model.train()
    window: dict[str, list[float]] = {}
    window_start, window_pairs, window_tokens = time.perf_counter(), 0, 0
    last_metrics: dict = {}
    micro = step * cfg.grad_accum  # micro-batches consumed so far (global position in the data order)
    while step < total_steps and not stop.requested(accelerator):
        step_rows: list[int] = []
        step_losses: list[float] = []  # this rank's micro-batch losses of this step
        for _ in range(cfg.grad_accum):
            epoch, pos = divmod(micro, micro_per_epoch)
            global_ids = epoch_batches(epoch)[pos]
            # Equal example counts per rank, balanced in tokens; weight = this rank's share, so that
            # DDP's gradient average is the mean over the whole global batch.
            ids = balanced_split(global_ids, lambda i: train_examples[i].num_tokens, world)[accelerator.process_index]
            weight = len(ids) * world / len(global_ids)
            if not ids:  # fewer examples than ranks: run a zero-weight batch so every collective runs
                ids, weight = global_ids[:1], 0.0
            step_rows.extend(ids)
            batch = collate([train_examples[i] for i in ids]).to(accelerator.device)
            loss, metrics = batch_objective(cfg, batch, model, reference,
                                            mean_across_processes=lambda t: accelerator.reduce(t, reduction="mean"),
                                            state=method_state, update_state=True)
            accelerator.backward(loss * weight / cfg.grad_accum)
            if weight > 0:  # a zero-weight stand-in batch is not logged
                for key, value in metrics.items():
                    window.setdefault(key, []).append(float(value))
                step_losses.append(float(metrics["loss"]))
            window_pairs += len(global_ids)  # the same count on every rank: no collective needed
            window_tokens += sum(train_examples[i].num_tokens for i in global_ids)
            micro += 1
        grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
        # Numerical guard (preftune.training.divergence): every rank takes the same decision (a collective on every rank).
        # A bad step changes neither the weights nor the optimizer moments; it still counts as a step.
        # fp16: a non-finite gradient is the loss scaler's overflow (it skips the step and lowers the scale).
        grad_bad = not math.isfinite(grad_norm) and precision != "fp16"
        bad_here = float(grad_bad or not all(math.isfinite(v) for v in step_losses))
        bad = float(accelerator.reduce(torch.tensor(bad_here, device=accelerator.device), reduction="sum")) > 0
        if bad:
            what = ("loss " + ", ".join(f"{v:g}" for v in step_losses) if not all(map(math.isfinite, step_losses))
                    else f"gradient norm {grad_norm:g}")
            log.warning("step %d: non-finite %s; update skipped (%d of --max-bad-steps %d in a row); rows: %s",
                        step + 1, what, guard.bad_streak + 1, cfg.max_bad_steps,
                        describe_rows(train_examples, step_rows))
            for values in window.values():  # keep this step's values out of the logged means
                del values[len(values) - len(step_losses):]
        else:
            optimizer.step()
        collapse = guard.after_step(step + 1, bad, grad_norm,
                                    None if bad else weights_norm(trainable, sharded, accelerator.reduce))
        if collapse:
            # Finish this step as the loop would. After skipped steps the weights are the last good step's:
            # checkpoint them (a state the run passed through); collapsed weights are not checkpointed.
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if bad:
                save_training_state(cfg, accelerator, model, optimizer, scheduler, step + 1, micro, run, guard,
                                    method_state)
            stop.restore()
            raise guard.diverged(collapse, cfg.output_dir, run.run_id, cfg.learning_rate)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:  # TR-DPO: the reference follows the policy
            reference.sync(accelerator.unwrap_model(model).model, cfg.ref_model_mixup_alpha)

        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "epoch": round(micro / micro_per_epoch, 4)}
            row.update(mean_across(accelerator, window, sorted(metrics)))
            row.update({"learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "pairs_per_second": window_pairs / elapsed, "tokens_per_second": window_tokens / elapsed})
            row.update(gpu_peak_memory(accelerator))
            last_metrics = row
            if main:
                metrics_log.write(row)
                postfix = {"loss": f"{row['loss']:.4f}"}
                if "rewards/accuracies" in row:
                    postfix["acc"] = f"{row['rewards/accuracies']:.2f}"
                bar.set_postfix(postfix)
            window, window_start, window_pairs, window_tokens = {}, time.perf_counter(), 0, 0
        if eval_examples and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
            result = evaluator(model, eval_examples)
            if main:
                metrics_log.write({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
        if cfg.save_steps and step % cfg.save_steps == 0:
            save_training_state(cfg, accelerator, model, optimizer, scheduler, step, micro, run, guard, method_state)
    bar.close()
    stop.requested(accelerator)  # a signal during the last step: checkpoint and exit non-zero, like any other
    stop.restore()
    if stop.stopping:  # the same decision on every rank (see StopOnSignal.requested)
        just_saved = cfg.save_steps and step > stop.first_step and step % cfg.save_steps == 0
        path = (ckpt.checkpoint_path(cfg.output_dir, step) if just_saved
                else save_training_state(cfg, accelerator, model, optimizer, scheduler, step, micro, run, guard,
                                         method_state))
        message = (f"interrupted at step {step} of {total_steps}; checkpoint saved to {path}. To continue, run the "
                   f"same command with --resume-from latest")
        if main:
            log.warning(message)
        raise TrainingInterrupted(message, path if main else None, step, 128 + stop.signum)

    guard.check_trained(step)  # every step skipped: fail, save nothing
    run.step = step
    save_final(cfg, accelerator, model, tokenizer, run)  # first: an interrupted final eval loses nothing
    eval_after = evaluator(model, eval_examples) if eval_examples else {}
    if eval_after and main:
        metrics_log.write({"step": step, **{f"eval/{k}": v for k, v in eval_after.items()}})
    if main:
        summary = {"steps": step, "train_data": train_report.summary(), "final": last_metrics,
                   "eval_before": eval_before, "eval_after": eval_after,
                   "reference": reference.description if reference is not None else "none", "packing": packing,
                   "processes": accelerator.num_processes, "distributed": str(accelerator.distributed_type),
                   "mixed_precision": precision, "gradient_checkpointing": checkpointing,
                   "run_id": run.run_id, "data_fingerprint": run.data_fingerprint,
                   **gpu_peak_memory(accelerator)}
        write_atomic(out / "summary.json", summary_json(summary))
        from preftune.training.model_card import write_model_card  # OUTPUT/README.md, a Hugging Face model card

        write_model_card(out, cfg, summary, num_examples=len(train_examples))
        metrics_log.close()
    return TrainResult(out, step, last_metrics, eval_before, eval_after)


# ------------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------------

def precompute(cfg, reference, train_examples, eval_examples, collate, accelerator,
               precision: str = "no") -> CachedReference:
    """Compute (or load) the reference log-prob table for train + eval examples."""
    everything = train_examples + eval_examples
    offset = len(train_examples)
    for i, ex in enumerate(eval_examples):  # eval rows follow the train rows in the table
        ex.index = offset + i
    key = cache_key(everything, reference.model, cfg.ref_dtype or cfg.dtype,
                    {"kind": cfg.kind, "reference": reference.description, "attn": cfg.attn_implementation or "sdpa",
                     "mixed_precision": precision, "ld_alpha": cfg.ld_alpha})
    cache_dir = Path(cfg.ref_cache_dir or Path(cfg.output_dir) / "ref_cache")
    path = cache_dir / f"ref-{key}.safetensors"
    table = load_cache(path, key)
    if table is None or table.shape[0] != len(everything):
        table = compute_reference_table(reference, everything, collate, cfg.batch_size, accelerator,
                                        progress=cfg.progress)
        if accelerator.is_main_process:
            save_cache(path, table, key)
        accelerator.wait_for_everyone()
    elif accelerator.is_main_process:
        log.info("reference log-probs loaded from %s", path)
    return CachedReference(table, path)


def _forget_other_precision(precision: str) -> None:
    """accelerate keeps one AcceleratorState per process; a second ``train`` in the same process (compare
    sweeps, tests) with another precision would be refused, so that state (not the process group) is reset."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def gpu_peak_memory(accelerator) -> dict[str, float]:
    """``{"gpu_peak_memory_gib": ...}``: this process's high-water mark since the start; ``{}`` off GPU."""
    if accelerator.device.type != "cuda":
        return {}
    return {"gpu_peak_memory_gib": torch.cuda.max_memory_allocated(accelerator.device) / 2 ** 30}


def mean_across(accelerator, window: dict[str, list[float]], keys: list[str]) -> dict[str, float]:
    """Window means of each metric, averaged across processes (NaN entries ignored).

    ``keys`` is the same list on every rank (a rank whose window is empty, e.g. after a
    zero-weight stand-in batch, still takes part in the reduction with NaNs).
    """
    local = torch.tensor([_nanmean(window.get(k, [])) for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        valid = (~torch.isnan(local)).to(torch.float64)
        total = accelerator.reduce(torch.nan_to_num(local), reduction="sum")
        count = accelerator.reduce(valid, reduction="sum")
        local = total / count.clamp(min=1)
    return {k: float(v) for k, v in zip(keys, local.tolist())}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def batch_objective(cfg, batch, model, reference, mean_across_processes=lambda t: t, state=None,
                    update_state=False):
    """The configured method's loss and metrics for one batch; ``model(batch)`` is its LogpOutput.
    The options passed are those the method table says the method reads (``cfg.method_options()``);
    ``state`` / ``update_state``: see :func:`preftune.methods.objective.compute_objective`.

    The reference runs first: its no-grad forward (body activations, head logits chunk) is freed
    before the policy builds its graph (activations, the kept softmax), instead of stacking on top
    of it, which lowers the step's peak memory (on the benchmark's CPU setting ~0.2 GB of ~1.8 GB).
    """
    ref_logps = reference.logps(batch) if reference is not None else None
    policy = model(batch)
    return compute_objective(
        cfg.method, policy, batch.num_groups, ref_logps=ref_logps, labels=batch.labels, margins=batch.margins,
        # LD-DPO counts tokens per sequence; WPO weights pairs by their tokens' aligned probabilities
        token_seq=batch.token_seq if cfg.ld_alpha is not None or cfg.use_weighting else None,
        token_log_sum_sq=policy.token_log_sum_sq,
        state=state, update_state=update_state, mean_across_processes=mean_across_processes, **cfg.method_options())


@torch.no_grad()
def evaluate_examples(model, examples, cfg, reference, collate, accelerator, state=None) -> dict[str, float]:
    """Held-out metrics with the training objective (no grad), averaged over all examples."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    world, rank = accelerator.num_processes, accelerator.process_index
    forward = accelerator.unwrap_model(model)
    num_batches = math.ceil(len(examples) / (cfg.batch_size * world))
    for b in range(num_batches):  # the same count on every rank: sharded forwards are collectives
        start = (b * world + rank) * cfg.batch_size
        chunk = examples[start:start + cfg.batch_size]
        # A rank that has run out runs a throw-away batch (weight 0): it keeps the ranks in step and
        # gives this rank the method's metric names, so every rank reduces the same keys below.
        batch = collate(chunk or examples[:1]).to(accelerator.device)
        _, metrics = batch_objective(cfg, batch, forward, reference, state=state)
        for key, value in metrics.items():
            value = float(value)
            sums.setdefault(key, 0.0)
            counts.setdefault(key, 0.0)
            if chunk and not math.isnan(value):
                sums[key] += value * len(chunk)
                counts[key] += len(chunk)
    model.train(was_training)
    keys = sorted(sums)
    local = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0.0)] for k in keys], dtype=torch.float64,
                         device=accelerator.device)
    if world > 1:
        local = accelerator.reduce(local, reduction="sum")
    return {k: float(s / c) for k, (s, c) in zip(keys, local.tolist()) if c > 0}


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the current step, write a checkpoint and
    raise :class:`TrainingInterrupted` (exit code 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).

    Sending it again later aborts at once (``KeyboardInterrupt``, no checkpoint); a repeat within
    ``REPEAT_WINDOW_S`` counts as the same request (a terminal signals the whole process group and
    launchers such as torchrun forward it again). Installed on every rank; :meth:`requested` takes
    the decision together (a gather every step), so all ranks leave the loop after the same step.
    Holds no model: if ``train`` has left by an exception when a signal arrives, the previous
    handlers are put back and the signal is delivered to them. A signal the process ignores
    (``SIG_IGN``: started by ``nohup``, or as a background job of a non-interactive shell, which
    ignores SIGINT) is left ignored.
    """

    SIGNALS = ("SIGINT", "SIGTERM")
    REPEAT_WINDOW_S = 1.0

    def __init__(self, first_step: int):
        self.first_step = first_step  # the step the loop started from (0, or the resumed step)
        self.received, self.received_at = 0, 0.0  # the first signal this process got, and when
        self.signum = 0  # the decided signal (the largest received on any rank)
        self.stopping = False  # the last decision of requested(): the same on every rank
        self._code = sys._getframe(1).f_code  # train()'s code: the handler is live while it runs
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                # an ignored signal stays ignored: nohup, a background job of a script, a launcher that
                # shields its workers from the terminal's Ctrl-C asked for exactly that
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        while frame is not None and frame.f_code is not self._code:
            frame = frame.f_back
        if self.received and frame is not None and time.monotonic() - self.received_at < self.REPEAT_WINDOW_S:
            return  # the same request, delivered twice
        if frame is None or self.received:  # train() has gone, or asked again: as if we were never here
            self.restore()
            signal.raise_signal(signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        log.warning("%s: stopping after this step and writing a checkpoint (send it again to abort at once)",
                    signal.Signals(signum).name)

    def requested(self, accelerator) -> bool:
        """Whether any rank was asked to stop (a collective with several processes)."""
        signum = self.received
        if accelerator.num_processes > 1:
            signum = int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max())
        self.signum, self.stopping = signum, signum > 0
        return self.stopping

    def restore(self) -> None:
        self.put_back(self._previous)
        self._previous = {}

    @classmethod
    def handlers(cls) -> dict:
        """The current handlers of :attr:`SIGNALS` (empty off the main thread, where they can't be set)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {getattr(signal, name): signal.getsignal(getattr(signal, name)) for name in cls.SIGNALS
                if hasattr(signal, name)}

    @staticmethod
    def put_back(handlers: dict) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def describe_rows(examples, ids: list[int], limit: int = 10) -> str:
    """Where the rows ``ids`` came from, for a log line: ``pairs.jsonl:3, pairs.jsonl:17 (+6 more)``."""
    names = ", ".join(str(examples[i].location or f"example {i}") for i in ids[:limit])
    return names + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")
