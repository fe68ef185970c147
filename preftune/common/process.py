"""This process: its peak memory, and the Python children it starts (ending with it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far in MiB (None where neither source exists: Windows).

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory map.
    Not ``getrusage``'s ``ru_maxrss``: a child started with fork + exec inherits the parent's resident
    size at the fork as its starting maximum (measured: a child of a 600 MiB parent reads 613 MiB
    there, 13 MiB in VmHWM), so a sweep's isolated variant, or a benchmark's fresh process, started
    from a process holding models would report the parent's memory. Elsewhere (macOS): ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def parent_death_signal():
    """Linux: a ``preexec_fn`` that has the kernel send the child ``SIGKILL`` when this process dies
    (``PR_SET_PDEATHSIG``; inherited through exec). None elsewhere, or where libc has no ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    zero = ctypes.c_ulong(0)

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), zero, zero, zero)
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)

    return set_signal


def run_child(command: list[str], **popen_options) -> int:
    """Run ``command`` (a ``python -m preftune...`` line) to its end -> its exit status. The child imports
    this preftune (its root first on ``PYTHONPATH``), gets ``SIGKILL`` when this process dies
    (:func:`parent_death_signal`), and is killed if waiting for it ends otherwise (Ctrl-C, which the child
    got too, or an error here). ``popen_options``: more ``subprocess.Popen`` arguments (``stdout``, ...)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    process = subprocess.Popen(command, env=env, preexec_fn=parent_death_signal(), **popen_options)
    try:
        return process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
