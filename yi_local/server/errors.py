"""Errors as OpenAI error bodies: one shape for every refusal, from the middleware to the routes."""

from __future__ import annotations

import json

from yi_local.errors import UnavailableError, YiLocalError
from yi_local.runtime.backend import ContextOverflowError
from yi_local.runtime.params import ParamError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    @property
    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_user_error(e: YiLocalError, prompt_param: str = "messages") -> APIError:
    """A problem with the request, as found by the runtime: a 400 that says how to fix it."""
    message = f"{e.message}; {e.hint}" if e.hint else e.message
    if isinstance(e, ContextOverflowError):
        return APIError(400, message, code="context_length_exceeded", param=prompt_param)
    if isinstance(e, ParamError):
        return APIError(400, message, param=e.name)
    if isinstance(e, UnavailableError):  # not the request's fault: a worker machine is gone
        return APIError(503, message, "server_error", "unavailable")
    return APIError(400, message)


async def send_error(send, error: APIError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer from ASGI middleware, before the app has seen the request."""
    body = json.dumps(error.body).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
