"""One reply's bookkeeping: sampled tokens in, typed events out.

A `Reply` turns each token the engine samples for its sequence into a UTF-8 text delta, stops at
end-of-generation tokens and at the user's stop strings (whose text never reaches the output), at
max_tokens and at the end of the sequence's context, and ends with usage and timings.
"""

from __future__ import annotations

import codecs
import time
from typing import Callable, Sequence

from yi_local.runtime.events import Event, Finish, FinishReason, TextDelta, Timings, Usage
from yi_local.runtime.params import SamplingParams


class Reply:
    def __init__(self, prompt: list[int], params: SamplingParams, n_ctx: int,
                 token_text: Callable[[int], bytes], special_text: Callable[[int], str],
                 is_end: Callable[[int], bool]) -> None:  # fmt: skip
        self.prompt = prompt
        self._text, self._special_text, self._is_end = token_text, special_text, is_end
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(params.stop)
        # Room left in the sequence's context; the last token of a reply is sampled but never evaluated.
        self.limit = n_ctx - len(prompt)
        if params.max_tokens is not None:
            self.limit = min(params.max_tokens, self.limit)
        self.t_submit = time.perf_counter()
        self.t_start = self.t_prompt = self.t_first = 0.0
        self.cached = 0  # prompt tokens the slot's KV cache already held
        # n_gen counts tokens of the reply; an end-of-turn token that ends it is sampled but not counted.
        self.n_gen = self.n_sampled = 0

    def started(self, cached: int) -> None:
        """The sequence has a slot, which held the first `cached` prompt tokens already."""
        self.t_start, self.cached = time.perf_counter(), cached

    def prompt_done(self) -> None:
        self.t_prompt = time.perf_counter()

    @property
    def wants_more(self) -> bool:
        return self.n_gen < self.limit

    def push(self, token: int) -> tuple[list[Event], bool]:
        """The events for a sampled token, and whether the reply has ended (its Finish is among them)."""
        self.n_sampled += 1
        if self.n_sampled == 1:
            self.t_first = time.perf_counter()
        if self._is_end(token):
            return [self.finish("stop", self._special_text(token))], True
        self.n_gen += 1
        text, hit = self._stops.push(self._decoder.decode(self._text(token)))
        if hit is not None:
            return ([TextDelta(text, (token,))] if text else []) + [self.finish("stop", hit)], True
        events: list[Event] = [TextDelta(text, (token,))]
        if not self.wants_more:
            events += self.end("length")
            return events, True
        return events, False

    def end(self, reason: FinishReason) -> list[Event]:
        """The held-back text (a partial stop string, an unfinished character) and the Finish."""
        tail = self._stops.flush(self._decoder.decode(b"", final=True))
        return ([TextDelta(tail, ())] if tail else []) + [self.finish(reason)]

    def finish(self, reason: FinishReason, stop_text: str | None = None) -> Finish:
        now = time.perf_counter()
        started = self.t_start or now
        prompt_end = self.t_prompt or now
        return Finish(
            reason=reason,
            usage=Usage(prompt_tokens=len(self.prompt), completion_tokens=self.n_gen, cached_tokens=self.cached),
            timings=Timings(
                evaluated_tokens=len(self.prompt) - self.cached if self.t_prompt else 0,
                prompt_s=prompt_end - started,
                sampled_tokens=self.n_sampled,
                generate_s=now - prompt_end if self.t_prompt else 0.0,
                first_token_s=self.t_first - self.t_submit if self.t_first else 0.0,
            ),
            stop_text=stop_text,
        )


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
