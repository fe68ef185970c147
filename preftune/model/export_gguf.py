"""GGUF files out: a trained Hugging Face folder (or LoRA adapters, merged first) becomes one ``.gguf``
that llama.cpp, Ollama and LM Studio run, written with the ``gguf`` package alone (no llama.cpp checkout).

* :func:`plan_export` -- everything checked before a byte is written: the architecture (Llama, Mistral,
  Qwen2), the rope scaling, the tokenizer (:mod:`preftune.model.export_tokenizer`), an adapter folder's
  weights and base. A model it cannot export raises :class:`ExportError`, one line naming what is missing.
* :func:`export_gguf` -- loads the weights (merging LoRA adapters), names every tensor as llama.cpp does
  (``blk.N.attn_q.weight`` ...), permutes Llama / Mistral Q and K rows into llama.cpp's rotary layout
  (the inverse of what :mod:`preftune.model.gguf` undoes on reading), encodes 2-D weights at the asked
  quantization (1-D norms and biases stay F32, as llama.cpp keeps them), and writes the file atomically.

Quantizations: ``f32`` (exact), ``f16``, ``bf16``, ``q8_0`` (blocks of 32 int8 weights and one f16 scale;
a weight whose rows are not a multiple of 32 falls back to f16, as llama.cpp's converter does).
Mistral is written as llama.cpp writes it: architecture ``llama`` (a sliding window is not stored).
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from preftune.common.files import atomic_path
from preftune.model.errors import first_line
from preftune.model.export_tokenizer import ExportError, Vocabulary, vocabulary_of, write_vocabulary

log = logging.getLogger("preftune")

# quant -> (type of 2-D weights, the file type llama.cpp records)
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# transformers model_type -> (llama.cpp architecture, whether Q / K rows are permuted for its rotary layout)
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}
ROPE_TYPES = ("default", "linear")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class ExportPlan:
    """What :func:`plan_export` found: the folder, its config, tokenizer and vocabulary, and metadata."""

    model_dir: Path
    config: object  # transformers PretrainedConfig (of the base model for an adapter folder)
    tokenizer: object
    vocab: Vocabulary
    adapter_base: str | None = None  # the base model of a LoRA adapter folder
    name: str = "model"
    base_model: str | None = None
    license: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """The written file: its path, quantization, size in bytes and tensor count, and the plan it followed."""

    path: Path
    quant: str
    size_bytes: int
    tensors: int
    plan: ExportPlan


def plan_export(model_dir: str | os.PathLike, name: str | None = None) -> ExportPlan:
    """Check that ``model_dir`` can be exported, loading nothing heavier than its config and tokenizer.

    Raises :class:`ExportError` naming what is missing: no folder or config, an architecture or rope
    scaling llama.cpp's ``llama`` / ``qwen2`` cannot run, an adapter folder without weights, without a
    base model, or whose adapters were never trained (every ``lora_B`` zero), no tokenizer.json, or a
    vocabulary kind GGUF cannot hold.
    """
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise ExportError(f"model folder not found: {model_dir}")
    adapter_base = _adapter_base(folder) if (folder / "adapter_config.json").exists() else None
    config_source = adapter_base or folder
    if adapter_base is None and not (folder / "config.json").exists():
        raise ExportError(f"{model_dir} has no config.json or adapter_config.json: not a trained model folder")
    try:
        config = AutoConfig.from_pretrained(str(config_source))
    except (OSError, ValueError) as exc:
        raise ExportError(f"could not read the model config of {config_source}: {first_line(exc)}") from None
    _check_architecture(config)
    if not (folder / "tokenizer.json").exists():
        raise ExportError(f"missing tokenizer: {model_dir} has no tokenizer.json (save the tokenizer beside the "
                          "model: tokenizer.save_pretrained(folder))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ExportError(f"could not load the tokenizer of {model_dir}: {first_line(exc)}") from None
    eos_ids = _generation_eos_ids(folder)
    vocab = vocabulary_of(tokenizer, config.vocab_size, eos_ids)
    base_model, license_name = _provenance(folder, adapter_base)
    plan = ExportPlan(model_dir=folder, config=config, tokenizer=tokenizer, vocab=vocab, adapter_base=adapter_base,
                      name=name or folder.resolve().name, base_model=base_model, license=license_name,
                      notes=list(vocab.notes))
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        plan.notes.append(f"the sliding window ({config.sliding_window} tokens) is not stored: llama.cpp attends "
                          "to the whole context")
    if not vocab.chat_template:
        plan.notes.append("the tokenizer has no chat template: runtimes will not format chats as training did")
    return plan


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, quant: str = "f16",
                name: str | None = None) -> ExportResult:
    """Write ``model_dir`` (a model folder, or LoRA adapters: merged into their base) as the GGUF ``out``.

    ``quant``: ``f32``, ``f16``, ``bf16`` or ``q8_0``. Everything is checked (:func:`plan_export`) and
    every tensor encoded before the file is opened; the file is written beside ``out`` and renamed onto
    it when complete. Raises :class:`ExportError` (a ValueError) for a model it cannot export.
    """
    if quant not in QUANTS:
        raise ExportError(f"quantization {quant!r} is not one of {', '.join(QUANTS)}")
    target = Path(out).expanduser()
    if target.suffix.lower() != ".gguf":
        raise ExportError(f"the output file must end in .gguf: {out}")
    plan = plan_export(model_dir, name)
    for note in plan.notes:
        log.warning("GGUF export: %s", note)
    model = _load_weights(plan)
    tensors = encode_tensors(model.state_dict(), plan.config, quant)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as partial, _quiet("gguf"):  # a failed write (full disk ...) leaves no partial file
        writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[ARCHITECTURES[plan.config.model_type][0]])
        write_metadata(writer, plan, quant)
        for gguf_name, data, raw_dtype in tensors:
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return ExportResult(path=target, quant=quant, size_bytes=target.stat().st_size, tensors=len(tensors), plan=plan)


def encode_tensors(state: dict, config, quant: str) -> list[tuple[str, np.ndarray, object]]:
    """``[(gguf_name, data, raw_dtype)]`` for every weight of a transformers ``state`` dict.

    ``state``: HF names -> tensors (``model.layers.0.self_attn.q_proj.weight`` (out, in) ...). The tied
    ``lm_head.weight`` is left out (llama.cpp then reads ``token_embd`` for the head). ``raw_dtype`` is
    None where ``data`` is a float array gguf stores as it is (F32 / F16), else the quantization type of
    the packed bytes. Raises :class:`ExportError` for a tensor with no llama.cpp name.
    """
    arch, permute = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    encoded = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"tensor {hf_name} has no llama.cpp name for architecture {config.model_type}")
        array = tensor.detach().float().cpu().numpy()
        if permute and re.search(r"\.(q|k)_proj\.(weight|bias)$", hf_name):
            array = rotary_permute(array, heads, heads if ".q_proj." in hf_name else kv_heads)
        encoded.append((gguf_name, *_encode(gguf_name, array, quant)))
    return encoded


def rotary_permute(weight: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """(out, ...) -> (out, ...): llama.cpp's rotary layout for Llama Q / K rows (or biases).

    HF Llama rotates the two halves of each head's rows; llama.cpp rotates interleaved pairs. Per head
    of ``d`` rows, rows ``0..d/2`` and ``d/2..d`` become ``0, d/2, 1, d/2 + 1, ...``. K has ``n_kv_head``
    heads; :func:`preftune.model.gguf.load_gguf_model` (through transformers) undoes this on reading.
    """
    count = n_kv_head if n_kv_head != n_head else n_head
    return (weight.reshape(count, 2, weight.shape[0] // count // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_metadata(writer: gguf.GGUFWriter, plan: ExportPlan, quant: str) -> None:
    """General, architecture and tokenizer metadata under llama.cpp's key names."""
    cfg = plan.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(plan.name)
    if plan.base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, plan.base_model)
        if HUB_ID.match(plan.base_model):
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{plan.base_model}")
    if plan.license:
        writer.add_license(plan.license)
    writer.add_file_type(QUANTS[quant][1])
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(cfg).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if _rope(cfg).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(_rope(cfg)["factor"]))
    writer.add_vocab_size(cfg.vocab_size)
    write_vocabulary(writer, plan.vocab)


@contextmanager
def _quiet(logger_name: str):
    """The ``gguf`` writer's info lines (endianness, the file list) off while it writes."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _encode(gguf_name: str, array: np.ndarray, quant: str) -> tuple[np.ndarray, object]:
    """``(data, raw_dtype)`` of one float32 tensor at ``quant``: 1-D tensors and ``f32`` stay F32."""
    if array.ndim < 2 or quant == "f32":
        return array.astype(np.float32), None
    if quant == "f16":
        return array.astype(np.float16), None
    qtype = QUANTS[quant][0]
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError as exc:  # rows not a multiple of the block size
        log.info("GGUF export: %s stays f16 (%s)", gguf_name, exc)
        return array.astype(np.float16), None


def _rope(cfg) -> dict:
    """The rope parameters of a transformers config (``rope_parameters`` in 5.x, ``rope_scaling`` + ``rope_theta``
    before)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise ExportError(f"architecture {model_type!r} ({arch}) cannot be exported to GGUF: supported are "
                          f"{', '.join(ARCHITECTURES)}")
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ExportError(f"rope scaling {rope_type!r} cannot be exported to GGUF: supported are none and linear")
    if getattr(config, "mlp_bias", False):
        raise ExportError("mlp_bias=True cannot be exported to GGUF: llama.cpp's llama has no MLP biases")


def _adapter_base(folder: Path) -> str:
    """The base model of a LoRA adapter folder, after checking its adapters exist and were trained."""
    adapter = json.loads((folder / "adapter_config.json").read_text())
    weights = next((folder / f for f in ADAPTER_WEIGHTS if (folder / f).exists()), None)
    if weights is None:
        raise ExportError(f"adapter folder {folder} has adapter_config.json but no adapter_model.safetensors: "
                          "nothing to merge")
    if weights.suffix == ".safetensors" and not _any_trained(weights):
        raise ExportError(f"adapter folder {folder} holds untrained LoRA adapters (every lora_B is zero): "
                          "exporting it would give the base model unchanged")
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"adapter folder {folder} names no base model (base_model_name_or_path)")
    path = Path(base).expanduser()
    if (base.startswith(("/", "./", "../", "~")) or path.exists()) and not path.exists():
        raise ExportError(f"the base model of adapter folder {folder} is not found: {base}")
    return str(path) if path.exists() else base


def _any_trained(weights: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        b_names = [k for k in f.keys() if "lora_B" in k]
        return not b_names or any(bool(f.get_tensor(k).abs().max() > 0) for k in b_names)


def _load_weights(plan: ExportPlan):
    """The model in float32, its LoRA adapters (if an adapter folder) merged in."""
    from preftune.model.loading import load_model

    if plan.adapter_base is None:
        return load_model(str(plan.model_dir), dtype="float32")
    from peft import PeftModel

    base = load_model(plan.adapter_base, dtype="float32")
    return PeftModel.from_pretrained(base, str(plan.model_dir)).merge_and_unload()


def _generation_eos_ids(folder: Path) -> list[int]:
    try:
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


def _provenance(folder: Path, adapter_base: str | None) -> tuple[str | None, str | None]:
    """``(base model, license)``: the adapter's base, a preftune run's ``config.yaml`` ``model``, or the
    model card's ``base_model``; the license from the model card (or the base folder's)."""
    card = _card_header(folder)
    base = adapter_base or _run_model(folder) or _first(card.get("base_model"))
    license_name = card.get("license")
    if not license_name and base and Path(base).is_dir():
        license_name = _card_header(Path(base)).get("license")
    return (str(base) if base else None), (str(license_name) if license_name else None)


def _card_header(folder: Path) -> dict:
    """The YAML header of ``folder/README.md`` (a Hugging Face model card), or ``{}``."""
    import yaml

    try:
        text = (folder / "README.md").read_text()
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    try:
        header = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return header if isinstance(header, dict) else {}


def _run_model(folder: Path) -> str | None:
    """The ``model`` a preftune run folder's ``config.yaml`` trained from."""
    import yaml

    try:
        record = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    model = record.get("model") if isinstance(record, dict) else None
    return str(model) if model else None


def _first(value):
    return value[0] if isinstance(value, list) and value else value
