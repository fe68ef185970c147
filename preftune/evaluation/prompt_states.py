"""A model's state after each prompt — its key/value cache and its output there — computed once and reused
to score many completions of the same prompts.

An evaluation scores replies to the same held-out prompts again and again: the base scores every variant's
samples for the KL, the reward-model judge scores the variant's samples and the base's. Prompts are most of
those tokens (HH-RLHF: prompts of 30 to 800+ tokens, replies of up to 48), so :class:`PromptStates` runs each
prompt once through the lean forward (:class:`preftune.model.fast_decode.LeanDecoder`, for the Llama family;
other models keep the full forward) and keeps, per prompt, every layer's keys and values and the head's
output at its last token; :func:`score_with_states` then runs only the completion tokens on top of them.
With a file (:meth:`PromptStates.load_or_compute`) the states serve every evaluation against the same model:
the file is named by a hash of the model's weights, the compute dtype and the torch version (a changed
weight is a new file, never a stale one) and lists its prompts' token ids; a call whose prompts are all
there reads it, one with new prompts computes those and adds them.

The arithmetic is that of one forward of prompt + completion (the completion's queries attend over the
prompt's cached keys): equal to the full forward within 1e-4 in float32; in bf16 the completion's tokens
round differently from a packed forward of the whole text, as the sampler's own log-probs do
(``docs/evaluation.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from preftune.common.files import atomic_path
from preftune.model.fast_decode import LeanDecoder

log = logging.getLogger(__name__)

HEAD_CHUNK = 256  # completion positions per head matmul (x vocabulary floats: ~50 MB for a 49k vocabulary)


class PromptStates:
    """Keys, values and last-token head outputs of a set of prompts under one model.

    ``keys``/``values``: (layers, kv-heads, total prompt tokens, head-dim) in the compute dtype, the prompts
    one after another; ``last``: (prompts, head outputs) float32 — the logits of the token after the prompt
    (a reward model: its score of the prompt alone); ``index[prompt ids]`` a prompt's row, ``offsets[row]``
    where its tokens start."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor, prompts: list[tuple[int, ...]]):
        self.keys, self.values, self.last = keys, values, last
        self.index: dict[tuple[int, ...], int] = {}
        self.offsets: list[int] = []
        offset = 0
        for row, ids in enumerate(prompts):
            self.index[ids] = row
            self.offsets.append(offset)
            offset += len(ids)
        self.prompts = prompts
        if offset != keys.shape[2]:
            raise ValueError(f"prompt states hold {keys.shape[2]} tokens, the prompts {offset}")

    def __contains__(self, ids: Sequence[int]) -> bool:
        return tuple(ids) in self.index

    @classmethod
    def compute(cls, lean: LeanDecoder, prompt_ids: Sequence[Sequence[int]], batch_size: int,
                pad_id: int) -> "PromptStates":
        """Run every distinct prompt once (batches of ``batch_size``, longest first, the sampler's grouped
        prefill) and keep its states."""
        from preftune.evaluation.decoding import _left_pad

        prompts = list(dict.fromkeys(tuple(ids) for ids in prompt_ids))
        if any(not ids for ids in prompts):
            raise ValueError("every prompt needs at least one token")
        order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p]))
        keys: list[torch.Tensor | None] = [None] * len(prompts)
        values: list[torch.Tensor | None] = [None] * len(prompts)
        last = [None] * len(prompts)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                input_ids, mask = (t.to(lean.device) for t in _left_pad([prompts[p] for p in rows], pad_id))
                out = lean.prefill(input_ids, mask, 0)  # (b, head outputs) float32
                width = input_ids.shape[1]
                for b, p in enumerate(rows):
                    span = slice(width - len(prompts[p]), width)
                    keys[p] = lean.k_cache[:, b, :, span].clone()
                    values[p] = lean.v_cache[:, b, :, span].clone()
                    last[p] = out[b].cpu()
                lean.release()
        return cls(torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.stack(last), prompts)

    @classmethod
    def load_or_compute(cls, path: Path | None, key: str, lean: LeanDecoder, prompt_ids: Sequence[Sequence[int]],
                        batch_size: int, pad_id: int) -> tuple["PromptStates", bool]:
        """The states kept at ``path`` under ``key`` when every prompt of ``prompt_ids`` is among them (a
        judge scoring only some of the prompts reads the same file) -> ``(states, True)``; else the missing
        prompts are computed and added to the kept ones (the union written back atomically, while it stays
        within :data:`STATES_BUDGET`; beyond it the file holds this call's prompts) -> ``(states, False)``."""
        kept = cls.load(path, key, lean.device) if path is not None and path.is_file() else None
        if kept is not None and all(ids in kept for ids in prompt_ids):
            return kept, True
        missing = [ids for ids in prompt_ids if kept is None or ids not in kept]
        states = cls.compute(lean, missing, batch_size, pad_id)
        if kept is not None:
            if kept.nbytes + states.nbytes <= STATES_BUDGET:
                states = kept.merged(states)
            else:  # the union would pass the budget: this call's prompts only
                states = kept.select([ids for ids in prompt_ids if ids in kept]).merged(states)
        if path is not None:
            states.save(path, key)
        return states, False

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.last.nbytes

    def merged(self, other: "PromptStates") -> "PromptStates":
        """These states and ``other``'s (prompts not among these) in one set."""
        new = [ids for ids in other.prompts if ids not in self.index]
        other = other.select(new)
        return PromptStates(torch.cat([self.keys, other.keys.to(self.keys.device)], dim=2),
                            torch.cat([self.values, other.values.to(self.values.device)], dim=2),
                            torch.cat([self.last, other.last]), self.prompts + other.prompts)

    def select(self, prompt_ids: Sequence[Sequence[int]]) -> "PromptStates":
        """The states of the distinct prompts of ``prompt_ids`` (each among these), in that order."""
        prompts = list(dict.fromkeys(tuple(ids) for ids in prompt_ids))
        rows = [self.index[ids] for ids in prompts]
        spans = [torch.arange(self.offsets[r], self.offsets[r] + len(self.prompts[r])) for r in rows]
        columns = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        columns = columns.to(self.keys.device)
        return PromptStates(self.keys.index_select(2, columns), self.values.index_select(2, columns),
                            self.last[rows] if rows else self.last[:0], prompts)

    def save(self, path: Path, key: str) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        ids = torch.tensor([t for ids in self.prompts for t in ids], dtype=torch.long)
        lengths = torch.tensor([len(ids) for ids in self.prompts], dtype=torch.long)
        tensors = {"keys": self.keys.contiguous().cpu(), "values": self.values.contiguous().cpu(),
                   "last": self.last.contiguous(), "ids": ids, "lengths": lengths}
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"key": key})
        except Exception as exc:  # a full disk: the states are still used in this process
            log.warning("could not keep the prompt states in %s (%s); they are recomputed next time", path, exc)

    @classmethod
    def load(cls, path: Path, key: str, device: torch.device) -> "PromptStates | None":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    return None
                keys, values = handle.get_tensor("keys").to(device), handle.get_tensor("values").to(device)
                last, ids, lengths = handle.get_tensor("last"), handle.get_tensor("ids"), handle.get_tensor("lengths")
        except Exception as exc:  # a truncated or foreign file: computed again
            log.warning("prompt states %s unreadable (%s): computing them again", path, exc)
            return None
        prompts, offset = [], 0
        for length in lengths.tolist():
            prompts.append(tuple(ids[offset:offset + length].tolist()))
            offset += length
        return cls(keys, values, last, prompts)

    def batch(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
        """The states of a batch of prompts, left padded to the longest: (layers, B, kv, P, hd) keys and
        values (zeros in the padding), (B, P) bool real columns, (B,) prompt lengths."""
        rows = [self.index[tuple(ids)] for ids in prompt_ids]
        lengths = [len(self.prompts[r]) for r in rows]
        width = max(lengths)
        layers, kv, _, head_dim = self.keys.shape
        shape = (layers, len(rows), kv, width, head_dim)
        keys = self.keys.new_zeros(shape)
        values = self.values.new_zeros(shape)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=self.keys.device)
        for b, (r, length) in enumerate(zip(rows, lengths)):
            span = slice(self.offsets[r], self.offsets[r] + length)
            keys[:, b, :, width - length:] = self.keys[:, :, span]
            values[:, b, :, width - length:] = self.values[:, :, span]
            valid[b, width - length:] = True
        return keys, values, valid, torch.tensor(lengths, dtype=torch.long)


def states_key(weights: str, compute_dtype, device: torch.device) -> str:
    """What a model's prompt states depend on besides the prompts (which the file lists): its weights
    fingerprint, the compute dtype, the device type and the torch version."""
    text = json.dumps({"weights": weights, "dtype": str(compute_dtype), "device": device.type,
                       "torch": torch.__version__, "version": 2}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _completion_order(prompt_ids, completion_ids) -> list[int]:
    """Rows with a completion, longest prompt first (batches of similar prompt length: little padding)."""
    rows = [s for s in range(len(prompt_ids)) if completion_ids[s]]
    return sorted(rows, key=lambda s: (-len(prompt_ids[s]), -len(completion_ids[s])))


def _run_batch(lean: LeanDecoder, states: PromptStates, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's completions on their prompts' states -> (B, T, D) normed hidden states, (B, T) ids."""
    keys, values, valid, prompt_lengths = states.batch(prompts)
    width = max(len(ids) for ids in completions)
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    for b, row in enumerate(completions):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return lean.extend(keys, values, valid, prompt_lengths, ids), ids


def _batches(lean: LeanDecoder, states: PromptStates, prompt_ids, completion_ids, batch_size: int):
    """The rows with a completion in batches (:func:`_completion_order`), each run over its prompts' states:
    yields ``(rows, completions, (B, T, D) normed hidden states, (B, T) right-padded ids)``."""
    order = _completion_order(prompt_ids, completion_ids)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            completions = [list(completion_ids[s]) for s in rows]
            hidden, ids = _run_batch(lean, states, [prompt_ids[s] for s in rows], completions)
            yield rows, completions, hidden, ids


def completion_logps_with_states(lean: LeanDecoder, states: PromptStates, prompt_ids: Sequence[Sequence[int]],
                                 completion_ids: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """(S,) float32 summed log-probs of the completions after their prompts (every prompt in ``states``),
    as :func:`preftune.evaluation.scoring.completion_logps` computes them: the first token's from the
    prompt's kept logits, the rest from one forward of the completion over the prompt's states (log-softmax
    in float32). An empty completion scores 0."""
    out = torch.zeros(len(prompt_ids), dtype=torch.float32)
    with torch.no_grad():
        for rows, completions, hidden, ids in _batches(lean, states, prompt_ids, completion_ids, batch_size):
            firsts = torch.log_softmax(states.last[[states.index[tuple(prompt_ids[s])] for s in rows]].float(), -1)
            totals = firsts.gather(-1, ids[:, :1]).squeeze(-1).double()  # (B,) the first token's log-prob
            # position t predicts token t + 1: only positions followed by a real token reach the head
            where = [(b, t) for b, row in enumerate(completions) for t in range(len(row) - 1)]
            for chunk in range(0, len(where), HEAD_CHUNK):
                part = where[chunk:chunk + HEAD_CHUNK]
                b_index = torch.tensor([b for b, _ in part])
                t_index = torch.tensor([t for _, t in part])
                logits = lean.head(hidden[b_index.to(hidden.device), t_index.to(hidden.device)])[0].float()
                targets = ids[b_index, t_index + 1].to(logits.device)
                logps = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1).double().cpu()
                totals.index_add_(0, b_index, logps)
            out[rows] = totals.float()
    return out


def scores_with_states(lean: LeanDecoder, states: PromptStates, prompt_ids: Sequence[Sequence[int]],
                       completion_ids: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """(S,) float32 one-logit head outputs (a reward model's scores) at the last token of each prompt +
    completion (every prompt in ``states``; an empty completion: the prompt's own score)."""
    out = torch.zeros(len(prompt_ids), dtype=torch.float32)
    for s in range(len(prompt_ids)):
        if not completion_ids[s]:
            out[s] = states.last[states.index[tuple(prompt_ids[s])], 0]
    with torch.no_grad():
        for rows, completions, hidden, _ in _batches(lean, states, prompt_ids, completion_ids, batch_size):
            ends = torch.tensor([len(row) - 1 for row in completions], device=hidden.device)
            last = hidden[torch.arange(len(rows), device=hidden.device), ends]  # (B, D)
            out[rows] = lean.head(last)[0].float()[:, 0].cpu()
    return out


def states_file(folder: Path, name: str, key: str) -> Path:
    """Where the states of ``name`` (``base``, ``judge``) under ``key`` are kept in ``folder``."""
    return Path(folder) / f"prompt-states-{name}-{key}.safetensors"


__all__ = ["PromptStates", "completion_logps_with_states", "scores_with_states", "states_file", "states_key"]


STATES_BUDGET = 4 << 30  # bytes of prompt states kept at once; larger jobs score the whole text instead


def states_bytes(model, prompt_ids: Sequence[Sequence[int]], compute_dtype) -> int:
    """What the states of the distinct prompts of ``prompt_ids`` take under ``model``, in bytes."""
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokens = sum(len(ids) for ids in {tuple(ids) for ids in prompt_ids})
    itemsize = (compute_dtype or next(model.parameters()).dtype).itemsize
    return 2 * config.num_hidden_layers * kv * head_dim * tokens * itemsize


def states_for(model, prompt_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, compute_dtype,
               folder: Path | None, name: str, weights: str | None = None):
    """``(lean decoder, PromptStates)`` of ``model`` for the prompts (kept in ``folder`` as ``name`` when
    given), or None where the lean forward does not run the model or the states would exceed
    :data:`STATES_BUDGET` (the caller then scores whole texts)."""
    from preftune.model.fast_decode import lean_decoder
    from preftune.training.reference import weights_fingerprint

    if not prompt_ids or states_bytes(model, prompt_ids, compute_dtype) > STATES_BUDGET:
        return None
    lean = lean_decoder(model, compute_dtype, batch_size, max(len(ids) for ids in prompt_ids))
    if lean is None:
        return None
    path = None
    if folder is not None:
        key = states_key(weights or weights_fingerprint(model), compute_dtype, lean.device)
        path = states_file(folder, name, key)
    else:
        key = ""
    states, reused = PromptStates.load_or_compute(path, key, lean, prompt_ids, batch_size, pad_id)
    if path is not None:
        log.info("prompt states of the %s: %s %s", name, "reusing" if reused else "computed and kept in", path)
    return lean, states
