"""llama.cpp's RPC backend: worker addresses, a probe of each worker, and the ggml functions the binding lacks.

A worker is ggml's own RPC server (`yi-local worker`, or llama.cpp's `rpc-server`); the main machine adds
it as a device and llama.cpp splits the layers across the devices. llama.cpp's client aborts the whole
process on a worker it cannot reach or whose protocol differs, so before anything loads, `probe` speaks
the first messages of that protocol itself (the HELLO handshake, the device count, each device's memory)
over a plain socket, with a timeout, and says what is wrong in words. A worker serves one client at a
time: one that accepts the connection but does not answer HELLO is busy with another.

Wire format (ggml/src/ggml-rpc/ggml-rpc.cpp): a request is | command (1 byte) | size (u64) | data |, a
response | size (u64) | data |, little-endian.
"""

from __future__ import annotations

import ctypes
import re
import socket
import struct
import time
from dataclasses import dataclass

from yi_local.errors import UnavailableError, YiLocalError

WORKER_PORT = 50052  # llama.cpp's rpc-server default
# The protocol of the bundled llama.cpp (ggml-rpc.h): a worker must have this major version and at most this minor.
PROTO_MAJOR, PROTO_MINOR = 7, 0
MAX_WORKERS = 16  # GGML_RPC_MAX_SERVERS
MAX_DEVICES = 16  # a worker serves the devices it was started with: a few
MAX_DEVICE_BYTES = 1 << 50  # 1 PiB: anything more is not a device's memory
PROBE_SECONDS = 5.0

_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: transport capabilities; all zero is plain TCP


class WorkerError(UnavailableError):
    """A worker that cannot be used; the message names it."""

    def __init__(self, endpoint: "Endpoint", problem: str, hint: str | None = None):
        super().__init__(f"the worker {endpoint} {problem}", hint=hint)
        self.endpoint = endpoint


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def llama(self) -> str:
        """The form llama.cpp's parser takes: host and port split at the first ':' (so no IPv6 literals)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Device:
    free: int
    total: int


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: Endpoint
    version: str  # "7.0.0"
    devices: tuple[Device, ...]

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)


def parse_endpoints(text: str) -> list[Endpoint]:
    """`HOST:PORT[,HOST:PORT...]` (a port alone means it on this machine) → endpoints; YiLocalError saying
    which one is wrong."""
    out: list[Endpoint] = []
    for part in [p.strip() for p in text.split(",")]:
        m = re.fullmatch(r"(?:([A-Za-z0-9.-]+):)?(\d{1,5})", part)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise YiLocalError(f"--rpc: {part!r} is not HOST:PORT", hint="e.g. --rpc 192.168.1.20:50052,192.168.1.21:50052")
        endpoint = Endpoint(m.group(1) or "127.0.0.1", int(m.group(2)))
        if endpoint in out:
            raise YiLocalError(f"--rpc names the worker {endpoint} twice", hint="give each worker once")
        out.append(endpoint)
    if len(out) > MAX_WORKERS:
        raise YiLocalError(f"--rpc names {len(out)} workers; llama.cpp takes at most {MAX_WORKERS}")
    _distinct(out)
    return out


def _distinct(endpoints: list[Endpoint]) -> None:
    """YiLocalError when two names reach one worker: it serves one client, so the second connection
    would wait forever."""
    seen: dict[tuple, Endpoint] = {}
    for endpoint in endpoints:
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            continue  # probe says so, naming it
        for address in {info[4][:2] for info in infos}:
            same = seen.setdefault(address, endpoint)
            if same != endpoint:
                raise YiLocalError(f"--rpc names one worker twice: {same} and {endpoint} are the same address",
                                   hint="give each worker once")  # fmt: skip


def probe(endpoint: Endpoint, timeout: float = PROBE_SECONDS) -> WorkerInfo:
    """Connect, shake hands and ask for the devices' memory; WorkerError saying what is wrong."""
    hint = f"start it there with `yi-local worker --host 0.0.0.0 --port {endpoint.port}`, or check the address"
    deadline = time.monotonic() + timeout  # for the whole probe: a worker that drips bytes cannot stall it
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except (socket.gaierror, UnicodeError):
        raise WorkerError(endpoint, f"has an unknown host name {endpoint.host!r}", hint="check the address") from None
    except ConnectionRefusedError:
        raise WorkerError(endpoint, "refused the connection: no worker listens on that port", hint=hint) from None
    except TimeoutError:
        raise WorkerError(endpoint, f"did not accept a connection within {timeout:g} s",
                          hint="check the address and that no firewall is in the way") from None  # fmt: skip
    except OSError as e:
        raise WorkerError(endpoint, f"cannot be reached ({e.strerror or e})", hint=hint) from None
    try:
        with sock:
            try:
                hello = _call(sock, _CMD_HELLO, bytes(_CAPS_SIZE), 4 + _CAPS_SIZE, deadline)
            except TimeoutError:
                raise WorkerError(endpoint, "is busy serving another client (it serves one at a time)",
                                  hint="wait for that client to finish, or start another worker") from None  # fmt: skip
            major, minor, patch = hello[0], hello[1], hello[2]
            version = f"{major}.{minor}.{patch}"
            if major != PROTO_MAJOR or minor > PROTO_MINOR:
                raise WorkerError(endpoint, f"speaks RPC protocol {version}; this yi-local's llama.cpp speaks "
                                  f"{PROTO_MAJOR}.{PROTO_MINOR}.x",
                                  hint="run the same llama-cpp-python version (the same yi-local) on every machine")  # fmt: skip
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4, deadline))
            if count > MAX_DEVICES:  # llama.cpp would trust it, and allocate for each
                raise _ProtocolError(f"claims {count:,} devices")
            devices = []
            for i in range(count):
                free, total = struct.unpack("<QQ", _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16, deadline))
                if free > total or total > MAX_DEVICE_BYTES:
                    raise _ProtocolError(f"claims {free:,} bytes free of {total:,}")
                devices.append(Device(free, total))
    except TimeoutError:
        raise WorkerError(endpoint, f"stopped answering within {timeout:g} s") from None
    except (OSError, _ProtocolError) as e:
        raise WorkerError(endpoint, f"is not a llama.cpp RPC worker, or broke off ({e})", hint=hint) from None
    if not devices:
        raise WorkerError(endpoint, "offers no device")
    return WorkerInfo(endpoint, version, tuple(devices))


def probe_all(endpoints: list[Endpoint], timeout: float = PROBE_SECONDS) -> list[WorkerInfo]:
    """Every worker's answer, in order; the first WorkerError when one cannot be used."""
    return [probe(e, timeout) for e in endpoints]


class _ProtocolError(Exception):
    pass


def _call(sock: socket.socket, cmd: int, data: bytes, expect: int, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    sock.sendall(struct.pack("<BQ", cmd, len(data)) + data)
    (size,) = struct.unpack("<Q", _recv(sock, 8, deadline))
    if size != expect:
        raise _ProtocolError(f"answered {size} bytes where {expect} were expected")
    return _recv(sock, size, deadline)


def _recv(sock: socket.socket, n: int, deadline: float) -> bytes:
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise _ProtocolError("closed the connection")
        out += chunk
    return bytes(out)


# -- ggml's device and RPC functions, which llama-cpp-python does not bind -------------------------------
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL = 0, 1, 2, 3  # enum ggml_backend_dev_type


def ggml():
    """libggml (the device registry) with the functions used here declared; YiLocalError without llama-cpp-python."""
    try:
        from llama_cpp._ggml import libggml as lib
    except (ImportError, OSError):
        raise YiLocalError("llama-cpp-python is not installed", hint="run `make install`") from None
    if not getattr(lib, "_yi_declared", False):
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
        for f in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_char_p
        lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [ctypes.c_void_p], ctypes.c_int
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]  # fmt: skip
        lib.ggml_backend_dev_memory.restype = None
        lib.ggml_backend_dev_backend_reg.argtypes, lib.ggml_backend_dev_backend_reg.restype = [ctypes.c_void_p], ctypes.c_void_p
        lib.ggml_backend_reg_name.argtypes, lib.ggml_backend_reg_name.restype = [ctypes.c_void_p], ctypes.c_char_p
        lib.ggml_backend_reg_dev_count.argtypes, lib.ggml_backend_reg_dev_count.restype = [ctypes.c_void_p], ctypes.c_size_t
        lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        lib._yi_declared = True
    return lib


def rpc_library():
    """libggml-rpc, bundled by a llama-cpp-python built with -DGGML_RPC=ON; None when it is not."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml-rpc.*"))
    if not libs:
        return None
    lib = ctypes.CDLL(str(libs[0]), mode=ctypes.RTLD_GLOBAL)
    if not getattr(lib, "_yi_declared", False):
        lib.ggml_backend_rpc_add_server.argtypes, lib.ggml_backend_rpc_add_server.restype = [ctypes.c_char_p], ctypes.c_void_p
        lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]  # fmt: skip
        lib.ggml_backend_rpc_start_server.restype = None
        lib._yi_declared = True
    return lib


def require_rpc():
    lib = rpc_library()
    if lib is None:
        raise YiLocalError("this llama-cpp-python was built without the RPC backend",
                           hint="rebuild it with `make install` (it builds with -DGGML_RPC=ON), or "
                           "CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --force-reinstall --no-cache-dir llama-cpp-python")  # fmt: skip
    return lib


@dataclass(frozen=True)
class LocalDevice:
    pointer: int
    name: str  # "CUDA0", "Metal", "CPU"
    description: str
    kind: int  # DEVICE_*
    free: int
    total: int


def local_devices() -> list[LocalDevice]:
    """This machine's ggml devices (the RPC ones excluded)."""
    lib = ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        reg = lib.ggml_backend_dev_backend_reg(dev)
        if reg and (lib.ggml_backend_reg_name(reg) or b"") == b"RPC":
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(LocalDevice(dev, (lib.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
                               (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                               lib.ggml_backend_dev_type(dev), free.value, total.value))  # fmt: skip
    return out


def device_array(workers: list[WorkerInfo], with_local_gpus: bool):
    """The NULL-terminated device array for `llama_model_params.devices`: this machine's GPUs (when
    `with_local_gpus`), then each worker's devices. The caller keeps it alive as long as the model, and
    probed the workers first: llama.cpp aborts the process on one it cannot reach."""
    lib, g = require_rpc(), ggml()
    pointers = [d.pointer for d in local_devices() if with_local_gpus and d.kind in (DEVICE_GPU, DEVICE_IGPU)]
    for worker in workers:
        reg = lib.ggml_backend_rpc_add_server(worker.endpoint.llama.encode())
        pointers += [g.ggml_backend_reg_dev_get(reg, i) for i in range(g.ggml_backend_reg_dev_count(reg))]
    return (ctypes.c_void_p * (len(pointers) + 1))(*pointers, None)
