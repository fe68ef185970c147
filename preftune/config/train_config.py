"""Every training option as one dataclass field: YAML files, CLI flags and validation.

Each field is made by :func:`preftune.config.values.option` (help text, choices, range), so the CLI,
the YAML loader, the Python API and the saved ``config.yaml`` never disagree, and every value is
checked by :meth:`TrainConfig.validate` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config.trl_names import translate
from preftune.config.values import (
    DTYPES,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SCHEDULERS,
    SEEDS,
    ConfigError,
    Range,
    check_fields,
    describe,
    flag_name,
    located,
    option,
    read_options,
    shown_path,
)
from preftune.config.yaml import dump_yaml, load_options
from preftune.methods import table as methods
from preftune.methods.losses.divergences import F_DIVERGENCES
from preftune.methods.losses.groups import GROUP_PAIRS
from preftune.model.precision import MIXED_PRECISION

LOSSES = methods.NAMES  # every --loss name: the method table (preftune.methods.table) is the one list
REF_DTYPES = ("float32", "bfloat16", "float16")
CHECKPOINTING = ("auto", "on", "off")
# --report-to: tracker name -> (module to import, pip package). TRL's word and accelerate's trackers.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio")}

# What a training checkpoint folder holds (written by preftune.training.checkpoint), named in --resume-from's error.
CHECKPOINT_FILES = "state.json, model.safetensors, optimizer.pt, scheduler.pt and rng.pt"

log = logging.getLogger("preftune")


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------
    model: str | None = option(None, "Policy model: a local folder or a hub name (AutoModelForCausalLM).",
                               group="model")
    ref_model: str | None = option(
        None, "Reference model (folder or hub name). Default: a frozen copy of the policy's starting weights.",
        group="model")
    tokenizer: str | None = option(None, "Tokenizer folder or name. Default: the policy model's.", group="model")
    dtype: str = option("float32", "Weights dtype. A trained model's weights stay float32 (16-bit weights are "
                                   "refused: AdamW updates round away); use --mixed-precision for 16-bit compute. "
                                   "16-bit is fine for LoRA's frozen base.", DTYPES, group="model")
    mixed_precision: str = option(
        "auto", "Compute in bf16/fp16 over fp32 master weights and optimizer state (log-softmax and losses in "
                "fp32; fp16 with loss scaling, GPU only). auto: bf16 on a GPU with bf16 or a CPU with "
                "AVX512-BF16/AMX, else no. TRL's --bf16 / --fp16 are accepted.", MIXED_PRECISION, group="model")
    ref_dtype: str | None = option(
        None, "Weights dtype of the frozen reference copy (bfloat16 halves its memory; its log-prob error "
              "against fp32 is stated in docs/performance.md). Default: the policy's --dtype.", REF_DTYPES,
        group="model")
    attn_implementation: str | None = option(
        None, "Attention implementation passed to transformers (sdpa, eager, flex_attention, flash_attention_2). "
              "Default: sdpa.", group="model")
    trust_remote_code: bool = option(False, "Allow model/tokenizer code from the model folder or hub (off by default).",
                                     group="model")
    gradient_checkpointing: str = option(
        "auto", "Recompute layer activations in backward to save memory (10-30% more time). auto: on when the "
                "estimated activation memory of the longest batch exceeds --activation-budget; a bare "
                "--gradient-checkpointing means on.", CHECKPOINTING, group="speed", const="on",
        booleans=("on", "off"))
    activation_budget: float | None = option(
        None, "GiB the body's activations (and the head's kept softmax) may take before --gradient-checkpointing "
              "auto recomputes layers. Default: half the step's fixed memory (weights, gradients, AdamW moments, "
              "reference), at least 1 GiB, at most a quarter of the memory available at the start.", group="speed",
        domain=POSITIVE)
    # --- data ------------------------------------------------------------------------------
    data: str | None = option(None, "Training data: .jsonl, .jsonl.gz, .json, .parquet, a save_to_disk folder, "
                                    "or a hub dataset name[:split].", group="data")
    eval_data: str | None = option(None, "Held-out data in the same formats, evaluated every --eval-steps.",
                                   group="data")
    max_length: int = option(1024, "Max tokens of prompt + completion; completions are cut from the right.",
                             group="data", domain=POSITIVE)
    max_prompt_length: int | None = option(
        None, "Max prompt tokens; the END of the prompt is kept. Default (none): no limit of its own, as in TRL "
              "(which has no max_prompt_length): a pair that fits --max-length is kept whole, one that does not "
              "loses completion tails, and a prompt that alone fills --max-length drops its pair (counted). A "
              "value you give must be < --max-length.", group="data", domain=POSITIVE)
    skip_bad_records: bool = option(False, "Skip malformed records with a warning instead of stopping.", group="data")
    train_on_prompt: bool = option(False, "SFT only: include prompt tokens in the loss.", group="data")
    max_examples: int | None = option(None, "Use only the first N records of --data (quick trials).", group="data",
                                      domain=POSITIVE)
    # --- method ----------------------------------------------------------------------------
    # --- method: the options of the method table (preftune.methods.table) -------------------------------
    loss: str = option("dpo", methods.help_text(), group="method")
    loss_weights: str | None = option(
        None, "Weights of the methods of a combined --loss, comma-separated, one per method (TRL's loss_weights; "
              "MPO: --loss sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0). Default: 1 each.", group="method",
        comma_list=True)
    beta: float | None = option(None, "KL strength (DPO family, KTO, BCO), reward scale (SimPO, CPO). Default: 2.0 "
                                      "for simpo and cpo_simpo (Meng et al. 2024), 5.0 for sigmoid_norm (Tulu 3), "
                                      "0.1 otherwise.", group="method",
                                domain=Range(0, low_open=True, why="beta = 0 leaves DPO's loss stuck at log 2"))
    label_smoothing: float = option(0.0, "Assumed label-noise rate eps in [0, 0.5): conservative DPO (dpo), robust "
                                       "DPO (robust), EXO's eps (exo_pair), aot, cpo.", group="method",
                                  domain=Range(0, 0.5, high_open=True))
    orpo_lambda: float = option(0.1, "ORPO: weight of the odds-ratio term (Hong et al. 2024 use 0.1).", group="method",
                                domain=NON_NEGATIVE)
    simpo_gamma: float = option(1.0, "SimPO: target reward margin gamma (the paper's gamma/beta = 0.5 at beta 2).",
                                group="method", domain=NON_NEGATIVE)
    sft_weight: float = option(0.0, "Weight of an NLL term on the chosen response (RPO for dpo; SimPO's SFT term).",
                               group="method", domain=NON_NEGATIVE)
    center_rewards_coefficient: float = option(
        0.0, "reward: weight of the centring term c * (r_chosen + r_rejected)^2 that keeps rewards near 0 "
              "(Eisenstein et al. 2023; TRL's RewardConfig, which suggests 0.01). Default: 0, off.", group="method",
        domain=NON_NEGATIVE)
    desirable_weight: float = option(1.0, "KTO: weight of desirable examples.", group="method", domain=POSITIVE)
    undesirable_weight: float = option(1.0, "KTO: weight of undesirable examples.", group="method", domain=POSITIVE)
    cpo_alpha: float = option(1.0, "CPO, CPO-SimPO: weight of the NLL term (Xu et al. 2024).", group="method",
                              domain=NON_NEGATIVE)
    discopop_tau: float = option(0.05, "DiscoPOP: temperature of the log-ratio modulation (Lu et al. 2024: 0.05).",
                                 group="method", domain=POSITIVE)
    dpop_lambda: float = option(50.0, "dpop (DPO-Positive, Pal et al. 2024): weight of the penalty on the chosen "
                                      "log-prob falling below the reference's (the paper's 50).", group="method",
                                domain=NON_NEGATIVE)
    group_pairs: str = option("all", "Pair losses on response groups: which ordered pairs of each group to train on "
                                     "(ties skipped): all, the best response against the rest, or best against "
                                     "worst.", GROUP_PAIRS, group="method")
    f_divergence_type: str = option("reverse_kl", "f-DPO (Wang et al. 2023): the divergence DPO-type losses "
                                                  "regularise with; reverse_kl is plain DPO.", F_DIVERGENCES,
                                    group="method")
    f_alpha_divergence_coef: float = option(0.5, "f-DPO alpha_divergence: TRL's coefficient a in f'(u) = (u^(a-1) - "
                                                 "1) / (a - 1) (the paper's alpha is 1 - a).", group="method",
                                            domain=Range())  # any finite number (a = 1: the reverse-KL limit)
    use_weighting: bool = option(False, "WPO (Zhou et al. 2024): weight each pair by the policy's aligned "
                                        "probability of both completions (one extra no-grad pass of the output head "
                                        "per policy forward).", group="method")
    ld_alpha: float | None = option(None, "LD-DPO (Liu et al. 2024): weight in [0, 1] of the longer completion's "
                                          "tokens beyond the shorter one's length (1 = plain DPO).", group="method",
                                    domain=Range(0, 1))
    sync_ref_model: bool = option(False, "TR-DPO (Gorbatovski et al. 2024): mix the policy into the reference every "
                                         "--ref-model-sync-steps steps. Needs a live reference copy: not with "
                                         "--precompute-ref or LoRA.", group="method")
    ref_model_mixup_alpha: float = option(0.6, "TR-DPO: alpha in theta_ref <- alpha theta + (1 - alpha) theta_ref "
                                               "(1 = hard update).", group="method", domain=Range(0, 1, low_open=True))
    ref_model_sync_steps: int = option(512, "TR-DPO: optimizer steps between reference updates.", group="method",
                                       domain=POSITIVE)
    precompute_ref: bool = option(False, "Compute reference log-probs once before training, cache them on disk and "
                                         "free the reference model.", group="method")
    ref_cache_dir: str | None = option(None, "Where reference caches live. Default: OUTPUT_DIR/ref_cache.",
                                       group="method")
    share_ref_cache: bool = option(False, "Read reference log-probs from a cache in --ref-cache-dir shared by runs on "
                                          "the same data and reference, computing (and storing) only the rows it "
                                          "lacks, batch by batch; one process only. compare turns it on.",
                                   group="method")
    # --- LoRA --------------------------------------------------------------------------------
    lora_r: int = option(0, "LoRA rank; 0 = full fine-tuning. With LoRA the reference is the model with adapters "
                            "disabled (no second copy).", group="lora", domain=NON_NEGATIVE)
    lora_alpha: float = option(16.0, "LoRA alpha.", group="lora", domain=POSITIVE)
    lora_dropout: float = option(0.0, "LoRA dropout.", group="lora", domain=FRACTION)
    lora_targets: str = option("all-linear", "Comma-separated module names for LoRA, or all-linear.", group="lora",
                               comma_list=True)
    merge_lora: bool = option(False, "Merge adapters into the weights when saving.", group="lora")
    load_in_4bit: bool = option(False, "QLoRA: load the base weights in 4 bit (bitsandbytes; GPU only).",
                                group="lora")
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = option(1e-6, "Peak learning rate (AdamW).", domain=POSITIVE)
    weight_decay: float = option(0.0, "AdamW weight decay.", domain=NON_NEGATIVE)
    lr_scheduler: str = option("cosine", "Schedule after warmup.", SCHEDULERS)
    warmup_steps: int | None = option(None, "Linear warmup steps (overrides --warmup-ratio).", domain=NON_NEGATIVE)
    warmup_ratio: float = option(0.1, "Warmup as a share of all optimizer steps.", domain=FRACTION)
    batch_size: int = option(8, "Examples (pairs) per process per micro-step.", domain=POSITIVE)
    grad_accum: int = option(1, "Micro-steps per optimizer step.", domain=POSITIVE)
    max_steps: int | None = option(None, "Optimizer steps to run (overrides --epochs).", domain=POSITIVE)
    epochs: float = option(1.0, "Passes over the training data.", domain=POSITIVE)
    max_grad_norm: float | None = option(1.0, "Clip the gradient norm to this; 0 or none = no clipping "
                                                     "(the run logs that clipping is off).",
                                         domain=Range(0, why="0 or none turns clipping off; a negative norm would flip "
                                                             "every gradient"))
    max_bad_steps: int = option(5, "Stop after this many consecutive steps with a NaN/inf loss or gradient "
                                   "(each such step is skipped and its rows are named).", domain=POSITIVE)
    seed: int = option(42, "Seed for data order, initialisation of adapters and dropout.",
                       domain=SEEDS)
    # --- speed -------------------------------------------------------------------------------
    packing: bool = option(True, "Padding-free packed batches with the prompt computed once for both responses. "
                                 "Falls back to padded batches (with a warning) where the model can't take it.",
                           group="speed")
    pack_tokens: int | None = option(
        None, "Token budget of one packed row. Default: the longest group of the batch (rows filled "
              "first-fit-decreasing up to it; on CPU, longer rows cost more masked attention).", group="speed",
        domain=POSITIVE)
    logit_chunk_size: int = option(1024, "Completion tokens per chunk of the output head.", group="speed",
                                   domain=POSITIVE)
    length_grouped: bool = option(True, "Group examples of similar length into batches (shuffled mega-batches).",
                                  group="speed")
    # --- scale -------------------------------------------------------------------------------
    num_processes: int = option(1, "Processes to launch (one per GPU; CPU processes use gloo). > 1 re-launches this "
                                   "command under `accelerate launch` (GPU) or `torchrun` (CPU); each process "
                                   "takes --batch-size examples per micro-step.", group="scale", domain=POSITIVE)
    accelerate_config: str | None = option(None, "accelerate config file for the launch (e.g. "
                                                 "configs/accelerate/fsdp.yaml); on a GPU machine it launches "
                                                 "through accelerate even with one process.", group="scale")
    # --- output ------------------------------------------------------------------------------
    output_dir: str | None = option(None, "Run folder: model, tokenizer, metrics.jsonl, config.yaml, checkpoints.",
                                    group="output")
    logging_steps: int = option(10, "Write a metrics row every N optimizer steps.", group="output", domain=POSITIVE)
    eval_steps: int | None = option(None, "Evaluate --eval-data every N steps (default: only at the end).",
                                    group="output", domain=POSITIVE)
    save_steps: int | None = option(None, "Write a checkpoint every N steps (default: none until the end).",
                                    group="output", domain=POSITIVE)
    save_total_limit: int = option(2, "Checkpoints kept (oldest removed); 0 = keep all.", group="output",
                                   domain=NON_NEGATIVE)
    resume_from: str | None = option(None, "Checkpoint folder, or 'latest' for the newest in OUTPUT_DIR.",
                                     group="output")
    report_to: str = option(
        "none", "Trackers that also get every metrics.jsonl row, comma-separated: tensorboard (in "
                "OUTPUT_DIR/tensorboard), wandb, mlflow, trackio, or none (TRL's --report_to; each through "
                "accelerate's tracker, configured by its own environment variables, e.g. WANDB_MODE=offline, "
                "MLFLOW_TRACKING_URI).", group="output", comma_list=True)
    run_name: str | None = option(None, "Run name shown by the trackers. Default: the --output-dir folder's name.",
                                  group="output")
    tensorboard: bool = option(False, "Also log to TensorBoard in OUTPUT_DIR/tensorboard (the same as adding "
                                      "tensorboard to --report-to).", group="output")
    progress: bool = option(True, "Show a progress bar.", group="output")
    overwrite_output_dir: bool = option(
        False, "Replace the run already in --output-dir: its model, metrics, checkpoints and summary are deleted "
               "when this run starts (TRL's --overwrite_output_dir). Without it a folder holding a run is refused "
               "unless --resume-from continues it.", group="output")
    export_gguf: str | None = option(
        None, "Also write the final model as one GGUF file (llama.cpp, Ollama, LM Studio) at this quantization, "
              "LoRA adapters merged: OUTPUT_DIR/gguf/NAME.QUANT.gguf (NAME: the output folder's) with an Ollama "
              "Modelfile beside it, as preftune export --ollama writes for any model folder.",
        ("f32", "f16", "bf16", "q8_0"), group="output")

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
        value and what is allowed (types, choices, each field's ``domain``, then the combinations). An error
        about an option whose value came from a file names the file (and the TRL key it was read from)."""
        try:
            return self._check(require_io)
        except ConfigError as exc:
            raise ConfigError(located(self, str(exc))) from None

    def _check(self, require_io: bool) -> "TrainConfig":
        """:meth:`validate`'s checks, in order; ConfigError at the first that fails."""
        try:
            method = self.method  # the method table's rows (an unknown --loss is named here)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.beta is None and "beta" in method.fields:
            self.beta = method.default("beta", 0.1)
        check_fields(self)
        if require_io:
            for name in ("model", "data", "output_dir"):
                if not getattr(self, name):
                    raise ConfigError(f"--{flag_name(name)} is required")
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
        if self.share_ref_cache and not self.needs_reference:
            raise ConfigError(f"--share-ref-cache: --loss {self.loss} uses no reference model")
        if self.share_ref_cache and self.precompute_ref:
            raise ConfigError("--share-ref-cache with --precompute-ref: choose one (the precomputed table holds "
                              "every row already)")
        if self.ref_model and not self.needs_reference:
            raise ConfigError(f"--ref-model: --loss {self.loss} uses no reference model")
        if self.resume_from and self.resume_from != "latest":
            _check_checkpoint_path(self.resume_from)
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
                    raise ConfigError(f"--{flag_name(name)} applies to --sync-ref-model (TR-DPO) only")
            return
        why = ("the reference model is updated from the policy during training, so {}")
        if not method.reference:
            raise ConfigError(f"--sync-ref-model: --loss {self.loss} uses no reference model")
        if self.precompute_ref:
            raise ConfigError("--sync-ref-model with --precompute-ref: " + why.format(
                "reference log-probs computed once before training would be stale after the first update"))
        if self.share_ref_cache:
            raise ConfigError("--sync-ref-model with --share-ref-cache: " + why.format(
                "reference log-probs stored by any run would be stale after the first update"))
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

        write_atomic(Path(path), dump_yaml(self.to_dict()))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict (YAML), refusing unknown keys with a suggestion and coercing types.

        TRL's names (``per_device_train_batch_size``, ``loss_type``, ``bf16`` ...) are read where they
        mean the same (:mod:`preftune.config.trl_names`); what was mapped is logged, what can't be honoured
        is refused by name.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        values, mapped, origins = translate(values, set(known), source)
        if mapped:
            log.info("%s: TRL names read: %s (options not given take preftune's defaults, not TRL's)", source,
                     "; ".join(mapped))
        kwargs = read_options(values, known, source)
        cfg = cls(**kwargs)
        cfg.given = frozenset(kwargs)  # what the user set (a resume keeps the checkpoint's value of the rest)
        cfg.read_from = (source, dict(kwargs), origins)  # validate() names the file in an error about its values
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Options from a YAML file (preftune's or TRL's names; an empty file: every default)."""
        values = load_options(path)
        return cls.from_dict(values, source=shown_path(path)) if values else cls()


def _check_checkpoint_path(given: str) -> None:
    """``--resume-from PATH`` is a checkpoint folder (it holds ``state.json``), else ConfigError saying
    whether the path does not exist or what it is instead, and what a checkpoint folder holds."""
    path = Path(given)
    given = shown_path(given)  # in the messages
    try:
        if (path / "state.json").is_file():
            return
        exists, folder = path.exists(), path.is_dir()
        found = sorted(p.parent for p in (path / "checkpoints").glob("step-*/state.json")
                       if ".tmp-" not in p.parent.name) if folder else []
    except OSError as exc:
        raise ConfigError(f"--resume-from {given}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not exists:
        raise ConfigError(f"--resume-from {given}: no such file or folder (give a checkpoint folder, "
                          f"OUTPUT_DIR/checkpoints/step-NNNNNN, or latest for the newest in --output-dir)")
    if found:
        raise ConfigError(f"--resume-from {given}: a run folder, not a checkpoint; its checkpoints are in "
                          f"{path / 'checkpoints'} (newest: {found[-1].name}): --resume-from {found[-1]}, or "
                          f"--resume-from latest with --output-dir {given}")
    what = "a folder without state.json" if folder else "a file, not a folder"
    raise ConfigError(f"--resume-from {given}: not a preftune checkpoint ({what}); a checkpoint is a folder "
                      f"OUTPUT_DIR/checkpoints/step-NNNNNN holding {CHECKPOINT_FILES}")


def _check_trackers(report_to: str | None, names: list[str]) -> None:
    """Every --report-to name is known and its package importable (so a run never fails at its first log)."""
    for name in names:
        if name not in TRACKERS:
            hint = " (list them: 'all' is not accepted, so that nothing logs anywhere unasked)" if name == "all" else ""
            raise ConfigError(f"--report-to: {describe(name)} is not one of {', '.join(TRACKERS)}, none{hint}")
        module, package = TRACKERS[name]
        if not _installed(module):
            raise ConfigError(f"--report-to {name} needs the {package} package: pip install {package} "
                              f"(or pip install 'preftune[trackers]')")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
