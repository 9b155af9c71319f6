"""The typed events every backend yields; `run`, `chat` and `serve` consume only these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class TextDelta:
    """New text of the reply (possibly empty while a UTF-8 character or a stop string is pending)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused from the previous request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Speeds. Counts here are work done, unlike `Usage`: tokens evaluated (the prompt minus what the
    KV cache held) and tokens sampled (the reply's, plus an end-of-turn token that ended it)."""

    evaluated_tokens: int
    prompt_s: float
    sampled_tokens: int
    generate_s: float
    first_token_s: float  # from the call to the first sampled token

    @property
    def prompt_tps(self) -> float:
        return self.evaluated_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generate_tps(self) -> float:
        """Tokens per second of generation: the first sampled token comes from the prompt's evaluation, so
        `generate_s` (from the prompt's end to the last token) holds the steps for the other
        `sampled_tokens - 1`, as llama.cpp's own eval counts have it (0 with fewer than two)."""
        steps = self.sampled_tokens - 1
        return steps / self.generate_s if steps > 0 and self.generate_s > 0 else 0.0


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    usage: Usage
    timings: Timings
    stop_text: str | None = None  # the stop string or end-of-turn token that ended the reply


Event = Union[TextDelta, Finish]
