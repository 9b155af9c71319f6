"""What a browser may do to a server on this machine: nothing, unless the user allowed it.

Any web page can send requests to 127.0.0.1. Three checks stop a page from driving the server:
- POST bodies must be `application/json`: a cross-site "simple" request (text/plain, a form) is sent
  by the browser without asking the server first, so it must be refused, key or no key.
- The `Host` header must name this machine (a loopback name or address, the address it is bound to,
  or an `--allow-host` name): DNS rebinding points an attacker's name at 127.0.0.1 to read replies,
  and its requests then carry that name. An empty host (`Host: :8080`) never passes.
- A request with an `Origin` must come from an allowed origin (`--cors-origin`) or from the page the
  server itself serves (same origin); others get 403 before any work.
The API key is compared as UTF-8 bytes, in constant time.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Iterable

from yi_local.server.errors import APIError, send_error

LOOPBACK_NAMES = frozenset({"localhost"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def split_host(value: str) -> tuple[str, str | None] | None:
    """'name:port' or '[v6]:port' -> (name, port); None when it is not a well-formed host."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    else:
        name, sep, port = value.rpartition(":") if ":" in value else (value, "", "")
        if name.count(":"):  # a bare IPv6 address without brackets is not a valid Host
            return None
        port = port if sep else None
    if not name or (port is not None and not (port.isdigit() and len(port) <= 5)):
        return None
    return name.lower().rstrip("."), port


def is_loopback(host: str) -> bool:
    ip = _ip(host.strip("[]"))
    return host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost") or (ip is not None and ip.is_loopback)


class HostPolicy:
    def __init__(self, bound_host: str, allowed: Iterable[str] = ()):
        allowed = [a.strip().lower() for a in allowed]
        self.any = "*" in allowed
        self.names = {a.rstrip(".") for a in allowed if a != "*"}
        bound = bound_host.strip("[]").lower()
        self.wildcard = bound in WILDCARDS
        if not self.wildcard:
            self.names.add(bound)

    def allows(self, raw: bytes | None) -> bool:
        if self.any:
            return True
        if raw is None:
            return False
        try:
            parsed = split_host(raw.decode("ascii"))
        except UnicodeDecodeError:
            return False
        if parsed is None:
            return False
        name, _ = parsed
        if name in self.names or is_loopback(name):
            return True
        # Bound to every address, the server is reached by any of this machine's addresses; an IP
        # literal cannot be rebound, only a name can.
        return self.wildcard and _ip(name) is not None


def _header(scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers") or [] if k.lower() == name]


class BrowserGuard:
    """Pure ASGI middleware: Host, Origin and Content-Type checks before anything else runs."""

    def __init__(self, app, policy: HostPolicy, cors_origins: Iterable[str] = ()):
        self.app, self.policy = app, policy
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        hosts = _header(scope, b"host")
        if len(hosts) != 1 or not self.policy.allows(hosts[0]):
            shown = hosts[0].decode("latin-1")[:100] if hosts else "(none)"
            return await send_error(send, APIError(
                403, f"requests for host {shown!r} are refused: this server answers to localhost and its own "
                "address (start it with --allow-host NAME to add a name)", code="host_not_allowed"))  # fmt: skip
        origins = _header(scope, b"origin")
        if origins and not self._origin_allowed(origins, hosts[0]):
            return await send_error(send, APIError(
                403, f"requests from the web page at {origins[0].decode('latin-1')[:100]!r} are refused "
                "(start the server with --cors-origin ORIGIN to allow a page)", code="origin_not_allowed"))  # fmt: skip
        if scope["method"] == "POST" and not _is_json(_header(scope, b"content-type")):
            return await send_error(send, APIError(
                415, "the request body must be sent as Content-Type: application/json "
                "(with curl: -H 'Content-Type: application/json')", code="unsupported_media_type"))  # fmt: skip
        return await self.app(scope, receive, send)

    def _origin_allowed(self, origins: list[bytes], host: bytes) -> bool:
        if len(origins) != 1:
            return False
        origin = origins[0].decode("latin-1").rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        same = host.decode("latin-1").lower()
        return origin in (f"http://{same}", f"https://{same}")


def _is_json(values: list[bytes]) -> bool:
    if len(values) != 1:
        return False
    media = values[0].split(b";", 1)[0].strip().lower()
    return media == b"application/json"


def check_api_key(scope, api_key: bytes | None) -> None:
    """401 unless `Authorization: Bearer KEY` carries the key (compared as UTF-8 bytes)."""
    if api_key is None:
        return
    values = _header(scope, b"authorization")
    given = values[0] if len(values) == 1 else b""
    scheme, _, token = given.partition(b" ")
    if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), api_key):
        raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
