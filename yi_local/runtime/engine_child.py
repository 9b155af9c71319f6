"""The child process of a supervised backend (`supervised.py`): loads the model with its RPC workers and
answers the engine's calls, one at a time, over the socket it was given.

`python -m yi_local.runtime.engine_child FD`. It sends ("progress", p)… then ("ready", ModelInfo) or
("error", kind, message, hint); then, for each (method, args), ("ok", result) or ("error", …). Only the
backend's step methods may be called. When llama.cpp aborts (a worker lost), this process dies and the
parent sees the socket close.
"""

from __future__ import annotations

import os
import signal
import sys

# What the parent may call: the engine's steps, the grammar check and the saved-state steps.
ALLOWED = frozenset({"_slot_truncate", "_decode", "_begin_sampling", "_sample", "_end_sampling", "check_sampling",
                     "state_binding", "_slot_state_size", "_slot_save", "_slot_load"})  # fmt: skip


def error_message(e: BaseException) -> tuple:
    from yi_local.errors import UnavailableError, YiLocalError
    from yi_local.runtime.backend import GrammarDeadEndError

    if isinstance(e, GrammarDeadEndError):
        return ("error", "grammar-dead-end", e.message, e.hint)
    if isinstance(e, UnavailableError):
        return ("error", "unavailable", e.message, e.hint)
    if isinstance(e, YiLocalError):
        return ("error", "yi-local", e.message, e.hint)
    return ("error", "bug", f"{type(e).__name__}: {e}", None)


def main(fd: int) -> None:
    from multiprocessing.connection import Connection

    # The parent decides when this process ends. It ends with the parent too, whatever kills that: the
    # socket closes and the next receive ends the loop (not PR_SET_PDEATHSIG, which fires when the
    # parent's *thread* that started this one ends, e.g. the chat's loading thread).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    name, model, options = conn.recv()
    assert name == "load"
    from yi_local.runtime.llama_cpp_backend import LlamaCppBackend

    options.on_progress = lambda p: conn.send(("progress", p))
    try:
        backend = LlamaCppBackend(model, options)
    except BaseException as e:
        conn.send(error_message(e))
        return
    conn.send(("ready", backend.info))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            break
        if name == "close":
            break
        try:
            if name not in ALLOWED:
                raise ValueError(f"{name} may not be called")
            result = getattr(backend, name)(*args)
        except BaseException as e:
            conn.send(error_message(e))
        else:
            conn.send(("ok", result))
    backend.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # llama.cpp's RPC connections are kept for the process's life: do not wait on them
