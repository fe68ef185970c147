"""What LD-DPO and WPO change around a pair loss, on per-token log-probs: the length-desensitised
sequence log-probs a loss is given (LD-DPO) and the per-pair weight of its loss (WPO).
"""

from __future__ import annotations

import torch

from preftune.methods.losses.inputs import check_shapes, fp32


def length_desensitized_logps(
    token_logps: torch.Tensor, token_seq: torch.Tensor, num_groups: int, alpha: float
) -> torch.Tensor:
    """LD-DPO: Liu et al. 2024, "Length Desensitization in Directed Preference Optimization",
    eq. 9: a pair's log-probs count the tokens both completions have in full, and the longer
    one's extra tokens with weight alpha (a "public length" l_p = min(l_chosen, l_rejected)):

        logp~(y) = sum_{t <= l_p} log p(y_t) + alpha * sum_{t > l_p} log p(y_t)

    The same weighting is applied to policy and reference log-probs (as in the paper and TRL).
    alpha = 1 is plain summed log-probs; alpha = 0 drops the excess tokens.

    Args:
        token_logps: (N,) log-prob of every completion token of the batch, each sequence's
            tokens in their text order (the order :mod:`preftune.data.batch` lists them).
        token_seq: (N,) long, the sequence of each token; sequence s = k * G + g, so for pairs
            0..G-1 are the chosen and G..2G-1 the rejected completions.
        num_groups: G (the batch holds 2G sequences).
        alpha: in [0, 1].

    Returns:
        (2G,) float32 length-desensitised summed log-probs.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"ld_alpha must be in [0, 1] (1 = plain DPO), got {alpha}")
    check_shapes(token_logps=token_logps, token_seq=token_seq)
    num_seqs = 2 * num_groups
    counts = torch.bincount(token_seq, minlength=num_seqs)  # (2G,)
    if counts.shape[0] != num_seqs:
        raise ValueError(f"length_desensitized_logps needs pairs: token_seq has ids >= 2 * num_groups ({num_seqs})")
    order = torch.argsort(token_seq, stable=True)  # (N,) tokens grouped by sequence, text order kept
    starts = torch.cumsum(counts, 0) - counts  # (2G,) first sorted position of each sequence
    position = torch.empty_like(token_seq)
    position[order] = torch.arange(token_seq.shape[0], device=token_seq.device) - starts[token_seq[order]]
    public = torch.minimum(counts[:num_groups], counts[num_groups:]).repeat(2)  # (2G,) l_p per sequence
    logps = fp32(token_logps)
    weights = torch.where(position < public[token_seq], torch.ones_like(logps), torch.full_like(logps, alpha))
    return torch.zeros(num_seqs, dtype=logps.dtype, device=logps.device).index_add(0, token_seq, logps * weights)


def wpo_weights(
    token_logps: torch.Tensor, token_log_sum_sq: torch.Tensor, token_seq: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """WPO: Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    eq. 2 with the paper's sampled weight alignment: each pair's loss is weighted by how
    likely the policy is to produce both completions, per token and relative to its own
    expected token probability sum_v p(v)^2:

        w(y) = exp( 1/|y| sum_t [log p(y_t) - log sum_v p(v | y_<t)^2] )
        weight = w(chosen) * w(rejected)        (detached, as in the paper and TRL)

    Args:
        token_logps: (N,) policy log-prob of every completion token.
        token_log_sum_sq: (N,) log sum_v p(v)^2 of the policy's distribution at each token.
        token_seq: (N,) long sequence id (0..G-1 chosen, G..2G-1 rejected).
        num_groups: G.

    Returns:
        (G,) detached float32 weights, one per pair.
    """
    check_shapes(token_logps=token_logps, token_log_sum_sq=token_log_sum_sq, token_seq=token_seq)
    num_seqs = 2 * num_groups
    aligned = (fp32(token_logps) - fp32(token_log_sum_sq)).detach()  # (N,)
    sums = torch.zeros(num_seqs, dtype=aligned.dtype, device=aligned.device).index_add(0, token_seq, aligned)
    counts = torch.bincount(token_seq, minlength=num_seqs).clamp(min=1)
    weights = torch.exp(sums / counts)  # (2G,)
    return weights[:num_groups] * weights[num_groups:]
