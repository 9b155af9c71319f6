"""The FastAPI app: OpenAI's chat/completions/models routes, /health, and the web chat page at /."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yi_local.errors import YiLocalError
from yi_local.runtime import Finish, SamplingParams, TextDelta
from yi_local.runtime.backend import Backend, ContextOverflowError
from yi_local.server.limits import BodySizeLimit
from yi_local.server.scheduler import QueueFullError, Scheduler
from yi_local.server.schemas import ChatCompletionRequest, CompletionRequest

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None):
        self.status, self.message, self.type, self.code = status, message, type_, code


def _first_error(errors: list) -> str:
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = first.get("msg", "invalid request")
    return f"{where}: {message}" if where else message


def error_body(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def create_app(
    backend: Backend,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = 4 << 20,
    defaults: SamplingParams | None = None,
) -> FastAPI:
    defaults = defaults or SamplingParams(max_tokens=None)
    info = backend.info
    model_ids = {info.name, Path(info.path).name, Path(info.path).stem}
    scheduler = Scheduler(backend)
    app = FastAPI(title="yi-local", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.router.on_shutdown.append(scheduler.close)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip

    # -- errors as OpenAI bodies ---------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        return JSONResponse(error_body(_first_error(e.errors()), "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    # -- helpers -------------------------------------------------------------------------------
    async def parse(request: Request, model: type[BaseModel]):
        """The JSON body, whatever Content-Type the client sent, validated into `model`."""
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", "invalid_request_error") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", "invalid_request_error") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise APIError(400, _first_error(e.errors()), "invalid_request_error") from None

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                           "invalid_request_error", "invalid_api_key")  # fmt: skip

    def check_model(name: str | None) -> str:
        if name is not None and name not in model_ids:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {info.name!r}",
                           "invalid_request_error", "model_not_found")  # fmt: skip
        return info.name

    def start(prompt: list[int], body):
        if len(prompt) >= info.n_ctx:
            e = ContextOverflowError(len(prompt), info.n_ctx)
            raise APIError(400, f"{e.message}; {e.hint}", "invalid_request_error", "context_length_exceeded")
        try:
            return scheduler.submit(prompt, body.sampling(defaults))
        except QueueFullError as e:
            raise APIError(503, e.message, "server_error", "server_busy") from None

    async def collect(job) -> tuple[str, Finish]:
        parts, finish = [], None
        try:
            async for event in job.stream():
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finish):
                    finish = event
        except YiLocalError as e:  # e.g. a grammar that does not parse
            raise APIError(400, e.message, "invalid_request_error") from None
        assert finish is not None
        return "".join(parts), finish

    def usage(finish: Finish) -> dict:
        u = finish.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}  # fmt: skip

    def finish_reason(finish: Finish) -> str:
        return "stop" if finish.reason == "stop" else "length"

    def stream_response(job, make_chunk, first_delta: dict | None, include_usage: bool):
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
                yield {"data": json.dumps(error_body(e.message, "invalid_request_error"))}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15)

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": info.name, "busy": scheduler.busy, "queued": scheduler.queued}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0, "owned_by": "yi-local",
                                            "context_length": info.n_ctx, "quantization": info.quantization}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await parse(request, ChatCompletionRequest)
        model = check_model(body.model)
        try:
            prompt = backend.chat_tokens([{"role": m.role, "content": m.text()} for m in body.messages])
        except YiLocalError as e:
            raise APIError(400, e.message, "invalid_request_error") from None
        job = start(prompt, body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(delta: dict, reason: str | None) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip

            return stream_response(job, chunk, {"role": "assistant", "content": ""}, body.include_usage)
        text, finish = await collect(job)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason(finish)}],
                "usage": usage(finish)}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await parse(request, CompletionRequest)
        model = check_model(body.model)
        prompt = backend.tokenize(body.prompt, special=False, add_bos=backend.add_bos)
        if not prompt:
            raise APIError(400, "the prompt is empty", "invalid_request_error")
        job = start(prompt, body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(delta: dict, reason: str | None) -> dict:
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                                     "finish_reason": reason}]}  # fmt: skip

            return stream_response(job, chunk, None, body.include_usage)
        text, finish = await collect(job)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(finish)}],
                "usage": usage(finish)}  # fmt: skip

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
