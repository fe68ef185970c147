"""The C allocator settings the ``preftune`` command runs with (Linux, glibc).

A training step allocates and frees the same large buffers every step: the (tokens, vocabulary)
logits of the output head (~200 MB per 1,024 tokens of a 49k vocabulary in float32), activations,
gradients. glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and returns it with ``munmap`` when freed, so every step faults every page of those buffers in again
(the kernel zeroes each one). :func:`tune_allocator` makes glibc keep them instead: blocks of any size
come from its heap, and freed memory stays there for the next step (no trimming). Measured on
SmolLM2-135M DPO (the real recipe's sweep settings, 8 HH-RLHF pairs a step, bf16 autocast, 2-vCPU Intel
Xeon; ``benchmarks/bench_allocator.py``): 3.57 -> 3.17 s per step with the settings from the process's
start; ``mallopt`` after start gave about half of that. The price: memory freed after a peak stays with
the process until it exits (a sweep variant's peak RSS 9.0-9.9 GB instead of 8.6-9.3 GB).

``preftune`` calls it once at start (:mod:`preftune.cli.launch`): ``mallopt`` for its own process, and
the same settings as ``MALLOC_*`` environment variables, which glibc reads when a process starts, for
the processes it starts (sweep variants, ``accelerate launch`` workers) and for itself, started again
with them. Left alone: when ``PREFTUNE_ALLOCATOR=system``,
when any ``MALLOC_*`` allocator variable, ``GLIBC_TUNABLES`` or ``LD_PRELOAD`` (another allocator) is
already set (the user's choice wins), and on systems without glibc's ``mallopt``.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h) and the values: every block from the heap, freed memory kept, the heap grown
# 1 GiB at a time (address space only; pages are touched when used)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 2**31 - 1, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 2**30}
ENV_NAMES = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
             M_TOP_PAD: "MALLOC_TOP_PAD_"}
# a user's own allocator choice: any of these set leaves everything alone
USER_VARIABLES = (*ENV_NAMES.values(), "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")
OPT_OUT = "PREFTUNE_ALLOCATOR"
APPLIED = "heap for every block, no trimming"


def _libc_mallopt():
    """glibc's ``mallopt``, or None (not Linux, or a C library without it). Looked up among the symbols
    already loaded into this process (the C library is), not by ``ctypes.util.find_library``, which runs
    ``ldconfig`` or a compiler in a subprocess on every command's start."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def settings_env() -> dict[str, str]:
    """The settings as the ``MALLOC_*`` environment variables glibc reads at a process's start."""
    return {ENV_NAMES[param]: str(value) for param, value in SETTINGS.items()}


def tune_allocator(environ: dict | None = None, mallopt=None) -> str:
    """Apply the settings to this process and to ``environ`` (default ``os.environ``) for the processes it
    starts -> what was done, one line (for the debug log and the tests).

    ``mallopt``: the C function (default: glibc's, looked up here); a test passes a recorder."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "").lower() == "system":
        return f"left alone: {OPT_OUT}=system"
    chosen = [name for name in USER_VARIABLES if environ.get(name)]
    if chosen:
        return f"left alone: {', '.join(chosen)} set"
    mallopt = mallopt or _libc_mallopt()
    if mallopt is None:
        return "left alone: no glibc mallopt"
    refused = [ENV_NAMES[param] for param, value in SETTINGS.items() if mallopt(param, value) != 1]
    if refused:
        return f"left alone: mallopt refused {', '.join(refused)}"
    environ.update(settings_env())
    return APPLIED
