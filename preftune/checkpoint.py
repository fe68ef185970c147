"""Checkpoints written atomically, found again, and refused when they belong to another run.

A checkpoint is a folder ``OUTPUT/checkpoints/step-000120/`` holding

* ``model.safetensors`` — the trainable weights (all weights, or only adapters with LoRA);
* ``optimizer.pt`` / ``scheduler.pt`` — plain tensor/number state dicts, loaded with
  ``weights_only=True`` (never arbitrary pickles);
* ``rng.pt`` — the torch, Python and NumPy (and CUDA) RNG states of every process, also
  ``weights_only``;
* ``state.json`` — step, data position, number of processes and the config it was written under.

It is written into ``step-000120.tmp-<pid>`` and renamed into place only when complete and
fsync'ed, so a crash (even SIGKILL) mid-write leaves nothing that ``latest`` would pick up; such
leftover ``.tmp-`` folders are removed by the next save.

Test hook: with ``PREFTUNE_TEST_CRASH_IN_CHECKPOINT=STAGE`` (or ``STAGE:STEP``) in the environment
the process SIGKILLs itself at that stage of writing (the step ``STEP`` checkpoint, or the
first one); stages are :data:`CRASH_STAGES`. ``tests/test_crash_safety.py`` uses it to prove
that an interrupted write is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch

CHECKPOINT_PREFIX = "step-"
TMP_MARK = ".tmp-"  # in the name of folders being written (or left over by a crash)
CRASH_HOOK_ENV = "PREFTUNE_TEST_CRASH_IN_CHECKPOINT"
CRASH_STAGES = ("after_model", "after_optimizer", "before_rename", "after_rename")

# Options that may differ between a run and its resumption (they don't change the weights).
RESUME_SAFE_OPTIONS = {"resume_from", "progress", "max_steps", "save_steps", "save_total_limit", "logging_steps",
                       "eval_steps", "tensorboard", "output_dir", "ref_cache_dir"}


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (whether or not it exists)."""
    return checkpoint_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and TMP_MARK not in p.name
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "state.json").exists()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path:
    """``latest`` -> the newest complete checkpoint; a path -> itself (checked)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume-from latest: no checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    path = Path(resume_from)
    if not (path / "state.json").exists():
        raise ValueError(f"--resume-from {resume_from}: not a preftune checkpoint (no state.json)")
    return path


def save_checkpoint(output_dir, step: int, model_state: dict, optimizer, scheduler, state: dict,
                    keep: int, rng: list[dict] | None = None) -> Path:
    """Write a checkpoint atomically; keep the newest ``keep`` up to this one (``keep <= 0``: all).

    ``optimizer``: the optimizer, or its state dict already gathered (FSDP).

    ``rng`` holds every process's :func:`rng_state` (default: this process's). Checkpoints of
    later steps (left by a run that was resumed from an earlier one) are never removed here.
    """
    from safetensors.torch import save_file

    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"*{TMP_MARK}*"):  # left by a crash mid-write: never complete, never resumed from
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(output_dir, step)
    tmp = root / f"{final.name}{TMP_MARK}{os.getpid()}"
    tmp.mkdir()
    replaced = None
    try:
        save_file(_unshared({k: v.detach().contiguous().cpu() for k, v in model_state.items()}),
                  str(tmp / "model.safetensors"))
        _crash_point("after_model", step)
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _crash_point("after_optimizer", step)
        torch.save({"ranks": rng if rng is not None else [rng_state()]}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        _crash_point("before_rename", step)
        if final.exists():  # the same step written again: move the old one aside, then swap
            replaced = root / f"{final.name}{TMP_MARK}old-{os.getpid()}"
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(root)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _crash_point("after_rename", step)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if keep > 0:
        older = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Everything in a checkpoint folder; tensors loaded without unpickling code.

    Raises ValueError naming the folder when a file is missing or unreadable.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        loaded = {
            "model": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
            "rng": torch.load(path / "rng.pt", weights_only=True, map_location="cpu"),
            "state": json.loads((path / "state.json").read_text()),
        }
    except Exception as exc:  # safetensors, pickle (weights_only refusal), json and OS errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} is unreadable: {first}") from None
    if not isinstance(loaded["state"], dict) or "step" not in loaded["state"]:
        raise ValueError(f"checkpoint {path} is unreadable: state.json has no step")
    return loaded


def config_differences(saved: dict, current: dict) -> list[str]:
    """Options whose values differ between a checkpoint's config and this run's."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_SAFE_OPTIONS:
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"--{key.replace('_', '-')}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    return diffs


def rng_state() -> dict:
    """This process's RNG states (torch CPU, Python, NumPy, CUDA) as tensors and numbers."""
    state = {"torch": torch.get_rng_state(), "python": _python_rng_tensor()}
    numpy_state = _numpy_rng_tensor()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), None if gauss is None else float(gauss)))
    if "numpy" in state:
        import numpy as np

        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_tensor():
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _numpy_rng_tensor():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with transformers
        return None
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share memory with an earlier one (tied embeddings): safetensors refuses
    shared storage, and keeping every name lets resumption check that no weight is missing."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def _crash_point(stage: str, step: int) -> None:
    """The test hook (see the module docstring): SIGKILL this process at ``stage``."""
    wanted = os.environ.get(CRASH_HOOK_ENV)
    if not wanted:
        return
    name, _, at_step = wanted.partition(":")
    if name == stage and (not at_step or int(at_step) == step):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for child in path.iterdir() if path.is_dir() else []:
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
