"""One optimizer step and the pieces around it: the objective of a batch, the micro-batches of a
step with their backward, the numerical guard's skip-or-update decision, the metrics window the
logged rows average, and the held-out evaluation with the training objective.

``run`` below is the :class:`preftune.training.setup.Run` that :func:`preftune.training.setup.build_run`
made (duck-typed here: setup imports this module).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from preftune.data.order import balanced_split
from preftune.methods.losses.groups import ordered_pairs
from preftune.methods.objective import compute_objective
from preftune.training.divergence import weights_norm
from preftune.training.hooks import StepStats, TrainHooks

log = logging.getLogger("preftune")


class MetricsWindow:
    """The steps since the last logged row: each metric's micro-batch values, and the examples and
    tokens trained on (every rank's: the same count on every rank, no collective needed)."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.start, self.pairs, self.tokens = time.perf_counter(), 0, 0

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(float(value))

    def drop_last(self, count: int) -> None:
        """Keep the last ``count`` values of each metric (a skipped step's) out of the logged means."""
        for values in self.values.values():
            del values[len(values) - count:]


@dataclass
class StepOutcome:
    """What one optimizer step left: ``micro`` micro-batches consumed so far (the global data position),
    the gradient norm before clipping, whether the update was skipped (non-finite loss or gradient on
    any rank), the metric names of the last micro-batch (the same on every rank), and the step's
    examples and tokens (every rank's) for the hooks."""

    micro: int
    grad_norm: float
    bad: bool
    metric_keys: list[str]
    pairs: int
    tokens: int
    losses: list[float] = field(default_factory=list)


def train_step(cfg, run, step: int, micro: int, window: MetricsWindow, hooks: TrainHooks | None = None) -> StepOutcome:
    """Step ``step + 1``: ``cfg.grad_accum`` micro-batches (forward, objective, backward), clipping, and the
    optimizer's update unless the guard says skip (:func:`skip_or_update`). A collective on every rank."""
    accelerator, examples, world = run.accelerator, run.train_examples, run.accelerator.num_processes
    step_rows: list[int] = []
    step_losses: list[float] = []  # this rank's micro-batch losses of this step
    pairs = tokens = 0
    for _ in range(cfg.grad_accum):
        epoch, pos = divmod(micro, run.micro_per_epoch)
        global_ids = run.epoch_batches(epoch)[pos]
        # Equal example counts per rank, balanced in tokens; weight = this rank's share of the loss's
        # terms, so that DDP's gradient average is the mean over the whole global batch.
        ids = balanced_split(global_ids, lambda i: examples[i].num_tokens, world)[accelerator.process_index]
        weight = rank_weight(cfg, examples, ids, global_ids, world)
        if not ids:  # fewer examples than ranks: run a zero-weight batch so every collective runs
            ids, weight = global_ids[:1], 0.0
        step_rows.extend(ids)
        chosen = [examples[i] for i in ids]
        batch = run.collate(chosen).to(accelerator.device)
        if hooks is not None and hooks.on_batch is not None:
            hooks.on_batch(chosen, batch)
        loss, metrics = batch_objective(cfg, batch, run.model, run.reference,
                                        mean_across_processes=lambda t: accelerator.reduce(t, reduction="mean"),
                                        state=run.method_state, update_state=True)
        accelerator.backward(loss * weight / cfg.grad_accum)
        if weight > 0:  # a zero-weight stand-in batch is not logged
            window.add(metrics)
            step_losses.append(float(metrics["loss"]))
        pairs += len(global_ids)
        tokens += sum(examples[i].num_tokens for i in global_ids)
        micro += 1
    window.pairs += pairs
    window.tokens += tokens
    grad_norm = float(accelerator.clip_grad_norm_(run.trainable, cfg.max_grad_norm or float("inf")))
    bad = skip_or_update(cfg, run, step, grad_norm, step_losses, step_rows, window)
    return StepOutcome(micro, grad_norm, bad, sorted(metrics), pairs, tokens, step_losses)


def loss_terms(cfg, example) -> int:
    """How many terms ``example`` adds to the mean its batch's loss is: 1 for a pair, unpaired or SFT
    example; for a response group under a pair loss (every row of ``cfg.method`` pairwise on groups), its
    ordered pairs under ``--group-pairs`` (ties skipped; 0 for an all-tied group), since the batch loss is
    the mean over all the batch's ordered pairs; 1 under a listwise loss (a mean over groups)."""
    if example.scores is None or not all(row.pairwise_on_groups for row in cfg.method.methods):
        return 1
    scores = torch.tensor([example.scores], dtype=torch.float32)  # [1, K]
    return len(ordered_pairs(scores, torch.ones_like(scores, dtype=torch.bool), cfg.group_pairs or "all"))


def rank_weight(cfg, examples, ids: list[int], global_ids: list[int], world: int) -> float:
    """This rank's loss weight: ``world`` x its share of the global batch's loss terms (:func:`loss_terms`),
    so that DDP's gradient average of the weighted rank losses (each a mean over the rank's terms) is the
    mean over every term of the global batch, as one process on the whole batch computes it. For pairs
    that is the share of examples; for groups under a pair loss the share of ordered pairs, which differs
    when groups hold unequal numbers of pairs (k = 4 gives 6, k = 2 one, ties fewer). A combination of a
    pair loss and a listwise loss on groups is weighted by groups (its rows average over different terms)."""
    if world == 1:  # the whole global batch: its own mean
        return 1.0
    total = sum(loss_terms(cfg, examples[i]) for i in global_ids)
    if total == 0:  # no ordered pair anywhere: every rank's loss is 0; the share of examples
        return len(ids) * world / len(global_ids)
    return sum(loss_terms(cfg, examples[i]) for i in ids) * world / total


def skip_or_update(cfg, run, step: int, grad_norm: float, step_losses: list[float], step_rows: list[int],
                   window: MetricsWindow) -> bool:
    """The optimizer's update, or (a non-finite loss or gradient on any rank) a logged skip; whether skipped.

    Numerical guard (:mod:`preftune.training.divergence`): every rank takes the same decision (a
    collective on every rank). A bad step changes neither the weights nor the optimizer moments; it
    still counts as a step. fp16: a non-finite gradient is the loss scaler's overflow (it skips the
    step and lowers the scale).
    """
    accelerator = run.accelerator
    grad_bad = not math.isfinite(grad_norm) and run.precision != "fp16"
    bad_here = float(grad_bad or not all(math.isfinite(v) for v in step_losses))
    bad = float(accelerator.reduce(torch.tensor(bad_here, device=accelerator.device), reduction="sum")) > 0
    if bad:
        what = ("loss " + ", ".join(f"{v:g}" for v in step_losses) if not all(map(math.isfinite, step_losses))
                else f"gradient norm {grad_norm:g}")
        log.warning("step %d: non-finite %s; update skipped (%d of --max-bad-steps %d in a row); rows: %s",
                    step + 1, what, run.guard.bad_streak + 1, cfg.max_bad_steps,
                    describe_rows(run.train_examples, step_rows))
        window.drop_last(len(step_losses))
    else:
        run.optimizer.step()
    return bad


def guard_after_step(run, step: int, outcome: StepOutcome) -> str | None:
    """Tell the divergence guard how step ``step + 1`` went; the collapse it found, or None."""
    norm = None if outcome.bad else weights_norm(run.trainable, run.sharded, run.accelerator.reduce)
    return run.guard.after_step(step + 1, outcome.bad, outcome.grad_norm, norm)


def step_stats(run, step: int, outcome: StepOutcome, started: float, started_cpu: float) -> StepStats:
    """The :class:`preftune.training.hooks.StepStats` of the step just finished (``step`` counts it)."""
    return StepStats(step=step, started=started, started_cpu=started_cpu, seconds=time.perf_counter() - started,
                     cpu_seconds=time.process_time() - started_cpu, pairs=outcome.pairs, tokens=outcome.tokens,
                     losses=list(outcome.losses), grad_norm=outcome.grad_norm, skipped=outcome.bad,
                     gpu_peak_memory_gib=gpu_peak_memory(run.accelerator).get("gpu_peak_memory_gib"))


def log_row(cfg, run, step: int, micro: int, window: MetricsWindow, outcome: StepOutcome) -> dict:
    """The ``metrics.jsonl`` row of the window ending at ``step``: metric means across ranks (a
    collective), learning rate, gradient norm, throughput and peak GPU memory."""
    elapsed = time.perf_counter() - window.start
    row = {"step": step, "epoch": round(micro / run.micro_per_epoch, 4)}
    row.update(mean_across(run.accelerator, window.values, outcome.metric_keys))
    row.update({"learning_rate": run.scheduler.get_last_lr()[0], "grad_norm": outcome.grad_norm,
                "pairs_per_second": window.pairs / elapsed, "tokens_per_second": window.tokens / elapsed})
    row.update(gpu_peak_memory(run.accelerator))
    return row


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
    ``state`` / ``update_state``: see :func:`preftune.methods.objective.compute_objective`. A batch of
    response groups passes its (G, K) ``scores`` and ``completion_mask``: the one forward gave every
    response's log-probs, (K * G,) in sequence order like a pair batch's.

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
        token_log_sum_sq=policy.token_log_sum_sq, scores=batch.scores, completion_mask=batch.completion_mask,
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


def describe_rows(examples, ids: list[int], limit: int = 10) -> str:
    """Where the rows ``ids`` came from, for a log line: ``pairs.jsonl:3, pairs.jsonl:17 (+6 more)``."""
    names = ", ".join(str(examples[i].location or f"example {i}") for i in ids[:limit])
    return names + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")
