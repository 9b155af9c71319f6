"""The llama.cpp backend: llama-cpp-python's low-level API, a batch of sequences, native samplers.

The engine's steps on one llama.cpp context of `n_parallel` sequences: a `llama_batch` whose tokens
carry their sequence ids, the KV cells of each sequence cut back with `llama_memory_seq_rm`, and one
`llama_sampler` chain per sequence sampled at that sequence's batch row. No per-token Python work on
logits (a grammar's mask aside).

With several sequences the KV cache is unified: `--ctx` tokens per sequence, `ctx × n_parallel`
cells shared, and each sequence held to its own `ctx` by the engine, so none can run the others out
of room. (A split cache would decode sequences with non-adjacent ids in separate passes.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yi_local import hardware
from yi_local.errors import YiLocalError
from yi_local.fit import kv_cache_bytes
from yi_local.gguf_header import check_model, model_meta
from yi_local.kv_types import FLASH_ATTN_IDS, check_kv
from yi_local.llama_lib import captured_log, llama_cpp
from yi_local.runtime import context_log
from yi_local.runtime.backend import Backend, Chunk, GrammarDeadEndError, ModelInfo
from yi_local.runtime.llama_vocab import LlamaVocab
from yi_local.runtime.offload import own_context, plan_offload
from yi_local.runtime.params import LoadOptions, SamplingParams
from yi_local.units import format_size
from yi_local.runtime.sandbox import Sandbox

logger = logging.getLogger(__name__)

# A real grammar's parse or step takes milliseconds; these stop the ones built to hang llama.cpp.
GRAMMAR_START_SECONDS = 10.0
GRAMMAR_STEP_SECONDS = 5.0
GRAMMAR_REPLY_SECONDS = 30.0  # in all, for one reply: slow steps under the step limit add up
GRAMMAR_MEMORY = 4 << 30


@dataclass(eq=False)
class _Sampling:
    """One sequence's sampler: its native chain, and its grammar's state when it has one."""

    chain: object
    mask: np.ndarray | None = None  # tokens the grammar allows next
    child: int = 0  # the sandbox child following this reply's grammar
    seconds: float = 0.0  # its work so far in this reply


class LlamaCppBackend(LlamaVocab, Backend):
    def __init__(self, model: str | os.PathLike[str], options: LoadOptions | None = None):
        options = options or LoadOptions()
        path = Path(model)
        meta = model_meta(check_model(path))  # a damaged file is named here, before llama.cpp sees it
        # Held open for the grammar children, which must read the vocabulary of this very file.
        self._model_fd: int | None = os.open(path, os.O_RDONLY)
        L = self._L = llama_cpp()
        self._pieces = {}
        self._specials: frozenset[bytes] | None = None
        self._samplers: dict[int, _Sampling] = {}
        self._ctx = self._model = self._batch = None
        self._identity: dict | None = None  # the model file's, for saved states
        n_seq = options.n_parallel
        head_dim = meta.n_embd // max(1, meta.n_head)
        kv_type = check_kv(options.kv_type, options.flash_attn, head_dim)  # before anything is loaded
        notes: list[str] = []

        gpu = hardware.llama_gpu_kind()
        gpu_free = hardware.gpu_free_bytes(gpu)
        devices = self._rpc_devices(options.rpc, gpu)  # None without --rpc
        per_token = kv_cache_bytes(meta.n_layers, 1, meta.n_head_kv, head_dim, kv_type.name) * n_seq
        n_ctx_seq = options.n_ctx
        shrunk = None  # (budget) when --ctx 0 takes less than the model's own context
        if n_ctx_seq == 0 and meta.context_length > 0:
            n_ctx_seq, shrunk = own_context(meta.context_length, per_token, meta.file_size, options.memory_budget, gpu,
                                            gpu_free, self._workers_free)  # fmt: skip
        kind, free = gpu, gpu_free
        if devices is not None:  # the workers' memory joins this machine's GPU's (or stands in for it)
            kind, free = gpu or "RPC", (gpu_free or 0) + self._workers_free
        plan = plan_offload(options.n_gpu_layers, meta.file_size, meta.n_layers, (n_ctx_seq or 4096) * per_token,
                            kind, free)  # fmt: skip
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
        if devices is not None:
            mparams.devices = ctypes.cast(devices, ctypes.c_void_p)
        # through the descriptor: the file whose header was just checked, whatever happens to the path
        with captured_log() as load_log:
            self._model = L.llama_model_load_from_file(os.fsencode(f"/dev/fd/{self._model_fd}"), mparams)
        if not self._model:
            raise YiLocalError(f"llama.cpp could not load {path}", hint="the file may be damaged; convert it again")
        offload = plan.description
        if devices is not None:  # what llama.cpp did with the layers, device by device
            offload = context_log.layer_split(load_log, self._device_labels()) or offload

        cparams = L.llama_context_default_params()
        n_train = L.llama_model_n_ctx_train(self._model)
        n_ctx_seq = n_ctx_seq or n_train
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = n_seq > 1
        cparams.n_batch = cparams.n_ubatch = options.n_batch
        threads = options.n_threads or hardware.cpu_count()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = kv_type.ggml_type
        cparams.flash_attn_type = FLASH_ATTN_IDS[options.flash_attn]
        with captured_log() as log:
            self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            said = context_log.errors(log)
            raise YiLocalError(f"llama.cpp could not create a context of {cparams.n_ctx:,} tokens with a "
                               f"{kv_type.name} KV cache and flash attention {options.flash_attn}"
                               + (f": {said}" if said else ""),
                               hint="try a smaller --ctx, or --kv-type f16 / --flash-attn auto")  # fmt: skip
        report = context_log.read_report(log)
        flash = report.flash_attn if report is not None else None
        if shrunk is not None:
            smaller = {"f16": "q8_0 or q4_0", "bf16": "q8_0 or q4_0", "q8_0": "q4_0"}.get(kv_type.name)
            notes.append(f"--ctx 0: the model's own context of {meta.context_length:,} tokens needs "
                         f"{format_size(meta.context_length * per_token)} of {kv_type.name} KV cache, more than fits "
                         f"beside the {format_size(meta.file_size)} of weights in the {format_size(shrunk)} free; using {L.llama_n_ctx(self._ctx) // n_seq:,} tokens"
                         + (f" (--kv-type {smaller} holds more)" if smaller else ""))  # fmt: skip
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._mem = L.llama_get_memory(self._ctx)
        # llama.cpp clamps the batch to the context: a larger chunk would fail its assertion and abort.
        self._n_batch = L.llama_n_batch(self._ctx)
        self._batch = L.llama_batch_init(self._n_batch, 0, 1)
        # Grammars run in sandbox children (see grammar_worker.py): one checks requests' grammars,
        # one per sequence follows the grammar of the reply being generated. Started on first use.
        self._grammar_boxes: dict[str, Sandbox] = {}
        self._candidates: np.ndarray | None = None
        self._add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        bos, eos = L.llama_vocab_bos(self._vocab), L.llama_vocab_eos(self._vocab)
        self.info = ModelInfo(
            name=meta.name,
            path=str(path),
            quantization=meta.quantization,
            n_ctx=L.llama_n_ctx(self._ctx) // n_seq,
            n_ctx_train=n_train,
            n_layers=meta.n_layers,
            offload=offload,
            backend="llama.cpp",
            chat_template=meta.chat_template,
            bos_token=self.token_bytes(bos, special=True).decode(errors="replace") if bos >= 0 else "",
            eos_token=self.token_bytes(eos, special=True).decode(errors="replace") if eos >= 0 else "",
            gpu_layers=plan.n_gpu_layers if plan.n_gpu_layers >= 0 else meta.n_layers,
            n_parallel=n_seq,
            kv_type=kv_type.name,
            flash_attn=options.flash_attn if flash is None else ("on" if flash else "off"),
            kv_bytes=report.kv_bytes if report is not None else n_ctx_seq * per_token,
            notes=tuple(notes),
        )

    @property
    def n_batch(self) -> int:
        return self._n_batch

    # -- evaluation --------------------------------------------------------------------------
    def _slot_truncate(self, seq: int, keep: int) -> int:
        if self._L.llama_memory_seq_rm(self._mem, seq, keep, -1):
            return keep
        self._L.llama_memory_seq_rm(self._mem, seq, 0, -1)
        return 0

    def _decode(self, batch: list[Chunk]) -> None:
        b = self._batch
        n = 0
        for chunk in batch:
            last = len(chunk.tokens) - 1
            for i, token in enumerate(chunk.tokens):
                b.token[n] = token
                b.pos[n] = chunk.start + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = chunk.seq
                b.logits[n] = chunk.logits and i == last
                n += 1
        b.n_tokens = n
        rc = self._L.llama_decode(self._ctx, b)
        if rc != 0:
            raise YiLocalError(f"llama.cpp failed to evaluate {n} token(s) (code {rc})",
                               hint="the memory may be full: lower --ctx or --parallel")  # fmt: skip

    def _rpc_devices(self, endpoints: tuple[str, ...], gpu: str | None):
        """The NULL-terminated device array for `llama_model_params.devices`: this machine's GPUs, then each
        worker's devices (kept alive with the model); None without workers. The workers are probed
        first: llama.cpp aborts the process on one it cannot reach."""
        self._workers_free = 0
        if not endpoints:
            return None
        from yi_local import rpc

        rpc.require_rpc()
        workers = rpc.probe_all([e for text in endpoints for e in rpc.parse_endpoints(text)])
        self._workers_free = sum(w.free for w in workers)
        self._devices = rpc.device_array(workers, with_local_gpus=gpu is not None)
        return self._devices

    def _device_labels(self) -> dict[str, str]:
        """"RPC0" -> "RPC0[127.0.0.1:50052]": a worker's device named with its address."""
        from yi_local import rpc

        g = rpc.ggml()
        labels = {}
        for pointer in self._devices or ():
            if pointer:
                name = (g.ggml_backend_dev_name(pointer) or b"?").decode(errors="replace")
                about = (g.ggml_backend_dev_description(pointer) or b"").decode(errors="replace")
                labels[name] = f"{name}[{about}]" if about and name.startswith("RPC") else name
        return labels

    # -- saved states (yi_local.runtime.kv_state) ---------------------------------------------
    def state_binding(self) -> dict:
        from importlib.metadata import version

        from yi_local.runtime import kv_state

        if self._identity is None:
            assert self._model_fd is not None
            self._identity = kv_state.model_identity(self._model_fd)
        info = self.info
        return {"format": kv_state.FORMAT, "llama_cpp_python": version("llama-cpp-python"), "model": self._identity,
                "n_ctx": info.n_ctx, "n_parallel": info.n_parallel, "kv_unified": info.n_parallel > 1,
                "kv_type": info.kv_type, "flash_attn": info.flash_attn}  # fmt: skip

    def _slot_state_size(self, seq: int) -> int:
        return int(self._L.llama_state_seq_get_size(self._ctx, seq))

    def _slot_save(self, seq: int, path, tokens: list[int]) -> bool:
        arr = (self._L.llama_token * len(tokens))(*tokens)
        with captured_log(quiet=True):  # a failure is the caller's to report, in its words
            return self._L.llama_state_seq_save_file(self._ctx, os.fsencode(path), seq, arr, len(tokens)) > 0

    def _slot_load(self, seq: int, path, n_tokens: int) -> list[int] | None:
        arr = (self._L.llama_token * max(1, n_tokens))()
        count = ctypes.c_size_t(0)
        with captured_log(quiet=True):
            n = self._L.llama_state_seq_load_file(self._ctx, os.fsencode(path), seq, arr, n_tokens, ctypes.byref(count))
        return list(arr[: count.value]) if n > 0 else None

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

    def _grammar_step(self, sampling: _Sampling, answer) -> None:
        """Take the child's answer (mask, vocabulary size, seconds it worked) for the next token."""
        packed, n_vocab, seconds = answer
        if n_vocab != self._n_vocab:
            raise YiLocalError(f"the grammar process read a vocabulary of {n_vocab} tokens, the model has {self._n_vocab}",
                               hint="restart yi-local")  # fmt: skip
        sampling.seconds += seconds
        if sampling.seconds > GRAMMAR_REPLY_SECONDS:
            raise YiLocalError(f"the grammar took more than {GRAMMAR_REPLY_SECONDS:g} s of work in this reply and was "
                               "stopped", hint="simplify it: fewer alternatives that stay open at once")  # fmt: skip
        sampling.mask = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n_vocab).astype(bool)

    def _begin_sampling(self, seq: int, params: SamplingParams, prompt: list[int]) -> None:
        L = self._L
        self._end_sampling(seq)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        sampling = self._samplers[seq] = _Sampling(chain)
        if params.grammar:
            box = self._grammar_box(f"generate-{seq}")
            box.drain(GRAMMAR_STEP_SECONDS)  # the previous reply's last step, if it ended before using it
            self._grammar_step(sampling, box.call(("start", params.grammar), GRAMMAR_START_SECONDS))
            sampling.child = box.child
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

    def _sample(self, seq: int, row: int) -> int:
        sampling = self._samplers[seq]
        if sampling.mask is not None:
            return self._sample_with_grammar(seq, sampling, row)
        return self._L.llama_sampler_sample(sampling.chain, self._ctx, row)

    def _sample_with_grammar(self, seq: int, sampling: _Sampling, row: int) -> int:
        """`llama_sampler_sample` with the grammar's mask applied first; a dead end is an error.

        The mask comes from the grammar's sandbox child, which then accepts the sampled token and
        answers with the next mask. When no token is allowed (the grammar's next character is one no
        token can spell), llama.cpp's own sampler would pick one anyway and throw through ctypes.
        """
        L = self._L
        n = self._n_vocab
        box = self._grammar_box(f"generate-{seq}")
        if box.pending:  # the child worked on this step while the last token was evaluated
            self._grammar_step(sampling, box.receive(GRAMMAR_STEP_SECONDS))
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(n, dtype=np.int32)
        assert sampling.mask is not None
        if not sampling.mask.any():
            raise GrammarDeadEndError()
        cand = self._candidates
        cand["id"] = self._ids
        cand["logit"] = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, row), shape=(n,))
        cand["logit"][~sampling.mask] = -np.inf
        cand["p"] = 0.0
        arr = L.llama_token_data_array(data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=n,
                                       selected=-1, sorted=False)  # fmt: skip
        L.llama_sampler_apply(sampling.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise GrammarDeadEndError()
        token = int(arr.data[arr.selected].id)
        L.llama_sampler_accept(sampling.chain, token)
        if not self.is_end_of_generation(token):  # an end token ends the reply; the grammar never sees it
            box.send(("accept", token), same_child=sampling.child)  # answered while the token is evaluated
        return token

    def _end_sampling(self, seq: int) -> None:
        sampling = self._samplers.pop(seq, None)
        if sampling is not None:
            self._L.llama_sampler_free(sampling.chain)

    def close(self) -> None:
        if not super().close():  # the engine's worker first: it may be mid-step
            logger.warning("the generation thread did not stop; the model stays in memory until exit")
            return
        for seq in list(self._samplers):
            self._end_sampling(seq)
        for box in self._grammar_boxes.values():
            box.close()
        if self._model_fd is not None:
            os.close(self._model_fd)
            self._model_fd = None
        if self._batch is not None:
            self._L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        if sys.is_finalizing():
            return  # the engine's thread may be mid-step; the process's end frees everything
        try:
            self.close()
        except Exception:
            pass
