"""Serve a model over a local OpenAI-compatible HTTP API, with a web chat page at /.

Routes: POST /v1/chat/completions, POST /v1/completions (streamed as SSE or not), GET /v1/models,
GET /health, and GET / (the chat page). Up to --parallel requests are decoded together, each with its
own --ctx; more wait in a fair queue of --queue places (past it: 503 with Retry-After). A client that
disconnects stops its generation at once. Sampling flags set the defaults for requests that leave them out.

Web pages cannot drive it: POST bodies must be application/json, the Host header must name this
machine (--allow-host adds names), and browser requests need an allowed --cors-origin.

Examples:
  yi-local serve Yi-6B-Chat-Q4_K_M.gguf
  yi-local serve Yi-6B-Chat-Q4_K_M.gguf --port 9000 --api-key secret --cors-origin http://localhost:3000
  yi-local serve Yi-6B-Chat-Q4_K_M.gguf --parallel 8 --ctx 8192
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
    limited,
    load_options,
    resolve_model,
    sampling_params,
)
from yi_local.runtime.params import LOAD_LIMITS, PARALLEL_CPU, PARALLEL_GPU, Limit

QUEUE_LIMIT = Limit(0, 1 << 20, integer=True)

API_KEY_ENV = "YI_LOCAL_API_KEY"
# Seconds a client may take to send its request headers, and its body (slow networks may need more).
TIMEOUT_ENVS = {"header": "YI_LOCAL_HEADER_TIMEOUT", "body": "YI_LOCAL_BODY_TIMEOUT"}


def _timeout(kind: str, default: float) -> float:
    from yi_local.errors import YiLocalError

    name = TIMEOUT_ENVS[kind]
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise YiLocalError(f"{name}={text!r} is not a number of seconds between 0.1 and 3600", hint=f"unset {name}")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535 (0: any free port), not {port}")
    return port


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1 routes (default: ${API_KEY_ENV})")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from the web page at ORIGIN, e.g. http://localhost:3000 "
                   "(repeatable; none by default)")  # fmt: skip
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header names NAME (repeatable; '*' turns the check off, "
                   "e.g. behind a reverse proxy). By default only localhost and the bound address are answered")  # fmt: skip
    add_runtime_args(p)
    g = p.add_argument_group("requests")
    g.add_argument("--parallel", "-np", type=_parallel, default="auto", metavar="auto|N",
                   help=f"requests decoded together in one batch, each with its own --ctx of KV cache (auto: "
                   f"{PARALLEL_GPU} with a GPU, {PARALLEL_CPU} on the CPU, 1 with --backend transformers, which "
                   "decodes one at a time)")  # fmt: skip
    g.add_argument("--queue", type=limited(QUEUE_LIMIT), default=64, metavar="N",
                   help="requests that may wait for a free slot; more are refused with 503 and Retry-After "
                   "(default 64)")  # fmt: skip
    add_sampling_args(p, max_tokens=None)


def _parallel(text: str) -> int | str:
    return "auto" if text == "auto" else limited(LOAD_LIMITS["n_parallel"])(text)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key or the environment; an empty or unusable key is an error, not 'no key'."""
    from yi_local.errors import YiLocalError

    key, source = (args.api_key, "--api-key") if args.api_key is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is None:
        return None
    if not key.strip():
        raise YiLocalError(f"{source} is empty: every request would be refused",
                           hint=f"give a key, or leave out --api-key (and unset {API_KEY_ENV}) for no key")  # fmt: skip
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise YiLocalError(f"{source} has spaces at its ends or control characters, which no HTTP client can send",
                           hint="choose a key of visible characters")  # fmt: skip
    return key


def run(args: argparse.Namespace) -> int:
    from yi_local import hardware
    from yi_local.runtime import load_backend
    from yi_local.runtime.params import auto_parallel
    from yi_local.server import http
    from yi_local.server.app import BODY_SECONDS, create_app
    from yi_local.server.security import is_loopback

    key = api_key(args)
    defaults = sampling_params(args)
    load_options(args)  # flags that cannot go together fail before the port, a pull or a load
    header_seconds, body_seconds = _timeout("header", http.HEADER_SECONDS), _timeout("body", BODY_SECONDS)
    sock = http.bind(args.host, args.port)  # a taken port fails now, not after the model has loaded
    with sock:
        if not is_loopback(args.host) and key is None:
            print(f"yi-local: warning: serving on {args.host} without an API key: anyone who can reach this "
                  f"machine can use the model. Set --api-key (or ${API_KEY_ENV}).", file=sys.stderr, flush=True)  # fmt: skip
        if "*" in args.cors_origin and key is None:
            print("yi-local: warning: --cors-origin '*' without an API key: any web page you visit can use the "
                  f"model. Set --api-key (or ${API_KEY_ENV}).", file=sys.stderr, flush=True)  # fmt: skip
        model, backend_name = resolve_model(args)
        parallel = args.parallel
        if parallel == "auto":
            parallel = auto_parallel(hardware.llama_gpu_kind() if backend_name == "llama.cpp" else None,
                                     args.n_gpu_layers, backend_name)  # fmt: skip
        backend = load_backend(model, load_options(args, n_parallel=parallel), backend=backend_name)
        info = backend.info
        for note in info.notes:  # what loading chose for the user, e.g. a --ctx 0 cut to what fits
            print(f"yi-local: note: {note}", file=sys.stderr, flush=True)
        app = create_app(backend, api_key=key, cors_origins=args.cors_origin, defaults=defaults, host=args.host,
                         allowed_hosts=args.allow_host, body_seconds=body_seconds, max_queue=args.queue)  # fmt: skip
        sock.listen(2048)  # connections from the moment the banner says so are queued, not refused
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"yi-local: serving {info.name} ({info.quantization}, {info.offload}, ctx {info.n_ctx}, "
              f"KV {info.kv_type}, {info.n_parallel} parallel) "
              f"at http://{shown}:{port}/  (OpenAI API at /v1)", file=sys.stderr, flush=True)  # fmt: skip
        http.run(app, sock, header_seconds=header_seconds, on_exit=app.state.scheduler.cancel_all)
    return 0
