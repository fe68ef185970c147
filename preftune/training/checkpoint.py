"""Checkpoints written atomically, found again, and refused when they belong to another run.

A checkpoint is a folder ``OUTPUT/checkpoints/step-000120/`` holding

* ``model.safetensors`` — the trainable weights (all weights, or only adapters with LoRA);
* ``optimizer.pt`` / ``scheduler.pt`` — plain tensor/number state dicts, loaded with
  ``weights_only=True`` (never arbitrary pickles);
* ``rng.pt`` — the torch, Python and NumPy (and CUDA) RNG states of every process, also
  ``weights_only``;
* ``state.json`` — step, data position, number of processes, the config it was written under, the
  run that wrote it (``run_id``, ``data_fingerprint``: see :mod:`preftune.training.run_folder`) and the numerical
  guard's state (``weights_norm``, streaks: see :mod:`preftune.training.divergence`).

It is written into ``step-000120.tmp-<pid>`` and renamed into place only when complete and
fsync'ed, so a crash (even SIGKILL) mid-write leaves nothing that ``latest`` would pick up; such
leftover ``.tmp-`` folders are removed by the next save, but only those of processes that are gone
(never a live run's). ``latest`` is the newest checkpoint of *this folder's run*: another run's
checkpoint in the folder is never continued by it.

Test hook: with ``PREFTUNE_TEST_CRASH_IN_CHECKPOINT=STAGE`` (or ``STAGE:STEP``) in the environment
the process SIGKILLs itself at that stage of writing (the step ``STEP`` checkpoint, or the
first one); stages are :data:`CRASH_STAGES` (and, for the final model,
:data:`preftune.training.run_folder.FINAL_CRASH_STAGES`). ``tests/integration/test_crash_safety.py`` and
``tests/integration/test_run_safety.py`` use it to prove that an interrupted write is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch

from preftune.common.files import fsync_dir, remove_left_temp, tensor_bytes, write_guard
from preftune.model.loading import describe_unreadable

CHECKPOINT_PREFIX = "step-"
TMP_MARK = ".tmp-"  # in the name of folders being written (or left over by a crash)
CRASH_HOOK_ENV = "PREFTUNE_TEST_CRASH_IN_CHECKPOINT"
CRASH_STAGES = ("after_model", "after_optimizer", "before_rename", "after_rename")

# Options that may differ between a run and its resumption (they don't change the weights). The
# learning rate may change too, said in the log (resume.resume); the data path when the checkpoint
# holds the data's fingerprint (the content is compared instead).
RESUME_SAFE_OPTIONS = {"resume_from", "progress", "max_steps", "save_steps", "save_total_limit", "logging_steps",
                       "eval_steps", "tensorboard", "report_to", "run_name", "output_dir", "ref_cache_dir",
                       "share_ref_cache", "overwrite_output_dir", "learning_rate"}


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (whether or not it exists)."""
    return checkpoint_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored); only run ``run_id``'s if given."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and TMP_MARK not in p.name
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "state.json").exists()]
    if run_id is not None:
        found = [p for p in found if checkpoint_run(p) == run_id]
    return sorted(found, key=checkpoint_step)


def checkpoint_run(path: Path) -> str | None:
    """The run id in a checkpoint's state.json (None: unreadable, or written before run ids existed)."""
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_resume(resume_from: str, output_dir: str | Path, run_id: str | None = None) -> Path:
    """``latest`` -> the newest complete checkpoint of run ``run_id`` (the folder's run; any run when
    None, a folder from before run ids); a path -> itself (checked)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir, run_id)
        if not found:
            others = list_checkpoints(output_dir)
            if others:
                raise ValueError(f"--resume-from latest: no checkpoint of this folder's run (run {run_id}) in "
                                 f"{checkpoint_dir(output_dir)}; {others[-1].name} was written by run "
                                 f"{checkpoint_run(others[-1])}, which 'latest' never continues. Pass its path to "
                                 f"--resume-from if you mean to continue it, with the data it was trained on")
            raise ValueError(f"--resume-from latest: no checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    path = Path(resume_from)
    if not (path / "state.json").exists():
        raise ValueError(f"--resume-from {resume_from}: not a preftune checkpoint (no state.json)")
    return path


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (step, config, run id, ...); ValueError naming it when unreadable."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is unreadable: state.json: {_first_line(exc)}"
                         f"{previous_hint(path)}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint {path} is unreadable: state.json has no step{previous_hint(path)}")
    return state


def previous_hint(path: Path) -> str:
    """``; the previous checkpoint of its run is .../step-000011: --resume-from .../step-000011`` (or '')."""
    path = Path(path)
    if not path.name.startswith(CHECKPOINT_PREFIX) or not path.name[len(CHECKPOINT_PREFIX):].isdigit():
        return ""
    run = checkpoint_run(path)
    earlier = [p for p in list_checkpoints(path.parent.parent, run) if checkpoint_step(p) < checkpoint_step(path)]
    if not earlier:
        return ""
    return f"; the previous checkpoint of its run is {earlier[-1].name}: --resume-from {earlier[-1]}"


def save_checkpoint(output_dir, step: int, model_state: dict, optimizer, scheduler, state: dict,
                    keep: int, rng: list[dict] | None = None) -> Path:
    """Write a checkpoint atomically; keep the newest ``keep`` up to this one (``keep <= 0``: all).

    ``optimizer``: the optimizer, or its state dict already gathered (FSDP).

    ``rng`` holds every process's :func:`rng_state` (default: this process's). Checkpoints of
    later steps (left by a run that was resumed from an earlier one) are never removed here.
    Every write goes through :func:`preftune.common.files.write_guard`: a full disk raises
    :class:`~preftune.common.files.DiskFullError` (the space needed and free, the checkpoint to resume
    from), an unwritable folder :class:`~preftune.common.files.CannotWriteError`, each one line.
    """
    root = checkpoint_dir(output_dir)
    final = checkpoint_path(output_dir, step)
    tmp = root / f"{final.name}{TMP_MARK}{os.getpid()}"
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    needed = tensor_bytes(model_state) + tensor_bytes(optimizer_state)
    replaced = None
    with write_guard(tmp, needed, hint=_kept_hint(output_dir, step)):
        root.mkdir(parents=True, exist_ok=True)
        # Left by a crash mid-write (never complete, never resumed from); a live process's are not touched.
        remove_left_temp(root, f"*{TMP_MARK}*")
        tmp.mkdir()
        try:
            _write_files(tmp, step, model_state, optimizer_state, scheduler.state_dict(),
                         {"ranks": rng if rng is not None else [rng_state()]}, state)
            _crash_point("before_rename", step)
            # A checkpoint is a folder of files: it is renamed into place whole (os.replace of the folder),
            # which common.files.atomic_path (one file) cannot do; the files inside need no temp names.
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


def _write_files(folder: Path, step: int, model_state: dict, optimizer_state: dict, scheduler_state: dict,
                 rng: dict, state: dict) -> None:
    """The files of a checkpoint, written into ``folder`` and fsync'ed (see the module docstring)."""
    from safetensors.torch import save_file

    save_file(_unshared({k: v.detach().contiguous().cpu() for k, v in model_state.items()}),
              str(folder / "model.safetensors"))
    _crash_point("after_model", step)
    _torch_save(optimizer_state, folder / "optimizer.pt")
    _torch_save(scheduler_state, folder / "scheduler.pt")
    _crash_point("after_optimizer", step)
    _torch_save(rng, folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    _fsync_dir(folder)


def _torch_save(value, path: Path) -> None:
    """``torch.save`` into a file Python opened: a failed write raises its OS error (ENOSPC, ...) for
    :func:`~preftune.common.files.write_guard` to read, where torch's own writer says only
    ``unexpected pos``; a folder that cannot be written fails at the open, naming the file."""
    with open(path, "wb") as fh:
        torch.save(value, fh)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _kept_hint(output_dir, step: int) -> str:
    """What a failed save leaves to resume from (for the disk-full message)."""
    kept = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) < step]
    if not kept:
        return "no earlier checkpoint is kept; free some space and run again"
    return f"the newest kept checkpoint is {kept[-1]}; free some space and resume with --resume-from latest"


def load_checkpoint(path: Path) -> dict:
    """Everything in a checkpoint folder; tensors loaded without unpickling code.

    Raises ValueError naming the folder and the file when one is missing, truncated or refused (a
    pickle holding anything but tensors and numbers), and naming the previous checkpoint of its run.
    """
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    loaded = {"state": state}
    for key, name in (("model", "model.safetensors"), ("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"),
                      ("rng", "rng.pt")):
        file = path / name
        try:
            loaded[key] = (load_file(str(file)) if name.endswith(".safetensors")
                           else torch.load(file, weights_only=True, map_location="cpu"))
        except Exception as exc:  # safetensors, pickle (weights_only refusal), zip and OS errors alike
            raise ValueError(f"checkpoint {path} is unreadable: {describe_unreadable(file, exc)}"
                             f"{previous_hint(path)}") from None
    return loaded


def config_differences(saved: dict, current: dict, data_by_content: bool = False) -> list[str]:
    """Options whose values differ between a checkpoint's config and this run's.

    ``data_by_content``: the checkpoint holds its data's fingerprint, which is compared instead of the path.
    """
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_SAFE_OPTIONS or (data_by_content and key == "data"):
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


_fsync_dir = fsync_dir
