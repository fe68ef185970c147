"""The ``preftune`` console script: the allocator settings of :mod:`preftune.common.allocator` in place from
the process's start, then :func:`preftune.cli.main.main`.

glibc reads its ``MALLOC_*`` variables when a process starts; ``mallopt`` afterwards covers only part of the
gain (measured on SmolLM2-135M DPO steps: -4 to -6% against -10% from the start). So the first start sets
them and replaces itself (``exec``, same process id, before torch is imported: ~0.1 s) with
``python -m preftune`` and the same arguments; the new process finds them set and runs the command. Not
done with ``PREFTUNE_ALLOCATOR=system``, when you set any allocator variable yourself, or without glibc.
A program or test calling :func:`preftune.cli.main.main` keeps its own allocator and environment.
"""

from __future__ import annotations

import os
import sys

from preftune.common.allocator import APPLIED, tune_allocator


def entry() -> int:
    if tune_allocator() == APPLIED:
        try:
            os.execv(sys.executable, [sys.executable, "-m", "preftune", *sys.argv[1:]])
        except OSError:  # not started again: this process keeps the mallopt settings
            pass
    from preftune.cli.main import main

    return main()
