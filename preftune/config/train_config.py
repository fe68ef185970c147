"""Every training option as one dataclass field: YAML files, CLI flags and validation.

A field's ``metadata["help"]`` is its ``--help`` text, ``metadata["choices"]`` its allowed
values and ``metadata["domain"]`` (a :class:`Range`) the interval a number must lie in, so the
CLI, the YAML loader, the Python API and the saved ``config.yaml`` never disagree, and every
value is checked by :meth:`TrainConfig.validate` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preftune.methods import table as methods
from preftune.methods.losses.divergences import F_DIVERGENCES

LOSSES = methods.NAMES  # every --loss name: the method table (preftune.methods.table) is the one list
DTYPES = ("float32", "bfloat16", "float16", "auto")
REF_DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CHECKPOINTING = ("auto", "on", "off")
SCHEDULERS = ("cosine", "linear", "constant")
# --report-to: tracker name -> (module to import, pip package). TRL's word and accelerate's trackers.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}

log = logging.getLogger("preftune")


class ConfigError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


@dataclass(frozen=True)
class Range:
    """The interval a numeric option must lie in; ``None`` leaves that side open-ended.

    ``low_open`` / ``high_open`` exclude the bound itself; ``why`` is added to the error message.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self, integer: bool) -> str:
        """``> 0``, ``>= 0``, ``in [0, 0.5)``; a positive integer is said so."""
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            if integer and self.low == 0 and self.low_open:
                return "a positive integer"
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _opt(default, help: str, choices=None, group: str = "training", const=None, booleans=None,
         domain: Range | None = None):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if domain is not None:  # validate(): the value must lie in it
        meta["domain"] = domain
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
        "auto", "Recompute layer activations in backward to save memory (10-30% more time). auto: on when the "
                "estimated activation memory of the longest batch exceeds --activation-budget; a bare "
                "--gradient-checkpointing means on.", CHECKPOINTING, group="speed", const="on",
        booleans=("on", "off"))
    activation_budget: float | None = _opt(
        None, "GiB the body's activations (and the head's kept softmax) may take before --gradient-checkpointing "
              "auto recomputes layers. Default: half the step's fixed memory (weights, gradients, AdamW moments, "
              "reference), at least 1 GiB, at most a quarter of the memory available at the start.", group="speed",
        domain=POSITIVE)
    # --- data ------------------------------------------------------------------------------
    data: str | None = _opt(None, "Training data: .jsonl, .jsonl.gz, .json, .parquet, a save_to_disk folder, "
                                  "or a hub dataset name[:split].", group="data")
    eval_data: str | None = _opt(None, "Held-out data in the same formats, evaluated every --eval-steps.", group="data")
    max_length: int = _opt(1024, "Max tokens of prompt + completion; completions are cut from the right.",
                           group="data", domain=POSITIVE)
    max_prompt_length: int | None = _opt(
        None, "Max prompt tokens; the END of the prompt is kept. Default (none): no limit of its own, as in TRL "
              "(which has no max_prompt_length): a pair that fits --max-length is kept whole, one that does not "
              "loses completion tails, and a prompt that alone fills --max-length drops its pair (counted). A "
              "value you give must be < --max-length.", group="data", domain=POSITIVE)
    skip_bad_records: bool = _opt(False, "Skip malformed records with a warning instead of stopping.", group="data")
    train_on_prompt: bool = _opt(False, "SFT only: include prompt tokens in the loss.", group="data")
    max_examples: int | None = _opt(None, "Use only the first N records of --data (quick trials).", group="data",
                                    domain=POSITIVE)
    # --- method ----------------------------------------------------------------------------
    # --- method: the options of the method table (preftune.methods.table) -------------------------------
    loss: str = _opt("dpo", methods.help_text(), group="method")
    loss_weights: str | None = _opt(
        None, "Weights of the methods of a combined --loss, comma-separated, one per method (TRL's loss_weights; "
              "MPO: --loss sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0). Default: 1 each.", group="method")
    beta: float | None = _opt(None, "KL strength (DPO family, KTO, BCO), reward scale (SimPO, CPO). Default: 2.0 "
                                    "for simpo and cpo_simpo (Meng et al. 2024), 5.0 for sigmoid_norm (Tulu 3), "
                                    "0.1 otherwise.", group="method",
                              domain=Range(0, low_open=True, why="beta = 0 leaves DPO's loss stuck at log 2"))
    label_smoothing: float = _opt(0.0, "Assumed label-noise rate eps in [0, 0.5): conservative DPO (dpo), robust "
                                       "DPO (robust), EXO's eps (exo_pair), aot, cpo.", group="method",
                                  domain=Range(0, 0.5, high_open=True))
    orpo_lambda: float = _opt(0.1, "ORPO: weight of the odds-ratio term (Hong et al. 2024 use 0.1).", group="method",
                              domain=NON_NEGATIVE)
    simpo_gamma: float = _opt(1.0, "SimPO: target reward margin gamma (the paper's gamma/beta = 0.5 at beta 2).",
                              group="method", domain=NON_NEGATIVE)
    sft_weight: float = _opt(0.0, "Weight of an NLL term on the chosen response (RPO for dpo; SimPO's SFT term).",
                             group="method", domain=NON_NEGATIVE)
    center_rewards_coefficient: float = _opt(
        0.0, "reward: weight of the centring term c * (r_chosen + r_rejected)^2 that keeps rewards near 0 "
              "(Eisenstein et al. 2023; TRL's RewardConfig, which suggests 0.01). Default: 0, off.", group="method",
        domain=NON_NEGATIVE)
    desirable_weight: float = _opt(1.0, "KTO: weight of desirable examples.", group="method", domain=POSITIVE)
    undesirable_weight: float = _opt(1.0, "KTO: weight of undesirable examples.", group="method", domain=POSITIVE)
    cpo_alpha: float = _opt(1.0, "CPO, CPO-SimPO: weight of the NLL term (Xu et al. 2024).", group="method",
                            domain=NON_NEGATIVE)
    discopop_tau: float = _opt(0.05, "DiscoPOP: temperature of the log-ratio modulation (Lu et al. 2024: 0.05).",
                               group="method", domain=POSITIVE)
    f_divergence_type: str = _opt("reverse_kl", "f-DPO (Wang et al. 2023): the divergence DPO-type losses "
                                                "regularise with; reverse_kl is plain DPO.", F_DIVERGENCES,
                                  group="method")
    f_alpha_divergence_coef: float = _opt(0.5, "f-DPO alpha_divergence: TRL's coefficient a in f'(u) = (u^(a-1) - "
                                               "1) / (a - 1) (the paper's alpha is 1 - a).", group="method",
                                          domain=Range())  # any finite number (a = 1: the reverse-KL limit)
    use_weighting: bool = _opt(False, "WPO (Zhou et al. 2024): weight each pair by the policy's aligned probability "
                                      "of both completions (one extra no-grad pass of the output head per policy forward).",
                               group="method")
    ld_alpha: float | None = _opt(None, "LD-DPO (Liu et al. 2024): weight in [0, 1] of the longer completion's "
                                        "tokens beyond the shorter one's length (1 = plain DPO).", group="method",
                                  domain=Range(0, 1))
    sync_ref_model: bool = _opt(False, "TR-DPO (Gorbatovski et al. 2024): mix the policy into the reference every "
                                       "--ref-model-sync-steps steps. Needs a live reference copy: not with "
                                       "--precompute-ref or LoRA.", group="method")
    ref_model_mixup_alpha: float = _opt(0.6, "TR-DPO: alpha in theta_ref <- alpha theta + (1 - alpha) theta_ref "
                                             "(1 = hard update).", group="method", domain=Range(0, 1, low_open=True))
    ref_model_sync_steps: int = _opt(512, "TR-DPO: optimizer steps between reference updates.", group="method",
                                     domain=POSITIVE)
    precompute_ref: bool = _opt(False, "Compute reference log-probs once before training, cache them on disk and "
                                       "free the reference model.", group="method")
    ref_cache_dir: str | None = _opt(None, "Where reference caches live. Default: OUTPUT_DIR/ref_cache.",
                                     group="method")
    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = _opt(0, "LoRA rank; 0 = full fine-tuning. With LoRA the reference is the model with adapters "
                          "disabled (no second copy).", group="lora", domain=NON_NEGATIVE)
    lora_alpha: float = _opt(16.0, "LoRA alpha.", group="lora", domain=POSITIVE)
    lora_dropout: float = _opt(0.0, "LoRA dropout.", group="lora", domain=FRACTION)
    lora_targets: str = _opt("all-linear", "Comma-separated module names for LoRA, or all-linear.", group="lora")
    merge_lora: bool = _opt(False, "Merge adapters into the weights when saving.", group="lora")
    load_in_4bit: bool = _opt(False, "QLoRA: load the base weights in 4 bit (bitsandbytes; GPU only).",
                              group="lora")
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = _opt(1e-6, "Peak learning rate (AdamW).", domain=POSITIVE)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", domain=NON_NEGATIVE)
    lr_scheduler: str = _opt("cosine", "Schedule after warmup.", SCHEDULERS)
    warmup_steps: int | None = _opt(None, "Linear warmup steps (overrides --warmup-ratio).", domain=NON_NEGATIVE)
    warmup_ratio: float = _opt(0.1, "Warmup as a share of all optimizer steps.", domain=FRACTION)
    batch_size: int = _opt(8, "Examples (pairs) per process per micro-step.", domain=POSITIVE)
    grad_accum: int = _opt(1, "Micro-steps per optimizer step.", domain=POSITIVE)
    max_steps: int | None = _opt(None, "Optimizer steps to run (overrides --epochs).", domain=POSITIVE)
    epochs: float = _opt(1.0, "Passes over the training data.", domain=POSITIVE)
    max_grad_norm: float | None = _opt(1.0, "Clip the gradient norm to this; 0 or none = no clipping "
                                                   "(the run logs that clipping is off).",
                                       domain=Range(0, why="0 or none turns clipping off; a negative norm would flip "
                                                           "every gradient"))
    max_bad_steps: int = _opt(5, "Stop after this many consecutive steps with a NaN/inf loss or gradient "
                                 "(each such step is skipped and its rows are named).", domain=POSITIVE)
    seed: int = _opt(42, "Seed for data order, initialisation of adapters and dropout.",
                     domain=Range(0, 2**32 - 1, why="the seed range of numpy and python's random"))
    # --- speed -------------------------------------------------------------------------------
    packing: bool = _opt(True, "Padding-free packed batches with the prompt computed once for both responses. "
                               "Falls back to padded batches (with a warning) where the model can't take it.",
                         group="speed")
    pack_tokens: int | None = _opt(
        None, "Token budget of one packed row. Default: the longest group of the batch (rows filled "
              "first-fit-decreasing up to it; on CPU, longer rows cost more masked attention).", group="speed",
        domain=POSITIVE)
    logit_chunk_size: int = _opt(1024, "Completion tokens per chunk of the output head.", group="speed",
                                 domain=POSITIVE)
    length_grouped: bool = _opt(True, "Group examples of similar length into batches (shuffled mega-batches).",
                                group="speed")
    # --- scale -------------------------------------------------------------------------------
    num_processes: int = _opt(1, "Processes to launch (one per GPU; CPU processes use gloo). > 1 re-launches this "
                                 "command under `accelerate launch` (GPU) or `torchrun` (CPU); each process "
                                 "takes --batch-size examples per micro-step.", group="scale", domain=POSITIVE)
    accelerate_config: str | None = _opt(None, "accelerate config file for the launch (e.g. "
                                               "configs/accelerate/fsdp.yaml); on a GPU machine it launches "
                                               "through accelerate even with one process.", group="scale")
    # --- output ------------------------------------------------------------------------------
    output_dir: str | None = _opt(None, "Run folder: model, tokenizer, metrics.jsonl, config.yaml, checkpoints.",
                                  group="output")
    logging_steps: int = _opt(10, "Write a metrics row every N optimizer steps.", group="output", domain=POSITIVE)
    eval_steps: int | None = _opt(None, "Evaluate --eval-data every N steps (default: only at the end).",
                                  group="output", domain=POSITIVE)
    save_steps: int | None = _opt(None, "Write a checkpoint every N steps (default: none until the end).",
                                  group="output", domain=POSITIVE)
    save_total_limit: int = _opt(2, "Checkpoints kept (oldest removed); 0 = keep all.", group="output",
                                 domain=NON_NEGATIVE)
    resume_from: str | None = _opt(None, "Checkpoint folder, or 'latest' for the newest in OUTPUT_DIR.",
                                   group="output")
    report_to: str = _opt(
        "none", "Trackers that also get every metrics.jsonl row, comma-separated: tensorboard (in "
                "OUTPUT_DIR/tensorboard), wandb, mlflow, trackio, or none (TRL's --report_to; each through "
                "accelerate's tracker, configured by its own environment variables, e.g. WANDB_MODE=offline, "
                "MLFLOW_TRACKING_URI).", group="output")
    run_name: str | None = _opt(None, "Run name shown by the trackers. Default: the --output-dir folder's name.",
                                group="output")
    tensorboard: bool = _opt(False, "Also log to TensorBoard in OUTPUT_DIR/tensorboard (the same as adding "
                                    "tensorboard to --report-to).", group="output")
    progress: bool = _opt(True, "Show a progress bar.", group="output")
    overwrite_output_dir: bool = _opt(
        False, "Replace the run already in --output-dir: its model, metrics, checkpoints and summary are deleted "
               "when this run starts (TRL's --overwrite_output_dir). Without it a folder holding a run is refused "
               "unless --resume-from continues it.", group="output")

    # ------------------------------------------------------------------------------------------
    @property
    def method(self) -> methods.Combination:
        """The method table's row(s) of --loss (with --loss-weights): :mod:`preftune.methods.table`."""
        return methods.parse(self.loss, self.loss_weights)

    @property
    def kind(self) -> str:
        """The example kind the method trains on: pair, unpaired (KTO, BCO) or sft."""
        return self.method.kind

    @property
    def needs_reference(self) -> bool:
        return self.method.reference

    def method_options(self) -> dict[str, Any]:
        """The values of the options the method reads, by field name (the objective's keywords)."""
        return {name: getattr(self, name) for name in sorted(self.method.fields)}

    @property
    def trackers(self) -> list[str]:
        """The trackers of ``--report-to`` (plus tensorboard for ``--tensorboard``), in order, no repeats."""
        names = [] if self.report_to is None else [n.strip().lower() for n in str(self.report_to).split(",")]
        names = [n for n in names if n and n != "none"] + (["tensorboard"] if self.tensorboard else [])
        return list(dict.fromkeys(names))

    def validate(self, require_io: bool = True) -> "TrainConfig":
        """Check every value before anything is loaded; raise :class:`ConfigError` naming the option, the
        value and what is allowed (types, choices, each field's ``domain``, then the combinations)."""
        try:
            method = self.method  # the method table's rows (an unknown --loss is named here)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.beta is None and "beta" in method.fields:
            self.beta = method.default("beta", 0.1)
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if require_io:
            for name in ("model", "data", "output_dir"):
                if not getattr(self, name):
                    raise ConfigError(f"--{_flag(name)} is required")
        _check_trackers(self.report_to, self.trackers)
        self._check_method(method)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be < --max-length "
                              f"({self.max_length}) to leave room for the completion")
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
        if self.precompute_ref and not self.needs_reference:
            raise ConfigError(f"--precompute-ref: --loss {self.loss} uses no reference model")
        if self.ref_model and not self.needs_reference:
            raise ConfigError(f"--ref-model: --loss {self.loss} uses no reference model")
        return self

    # --- method-table checks (preftune.methods.table) --------------------------------------------------
    def _check_method(self, method: methods.Combination) -> None:
        """Options that act for no chosen method are refused by name, as are TR-DPO and WPO where they cannot
        apply."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        try:
            methods.check_options(method, {name: getattr(self, name) for name in methods.OPTION_FIELDS}, defaults)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.sync_ref_model:
            for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"--{_flag(name)} applies to --sync-ref-model (TR-DPO) only")
            return
        why = ("the reference model is updated from the policy during training, so {}")
        if not method.reference:
            raise ConfigError(f"--sync-ref-model: --loss {self.loss} uses no reference model")
        if self.precompute_ref:
            raise ConfigError("--sync-ref-model with --precompute-ref: " + why.format(
                "reference log-probs computed once before training would be stale after the first update"))
        if self.lora_r:
            raise ConfigError("--sync-ref-model with LoRA (--lora-r): " + why.format(
                "it needs a separate full copy of the same weights; LoRA's reference is the policy with adapters "
                "off (nothing to update), and the trained adapters are not full weights to mix in"))
        if self.resume_from:
            raise ConfigError("--sync-ref-model with --resume-from: " + why.format(
                "a resumed run would restart from the original reference (checkpoints hold the policy, not the "
                "updated reference)"))

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        """Written atomically: a crash leaves the previous file or the new one, never half of one."""
        from preftune.common.files import write_atomic

        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict (YAML), refusing unknown keys with a suggestion and coercing types.

        TRL's names (``per_device_train_batch_size``, ``loss_type``, ``bf16`` ...) are read where they
        mean the same (:mod:`preftune.config.trl_names`); what was mapped is logged, what can't be honoured
        is refused by name.
        """
        from preftune.config.trl_names import translate

        known = {f.name: f for f in dataclasses.fields(cls)}
        values, mapped = translate(values, set(known), source)
        if mapped:
            log.info("%s: TRL names read: %s (options not given take preftune's defaults, not TRL's)", source,
                     "; ".join(mapped))
        kwargs = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: option names must be text, got {key!r}")
            name = key.replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown option {key!r}{hint}")
            kwargs[name] = coerce(known[name], value, source)
        cfg = cls(**kwargs)
        cfg.given = frozenset(kwargs)  # what the user set (a resume keeps the checkpoint's value of the rest)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        loaded = load_yaml(path)
        if loaded is None:
            return cls()
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
        return cls.from_dict(loaded, source=str(path))


def _flag(name: str) -> str:
    return name.replace("_", "-")


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, except that a key given twice in one mapping is an error (plain
    YAML keeps the last silently). Merge keys (``<<: *base``) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise _DuplicateKey(None, None, f"duplicate key {key!r} (first given on line {first})",
                                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """A YAML file read safely (:class:`UniqueKeyLoader`), or ConfigError naming the file and line."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}; YAML would keep only the last, "
                          f"so say it once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()
        raise ConfigError(f"{where}: invalid YAML ({problem[0] if problem else 'unreadable'})") from None


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """One field's value: its type, its choices, finite, inside its ``domain``."""
    flag, typ, optional = _flag(f.name), field_type(f), "None" in str(f.type)
    if value is None:
        if not optional:
            raise ConfigError(f"--{flag} needs a value")
        return
    numeric = typ in (int, float)
    if isinstance(value, bool) != (typ is bool) or (numeric and not isinstance(value, (int, float))) or \
            (typ is int and not isinstance(value, int)) or (typ is str and not isinstance(value, str)):
        raise ConfigError(f"--{flag} expects {typ.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"--{flag}: {value!r} is not one of {', '.join(choices)}")
    if numeric and not math.isfinite(value):
        raise ConfigError(f"--{flag} must be a finite number (got {value})")
    domain = f.metadata.get("domain")
    if domain is not None and value not in domain:
        why = f"; {domain.why}" if domain.why else ""
        raise ConfigError(f"--{flag} must be {domain.describe(typ is int)} (got {value}){why}")


def _check_trackers(report_to: str | None, names: list[str]) -> None:
    """Every --report-to name is known and its package importable (so a run never fails at its first log)."""
    for name in names:
        if name not in TRACKERS:
            hint = " (list them: 'all' is not accepted, so that nothing logs anywhere unasked)" if name == "all" else ""
            raise ConfigError(f"--report-to: {name!r} is not one of {', '.join(TRACKERS)}, none{hint}")
        module, package = TRACKERS[name]
        if not _installed(module):
            raise ConfigError(f"--report-to {name} needs the {package} package: pip install {package} "
                              f"(or pip install 'preftune[trackers]')")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


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
