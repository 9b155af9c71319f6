"""The llama.cpp backend: llama-cpp-python's low-level API and a native sampler chain.

No per-token Python work on logits: sampling runs in llama.cpp's `llama_sampler` chain, and the KV
cache of the previous request is reused for the longest common prefix, so a chat turn only
evaluates the new tokens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import numpy as np

from yi_local import hardware
from yi_local.errors import YiLocalError
from yi_local.fit import kv_cache_bytes
from yi_local.gguf_header import check_model, model_meta
from yi_local.llama_lib import llama_cpp
from yi_local.runtime.backend import Backend, GrammarDeadEndError, ModelInfo, PrefillCancelled, utf8
from yi_local.runtime.offload import plan_offload
from yi_local.runtime.params import LoadOptions, SamplingParams
from yi_local.runtime.sandbox import Sandbox

logger = logging.getLogger(__name__)

# A real grammar's parse or step takes milliseconds; these stop the ones built to hang llama.cpp.
GRAMMAR_START_SECONDS = 10.0
GRAMMAR_STEP_SECONDS = 5.0
GRAMMAR_REPLY_SECONDS = 30.0  # in all, for one reply: slow steps under the step limit add up
GRAMMAR_MEMORY = 4 << 30

class LlamaCppBackend(Backend):
    def __init__(self, model: str | os.PathLike[str], options: LoadOptions | None = None):
        options = options or LoadOptions()
        path = Path(model)
        meta = model_meta(check_model(path))  # a damaged file is named here, before llama.cpp sees it
        # Held open for the grammar children, which must read the vocabulary of this very file.
        self._model_fd: int | None = os.open(path, os.O_RDONLY)
        L = self._L = llama_cpp()
        self.lock = threading.Lock()
        self._pieces = {}
        self._specials: frozenset[bytes] | None = None
        self._sampler = None
        self._ctx = self._model = None

        gpu = hardware.llama_gpu_kind()
        n_ctx_hint = options.n_ctx or 4096
        head_dim = meta.n_embd // max(1, meta.n_head)
        kv_bytes = kv_cache_bytes(meta.n_layers, n_ctx_hint, meta.n_head_kv, head_dim)
        plan = plan_offload(options.n_gpu_layers, meta.file_size, meta.n_layers, kv_bytes,
                            gpu, hardware.gpu_free_bytes(gpu))  # fmt: skip
        logger.info("offload: %s", plan.description)

        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = plan.n_gpu_layers if plan.n_gpu_layers >= 0 else 0x7FFFFFFF
        if options.on_progress is not None:
            report = options.on_progress

            @L.llama_progress_callback
            def _progress(value: float, _user: ctypes.c_void_p) -> bool:
                report(float(value))
                return True

            self._progress_cb = _progress  # keep the ctypes callback alive
            mparams.progress_callback = _progress
        # through the descriptor: the file whose header was just checked, whatever happens to the path
        self._model = L.llama_model_load_from_file(os.fsencode(f"/dev/fd/{self._model_fd}"), mparams)
        if not self._model:
            raise YiLocalError(f"llama.cpp could not load {path}", hint="the file may be damaged; convert it again")

        cparams = L.llama_context_default_params()
        n_train = L.llama_model_n_ctx_train(self._model)
        cparams.n_ctx = options.n_ctx if options.n_ctx > 0 else n_train
        cparams.n_batch = cparams.n_ubatch = options.n_batch
        threads = options.n_threads or hardware.cpu_count()
        cparams.n_threads = cparams.n_threads_batch = threads
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise YiLocalError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens",
                               hint="try a smaller --ctx")  # fmt: skip
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._mem = L.llama_get_memory(self._ctx)
        # llama.cpp clamps the batch to the context: a larger chunk would fail its assertion and abort.
        self._n_batch = L.llama_n_batch(self._ctx)
        # Grammars run in sandbox children (see grammar_worker.py): one checks requests' grammars,
        # one follows the grammar of the reply being generated. Started on first use.
        self._grammar_boxes: dict[str, Sandbox] = {}
        self._grammar_mask: np.ndarray | None = None  # tokens the grammar allows next
        self._grammar_child = 0  # the sandbox child following this reply's grammar
        self._grammar_seconds = 0.0  # its work so far in this reply
        self._candidates: np.ndarray | None = None
        self._cache, self._generated = [], []
        self._one = (L.llama_token * 1)()
        self._add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        bos, eos = L.llama_vocab_bos(self._vocab), L.llama_vocab_eos(self._vocab)
        self.info = ModelInfo(
            name=meta.name,
            path=str(path),
            quantization=meta.quantization,
            n_ctx=L.llama_n_ctx(self._ctx),
            n_ctx_train=n_train,
            n_layers=meta.n_layers,
            offload=plan.description,
            backend="llama.cpp",
            chat_template=meta.chat_template,
            bos_token=self.token_bytes(bos, special=True).decode(errors="replace") if bos >= 0 else "",
            eos_token=self.token_bytes(eos, special=True).decode(errors="replace") if eos >= 0 else "",
        )

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        data = utf8(text)
        n_max = len(data) + 8
        buf = (self._L.llama_token * n_max)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            buf = (self._L.llama_token * -n)()
            n = self._L.llama_tokenize(self._vocab, data, len(data), buf, -n, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._L.llama_vocab_is_eog(self._vocab, token))

    def special_texts(self) -> frozenset[bytes]:
        if self._specials is None:
            n = self._L.llama_vocab_n_tokens(self._vocab)
            is_control = self._L.llama_vocab_is_control
            self._specials = frozenset(
                self.token_bytes(t, special=True) for t in range(n) if is_control(self._vocab, t)
            ) - {b""}
        return self._specials

    def reset(self) -> None:
        with self.lock:
            self._L.llama_memory_clear(self._mem, True)
            self._cache, self._generated = [], []

    # -- evaluation --------------------------------------------------------------------------
    def _decode(self, tokens, n: int) -> None:
        rc = self._L.llama_decode(self._ctx, self._L.llama_batch_get_one(tokens, n))
        if rc != 0:
            self._cache, self._generated = [], []
            self._L.llama_memory_clear(self._mem, True)
            raise YiLocalError(f"llama.cpp failed to evaluate {n} token(s) (code {rc})",
                               hint="the context may be full; start a new conversation or raise --ctx")  # fmt: skip

    def _prefill(self, tokens: list[int], cancel: threading.Event | None = None) -> int:
        reuse = self._reusable_prefix(tokens)
        if not self._L.llama_memory_seq_rm(self._mem, 0, reuse, -1):
            self._L.llama_memory_clear(self._mem, True)
            reuse = 0
        self._cache = tokens[:reuse]
        self._generated = self._generated[:reuse]
        todo = tokens[reuse:]
        arr = (self._L.llama_token * len(todo))(*todo)
        for start in range(0, len(todo), self._n_batch):
            if cancel is not None and cancel.is_set():
                raise PrefillCancelled()
            n = min(self._n_batch, len(todo) - start)
            self._decode(ctypes.cast(ctypes.byref(arr, start * ctypes.sizeof(self._L.llama_token)),
                                     ctypes.POINTER(self._L.llama_token)), n)  # fmt: skip
            self._cache.extend(todo[start : start + n])
            self._generated.extend([False] * n)
        return reuse

    def _feed(self, token: int) -> None:
        self._one[0] = token
        self._decode(self._one, 1)
        self._cache.append(token)
        self._generated.append(True)

    # -- sampling ----------------------------------------------------------------------------
    def check_sampling(self, params: SamplingParams, parse_grammar: bool = False) -> None:
        """The shared checks; with `parse_grammar`, llama.cpp's own parse of the grammar too (which may
        still refuse it: left recursion, a <token> that is not one token), so that a request with a bad
        grammar is refused before its reply starts."""
        super().check_sampling(params)
        if params.grammar and parse_grammar:
            self._grammar_box("check").call(("check", params.grammar), GRAMMAR_START_SECONDS)

    def _grammar_box(self, role: str) -> Sandbox:
        box = self._grammar_boxes.get(role)
        if box is None:
            box = self._grammar_boxes[role] = Sandbox("grammar", f"/dev/fd/{self._model_fd}", GRAMMAR_MEMORY,
                                                      what="the grammar", pass_fds=(self._model_fd,))  # fmt: skip
        return box

    def _grammar_step(self, answer) -> None:
        """Take the child's answer (mask, vocabulary size, seconds it worked) for the next token."""
        packed, n_vocab, seconds = answer
        if n_vocab != self._n_vocab:
            raise YiLocalError(f"the grammar process read a vocabulary of {n_vocab} tokens, the model has {self._n_vocab}",
                               hint="restart yi-local")  # fmt: skip
        self._grammar_seconds += seconds
        if self._grammar_seconds > GRAMMAR_REPLY_SECONDS:
            raise YiLocalError(f"the grammar took more than {GRAMMAR_REPLY_SECONDS:g} s of work in this reply and was "
                               "stopped", hint="simplify it: fewer alternatives that stay open at once")  # fmt: skip
        self._grammar_mask = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n_vocab).astype(bool)

    def _begin_sampling(self, params: SamplingParams, prompt: list[int]) -> None:
        L = self._L
        self._free_sampler()
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._sampler = chain
        self._grammar_mask = None
        if params.grammar:
            box = self._grammar_box("generate")
            box.drain(GRAMMAR_STEP_SECONDS)  # the previous reply's last step, if it ended before using it
            self._grammar_seconds = 0.0
            self._grammar_step(box.call(("start", params.grammar), GRAMMAR_START_SECONDS))
            self._grammar_child = box.child
        if params.logit_bias:
            items = list(params.logit_bias.items())
            arr = (L.llama_logit_bias * len(items))(*[L.llama_logit_bias(token=int(t), bias=float(b)) for t, b in items])
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self._n_vocab, len(items), arr))
        if params.penalized:
            penalties = L.llama_sampler_init_penalties(self._n_vocab, params.repeat_last_n, params.repeat_penalty,
                                                       params.frequency_penalty, params.presence_penalty)  # fmt: skip
            # The penalties count the end of the prompt too, as llama.cpp's own tools do; only this
            # sampler sees those tokens (a grammar must not).
            for t in prompt[-params.repeat_last_n :]:
                L.llama_sampler_accept(penalties, t)
            L.llama_sampler_chain_add(chain, penalties)
        if params.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            seed = params.seed32 if params.seed is not None else L.LLAMA_DEFAULT_SEED
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))

    def _sample(self) -> int:
        if self._grammar_mask is not None:
            return self._sample_with_grammar()
        return self._L.llama_sampler_sample(self._sampler, self._ctx, -1)

    def _sample_with_grammar(self) -> int:
        """`llama_sampler_sample` with the grammar's mask applied first; a dead end is an error.

        The mask comes from the grammar's sandbox child, which then accepts the sampled token and
        answers with the next mask. When no token is allowed (the grammar's next character is one no
        token can spell), llama.cpp's own sampler would pick one anyway and throw through ctypes.
        """
        L = self._L
        n = self._n_vocab
        box = self._grammar_box("generate")
        if box.pending:  # the child worked on this step while the last token was evaluated
            self._grammar_step(box.receive(GRAMMAR_STEP_SECONDS))
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(n, dtype=np.int32)
        if not self._grammar_mask.any():
            raise GrammarDeadEndError()
        cand = self._candidates
        cand["id"] = self._ids
        cand["logit"] = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, -1), shape=(n,))
        cand["logit"][~self._grammar_mask] = -np.inf
        cand["p"] = 0.0
        arr = L.llama_token_data_array(data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=n,
                                       selected=-1, sorted=False)  # fmt: skip
        L.llama_sampler_apply(self._sampler, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise GrammarDeadEndError()
        token = int(arr.data[arr.selected].id)
        L.llama_sampler_accept(self._sampler, token)
        if not self.is_end_of_generation(token):  # an end token ends the reply; the grammar never sees it
            box.send(("accept", token), same_child=self._grammar_child)  # answered while the token is evaluated
        return token

    def _free_sampler(self) -> None:
        if self._sampler is not None:
            self._L.llama_sampler_free(self._sampler)
        self._sampler, self._grammar_mask = None, None

    def close(self) -> None:
        self._free_sampler()
        for box in self._grammar_boxes.values():
            box.close()
        if self._model_fd is not None:
            os.close(self._model_fd)
            self._model_fd = None
        if self._ctx:
            self._L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
