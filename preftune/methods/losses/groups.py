"""Losses on response groups: k responses to one prompt, each with a score.

A batch holds G groups of up to K responses, as four [G, K] tensors:

* ``policy_logps``: the policy's log-prob of each response (summed or token-averaged, as the method's
  row in :mod:`preftune.methods.table` says);
* ``reference_logps``: the same under the reference model, or None for reference-free methods (then the
  log-ratios below are the policy's log-probs themselves);
* ``scores``: float, higher = better (rankings are read as scores, lower rank = higher score);
* ``mask``: bool, False where a group has fewer than K responses (padding; its values are ignored).

Ties are allowed: two responses of equal score form no ordered pair.

Two ways to train on a group:

* through any pair loss (:mod:`~preftune.methods.losses.pairwise` and the other pair families): the
  group's ordered pairs (:func:`ordered_pairs`, ``--group-pairs all|best-vs-rest|best-vs-worst``) become
  the pair loss's chosen / rejected inputs (:func:`pairwise_group_loss`); nothing of the pair loss is
  re-implemented. The caller averages the (P,) pair losses over every pair of the batch, so a group
  weighs as many pairs as it holds — exactly what expanding the groups into pair records would do;
* listwise: :func:`plackett_luce_loss` (listwise DPO) and :func:`lipo_lambda_loss` (LiPO-lambda), one
  loss per group, (G,).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preftune.methods.losses.inputs import check_beta, fp32

GROUP_PAIRS = ("all", "best-vs-rest", "best-vs-worst")  # the choices of --group-pairs


@dataclass(frozen=True)
class GroupPairs:
    """The ordered pairs of a batch of groups: pair p prefers response ``better[p]`` of group ``group[p]``
    to its response ``worse[p]`` (P pairs; each a long tensor of shape (P,))."""

    group: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor

    def __len__(self) -> int:
        return int(self.group.numel())

    def better_of(self, values: torch.Tensor) -> torch.Tensor:
        """[G, K] per-response values -> (P,) the better response's of each pair."""
        return values[self.group, self.better]

    def worse_of(self, values: torch.Tensor) -> torch.Tensor:
        """[G, K] per-response values -> (P,) the worse response's of each pair."""
        return values[self.group, self.worse]


def check_group_tensors(policy_logps: torch.Tensor, reference_logps: torch.Tensor | None, scores: torch.Tensor,
                        mask: torch.Tensor) -> None:
    """ValueError unless all are [G, K] of one shape and ``mask`` is bool."""
    shapes = {"policy_logps": policy_logps.shape, "scores": scores.shape, "mask": mask.shape}
    if reference_logps is not None:
        shapes["reference_logps"] = reference_logps.shape
    first = tuple(policy_logps.shape)
    if len(first) != 2 or any(tuple(shape) != first for shape in shapes.values()):
        listed = ", ".join(f"{name}={tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"expected [G, K] tensors of one shape (G groups of up to K responses), got {listed}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (False = padding), got {mask.dtype}")


def ordered_pairs(scores: torch.Tensor, mask: torch.Tensor, mode: str = "all") -> GroupPairs:
    """The ordered pairs (better, worse) of each group, ties skipped, padding left out.

    ``mode`` (``--group-pairs``):

    * ``all``: every pair of responses with different scores (k(k-1)/2 for k distinct scores);
    * ``best-vs-rest``: every response with the group's top score against each response scored lower;
    * ``best-vs-worst``: every response with the group's top score against each with its bottom score.

    With a tie at the top (or bottom) every tied response takes part, so no choice depends on the order the
    responses are listed in; an all-tied group gives no pair.

    Args:
        scores: [G, K] float, higher = better.
        mask: [G, K] bool, False = padding.
        mode: one of :data:`GROUP_PAIRS`.

    Returns:
        :class:`GroupPairs` of P pairs, ordered by group, then better response, then worse response.
    """
    if mode not in GROUP_PAIRS:
        raise ValueError(f"group_pairs must be one of {', '.join(GROUP_PAIRS)}, got {mode!r}")
    if scores.shape != mask.shape or scores.dim() != 2:
        raise ValueError(f"scores and mask must be [G, K] of one shape, got {tuple(scores.shape)} and "
                         f"{tuple(mask.shape)}")
    above = scores[:, :, None] > scores[:, None, :]  # [G, K, K]: response i scored above response j
    above &= mask[:, :, None] & mask[:, None, :]
    if mode != "all":
        top = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # [G, 1]
        above &= (scores == top)[:, :, None]
    if mode == "best-vs-worst":
        bottom = scores.masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True)  # [G, 1]
        above &= (scores == bottom)[:, None, :]
    group, better, worse = above.nonzero(as_tuple=True)
    return GroupPairs(group, better, worse)


def pairwise_group_loss(
    pair_loss: Callable,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_pairs: str = "all",
    per_response: Mapping[str, torch.Tensor] | None = None,
    **options,
):
    """Any pair loss over the ordered pairs of each group (ties skipped).

    The group's pairs (:func:`ordered_pairs` under ``group_pairs``) are expanded into the pair loss's
    ``policy_chosen_logps`` / ``policy_rejected_logps`` (and ``ref_chosen_logps`` / ``ref_rejected_logps``
    when ``reference_logps`` is given), each (P,), and ``pair_loss`` is called on them unchanged: all-pairs
    DPO over a group is the DPO loss of its expanded pairs. Averaging the returned (P,) losses over the
    batch weighs each group by its number of pairs, as expanding the groups into pair records would.

    Args:
        pair_loss: a pure pair loss (``dpo_loss``, ``simpo_loss``, ``dpop_loss`` ...).
        policy_logps, reference_logps, scores, mask: [G, K] (module docstring); ``reference_logps`` None
            for a reference-free pair loss.
        group_pairs: ``all``, ``best-vs-rest`` or ``best-vs-worst`` (:func:`ordered_pairs`).
        per_response: other [G, K] inputs of the pair loss taken from the better response of each pair, by
            keyword (``{"chosen_nll": nll}`` for RPO's NLL term).
        options: the pair loss's keywords (``beta=0.1`` ...).

    Returns:
        what ``pair_loss`` returns on the P expanded pairs: ``(losses, chosen_rewards, rejected_rewards)``,
        each (P,), chosen = the better response of each pair.
    """
    check_group_tensors(policy_logps, reference_logps, scores, mask)
    pairs = ordered_pairs(scores, mask, group_pairs)
    inputs = {"policy_chosen_logps": pairs.better_of(policy_logps),
              "policy_rejected_logps": pairs.worse_of(policy_logps)}
    if reference_logps is not None:
        inputs["ref_chosen_logps"] = pairs.better_of(reference_logps)
        inputs["ref_rejected_logps"] = pairs.worse_of(reference_logps)
    for name, values in (per_response or {}).items():
        inputs[name] = pairs.better_of(values)
    return pair_loss(**inputs, **options)


def group_logratios(policy_logps: torch.Tensor, reference_logps: torch.Tensor | None,
                    mask: torch.Tensor) -> torch.Tensor:
    """[G, K] policy/reference log-ratios (the policy's log-probs without a reference), 0 at padding."""
    ratios = fp32(policy_logps) if reference_logps is None else fp32(policy_logps) - fp32(reference_logps)
    return torch.where(mask, ratios, torch.zeros_like(ratios))


def plackett_luce_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    scores: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Listwise DPO under the Plackett-Luce model: Rafailov et al. 2023, "Direct Preference Optimization",
    appendix A.3. With r_j = beta * (policy_j - reference_j) and the responses ranked by score,
    tau(1) best:

        loss = -log prod_{j=1..k} exp(r_tau(j)) / sum_{l=j..k} exp(r_tau(l))

    the negative log-likelihood of the whole ranking; k = 2 is DPO's loss.

    Ties: each response competes against itself and the responses scored strictly below it,

        loss = sum_j [ logsumexp_{l in {j} + {l: score_l < score_j}} r_l  -  r_j ]

    With distinct scores this is exactly the Plackett-Luce likelihood above. Tied responses are never in
    each other's denominators, so a tie says nothing about their order (as the pairwise expansion skips
    ties), the loss does not depend on the order the responses are listed in, and an all-tied group's loss
    is 0 (no gradient).

    Args:
        policy_logps, reference_logps, scores, mask: [G, K] (module docstring); ``reference_logps`` None
            uses the policy's log-probs as the log-ratios.
        beta: > 0 (0.1 in the paper).

    Returns:
        losses (G,), one per group (the sum over its positions), and rewards [G, K] = r, detached (0 at
        padding).
    """
    beta = check_beta(beta)
    check_group_tensors(policy_logps, reference_logps, scores, mask)
    rewards = beta * group_logratios(policy_logps, reference_logps, mask)  # [G, K]
    K = rewards.shape[1]
    lower = (scores[:, None, :] < scores[:, :, None]) & mask[:, None, :]  # [G, j, l]: l scored below j
    competes = lower | torch.eye(K, dtype=torch.bool, device=rewards.device)  # and j itself
    logits = rewards[:, None, :].expand(-1, K, -1).masked_fill(~competes, float("-inf"))  # [G, j, l]
    terms = torch.logsumexp(logits, dim=-1) - rewards  # [G, K]: -log P(j first among its competitors)
    terms = torch.where(mask & lower.any(dim=-1), terms, torch.zeros_like(terms))
    return terms.sum(dim=1), rewards.detach()


def lipo_lambda_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    scores: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiPO-lambda: Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank",
    its LiPO-lambda objective (the LambdaLoss of Wang et al. 2018 on DPO's rewards). With
    s_i = beta * (policy_i - reference_i) and psi_i the scores:

        loss = sum_{i, j: psi_i > psi_j} Delta_ij * log(1 + exp(-(s_i - s_j)))
        Delta_ij = |G_i - G_j| * |1 / D(tau(i)) - 1 / D(tau(j))|
        G_i = 2^psi_i - 1            (gain)
        D(tau) = log2(1 + tau)       (rank discount)

    tau(i) is the rank of response i in the group sorted by s, descending (1 = top; equal s ranked in list
    order), taken without gradient: Delta_ij is the change of the group's DCG when i and j swap places,
    a constant weight on each pair's logistic loss. As in the paper Delta is not divided by the ideal DCG.
    Ties in psi form no pair. The gains grow as 2^psi: scores on a small scale (0-10, ranks) are what
    the method is meant for; gains that overflow float32 (psi > ~127) are refused.

    Args:
        policy_logps, reference_logps, scores, mask: [G, K] (module docstring); ``reference_logps`` None
            uses the policy's log-probs as the log-ratios.
        beta: > 0.

    Returns:
        losses (G,), one per group (the sum over its pairs; 0 for an all-tied group), and rewards [G, K] =
        s, detached (0 at padding).
    """
    beta = check_beta(beta)
    check_group_tensors(policy_logps, reference_logps, scores, mask)
    rewards = beta * group_logratios(policy_logps, reference_logps, mask)  # [G, K]
    weights = lambda_weights(rewards.detach(), fp32(scores), mask)  # [G, K, K]
    pair_losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])  # [G, i, j]
    return (weights * pair_losses).sum(dim=(1, 2)), rewards.detach()


def lambda_weights(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LiPO-lambda's Delta_ij for i scored above j, 0 elsewhere: [G, K, K] from [G, K] rewards (ranked,
    descending, ties in list order), scores (gains 2^score - 1) and mask (padding ranked last, no pairs)."""
    ranked = rewards.masked_fill(~mask, float("-inf"))
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1).to(rewards.dtype) + 1  # [G, K], 1 = top
    discount = 1.0 / torch.log2(1.0 + rank)  # [G, K]
    gains = torch.where(mask, torch.exp2(scores) - 1.0, torch.zeros_like(scores))  # [G, K]
    if not torch.isfinite(gains).all():
        raise ValueError("lipo_lambda: a score's gain 2^score - 1 overflows; use scores on a small scale "
                         "(e.g. 0-10, or ranks)")
    above = (scores[:, :, None] > scores[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # [G, i, j]
    delta = (gains[:, :, None] - gains[:, None, :]).abs() * (discount[:, :, None] - discount[:, None, :]).abs()
    return torch.where(above, delta, torch.zeros_like(delta))
