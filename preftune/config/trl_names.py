"""Bring your TRL config: ``--config`` reads TRL's option names where they mean the same.

A YAML written for TRL (``DPOConfig`` / ``TrainingArguments``, and the ``trl dpo`` CLI's
``ModelConfig`` / ``ScriptArguments``) is translated key by key into preftune's names. Every
TRL key is one of:

* **renamed**: a preftune option with the same meaning under another name
  (``per_device_train_batch_size`` -> ``batch_size``, ``loss_type`` -> ``loss``: preftune's
  methods have TRL's names), sometimes with its value translated (``max_steps: -1`` -> not set);
* **matched**: a behaviour preftune always has, accepted at the values that mean it
  (``optim: adamw_torch``, ``use_liger_kernel: false``);
* **no effect**: a key that changes only speed or verbosity in TRL, accepted with a note
  (``per_device_eval_batch_size``);
* **refused**: every other TRL option, named with the reason, in one error.

Keys that are preftune's own names (``learning_rate``, ``beta``, ``seed`` ...) pass through: the
names TRL and preftune share mean the same. :func:`translate` reports what it mapped, so the
caller can log it; nothing is ignored silently.
"""

from __future__ import annotations

from typing import Any

from preftune.config.values import SCHEDULERS, ConfigError, as_bool, describe

# TRL name -> preftune name, same meaning (value converted where needed, below).
RENAMED = {
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "precompute_ref_log_probs": "precompute_ref",
    "padding_free": "packing",
    "rpo_alpha": "sft_weight",
    "resume_from_checkpoint": "resume_from",
    "model_name_or_path": "model",
    "lora_target_modules": "lora_targets",
    "torch_dtype": "dtype",
    "disable_tqdm": "progress",
}

# TRL behaviours preftune always has: accepted at these values only (anything else is refused).
MATCHED = {
    "optim": ({"adamw_torch", "adamw_torch_fused"}, "preftune's optimizer is torch.optim.AdamW"),
    "adam_beta1": ({0.9}, "AdamW betas are torch's (0.9, 0.999)"),
    "adam_beta2": ({0.999}, "AdamW betas are torch's (0.9, 0.999)"),
    "adam_epsilon": ({1e-8}, "AdamW eps is torch's 1e-8"),
    "truncation_mode": ({"keep_start"}, "completions are cut from the right; --max-prompt-length keeps the "
                                        "prompt's end"),
    "disable_dropout": ({False}, "preftune keeps the model's dropout (most causal LMs have none)"),
    "push_to_hub": ({False}, "preftune does not upload; the run folder has a README.md model card and can "
                             "be pushed as it is (hf upload)"),
    "logging_strategy": ({"steps"}, "metrics are logged every --logging-steps"),
    "save_only_model": ({False}, "checkpoints hold the optimizer state too"),
    "save_safetensors": ({True}, "weights are written as safetensors"),
    "use_liger_kernel": ({False}, "no Liger kernels"),
    "torch_compile": ({False}, "no torch.compile"),
    "neftune_noise_alpha": ({None}, "no NEFTune noise"),
    "label_smoothing_factor": ({0}, "token label smoothing is off; preference-label smoothing is label_smoothing"),
    "activation_offloading": ({False}, "no activation offloading"),
    "use_dora": ({False}, "plain LoRA"),
    "use_rslora": ({False}, "plain LoRA scaling (alpha / r)"),
    "load_in_8bit": ({False}, "4-bit only (load_in_4bit)"),
    "use_cpu": ({False}, "the GPU is used when there is one"),
    "bf16_full_eval": ({False}, "evaluation computes like training"),
    "fp16_full_eval": ({False}, "evaluation computes like training"),
    "full_determinism": ({False}, "seeded, not fully deterministic"),
    "data_seed": ({None}, "one seed (seed) orders the data"),
    "dataset_config": ({None}, "no dataset configuration name"),
    "model_revision": ({"main"}, "the model's default revision"),
}

# TRL keys that change only speed or verbosity: accepted, and the log says why they change nothing.
NO_EFFECT = {
    "per_device_eval_batch_size": "evaluation uses batch_size (speed and memory only)",
    "dataloader_num_workers": "data is tokenized once, up front",
    "dataloader_pin_memory": "data is tokenized once, up front",
    "dataloader_persistent_workers": "data is tokenized once, up front",
    "dataset_num_proc": "data is tokenized in this process",
    "log_level": "verbosity: preftune train -q",
    "log_level_replica": "only the main process logs",
    "logging_first_step": "metrics rows every logging_steps",
    "do_train": "the command says what runs",
    "do_eval": "held-out data (eval_data) is evaluated whenever it is given",
    "eval_on_start": "held-out data is evaluated before training whenever it is given",
    "gradient_checkpointing_kwargs": "preftune checkpoints layers its own way",
    "hub_model_id": "nothing is uploaded",
    "hub_strategy": "nothing is uploaded",
    "hub_private_repo": "nothing is uploaded",
}

# Every option name of TRL 1.16's DPOConfig (with TrainingArguments), ModelConfig and ScriptArguments,
# plus a few of earlier versions: a key among them that is not handled above is refused as "a TRL
# option preftune cannot honour" rather than "unknown". tests/integration/test_conventions.py checks the list
# against the installed TRL.
TRL_NAMES = frozenset("""
accelerator_config activation_checkpointing activation_checkpointing_kwargs activation_offloading adam_beta1
adam_beta2 adam_epsilon attn_implementation auto_find_batch_size average_tokens_across_devices
batch_eval_metrics beta bf16 bf16_full_eval bnb_4bit_quant_storage bnb_4bit_quant_type data_seed
dataloader_drop_last dataloader_in_order dataloader_multiprocessing_context dataloader_num_workers
dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor dataset_config dataset_name
dataset_num_proc dataset_streaming dataset_test_split dataset_train_split ddp_backend ddp_broadcast_buffers
ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout debug deepspeed disable_dropout
disable_tqdm discopop_tau do_eval do_predict do_train dtype enable_jit_checkpoint eval_accumulation_steps
eval_delay eval_do_concat_batches eval_on_start eval_steps eval_strategy eval_use_gather_object
f_alpha_divergence_coef f_divergence_type fp16 fp16_full_eval fsdp fsdp_config full_determinism
gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs greater_is_better
hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token ignore_bias_buffers
ignore_data_skip include_for_metrics include_num_input_tokens_seen label_names label_smoothing
label_smoothing_factor ld_alpha learning_rate length_column_name liger_kernel_config load_best_model_at_end
load_in_4bit load_in_8bit local_rank log_level log_level_replica log_on_each_node logging_first_step
logging_nan_inf_filter logging_steps logging_strategy lora_alpha lora_dropout lora_modules_to_save lora_r
lora_target_modules lora_target_parameters lora_task_type loss_type loss_weights lr_scheduler_kwargs
lr_scheduler_type max_grad_norm max_length max_steps metric_for_best_model model_init_kwargs model_name_or_path
model_revision neftune_noise_alpha num_train_epochs optim optim_args optim_target_modules output_dir
pad_to_multiple_of pad_token padding_free parallelism_config per_device_eval_batch_size
per_device_train_batch_size precompute_ref_batch_size precompute_ref_log_probs prediction_loss_only project
push_to_hub ref_model_mixup_alpha ref_model_sync_steps remove_unused_columns report_to
restore_callback_states_from_checkpoint resume_from_checkpoint router_aux_loss_coef run_name save_on_each_node
save_only_model save_steps save_strategy save_total_limit seed skip_memory_metrics sync_ref_model tf32
torch_compile torch_compile_backend torch_compile_mode torch_empty_cache_steps trackio_bucket_id
trackio_space_id trackio_static_space_id train_sampling_strategy truncation_mode trust_remote_code
use_bnb_nested_quant use_cache use_cpu use_dora use_liger_kernel use_peft use_rslora use_weighting warmup_steps
weight_decay
warmup_ratio rpo_alpha max_prompt_length max_completion_length torch_dtype evaluation_strategy logging_dir
save_safetensors reference_free generate_during_eval ref_model_init_kwargs model_adapter_name ref_adapter_name
force_use_ref_model use_mps_device
""".split())

_DROP = object()  # a converter's answer: the key means "not set"


class _Refuse(Exception):
    """A TRL value preftune cannot honour; the message says why."""


class _Translation:
    """The preftune options built so far, the notes on what was mapped, what was refused, and the TRL key
    each translated option came from (``origins``: preftune name -> TRL key)."""

    def __init__(self, given: dict[str, Any]):
        self.given, self.out, self.notes, self.refused, self.origins = given, {}, [], [], {}

    def put(self, trl_key: str, name: str, value: Any, shown: str = "", check: bool = True) -> None:
        """Set preftune's ``name`` from ``trl_key`` (refused when ``name`` itself was given too)."""
        if check and name in self.given and name != trl_key:
            self.refused.append(f"{trl_key} and {name} both given (the same option: keep one)")
            return
        if value is _DROP:
            self.notes.append(f"{trl_key}{shown} (nothing to set)")
            return
        self.out[name] = value
        self.origins[name] = trl_key.split(":")[0]
        self.notes.append(f"{trl_key}{shown} -> {name}: {_show(value)}")


def translate(values: dict[str, Any], own: set[str],
              source: str = "config") -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """``values`` (one YAML mapping) with TRL names replaced by preftune's, and what was mapped.

    ``own`` is the set of preftune's option names. Returns ``(options, notes, origins)``: ``options``
    still holds raw values (the caller coerces them), ``notes`` one ``"trl_key -> preftune_key: value"``
    entry per translated key, ``origins`` the TRL key each translated option came from (so a later error
    about the option can name the key the file used). Raises :class:`ConfigError` naming ``source`` and
    every TRL key it cannot honour, with the reason.
    """
    given = {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in values.items()}
    t = _Translation(given)
    for group in (_mixed_precision, _loss, _peft, _strategies, _dataset):  # keys read together
        group(t)
    for key, value in given.items():
        if not isinstance(key, str):
            t.out[key] = value  # the caller refuses it
            continue
        if key in _GROUPED:
            continue
        try:
            if key in RENAMED:
                t.put(key, *_convert(key, RENAMED[key], value))
            elif key in _SHARED:
                name, converted, shown = _SHARED[key](key, value)
                if shown:  # a TRL-only value of a shared name
                    t.put(key, name, converted, shown)
                else:
                    t.out[name] = converted
            elif key in own:
                t.out[key] = value
            elif key in MATCHED:
                accepted, what = MATCHED[key]
                if not _among(value, accepted):
                    raise _Refuse(what)
                t.notes.append(f"{key}: {_show(value)} (preftune does the same: {what})")
            elif key in NO_EFFECT:
                t.notes.append(f"{key} (no effect here: {NO_EFFECT[key]})")
            elif key in TRL_NAMES:
                raise _Refuse("no preftune equivalent")
            else:
                t.out[key] = value  # unknown to both: the caller names it, with a suggestion
        except _Refuse as why:
            t.refused.append(f"{key}: {_show(value)} ({why})")
    if t.refused:
        raise ConfigError(f"{source}: TRL option(s) preftune cannot honour: {'; '.join(t.refused)}. Remove them or "
                          f"use preftune's options (docs/configuration.md: Bring your TRL config)")
    return t.out, t.notes, t.origins


# ---------------------------------------------------------------------------------------------- values

def _convert(key: str, name: str, value: Any) -> tuple[str, Any, str]:
    """A renamed key's preftune value (``_Refuse`` when its TRL value has no preftune meaning)."""
    if key == "lr_scheduler_type":
        if value == "constant_with_warmup":
            return name, "constant", " (preftune's constant warms up first)"
        if value == "constant":
            return name, value, " (preftune's constant warms up first when a warmup is set; TRL's skips it)"
        if value not in SCHEDULERS:
            raise _Refuse(f"preftune's schedules: {', '.join(SCHEDULERS)}")
        return name, value, ""
    if key == "resume_from_checkpoint":
        if value is True:
            return name, "latest", ": true"
        return name, (_DROP if value in (None, False) else value), ""
    if key == "lora_target_modules" and isinstance(value, (list, tuple)):
        return name, ",".join(map(str, value)), ""
    if key == "disable_tqdm":
        return name, (_DROP if value is None else not _bool(value)), " (inverted)"
    return name, value, ""


def _count_or_refuse(key: str, value: Any) -> tuple[str, Any, str]:
    """logging_steps / eval_steps / save_steps: a float below 1 is TRL's share of the run's steps."""
    if isinstance(value, float) and 0 < value < 1:
        raise _Refuse("a share of the run's steps: give a step count")
    return key, value, ""


def _max_steps(key: str, value: Any) -> tuple[str, Any, str]:
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value < 0:
        return key, None, f": {value} (TRL: not set)"
    return key, value, ""


def _warmup_steps(key: str, value: Any) -> tuple[str, Any, str]:
    if isinstance(value, float) and 0 < value < 1:  # TrainingArguments: a float below 1 is a ratio
        return "warmup_ratio", value, f": {value} (a share of the steps)"
    return key, value, ""


def _save_total_limit(key: str, value: Any) -> tuple[str, Any, str]:
    return (key, 0, ": null (TRL: keep all)") if value is None else (key, value, "")


def _max_length(key: str, value: Any) -> tuple[str, Any, str]:
    if value is None:
        raise _Refuse("TRL's null means no truncation; give a number of tokens")
    return key, value, ""


def _joined(key: str, value: Any) -> tuple[str, Any, str]:
    """report_to, loss_weights: a YAML list is preftune's comma-separated text."""
    return key, (",".join(map(str, value)) if isinstance(value, (list, tuple)) else value), ""


# Names TRL and preftune share, where some TRL values need translating.
_SHARED = {"max_steps": _max_steps, "warmup_steps": _warmup_steps, "save_total_limit": _save_total_limit,
           "max_length": _max_length, "report_to": _joined, "loss_weights": _joined, "loss": _joined,
           "logging_steps": _count_or_refuse,
           "eval_steps": _count_or_refuse, "save_steps": _count_or_refuse}


# ---------------------------------------------------------------------------------------------- groups

_GROUPED = {"bf16", "fp16", "loss_type", "use_peft", "eval_strategy", "evaluation_strategy",
            "save_strategy", "dataset_name", "dataset_train_split", "dataset_test_split"}


def _mixed_precision(t: _Translation) -> None:
    """bf16 / fp16 -> mixed_precision (bf16 true -> bf16; both false -> no)."""
    flags = {k: t.given[k] for k in ("bf16", "fp16") if t.given.get(k) is not None}
    if not flags:
        return
    try:
        on = [k for k, v in flags.items() if _bool(v)]
    except _Refuse as why:
        t.refused.append("; ".join(f"{k}: {_show(v)} ({why})" for k, v in flags.items()))
        return
    if len(on) > 1:
        t.refused.append("bf16 and fp16 both true (pick one)")
        return
    t.put(", ".join(f"{k}: {str(v).lower()}" for k, v in flags.items()), "mixed_precision", on[0] if on else "no")


def _loss(t: _Translation) -> None:
    """loss_type (a name or a list) -> loss: preftune's methods have TRL's names (sigmoid = dpo), and a
    list is their weighted sum with loss_weights (preftune's own option, same name), as in TRL."""
    if "loss_type" in t.given:
        types = t.given["loss_type"]
        if not isinstance(types, (str, list, tuple)) or not all(isinstance(n, str) for n in types):
            t.refused.append(f"loss_type: {_show(types)} (a loss name or a list of loss names)")
            return
        names = [types] if isinstance(types, str) else list(types)
        t.put("loss_type", "loss", ",".join(map(str, names)), f": {_show(types)}")


def _peft(t: _Translation) -> None:
    """use_peft: true -> LoRA, with TRL's defaults for what is not given (r 16, alpha 32, dropout 0.05);
    use_peft: false -> no LoRA, whatever lora_* say (as in TRL)."""
    given = t.given
    if "use_peft" not in given:
        return
    try:
        use = _bool(given["use_peft"])
    except _Refuse as why:
        t.refused.append(f"use_peft: {_show(given['use_peft'])} ({why})")
        return
    if not use:
        ignored = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") if given.pop(k, None)]
        t.put("use_peft", "lora_r", 0, ": false" + (f" ({', '.join(ignored)} unused, as in TRL)" if ignored else ""),
              check=False)
        return
    if given.get("lora_target_modules") is None:
        t.refused.append("use_peft: true without lora_target_modules (TRL then uses peft's per-model default "
                         "modules, preftune all-linear: say which, e.g. lora_target_modules: all-linear)")
        return
    for key, default in (("lora_alpha", 32), ("lora_dropout", 0.05)):
        if key not in given:
            t.put("use_peft", key, default, ": true (TRL's default)", check=False)
    t.put("use_peft", "lora_r", given.pop("lora_r", 16), ": true", check=False)


def _strategies(t: _Translation) -> None:
    """eval_strategy / save_strategy: steps (every eval_steps / save_steps) or no; epoch is refused."""
    given = t.given
    for key, steps_key in (("eval_strategy", "eval_steps"), ("evaluation_strategy", "eval_steps"),
                           ("save_strategy", "save_steps")):
        if key not in given:
            continue
        value = str(given[key]).lower()
        if value == "no":
            given.pop(steps_key, None)
            t.put(key, steps_key, None, ": no", check=False)
        elif value == "steps" and steps_key not in given and key != "save_strategy":
            # TrainingArguments: eval_steps defaults to logging_steps
            t.put(key, steps_key, given.get("logging_steps", 10), ": steps (every logging_steps)", check=False)
        elif value == "steps":
            t.put(key, steps_key, _DROP, ": steps", check=False)
        else:
            t.refused.append(f"{key}: {_show(given[key])} (preftune evaluates and saves every N steps: use steps)")


def _dataset(t: _Translation) -> None:
    """dataset_name (+ dataset_train_split) -> data as name[:split]; dataset_test_split -> eval_data when
    the config evaluates (eval_strategy steps)."""
    given = t.given
    if "dataset_name" not in given:
        for key in ("dataset_train_split", "dataset_test_split"):
            if key in given:
                t.refused.append(f"{key} without dataset_name")
        return
    name, split = given["dataset_name"], given.get("dataset_train_split")
    scalars = [v for v in (name, split, given.get("dataset_test_split")) if v is not None]
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in scalars):
        t.refused.append("dataset_name, dataset_train_split, dataset_test_split: a name each, not "
                         f"{', '.join(_show(v) for v in scalars)}")
        return
    name = str(name)
    t.put("dataset_name", "data", name + (f":{split}" if split else ""), " + dataset_train_split" if split else "")
    if "dataset_test_split" in given:
        evaluates = str(given.get("eval_strategy", given.get("evaluation_strategy", "no"))).lower() != "no"
        if evaluates:
            t.put("dataset_test_split", "eval_data", f"{name}:{given['dataset_test_split']}")
        else:
            t.notes.append("dataset_test_split (no effect here: eval_strategy is no)")


# ---------------------------------------------------------------------------------------------- helpers

def _bool(value: Any) -> bool:
    """A TRL boolean (true/false, yes/no, on/off, 1/0), else ``_Refuse``."""
    try:
        return as_bool(value, "")
    except ConfigError:
        raise _Refuse("expects true or false") from None


def _among(value: Any, accepted: set) -> bool:
    if isinstance(value, bool) or value is None:
        return any(value is a for a in accepted)
    if isinstance(value, (int, float)):
        return any(not isinstance(a, bool) and isinstance(a, (int, float)) and abs(value - a) <= 1e-12 * max(1, abs(a))
                   for a in accepted)
    return isinstance(value, str) and value in accepted  # a list or mapping is never an accepted value


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else describe(value, 100)
