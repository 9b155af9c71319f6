"""The FastAPI app: OpenAI's chat/completions/models routes, /health, and the web chat page at /.

Requests pass the browser guard (Host, Origin, Content-Type) and the body limits first; the body is
then prepared off the event loop (`prepare.py`) and queued for the engine, which decodes up to
`--parallel` of them together. A client that disconnects, streaming or not, cancels its job and
frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from yi_local.errors import YiLocalError
from yi_local.runtime import Finish, SamplingParams, TextDelta
from yi_local.runtime.backend import Backend
from yi_local.server.errors import APIError, error_body, from_user_error
from yi_local.server.limits import RequestLimits
from yi_local.server.prepare import Prepared, Preparer, first_error
from yi_local.server.scheduler import Job, QueueFullError, Scheduler
from yi_local.server.security import BrowserGuard, HostPolicy, check_api_key

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger(__name__)
BODY_SECONDS = 30.0
RETRY_AFTER_SECONDS = 1  # told to a client refused because the queue is full


def usage(finish: Finish) -> dict:
    u = finish.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}  # fmt: skip


def finish_reason(finish: Finish) -> str:
    return "stop" if finish.reason == "stop" else "length"


async def collect(job: Job, request: Request) -> tuple[str, Finish]:
    """The whole reply; the job is cancelled as soon as the client goes away."""

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    watcher = asyncio.create_task(watch_disconnect())
    parts, finish = [], None
    try:
        async for event in job.stream():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finish):
                finish = event
    except YiLocalError as e:  # e.g. a grammar that admits no token
        raise from_user_error(e) from None
    finally:
        watcher.cancel()
    assert finish is not None
    return "".join(parts), finish


def stream_response(job: Job, make_chunk: Callable[[dict, str | None], dict], first_delta: dict | None,
                    include_usage: bool) -> EventSourceResponse:  # fmt: skip
    async def events() -> AsyncIterator[dict]:
        if first_delta is not None:
            yield {"data": json.dumps(make_chunk(first_delta, None))}
        try:
            async for event in job.stream():
                if isinstance(event, TextDelta):
                    if event.text:
                        yield {"data": json.dumps(make_chunk({"content": event.text}, None))}
                elif isinstance(event, Finish):
                    yield {"data": json.dumps(make_chunk({}, finish_reason(event)))}
                    if include_usage:
                        chunk = make_chunk({}, None)
                        chunk["choices"], chunk["usage"] = [], usage(event)
                        yield {"data": json.dumps(chunk)}
        except YiLocalError as e:  # the headers are sent: report it in the stream, as OpenAI does
            yield {"data": json.dumps(from_user_error(e).body)}
        except Exception as e:  # a bug: the client still gets an error event and the end of the stream
            logger.exception("generation failed")
            yield {"data": json.dumps(error_body(f"internal error: {type(e).__name__}", "server_error"))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


def create_app(
    backend: Backend,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = 4 << 20,
    defaults: SamplingParams | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] = (),
    body_seconds: float = BODY_SECONDS,
    max_queue: int = 64,
) -> FastAPI:
    info = backend.info
    key = api_key.encode("utf-8") if api_key is not None else None
    preparer = Preparer(backend, defaults or SamplingParams(max_tokens=None),
                        {info.name, Path(info.path).name, Path(info.path).stem})  # fmt: skip
    scheduler = Scheduler(backend, max_queue)
    app = FastAPI(title="yi-local", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.router.on_shutdown.append(scheduler.close)
    # Outermost last: the guard runs first, then the body limits, then CORS for allowed origins.
    cors_origins = [o.rstrip("/") for o in cors_origins]
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(RequestLimits, max_bytes=max_body_bytes, body_seconds=body_seconds)
    app.add_middleware(BrowserGuard, policy=HostPolicy(host, allowed_hosts), cors_origins=cors_origins)

    # -- errors as OpenAI bodies ---------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        message, param = first_error(e.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    # -- helpers -------------------------------------------------------------------------------
    # Parsing big bodies holds the GIL: two at a time keep the event loop answering everyone else.
    preparing = asyncio.Semaphore(2)

    async def prepare(request: Request, how: Callable[[bytes], Prepared]) -> Prepared:
        check_api_key(request.scope, key)
        raw = await request.body()
        async with preparing:
            return await run_in_threadpool(how, raw)

    def start(prepared: Prepared) -> Job:
        try:
            return scheduler.submit(prepared.prompt, prepared.params)
        except QueueFullError as e:
            raise APIError(503, f"{e.message}; {e.hint}", "server_error", "server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None  # fmt: skip

    # -- routes --------------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        busy, down = scheduler.busy, backend.unavailable()
        body = {"status": "ok" if down is None else "degraded", "model": info.name, "model_loaded": down is None,
                "busy": busy > 0, "queued": scheduler.queued,
                "slots": {"total": scheduler.slots, "busy": busy, "idle": scheduler.slots - busy}}  # fmt: skip
        if down is not None:
            body["reason"] = down
        return body

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request):
        check_api_key(request.scope, key)
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0, "owned_by": "yi-local",
                                            "context_length": info.n_ctx, "quantization": info.quantization}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        prepared = await prepare(request, preparer.chat)
        job = start(prepared)
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), prepared.model
        if prepared.body.stream:
            def chunk(delta: dict, reason: str | None) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip

            return stream_response(job, chunk, {"role": "assistant", "content": ""}, prepared.body.include_usage)
        text, finish = await collect(job, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason(finish)}],
                "usage": usage(finish)}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        prepared = await prepare(request, preparer.completion)
        job = start(prepared)
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), prepared.model
        if prepared.body.stream:
            def chunk(delta: dict, reason: str | None) -> dict:
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                                     "finish_reason": reason}]}  # fmt: skip

            return stream_response(job, chunk, None, prepared.body.include_usage)
        text, finish = await collect(job, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(finish)}],
                "usage": usage(finish)}  # fmt: skip

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
