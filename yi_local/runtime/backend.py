"""The backend interface and the one generation loop every backend shares.

A backend supplies the model-specific steps (tokenize, evaluate the prompt reusing the KV cache,
sample a token, feed it back); `Backend.generate` turns them into events: UTF-8 text deltas, stops
at end-of-generation tokens and user stop strings (whose text never reaches the output),
max_tokens, cancellation, usage and timings.
"""

from __future__ import annotations

import codecs
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

from yi_local.errors import YiLocalError
from yi_local.runtime.chat_template import render_chat
from yi_local.runtime.events import Event, Finish, TextDelta, Timings, Usage
from yi_local.runtime.params import SamplingParams


class ContextOverflowError(YiLocalError):
    def __init__(self, n_prompt: int, n_ctx: int):
        super().__init__(
            f"the prompt is {n_prompt} tokens but the context holds {n_ctx}",
            hint="shorten the conversation, or load the model with a larger --ctx",
        )
        self.n_prompt, self.n_ctx = n_prompt, n_ctx


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    quantization: str  # e.g. Q4_K_M
    n_ctx: int  # the context this backend was loaded with
    n_ctx_train: int
    n_layers: int
    offload: str  # "CPU", "Metal", "CUDA 33/33 layers"
    backend: str  # "llama.cpp", "transformers"
    chat_template: str | None
    bos_token: str
    eos_token: str


class Backend(ABC):
    info: ModelInfo
    # Serializes generation: one request owns the model's KV cache at a time.
    lock: threading.Lock
    _pieces: dict[int, bytes]  # token id -> its text, special tokens spelled out
    _cache: list[int]  # the tokens whose keys and values the KV cache holds, in order
    _generated: list[bool]  # per cached token: sampled by the model rather than read from a prompt

    # -- model-specific steps -------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]: ...

    @abstractmethod
    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The token's bytes; with `special`, control tokens are spelled out (b"<|im_end|>")."""

    @abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    @abstractmethod
    def special_texts(self) -> frozenset[bytes]:
        """The text of every special (control) token, e.g. b"<|im_end|>"."""

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values the cache holds now, in order."""
        return self._cache

    def cached_generated(self) -> list[bool]:
        """For each cached token: True if the model generated it, False if it came from a prompt."""
        return self._generated

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the cache holds already; the last one is always evaluated again,
        since its logits are needed to sample."""
        reuse = 0
        for a, b in zip(self._cache, tokens):
            if a != b:
                break
            reuse += 1
        return min(reuse, len(tokens) - 1)

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache."""

    @abstractmethod
    def _prefill(self, tokens: list[int]) -> int:
        """Make the KV cache hold `tokens` with logits for the last one; return how many were reused."""

    @abstractmethod
    def _begin_sampling(self, params: SamplingParams, prompt: list[int]) -> None: ...

    @abstractmethod
    def _sample(self) -> int: ...

    @abstractmethod
    def _feed(self, token: int) -> None:
        """Evaluate one generated token so the next can be sampled."""

    def close(self) -> None:
        pass

    # -- shared --------------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        return False

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.info, messages, add_generation_prompt)

    def chat_tokens(self, messages: Sequence[dict]) -> list[int]:
        return self.tokens_reusing_cache(self.render_chat(messages))

    def tokens_reusing_cache(self, text: str) -> list[int]:
        """Tokens for `text` (special tokens parsed) that keep what the KV cache already holds.

        A previous reply re-tokenized often differs from the ids that were generated, which would
        end token-level reuse there. So cached tokens are kept as long as their text is a prefix of
        `text`, up to the last point that is either followed by a special token or is the end of
        the model's own generated tokens; the rest is tokenized as usual. Special tokens split
        tokenization into independent pieces, so text from a prompt is never tokenized differently
        than plain tokenization would, and a reply keeps the ids the model generated.
        """
        data = text.encode("utf-8")
        specials = self.special_texts()
        # Copies: the server prepares prompts while another request may be extending the cache.
        cached, generated = list(self.cached_tokens()), list(self.cached_generated())
        cached = cached[: len(generated)]
        keep = kept_bytes = pos = 0
        for i, token in enumerate(cached):
            piece = self._piece(token)
            if not piece or not data.startswith(piece, pos):  # an empty piece proves nothing: stop
                break
            pos += len(piece)
            if pos < len(data) and data[pos] & 0xC0 == 0x80:
                continue  # inside a UTF-8 character (byte-fallback tokens): no boundary here
            end_of_reply = generated[i] and (i + 1 == len(cached) or not generated[i + 1])
            if end_of_reply or pos == len(data) or any(data.startswith(s, pos) for s in specials):
                keep, kept_bytes = i + 1, pos
        if keep == 0:
            return self.tokenize(text, special=True, add_bos=self.add_bos)
        return cached[:keep] + self.tokenize(data[kept_bytes:].decode("utf-8"), special=True)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.token_bytes(token, special=True)
        return piece

    def generate(
        self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream the continuation of `prompt`. Holds `self.lock` while it runs."""
        if not prompt:
            raise YiLocalError("the prompt is empty", hint="give some text to continue")
        if len(prompt) >= self.info.n_ctx:
            raise ContextOverflowError(len(prompt), self.info.n_ctx)
        with self.lock:
            yield from self._generate_locked(prompt, params, cancel)

    def _generate_locked(self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None) -> Iterator[Event]:
        t0 = time.perf_counter()
        cached = self._prefill(prompt)
        t_prompt = time.perf_counter()
        self._begin_sampling(params, prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        limit = self.info.n_ctx - len(prompt)
        if params.max_tokens is not None:
            limit = min(params.max_tokens, limit)
        # n_gen counts tokens of the reply; an end-of-turn token that ends it is sampled but not counted.
        n_gen, n_sampled, reason, stop_text, t_first = 0, 0, "length", None, 0.0
        while n_gen < limit:
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            token = self._sample()
            n_sampled += 1
            if n_sampled == 1:
                t_first = time.perf_counter() - t0
            if self.is_end_of_generation(token):
                reason, stop_text = "stop", self.token_bytes_special(token)
                break
            n_gen += 1
            text, hit = stops.push(decoder.decode(self.token_bytes(token)))
            if hit is not None:
                if text:
                    yield TextDelta(text, (token,))
                reason, stop_text = "stop", hit
                break
            yield TextDelta(text, (token,))
            if n_gen < limit:
                self._feed(token)
        if reason != "stop":
            tail = stops.flush(decoder.decode(b"", final=True))
            if tail:
                yield TextDelta(tail, ())
        t_end = time.perf_counter()
        yield Finish(
            reason=reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=n_gen, cached_tokens=cached),
            timings=Timings(
                prompt_tokens=len(prompt) - cached,
                prompt_s=t_prompt - t0,
                generated_tokens=n_sampled,
                generate_s=t_end - t_prompt,
                first_token_s=t_first,
            ),
            stop_text=stop_text,
        )

    def token_bytes_special(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")


class StopMatcher:
    """Holds back text that could be the start of a stop string, so stop text never leaks."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string hit or None)."""
        if not self.stops:
            return text, None
        buf = self.pending + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            pos, stop = min(hits)
            self.pending = ""
            return buf[:pos], stop
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self, text: str = "") -> str:
        out, self.pending = self.pending + text, ""
        return out
