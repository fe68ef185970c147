"""``OUTPUT/README.md``: a Hugging Face model card for the trained folder, so it can be pushed as it is.

The YAML header is :class:`huggingface_hub.ModelCardData` (``base_model``, ``datasets``, ``tags``,
``library_name``, ``pipeline_tag``); the body says what was trained on what, how, against which
reference, and the held-out metrics before and after (from the run's ``summary.json`` dict).
``base_model`` and ``datasets`` are only hub ids (the hub refuses local paths there): a local base
model folder is followed to the hub model it came from where its own card or config names one,
and is otherwise named in the body only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from preftune.common.files import write_atomic
from preftune.common.text import number
from preftune.common.version import VERSION

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The training options a reader of the card wants, in order (the method's own options, from the method
# table, come first); the rest is in config.yaml.
SHOWN_OPTIONS = ("learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay", "batch_size",
                 "grad_accum", "epochs", "max_steps", "max_grad_norm", "max_length", "max_prompt_length", "lora_r",
                 "lora_alpha", "lora_dropout", "lora_targets", "precompute_ref", "packing", "seed")


def write_model_card(out: str | os.PathLike, cfg, summary: dict, num_examples: int) -> Path:
    """Write ``out/README.md`` atomically (temp file, fsync, ``os.replace``) and return its path.

    ``summary`` is the dict the loop writes to ``summary.json`` (``steps``, ``eval_before``,
    ``eval_after``, ``reference``, ``mixed_precision`` ...); ``num_examples`` the training
    examples used (pairs, or KTO / SFT examples).
    """
    path = Path(out) / "README.md"
    write_atomic(path, model_card_text(cfg, summary, num_examples))
    return path


def model_card_text(cfg, summary: dict, num_examples: int) -> str:
    """The card: YAML metadata (ModelCardData) and a markdown body."""
    from huggingface_hub import ModelCardData

    base = hub_base_model(cfg.model)
    datasets = [d.split(":")[0] for d in (cfg.data, cfg.eval_data) if d and _is_hub_id(d.split(":")[0])]
    adapter = bool(cfg.lora_r) and not cfg.merge_lora
    method = cfg.method  # the method table's row(s): preftune.methods.table
    tags = ["preftune", *(m.name for m in method.methods)] + (["lora"] if cfg.lora_r else [])
    data = ModelCardData(base_model=base, datasets=list(dict.fromkeys(datasets)) or None,
                         library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
                         tags=tags)
    name = Path(cfg.output_dir).name if cfg.output_dir else "model"
    kind = {"pair": "preference pairs", "unpaired": "KTO examples", "sft": "SFT examples",
            "group": "response groups"}[cfg.kind]
    lines = [f"# {name}", "",
             f"{'LoRA adapters for' if adapter else 'A fine-tune of'} `{cfg.model}`"
             + (f" (hub: [{base}](https://huggingface.co/{base}))" if base and base != cfg.model else "")
             + f", trained with {_method_text(method)} by preftune {VERSION}.", "",
             "## Training data", "",
             f"- file: `{cfg.data}`: {num_examples} {kind}"
             + (f" (the first {cfg.max_examples} records)" if cfg.max_examples else ""),
             f"- fingerprint: {_fingerprint_text(cfg.data)}"]
    if summary.get("train_data"):
        lines.append(f"- read: {summary['train_data']}")
    if cfg.eval_data:
        lines.append(f"- held-out: `{cfg.eval_data}`, fingerprint {_fingerprint_text(cfg.eval_data)}")
    lines += ["", "## Method and hyperparameters", "", "| option | value |", "|---|---|"]
    own = ["loss"] + (["loss_weights"] if len(method.methods) > 1 else []) + sorted(method.fields | {"beta"})
    lora = {"lora_alpha", "lora_dropout", "lora_targets"}
    for key in dict.fromkeys(own + list(SHOWN_OPTIONS)):
        value = getattr(cfg, key, None)
        if (key == "beta" and "beta" not in method.fields and not method.reference) or \
                (key in lora and not cfg.lora_r) or value is None:
            continue
        if key == "warmup_ratio" and cfg.warmup_steps is not None:  # overridden by warmup_steps
            continue
        lines.append(f"| `{key}` | `{value}` |")
    lines += [f"| steps | {summary.get('steps', '?')} |",
              f"| processes | {summary.get('processes', 1)} |",
              f"| mixed precision | {summary.get('mixed_precision', cfg.mixed_precision)} |",
              f"| gradient checkpointing | {summary.get('gradient_checkpointing', cfg.gradient_checkpointing)} |",
              "", "Every option is in `config.yaml`; the training curves are in `metrics.jsonl`.", "",
              "## Reference model", "", f"{summary.get('reference', 'none')}", ""]
    lines += _metrics_section(summary.get("eval_before") or {}, summary.get("eval_after") or {})
    lines += ["## Framework versions", "", *[f"- {n}: {v}" for n, v in _versions(VERSION)], ""]
    header = data.to_yaml()
    return f"---\n{header}\n---\n\n" + "\n".join(lines)


def _method_text(method) -> str:
    """``dpo (Rafailov et al. 2023)``, or a weighted sum of several."""
    parts = [f"{m.name} ({m.short_citation})" for m in method.methods]
    if len(parts) == 1:
        return parts[0]
    return "the weighted sum " + " + ".join(f"{w:g} x {p}" for w, p in zip(method.weights, parts))


def _metrics_section(before: dict, after: dict) -> list[str]:
    if not after:
        return ["## Held-out metrics", "", "None: the run had no held-out data (--eval-data).", ""]
    lines = ["## Held-out metrics", "", "| metric | before | after |", "|---|---|---|"]
    for key in sorted(after):
        lines.append(f"| {key} | {number(before.get(key), missing='')} | {number(after[key], missing='')} |")
    return lines + ["", "Before = the starting model (policy = reference), after = the trained model, with "
                        "the training objective on the held-out data.", ""]


def _versions(preftune_version: str) -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    found = [("preftune", preftune_version)]
    for name in ("torch", "transformers", "accelerate", "peft"):
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------------------------------------- sources

def _is_hub_id(name: str | None) -> bool:
    return bool(name) and HUB_ID.match(str(name)) is not None and not Path(str(name)).exists()


def hub_base_model(model: str | None) -> str | None:
    """``model`` if it is a hub id; for a local folder the hub model it came from, where its model card
    (``base_model``), its adapter config or its config (``_name_or_path``) names one; else None."""
    if not model:
        return None
    if _is_hub_id(model):
        return model
    folder = Path(model)
    if not folder.is_dir():
        return None
    card = folder / "README.md"
    if card.is_file():
        try:
            from huggingface_hub import ModelCard

            base = ModelCard.load(card).data.to_dict().get("base_model")
            base = base[0] if isinstance(base, list) and base else base
            if isinstance(base, str) and _is_hub_id(base):
                return base
        except Exception:  # a README that is no card: look elsewhere
            pass
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("config.json", "_name_or_path")):
        try:
            value = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and _is_hub_id(value):
            return value
    return None


def source_file_fingerprint(source: str | os.PathLike) -> str | None:
    """``sha256:<hex>`` of a data file's bytes (a folder: of its files' relative names and bytes, in
    order); None for a hub dataset name or a path that does not exist."""
    path = Path(source)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.sha256()
    for name, file in files:
        if path.is_dir():
            digest.update(name.encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _fingerprint_text(source: str) -> str:
    found = source_file_fingerprint(source)
    return f"`{found}`" if found else "none (a hub dataset: see its revision on the hub)"
