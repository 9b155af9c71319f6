"""OpenAI request bodies, validated; unknown fields are ignored as OpenAI's API does."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from yi_local.runtime import SamplingParams


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    grammar: str | None = Field(default=None, max_length=100_000)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16 or any(len(s) > 512 for s in stops):
            raise ValueError("at most 16 stop strings of at most 512 characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for key, bias in v.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return v

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """The request's sampling, with the server's defaults for what the request leaves out."""
        given = self.model_fields_set

        def pick(name: str, default):
            return getattr(self, name) if name in given else default

        max_tokens = self.max_completion_tokens or self.max_tokens
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
            temperature=pick("temperature", defaults.temperature),
            top_k=pick("top_k", defaults.top_k),
            top_p=pick("top_p", defaults.top_p),
            min_p=pick("min_p", defaults.min_p),
            repeat_penalty=pick("repeat_penalty", defaults.repeat_penalty),
            seed=pick("seed", defaults.seed),
            stop=list(self.stop or []) or list(defaults.stop),
            logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
            grammar=self.grammar,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send exactly one prompt per request")
            return v[0]
        return v
