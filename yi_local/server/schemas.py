"""OpenAI request bodies, validated.

Every field that changes the output is either honoured or refused with a 400 that names it; none is
silently ignored. Fields the client leaves out are None here and take the server's defaults (the
sampling flags `serve` was started with); the ranges live once, in `yi_local.runtime.params`.
Unknown fields are ignored, as most OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from yi_local.runtime import SamplingParams
from yi_local.runtime.grammar import GrammarError, json_grammar
from yi_local.runtime.params import ParamError

Number = Union[StrictInt, StrictFloat]
_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: StrictStr  # checked with the conversation by the runtime (chat_template.check_messages)
    content: Union[StrictStr, list[TextPart]]
    name: StrictStr | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JsonSchema(BaseModel):
    name: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool = Field(default=True, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repeat_penalty: Number | None = None
    repeat_last_n: StrictInt | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    logit_bias: dict[str, Number] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    grammar: StrictStr | None = None
    response_format: ResponseFormat | None = None
    # Refused unless left at what they mean by default: each would change the output.
    n: StrictInt | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return [v] if isinstance(v, str) else (v or [])

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key in v or {}:
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys are token ids, got {key[:20]!r}")
        return v

    def refuse_unsupported(self) -> None:
        """A 400 for fields whose meaning this server cannot give."""
        if self.n not in (None, 1):
            raise ParamError("n", f"n={self.n}: this server returns one choice per request", hint="send n=1 or leave it out")
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            raise ParamError("logprobs", "logprobs are not supported", hint="leave out logprobs and top_logprobs")
        for name in ("tools", "functions", "function_call", "audio", "reasoning_effort", "web_search_options"):
            if getattr(self, name) not in (None, [], {}):
                raise ParamError(name, f"{name} is not supported by this server", hint=f"leave out {name}")
        if self.tool_choice not in (None, "none", "auto"):
            raise ParamError("tool_choice", "tool_choice is not supported by this server", hint="leave it out")
        if self.modalities not in (None, ["text"]):
            raise ParamError("modalities", "only text output is supported", hint='send modalities=["text"] or leave it out')

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """The request's sampling, with the server's defaults for what the request leaves out (unchecked)."""
        self.refuse_unsupported()

        def pick(name: str):
            value = getattr(self, name)
            return getattr(defaults, name) if value is None else value

        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
            temperature=pick("temperature"), top_k=pick("top_k"), top_p=pick("top_p"), min_p=pick("min_p"),
            repeat_penalty=pick("repeat_penalty"), repeat_last_n=pick("repeat_last_n"),
            frequency_penalty=pick("frequency_penalty"), presence_penalty=pick("presence_penalty"),
            seed=pick("seed"), stop=list(self.stop or []) or list(defaults.stop),
            logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
            grammar=self._grammar(),
        )  # fmt: skip

    def _grammar(self) -> str | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return self.grammar
        if self.grammar is not None:
            raise ParamError("response_format", "send either a grammar or a response_format, not both")
        if rf.type == "json_object":
            return json_grammar()
        if rf.json_schema is None:
            raise ParamError("response_format", 'response_format of type "json_schema" needs a json_schema',
                             hint='e.g. {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}')  # fmt: skip
        try:
            return json_grammar(json.dumps(rf.json_schema.schema_))
        except GrammarError as e:
            raise ParamError("response_format", f"response_format.json_schema: {e.message}", hint=e.hint) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, m in enumerate(self.messages):
            if m.name:
                raise ParamError("messages", f"messages[{i}].name is not supported: the chat template has no place "
                                 "for participant names", hint="leave out name")  # fmt: skip


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr]]
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send exactly one prompt per request")
            return v[0]
        return v

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ParamError("echo", "echo is not supported", hint="leave it out")
        if self.suffix:
            raise ParamError("suffix", "suffix (insertion) is not supported", hint="leave it out")
        if self.best_of not in (None, 1):
            raise ParamError("best_of", "best_of is not supported", hint="leave it out")
