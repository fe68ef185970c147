"""Every training option as one dataclass field: YAML files, CLI flags and validation.

A field's ``metadata["help"]`` is its ``--help`` text and ``metadata["choices"]`` its
allowed values, so the CLI, the YAML loader and the saved ``config.yaml`` never disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOSSES = ("dpo", "ipo", "robust", "hinge", "orpo", "simpo", "kto", "sft")
DTYPES = ("float32", "bfloat16", "float16", "auto")
REF_DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CHECKPOINTING = ("auto", "on", "off")
SCHEDULERS = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


def _opt(default, help: str, choices=None, group: str = "training", const=None, booleans=None):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if const is not None:  # the value of the bare flag (``--gradient-checkpointing`` = on)
        meta["const"] = const
    if booleans is not None:  # (value for true, value for false): a field that once was a bool
        meta["booleans"] = booleans
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------
    model: str | None = _opt(None, "Policy model: a local folder or a hub name (AutoModelForCausalLM).", group="model")
    ref_model: str | None = _opt(
        None, "Reference model (folder or hub name). Default: a frozen copy of the policy's starting weights.",
        group="model")
    tokenizer: str | None = _opt(None, "Tokenizer folder or name. Default: the policy model's.", group="model")
    dtype: str = _opt("float32", "Weights dtype. A trained model's weights stay float32 (16-bit weights are "
                                 "refused: AdamW updates round away); use --mixed-precision for 16-bit compute. "
                                 "16-bit is fine for LoRA's frozen base.", DTYPES, group="model")
    mixed_precision: str = _opt(
        "auto", "Compute in bf16/fp16 over fp32 master weights and optimizer state (log-softmax and losses in "
                "fp32; fp16 with loss scaling, GPU only). auto: bf16 on a GPU with bf16 or a CPU with "
                "AVX512-BF16/AMX, else no. TRL's --bf16 / --fp16 are accepted.", MIXED_PRECISION, group="model")
    ref_dtype: str | None = _opt(
        None, "Weights dtype of the frozen reference copy (bfloat16 halves its memory; its log-prob error "
              "against fp32 is stated in the README). Default: the policy's --dtype.", REF_DTYPES, group="model")
    attn_implementation: str | None = _opt(
        None, "Attention implementation passed to transformers (sdpa, eager, flex_attention, flash_attention_2). "
              "Default: sdpa.", group="model")
    trust_remote_code: bool = _opt(False, "Allow model/tokenizer code from the model folder or hub (off by default).",
                                   group="model")
    gradient_checkpointing: str = _opt(
        "auto", "Recompute layer activations in backward to save memory (about a third more compute). auto: on when the "
                "estimated activation memory of the longest batch exceeds --activation-budget; a bare "
                "--gradient-checkpointing means on.", CHECKPOINTING, group="speed", const="on",
        booleans=("on", "off"))
    activation_budget: float | None = _opt(
        None, "GiB the body's activations may take before --gradient-checkpointing auto turns checkpointing "
              "on. Default: a quarter of the memory available at the start (GPU memory on a GPU).", group="speed")
    # --- data ------------------------------------------------------------------------------
    data: str | None = _opt(None, "Training data: .jsonl, .jsonl.gz, .json, .parquet, a save_to_disk folder, "
                                  "or a hub dataset name[:split].", group="data")
    eval_data: str | None = _opt(None, "Held-out data in the same formats, evaluated every --eval-steps.", group="data")
    max_length: int = _opt(1024, "Max tokens of prompt + completion; completions are cut from the right.",
                           group="data")
    max_prompt_length: int | None = _opt(512, "Max prompt tokens; the END of the prompt is kept.", group="data")
    skip_bad_records: bool = _opt(False, "Skip malformed records with a warning instead of stopping.", group="data")
    train_on_prompt: bool = _opt(False, "SFT only: include prompt tokens in the loss.", group="data")
    max_examples: int | None = _opt(None, "Use only the first N records of --data (quick trials).", group="data")
    # --- method ----------------------------------------------------------------------------
    loss: str = _opt("dpo", "Method.", LOSSES, group="method")
    beta: float | None = _opt(None, "KL strength (DPO/IPO/hinge/robust/KTO), reward scale (SimPO). "
                                    "Default: 2.0 for simpo (Meng et al. 2024), 0.1 otherwise.", group="method")
    label_smoothing: float = _opt(0.0, "Assumed label-noise rate eps in [0, 0.5): conservative DPO (dpo) or "
                                       "robust DPO (robust).", group="method")
    orpo_lambda: float = _opt(0.1, "ORPO: weight of the odds-ratio term (Hong et al. 2024 use 0.1).", group="method")
    simpo_gamma: float = _opt(1.0, "SimPO: target reward margin gamma (the paper's gamma/beta = 0.5 at beta 2).",
                              group="method")
    sft_weight: float = _opt(0.0, "Weight of an NLL term on the chosen response (RPO for dpo; SimPO's SFT term).",
                             group="method")
    desirable_weight: float = _opt(1.0, "KTO: weight of desirable examples.", group="method")
    undesirable_weight: float = _opt(1.0, "KTO: weight of undesirable examples.", group="method")
    precompute_ref: bool = _opt(False, "Compute reference log-probs once before training, cache them on disk and "
                                       "free the reference model.", group="method")
    ref_cache_dir: str | None = _opt(None, "Where reference caches live. Default: OUTPUT_DIR/ref_cache.",
                                     group="method")
    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = _opt(0, "LoRA rank; 0 = full fine-tuning. With LoRA the reference is the model with adapters "
                          "disabled (no second copy).", group="lora")
    lora_alpha: float = _opt(16.0, "LoRA alpha.", group="lora")
    lora_dropout: float = _opt(0.0, "LoRA dropout.", group="lora")
    lora_targets: str = _opt("all-linear", "Comma-separated module names for LoRA, or all-linear.", group="lora")
    merge_lora: bool = _opt(False, "Merge adapters into the weights when saving.", group="lora")
    load_in_4bit: bool = _opt(False, "QLoRA: load the base weights in 4 bit (bitsandbytes; GPU only).",
                              group="lora")
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = _opt(1e-6, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    lr_scheduler: str = _opt("cosine", "Schedule after warmup.", SCHEDULERS)
    warmup_steps: int | None = _opt(None, "Linear warmup steps (overrides --warmup-ratio).")
    warmup_ratio: float = _opt(0.1, "Warmup as a share of all optimizer steps.")
    batch_size: int = _opt(8, "Examples (pairs) per process per micro-step.")
    grad_accum: int = _opt(1, "Micro-steps per optimizer step.")
    max_steps: int | None = _opt(None, "Optimizer steps to run (overrides --epochs).")
    epochs: float = _opt(1.0, "Passes over the training data.")
    max_grad_norm: float | None = _opt(1.0, "Clip the gradient norm to this; none = no clipping.")
    max_bad_steps: int = _opt(5, "Stop after this many consecutive steps with a NaN/inf loss or gradient "
                                 "(each such step is skipped and its rows are named).")
    seed: int = _opt(42, "Seed for data order, initialisation of adapters and dropout.")
    # --- speed -------------------------------------------------------------------------------
    packing: bool = _opt(True, "Padding-free packed batches with the prompt computed once for both responses. "
                               "Falls back to padded batches (with a warning) where the model can't take it.",
                         group="speed")
    pack_tokens: int | None = _opt(
        None, "Token budget of one packed row. Default: the longest group of the batch (rows filled "
              "first-fit-decreasing up to it; on CPU, longer rows cost more masked attention).", group="speed")
    logit_chunk_size: int = _opt(1024, "Completion tokens per chunk of the output head.", group="speed")
    length_grouped: bool = _opt(True, "Group examples of similar length into batches (shuffled mega-batches).",
                                group="speed")
    # --- scale -------------------------------------------------------------------------------
    num_processes: int = _opt(1, "Processes to launch (one per GPU; CPU processes use gloo). > 1 re-launches this "
                                 "command under `accelerate launch` (GPU) or `torchrun` (CPU); each process "
                                 "takes --batch-size examples per micro-step.", group="scale")
    accelerate_config: str | None = _opt(None, "accelerate config file for the launch (e.g. "
                                               "recipes/accelerate/fsdp.yaml); on a GPU machine it launches "
                                               "through accelerate even with one process.", group="scale")
    # --- output ------------------------------------------------------------------------------
    output_dir: str | None = _opt(None, "Run folder: model, tokenizer, metrics.jsonl, config.yaml, checkpoints.",
                                  group="output")
    logging_steps: int = _opt(10, "Write a metrics row every N optimizer steps.", group="output")
    eval_steps: int | None = _opt(None, "Evaluate --eval-data every N steps (default: only at the end).",
                                  group="output")
    save_steps: int | None = _opt(None, "Write a checkpoint every N steps (default: none until the end).",
                                  group="output")
    save_total_limit: int = _opt(2, "Checkpoints kept (oldest removed).", group="output")
    resume_from: str | None = _opt(None, "Checkpoint folder, or 'latest' for the newest in OUTPUT_DIR.",
                                   group="output")
    tensorboard: bool = _opt(False, "Also log to TensorBoard in OUTPUT_DIR/tensorboard.", group="output")
    progress: bool = _opt(True, "Show a progress bar.", group="output")

    # ------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The example kind the method trains on: pair, unpaired (KTO) or sft."""
        return {"kto": "unpaired", "sft": "sft"}.get(self.loss, "pair")

    @property
    def needs_reference(self) -> bool:
        return self.loss not in ("orpo", "simpo", "sft")

    def validate(self, require_io: bool = True) -> "TrainConfig":
        """Check every value; raise :class:`ConfigError` naming the option and what is allowed."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and "None" in str(f.type)):
                raise ConfigError(f"--{_flag(f.name)}: {value!r} is not one of {', '.join(choices)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{_flag(f.name)} must be a finite number (got {value})")
        if require_io:
            for name in ("model", "data", "output_dir"):
                if not getattr(self, name):
                    raise ConfigError(f"--{_flag(name)} is required")
        _positive(self, "batch_size", "grad_accum", "max_length", "logging_steps", "logit_chunk_size", "max_bad_steps",
                  "num_processes")
        _positive(self, "max_prompt_length", "max_steps", "eval_steps", "save_steps", "pack_tokens", optional=True)
        if self.beta is None:
            self.beta = 2.0 if self.loss == "simpo" else 0.1
        if self.beta <= 0 and self.loss != "sft":
            raise ConfigError(f"--beta must be > 0 (got {self.beta}); beta = 0 leaves DPO's loss stuck at log 2")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if self.label_smoothing and self.loss not in ("dpo", "robust"):
            raise ConfigError(f"--label-smoothing applies to --loss dpo or robust only, not {self.loss}")
        if self.sft_weight < 0:
            raise ConfigError(f"--sft-weight must be >= 0 (got {self.sft_weight})")
        if self.sft_weight and self.loss not in ("dpo", "simpo"):
            raise ConfigError(f"--sft-weight applies to --loss dpo (RPO) or simpo, not {self.loss}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0 (got {self.learning_rate})")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be > 0 (got {self.epochs})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be < --max-length "
                              f"({self.max_length}) to leave room for the completion")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("--desirable-weight and --undesirable-weight must be > 0")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r must be >= 0 (got {self.lora_r})")
        if self.merge_lora and not self.lora_r:
            raise ConfigError("--merge-lora needs --lora-r > 0")
        if self.load_in_4bit and not self.lora_r:
            raise ConfigError("--load-in-4bit (QLoRA) needs --lora-r > 0: 4-bit weights can't be trained directly")
        if self.dtype in ("bfloat16", "float16") and not self.lora_r:
            raise ConfigError(f"--dtype {self.dtype}: full fine-tuning would train {self.dtype} weights, and AdamW "
                              f"updates below {self.dtype}'s resolution round away (at lr 1e-6 most weights never "
                              f"change). Keep --dtype float32 and add --mixed-precision bf16 for 16-bit compute "
                              f"over fp32 master weights; 16-bit --dtype is for LoRA's frozen base (--lora-r)")
        if self.ref_dtype and not self.needs_reference:
            raise ConfigError(f"--ref-dtype: --loss {self.loss} uses no reference model")
        if self.ref_dtype and self.lora_r and not self.ref_model:
            raise ConfigError("--ref-dtype: with LoRA the reference is the policy with adapters off (no copy to "
                              "hold in another dtype); pass --ref-model too for a separate reference")
        if self.activation_budget is not None and self.activation_budget <= 0:
            raise ConfigError(f"--activation-budget must be > 0 GiB (got {self.activation_budget})")
        if self.precompute_ref and not self.needs_reference:
            raise ConfigError(f"--precompute-ref: --loss {self.loss} uses no reference model")
        if self.ref_model and not self.needs_reference:
            raise ConfigError(f"--ref-model: --loss {self.loss} uses no reference model")
        return self

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict (YAML), refusing unknown keys with a suggestion and coercing types."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: option names must be text, got {key!r}")
            name = key.replace("-", "_")
            if name in ("bf16", "fp16"):  # TRL's flags: bf16: true -> mixed_precision: bf16
                if as_bool(value, name, source):
                    kwargs["mixed_precision"] = name
                elif kwargs.get("mixed_precision", name) == name:
                    kwargs["mixed_precision"] = "no"
                continue
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown option {key!r}{hint}")
            kwargs[name] = coerce(known[name], value, source)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()
            raise ConfigError(f"{where}: invalid YAML ({problem[0] if problem else 'unreadable'})") from None
        if loaded is None:
            return cls()
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
        return cls.from_dict(loaded, source=str(path))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _positive(cfg, *names, optional=False):
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if value is None or value <= 0:
            raise ConfigError(f"--{_flag(name)} must be a positive integer (got {value})")


def as_bool(value: Any, flag: str, source: str = "config") -> bool:
    """A YAML/CLI boolean (true/false, yes/no, on/off, 1/0), or ConfigError naming the option."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise ConfigError(f"{source}: --{_flag(flag)} expects true or false, got {value!r}")


def field_type(f: dataclasses.Field) -> type:
    """The base python type of a field (``int | None`` -> int)."""
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return typ
    raise TypeError(f"unsupported field type {text}")


def coerce(f: dataclasses.Field, value: Any, source: str = "config") -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the option."""
    typ = field_type(f)
    optional = "None" in str(f.type)
    booleans = f.metadata.get("booleans")
    if booleans and (isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no", "1", "0")):
        value = booleans[0] if str(value).lower() in ("true", "yes", "1") else booleans[1]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{source}: --{_flag(f.name)} needs a value")
    try:
        if typ is bool:
            return as_bool(value, f.name, source)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ConfigError(f"{source}: --{_flag(f.name)} expects {typ.__name__}, got {shown}") from None
