"""The progress shown while a run trains: tqdm on a terminal, plain lines off one."""

from __future__ import annotations

import sys
import time

from preftune.common.text import duration


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """tqdm on a terminal; off one (CI, ``nohup``, a notebook's log: stderr is not a TTY) a plain
    :class:`ProgressLines` line now and then instead of thousands of carriage-return updates."""
    from tqdm.auto import tqdm

    if enabled and not _isatty(sys.stderr):
        return ProgressLines(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressLines:
    """Progress as plain lines on stderr, ``dpo: step 40/200 (20%), loss 0.5123, acc 0.81, 0.42 s/step,
    ETA 1m07s``: one every ``every_steps`` steps (default a twentieth of the run) or ``EVERY_SECONDS``,
    whichever comes first, and one for the last step. The same calls as tqdm (update, set_postfix,
    close). A line falls due at ``update`` and is printed at the next call, so that the loss the loop
    sets just after a step's update is on that step's line."""

    EVERY_SECONDS = 30.0

    def __init__(self, total: int, initial: int, desc: str, every_steps: int | None = None):
        self.total, self.n, self.desc = total, initial, desc
        self.every_steps = every_steps or max(1, total // 20)
        self.start_n, self.start = initial, time.monotonic()
        self.printed_n, self.printed_at = initial, self.start
        self.postfix: dict = {}
        self.due: tuple[int, float] | None = None  # (step, time) of a line not printed yet

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        now = time.monotonic()
        if (self.n >= self.total or self.n - self.printed_n >= self.every_steps
                or now - self.printed_at >= self.EVERY_SECONDS):
            self.due = (self.n, now)

    def set_postfix(self, postfix: dict) -> None:
        self.postfix = dict(postfix)
        self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.due is None:
            return
        (step, now), self.due = self.due, None
        done, elapsed = step - self.start_n, now - self.start
        parts = [f"{self.desc}: step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%)"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        if done > 0:
            per_step = elapsed / done
            parts += [f"{per_step:.2f} s/step", f"ETA {duration(per_step * max(0, self.total - step))}"]
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.printed_n, self.printed_at = step, now
