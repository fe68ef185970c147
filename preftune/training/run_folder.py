"""The run folder (``--output-dir``): who may write it, which run it holds, and writing its files safely.

* **One trainer at a time.** A running run holds ``OUTPUT/.preftune.lock`` (its pid, host, start time and
  run id) under an OS file lock (``flock``), which the kernel drops when the process dies, even by
  ``kill -9``: a second trainer on the folder is refused, and a lock file left behind by a killed run is
  taken over with a log line. Where ``flock`` is missing, a lock whose pid is gone on this host counts as left.
* **Runs never mix.** A folder that already holds a run (a final model, checkpoints or metrics rows) is
  refused with one line naming the choices, unless this run resumes it (``--resume-from``) or replaces it
  (``--overwrite-output-dir``, which first deletes that run's files; the reference cache, keyed by content,
  and files preftune did not write stay).
* **Identity.** ``OUTPUT/run.json`` names the folder's run: a run id and the fingerprint of its tokenized
  training data (content, not path). Checkpoints carry both; ``--resume-from latest`` continues only this
  folder's run, and a checkpoint trained on other data is refused.
* **The final model** is written atomically by :mod:`preftune.training.final_model`; claiming the folder first
  undoes a final save a kill interrupted. Other files go through :func:`preftune.common.files.write_atomic`.

Only the main process (``RANK`` 0) locks, deletes or writes here; the other ranks only read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from preftune.common.files import pid_alive, write_atomic
from preftune.config.values import ConfigError
from preftune.training import checkpoint as ckpt
from preftune.training.final_model import MODEL_FILES, WEIGHT_FILES, matches_any, recover_final_save

log = logging.getLogger("preftune")

LOCK_NAME = ".preftune.lock"
RUN_FILE = "run.json"
# What a run writes at the top of OUTPUT besides the model (the reference cache stays: keyed by content).
RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", RUN_FILE)
RUN_DIRS = ("checkpoints", "tensorboard")


class OutputDirBusy(ValueError):
    """Another live run holds the folder's lock."""


# ------------------------------------------------------------------------------------------------
# The run folder of one training run
# ------------------------------------------------------------------------------------------------

@dataclass
class RunFolder:
    """The claimed ``--output-dir`` of this run (see :func:`claim_output_dir`).

    ``run_id`` is this run's lineage: new for a fresh run, the checkpoint's for a resumed one.
    ``resume_path`` / ``resume_state`` are the checkpoint to resume from and its ``state.json``.
    """

    out: Path
    run_id: str | None  # None on other ranks than the main one for a new run (the main one makes it)
    main: bool
    resume_path: Path | None = None
    resume_state: dict | None = None
    data_fingerprint: str | None = None
    lock: "RunLock | None" = None
    step: int = 0  # the loop's step, for messages about what a failed final save keeps
    config_text: str = ""  # config.yaml, written by set_data once the data is accepted
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def set_data(self, fingerprint: str, source: str) -> None:
        """Record the training data's fingerprint; refuse resuming a checkpoint trained on other data.

        Every rank calls it (with the same fingerprint); the main one writes ``run.json``.
        """
        saved = (self.resume_state or {}).get("data_fingerprint")
        if saved and saved != fingerprint:
            raise ValueError(f"checkpoint {self.resume_path} was trained on other data than {source} (data "
                             f"fingerprint {saved}, now {fingerprint}): resuming would continue run "
                             f"{self.run_id} on data it never saw. Resume with the data it was written with, "
                             f"or start a new run (--overwrite-output-dir, or another --output-dir)")
        self.data_fingerprint = fingerprint
        if self.main:  # the run is accepted: its config.yaml and run.json
            write_atomic(self.out / "config.yaml", self.config_text)
            record = {"run_id": self.run_id, "data_fingerprint": fingerprint, "data": source,
                      "started": self.started, "resumed_from": str(self.resume_path) if self.resume_path else None}
            write_atomic(self.out / RUN_FILE, json.dumps(record, indent=1) + "\n")

    def identity(self) -> dict:
        """What every checkpoint's ``state.json`` records about the run that wrote it."""
        return {"run_id": self.run_id, "data_fingerprint": self.data_fingerprint}

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output_dir(cfg) -> RunFolder:
    """Take ``cfg.output_dir`` for this run, before anything is loaded.

    Main process: lock the folder (refusing a live run's), undo an interrupted final save, resolve the
    checkpoint to resume from (refusing one written under other options), or else refuse a folder that
    holds another run (or delete it: ``--overwrite-output-dir``). Other ranks only resolve the checkpoint.
    :meth:`RunFolder.set_data` then checks the data and writes ``config.yaml`` and ``run.json``.
    Raises :class:`ConfigError` / ``ValueError`` with one line.
    """
    out = Path(cfg.output_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    if cfg.overwrite_output_dir and cfg.resume_from:
        raise ConfigError("--overwrite-output-dir and --resume-from: one deletes the run the other continues; "
                          "pick one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    folder_run = read_run_record(out).get("run_id")
    if not main:  # the main process decides and writes; this rank only needs the checkpoint
        run = RunFolder(out, folder_run, main=False)
        return _with_resume(run, cfg, folder_run) if cfg.resume_from else run
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(out)
    try:
        recover_final_save(out)
        run = RunFolder(out, uuid.uuid4().hex[:12], main=True, lock=lock)
        if cfg.resume_from:
            run = _with_resume(run, cfg, folder_run)
        else:
            previous = describe_previous_run(out)
            if previous and not cfg.overwrite_output_dir:
                what, resumable = previous
                choices = ["to continue it: --resume-from latest"] if resumable else []
                choices += ["to replace it: --overwrite-output-dir", "or pick another --output-dir"]
                raise ConfigError(f"--output-dir {out} already holds {what}; {'; '.join(choices)}")
            removed = remove_run_files(out, model=bool(previous))
            if previous:
                log.warning("--overwrite-output-dir: deleted the previous run's files in %s (%s)", out,
                            ", ".join(removed))
        lock.write(run.run_id)
        run.config_text = _yaml_text(cfg)
    except BaseException:
        lock.release()
        raise
    return run


def _with_resume(run: RunFolder, cfg, folder_run: str | None) -> RunFolder:
    path = ckpt.resolve_resume(cfg.resume_from, run.out, run_id=folder_run)
    state = ckpt.read_state(path)
    diffs = ckpt.config_differences(state.get("config") or {}, cfg.to_dict(),
                                    data_by_content="data_fingerprint" in state)
    if diffs:
        raise ValueError(f"checkpoint {path} was written with other options: {'; '.join(diffs)}. Resume with the "
                         f"checkpoint's options, or start a new run in another --output-dir")
    run.resume_path, run.resume_state = path, state
    run.run_id = state.get("run_id") or folder_run or run.run_id  # continue the checkpoint's run
    return run


def _yaml_text(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def read_run_record(out: Path) -> dict:
    """``OUTPUT/run.json`` (``{}`` when absent or unreadable)."""
    try:
        record = json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_previous_run(out: Path) -> tuple[str, bool] | None:
    """``(what the folder holds, whether it can be resumed)`` when it holds a run or a model, else None.

    A run is there when the folder has a summary.json (finished), a checkpoint, a training row in
    metrics.jsonl, or model weights. An earlier start that trained no step (config.yaml, eval rows) is not.
    """
    out = Path(out)
    if not out.is_dir():
        return None
    checkpoints = ckpt.list_checkpoints(out)
    last = f"last checkpoint step {ckpt.checkpoint_step(checkpoints[-1])}" if checkpoints else "no checkpoint"
    run_id = read_run_record(out).get("run_id")
    named = f"run {run_id}, " if run_id else ""
    if (out / "summary.json").exists():
        try:
            steps = json.loads((out / "summary.json").read_text()).get("steps")
        except (OSError, ValueError, AttributeError):
            steps = None
        return f"a finished run ({named}{f'{steps} steps, ' if steps is not None else ''}{last})", bool(checkpoints)
    trained = _last_trained_step(out / "metrics.jsonl")
    if checkpoints or trained:
        return f"an unfinished run ({named}{f'metrics up to step {trained}, ' if trained else ''}{last})", \
            bool(checkpoints)
    weights = sorted(p.name for p in out.iterdir() if p.is_file() and matches_any(p.name, WEIGHT_FILES))
    if weights:
        return f"a model ({weights[0]})", False
    return None


def _last_trained_step(path: Path) -> int:
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), (int, float)):
            last = max(last, int(row["step"]))
    return last


def remove_run_files(out: Path, model: bool) -> list[str]:
    """Delete a previous run's files in ``out`` (its model too when ``model``); the names deleted."""
    removed = []
    for entry in sorted(Path(out).iterdir()):
        ours = entry.name in RUN_FILES or (entry.is_dir() and entry.name in RUN_DIRS)
        if model and entry.is_file() and matches_any(entry.name, MODEL_FILES):
            ours = True
        if not ours:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed




# ------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------

class RunLock:
    """``OUTPUT/.preftune.lock``: held (``flock``) by the live run, its JSON content says whose it is."""

    def __init__(self, path: Path, fd: int, info: dict):
        self.path, self.fd, self.info = path, fd, info

    @classmethod
    def acquire(cls, out: Path, name: str = LOCK_NAME) -> "RunLock":
        """Take the folder's lock (the file ``name`` in it), or raise :class:`OutputDirBusy` naming the run
        that holds it."""
        path = Path(out) / name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            held = _try_flock(fd)
            previous = _read_lock(fd)
            if held is None:  # no flock here: judge by the pid it names
                held = bool(previous) and not _left_behind(previous)
            if held:
                os.close(fd)
                raise OutputDirBusy(f"--output-dir {out} is in use by a running preftune run "
                                    f"({describe_lock(previous)}): wait for it to finish, or pick another "
                                    f"--output-dir. (If that run is gone, delete {path}.)")
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file as we opened it: take the new one
                os.close(fd)
                continue
            if previous:
                log.warning("taking over the lock of an earlier run in %s (%s): that process is gone (killed?)",
                            out, describe_lock(previous))
            lock = cls(path, fd, {})
            lock.write(None)
            return lock

    def write(self, run_id: str | None) -> None:
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": self.info.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": run_id}
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, data)
        os.fsync(self.fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first: a waiter then sees a removed file)."""
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def lock_owner(out: Path, name: str = LOCK_NAME) -> tuple[dict, bool] | None:
    """Who holds or last held the folder's lock ``name``: ``(what its file says, whether that process still
    holds it)``; None when there is no lock file. Takes nothing: with ``flock`` a shared lock is tried and
    dropped at once (a trainer starting on the folder in that instant is refused as busy); without it, a
    lock whose pid is gone on this host counts as left behind."""
    try:
        fd = os.open(Path(out) / name, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = _read_lock(fd)
        held = _try_flock(fd, shared=True)
        if held is None:
            held = bool(info) and not _left_behind(info)
        elif not held:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
        return info, held
    finally:
        os.close(fd)


def describe_lock(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}, "
            f"run {info.get('run_id') or '?'}")


def _try_flock(fd: int, shared: bool = False) -> bool | None:
    """False when we got the lock, True when another process holds it, None when flock is unsupported."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        return None  # ENOLCK, EOPNOTSUPP, ...: a file system without flock
    return False


def _read_lock(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _left_behind(info: dict) -> bool:
    """Whether a lock's process is certainly gone (same host, pid not running)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    return not pid_alive(info["pid"])
