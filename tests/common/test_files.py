"""The one atomic write and the one handler of a failed write: modes, permission, a full disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from common.write_failures import deny_writes, fill_disk
from preftune.common import files
from preftune.common.files import CannotWriteError, DiskFullError, atomic_path, write_atomic, write_guard

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 45"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_file_gets_the_mode_open_gives_it_and_an_existing_file_keeps_its_own(tmp_path, umask_027):
    """Issue 33, finding 6: atomic outputs were created 0600 (a temp file's mode) whatever the umask,
    and a replaced file lost its own mode; ``open(path, "w")`` gives 0666 less the umask to a new file
    and keeps an existing file's mode."""
    assert files.umask() == 0o027
    write_atomic(tmp_path / "new.txt", "x")
    assert mode(tmp_path / "new.txt") == 0o640
    for kept in (0o600, 0o664, 0o444):
        existing = tmp_path / f"existing-{kept:o}.txt"
        existing.write_text("old")
        existing.chmod(kept)
        write_atomic(existing, "new")
        assert (existing.read_text(), mode(existing)) == ("new", kept)
    with atomic_path(tmp_path / "binary.bin") as tmp:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # a writer that creates its file 0600
    assert mode(tmp_path / "binary.bin") == 0o640


def test_an_unwritable_folder_is_one_line_naming_the_path(tmp_path):
    """chmod 0o500 (and, for root, whom the mode does not stop, the PermissionError it would give)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / "out.txt"
    with deny_writes(folder), pytest.raises(CannotWriteError) as refused:
        write_atomic(target, "text")
    assert str(refused.value) == f"cannot write {target}: permission denied"
    assert list(folder.iterdir()) == []


def test_a_full_disk_is_one_line_naming_the_path_and_the_space(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with fill_disk(tmp_path), pytest.raises(DiskFullError) as full:
        write_atomic(target, "x" * 5000)
    assert str(full.value).startswith(f"no space left on device writing {target} (needs about 5.0 KB, ")
    assert str(full.value).endswith(" free)") and "\n" not in str(full.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_torchs_short_write_counts_as_disk_full_only_when_the_space_is_short(tmp_path, monkeypatch):
    """torch's own writer says only ``unexpected pos`` on a full disk (``optimizer.pt`` of a checkpoint)."""
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=r"writing .*ckpt \(needs about 5.0 KB, 1.0 KB free\); free some"):
        with write_guard(tmp_path / "ckpt", 5000, hint="free some space"):
            raise RuntimeError(TORCH_SHORT_WRITE)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room enough: not a full disk, not hidden
        with write_guard(tmp_path / "ckpt", 500):
            raise RuntimeError(TORCH_SHORT_WRITE)


@pytest.mark.parametrize("exc, reason", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)"), "read-only file system"),
    (OSError(13, "Failed to open local file 'x.parquet'. Detail: [errno 13] Permission denied"), "permission denied"),
])
def test_refused_writes_of_native_writers_are_one_line(tmp_path, exc, reason):
    with pytest.raises(CannotWriteError) as refused, write_guard(tmp_path / "out.parquet"):
        raise exc
    assert str(refused.value) == f"cannot write {tmp_path / 'out.parquet'}: {reason}"


def test_a_folder_in_the_way_is_one_line(tmp_path):
    (tmp_path / "out.txt").mkdir()
    with pytest.raises(CannotWriteError, match=r"cannot write .*out.txt: is a directory"):
        write_atomic(tmp_path / "out.txt", "x")


def test_what_is_not_a_failed_write_passes_unchanged(tmp_path):
    """Reading the input inside the block, and bad data, are not 'cannot write' errors."""
    with pytest.raises(PermissionError), write_guard(tmp_path / "out.jsonl"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "elsewhere" / "in.jsonl"))
    with pytest.raises(ValueError, match="^line 3: Permission denied is not a label$"), \
            write_guard(tmp_path / "out.jsonl"):
        raise ValueError("line 3: Permission denied is not a label")
    with pytest.raises(KeyError), write_guard(tmp_path / "out.jsonl"):
        raise KeyError("x")
