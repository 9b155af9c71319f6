"""The listening socket and the HTTP protocol: bound before the model loads, headers on a deadline.

Binding first means a taken port or a wrong --host fails at once with a clear message, instead of
after the model has loaded (and after a "serving at" banner). Uvicorn's HTTP protocol waits for
request headers for ever; `DeadlineH11Protocol` closes a connection whose headers have not arrived
within `HEADER_SECONDS` of its opening or of the previous response.
"""

from __future__ import annotations

import errno
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from yi_local.errors import YiLocalError

HEADER_SECONDS = 10.0
MAX_CONNECTIONS = 256


class DeadlineH11Protocol(H11Protocol):
    header_seconds = HEADER_SECONDS

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_deadline = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_seconds, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port), or a YiLocalError that says why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise YiLocalError(f"cannot listen on {host!r}: it is not a name or address this machine knows",
                           hint="use --host 127.0.0.1 (this machine only) or one of this machine's addresses") from None  # fmt: skip
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise YiLocalError(f"port {port} is already in use on {host} (another server is listening there)",
                               hint="stop the other server, or choose another port with --port") from None  # fmt: skip
        if e.errno == errno.EACCES:
            raise YiLocalError(f"no permission to listen on {where}",
                               hint="ports below 1024 need administrator rights: use --port 8080 or above") from None  # fmt: skip
        if e.errno == errno.EADDRNOTAVAIL:
            raise YiLocalError(f"{host} is not an address of this machine",
                               hint="use --host 127.0.0.1 (this machine only) or one of this machine's addresses") from None  # fmt: skip
        raise YiLocalError(f"cannot listen on {where}: {e.strerror}", hint="check --host and --port") from None
    return sock


def run(app, sock: socket.socket, header_seconds: float = HEADER_SECONDS, on_exit=None) -> None:
    """Serve `app` on the bound socket until Ctrl+C or SIGTERM; `on_exit` runs as shutdown begins.

    Uvicorn's graceful shutdown waits for requests in flight, so generations must be told to stop
    first (`on_exit`), or a long reply keeps the server up; 10 s later, what is left is cancelled.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)

    protocol = type("Protocol", (DeadlineH11Protocol,), {"header_seconds": header_seconds})
    config = uvicorn.Config(app, http=protocol, log_level="warning", timeout_keep_alive=5,
                            limit_concurrency=MAX_CONNECTIONS, server_header=False, timeout_graceful_shutdown=10)  # fmt: skip
    Server(config).run(sockets=[sock])
