"""Where reference log-probs come from.

* :class:`ModelReference` — a frozen, separate copy of the starting weights (or ``--ref-model``).
* :class:`AdapterOffReference` — the LoRA policy itself with its adapters disabled (no copy).
* :class:`CachedReference` — log-probs computed once before training (``--precompute-ref``),
  stored in a safetensors file keyed by a fingerprint of everything that changes them.
* ``None`` — reference-free methods (ORPO, SimPO, SFT) load no reference at all.

Every reference answers ``logps(batch) -> (S,)`` summed log-probs, without grad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .batch import Batch
from .logprobs import batch_logps

log = logging.getLogger("preftune")

CACHE_FORMAT_VERSION = 1


class ModelReference:
    """A frozen, separate reference model run on the same batch layout as the policy."""

    def __init__(self, model, policy=None, chunk_size: int = 1024, description: str = "frozen copy",
                 compute_dtype: torch.dtype | None = None):
        if policy is not None:
            check_separate(policy, model)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.chunk_size = chunk_size
        self.description = description
        self.compute_dtype = compute_dtype  # mixed precision: the policy's matmul dtype

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        return batch_logps(self.model, batch, chunk_size=self.chunk_size,
                           compute_dtype=self.compute_dtype).logps.float()


class AdapterOffReference:
    """The LoRA-wrapped policy with adapters disabled: the starting weights, no second copy."""

    description = "policy with LoRA adapters disabled"

    def __init__(self, peft_model, chunk_size: int = 1024, forward=None, compute_dtype: torch.dtype | None = None):
        self.model = peft_model
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        # The training loop sets ``forward`` to the prepared (DDP/FSDP-wrapped) LogProbModel: under
        # FSDP only the wrapped module's forward gathers the sharded weights the body needs.
        self.forward = forward

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with self.model.disable_adapter():
                out = (self.forward(batch) if self.forward is not None
                       else batch_logps(self.model, batch, chunk_size=self.chunk_size,
                                        compute_dtype=self.compute_dtype))
                return out.logps.float()
        finally:
            self.model.train(was_training)


class CachedReference:
    """Reference log-probs looked up by dataset index: ``table`` is (num_examples, K)."""

    description = "precomputed cache"

    def __init__(self, table: torch.Tensor, path: Path | None = None):
        self.table = table
        self.path = path

    def logps(self, batch: Batch) -> torch.Tensor:
        rows = self.table.to(batch.example_index.device)[batch.example_index]  # (G, K)
        return rows.t().reshape(-1)  # sequence s = k * G + g


def check_separate(policy, reference) -> None:
    """Refuse a reference that *is* the policy or shares its parameters (PITFALLS: loss stuck at 0.6931)."""
    if policy is reference:
        raise ValueError("the reference model is the policy object itself; it would receive the updates")
    policy_params = {p.data_ptr() for p in policy.parameters()}
    shared = [n for n, p in reference.named_parameters() if p.data_ptr() in policy_params]
    if shared:
        raise ValueError(f"the reference model shares {len(shared)} parameter tensors with the policy "
                         f"(e.g. {shared[0]}); it must be a separate frozen copy")


# --------------------------------------------------------------------------------------------
# Precomputed cache
# --------------------------------------------------------------------------------------------

def weights_fingerprint(model) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def data_fingerprint(examples) -> str:
    """Hash of the tokenized examples: covers the data, the tokenizer and every truncation setting."""
    digest = hashlib.blake2b(digest_size=16)
    for ex in examples:
        digest.update(json.dumps([ex.index, ex.prompt_ids, ex.completions]).encode())
    return digest.hexdigest()


def cache_key(examples, model, dtype: str, extra: dict | None = None) -> str:
    """The cache file's key: data + reference weights + dtype + anything in ``extra``."""
    parts = {"version": CACHE_FORMAT_VERSION, "data": data_fingerprint(examples),
             "weights": weights_fingerprint(model), "dtype": dtype, **(extra or {})}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


@torch.no_grad()
def compute_reference_table(reference, examples, make_batch, batch_size: int, accelerator=None,
                            progress: bool = True) -> torch.Tensor:
    """Reference log-probs for every example: (num_examples, K) float32.

    ``reference`` is a live reference (:class:`ModelReference` or :class:`AdapterOffReference`:
    its ``logps`` runs in eval mode, adapters disabled where it has them). Under several
    processes each rank computes a strided share and the shares are gathered, so every rank
    ends with the full table. ``make_batch(list_of_examples) -> Batch``.
    """
    from tqdm.auto import tqdm

    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    num_k = len(examples[0].completions)
    mine = list(range(rank, len(examples), world))
    order = sorted(mine, key=lambda i: examples[i].num_tokens)  # similar lengths together: less padding
    local = torch.zeros(len(examples), num_k, dtype=torch.float32, device=device)
    bar = tqdm(total=len(order), desc="reference log-probs", unit="ex", disable=not progress or rank != 0)
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        batch = make_batch([examples[i] for i in ids]).to(device)
        local[torch.tensor(ids, device=device)] = reference.logps(batch).view(num_k, batch.num_groups).t()
        bar.update(len(ids))
    bar.close()
    if world > 1:
        # Each row is filled by exactly one rank and zero elsewhere: a sum gathers the table.
        local = accelerator.reduce(local, reduction="sum")
    return local.cpu()


def save_cache(path: Path, table: torch.Tensor, key: str) -> None:
    """Write the table atomically (temp file + rename) as safetensors with its key."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": table.contiguous()}, str(tmp), metadata={"key": key, "version": str(CACHE_FORMAT_VERSION)})
    os.replace(tmp, path)


def load_cache(path: Path, key: str) -> torch.Tensor | None:
    """The cached table, or None when absent or written under another key (stale: never used)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                log.warning("reference cache %s has another fingerprint; recomputing", path)
                return None
            return f.get_tensor("logps")
    except Exception as exc:  # a torn or foreign file is recomputed, never trusted
        log.warning("reference cache %s unreadable (%s); recomputing", path, exc)
        return None
