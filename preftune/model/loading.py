"""Loading models and tokenizers safely, and wrapping them with LoRA.

Safe by default: ``trust_remote_code`` is off unless asked (a ``config.json`` whose ``auto_map``
names custom code that is then not run is said once, in a warning), safetensors weights are
preferred (``use_safetensors`` when the folder has them), and nothing is unpickled: a ``.bin``
pickle holding more than tensors is refused with our own message (never torch's advice to load it
unsafely), a truncated one is named as such. A ``.gguf`` file (or a folder holding one and no
``config.json``) goes through :mod:`preftune.model.gguf`. :func:`check_vocab` refuses a tokenizer
whose ids the model's embedding has no row for, at load time instead of mid-step.

Every failure a model's files can cause is one line (a ValueError): a path that does not exist
(``model folder not found``; a hub-style name the hub could not provide says how to give a local
one), a truncated or corrupt weights file (:class:`~preftune.model.errors.ModelFileError` naming the
file), an ``--attn-implementation`` whose package is missing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path

import torch

from preftune.model.errors import (
    PACKAGE_FREE_ATTENTION,
    ModelFileError,
    attention_unavailable,
    first_line,
    safetensors_problem,
)
from preftune.model.gguf import is_gguf, load_gguf_model, load_gguf_tokenizer
from preftune.model.precision import resolve_dtype

log = logging.getLogger("preftune")

# A name transformers may look up on the model hub (``org/name`` or a bare ``name``); any other
# name that does not exist locally is a missing path.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".gguf")

_custom_code_said: set[Path] = set()  # config.json files whose ignored auto_map was already warned about


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    if is_gguf(name):
        tokenizer = load_gguf_tokenizer(name)
    else:
        _check_model_path(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(_failure_line(name, "the tokenizer", exc, trust_remote_code)) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token; add one to its folder")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer_as_is(name: str | os.PathLike):
    """The tokenizer of a folder, hub name or GGUF file as it is (no pad token added): what the data
    doctor measures lengths with. Raises ValueError naming ``name`` when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return load_gguf_tokenizer(name) if is_gguf(name) else AutoTokenizer.from_pretrained(os.fspath(name))
    except (OSError, ValueError) as err:
        missing = _missing_files(Path(name).expanduser(), "the tokenizer")
        raise ValueError(missing or f"cannot load tokenizer {os.fspath(name)!r}: {first_line(err)}") from None


def load_model(name: str, dtype: str = "float32", attn_implementation: str | None = None,
               trust_remote_code: bool = False, load_in_4bit: bool = False, head: str = "lm"):
    """``AutoModelForCausalLM.from_pretrained`` with our safety defaults.

    A GGUF path is dequantized to ``dtype`` into a plain model (:func:`preftune.model.gguf.load_gguf_model`).
    ``head="reward"``: a reward model, a one-logit ``AutoModelForSequenceClassification``: a saved
    reward model as it is, any causal LM (folder, hub name or GGUF) with its body copied and a new
    ``score`` head (:func:`reward_model_from_causal_lm`).
    Raises ValueError with one readable line when the model can't be loaded
    (:class:`~preftune.model.errors.ModelFileError` for a truncated or corrupt weights file).
    """
    from transformers import AutoModelForCausalLM

    if head == "reward":
        return _load_reward_model(name, dtype, attn_implementation, trust_remote_code, load_in_4bit)
    if head != "lm":
        raise ValueError(f"unknown model head {head!r} (lm or reward)")

    if is_gguf(name):
        if load_in_4bit:
            raise ValueError(f"--load-in-4bit with a GGUF model ({name}): convert it to a folder first "
                             "(preftune model convert FILE.gguf --out DIR) and pass --model DIR")
        return load_gguf_model(name, resolve_dtype(dtype), attn_implementation)
    _check_model_path(name)
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                  attn_implementation=attn_implementation or "sdpa")
    folder = Path(name).expanduser()
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise ValueError("--load-in-4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no GPU. "
                             "Use --lora-r without --load-in-4bit on CPU.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    if not trust_remote_code:
        _warn_ignored_custom_code(folder)
    return _from_pretrained(AutoModelForCausalLM, name, "the model", **kwargs)


def is_reward_model_folder(name: str | os.PathLike) -> bool:
    """True when ``name`` is a local folder holding a one-logit sequence-classification model."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    architectures = data.get("architectures") or []
    labels = data.get("num_labels", len(data.get("id2label") or {}) or None)
    return any(str(a).endswith("ForSequenceClassification") for a in architectures) and labels in (1, None)


def _load_reward_model(name, dtype, attn_implementation, trust_remote_code, load_in_4bit):
    from transformers import AutoModelForSequenceClassification

    if load_in_4bit:
        raise ValueError("--load-in-4bit is not supported with --loss reward; use --lora-r on a full-precision model")
    if not is_reward_model_folder(name):
        return reward_model_from_causal_lm(load_model(name, dtype, attn_implementation, trust_remote_code))
    _check_model_path(name)
    if not trust_remote_code:
        _warn_ignored_custom_code(Path(name))
    model = _from_pretrained(AutoModelForSequenceClassification, name, "the reward model", dtype=resolve_dtype(dtype),
                             trust_remote_code=trust_remote_code, attn_implementation=attn_implementation or "sdpa",
                             use_safetensors=any(Path(name).glob("*.safetensors")))
    if model.config.num_labels != 1:
        raise ValueError(f"{name!r} has num_labels={model.config.num_labels}; a reward model has one (num_labels=1)")
    return model


def _from_pretrained(auto_class, name: str, what: str, **kwargs):
    """``auto_class.from_pretrained(name, **kwargs)``; a failure the files or the setup can cause is one
    ValueError line (:func:`_load_error`), anything else propagates as it is."""
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except Exception as exc:
        error = _load_error(name, what, exc, kwargs.get("attn_implementation"), kwargs.get("trust_remote_code"))
        if error is exc:
            raise
        raise error from None


def _load_error(name: str, what: str, exc: Exception, attn: str | None, trust_remote_code: bool) -> Exception:
    """The one-line error for ``exc``, raised by ``from_pretrained`` for ``name``, or ``exc`` itself.

    A weights file whose header disagrees with it (read only now, after the failure) is a
    :class:`ModelFileError`; so is safetensors' own error where the folder has one such file. A
    missing package of the attention implementation, a refused or torn ``.bin`` pickle and
    transformers' OSError / ValueError / ImportError are a ValueError naming ``name``.
    """
    folder = Path(name).expanduser()
    safetensors = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for file in safetensors:
        problem = safetensors_problem(file)
        if problem:
            return ModelFileError(file, problem)
    if "safetensor" in type(exc).__name__.lower() and len(safetensors) == 1:
        return ModelFileError(safetensors[0], first_line(exc))
    if isinstance(exc, ImportError) and attn not in PACKAGE_FREE_ATTENTION:
        return ValueError(attention_unavailable(attn, exc))
    weights = sorted(folder.glob("pytorch_model*.bin")) if folder.is_dir() else []
    if weights and (_refused_pickle(exc) or isinstance(exc, EOFError) or "PytorchStreamReader" in str(exc)):
        return ValueError(f"could not load {what} from {name!r}: {describe_unreadable(weights[0], exc)}")
    if isinstance(exc, (OSError, ValueError, ImportError)) or "safetensor" in type(exc).__name__.lower():
        return ValueError(_failure_line(name, what, exc, trust_remote_code))
    return exc


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _missing_files(folder: Path, what: str) -> str | None:
    """The line for a folder that lacks the files ``what`` (the model, the tokenizer) is read from, else None."""
    if not folder.is_dir():
        return None
    if what == "the tokenizer" and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return (f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}): copy the base model's "
                "tokenizer files into it, or pass --tokenizer FOLDER")
    if what == "the model" and not (folder / "config.json").is_file():
        return (f"{folder} is not a model folder (no config.json): pass a folder with config.json and weights, "
                "or a .gguf file")
    return None


def _failure_line(name: str, what: str, exc: BaseException, trust_remote_code: bool) -> str:
    """Why ``what`` (the model, the tokenizer) could not be loaded from ``name``, in one line. A name
    that is no local path was looked up on the model hub: say that the folder is not here either."""
    if not Path(name).expanduser().exists():
        return (f"model folder not found: {name}, and the model hub could not provide it ({first_line(exc)}); "
                "pass a local folder (config.json and weights) or a .gguf file")
    missing = _missing_files(Path(name).expanduser(), what)
    if missing:
        return missing
    hint = ""
    if not trust_remote_code and "trust_remote_code" in str(exc):
        hint = " (it needs custom code from the model folder or hub: pass --trust-remote-code if you trust it)"
    return f"could not load {what} from {name!r}: {first_line(exc)}{hint}"


def reward_model_from_causal_lm(lm):
    """A one-logit ``AutoModelForSequenceClassification`` with ``lm``'s body (weights copied, same
    dtype and attention implementation) and a new ``score`` head (initialised by transformers'
    ``_init_weights``, normal with the config's ``initializer_range``, from torch's current seed)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.architectures = None
    try:
        model = AutoModelForSequenceClassification.from_config(
            config, dtype=next(lm.parameters()).dtype, attn_implementation=getattr(lm.config, "_attn_implementation",
                                                                                 None) or "sdpa")
    except ValueError as exc:
        raise ValueError(f"{type(lm).__name__} has no sequence-classification form for a reward model: "
                         f"{first_line(exc)}") from None
    body = getattr(model, model.base_model_prefix)
    body.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    return model


def check_vocab(tokenizer, model, examples=()) -> None:
    """Refuse token ids that the model's input embedding has no row for, before training starts.

    A tokenizer larger than the embedding (another model's tokenizer, added tokens without
    ``resize_token_embeddings``) otherwise fails mid-step with an IndexError. Raises ValueError when
    the pad token or an id in ``examples`` (:class:`~preftune.data.records.TokenizedExample`) is out
    of range; warns when only unused ids are.
    """
    embedding = model.get_input_embeddings()
    rows = int(embedding.weight.shape[0])
    size = len(tokenizer)
    if size <= rows:
        return
    fix = ("use the tokenizer the model was trained with, or resize the model's embeddings first "
           "(model.resize_token_embeddings(len(tokenizer)), then save it and pass that folder)")
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= rows:
        raise ValueError(f"the tokenizer has {size} tokens but the model's embedding only {rows} rows: its pad token "
                         f"id {pad} has no embedding; {fix}")
    for ex in examples:
        top = max(max(ex.prompt_ids, default=0), *(max(ids, default=0) for ids in ex.completions))
        if top >= rows:
            raise ValueError(f"the tokenizer has {size} tokens but the model's embedding only {rows} rows: "
                             f"{ex.location or f'example {ex.index}'} has token id {top}, which has no embedding; "
                             f"{fix}")
    log.warning("the tokenizer has %d tokens but the model's embedding only %d rows; this data uses none of the "
                "ids >= %d, but generating or other data may: %s", size, rows, rows, fix)


def describe_unreadable(file: Path, exc: BaseException) -> str:
    """Why a weights or state file could not be loaded, in our words: missing, truncated or corrupt,
    or a pickle refused by ``weights_only`` (torch's advice to load it unsafely is never repeated)."""
    from preftune.common.files import size_text

    file = Path(file)
    if isinstance(exc, FileNotFoundError) or not file.exists():
        return f"{file.name} is missing"
    if _refused_pickle(exc):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it refers to {found.group(1)})" if found else ""
        return (f"{file.name} holds a pickle with objects other than tensors and numbers{what}, which preftune "
                f"refuses to load: loading it could run code. Use files written by preftune or safetensors weights")
    size = file.stat().st_size if file.is_file() else 0
    if isinstance(exc, (EOFError, RuntimeError, OSError)) or "safetensor" in type(exc).__name__.lower():
        return f"{file.name} is truncated or corrupt ({size_text(size)}; {first_line(exc)[:120]})"
    return f"{file.name}: {first_line(exc)}"


def add_lora(model, r: int, alpha: float, dropout: float, targets: str, seed: int = 0):
    """Wrap ``model`` with fresh LoRA adapters (peft). Only adapter weights train."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel) or getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("the model already carries LoRA adapters (an adapter folder?): with new adapters on top, "
                         "'adapters off' would switch those off too and the reference would not be your starting "
                         "model. Merge them first (train with --merge-lora, or peft's merge_and_unload) and pass the "
                         "merged folder.")
    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _check_model_path(name: str) -> None:
    """A model (or tokenizer) name must exist as a local path unless it could be a hub name
    (``org/name`` or ``name``, not ending in a file suffix). Raises ``model folder not found: NAME``
    instead of letting the hub client complain that it is not a valid repo id."""
    if Path(name).expanduser().exists():
        return
    if HUB_NAME.fullmatch(name) and not name.lower().endswith(WEIGHT_SUFFIXES):
        return
    raise ValueError(f"model folder not found: {name}")


def _warn_ignored_custom_code(folder: Path) -> None:
    """Warn once per ``config.json`` that names custom code (``auto_map``) for a built-in ``model_type``:
    without ``trust_remote_code`` transformers loads the built-in classes instead, silently. (An
    unknown ``model_type`` fails to load with transformers' own request for ``trust_remote_code``.)"""
    from transformers import CONFIG_MAPPING

    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError):
        return  # transformers reports the unreadable config
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or not auto_map or config.get("model_type") not in CONFIG_MAPPING:
        return
    key = config_file.resolve()
    if key in _custom_code_said:
        return
    _custom_code_said.add(key)
    log.warning("%s names custom code (auto_map: %s) that is not run without --trust-remote-code: the built-in %r "
                "classes load the model instead. Pass --trust-remote-code only if you trust that code and need it",
                config_file, ", ".join(f"{cls} -> {ref}" for cls, ref in auto_map.items()), config["model_type"])


def _refused_pickle(exc: BaseException) -> bool:
    """torch.load(weights_only=True) refused the pickle (an ``UnpicklingError``; matched by name, so that
    this module never imports a pickle module)."""
    return any(cls.__name__ == "UnpicklingError" for cls in type(exc).__mro__)
