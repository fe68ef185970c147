"""Write failures for tests, without root and without a small disk: an unwritable folder and a full disk.

* :func:`deny_writes` makes a folder read-only (``chmod 0o500``). Root ignores the mode bits (CI runs
  as root), so when a probe file can still be created there, every Python-level create under the
  folder (``open``/``io.open`` in a writing mode, ``os.open`` with a writing flag, ``os.mkdir``)
  raises the ``PermissionError`` the kernel would: a test never passes for root only because
  nothing was denied.
* :func:`fill_disk` makes every file opened for writing under a folder fail as on a full disk: the
  handle writes to ``/dev/full`` (the kernel's own ENOSPC, raised when the buffered data is
  flushed), or, where there is no ``/dev/full``, the open itself raises ENOSPC.

Both are context managers; leaving the block gives the folder its mode and ``open`` back.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

WRITE_MODES = set("wax+")


def _under(path, folder: Path) -> bool:
    if isinstance(path, int):  # a file descriptor
        return False
    p = Path(os.fsdecode(path)).absolute()
    return p == folder or folder in p.parents


def _kernel_denies(folder: Path) -> bool:
    probe = folder / ".write-probe"
    try:
        probe.touch()
    except PermissionError:
        return True
    probe.unlink()
    return False


@contextmanager
def deny_writes(folder: Path):
    """Inside the block ``folder`` is unwritable for this process, also as root (see the module docstring)."""
    folder = Path(folder).absolute()
    mode = folder.stat().st_mode & 0o777
    folder.chmod(0o500)
    try:
        with pytest.MonkeyPatch.context() as patch:
            if not _kernel_denies(folder):
                _raise_permission_errors(folder, patch)
            yield
    finally:
        folder.chmod(mode)


def _raise_permission_errors(folder: Path, patch: pytest.MonkeyPatch) -> None:
    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if WRITE_MODES & set(mode) and _under(file, folder):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and _under(path, folder):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if _under(path, folder):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    patch.setattr(builtins, "open", guarded_open)
    patch.setattr(io, "open", guarded_open)
    patch.setattr(os, "open", guarded_os_open)
    patch.setattr(os, "mkdir", guarded_mkdir)


@contextmanager
def fill_disk(folder: Path, only: str | None = None):
    """Inside the block every file opened for writing under ``folder`` (whose name contains ``only``,
    when given) is on a full disk: its writes fail with ENOSPC."""
    folder = Path(folder).absolute()
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if WRITE_MODES & set(mode) and _under(file, folder) and (only is None or only in Path(file).name):
            if not os.path.exists("/dev/full"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_open("/dev/full", mode.replace("x", "w").replace("a", "w"), *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", full_open)
        patch.setattr(io, "open", full_open)
        yield


def one_error_line(capsys, path) -> str:
    """The CLI's stderr holds one line ``preftune: error: ...`` naming ``path`` and no traceback (other
    lines, such as a library's progress bar, are not preftune's); returns that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("preftune")]
    assert len(lines) == 1 and lines[0].startswith("preftune: error: ") and str(path) in lines[0], err
    assert "Traceback" not in err, err
    return lines[0]
