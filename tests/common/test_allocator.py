"""The allocator settings of the ``preftune`` command (preftune.common.allocator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from preftune.common import allocator
from preftune.common.allocator import M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD, tune_allocator


class Recorder:
    def __init__(self, answer: int = 1):
        self.calls, self.answer = [], answer

    def __call__(self, param, value):
        self.calls.append((param, value))
        return self.answer


def test_applies_the_settings_and_exports_them_for_child_processes():
    environ, mallopt = {}, Recorder()
    assert tune_allocator(environ, mallopt) == "heap for every block, no trimming"
    assert dict(mallopt.calls) == {M_MMAP_THRESHOLD: 2**31 - 1, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 2**30}
    assert environ == {"MALLOC_MMAP_THRESHOLD_": str(2**31 - 1), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
                       "MALLOC_TOP_PAD_": str(2**30)}


@pytest.mark.parametrize("name", ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD"])
def test_a_users_allocator_variable_wins(name):
    environ, mallopt = {name: "1"}, Recorder()
    assert tune_allocator(environ, mallopt) == f"left alone: {name} set"
    assert mallopt.calls == [] and environ == {name: "1"}


def test_opt_out_and_refusal_change_nothing_for_children():
    mallopt = Recorder()
    environ = {"PREFTUNE_ALLOCATOR": "system"}
    assert tune_allocator(environ, mallopt).startswith("left alone: PREFTUNE_ALLOCATOR=system")
    assert mallopt.calls == [] and environ == {"PREFTUNE_ALLOCATOR": "system"}
    environ = {}
    assert tune_allocator(environ, Recorder(answer=0)).startswith("left alone: mallopt refused")
    assert environ == {}


CHILD = r"""
import json, resource, sys
from preftune.common.allocator import tune_allocator
done = tune_allocator() if sys.argv[1] == "tuned" else "default"
faults = []
for _ in range(4):  # a 64 MiB buffer written, freed and allocated again, as a training step's logits are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = bytearray(64 << 20)
    buffer[::4096] = b"x" * len(buffer[::4096])
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults}))
"""


@pytest.mark.skipif(allocator._libc_mallopt() is None, reason="needs glibc (Linux); elsewhere nothing is changed")
def test_a_freed_large_buffer_is_reused_without_page_faults():
    """The real effect, measured in fresh processes: glibc maps a 64 MiB block anew each time by default
    (16,384 pages faulted in per allocation); with the settings the second and later allocations reuse it."""
    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        return json.loads(out.stdout)

    default, tuned = run("default"), run("tuned")
    assert tuned["done"] == "heap for every block, no trimming"
    pages = (64 << 20) // 4096
    assert min(default["faults"][1:]) > 0.9 * pages  # mapped and faulted in again every time
    assert max(tuned["faults"][1:]) < 0.01 * pages  # kept and reused
