"""Turn a request body into what the scheduler runs: parsed, validated, rendered and tokenized.

All of it runs in a worker thread, never on the event loop: a 4 MB body of 100,000 messages or of
emoji takes seconds to parse, render or tokenize, and the event loop must keep answering every
other client (and /health) meanwhile. Every refusal is an APIError with the OpenAI error shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from yi_local.errors import YiLocalError
from yi_local.runtime import SamplingParams
from yi_local.runtime.backend import Backend
from yi_local.server.errors import APIError, from_user_error
from yi_local.server.schemas import ChatCompletionRequest, CompletionRequest

Body = TypeVar("Body", bound=BaseModel)
MAX_OTHER_FIELDS = 256 << 10  # a grammar (100 KB), a schema, logit_bias, stop strings


@dataclass(frozen=True)
class Prepared:
    body: ChatCompletionRequest | CompletionRequest
    model: str  # the model id the response names
    prompt: list[int]
    params: SamplingParams


def first_error(errors: list) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = first.get("msg", "invalid request")
    return (f"{where}: {message}" if where else message), (where.split(".")[0] or None)


def parse(raw: bytes, model: type[Body]) -> Body:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise APIError(400, f"the request body cannot be read: {e}"[:300]) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = first_error(e.errors())
        raise APIError(400, message, param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


class Preparer:
    def __init__(self, backend: Backend, defaults: SamplingParams, model_ids: set[str]):
        self.backend, self.defaults, self.model_ids = backend, defaults, model_ids

    def check_size(self, raw: bytes) -> None:
        """Refuse, before parsing, a body too large for any prompt this context can hold: its text would
        need more tokens than the context has even at the longest token, with every character escaped
        (6 bytes of JSON each), plus room for a grammar and the other fields."""
        limit = self.backend.info.n_ctx * self.backend.max_token_bytes() * 6 + MAX_OTHER_FIELDS
        if len(raw) > limit:
            raise APIError(400, f"the request is {len(raw):,} bytes: more than a context of {self.backend.info.n_ctx} "
                           "tokens can hold; shorten the conversation, or load the model with a larger --ctx",
                           code="context_length_exceeded")  # fmt: skip

    def _model(self, name: str | None) -> str:
        info = self.backend.info
        if name is not None and name not in self.model_ids:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {info.name!r}",
                           code="model_not_found", param="model")  # fmt: skip
        return info.name

    def _finish(self, body, prompt: list[int], params: SamplingParams, prompt_param: str) -> Prepared:
        try:
            self.backend.check_prompt(prompt)
        except YiLocalError as e:
            raise from_user_error(e, prompt_param) from None
        return Prepared(body, self._model(body.model), prompt, params)

    def chat(self, raw: bytes) -> Prepared:
        self.check_size(raw)
        body = parse(raw, ChatCompletionRequest)
        self._model(body.model)
        try:
            params = body.sampling(self.defaults)
            self.backend.check_sampling(params, parse_grammar=True)
            prompt = self.backend.chat_tokens([m.as_dict() for m in body.messages])
        except YiLocalError as e:
            raise from_user_error(e) from None
        return self._finish(body, prompt, params, "messages")

    def completion(self, raw: bytes) -> Prepared:
        self.check_size(raw)
        body = parse(raw, CompletionRequest)
        self._model(body.model)
        try:
            params = body.sampling(self.defaults)
            self.backend.check_sampling(params, parse_grammar=True)
            prompt = self.backend.text_tokens(body.prompt)
        except YiLocalError as e:
            raise from_user_error(e, "prompt") from None
        return self._finish(body, prompt, params, "prompt")
