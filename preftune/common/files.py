"""Writing files so that a crash, a full disk or a refused write loses nothing and says one line.

* :func:`atomic_path` / :func:`write_atomic`: write a temp file beside the target, fsync it, give it the
  mode ``open(path, "w")`` would (:func:`mode_for_write`), ``os.replace`` it onto the target. A reader
  (or a crash) sees the old file or the new one, never a torn or empty one.
* :func:`write_guard`: the one handler of a failed write, used by :func:`atomic_path` and by every
  writer of a folder of files (checkpoints, the final model). A full disk (ENOSPC, also as torch's
  ``inline_container.cc`` or safetensors' ``IoError`` wrappings) becomes one :class:`DiskFullError`
  line naming the path, the space needed (estimated from tensor sizes, :func:`tensor_bytes`) and the
  space free; a refused write (no permission, a read-only file system, a folder in the way) one
  :class:`CannotWriteError` line ``cannot write PATH: permission denied``.
* Temp folders are named ``...-<pid>``: :func:`left_by_dead_process` tells a leftover of a killed process
  (or of this one) from a live writer's, so clean-up never deletes another live run's work.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import stat
from contextlib import contextmanager, suppress
from pathlib import Path


def json_safe(value):
    """``value`` with every non-finite float (NaN, inf) inside dicts, lists and tuples replaced by None:
    JSON has no NaN, and readers choke on the ``NaN`` Python's ``json`` writes by default."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class CannotWriteError(ValueError):
    """A write that failed: the message is one line naming the path and why (``permission denied``, ...)."""


class DiskFullError(CannotWriteError):
    """No space left on the device: the message names the path, the space needed and the space free."""


@contextmanager
def atomic_path(path: Path, needed: int = 0, hint: str = ""):
    """Yield a temporary path beside ``path``; when the block succeeds it is fsync'ed, given the mode
    :func:`mode_for_write` says and renamed onto ``path``; when it fails (or is interrupted) it is
    removed and ``path`` is untouched. A failed write raises :class:`DiskFullError` or
    :class:`CannotWriteError` naming ``path`` (:func:`write_guard`; ``needed``: bytes the write takes,
    0 when unknown; ``hint``: what to do about a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with write_guard(path, needed, hint):
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, mode_for_write(path))
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def write_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (:func:`atomic_path`)."""
    with atomic_path(path, len(text.encode())) as tmp:
        tmp.write_text(text)


def mode_for_write(path: Path) -> int:
    """The permission bits ``open(path, "w")`` leaves ``path`` with: an existing file keeps its own,
    a new one gets ``0o666`` less the process's umask (``0o644`` under the usual umask 022)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except OSError:
        return 0o666 & ~umask()


def umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux's /proc/self/status);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def fsync_dir(path: Path) -> None:
    """fsync the files directly in ``path`` and the folder itself (best effort: not every OS allows it)."""
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


# ------------------------------------------------------------------------------------------------
# Disk full
# ------------------------------------------------------------------------------------------------

def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, also when wrapped by another exception or only said in its text."""
    for _ in range(10):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def size_text(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as ``df -H`` shows them)."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} TB"  # pragma: no cover


# torch's own file writer on a short write (a full disk), without the OS error: older and newer wordings
TORN_WRITE_TEXTS = ("file write failed", "unexpected pos")
# Why a write was refused, by errno and as native writers (safetensors, pyarrow, torch) word it.
REFUSED = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}
REFUSED_TEXTS = {"Permission denied": "permission denied", "Read-only file system": "read-only file system"}


@contextmanager
def write_guard(path: Path, needed: int = 0, hint: str = ""):
    """Re-raise a failed write inside the block as one line naming ``path``:

    * a full disk: :class:`DiskFullError`,
      ``no space left on device writing PATH (needs about 1.2 GB, 30.0 MB free); HINT`` (``needs about``
      only when ``needed`` > 0). torch's own writer reports a full disk only as ``file write failed`` or
      ``unexpected pos``; that counts as disk full when less than ``needed`` bytes are free;
    * a refused write: :class:`CannotWriteError`, ``cannot write PATH: permission denied`` (also
      ``read-only file system``, ``is a directory``, ``no such file or directory``, ...).

    Anything else passes unchanged: a ``ValueError`` (bad data, already one line), and an OS error
    about another file (reading the input inside the block is not a failed write).
    """
    try:
        yield
    except CannotWriteError:
        raise
    except Exception as exc:
        failure = write_failure(exc, Path(path), needed, hint)
        if failure is None:
            raise
        raise failure from None


def write_failure(exc: BaseException, path: Path, needed: int = 0, hint: str = "") -> CannotWriteError | None:
    """What :func:`write_guard` raises for ``exc`` met writing ``path`` (None: not a failed write)."""
    free = free_bytes(path)
    torn_write = any(t in str(exc) for t in TORN_WRITE_TEXTS) and free is not None and free < needed
    if is_disk_full(exc) or torn_write:
        space = (f"needs about {size_text(needed)}, " if needed > 0 else "") + \
            (f"{size_text(free)} free" if free is not None else "free space unknown")
        return DiskFullError(f"no space left on device writing {path} ({space}){'; ' + hint if hint else ''}")
    reason = _refusal(exc, path)
    return None if reason is None else CannotWriteError(f"cannot write {path}: {reason}")


def _refusal(exc: BaseException | None, path: Path) -> str | None:
    """Why writing ``path`` was refused, from ``exc`` or the exceptions it wraps (None: not a refusal)."""
    for _ in range(10):
        if exc is None or isinstance(exc, ValueError):
            return None
        if isinstance(exc, OSError) and exc.errno is not None:
            if exc.filename is not None and not _about(exc.filename, path):
                return None  # another file: the input being read, say
            if exc.errno in REFUSED:
                return REFUSED[exc.errno]
            if exc.filename is not None and exc.strerror:
                return exc.strerror[0].lower() + exc.strerror[1:]
        text = str(exc)
        for said, reason in REFUSED_TEXTS.items():
            if said in text:
                return reason
        exc = exc.__cause__ or exc.__context__
    return None


def _about(filename, path: Path) -> bool:
    """Whether an OS error's file is ``path``, inside it, one of its folders or its temp file."""
    try:
        other = Path(os.fsdecode(filename)).absolute()
    except (TypeError, ValueError):
        return False
    path = path.absolute()
    return (other == path or path in other.parents or other in path.parents
            or (other.parent == path.parent and other.name.startswith(f".{path.name}.tmp-")))


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (nested) state dict: roughly the size of writing it."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


# ------------------------------------------------------------------------------------------------
# Processes and their temp folders
# ------------------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (never sends it a signal)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate it there
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def left_by_dead_process(name: str) -> bool:
    """A temp name ending in ``-<pid>``: left by a process that is gone, or by this one (an earlier
    failed write). A live other process's temp folder is never "left"."""
    pid = name.rsplit("-", 1)[-1]
    return pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid)))


def remove_left_temp(root: Path, pattern: str) -> None:
    """Delete the entries of ``root`` matching ``pattern`` that :func:`left_by_dead_process` says are left."""
    for stale in Path(root).glob(pattern):
        if left_by_dead_process(stale.name):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
