"""From per-sequence log-probs to the loss and metrics of a method (or a weighted sum of methods).

The method table (:mod:`preftune.methods.table`) says, per method, which tensors its pure loss takes
(summed or token-averaged log-probs, the chosen NLL, KTO's KL point ...) and which options;
this module builds those tensors from one batch's log-probs, calls each loss, applies the
loop-level options (WPO weights, LD-DPO lengths), sums the weighted losses and names the
metrics the way TRL users know them. Batches of response groups (``scores`` given) go to the
group rows' losses as [G, K] tensors, and to pair rows through each group's ordered pairs
(``--group-pairs``, :mod:`preftune.methods.losses.groups`). Nothing here names a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.methods import table as M
from preftune.methods.losses import groups, modifiers, unpaired
from preftune.model.logprobs import LogpOutput

# Metrics every paired method logs (others add their own).
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")

_REWARD_SHIFT = "reward_shift"  # the state key of BCO's running mean reward


def compute_objective(
    method: str | M.Combination,
    policy: LogpOutput,
    num_groups: int,
    ref_logps: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    margins: torch.Tensor | None = None,
    loss_weights: str | None = None,
    token_seq: torch.Tensor | None = None,
    token_log_sum_sq: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    state: dict | None = None,
    update_state: bool = False,
    mean_across_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (a scalar with grad) and detached scalar metrics for one batch.

    Args:
        method: a --loss value (``"dpo"``, ``"sigmoid,bco_pair,sft"``) or a parsed
            :class:`preftune.methods.table.Combination`; ``loss_weights`` goes with a string.
        policy: ``logps`` / ``counts`` (S,) with S = K * G (see :mod:`preftune.data.batch`) and
            ``token_logps`` (N,).
        num_groups: G.
        ref_logps: (S,) the reference's sequence log-probs — summed, or length-desensitised
            like the policy's when ``ld_alpha`` is set (:class:`preftune.training.reference` does both) —
            or None for reference-free methods.
        labels: (G,) bool for unpaired data (True = desirable).
        margins: (G,) float, each pair's ``margin`` (reward models); None = 0.
        token_seq: (N,) sequence id of each token (``Batch.token_seq``), for ``ld_alpha`` and
            ``use_weighting``.
        token_log_sum_sq: (N,) log sum_v p(v)^2 of the policy at each token, for ``use_weighting``.
        scores: (G, K) float for a batch of response groups (higher = better; K = the most responses
            of a group, sequence s = k * G + g); None for other data.
        completion_mask: (G, K) bool, which responses exist (False = padding); None = all.
        state: values kept across batches (BCO's running mean reward); ``update_state`` adds
            this batch to them (training) or only reads them (evaluation). Without a state BCO
            uses this batch's mean reward.
        mean_across_processes: averages a tensor over data-parallel ranks (KTO's KL point,
            BCO's mean reward); called on every rank.
        options: TrainConfig fields by name (``beta=0.1``, ``label_smoothing=...``); a loss
            keyword whose field is not given keeps the loss function's default.
    """
    combination = M.parse(method, loss_weights) if isinstance(method, (str, list, tuple)) else method
    if scores is not None:
        group = _GroupTensors(policy, num_groups, ref_logps, scores, completion_mask)
        return _group_objective(combination, group, options, state, update_state, mean_across_processes)
    kind = combination.kind
    if kind == "group":
        raise ValueError(f"--loss {combination.name} trains on response groups; this batch has no scores")
    tensors = _Tensors(policy, num_groups, ref_logps, labels, margins, token_seq, options, state, update_state,
                       mean_across_processes)
    weights = _wpo_weights(policy, num_groups, token_seq, token_log_sum_sq, options)
    summed = _weighted_sum(combination, lambda row: _row_losses(row, tensors, options), weights)
    loss = summed.loss if summed.loss is not None else torch.zeros((), device=policy.logps.device)
    metrics = {"loss": loss.detach(), **_batch_metrics(kind, policy, num_groups, labels, tensors, summed.rewards)}
    metrics.update(_method_metrics(summed, weights))
    return loss, metrics


def _wpo_weights(policy: LogpOutput, num_groups: int, token_seq, token_log_sum_sq, options) -> torch.Tensor | None:
    """WPO (Zhou et al. 2024) under ``use_weighting``: (G,) detached weights, one per pair; else None."""
    if not options.get("use_weighting"):
        return None
    if token_log_sum_sq is None or token_seq is None:
        raise ValueError("use_weighting (WPO) needs token_log_sum_sq and token_seq (per-token log sum p^2)")
    return modifiers.wpo_weights(policy.token_logps, token_log_sum_sq, token_seq, num_groups)


@dataclass
class _Summed:
    """The weighted sum of a combination's losses and what its rows report."""

    loss: torch.Tensor | None = None  # 0-d, with grad: sum of weight * mean loss of each row
    # of the first row with rewards: (G,) chosen and rejected, or (G,) alone; on groups (P,) chosen and rejected
    # rewards and log-probs of its ordered pairs (pair_metrics' arguments)
    rewards: tuple[torch.Tensor, ...] = ()
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the rows' own metrics (ORPO's or_loss, KTO's kl)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # "loss/<name>": each row's mean loss, detached


def _weighted_sum(combination: M.Combination, row_losses: Callable[[M.Method], tuple],
                  weights: torch.Tensor | None) -> _Summed:
    """Each row's loss on its inputs (``row_losses(row)`` -> (losses, rewards, metrics)), WPO-weighted where
    the row takes it, averaged over the batch and summed with the combination's weights. A batch of groups
    without an ordered pair (all tied) gives a pair row no loss: 0, with the graph kept."""
    summed = _Summed()
    for row, weight in zip(combination.methods, combination.weights):
        losses, rewards, extra = row_losses(row)  # losses (G,), or (P,) pairs of groups
        if weights is not None and "use_weighting" in row.modifiers:
            losses = losses * weights
        row_loss = losses.mean() if losses.numel() else losses.sum()
        summed.loss = weight * row_loss if summed.loss is None else summed.loss + weight * row_loss
        summed.components[f"loss/{row.name}"] = row_loss.detach()
        summed.rewards = summed.rewards or rewards  # the first method with rewards names rewards/*
        summed.extra.update(extra)
    return summed


def _row_losses(row: M.Method, tensors: _Tensors, options) -> tuple[torch.Tensor, tuple, dict[str, torch.Tensor]]:
    """One row's pure loss called on the inputs it names and the options it reads (a loss keyword whose
    TrainConfig field is not in ``options`` keeps its default) -> (losses, rewards, metrics)."""
    if row.reference and tensors.ref is None:
        raise ValueError(f"--loss {row.name} needs reference log-probs")
    return _unpack(row.loss(**{name: tensors.get(name, row) for name in row.inputs}, **_keywords(row, options)))


def _keywords(row: M.Method, options) -> dict[str, Any]:
    """The loss keywords of ``row`` whose TrainConfig fields are in ``options`` (the others keep the loss's
    defaults)."""
    return {keyword: options[name] for keyword, name in row.options.items() if name in options}


def _batch_metrics(kind: str, policy: LogpOutput, num_groups: int, labels, tensors: _Tensors,
                   rewards: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The TRL-named metrics of the batch's data kind: the NLL for SFT data; rewards and log-probs by label
    for unpaired data; a reward model's rewards; for pairs the rewards, log-probs and the chosen NLL."""
    G = num_groups
    chosen_logps, rejected_logps = policy.logps[:G].detach(), policy.logps[G:2 * G].detach()  # (G,) each
    if kind == "sft":
        return {"nll": tensors.get("chosen_token_nll").detach()}
    if kind == "unpaired":
        return _unpaired_metrics(rewards[0], chosen_logps, labels)
    if policy.rewards is not None:  # a reward model: its rewards, no log-probs
        return {k: v for k, v in pair_metrics(rewards[0], rewards[1], rewards[0], rewards[1]).items()
                if k.startswith("rewards/")}
    if rewards:
        metrics = pair_metrics(rewards[0], rewards[1], chosen_logps, rejected_logps)
    else:  # only methods without rewards (sft on pairs): the log-probs still say what moved
        metrics = {"logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}
    if tensors.ref is not None:  # the chosen log-prob's change against the reference, on the batch's own rows
        metrics["logps/chosen_vs_ref"] = (chosen_logps.float() - tensors.ref[:G].float()).mean()
    metrics["nll"] = tensors.get("chosen_nll").detach().mean()
    return metrics


def _method_metrics(summed: _Summed, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each method's loss (only when there are several), the methods' own metrics as batch means, and
    WPO's mean weight."""
    metrics = dict(summed.components) if len(summed.components) > 1 else {}
    metrics.update({key: value.detach().float().mean() for key, value in summed.extra.items()})
    if weights is not None:
        metrics["wpo/weights"] = weights.mean()
    return metrics


class _Tensors:
    """The named inputs of :mod:`preftune.methods.table` for one batch, built on first use.

    ``policy.logps`` / ``policy.counts`` and ``ref`` are (S,) with S = K * G: sequences 0..G-1 are the
    chosen completions (or each unpaired example's own), G..2G-1 the rejected (or KTO's mismatched) ones.
    The other arguments are :func:`compute_objective`'s.
    """

    def __init__(self, policy, num_groups, ref_logps, labels, margins, token_seq, options, state, update_state,
                 mean_across_processes):
        self.policy, self.G, self.ref, self.labels, self.margins = policy, num_groups, ref_logps, labels, margins
        self.options, self.state, self.update_state = options, state, update_state
        self.mean_across_processes = mean_across_processes
        self.counts = policy.counts.clamp(min=1)  # (S,)
        self.ld_logps = None
        if options.get("ld_alpha") is not None:  # LD-DPO (Liu et al. 2024): length-desensitised sums
            if token_seq is None:
                raise ValueError("ld_alpha (LD-DPO) needs token_seq (which sequence each token belongs to)")
            self.ld_logps = modifiers.length_desensitized_logps(policy.token_logps, token_seq, num_groups,
                                                                options["ld_alpha"])  # (S,)
        self._cache: dict[str, torch.Tensor] = {}

    def sequence_logps(self, row) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S,) policy and reference log-probs as ``row`` takes them: summed (length-desensitised
        under LD-DPO for rows that take it) or token-averaged."""
        policy = self.ld_logps if self.ld_logps is not None and "ld_alpha" in row.modifiers else self.policy.logps
        ref = self.ref
        if row.logps == "mean":
            policy = policy / self.counts
            ref = None if ref is None else ref / self.counts
        return policy, ref

    def get(self, name: str, row=None) -> torch.Tensor:
        """The input ``name`` (the pair log-probs as ``row`` takes them)."""
        G = self.G
        if name in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
            policy, ref = self.sequence_logps(row)
            source = policy if name.startswith("policy") else ref
            return source[:G] if "_chosen_" in name else source[G:2 * G]
        if name not in self._cache:
            self._cache[name] = self._build(name)
        return self._cache[name]

    def _build(self, name: str) -> torch.Tensor:
        G, logps, ref = self.G, self.policy.logps, self.ref
        if name == "chosen_nll":  # (G,) token-averaged NLL of each chosen completion
            return -(logps / self.counts)[:G]
        if name == "chosen_token_nll":  # 0-d: NLL per token over all chosen tokens of the batch
            return -logps[:G].sum() / self.counts[:G].sum()
        if name == "chosen_counts":
            return self.counts[:G]
        if name == "policy_logps":  # unpaired: each example's own completion is sequence k = 0
            return logps[:G]
        if name == "ref_logps":
            return ref[:G]
        if name == "labels":
            return self.labels
        if name in ("chosen_rewards", "rejected_rewards"):
            if self.policy.rewards is None:
                raise ValueError(f"{name} needs a reward model's output (a sequence-classification head)")
            return self.policy.rewards[:G] if name == "chosen_rewards" else self.policy.rewards[G:2 * G]
        if name == "margins":
            return self.margins
        if name == "kl":
            # KTO's z0 = max(0, mean over ALL ranks' mismatched pairs): average the unclamped local means
            # (equal counts per rank), then clamp — clamping per rank first would bias z0 upwards.
            local = unpaired.kto_kl_estimate(logps[G:2 * G], ref[G:2 * G], clamp=False)
            return self.mean_across_processes(local).clamp(min=0)
        if name == _REWARD_SHIFT:
            return self._reward_shift()
        raise ValueError(f"no input named {name!r} (see preftune.methods.table)")

    def _reward_shift(self) -> torch.Tensor:
        """BCO's delta: the running mean of the batches' mean rewards beta * (policy - ref)."""
        beta = self.options["beta"]
        rewards = beta * (self.policy.logps[:self.G].detach().float() - self.ref[:self.G].float())
        batch_mean = self.mean_across_processes(rewards.mean())  # a collective: every rank, every batch
        if self.state is None:
            return batch_mean
        if self.update_state:
            self.state[_REWARD_SHIFT] = unpaired.bco_reward_shift(batch_mean, self.state.get(_REWARD_SHIFT))
        saved = self.state.get(_REWARD_SHIFT)
        return batch_mean if saved is None else torch.tensor(saved[0], device=batch_mean.device)


def _group_objective(combination: M.Combination, group: _GroupTensors, options, state, update_state,
                     mean_across_processes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`compute_objective` on a batch of response groups: each row's loss on the groups (a group row)
    or on their ordered pairs (a pair row, ``--group-pairs``); metrics named as for pairs, over the ordered
    pairs (chosen = the better response of each pair; ``rewards/accuracies`` = the share of ordered pairs,
    ties skipped, whose rewards agree with the scores)."""
    if "group" not in combination.kinds:
        takers = ", ".join(m.name for m in M.METHODS if "group" in m.kinds)
        raise ValueError(f"--loss {combination.name} does not train on response groups (methods that do: {takers})")
    for name in ("use_weighting", "ld_alpha"):
        if options.get(name) not in (None, False):
            raise ValueError(f"--{name.replace('_', '-')} weighs the tokens of pair records; it does not apply to "
                             f"response groups")
    context = (options, state, update_state, mean_across_processes)
    summed = _weighted_sum(combination, lambda row: group.row_losses(row, *context), None)
    loss = summed.loss if summed.loss is not None else torch.zeros((), device=group.logps.device)
    metrics = {"loss": loss.detach(), **(pair_metrics(*summed.rewards) if summed.rewards else {})}
    metrics.update(_method_metrics(summed, None))
    return loss, metrics


class _GroupTensors:
    """A batch of G response groups as [G, K] tensors (:mod:`preftune.methods.losses.groups`).

    ``policy.logps`` / ``policy.counts`` and ``ref_logps`` are (S,) with S = K * G, sequence s = k * G + g
    (response k of group g; :mod:`preftune.data.batch`); ``scores`` and ``mask`` are (G, K).
    """

    def __init__(self, policy: LogpOutput, num_groups: int, ref_logps, scores, mask):
        G, S = num_groups, policy.logps.numel()
        if G < 1 or S % G or tuple(scores.shape) != (G, S // G):
            raise ValueError(f"a batch of {G} groups with {S} sequences needs scores of shape (G, K) = "
                             f"({G}, {S // max(G, 1)}), got {tuple(scores.shape)}")
        K = S // G
        self.policy = policy
        self.logps = policy.logps.view(K, G).T  # [G, K] summed
        self.counts = policy.counts.view(K, G).T  # [G, K]
        self.ref = None if ref_logps is None else ref_logps.view(K, G).T  # [G, K]
        self.scores = scores
        self.mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()

    def row_losses(self, row: M.Method, options, state, update_state, mean_across_processes):
        """``row``'s (losses, rewards, metrics) on the groups; rewards as :class:`_Summed` keeps them."""
        if row.reference and self.ref is None:
            raise ValueError(f"--loss {row.name} needs reference log-probs")
        if row.pairwise_on_groups:
            return self._pair_row_losses(row, options, state, update_state, mean_across_processes)
        per_token = self.counts.clamp(min=1) if row.logps == "mean" else 1
        inputs = {"policy_logps": self.logps / per_token, "scores": self.scores, "mask": self.mask,
                  "reference_logps": None if self.ref is None else self.ref / per_token}
        losses, rewards, extra = _unpack(row.loss(**{name: inputs[name] for name in row.inputs},
                                                  **_keywords(row, options)))
        pairs = groups.ordered_pairs(self.scores, self.mask, "all")
        logps = self.logps.detach()
        return losses, (pairs.better_of(rewards[0]), pairs.worse_of(rewards[0]), pairs.better_of(logps),
                        pairs.worse_of(logps)), extra

    def _pair_row_losses(self, row: M.Method, options, state, update_state, mean_across_processes):
        """A pair row on the groups' ordered pairs: the P pairs laid out as a batch of P pairs (sequences
        0..P-1 the better responses, P..2P-1 the worse) and passed to the row as any pair batch."""
        pairs = groups.ordered_pairs(self.scores, self.mask, options.get(M.GROUP_PAIRS_FIELD) or "all")
        P = len(pairs)

        def expand(values):  # [G, K] -> (2P,)
            return torch.cat([pairs.better_of(values), pairs.worse_of(values)])

        policy = LogpOutput(expand(self.logps), expand(self.counts), self.policy.token_logps)
        ref = None if self.ref is None else expand(self.ref)
        tensors = _Tensors(policy, P, ref, None, None, None, options, state, update_state, mean_across_processes)
        losses, rewards, extra = _row_losses(row, tensors, options)
        if rewards:
            logps = policy.logps.detach()
            rewards = (rewards[0], rewards[1], logps[:P], logps[P:])
        return losses, rewards, extra


def _unpack(result) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """A loss's return value -> (losses, rewards, metrics): a tensor (losses only), or a tuple of
    losses, one (unpaired) or two (chosen, rejected) reward tensors and optionally a metrics dict."""
    if isinstance(result, torch.Tensor):
        return result, (), {}
    *tensors, last = result
    if isinstance(last, dict):
        return tensors[0], tuple(tensors[1:]), last
    return tensors[0] if tensors else last, tuple(tensors[1:]) + ((last,) if tensors else ()), {}


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """TRL-named batch means: rewards/*, logps/* (summed log-probs)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }


def _unpaired_metrics(rewards, logps, labels) -> dict[str, torch.Tensor]:
    """Unpaired methods log desirable rewards as rewards/chosen and undesirable as rewards/rejected
    (as TRL's KTOTrainer).

    A batch with no example of one label reports NaN for that side; the loop averages with
    ``nanmean`` so it never pollutes the logged value.
    """
    labels = labels.bool()
    nan = torch.tensor(float("nan"), device=rewards.device)
    chosen = rewards[labels].mean() if labels.any() else nan
    rejected = rewards[~labels].mean() if (~labels).any() else nan
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": logps[labels].mean() if labels.any() else nan,
        "logps/rejected": logps[~labels].mean() if (~labels).any() else nan,
    }
