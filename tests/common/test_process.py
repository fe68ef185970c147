"""Process statistics: the peak resident set size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.common.process import peak_rss_mb


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's /proc")
def test_peak_rss_of_a_child_is_its_own_not_the_parents():
    """A process started by one holding 1 GiB reports its own peak, not the parent's: ru_maxrss would
    start the child at the parent's resident size at the fork (a sweep's isolated variants read ~5 GB
    that way when the real recipe, holding models, started them)."""
    held = b"\x01" * (1024 * 2**20)  # resident: every page written
    parent = peak_rss_mb()
    assert parent >= 1024
    code = "from preftune.common.process import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
                                 ).stdout.strip())
    assert 10 < child < parent - 512, (child, parent)  # torch's import is a few hundred MiB, not a GiB
    del held
