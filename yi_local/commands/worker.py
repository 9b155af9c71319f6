"""Lend this machine's memory and compute to a model running on another: llama.cpp's RPC server.

The main machine runs `yi-local run|chat|serve|bench MODEL --rpc HOST:PORT[,HOST:PORT...]`; llama.cpp
splits the model's layers across its devices and the workers' by free memory, and sends each worker its
layers' weights when the model loads (with --cache, a worker keeps them on disk, so a reload does not
send them again). A worker serves one client at a time, on this machine's best device (a GPU if llama.cpp
has one here, else the CPU), until Ctrl+C.

The protocol has no authentication: anyone who can reach the port can run computations and read what it
holds. The worker listens on this machine only (127.0.0.1) unless --host says otherwise; use another host
only on a network you trust.

Examples:
  yi-local worker                                  # this machine only, port 50052
  yi-local worker --host 0.0.0.0 --port 50052      # other machines on a trusted network
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yi_local.commands.options import limited
from yi_local.runtime.params import LOAD_LIMITS, Limit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from yi_local.rpc import WORKER_PORT

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=limited(Limit(1, 65535, integer=True)), default=WORKER_PORT,
                   help=f"port (default {WORKER_PORT})")  # fmt: skip
    p.add_argument("--threads", type=limited(LOAD_LIMITS["n_threads"]), default=None,
                   help="CPU threads when the worker computes on the CPU (default: all cores)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="keep received weights in DIR, so that loading the model again does not send them again")


def run(args: argparse.Namespace) -> int:
    import ctypes
    import socket
    import threading

    from yi_local import hardware, rpc
    from yi_local.errors import YiLocalError
    from yi_local.server.security import is_loopback
    from yi_local.units import format_size

    lib = rpc.require_rpc()
    if not args.host.strip():
        raise YiLocalError("--host is empty", hint="e.g. --host 127.0.0.1 (this machine only) or --host 0.0.0.0")
    if ":" in args.host:
        raise YiLocalError(f"--host {args.host}: llama.cpp's RPC server takes an IPv4 address or a host name",
                           hint="e.g. --host 0.0.0.0 for every IPv4 interface")  # fmt: skip
    endpoint = rpc.Endpoint(args.host, args.port)
    # ggml's server only prints and returns when it cannot listen: find out here, with the reason.
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise YiLocalError(f"cannot listen on {endpoint}: {e.strerror or e}",
                           hint="is another worker running there? choose another --port") from None  # fmt: skip
    cache = None
    if args.cache is not None:
        try:
            args.cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise YiLocalError(f"cannot use --cache {args.cache}: {e.strerror or e}",
                               hint="give a folder you can write") from None  # fmt: skip
        cache = str(args.cache.resolve()).encode()
    devices = rpc.local_devices()
    best = next((d for d in devices if d.kind in (rpc.DEVICE_GPU, rpc.DEVICE_IGPU)), None) or next(
        d for d in devices if d.kind == rpc.DEVICE_CPU
    )
    threads = args.threads or hardware.cpu_count()
    print(f"yi-local worker: {best.name} ({best.description}), {format_size(best.free)} free of "
          f"{format_size(best.total)}, at {endpoint}, RPC protocol {rpc.PROTO_MAJOR}.{rpc.PROTO_MINOR}"
          f"{f', {threads} threads' if best.kind == rpc.DEVICE_CPU else ''}"
          f"{f', weights cached in {args.cache}' if cache else ''}. Ctrl+C stops it.", file=sys.stderr, flush=True)  # fmt: skip
    if not is_loopback(args.host):
        print(f"yi-local: warning: listening on {args.host}: the RPC protocol has no authentication, so anyone who "
              f"can reach port {args.port} can use this machine's {best.name} and read what it holds. Use it only on "
              "a network you trust.", file=sys.stderr, flush=True)  # fmt: skip
    array = (ctypes.c_void_p * 1)(best.pointer)
    done = threading.Event()

    def serve() -> None:
        try:
            lib.ggml_backend_rpc_start_server(endpoint.llama.encode(), cache, threads, 1, array)
        finally:
            done.set()

    threading.Thread(target=serve, name="rpc-server", daemon=True).start()
    while not done.wait(0.5):  # the main thread waits where Ctrl+C can reach it
        pass
    raise YiLocalError(f"the RPC server on {endpoint} stopped", hint="see the lines above for why")
