"""Writing files so that a crash or a full disk loses nothing: atomic replace, fsync, clear disk-full errors.

* :func:`atomic_path` / :func:`write_atomic`: write a temp file beside the target, fsync it, ``os.replace``
  it onto the target. A reader (or a crash) sees the old file or the new one, never a torn or empty one.
* :func:`disk_full_guard`: ENOSPC (also as torch's ``inline_container.cc`` or safetensors' ``IoError``
  wrappings) becomes one :class:`DiskFullError` line naming the path, the space needed (estimated from
  tensor sizes, :func:`tensor_bytes`) and the space free.
* Temp folders are named ``...-<pid>``: :func:`left_by_dead_process` tells a leftover of a killed process
  (or of this one) from a live writer's, so clean-up never deletes another live run's work.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from contextlib import contextmanager
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


class DiskFullError(ValueError):
    """No space left on the device: the message names the path, the space needed and the space free."""


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; when the block succeeds it is fsync'ed and renamed onto
    ``path``; when it fails (or is interrupted) it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically; a full disk raises :class:`DiskFullError` naming ``path``."""
    with disk_full_guard(path, len(text.encode())), atomic_path(path) as tmp:
        tmp.write_text(text)


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


@contextmanager
def disk_full_guard(path: Path, needed: int, hint: str = ""):
    """Re-raise a disk-full error inside the block as one :class:`DiskFullError` line:
    ``no space left on device writing PATH (needs about 1.2 GB, 30.0 MB free); HINT``.

    torch reports a full disk only as ``PytorchStreamWriter failed writing file ...: file write failed``;
    that counts as disk full when less than ``needed`` bytes are free.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        free = free_bytes(path)
        torn_write = "file write failed" in str(exc) and free is not None and free < needed
        if not (is_disk_full(exc) or torn_write):
            raise
        shown = f", {size_text(free)} free" if free is not None else ""
        raise DiskFullError(f"no space left on device writing {path} (needs about {size_text(needed)}{shown})"
                            f"{'; ' + hint if hint else ''}") from None


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
