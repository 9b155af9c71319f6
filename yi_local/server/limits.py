"""Bound what a client can make the server hold: body size (413) and how long a body may take (408).

Uvicorn has no timeout of its own for a client that sends its body a byte a second; this middleware
gives the whole body a deadline. (The headers get theirs in `server/http.py`, before any ASGI app runs.)
"""

from __future__ import annotations

import asyncio
import time

from yi_local.server.errors import APIError, send_error


class _Refused(Exception):
    def __init__(self, error: APIError):
        self.error = error


class RequestLimits:
    """Pure ASGI middleware: Content-Length checked up front, chunked bodies counted, a body deadline."""

    def __init__(self, app, max_bytes: int, body_seconds: float):
        self.app, self.max_bytes, self.body_seconds = app, max_bytes, body_seconds

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths = [v for k, v in scope.get("headers") or [] if k.lower() == b"content-length"]
        try:
            declared = int(lengths[0]) if lengths else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            return await send_error(send, self._too_large(), [(b"connection", b"close")])
        deadline = time.monotonic() + self.body_seconds
        seen = 0
        body_done = scope["method"] in ("GET", "HEAD", "OPTIONS")
        started = False

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: waiting for a disconnect is not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _Refused(APIError(408, f"the request body did not arrive within {self.body_seconds:g} s",
                                        code="request_timeout")) from None  # fmt: skip
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _Refused(self._too_large())
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _Refused as e:
            if not started:
                await send_error(send, e.error, [(b"connection", b"close")])
        except Exception as e:
            # FastAPI wraps errors raised while reading the body; find ours.
            cause = e
            while cause is not None and not isinstance(cause, _Refused):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            if not started:
                await send_error(send, cause.error, [(b"connection", b"close")])
