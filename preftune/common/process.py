"""Statistics of this process: its peak memory."""

from __future__ import annotations

import sys


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
