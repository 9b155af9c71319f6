"""The llama.cpp backend with RPC workers, run in a supervised child process.

llama.cpp's RPC client aborts the whole process when a worker is unreachable, speaks another protocol
or stops answering mid-generation, and keeps its connections for the life of the process. So with
`--rpc` the model lives in a child (`engine_child.py`) and this process keeps everything else: the
engine (the one generation loop), the events, and a vocabulary-only copy of the model for tokenizing.
The engine's steps (`_decode`, `_sample`, …) are calls to the child over a socket.

When the child dies, the call in flight fails with an error naming the worker that stopped answering
(each is probed), every request running fails with it, and the engine's record of the KV cache is
cleared. The next request probes the workers again and starts a fresh child: the CLI, the chat and the
server stay up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from yi_local import rpc
from yi_local.errors import UnavailableError, YiLocalError
from yi_local.gguf_header import check_model
from yi_local.llama_lib import llama_cpp, load_model
from yi_local.runtime.backend import Backend, Chunk, GrammarDeadEndError
from yi_local.runtime.llama_vocab import LlamaVocab
from yi_local.runtime.params import LoadOptions, SamplingParams

logger = logging.getLogger(__name__)

FIRST_WORD_SECONDS = 60.0  # until the child's first progress report: it connects to the workers meanwhile
START_SECONDS = 600.0  # then between reports, while the weights travel to the workers
STDERR_TAIL = 2000


class WorkerLost(UnavailableError):
    """The model's process died: a worker stopped answering (named when one can be found)."""


class SupervisedBackend(LlamaVocab, Backend):
    def __init__(self, model: str | os.PathLike[str], options: LoadOptions):
        self._path = Path(model)
        check_model(self._path)
        rpc.require_rpc()
        self._endpoints = [e for text in options.rpc for e in rpc.parse_endpoints(text)]
        rpc.probe_all(self._endpoints)  # before anything loads: llama.cpp would abort on these
        self._options = dataclasses.replace(options, on_progress=None)
        self._io = threading.Lock()  # one call at a time on the socket
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        self._log: tempfile._TemporaryFileWrapper | None = None
        self._lost: str | None = None  # why the last child died
        self._loading = False  # a child is loading the model
        L = self._L = llama_cpp()
        self._vocab_model = load_model(self._path, vocab_only=True)
        self._vocab = L.llama_model_get_vocab(self._vocab_model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        self._specials = None
        self._pieces = {}
        self.info = self._start(options.on_progress)
        self._n_batch = min(options.n_batch, self.info.n_ctx * self.info.n_parallel)  # as llama.cpp clamps it

    # -- the child ---------------------------------------------------------------------------
    def _start(self, on_progress=None):
        """Start a child, load the model there; its ModelInfo."""
        self._loading = True  # /health says so meanwhile
        try:
            return self._load_child(on_progress)
        finally:
            self._loading = False

    def _load_child(self, on_progress):
        ours, theirs = socket.socketpair()
        self._log = tempfile.NamedTemporaryFile(prefix="yi-local-engine-", suffix=".log")
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort prints one line, not a debugger's dump
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "yi_local.runtime.engine_child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
                start_new_session=True,  # Ctrl+C at the terminal is this process's to handle
            )  # fmt: skip
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(("load", str(self._path), self._options))
            wait = FIRST_WORD_SECONDS
            while True:
                if not self._conn.poll(wait):
                    raise UnavailableError(f"loading the model across the workers made no progress for {wait:g} s",
                                           hint="is a worker busy with another client? check each with `yi-local "
                                           "doctor --rpc ...`")  # fmt: skip
                wait = START_SECONDS
                message = self._conn.recv()
                if message[0] == "progress":
                    if on_progress is not None:
                        on_progress(message[1])
                    continue
                if message[0] == "ready":
                    self._lost = None
                    return message[1]
                raise _rebuilt(message)
        except (EOFError, OSError):
            self._stop()
            raise self._loss() from None
        except BaseException as e:
            self._stop()
            self._lost = getattr(e, "message", None) or f"loading the model failed: {type(e).__name__}"
            raise

    def _stop(self, grace: float = 0.0) -> None:
        """End the child: at once, or after `grace` seconds for it to close the model itself."""
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _loss(self) -> WorkerLost:
        """What to tell the user when the child has died: the worker that no longer answers, if one does not."""
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        said = ""
        if self._log is not None:
            try:
                self._log.seek(0, os.SEEK_END)
                size = self._log.tell()
                self._log.seek(max(0, size - STDERR_TAIL))
                said = self._log.read().decode("utf-8", errors="replace")
            except OSError:
                pass
        self._stop()
        for endpoint in self._endpoints:
            try:
                rpc.probe(endpoint, timeout=2.0)
            except rpc.WorkerError as e:
                self._lost = e.message
                return WorkerLost(f"{e.message}; the model was unloaded (it loads again for the next request once the "
                                  "worker answers)", hint=e.hint)  # fmt: skip
        lines = [line for line in said.splitlines() if line.strip()]
        detail = next((line for line in reversed(lines) if "RPC" in line or "abort" in line.lower()), lines[-1] if lines else "")
        self._lost = f"the model's process ended (exit code {code}){': ' + detail[:200] if detail else ''}"
        return WorkerLost(self._lost + " (it starts again for the next request)")

    def _call(self, name: str, *args):
        with self._io:
            conn = self._conn
            if conn is None:
                raise WorkerLost(self._lost or "the model's process is not running")
            try:
                conn.send((name, args))
                message = conn.recv()
            except (EOFError, OSError):
                raise self._loss() from None
        if message[0] == "ok":
            return message[1]
        raise _rebuilt(message)

    def unavailable(self) -> str | None:
        """Known without asking the workers: a child loading the model, one lost at a call (or that could not
        start), or one that has ended since its last call. (A worker that stops while nothing runs is found
        at the next call, which probes them all.)"""
        proc = self._proc
        if self._loading:
            return "the model is loading"
        if self._conn is None or proc is None:
            return self._lost or "the model's process is not running"
        code = proc.poll()
        if code is not None:
            return f"the model's process ended (exit code {code})"
        return None

    def _restart(self) -> None:
        """A fresh child, once no other request runs: the workers are probed first (an error naming one
        that does not answer fails this request), and every slot's record of its cache is cleared."""
        engine = self.engine
        if engine.busy > 1:
            raise WorkerLost(self._lost or "the model's process is not running",
                             hint="retry once the requests that were running have ended")  # fmt: skip
        rpc.probe_all(self._endpoints)
        for slot in engine.slots:
            slot.cache, slot.generated = [], []
        self.info = self._start()

    # -- the engine's steps, in the child ------------------------------------------------------
    @property
    def n_batch(self) -> int:
        return self._n_batch

    def _let_go_if_ended(self) -> None:
        """A child that ended while nothing ran is let go before a request uses it, so that request starts
        a fresh one instead of failing on the closed socket."""
        with self._io:  # as a call would: no other thread's call is on the socket meanwhile
            if self._conn is not None and self._proc is not None and self._proc.poll() is not None:
                self._loss()

    def _slot_truncate(self, seq: int, keep: int) -> int:
        self._let_go_if_ended()
        if self._conn is None:
            return 0  # nothing is cached in a process that is gone
        return self._call("_slot_truncate", seq, keep)

    def _decode(self, batch: list[Chunk]) -> None:
        self._call("_decode", batch)

    def _begin_sampling(self, seq: int, params: SamplingParams, prompt: list[int]) -> None:
        self._let_go_if_ended()
        if self._conn is None:
            self._restart()
        self._call("_begin_sampling", seq, params, prompt)

    def _sample(self, seq: int, row: int) -> int:
        return self._call("_sample", seq, row)

    def _end_sampling(self, seq: int) -> None:
        if self._conn is not None:
            self._call("_end_sampling", seq)

    def check_sampling(self, params: SamplingParams, parse_grammar: bool = False) -> None:
        super().check_sampling(params)
        self._let_go_if_ended()  # a fresh child checks the grammar when the request starts it
        if params.grammar and parse_grammar and self._conn is not None:
            self._call("check_sampling", params, True)

    def state_binding(self) -> dict | None:
        self._let_go_if_ended()
        return self._call("state_binding") if self._conn is not None else None

    def _slot_state_size(self, seq: int) -> int:
        return self._call("_slot_state_size", seq)

    def _slot_save(self, seq: int, path, tokens: list[int]) -> bool:
        return self._call("_slot_save", seq, str(path), tokens)

    def _slot_load(self, seq: int, path, n_tokens: int) -> list[int] | None:
        return self._call("_slot_load", seq, str(path), n_tokens)

    def close(self) -> None:
        if not super().close():
            logger.warning("the generation thread did not stop; the model stays loaded until exit")
            return
        with self._io:
            if self._conn is not None:
                try:
                    self._conn.send(("close", ()))
                except OSError:
                    pass
            self._stop(grace=5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._vocab_model:
            self._L.llama_model_free(self._vocab_model)
            self._vocab_model = None

    def __del__(self) -> None:
        if sys.is_finalizing():
            return
        try:
            self.close()
        except Exception:
            pass


def _rebuilt(message: tuple) -> BaseException:
    """The child's error as the exception it was."""
    _, kind, text, hint = message
    if kind == "grammar-dead-end":
        return GrammarDeadEndError()
    if kind == "bug":
        return RuntimeError(f"the model's process failed: {text}")
    if kind == "unavailable":
        return UnavailableError(text, hint=hint)
    return YiLocalError(text, hint=hint)
