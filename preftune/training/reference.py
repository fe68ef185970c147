"""Where reference log-probs come from.

* :class:`ModelReference` — a frozen, separate copy of the starting weights (or ``--ref-model``).
* :class:`AdapterOffReference` — the LoRA policy itself with its adapters disabled (no copy).
* :class:`CachedReference` — log-probs computed once before training (``--precompute-ref``),
  stored in a safetensors file keyed by a fingerprint of everything that changes them.
* :class:`SharedReference` — a live reference behind a table filled lazily (``--share-ref-cache``): a row
  computed by any run on the same data and reference is stored, so a later run (a sweep's next variant)
  computes only the rows it lacks.
* ``None`` — reference-free methods (ORPO, SimPO, SFT) load no reference at all.

Every reference answers ``logps(batch) -> (S,)`` summed log-probs (S = K * G, sequence s = k * G + g), without
grad — for a batch of response groups too (absent responses 0; :func:`preftune.model.logprobs.group_logps`
makes them (G, K)) — or, with
``ld_alpha`` (LD-DPO), the same length-desensitised sums the policy's are
(:func:`preftune.methods.losses.modifiers.length_desensitized_logps`). A :class:`ModelReference` can
also take TR-DPO's soft updates from the policy (:meth:`ModelReference.sync`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from preftune.common.files import DiskFullError, atomic_path, size_text, write_guard
from preftune.data.batch import Batch
from preftune.methods.losses.modifiers import length_desensitized_logps
from preftune.model.logprobs import LogpOutput, batch_logps

log = logging.getLogger("preftune")

CACHE_FORMAT_VERSION = 1


class ModelReference:
    """A frozen, separate reference model run on the same batch layout as the policy.

    ``syncs``: the run will :meth:`sync` it from ``policy`` (TR-DPO), so their parameters must
    match by name and shape; checked here, before any step.
    """

    def __init__(self, model, policy=None, chunk_size: int = 1024, description: str = "frozen copy",
                 compute_dtype: torch.dtype | None = None, ld_alpha: float | None = None, syncs: bool = False):
        if policy is not None:
            check_separate(policy, model)
            if syncs:
                _check_same_parameters(policy, model)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.chunk_size = chunk_size
        self.description = description
        self.compute_dtype = compute_dtype  # mixed precision: the policy's matmul dtype
        self.ld_alpha = ld_alpha

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        out = batch_logps(self.model, batch, chunk_size=self.chunk_size, compute_dtype=self.compute_dtype)
        return sequence_logps(out, batch, self.ld_alpha)

    @torch.no_grad()
    def sync(self, policy, alpha: float) -> None:
        """TR-DPO: Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
        the soft update, every ``ref_model_sync_steps`` optimizer steps:

            theta_ref <- alpha * theta_policy + (1 - alpha) * theta_ref

        alpha = 1 is the hard update (the reference becomes the policy). Computed in float32 and
        stored in the reference's own dtype; ``policy`` is the plain (unwrapped) model.
        """
        policy_params = _check_same_parameters(policy, self.model)
        for name, ref_param in self.model.named_parameters():
            mixed = alpha * policy_params[name].detach().float() + (1.0 - alpha) * ref_param.float()
            ref_param.copy_(mixed.to(ref_param.dtype))


def _check_same_parameters(policy, reference) -> dict:
    """The policy's parameters by name, after checking the reference has the same names and shapes."""
    policy_params = dict(policy.named_parameters())
    ref_params = dict(reference.named_parameters())
    missing = sorted(set(ref_params) ^ set(policy_params))
    shapes = [n for n in ref_params if n in policy_params and ref_params[n].shape != policy_params[n].shape]
    if missing or shapes:
        first = (missing or shapes)[0]
        raise ValueError(f"--sync-ref-model (TR-DPO) mixes the policy's weights into the reference's, but their "
                         f"parameters differ ({len(missing)} names, {len(shapes)} shapes; e.g. {first}): the "
                         f"reference must be the same architecture as the policy, with unsharded weights (not "
                         f"FSDP / DeepSpeed ZeRO-3)")
    return policy_params


def sequence_logps(out: LogpOutput, batch: Batch, ld_alpha: float | None = None) -> torch.Tensor:
    """(S,) float32 summed log-probs of ``out``, length-desensitised when ``ld_alpha`` is set (pairs)."""
    if ld_alpha is None:
        return out.logps.float()
    return length_desensitized_logps(out.token_logps, batch.token_seq, batch.num_groups, ld_alpha)


class AdapterOffReference:
    """The LoRA-wrapped policy with adapters disabled: the starting weights, no second copy."""

    description = "policy with LoRA adapters disabled"

    def __init__(self, peft_model, chunk_size: int = 1024, forward=None, compute_dtype: torch.dtype | None = None,
                 ld_alpha: float | None = None):
        self.model = peft_model
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        self.ld_alpha = ld_alpha
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
                return sequence_logps(out, batch, self.ld_alpha)
        finally:
            self.model.train(was_training)


class CachedReference:
    """Reference log-probs looked up by dataset index: ``table`` is (num_examples, K_max), K_max the most
    completions of an example (response groups of fewer have 0 beyond theirs); a batch of K takes the
    first K columns."""

    description = "precomputed cache"

    def __init__(self, table: torch.Tensor, path: Path | None = None):
        self.table = table
        self.path = path

    def logps(self, batch: Batch) -> torch.Tensor:
        rows = self.table.to(batch.example_index.device)[batch.example_index]  # (G, K_max)
        return rows[:, :batch.num_completions].t().reshape(-1)  # (K * G,): sequence s = k * G + g


class SharedReference:
    """A live reference behind a (num_examples, K_max) table shared through ``path`` by every run on the same
    examples and reference (the file's ``key``, :func:`cache_key`), filled lazily.

    A batch whose rows are all in the table runs no forward; otherwise the missing rows are computed by
    ``live`` (the whole batch when none of its rows is known, as a live reference would, else a batch of the
    missing examples made by ``make_batch(list_of_examples) -> Batch``), stored in the table and written to
    ``path`` merged with what other runs wrote there meanwhile (:func:`save_rows`: atomic, so a reader sees a
    whole file; two writers at worst lose each other's newest rows, recomputed later). ``examples[i].index``
    must be ``i``. ``computed`` / ``reused``: rows this run computed / found stored. One process only: the
    rows of other ranks' batches would be missing from each rank's table.
    """

    def __init__(self, live, examples, make_batch, path: Path, key: str):
        self.live = live
        self.model = live.model
        self.examples = examples
        self.make_batch = make_batch
        self.path = Path(path)
        self.key = key
        if any(ex.index != i for i, ex in enumerate(examples)):
            raise ValueError("SharedReference: examples[i].index must be i (the table's row)")
        num_k = max(len(ex.completions) for ex in examples)
        self.table = torch.zeros(len(examples), num_k, dtype=torch.float32)
        self.known = torch.zeros(len(examples), dtype=torch.bool)
        self.computed = 0
        self.reused = 0
        self.writable = True
        self.seen = None  # the stored file's (mtime, size) when last read or written
        self.refresh()
        self.description = f"shared cache {self.path} over the {live.description}"

    def refresh(self) -> None:
        """Take the rows stored at ``path`` that this table lacks (read only when the file changed)."""
        stamp = file_stamp(self.path)
        if stamp is None or stamp == self.seen:
            return
        self.seen = stamp
        stored = load_rows(self.path, self.key, tuple(self.table.shape))
        if stored is None:
            return
        table, known = stored
        new = known & ~self.known
        self.table[new] = table[new]
        self.known |= new

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        index = batch.example_index.cpu()
        missing = ~self.known[index]
        if missing.any():
            self.refresh()  # another run may have stored them meanwhile
            missing = ~self.known[index]
        if missing.any():
            self._compute(batch, index, missing)
        self.reused += int((~missing).sum())
        rows = self.table[index][:, :batch.num_completions]  # (G, K)
        return rows.t().reshape(-1).to(batch.example_index.device)  # (K * G,): sequence s = k * G + g

    def _compute(self, batch: Batch, index: torch.Tensor, missing: torch.Tensor) -> None:
        """Compute the rows of ``index[missing]`` with the live reference, store them in the table and on disk."""
        if not missing.all():
            ids = index[missing].tolist()
            batch = self.make_batch([self.examples[i] for i in ids]).to(batch.example_index.device)
            index = torch.tensor(ids)
        rows = self.live.logps(batch).view(batch.num_completions, batch.num_groups).t().float().cpu()  # (G, K)
        self.table[index, :batch.num_completions] = rows
        self.known[index] = True
        self.computed += len(index)
        if self.writable:
            self.writable = save_rows(self.path, self.table, self.known, self.key)
            self.seen = file_stamp(self.path)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of ``path``; None when it does not exist."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


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


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary, special tokens and chat template (texts' token ids depend on them)."""
    parts = [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.chat_template or ""]
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).hexdigest()


def examples_fingerprint(examples) -> str:
    """Hash of the tokenized examples: covers the data, the tokenizer and every truncation setting."""
    digest = hashlib.blake2b(digest_size=16)
    for ex in examples:
        digest.update(json.dumps([ex.index, ex.prompt_ids, ex.completions]).encode())
    return digest.hexdigest()


def cache_key(examples, model, dtype: str, extra: dict | None = None, weights: str | None = None) -> str:
    """The cache file's key: data + reference weights + dtype + anything in ``extra``; ``weights``: the
    model's :func:`weights_fingerprint` when already known (not hashed again)."""
    parts = {"version": CACHE_FORMAT_VERSION, "data": examples_fingerprint(examples),
             "weights": weights or weights_fingerprint(model), "dtype": dtype, **(extra or {})}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


@torch.no_grad()
def compute_reference_table(reference, examples, make_batch, batch_size: int, accelerator=None,
                            progress: bool = True) -> torch.Tensor:
    """Reference log-probs for every example: (num_examples, K_max) float32, K_max the most completions of an
    example (0 beyond a response group's own).

    ``reference`` is a live reference (:class:`ModelReference` or :class:`AdapterOffReference`:
    its ``logps`` runs in eval mode, adapters disabled where it has them). Under several
    processes each rank computes a strided share and the shares are gathered, so every rank
    ends with the full table. ``make_batch(list_of_examples) -> Batch``.
    """
    from tqdm.auto import tqdm

    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    num_k = max(len(ex.completions) for ex in examples)
    mine = list(range(rank, len(examples), world))
    order = sorted(mine, key=lambda i: examples[i].num_tokens)  # similar lengths together: less padding
    local = torch.zeros(len(examples), num_k, dtype=torch.float32, device=device)
    bar = tqdm(total=len(order), desc="reference log-probs", unit="ex", disable=not progress or rank != 0)
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        batch = make_batch([examples[i] for i in ids]).to(device)
        rows = reference.logps(batch).view(batch.num_completions, batch.num_groups).t()  # (G, K)
        local[torch.tensor(ids, device=device), :batch.num_completions] = rows
        bar.update(len(ids))
    bar.close()
    if world > 1:
        # Each row is filled by exactly one rank and zero elsewhere: a sum gathers the table.
        local = accelerator.reduce(local, reduction="sum")
    return local.cpu()


def save_cache(path: Path, table: torch.Tensor, key: str) -> bool:
    """Write the table atomically (:func:`preftune.common.files.atomic_path`) as safetensors with its key;
    whether it was written.

    A failed write (a full disk, a read-only folder) is a warning naming the path and the space needed,
    never an error: the table is in memory and training goes on with it, uncached.
    """
    from safetensors.torch import save_file

    needed = table.numel() * table.element_size()
    try:
        with write_guard(path, needed):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, needed) as tmp:  # removed again when the write fails
                save_file({"logps": table.contiguous()}, str(tmp),
                          metadata={"key": key, "version": str(CACHE_FORMAT_VERSION)})
    except Exception as exc:  # DiskFullError, other OS errors, safetensors' SafetensorError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = str(exc) if isinstance(exc, DiskFullError) else f"{path}: {first} (needs about {size_text(needed)})"
        log.warning("reference cache not written: %s; training goes on with the table computed in memory "
                    "(the next run computes it again)", why)
        return False
    return True


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


def save_rows(path: Path, table: torch.Tensor, known: torch.Tensor, key: str) -> bool:
    """Write a :class:`SharedReference`'s table and its known rows atomically, merged with the rows another
    run stored at ``path`` since (``table`` and ``known`` take them too, in place); whether it was written. A failed write
    is one warning, never an error: the run goes on with the table in memory."""
    from safetensors.torch import save_file

    stored = load_rows(path, key, tuple(table.shape))
    if stored is not None:
        theirs = stored[1] & ~known
        table[theirs] = stored[0][theirs]
        known |= theirs
    needed = table.numel() * table.element_size() + known.numel()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, needed) as tmp:
            save_file({"logps": table.contiguous(), "known": known.to(torch.uint8)}, str(tmp),
                      metadata={"key": key, "version": str(CACHE_FORMAT_VERSION)})
    except Exception as exc:  # DiskFullError, CannotWriteError, other OS errors
        log.warning("shared reference cache not written: %s; this run goes on computing its reference "
                    "log-probs in memory", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
        return False
    return True


def load_rows(path: Path, key: str, shape: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A shared table at ``path`` as (logps (N, K_max), known (N,) bool); None when absent, unreadable or
    of another key or shape (never trusted: its rows are computed again)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            table, known = f.get_tensor("logps"), f.get_tensor("known").bool()
    except Exception as exc:  # a foreign or damaged file
        log.warning("shared reference cache %s unreadable (%s); its rows are computed again", path, exc)
        return None
    return (table, known) if tuple(table.shape) == tuple(shape) and known.shape == table.shape[:1] else None
