"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, exit with 128 + the signal."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("preftune")


class TrainingInterrupted(SystemExit):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a checkpoint was written.

    A ``SystemExit`` with code 130 (SIGINT) or 143 (SIGTERM): the CLI exits with it and no
    traceback (the log line says how to resume), and ``except Exception`` does not swallow it.
    ``checkpoint`` is the folder to resume from (``None`` on ranks other than the main one).
    """

    def __init__(self, message: str, checkpoint: Path | None, step: int, code: int):
        super().__init__(code)
        self.message, self.checkpoint, self.step = message, checkpoint, step

    def __str__(self) -> str:
        return self.message


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the current step, write a checkpoint and
    raise :class:`TrainingInterrupted` (exit code 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).

    Sending it again later aborts at once (``KeyboardInterrupt``, no checkpoint); a repeat within
    ``REPEAT_WINDOW_S`` counts as the same request (a terminal signals the whole process group and
    launchers such as torchrun forward it again). Installed on every rank; :meth:`requested` takes
    the decision together (a gather every step), so all ranks leave the loop after the same step.
    Holds no model: if ``train`` has left by an exception when a signal arrives, the previous
    handlers are put back and the signal is delivered to them. A signal the process ignores
    (``SIG_IGN``: started by ``nohup``, or as a background job of a non-interactive shell, which
    ignores SIGINT) is left ignored.
    """

    SIGNALS = ("SIGINT", "SIGTERM")
    REPEAT_WINDOW_S = 1.0

    def __init__(self, first_step: int):
        self.first_step = first_step  # the step the loop started from (0, or the resumed step)
        self.received, self.received_at = 0, 0.0  # the first signal this process got, and when
        self.signum = 0  # the decided signal (the largest received on any rank)
        self.stopping = False  # the last decision of requested(): the same on every rank
        self._code = sys._getframe(1).f_code  # train()'s code: the handler is live while it runs
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                # an ignored signal stays ignored: nohup, a background job of a script, a launcher that
                # shields its workers from the terminal's Ctrl-C asked for exactly that
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        while frame is not None and frame.f_code is not self._code:
            frame = frame.f_back
        if self.received and frame is not None and time.monotonic() - self.received_at < self.REPEAT_WINDOW_S:
            return  # the same request, delivered twice
        if frame is None or self.received:  # train() has gone, or asked again: as if we were never here
            self.restore()
            signal.raise_signal(signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        log.warning("%s: stopping after this step and writing a checkpoint (send it again to abort at once)",
                    signal.Signals(signum).name)

    def requested(self, accelerator) -> bool:
        """Whether any rank was asked to stop (a collective with several processes)."""
        signum = self.received
        if accelerator.num_processes > 1:
            signum = int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max())
        self.signum, self.stopping = signum, signum > 0
        return self.stopping

    def restore(self) -> None:
        self.put_back(self._previous)
        self._previous = {}

    @classmethod
    def handlers(cls) -> dict:
        """The current handlers of :attr:`SIGNALS` (empty off the main thread, where they can't be set)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {getattr(signal, name): signal.getsignal(getattr(signal, name)) for name in cls.SIGNALS
                if hasattr(signal, name)}

    @staticmethod
    def put_back(handlers: dict) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
