"""Untrusted work in a child process that can be killed: grammars and chat templates from strangers.

A chat template comes with any downloaded GGUF, and a grammar with any API request. Both run code
that no time limit inside this process can stop: one C-level operation (`9**64**64` in Jinja, a
grammar whose parse stacks double with every character in llama.cpp) holds the GIL or the generation
thread for minutes, and C++ exceptions or stack overflows end the process. Here such work runs in a
long-lived child with a memory limit; a call that takes longer than its deadline kills the child (the
next call starts a new one) and raises `SandboxError` with a message for the user.

The child is `python -m yi_local.runtime.sandbox KIND ARG`; requests and replies are pickled over its
stdin and stdout (the child is ours: the pickles come from this process only).
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from yi_local.errors import YiLocalError

_HEADER = struct.Struct("<Q")


class SandboxError(YiLocalError):
    pass


def _handlers(kind: str, arg: str) -> Callable[[Any], Any]:
    """The child's request handler for `kind` (imported lazily: only the child needs it)."""
    if kind == "template":
        from yi_local.runtime.chat_template import template_worker

        return template_worker()
    if kind == "grammar":
        from yi_local.runtime.grammar_worker import grammar_worker

        return grammar_worker(arg)
    raise ValueError(f"unknown sandbox kind {kind!r}")


class Sandbox:
    """A child process for `kind` work; `call` sends one request and waits at most `timeout` seconds."""

    def __init__(self, kind: str, arg: str = "", memory_bytes: int = 2 << 30, what: str = "the work",
                 pass_fds: tuple[int, ...] = ()):  # fmt: skip
        self.kind, self.arg, self.memory_bytes, self.what, self.pass_fds = kind, arg, memory_bytes, what, pass_fds
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.child = 0  # counts the children started: work that keeps state in one child checks it
        self.pending = False  # a request was sent and its answer not yet read

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "YI_LOCAL_SANDBOX_MEMORY": str(self.memory_bytes), "PYTHONUNBUFFERED": "1"}
        self.child += 1
        return subprocess.Popen([sys.executable, "-m", "yi_local.runtime.sandbox", self.kind, self.arg],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True, pass_fds=self.pass_fds)  # fmt: skip

    def call(self, request: Any, timeout: float, same_child: int | None = None) -> Any:
        """The child's answer to `request`; SandboxError when it fails, dies or runs out of time."""
        self.send(request, same_child)
        return self.receive(timeout)

    def send(self, request: Any, same_child: int | None = None) -> None:
        """Send `request` without waiting for the answer (read it with `receive`). With `same_child`,
        the request needs the state of that child: if it ended meanwhile, fail instead of starting anew."""
        with self._lock:
            if self.pending:
                raise SandboxError(f"{self.what}: an answer is still pending")
            alive = self._proc is not None and self._proc.poll() is None
            if same_child is not None and (not alive or same_child != self.child):
                self._kill()
                raise SandboxError(f"{self.what} could not go on: the process following it ended")
            if not alive:
                self._proc = self._start()
            try:
                data = pickle.dumps(request)
                self._proc.stdin.write(_HEADER.pack(len(data)) + data)  # type: ignore[union-attr]
                self._proc.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                self._kill()
                raise SandboxError(f"{self.what} could not go on: the process following it ended") from None
            self.pending = True

    def receive(self, timeout: float) -> Any:
        with self._lock:
            if not self.pending or self._proc is None:
                raise SandboxError(f"{self.what}: no answer is pending")
            self.pending = False
            deadline = time.monotonic() + timeout
            try:
                header = self._read(self._proc, _HEADER.size, deadline)
                status, value = pickle.loads(self._read(self._proc, _HEADER.unpack(header)[0], deadline))
            except (EOFError, OSError, TimeoutError) as e:
                self._kill()
                if isinstance(e, TimeoutError):
                    raise SandboxError(f"{self.what} took longer than {timeout:g} s and was stopped",
                                       hint="simplify it") from None  # fmt: skip
                raise SandboxError(f"{self.what} failed: the process evaluating it ended (out of memory)",
                                   hint="simplify it") from None  # fmt: skip
        if status == "error":
            raise SandboxError(value, hint=None)
        return value

    def drain(self, timeout: float) -> None:
        """Read and drop an answer still pending (a reply ended before its grammar's next step was used)."""
        if self.pending:
            try:
                self.receive(timeout)
            except SandboxError:
                pass

    @staticmethod
    def _read(proc: subprocess.Popen, n: int, deadline: float) -> bytes:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        chunks, left = [], n
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._proc = None
        self.pending = False

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass


def _child(kind: str, arg: str) -> None:
    import resource

    memory = int(os.environ.get("YI_LOCAL_SANDBOX_MEMORY", 2 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    handler = _handlers(kind, arg)
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        request = pickle.loads(stdin.read(_HEADER.unpack(header)[0]))
        try:
            reply = ("ok", handler(request))
        except YiLocalError as e:
            reply = ("error", e.message + (f"; {e.hint}" if e.hint else ""))
        except MemoryError:
            reply = ("error", f"it ran out of memory (the limit is {memory >> 20:,} MB)")
        except RecursionError:
            reply = ("error", f"the {kind} is nested too deeply")
        except Exception as e:  # whatever the untrusted input made the library raise
            reply = ("error", f"{type(e).__name__}: {e}"[:500])
        data = pickle.dumps(reply)
        stdout.write(_HEADER.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
