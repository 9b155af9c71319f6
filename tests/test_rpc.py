"""Several machines through llama.cpp's RPC backend, on loopback: two `yi-local worker` processes.

The model split across the workers decodes the same greedy tokens as a local run, with llama.cpp's own
report of the layers on each worker; a worker killed mid-request fails that request with its name and
never the user's process (run exits 1, serve answers an error and then, with the worker back, the
right reply); addresses that cannot work are clear errors before anything loads."""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import psutil
import pytest

from tests.conftest import REPO, run_cli
from tests.server_helpers import free_port, running_server
from yi_local import rpc
from yi_local.errors import YiLocalError
from yi_local.runtime import Finish, LoadOptions, SamplingParams, load_backend

GREEDY = SamplingParams(temperature=0, max_tokens=16)


def start_worker(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "yi_local", "worker", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited: {proc.stderr.read()}")
        try:
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=1)
            return proc
        except rpc.WorkerError:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@contextmanager
def workers(n: int = 2):
    ports = [free_port() for _ in range(n)]
    procs = [start_worker(p) for p in ports]
    try:
        yield ports, procs
    finally:
        for proc in procs:
            stop(proc)


def greedy_ids(backend, text: str) -> list[int]:
    ids: list[int] = []
    for event in backend.generate(backend.chat_tokens([{"role": "user", "content": text}]), GREEDY):
        if not isinstance(event, Finish):
            ids += event.token_ids
    return ids


def test_two_workers_decode_the_local_run_token_for_token(chat_gguf):
    local = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2))
    expected = [greedy_ids(local, text) for text in ("Hello Yi", "Tell me about the sea, 你好")]
    local.close()
    with workers(2) as (ports, _):
        backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2,
                                                           rpc=tuple(f"127.0.0.1:{p}" for p in ports)))  # fmt: skip
        try:
            # llama.cpp's own report of where each layer went: some on each worker
            split = dict(re.findall(r"(\S+) (\d+)(?:,| of)", backend.info.offload))
            on_workers = {d: int(n) for d, n in split.items() if d.startswith("RPC")}
            assert len(on_workers) == 2 and all(n > 0 for n in on_workers.values()), backend.info.offload
            assert all(f"127.0.0.1:{p}" in backend.info.offload for p in ports)
            got = [greedy_ids(backend, text) for text in ("Hello Yi", "Tell me about the sea, 你好")]
        finally:
            backend.close()
    assert got == expected and all(expected)


def test_a_worker_lost_mid_request_fails_that_request_by_name_and_the_next_one_works(chat_gguf):
    with workers(2) as (ports, procs):
        backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2,
                                                           rpc=tuple(f"127.0.0.1:{p}" for p in ports)))  # fmt: skip
        try:
            before = greedy_ids(backend, "Hello Yi")
            stop(procs[1])
            with pytest.raises(YiLocalError, match=rf"the worker 127\.0\.0\.1:{ports[1]} refused the connection"):
                greedy_ids(backend, "Hello Yi")
            with pytest.raises(YiLocalError, match=rf"127\.0\.0\.1:{ports[1]}"):  # still gone: named again
                greedy_ids(backend, "Hello Yi")
            procs[1] = start_worker(ports[1])
            assert greedy_ids(backend, "Hello Yi") == before  # a fresh engine, the same answer
        finally:
            backend.close()


def test_run_exits_1_naming_the_worker_that_died(chat_gguf):
    with workers(2) as (ports, procs):
        proc = subprocess.Popen([sys.executable, "-m", "yi_local", "run", str(chat_gguf), "--rpc",
                                 ",".join(f"127.0.0.1:{p}" for p in ports), "--raw", "--max-tokens", "100000",
                                 "--threads", "1", "Once upon a time " * 100],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
        banner = proc.stderr.readline()  # printed once the model has loaded, before the first token
        assert banner.startswith("yi-local: Yi-Tiny-chat"), banner
        stop(procs[0])
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert f"the worker 127.0.0.1:{ports[0]}" in err and "Traceback" not in err, err


def test_serve_answers_an_error_for_the_lost_worker_stays_up_and_recovers(chat_gguf):
    body = {"messages": [{"role": "user", "content": "Hello Yi"}], "max_tokens": 12, "temperature": 0}
    with workers(2) as (ports, procs):
        rpc_arg = ",".join(f"127.0.0.1:{p}" for p in ports)
        with running_server(chat_gguf, "--rpc", rpc_arg, "--parallel", "1") as (base, server):
            first = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            assert first.status_code == 200
            stop(procs[0])
            lost = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            assert lost.status_code >= 500 and f"127.0.0.1:{ports[0]}" in lost.json()["error"]["message"], lost.text
            health = httpx.get(f"{base}/health", timeout=10)
            assert health.status_code == 200 and server.poll() is None  # monitors still reach it
            assert health.json()["status"] == "degraded" and health.json()["model_loaded"] is False
            assert f"127.0.0.1:{ports[0]}" in health.json()["reason"], health.text
            procs[0] = start_worker(ports[0])
            again = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            assert again.status_code == 200
            assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
            assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
            # The model's process killed while idle: /health says so before any request finds out.
            child = next(c for c in psutil.Process(server.pid).children() if "engine_child" in " ".join(c.cmdline()))
            child.kill()  # the server reaps it (/health's own check does)
            deadline = time.monotonic() + 10
            while (health := httpx.get(f"{base}/health", timeout=10).json())["model_loaded"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (health["status"], health["model_loaded"]) == ("degraded", False), health
            assert "exit code -9" in health["reason"], health
            # The next request (one with a grammar, which the child checks before it starts) gets a fresh child.
            yes_no = httpx.post(f"{base}/v1/chat/completions", json={**body, "grammar": 'root ::= "yes" | "no"'},
                                timeout=60)  # fmt: skip
            assert yes_no.status_code == 200, yes_no.text
            assert yes_no.json()["choices"][0]["message"]["content"] in ("yes", "no")
            assert httpx.get(f"{base}/health", timeout=10).json()["model_loaded"] is True


@contextmanager
def fake_worker(answer):
    """A TCP server that speaks as much of the protocol as a test needs: `answer(conn)` per connection."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop_ = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop_.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    answer(conn)
                except OSError:
                    pass  # the client gave up first

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop_.set()
        thread.join()
        server.close()


def _hello_with_version(major: int):
    def answer(conn: socket.socket) -> None:
        conn.recv(1 + 8 + 24)
        conn.sendall(struct.pack("<Q", 28) + bytes([major, 0, 0, 0]) + bytes(24))
        time.sleep(0.2)

    return answer


def _many_devices(conn: socket.socket) -> None:
    conn.recv(1 + 8 + 24)
    conn.sendall(struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24))
    conn.recv(9)
    conn.sendall(struct.pack("<QI", 4, 2**32 - 1))  # llama.cpp would trust this, and allocate for each
    time.sleep(0.2)


def _drip(conn: socket.socket) -> None:
    conn.recv(1 + 8 + 24)
    for byte in struct.pack("<Q", 28):  # a byte every second: each read is quick, the whole never ends
        conn.sendall(bytes([byte]))
        time.sleep(1.0)


def _silent(conn: socket.socket) -> None:
    time.sleep(rpc.PROBE_SECONDS + 1)  # busy with another client: no HELLO answer


@pytest.mark.parametrize("case", ["unknown host", "bad host name", "closed port", "other version", "busy",
                                  "not a worker", "4 billion devices", "drip"])  # fmt: skip
def test_addresses_that_cannot_work_are_clear_errors_before_anything_loads(chat_gguf, case):
    closed = free_port()
    answers = {"other version": _hello_with_version(6), "busy": _silent, "4 billion devices": _many_devices,
               "drip": _drip, "not a worker": lambda c: c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")}  # fmt: skip
    expected = {
        "unknown host": "has an unknown host name 'no-such-host.invalid'",
        "closed port": f"the worker 127.0.0.1:{closed} refused the connection",
        "other version": "speaks RPC protocol 6.0.0; this yi-local's llama.cpp speaks 7.0.x",
        "busy": "is busy serving another client",
        "not a worker": "is not a llama.cpp RPC worker",
        "bad host name": "has an unknown host name 'a..b'",
        "4 billion devices": "claims 4,294,967,295 devices",
        "drip": "is busy serving another client",  # its HELLO answer never completes within the probe's time
    }[case]
    if case in answers:
        with fake_worker(answers[case]) as port:
            result = run_cli("run", str(chat_gguf), "--rpc", f"127.0.0.1:{port}", "hi")
    else:
        address = {"unknown host": "no-such-host.invalid:50052", "bad host name": "a..b:50052"}.get(case, f"127.0.0.1:{closed}")
        started = time.monotonic()
        result = run_cli("run", str(chat_gguf), "--rpc", address, "hi")
        assert time.monotonic() - started < 30
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "GGML" not in result.stderr
    assert "yi-local: Yi-Tiny-chat" not in result.stderr  # nothing loaded


def test_a_worker_that_cannot_listen_and_bad_rpc_flags_are_clear_errors():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("worker", "--port", str(port))
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for bad, said in (("localhost", "'localhost' is not HOST:PORT"), ("h:70000", "'h:70000' is not HOST:PORT"),
                      ("127.0.0.1:1,127.0.0.1:1", "names the worker 127.0.0.1:1 twice"),
        ("localhost:1,127.0.0.1:1", "names one worker twice: localhost:1 and 127.0.0.1:1 are the same address")):  # fmt: skip
        result = run_cli("run", "model.gguf", "--rpc", bad, "hi")
        assert result.returncode == 1 and said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_rpc_build_on_a_cpu_only_machine_still_says_cpu(chat_gguf):
    from yi_local import hardware

    assert rpc.rpc_library() is not None
    if any(d.kind in (rpc.DEVICE_GPU, rpc.DEVICE_IGPU) for d in rpc.local_devices()):
        pytest.skip("this machine has a GPU")
    assert hardware.llama_gpu_kind() is None
    backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=2))
    assert backend.info.offload == "CPU"
    backend.close()


def test_a_worker_stops_on_ctrl_c(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "yi_local", "worker", "--port", str(port), "--cache",
                             str(tmp_path / "cache")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)  # fmt: skip
    banner = proc.stderr.readline()
    assert f"at 127.0.0.1:{port}, RPC protocol 7.0" in banner and "free of" in banner, banner
    assert (tmp_path / "cache").is_dir()
    start_deadline = time.monotonic() + 30
    while True:
        try:
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=1)
            break
        except rpc.WorkerError:
            assert time.monotonic() < start_deadline
            time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr.read()


# -- every front end with --rpc ------------------------------------------------------------------
def test_doctor_pools_the_workers_memory_and_says_busy_without_waiting():
    with workers(1) as (ports, _), fake_worker(_silent) as busy:
        closed = free_port()
        start = time.monotonic()
        result = run_cli("doctor", "--memory", "4", "--rpc", f"127.0.0.1:{ports[0]},127.0.0.1:{busy},127.0.0.1:{closed}")
        took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(rf"worker +127\.0\.0\.1:{ports[0]}: [\d.]+ GiB free of [\d.]+ GiB, RPC 7\.0\.0", out), out
    assert re.search(rf"worker +127\.0\.0\.1:{busy}: busy \(is busy serving another client", out), out
    assert re.search(rf"worker +127\.0\.0\.1:{closed}: unusable \(refused the connection", out), out
    assert re.search(r"fits in 4 GiB \(--memory\) \+ [\d.]+ GiB on 1 worker", out), out
    assert f"--rpc 127.0.0.1:{ports[0]}`" in out  # the recommended command uses the answering worker
    assert took < 30  # the busy worker is reported after a short wait, not waited for


def test_bench_measures_both_sides_through_the_workers(chat_gguf):
    with workers(2) as (ports, _):
        rpc_arg = ",".join(f"127.0.0.1:{p}" for p in ports)
        result = run_cli("bench", str(chat_gguf), "--rpc", rpc_arg, "-p", "8", "-n", "4", "--ctx", "64", "--threads", "1",
                         "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    assert data["setup"]["rpc"] == [f"127.0.0.1:{p}" for p in ports] and data["setup"]["offload"].startswith("RPC")
    level = data["levels"][0]
    assert level["yi_local"]["generated_tokens"] == level["bare"]["generated_tokens"] == 3


async def test_chat_runs_on_the_workers(chat_gguf):
    from tests.test_tui import ready, wait_until
    from yi_local.cli import parse
    from yi_local.commands.chat import build_app

    with workers(2) as (ports, _):
        rpc_arg = ",".join(f"127.0.0.1:{p}" for p in ports)
        args = parse(["chat", str(chat_gguf), "--rpc", rpc_arg, "--ctx", "256", "--threads", "2", "--temperature", "0",
                      "--max-tokens", "6"])  # fmt: skip
        app = build_app(args, str(chat_gguf), "llama.cpp")
        async with app.run_test(size=(80, 24)) as pilot:
            await ready(pilot)
            assert app.load_error is None and app.backend.info.offload.startswith("RPC0[127.0.0.1:")
            app.send("Hello Yi")
            await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2, timeout=60)
            reply = app.session.messages[1]["content"]
            app.backend.close()
    local = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=2))
    events = local.generate(local.chat_tokens([{"role": "user", "content": "Hello Yi"}]),
                            SamplingParams(temperature=0, max_tokens=6))  # fmt: skip
    assert reply == "".join(getattr(e, "text", "") for e in events)
    local.close()


def test_grammars_and_saved_states_work_through_the_child(chat_gguf, tmp_path):
    from yi_local.runtime.kv_state import load_state, save_state

    with workers(1) as (ports, _):
        options = LoadOptions(n_ctx=256, n_threads=2, rpc=(f"127.0.0.1:{ports[0]}",))
        backend = load_backend(str(chat_gguf), options)
        try:
            backend.check_sampling(SamplingParams(grammar='root ::= "yes" | "no"'), parse_grammar=True)
            with pytest.raises(YiLocalError):  # llama.cpp's own parse, in the child, refuses this one
                backend.check_sampling(SamplingParams(grammar="root ::= root"), parse_grammar=True)
            params = SamplingParams(temperature=0, max_tokens=8, grammar='root ::= "yes" | "no"')
            text = "".join(getattr(e, "text", "") for e in backend.generate(backend.text_tokens("Answer:"), params))
            assert text in ("yes", "no")
            prompt = backend.text_tokens("A document about the sea. " * 4)
            list(backend.generate(prompt, SamplingParams(temperature=0, max_tokens=2)))
            save_state(backend, tmp_path / "doc.kv", keep=len(prompt))
        finally:
            backend.close()
        again = load_backend(str(chat_gguf), options)
        try:
            assert load_state(again, tmp_path / "doc.kv").tokens == prompt
        finally:
            again.close()


def test_rpc_with_the_transformers_backend_is_refused(chat_dir):
    result = run_cli("run", str(chat_dir), "--precision", "full", "--rpc", "127.0.0.1:50052", "hi")
    assert result.returncode == 1 and "--rpc spreads a GGUF over llama.cpp workers" in result.stderr


def test_the_model_process_outlives_the_thread_that_started_it_and_not_its_process(chat_gguf, tmp_path):
    """The chat loads in a worker thread that then ends; the model's process must stay. When the process
    that started it is killed, it must go (no orphan holding the workers)."""
    with workers(1) as (ports, _):
        options = LoadOptions(n_ctx=256, n_threads=2, rpc=(f"127.0.0.1:{ports[0]}",))
        loaded: dict = {}
        thread = threading.Thread(target=lambda: loaded.update(backend=load_backend(str(chat_gguf), options)))
        thread.start()
        thread.join()
        backend = loaded["backend"]
        try:
            time.sleep(0.5)
            assert greedy_ids(backend, "Hello Yi")
        finally:
            backend.close()

        script = tmp_path / "parent.py"
        script.write_text(
            "import sys, time\n"
            "from yi_local.runtime import LoadOptions, load_backend\n"
            f"b = load_backend({str(chat_gguf)!r}, LoadOptions(n_ctx=256, rpc=('127.0.0.1:{ports[0]}',)))\n"
            "print(b._proc.pid, flush=True)\n"
            "time.sleep(60)\n"
        )  # fmt: skip
        parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the model's process outlived the one that started it"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
