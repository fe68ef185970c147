"""The ``preftune`` console script (preftune.cli.launch): started again with the allocator settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from preftune.cli import launch
from preftune.common.allocator import OPT_OUT, USER_VARIABLES, settings_env


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in (*USER_VARIABLES, OPT_OUT):
            monkeypatch.delenv(name)


def test_first_start_sets_the_variables_and_starts_again_with_the_same_arguments(monkeypatch, clean_env):
    calls = []
    def tune():
        for name, value in settings_env().items():
            monkeypatch.setenv(name, value)  # undone after the test
        return launch.APPLIED

    monkeypatch.setattr(launch, "tune_allocator", tune)
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append((path, args, dict(os.environ))))
    monkeypatch.setattr(sys, "argv", ["preftune", "train", "--config", "x.yaml"])
    monkeypatch.setattr("preftune.cli.main.main", lambda: 0)
    assert launch.entry() == 0
    (path, args, env), = calls
    assert path == sys.executable and args == [sys.executable, "-m", "preftune", "train", "--config", "x.yaml"]
    assert {k: env[k] for k in settings_env()} == settings_env()


def test_no_second_start_when_left_alone(monkeypatch, clean_env):
    monkeypatch.setenv("PREFTUNE_ALLOCATOR", "system")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("started again"))
    monkeypatch.setattr("preftune.cli.main.main", lambda: 7)
    assert launch.entry() == 7
    assert not any(name.startswith("MALLOC_") for name in os.environ)


def test_the_real_command_runs_through_the_second_start(clean_env):
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run([sys.executable, "-m", "preftune", "--version"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.startswith("preftune ")
