"""llama.cpp's grammar engine, in the sandbox child: which tokens a grammar allows next.

The child loads only the model's vocabulary, from the file the parent has open (so a file replaced or
removed on disk since cannot give the child another vocabulary). `start` parses a grammar and answers with the mask of
tokens allowed first; `accept` feeds the sampled token and answers with the next mask; `check` parses
and frees. Masks travel as packed bits (8 KB for Yi's 64,000 tokens). The parent applies a mask to its
logits, so the model and its KV cache never leave the parent, and a grammar that hangs llama.cpp or
makes it throw only costs this child.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Callable

import numpy as np

from yi_local.errors import YiLocalError

REFUSED = ("llama.cpp refused the grammar (left recursion, an undefined rule, or a <token> that is not "
           "one token)")  # fmt: skip


def grammar_worker(gguf_path: str) -> Callable[[Any], Any]:
    from yi_local.llama_lib import llama_cpp

    L = llama_cpp()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(os.fsencode(gguf_path), params)
    if not model:
        raise YiLocalError(f"could not load the vocabulary of {gguf_path}")
    vocab = L.llama_model_get_vocab(model)
    n = L.llama_vocab_n_tokens(vocab)
    cand = np.zeros(n, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    ids = np.arange(n, dtype=np.int32)
    state: dict[str, Any] = {"grammar": None}

    def init(text: str):
        grammar = L.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not grammar:
            raise YiLocalError(REFUSED, hint="check its GBNF syntax; the start rule is `root`")
        return grammar

    def free() -> None:
        if state["grammar"]:
            L.llama_sampler_free(state["grammar"])
        state["grammar"] = None

    def mask() -> bytes:
        cand["id"], cand["logit"], cand["p"] = ids, 0.0, 0.0
        arr = L.llama_token_data_array(data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=n,
                                       selected=-1, sorted=False)  # fmt: skip
        L.llama_sampler_apply(state["grammar"], ctypes.byref(arr))
        allowed = np.zeros(n, dtype=bool)
        allowed[cand["id"][: arr.size]] = np.isfinite(cand["logit"][: arr.size])
        return np.packbits(allowed).tobytes()

    def handle(request):
        op = request[0]
        start = time.perf_counter()
        if op == "check":
            L.llama_sampler_free(init(request[1]))
            return None
        if op == "start":
            free()
            state["grammar"] = init(request[1])
            return mask(), n, time.perf_counter() - start
        if op == "accept":
            if not state["grammar"]:
                raise YiLocalError("no grammar is being followed")
            L.llama_sampler_accept(state["grammar"], int(request[1]))
            return mask(), n, time.perf_counter() - start
        if op == "stop":
            free()
            return None
        raise ValueError(f"unknown request {op!r}")

    return handle
