"""Load each GGUF named on stdin with llama.cpp, in this separate process, and use it a little.

Run by the fuzz tests: a file that makes llama.cpp abort kills this process with a signal instead
of the test process, and the last "LOAD" line names it. A file llama.cpp refuses is fine ("REFUSED").
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path


def load_all(paths: list[Path], timeout: float = 300) -> dict[str, str]:
    """Load every file in a subprocess, started again after a crash: path -> "OK", "REFUSED" or how it died."""
    outcome: dict[str, str] = {}
    todo = [str(p) for p in paths]
    while todo:
        proc = subprocess.run([sys.executable, __file__], input="\n".join(todo) + "\n", capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        for line in proc.stdout.splitlines():
            word, _, path = line.partition(" ")
            if word in ("OK", "REFUSED"):
                outcome[path] = word
        if proc.returncode == 0:
            break
        died = next((p for p in todo if p not in outcome), todo[0])
        why = [line for line in proc.stderr.splitlines() if "GGML" in line or "terminate" in line][:1]
        outcome[died] = f"exit {proc.returncode} {why}"
        todo = todo[todo.index(died) + 1 :]
    return outcome


def crashes(paths: list[Path]) -> list[str]:
    """The files that made llama.cpp die (refusing one is fine)."""
    return [f"{p}: {o}" for p, o in load_all(paths).items() if o not in ("OK", "REFUSED")]


def main() -> None:
    import llama_cpp as L

    quiet = L.llama_log_callback(lambda *_: None)
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    for line in sys.stdin:
        path = line.strip()
        print("LOAD", path, flush=True)
        model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not model:
            print("REFUSED", path, flush=True)
            continue
        cparams = L.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
        cparams.n_threads = cparams.n_threads_batch = 1
        ctx = L.llama_init_from_model(model, cparams)
        if ctx:
            vocab = L.llama_model_get_vocab(model)
            text = "Hello, 世界 123\n<|im_start|>".encode()
            tokens = (L.llama_token * 64)()
            n = L.llama_tokenize(vocab, text, len(text), tokens, 64, True, True)
            piece = ctypes.create_string_buffer(256)
            for i in range(L.llama_vocab_n_tokens(vocab)):
                L.llama_token_to_piece(vocab, i, piece, 256, 0, True)
            if n > 0:
                L.llama_decode(ctx, L.llama_batch_get_one(tokens, n))
            L.llama_free(ctx)
        L.llama_model_free(model)
        print("OK", path, flush=True)


if __name__ == "__main__":
    main()
