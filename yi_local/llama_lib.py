"""Import llama-cpp-python once, with llama.cpp's own logging quiet unless yi-local runs verbose."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Iterator

from yi_local.errors import YiLocalError

_lock = threading.Lock()
_ready = False
_captures: list[list[str]] = []  # the lists `captured_log` is filling
_quiet = 0  # quiet captures running: their errors are reported by the caller, not printed
_log_callback = None  # kept alive: llama.cpp holds the pointer


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
            _install_log(module, verbose)
            module.llama_backend_init()
            _ready = True
    return module


def load_model(path: str | os.PathLike[str], n_gpu_layers: int = 0, vocab_only: bool = False, devices=None):
    """A `llama_model` pointer for the GGUF at `path` (-1 GPU layers: all); YiLocalError when llama.cpp refuses it.

    `devices`: a NULL-terminated device array (yi_local.rpc.device_array), kept alive by the caller.
    The caller frees the model with `llama_model_free`.
    """
    L = llama_cpp()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
    mp.vocab_only = vocab_only
    if devices is not None:
        mp.devices = ctypes.cast(devices, ctypes.c_void_p)
    model = L.llama_model_load_from_file(os.fsencode(path), mp)
    if not model:
        raise YiLocalError(f"llama.cpp could not load {path}", hint="the file may be damaged; convert it again")
    return model


def tokenize(vocab, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
    """llama.cpp's tokens for `data` (add_special: BOS when the vocabulary adds one)."""
    L = llama_cpp()
    n_max = len(data) + 8
    buf = (L.llama_token * n_max)()
    n = L.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        buf = (L.llama_token * -n)()
        n = L.llama_tokenize(vocab, data, len(data), buf, -n, add_special, parse_special)
    return list(buf[:n])


def _install_log(module, verbose: bool) -> None:
    """llama.cpp's log: printed to stderr as llama-cpp-python's own callback does (everything when
    verbose, else errors), and handed to `captured_log` readers, which learn from it what the API does
    not say (the KV cache's size and types, why a context could not be made)."""
    global _log_callback
    # ggml_log_level: 0 none, 1 info, 2 warn, 3 error, 4 debug, 5 continues the previous line
    shown = {0, 1, 2, 3, 4} if verbose else {0, 3}
    last = [0]

    @module.llama_log_callback
    def log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        level = last[0] if level == 5 else level
        last[0] = level
        if level in shown and not _quiet:
            print(line, end="", flush=True, file=sys.stderr)
        for lines in _captures:
            lines.append(line)

    _log_callback = log
    module.llama_log_set(log, ctypes.c_void_p(0))


@contextlib.contextmanager
def captured_log(quiet: bool = False) -> Iterator[list[str]]:
    """The text llama.cpp logs while the block runs (from any thread), piece by piece; with `quiet`,
    nothing is printed meanwhile (the caller reports what went wrong in its own words)."""
    global _quiet
    llama_cpp()
    lines: list[str] = []
    with _lock:
        _captures.append(lines)
        _quiet += quiet
    try:
        yield lines
    finally:
        with _lock:
            _captures.remove(lines)
            _quiet -= quiet
