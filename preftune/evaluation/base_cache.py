"""The base model's share of an evaluation, kept in one JSON file and read back by the next evaluation
against the same base (a sweep's variants compute it once): :class:`BaseCache`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from preftune.common.files import write_atomic
from preftune.training.reference import weights_fingerprint

log = logging.getLogger("preftune")


class BaseCache:
    """What an evaluation computes on the base alone, kept in one JSON file for the next evaluation.

    Every variant of a sweep is evaluated against the same base on the same held-out data, and a
    third of that work is the base's: its log-probs of the held-out pairs or response groups (the
    reference side of the implicit reward), its NLL on the NLL data, its samples and a scoring
    judge's scores of them (a reward model's;
    :meth:`preftune.evaluation.judges.base.ScoringJudge.cache_parts`). Those
    depend only on the base, the data and the settings, never on the variant, so
    :func:`preftune.evaluation.evaluate.evaluate_model` with ``base_cache`` computes each once and
    reads it back afterwards. An entry's key hashes everything it depends on: every weight of the
    base (:func:`preftune.training.reference.weights_fingerprint`), the tokenized examples or
    prompts, the batch layout (batch size, packing, logit chunk), the compute dtype, the device type
    and the torch version, for samples the sampling settings and seed, and for judge scores the
    judge's weights and settings; a changed input is a new key, never a stale value. Values read
    back are exactly the computed ones (floats round-trip through JSON), so a cached evaluation
    equals an uncached one.
    ``reused`` lists the entries read back, ``stored`` those computed and written.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike, base):
        self.path = Path(path)
        self.base = base
        self._weights: str | None = None
        self.reused: list[str] = []
        self.stored: list[str] = []

    @property
    def states_dir(self) -> Path:
        """The folder beside this cache's file where the prompt states of the base and of a reward-model judge
        are kept (:mod:`preftune.evaluation.prompt_states`): ``FILE``'s name without its suffix, plus
        ``-prompt-states``."""
        return self.path.with_name(self.path.stem + "-prompt-states")

    def _entries(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("base cache %s unreadable (%s): computing again", self.path, exc)
            return {}
        return raw.get("entries", {}) if raw.get("version") == self.VERSION else {}

    def key(self, kind: str, parts: dict) -> str:
        if self._weights is None:
            self._weights = weights_fingerprint(self.base)
        text = json.dumps({"kind": kind, "weights": self._weights, "torch": torch.__version__, **parts},
                          sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def get_or_compute(self, kind: str, parts: dict, compute):
        """The cached value of (kind, parts), else ``compute()`` stored under that key."""
        key = self.key(kind, parts)
        entry = self._entries().get(key)
        if entry is not None:
            self.reused.append(kind)
            log.info("base cache: reusing the base's %s (%s)", kind, self.path)
            return entry["value"]
        value = compute()
        entries = self._entries()  # read again: another evaluation may have written since
        entries[key] = {"kind": kind, "value": value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"version": self.VERSION, "entries": entries}))
        self.stored.append(kind)
        return value

    def summary(self) -> dict:
        return {"path": str(self.path), "reused": list(self.reused), "stored": list(self.stored)}
