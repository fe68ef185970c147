"""Everything a run needs before its first step, built in order by :func:`build_run`.

precision and accelerate -> data -> model and the reference's weights -> packing and the collate
function -> the reference -> batches and the memory plan -> optimizer, schedule and the prepared
model -> the numerical guard and resume. Each piece is one short function; the order is the
order of the random draws (seed, LoRA init, dropout), so a resumed run is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from preftune.config.train_config import TrainConfig
from preftune.data.load import read_examples
from preftune.data.order import batch_indices, mixed_label_batches
from preftune.methods.losses.unpaired import kto_weight_warning
from preftune.model.loading import add_lora, check_vocab, load_model, load_tokenizer
from preftune.model.logprobs import LogProbModel
from preftune.model.memory_policy import enable_checkpointing, plan_memory, training_state_bytes
from preftune.model.packing import make_collate, model_row_cost, packing_decision
from preftune.model.precision import check_trainable_dtype, compute_dtype, resolve_dtype, resolve_mixed_precision
from preftune.training.divergence import StepGuard, weights_norm
from preftune.training.metrics_log import MetricsLog
from preftune.training.reference import (
    AdapterOffReference,
    CachedReference,
    ModelReference,
    SharedReference,
    cache_key,
    compute_reference_table,
    examples_fingerprint,
    load_cache,
    save_cache,
    weights_fingerprint,
)
from preftune.training.resume import resume
from preftune.training.run_folder import RunFolder
from preftune.training.step import evaluate_examples
from preftune.training.trackers import with_trackers

log = logging.getLogger("preftune")


@dataclass
class Run:
    """What :func:`build_run` made: the pieces the loop, its steps and the finish use.

    ``model`` is the prepared :class:`LogProbModel` (DDP/FSDP-wrapped where distributed);
    ``trainable`` its trained parameters as the optimizer and the clipping see them;
    ``epoch_batches(epoch)`` the epoch's global batches of example indices; ``start_step`` 0, or
    the resumed checkpoint's step; ``evaluate(model, examples)`` the held-out metrics.
    """

    folder: RunFolder
    accelerator: object
    precision: str  # "no" / "bf16" / "fp16"
    metrics_log: MetricsLog | None  # the main process's; None on other ranks
    tokenizer: object
    train_examples: list
    train_report: object
    eval_examples: list
    model: torch.nn.Module
    reference: object | None
    collate: Callable
    packing: bool
    checkpointing: str
    epoch_batches: Callable[[int], list[list[int]]]
    micro_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list
    sharded: bool
    guard: StepGuard
    method_state: dict = field(default_factory=dict)  # what a method keeps across batches (BCO's mean reward)
    start_step: int = 0
    evaluate: Callable | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def build_run(cfg: TrainConfig, folder: RunFolder) -> Run:
    """Build every piece of the run ``cfg`` describes into the claimed ``folder``, in the order
    the module docstring gives; with ``folder.resume_path``, restore its checkpoint last."""
    accelerator, precision, precision_why = start_accelerator(cfg)
    metrics_log = open_metrics_log(cfg) if accelerator.is_main_process else None
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    train_examples, train_report, eval_examples = read_data(cfg, tokenizer, folder, accelerator.is_main_process)
    model, reference_model = load_models(cfg, tokenizer, train_examples + eval_examples)
    log_precision(accelerator, model, precision, precision_why)
    model.to(accelerator.device)
    packing = decide_packing(cfg, model, reference_model)
    collate = make_collate(tokenizer.pad_token_id, packing, cfg.pack_tokens, cfg.train_on_prompt, model_row_cost(model))
    reference, eval_reference, reference_model = make_reference(cfg, model, reference_model, train_examples,
                                                                eval_examples, collate, accelerator, precision)
    if reference_model is None and cfg.needs_reference and cfg.precompute_ref:
        gc.collect()  # the frozen copy is gone: the table replaces it
    epoch_batches = make_epoch_batches(cfg, train_examples, cfg.batch_size * accelerator.num_processes)
    plan = plan_checkpointing(cfg, model, reference_model, train_examples, epoch_batches(0), packing, accelerator,
                              precision)
    micro_per_epoch = len(epoch_batches(0))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * max(1, micro_per_epoch // cfg.grad_accum)))
    model, optimizer, scheduler, trainable = prepare_training(cfg, model, accelerator, total_steps, precision, plan)
    live = reference.live if isinstance(reference, SharedReference) else reference
    if isinstance(live, AdapterOffReference):
        live.forward = model  # through the wrapper, whose forward gathers FSDP shards (eval_reference shares it)
    sharded = accelerator.distributed_type == "FSDP"
    run = Run(folder, accelerator, precision, metrics_log, tokenizer, train_examples, train_report, eval_examples,
              model, reference, collate, packing, plan.checkpointing, epoch_batches, micro_per_epoch,
              total_steps, optimizer, scheduler, trainable, sharded,
              guard=StepGuard(cfg.max_bad_steps, initial_norm=weights_norm(trainable, sharded, accelerator.reduce)))
    if folder.resume_path:
        restore_checkpoint(cfg, run)
    run.evaluate = partial(evaluate_examples, cfg=cfg, reference=eval_reference, collate=collate,
                           accelerator=accelerator, state=run.method_state)
    return run


def start_accelerator(cfg: TrainConfig):
    """The run's ``Accelerator``, its mixed precision (``"no"`` / ``"bf16"`` / ``"fp16"``) and why; seed set."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    precision, why = resolve_mixed_precision(cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    # cpu=True where there is no GPU: under torchrun, accelerate then runs gloo DDP over CPU processes.
    # mixed_precision: accelerate's loss scaler for fp16, FSDP's param dtype; our forwards autocast themselves.
    _forget_other_precision(precision)
    accelerator = Accelerator(gradient_accumulation_steps=1, cpu=not torch.cuda.is_available(),
                              mixed_precision=precision)
    set_seed(cfg.seed)
    return accelerator, precision, why


def open_metrics_log(cfg: TrainConfig):
    """``OUTPUT/metrics.jsonl`` with the ``--report-to`` trackers (main process only). claim_output_dir
    made the folder; the folder's set_data writes config.yaml and run.json."""
    out = Path(cfg.output_dir)
    metrics_log = with_trackers(MetricsLog(out), cfg, out)  # --report-to: the rows also go to each tracker
    if not cfg.max_grad_norm:  # 0 or none: no clipping, as in HF Trainer; said, not silent
        log.info("gradient clipping off (--max-grad-norm %s)", cfg.max_grad_norm)
    return metrics_log


def read_data(cfg: TrainConfig, tokenizer, folder: RunFolder, main: bool):
    """Training examples, their read report, and the held-out examples (``[]`` without ``--eval-data``).
    The training data's fingerprint goes to ``folder`` (a resumed checkpoint must have seen this data)."""
    reading = dict(kind=cfg.kind, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   skip_bad_records=cfg.skip_bad_records, limit=cfg.max_examples, kl_partners=cfg.method.kl_partners,
                   seed=cfg.seed)
    train_examples, train_report = read_examples(tokenizer, cfg.data, main, **reading)
    fingerprint = examples_fingerprint(train_examples)
    folder.set_data(fingerprint, cfg.data)
    refuse_pair_only_options(cfg, train_examples, cfg.data)
    eval_examples = read_examples(tokenizer, cfg.eval_data, main, **reading)[0] if cfg.eval_data else []
    refuse_pair_only_options(cfg, eval_examples, cfg.eval_data)
    if eval_examples and main:
        same = same_data(cfg.data, cfg.eval_data, fingerprint, examples_fingerprint(eval_examples))
        if same:
            log.warning("--eval-data %s is the training data (%s): the held-out metrics are measured on training "
                        "data, so they show how well the model fits it, not how it does on new pairs", cfg.eval_data,
                        same)
    if "desirable_weight" in cfg.method.fields and main:  # class balance of thumbs-up/down data
        n_pos = sum(1 for e in train_examples if e.label)
        warning = kto_weight_warning(n_pos, len(train_examples) - n_pos, cfg.desirable_weight, cfg.undesirable_weight)
        if warning:
            log.warning(warning)
    return train_examples, train_report, eval_examples


def refuse_pair_only_options(cfg: TrainConfig, examples, source: str | None) -> None:
    """ValueError when ``examples`` (read from ``source``) hold response groups and an option that only
    pairs have meaning for is on: LD-DPO's ``--ld-alpha`` (a pair's shared length and the longer
    completion's excess) and WPO's ``--use-weighting`` (one weight per pair record). Refused once the data
    is read, before the models load, instead of at the first step."""
    options = [(cfg.ld_alpha is not None, "--ld-alpha (LD-DPO) splits each pair's log-probs at the shorter "
                "completion's length"),
               (cfg.use_weighting, "--use-weighting (WPO) weights each pair record by its two completions")]
    chosen = [why for on, why in options if on]
    groups = sum(1 for example in examples if example.scores is not None)
    if chosen and groups:
        raise ValueError(f"{chosen[0]}; {source} holds {groups} response groups (k responses to one prompt), "
                         f"which have no such pair: drop the option, or train on pair records")


def same_data(data: str, eval_data: str, train_fingerprint: str, eval_fingerprint: str) -> str | None:
    """How ``eval_data`` is ``data`` -- ``"the same file"`` (one file under two names), ``"the same
    content as --data"`` (the same examples once read) -- or None when they differ."""
    try:
        if Path(data).exists() and Path(eval_data).exists() and Path(data).samefile(eval_data):
            return "the same file"
    except OSError:
        pass
    return "the same content as --data" if train_fingerprint == eval_fingerprint else None


def load_models(cfg: TrainConfig, tokenizer, examples):
    """The policy (LoRA adapters added when asked) and the reference's own weights: a frozen copy of
    the starting policy, ``--ref-model``, or None (no reference, or LoRA's adapters-off reference)."""
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
    check_vocab(tokenizer, model, examples)
    return model, reference_model


def log_precision(accelerator, model, precision: str, why: str) -> None:
    if accelerator.is_main_process:
        log.info("precision: %s (%s); trained weights and AdamW state %s; log-softmax and losses float32",
                 {"no": "no mixed precision", "bf16": "bf16 compute (autocast)",
                  "fp16": "fp16 compute (autocast) with loss scaling"}[precision], why,
                 ", ".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()
                                   if p.requires_grad})))


def decide_packing(cfg: TrainConfig, model, reference_model=None) -> bool:
    """``--packing``, unless the model or the reference model cannot take packed rows (said in the log)."""
    if not cfg.packing:
        return False
    ok, reason = packing_decision(model, reference_model)  # every model the packed batches reach
    if ok:
        log.info("packing on: %s", reason)
    else:
        log.warning("packing off: %s; using padded batches", reason)
    return ok


def make_reference(cfg: TrainConfig, model, reference_model, train_examples, eval_examples, collate, accelerator,
                   precision: str):
    """The reference the method compares against on the training batches (None when it needs none), the
    one for the held-out passes (the same, except with ``--share-ref-cache``: a table per data file), and the
    reference's weights still held (None after ``--precompute-ref``: the table replaces them)."""
    if not cfg.needs_reference:
        return None, None, reference_model
    compute = compute_dtype(precision)
    if reference_model is not None:
        reference_model.to(accelerator.device)
        held = str(next(reference_model.parameters()).dtype).replace("torch.", "")
        reference = ModelReference(reference_model, policy=model, chunk_size=cfg.logit_chunk_size,
                                   description=f"frozen copy of {cfg.ref_model or cfg.model} ({held})",
                                   compute_dtype=compute, ld_alpha=cfg.ld_alpha, syncs=cfg.sync_ref_model)
    else:
        reference = AdapterOffReference(model, chunk_size=cfg.logit_chunk_size, compute_dtype=compute,
                                        ld_alpha=cfg.ld_alpha)
    eval_reference = None
    if cfg.precompute_ref:
        reference = precompute(cfg, reference, train_examples, eval_examples, collate, accelerator, precision)
        reference_model = None
    elif cfg.share_ref_cache:
        reference, eval_reference = share(cfg, reference, train_examples, eval_examples, collate, accelerator,
                                          precision)
    if accelerator.is_main_process:
        log.info("reference: %s", reference.description)
    return reference, eval_reference or reference, reference_model


def make_epoch_batches(cfg: TrainConfig, train_examples, global_batch: int) -> Callable[[int], list[list[int]]]:
    """``epoch_batches(epoch)``: that epoch's global batches of example indices (each cut into per-rank
    slices of batch_size by the step), the last two epochs' kept."""

    @functools.lru_cache(maxsize=2)
    def epoch_batches(epoch: int) -> list[list[int]]:
        if cfg.kind == "unpaired":
            return mixed_label_batches(train_examples, global_batch, cfg.seed, epoch)
        return batch_indices(train_examples, global_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                             length_grouped=cfg.length_grouped)

    return epoch_batches


def plan_checkpointing(cfg: TrainConfig, model, reference_model, train_examples, first_batches, packing: bool,
                       accelerator, precision: str):
    """The memory plan (:func:`preftune.model.memory_policy.plan_memory`), gradient checkpointing
    switched on in ``model`` when it says so."""
    plan = plan_memory(cfg, model, train_examples, first_batches, packing, accelerator.device,
                       compute_dtype(precision), state_bytes=training_state_bytes(model, reference_model))
    if plan.every_n_layers:
        enable_checkpointing(model, plan.every_n_layers)
    if accelerator.is_main_process:
        log.info("gradient checkpointing %s: %s", "on" if plan.every_n_layers else "off", plan.why)
    return plan


def prepare_training(cfg: TrainConfig, model, accelerator, total_steps: int, precision: str, plan):
    """AdamW, the learning-rate schedule and the log-prob forward as one prepared module ->
    ``(prepared model, optimizer, scheduler, trainable parameters of the prepared model)``."""
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # On CPU torch's default AdamW is its per-parameter loop (six passes over each tensor); the fused
    # kernel is one pass, ~1.8x faster on a 135M model (the same update up to float rounding).
    fused = accelerator.device.type == "cpu" and precision != "fp16"
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused or None)
    # "constant" is constant after the warmup (transformers' plain "constant" would skip the warmup)
    schedule = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # The log-prob forward as one module, so DDP/FSDP wrap the call that really runs (their
    # gradient sync and parameter gathering hook into its forward).
    model, optimizer = accelerator.prepare(LogProbModel(model, cfg.logit_chunk_size, plan.head_cache_bytes,
                                                        compute_dtype=compute_dtype(precision),
                                                        with_log_sum_sq=cfg.use_weighting), optimizer)
    # FSDP replaces each parameter with a sharded one: clip (and checkpoint) what the prepared model holds.
    return model, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad]


def restore_checkpoint(cfg: TrainConfig, run: Run) -> None:
    """Resume ``run.folder.resume_path``: weights, optimizer, schedule, RNG, the guard's counters and
    the method's state; ``run.start_step`` becomes the checkpoint's step."""
    saved = resume(cfg, run.accelerator, run.model, run.optimizer, run.scheduler, run.folder)
    run.start_step = int(saved["step"])
    run.guard.restore(saved, run.start_step)
    run.method_state.update({key: tuple(value) for key, value in (saved.get("method_state") or {}).items()})


def precompute(cfg, reference, train_examples, eval_examples, collate, accelerator,
               precision: str = "no") -> CachedReference:
    """Compute (or load) the reference log-prob table for train + eval examples."""
    everything = train_examples + eval_examples
    offset = len(train_examples)
    for i, ex in enumerate(eval_examples):  # eval rows follow the train rows in the table
        ex.index = offset + i
    key = cache_key(everything, reference.model, cfg.ref_dtype or cfg.dtype, key_settings(cfg, reference, precision))
    path = reference_cache_dir(cfg) / f"ref-{key}.safetensors"
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


def share(cfg, reference, train_examples, eval_examples, collate, accelerator, precision: str = "no"):
    """``--share-ref-cache``: ``reference`` behind lazily filled tables shared by every run on the same examples
    and reference (:class:`SharedReference`, ``ref_cache_dir/shared-KEY.safetensors``), one for the training
    examples and one for the held-out ones (a run without or with other held-out data still shares the
    training rows) -> (training reference, held-out reference or None). Under several processes the live
    ``reference`` for both (each rank's batches hold other rows), said once."""
    if accelerator.num_processes > 1:
        if accelerator.is_main_process:
            log.warning("--share-ref-cache: off under %d processes (each rank computes its own batches' rows); "
                        "reference log-probs are computed live", accelerator.num_processes)
        return reference, None
    settings = key_settings(cfg, reference, precision)
    weights = weights_fingerprint(reference.model)
    tables = []
    for examples in (train_examples, eval_examples):
        if not examples:
            tables.append(None)
            continue
        key = cache_key(examples, reference.model, cfg.ref_dtype or cfg.dtype, settings, weights=weights)
        tables.append(SharedReference(reference, examples, collate,
                                      reference_cache_dir(cfg) / f"shared-{key}.safetensors", key))
        log.info("reference log-probs: %d of %d rows already in the shared cache %s; the rest are computed "
                 "when a batch first needs them", int(tables[-1].known.sum()), len(examples), tables[-1].path)
    return tables[0], tables[1]


def key_settings(cfg, reference, precision: str) -> dict:
    """What the reference's log-probs depend on besides the examples, its weights and dtype (the cache key's
    ``extra``, :func:`preftune.training.reference.cache_key`): kind, reference, attention, precision, ld_alpha."""
    return {"kind": cfg.kind, "reference": reference.description, "attn": cfg.attn_implementation or "sdpa",
            "mixed_precision": precision, "ld_alpha": cfg.ld_alpha}


def reference_cache_dir(cfg) -> Path:
    """``--ref-cache-dir``, by default OUTPUT_DIR/ref_cache."""
    return Path(cfg.ref_cache_dir or Path(cfg.output_dir) / "ref_cache")


def _forget_other_precision(precision: str) -> None:
    """accelerate keeps one AcceleratorState per process; a second ``train`` in the same process (compare
    sweeps, tests) with another precision would be refused, so that state (not the process group) is reset."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
