"""A backend that plays scripted replies through the runtime interface, for tests that need exact timing.

One token per character of the prompt; replies come as word-sized deltas. With `paced=True` each delta
waits for `step()`, so a test can act (press Esc) between two deltas; `delay` spaces them out in time.
`yield_waits` records how long each delta's `yield` kept the generator suspended (the consumer's time).
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from yi_local.runtime import Event, Finish, SamplingParams, TextDelta, Timings, Usage
from yi_local.runtime.backend import Backend, ModelInfo
from yi_local.runtime.chat_template import YI_CHAT_TEMPLATE


class ScriptedBackend(Backend):
    def __init__(self, replies: list[str], paced: bool = False, n_ctx: int = 4096, delay: float = 0.0):
        self.info = ModelInfo(name="Yi-Scripted", path="scripted.gguf", quantization="Q4_K_M", n_ctx=n_ctx,
                              n_ctx_train=4096, n_layers=2, offload="CPU", backend="scripted",
                              chat_template=YI_CHAT_TEMPLATE, bos_token="<|startoftext|>", eos_token="<|im_end|>")  # fmt: skip
        self._pieces = {}
        self.replies = list(replies)
        self.paced = paced
        self.delay = delay
        self.yield_waits: list[float] = []
        self.finished_at: float | None = None  # time.monotonic() when the last reply's Finish was taken
        self._steps = threading.Semaphore(0)
        self.prompts: list[list[int]] = []  # every prompt generate() was given
        self.params: list[SamplingParams] = []
        self.resets = 0

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self._steps.release()

    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return chr(token).encode()

    def is_end_of_generation(self, token: int) -> bool:
        return False

    def special_texts(self) -> frozenset[bytes]:
        return frozenset()

    n_vocab = 0x110000  # token = code point

    def max_token_bytes(self) -> int:
        return 4  # one character per token

    def reset(self) -> None:
        self.resets += 1

    # generate() is scripted: the engine's steps are never called
    def _slot_truncate(self, seq, keep):  # pragma: no cover
        raise NotImplementedError

    def _decode(self, batch):  # pragma: no cover
        raise NotImplementedError

    def _begin_sampling(self, seq, params, prompt):  # pragma: no cover
        raise NotImplementedError

    def _sample(self, seq, row):  # pragma: no cover
        raise NotImplementedError

    def generate(self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None = None) -> Iterator[Event]:
        self.prompts.append(prompt)
        self.params.append(params)
        reply = self.replies.pop(0) if self.replies else "OK."
        words = reply.split(" ")
        n = 0
        reason = "stop"
        for i, word in enumerate(words):
            if self.paced:
                self._steps.acquire(timeout=30)
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            if params.max_tokens is not None and n == params.max_tokens:
                reason = "length"
                break
            if self.delay:
                time.sleep(self.delay)
            n += 1
            start = time.monotonic()
            yield TextDelta(word + (" " if i < len(words) - 1 else ""), (i,))
            self.yield_waits.append(time.monotonic() - start)
        yield Finish(reason, Usage(len(prompt), n), Timings(len(prompt), 0.05, n, max(n - 1, 0) / 25.0, 0.06))
        self.finished_at = time.monotonic()
