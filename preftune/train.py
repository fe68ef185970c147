"""The one training loop, on ``accelerate``: every method, one path.

Read top to bottom: set up (data, model, reference, batches, optimizer) -> for each
optimizer step: micro-batches -> log-probs -> objective -> backward -> clip -> step ->
log / evaluate / checkpoint -> save the final model.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import load_dataset
from .data.collate import batch_indices, collate_packed, collate_padded
from .logprobs import batch_logps, supports_packing
from .losses import kto_weight_warning
from .modeling import add_lora, load_model, load_tokenizer
from .objective import compute_objective
from .reference import (AdapterOffReference, CachedReference, ModelReference, cache_key,
                        compute_reference_table, load_cache, save_cache)

log = logging.getLogger("preftune")


class TrainingDiverged(ValueError):
    """Too many consecutive non-finite steps; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict = field(default_factory=dict)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)


def attach_kl_partners(examples, seed: int) -> None:
    """KTO: give each example a mismatched completion (another example's) for the KL point.

    Fixed per dataset (seeded derangement), so it can be cached like any completion.
    Completion 0 stays the example's own; completion 1 is the partner's.
    """
    n = len(examples)
    if n < 2:
        raise ValueError("KTO needs at least 2 examples to estimate its KL reference point")
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randperm(n, generator=gen)
    for pos, idx in enumerate(shift.tolist()):
        partner = shift[(pos + 1) % n].item()
        examples[idx].completions = [examples[idx].completions[0], examples[partner].completions[0]]


def make_collate(cfg: TrainConfig, pad_id: int, packing: bool):
    if packing:
        return partial(collate_packed, pad_id=pad_id, pack_tokens=cfg.pack_tokens or 2 * cfg.max_length,
                       train_on_prompt=cfg.train_on_prompt)
    return partial(collate_padded, pad_id=pad_id, train_on_prompt=cfg.train_on_prompt)


def read_examples(cfg: TrainConfig, tokenizer, source: str, main: bool):
    """Tokenized examples of ``source`` for this method, with the report logged on rank 0."""
    examples, report = load_dataset(source, tokenizer, kind=cfg.kind, max_length=cfg.max_length,
                                    max_prompt_length=cfg.max_prompt_length,
                                    skip_bad_records=cfg.skip_bad_records, limit=cfg.max_examples)
    if main:
        log.info("%s: %s", source, report.summary())
    if not examples:
        raise ValueError(f"{source}: no usable examples ({report.summary()})")
    if cfg.loss == "kto":
        attach_kl_partners(examples, cfg.seed)
    return examples, report


def train(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg.validate()
    accelerator = Accelerator(gradient_accumulation_steps=1)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")

    # ---- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, train_report = read_examples(cfg, tokenizer, cfg.data, main)
    eval_examples = read_examples(cfg, tokenizer, cfg.eval_data, main)[0] if cfg.eval_data else []
    if cfg.loss == "kto" and main:
        n_pos = sum(1 for e in train_examples if e.label)
        warning = kto_weight_warning(n_pos, len(train_examples) - n_pos, cfg.desirable_weight, cfg.undesirable_weight)
        if warning:
            log.warning(warning)

    # ---- model and reference --------------------------------------------------------------
    model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code, cfg.load_in_4bit)
    reference_model = None
    if cfg.needs_reference and (cfg.ref_model or not cfg.lora_r):
        # Default reference: the policy's starting weights, as a separate frozen copy.
        reference_model = (load_model(cfg.ref_model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
                           if cfg.ref_model else copy.deepcopy(model))
    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.to(accelerator.device)

    packing = cfg.packing
    if packing:
        ok, reason = supports_packing(model)
        if not ok:
            log.warning("packing off: %s; using padded batches", reason)
            packing = False
    collate = make_collate(cfg, tokenizer.pad_token_id, packing)

    reference = None
    if cfg.needs_reference:
        if reference_model is not None:
            reference_model.to(accelerator.device)
            reference = ModelReference(reference_model, policy=model, chunk_size=cfg.logit_chunk_size,
                                       description=f"frozen copy of {cfg.ref_model or cfg.model}")
        else:
            reference = AdapterOffReference(model, chunk_size=cfg.logit_chunk_size)
        if cfg.precompute_ref:
            reference = precompute(cfg, reference, train_examples, eval_examples, collate, accelerator)
            del reference_model
            reference_model = None
            gc.collect()
        if main:
            log.info("reference: %s", reference.description)

    # ---- batches, optimizer, schedule --------------------------------------------------------
    world = accelerator.num_processes
    global_batch = cfg.batch_size * world

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This epoch's global batches (each cut into per-rank slices of batch_size)."""
        return batch_indices(train_examples, global_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                             length_grouped=cfg.length_grouped and cfg.loss != "kto")

    micro_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    if cfg.resume_from:
        step = resume(cfg, accelerator, model, optimizer, scheduler)

    evaluator = partial(evaluate_examples, cfg=cfg, reference=reference, collate=collate, accelerator=accelerator)
    eval_before = {}
    if eval_examples and step == 0:
        eval_before = evaluator(model, eval_examples)
        if main:
            write_metrics(out, {"step": 0, **{f"eval/{k}": v for k, v in eval_before.items()}})

    # ---- the loop ------------------------------------------------------------------------------
    stop = {"now": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True)) if main else None
    bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.loss}", unit="step", disable=not (main and cfg.progress))
    model.train()
    window: dict[str, list[float]] = {}
    window_start, window_pairs, window_tokens = time.perf_counter(), 0, 0
    last_metrics: dict = {}
    micro = step * cfg.grad_accum  # micro-batches consumed so far (global position in the data order)
    bad_streak = 0
    while step < total_steps and not stop["now"]:
        step_rows: list[int] = []
        for _ in range(cfg.grad_accum):
            epoch, pos = divmod(micro, micro_per_epoch)
            global_ids = epoch_batches(epoch)[pos]
            ids = global_ids[accelerator.process_index * cfg.batch_size:(accelerator.process_index + 1) * cfg.batch_size]
            step_rows.extend(ids)
            batch = collate([train_examples[i] for i in ids]).to(accelerator.device)
            policy = batch_logps(model, batch, chunk_size=cfg.logit_chunk_size)
            ref_logps = reference.logps(batch) if reference is not None else None
            loss, metrics = compute_objective(
                cfg.loss, policy, batch.num_groups, ref_logps=ref_logps, labels=batch.labels, beta=cfg.beta,
                label_smoothing=cfg.label_smoothing, orpo_lambda=cfg.orpo_lambda, simpo_gamma=cfg.simpo_gamma,
                sft_weight=cfg.sft_weight, desirable_weight=cfg.desirable_weight,
                undesirable_weight=cfg.undesirable_weight,
                mean_across_processes=lambda t: accelerator.reduce(t, reduction="mean"))
            accelerator.backward(loss / cfg.grad_accum)
            for key, value in metrics.items():
                window.setdefault(key, []).append(float(value))
            window_pairs += batch.num_groups * world
            window_tokens += batch.num_tokens * world
            micro += 1
        grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
        # Numerical guard: every rank takes the same decision (a collective on every rank).
        step_losses = window["loss"][-cfg.grad_accum:]
        bad_here = float(not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in step_losses))
        bad = float(accelerator.reduce(torch.tensor(bad_here, device=accelerator.device), reduction="sum")) > 0
        if bad:
            bad_streak += 1
            rows = ", ".join(str(train_examples[i].location or f"example {i}") for i in step_rows[:8])
            log.warning("step %d: non-finite loss or gradient; update skipped (rows: %s)", step + 1, rows)
            for values in window.values():  # keep this step's values out of the logged means
                del values[-cfg.grad_accum:]
            if bad_streak >= cfg.max_bad_steps:
                last = ckpt.list_checkpoints(cfg.output_dir)
                where = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written (--save-steps)"
                raise TrainingDiverged(f"{bad_streak} consecutive steps with a non-finite loss or gradient at step "
                                       f"{step + 1}; stopping ({where}). Try a lower --learning-rate or "
                                       f"--dtype float32.")
        else:
            bad_streak = 0
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "epoch": round(micro / micro_per_epoch, 4)}
            row.update(mean_across(accelerator, window))
            row.update({"learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "pairs_per_second": window_pairs / elapsed, "tokens_per_second": window_tokens / elapsed})
            last_metrics = row
            if main:
                write_metrics(out, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}",
                                acc=f"{row.get('rewards/accuracies', float('nan')):.2f}")
            window, window_start, window_pairs, window_tokens = {}, time.perf_counter(), 0, 0
        if eval_examples and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
            result = evaluator(model, eval_examples)
            if main:
                write_metrics(out, {"step": step, **{f"eval/{k}": v for k, v in result.items()}})
        if cfg.save_steps and step % cfg.save_steps == 0:
            save_training_state(cfg, accelerator, model, optimizer, scheduler, step, micro)
    bar.close()
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
    if stop["now"]:
        path = save_training_state(cfg, accelerator, model, optimizer, scheduler, step, micro)
        log.warning("interrupted at step %d; checkpoint saved to %s (resume with --resume-from latest)", step, path)
        return TrainResult(out, step, last_metrics)

    eval_after = evaluator(model, eval_examples) if eval_examples else {}
    if eval_after and main:
        write_metrics(out, {"step": step, **{f"eval/{k}": v for k, v in eval_after.items()}})
    save_final(cfg, accelerator, model, tokenizer, out)
    if main:
        summary = {"steps": step, "train_data": train_report.summary(), "final": last_metrics,
                   "eval_before": eval_before, "eval_after": eval_after,
                   "reference": reference.description if reference is not None else "none", "packing": packing}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return TrainResult(out, step, last_metrics, eval_before, eval_after)


# ------------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------------

def precompute(cfg, reference, train_examples, eval_examples, collate, accelerator) -> CachedReference:
    """Compute (or load) the reference log-prob table for train + eval examples."""
    everything = train_examples + eval_examples
    offset = len(train_examples)
    for i, ex in enumerate(eval_examples):  # eval rows follow the train rows in the table
        ex.index = offset + i
    key = cache_key(everything, reference.model, cfg.dtype, {"loss_kind": cfg.kind, "packing_free": True})
    cache_dir = Path(cfg.ref_cache_dir or Path(cfg.output_dir) / "ref_cache")
    path = cache_dir / f"ref-{key}.safetensors"
    table = load_cache(path, key)
    if table is None or table.shape[0] != len(everything):
        table = compute_reference_table(reference.model, everything, collate, cfg.batch_size, accelerator,
                                        chunk_size=cfg.logit_chunk_size, progress=cfg.progress)
        if accelerator.is_main_process:
            save_cache(path, table, key)
        accelerator.wait_for_everyone()
    elif accelerator.is_main_process:
        log.info("reference log-probs loaded from %s", path)
    return CachedReference(table, path)


def mean_across(accelerator, window: dict[str, list[float]]) -> dict[str, float]:
    """Window means of each metric, averaged across processes (NaN entries ignored)."""
    keys = sorted(window)
    local = torch.tensor([_nanmean(window[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        valid = (~torch.isnan(local)).to(torch.float64)
        total = accelerator.reduce(torch.nan_to_num(local), reduction="sum")
        count = accelerator.reduce(valid, reduction="sum")
        local = total / count.clamp(min=1)
    return {k: float(v) for k, v in zip(keys, local.tolist())}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@torch.no_grad()
def evaluate_examples(model, examples, cfg, reference, collate, accelerator) -> dict[str, float]:
    """Held-out metrics with the training objective (no grad), averaged over all examples."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    world, rank = accelerator.num_processes, accelerator.process_index
    for start in range(rank * cfg.batch_size, len(examples), cfg.batch_size * world):
        chunk = examples[start:start + cfg.batch_size]
        batch = collate(chunk).to(accelerator.device)
        policy = batch_logps(model, batch, chunk_size=cfg.logit_chunk_size)
        ref_logps = reference.logps(batch) if reference is not None else None
        _, metrics = compute_objective(
            cfg.loss, policy, batch.num_groups, ref_logps=ref_logps, labels=batch.labels, beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, orpo_lambda=cfg.orpo_lambda, simpo_gamma=cfg.simpo_gamma,
            sft_weight=cfg.sft_weight, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        for key, value in metrics.items():
            value = float(value)
            if not math.isnan(value):
                sums[key] = sums.get(key, 0.0) + value * len(chunk)
                counts[key] = counts.get(key, 0.0) + len(chunk)
    model.train(was_training)
    keys = sorted(set(sums) | set(_all_keys(cfg)))
    local = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0.0)] for k in keys], dtype=torch.float64,
                         device=accelerator.device)
    if world > 1:
        local = accelerator.reduce(local, reduction="sum")
    return {k: float(s / c) for k, (s, c) in zip(keys, local.tolist()) if c > 0}


def _all_keys(cfg) -> list[str]:
    # Every rank must reduce the same keys in the same order, even with no eval rows of its own.
    if cfg.loss == "sft":
        return ["loss", "nll"]
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    if cfg.loss == "kto":
        return keys + ["kl"]
    keys += ["rewards/accuracies", "nll"]
    if cfg.loss == "orpo":
        keys += ["nll_loss", "log_odds_ratio", "log_odds_chosen"]
    return keys


def trainable_state(accelerator, model) -> dict[str, torch.Tensor]:
    """Weights that training changes: adapters only with LoRA, else the full state dict."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)
    if hasattr(unwrapped, "peft_config"):
        names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def save_training_state(cfg, accelerator, model, optimizer, scheduler, step: int, micro: int) -> Path | None:
    state = trainable_state(accelerator, model)
    path = None
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(cfg.output_dir, step, state, optimizer, scheduler,
                                    {"step": step, "micro": micro, "config": cfg.to_dict()}, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return path


def resume(cfg, accelerator, model, optimizer, scheduler) -> int:
    path = ckpt.resolve_resume(cfg.resume_from, cfg.output_dir)
    loaded = ckpt.load_checkpoint(path)
    diffs = ckpt.config_differences(loaded["state"]["config"], cfg.to_dict())
    if diffs:
        raise ValueError(f"checkpoint {path} was written by another configuration: " + "; ".join(diffs))
    unwrapped = accelerator.unwrap_model(model)
    missing = unwrapped.load_state_dict(loaded["model"], strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"checkpoint {path} has unexpected weights, e.g. {missing.unexpected_keys[0]}")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    ckpt.set_rng_state(loaded["rng"])
    if accelerator.is_main_process:
        log.info("resumed from %s at step %d", path, loaded["state"]["step"])
    return int(loaded["state"]["step"])


def save_final(cfg, accelerator, model, tokenizer, out: Path) -> None:
    """The final model + tokenizer in Hugging Face format (merged or adapter folder with LoRA)."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if cfg.lora_r and cfg.merge_lora:
        unwrapped = unwrapped.merge_and_unload()
    state = accelerator.get_state_dict(model) if not (cfg.lora_r and cfg.merge_lora) else unwrapped.state_dict()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()


def write_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
