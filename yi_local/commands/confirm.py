"""Yes/no questions on the terminal. Anything but yes is no: Ctrl+D, Ctrl+C, an answer that is not text."""

from __future__ import annotations

import select
import sys


def can_ask() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _read_answer() -> str:
    """A line from the terminal; '' at Ctrl+D.

    It waits in short selects, not one blocking read: a Ctrl+C that the kernel hands to another thread
    (numpy's and llama.cpp's pools have some) only runs Python's handler once the main thread wakes.
    """
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        pass
    return sys.stdin.readline()


def confirm(question: str) -> bool:
    """Ask `question` with a [y/N] suffix; False without a terminal to ask on."""
    if not can_ask():
        return False
    try:
        print(f"{question} [y/N] ", end="", flush=True)
        answer = _read_answer()
    except (KeyboardInterrupt, UnicodeDecodeError):
        answer = ""
    if not answer.endswith("\n"):
        print(file=sys.stderr)  # end the prompt's line after ^D or ^C
    return answer.strip().lower() in ("y", "yes")
