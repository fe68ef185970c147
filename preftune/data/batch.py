"""The one batch format every code path produces and consumes.

A batch holds G *groups*; a group is one prompt with K completions (K = 2 for a
preference pair: chosen, rejected; K = 1 for SFT; K = 2 for KTO: the example's own
completion and a mismatched completion for the KL reference point; K = k_max for response
groups, whose k may differ). Sequence ``s`` of the batch is completion ``k`` of group ``g``
with ``s = k * G + g`` — so for pairs the first G sequences are the chosen ones and the next G
the rejected ones. A response group of k < K completions has no sequences ``k' >= k``: they
get no row and no target token (``completion_mask[g, k'] = False``, log-probs 0, count 0).

Two layouts fill ``input_ids``:

* padded  (``packed=False``): one row per sequence, ``[prompt | completion | pad...]``,
  ``attention_mask`` is the usual (R, L) 0/1 tensor, R = K * G (the sequences present).
* packed  (``packed=True``): several groups per row, each laid out once as
  ``[prompt | completion_0 | completion_1 ...]``; each completion's position ids
  continue from the end of its prompt, it attends to its prompt and its own earlier
  tokens only. ``attention_mask`` is a (R, 1, L, L) bool tensor, True = may attend
  (converted to what the attention implementation needs by ``preftune.model.logprobs``).

Either way, the completion tokens whose log-probs we need are listed flat (N tokens):
the hidden state at ``(token_rows[i], token_cols[i])`` predicts ``token_targets[i]``,
which belongs to sequence ``token_seq[i]``. ``preftune.model.logprobs`` gathers exactly these
hidden states and applies the output head only there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, L) long
    position_ids: torch.Tensor  # (R, L) long
    attention_mask: torch.Tensor  # (R, L) long (padded) or (R, 1, L, L) bool (packed)
    token_rows: torch.Tensor  # (N,) long: row of the predicting hidden state
    token_cols: torch.Tensor  # (N,) long: column of the predicting hidden state
    token_targets: torch.Tensor  # (N,) long: the target token id
    token_seq: torch.Tensor  # (N,) long: sequence id in [0, K * G)
    example_index: torch.Tensor  # (G,) long: dataset index of each group
    num_groups: int  # G
    num_completions: int  # K
    packed: bool
    labels: torch.Tensor | None = None  # (G,) bool, KTO desirable/undesirable
    margins: torch.Tensor | None = None  # (G,) float, pairs' margin field (reward models), None if none has one
    num_tokens: int = 0  # non-padding tokens in input_ids (for tokens/s)
    # (N,) long: the target token's own column (token_cols + 1, except where a packed completion's first
    # token is predicted by its prompt's last token); a reward model reads each sequence's last one
    token_target_cols: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # (G, K) float, response groups' scores (higher = better; 0 where absent)
    completion_mask: torch.Tensor | None = None  # (G, K) bool, response groups: which completions exist

    @property
    def num_sequences(self) -> int:
        return self.num_groups * self.num_completions

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor to ``device`` (non-blocking where possible)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return Batch(**out)
