"""Serve a model over a local OpenAI-compatible HTTP API, with a web chat page at /.

Routes: POST /v1/chat/completions, POST /v1/completions (streamed as SSE or not), GET /v1/models,
GET /health, and GET / (the chat page). Requests queue fairly; a client that disconnects stops its
generation at once. Sampling flags set the defaults for requests that leave them out.

Examples:
  yi-local serve Yi-6B-Chat-Q4_K_M.gguf
  yi-local serve Yi-6B-Chat-Q4_K_M.gguf --port 9000 --api-key secret --cors-origin http://localhost:3000
Then point any OpenAI client at http://127.0.0.1:8080/v1 (the api key may be anything unless --api-key is set).
"""

from __future__ import annotations

import argparse
import os
import sys

from yi_local.commands.options import (
    add_model_arg,
    add_runtime_args,
    add_sampling_args,
    load_options,
    resolve_model,
    sampling_params,
)

API_KEY_ENV = "YI_LOCAL_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require `Authorization: Bearer KEY` on /v1 routes (default: ${API_KEY_ENV})")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; none by default)")  # fmt: skip
    add_runtime_args(p)
    add_sampling_args(p, max_tokens=None)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from yi_local.runtime import load_backend
    from yi_local.server.app import create_app

    model, backend_name = resolve_model(args)
    backend = load_backend(model, load_options(args), backend=backend_name)
    info = backend.info
    app = create_app(backend, api_key=args.api_key, cors_origins=args.cors_origin, defaults=sampling_params(args))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"yi-local: serving {info.name} ({info.quantization}, {info.offload}, ctx {info.n_ctx}) "
          f"at http://{host}:{args.port}/  (OpenAI API at /v1)", file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
