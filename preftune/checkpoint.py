"""Checkpoints written atomically, found again, and refused when they belong to another run.

A checkpoint is a folder ``OUTPUT/checkpoints/step-000120/`` holding

* ``model.safetensors`` — the trainable weights (all weights, or only adapters with LoRA);
* ``optimizer.pt`` / ``scheduler.pt`` — plain tensor/number state dicts, loaded with
  ``weights_only=True`` (never arbitrary pickles);
* ``rng.pt`` — torch (and CUDA) RNG states, also ``weights_only``;
* ``state.json`` — step, epoch position and the config it was written under.

It is written into ``step-000120.tmp-<pid>`` and renamed into place only when complete, so a
crash mid-write leaves nothing that ``latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

CHECKPOINT_PREFIX = "step-"

# Options that may differ between a run and its resumption (they don't change the result).
RESUME_SAFE_OPTIONS = {"resume_from", "progress", "max_steps", "save_steps", "save_total_limit", "logging_steps",
                       "eval_steps", "tensorboard", "output_dir", "ref_cache_dir"}


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and ".tmp" not in p.name
             and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


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
                    keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest ``keep``."""
    from safetensors.torch import save_file

    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step: replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Everything in a checkpoint folder; tensors loaded without unpickling code."""
    from safetensors.torch import load_file

    return {
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
        "rng": torch.load(path / "rng.pt", weights_only=True, map_location="cpu"),
        "state": json.loads((path / "state.json").read_text()),
    }


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
    state = {"torch": torch.get_rng_state(), "python": _python_rng_tensor()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), None if gauss is None else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_tensor():
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


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
