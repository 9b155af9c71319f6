"""Import llama-cpp-python once, with llama.cpp's own logging quiet unless yi-local runs verbose."""

from __future__ import annotations

import logging
import threading

from yi_local.errors import YiLocalError

_lock = threading.Lock()
_ready = False


def llama_cpp():
    """The `llama_cpp` module, its backend initialized; a clear error when it is not installed."""
    global _ready
    try:
        import llama_cpp as module
    except ImportError:
        raise YiLocalError(
            "llama-cpp-python is not installed",
            hint="install it with `pip install llama-cpp-python` (see the README for Metal/CUDA builds)",
        ) from None
    with _lock:
        if not _ready:
            verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
            # llama-cpp-python prints llama.cpp's log lines when this logger's level lets them through.
            logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
            module.llama_backend_init()
            _ready = True
    return module
