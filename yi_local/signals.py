"""SIGTERM and SIGHUP (a closed terminal) end yi-local the way Ctrl+C does.

Each raises `Interrupted`, a KeyboardInterrupt, in the main thread: the same `finally` blocks and
context managers run (temporary files are removed), and the exit code is 128 + the signal number, as
a shell reports a process the signal killed (SIGINT 130, SIGHUP 129, SIGTERM 143).
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Handle SIGTERM and SIGHUP like Ctrl+C, unless they are ignored (`nohup` ignores SIGHUP)."""
    for sig in HANDLED:
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise)


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)
