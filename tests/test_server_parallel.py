"""`yi-local serve --parallel N`: requests decoded together, the bounded queue, slots freed by
disconnects, prefix reuse per slot, and what /health and the banner report."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import run_cli
from tests.margins import clear_prefix
from tests.server_helpers import running_server
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend

NO_EOS = {"2": -100.0, "7": -100.0}
PROMPTS = ["Tell me about the sea", "写一首诗", "List three colours please", "What is two plus two?"]


@pytest.fixture(scope="module")
def server(chat_gguf):
    with running_server(chat_gguf, "--ctx", "1024", "--parallel", "4") as (base, proc):
        yield base, proc


@pytest.fixture(scope="module")
def reference(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=1024, n_threads=2, n_parallel=4))  # as the server
    yield b
    b.close()


def solo(reference, messages: list[dict], max_tokens: int) -> str:
    """The text every batched run must begin with: the solo reply up to its first near tie."""
    reference.reset()
    prompt = reference.chat_tokens(messages)
    events = list(reference.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                            logit_bias={2: -100.0, 7: -100.0})))  # fmt: skip
    ids = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    n = clear_prefix(reference, prompt, ids)
    return b"".join(reference.token_bytes(t) for t in ids[:n]).decode("utf-8", errors="ignore")


def ask(base: str, messages: list[dict], stream: bool, max_tokens: int = 20) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_EOS, "stream": stream}
    with httpx.Client(timeout=60) as http:
        if not stream:
            return http.post(f"{base}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        text = []
        with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
        return "".join(text)


@pytest.mark.parametrize("stream", [False, True])
def test_requests_sent_together_get_what_they_get_alone(server, reference, stream):
    base, _ = server
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    expected = [solo(reference, m, 20) for m in conversations]
    assert all(expected) and len(set(expected)) == 4
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(base, conversations[i], stream)))
               for i in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        assert results[i].startswith(expected[i]), (i, results[i], expected[i])


def test_health_reports_slots_and_the_queue(server):
    health = httpx.get(f"{server[0]}/health").json()
    assert health["slots"] == {"total": 4, "busy": 0, "idle": 4} and health["queued"] == 0 and health["busy"] is False


def test_banner_and_models_report_the_context_per_sequence(server):
    base, proc = server
    port = int(base.rsplit(":", 1)[1])
    banner = next(line for line in iter(proc.stderr.readline, "") if line.startswith("yi-local: serving"))
    assert banner.strip() == (f"yi-local: serving Yi-Tiny-chat (Q8_0, CPU, ctx 1024, KV f16, 4 parallel) at "
                              f"http://127.0.0.1:{port}/  (OpenAI API at /v1)")  # fmt: skip
    model = httpx.get(f"{base}/v1/models").json()["data"][0]
    assert model["context_length"] == 1024
    too_long = {"prompt": "word " * 1100, "max_tokens": 1}
    resp = httpx.post(f"{base}/v1/completions", json=too_long, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert "context holds 1024" in resp.json()["error"]["message"]


def test_prefix_reuse_per_slot_across_interleaved_conversations(server):
    """Two conversations taking turns: each turn's cached tokens cover that conversation's whole history.
    (Replies are held to plain letters: the random model's byte tokens would not survive as text.)"""
    base, _ = server
    conversations = {name: [{"role": "user", "content": f"{name}: {PROMPTS[i]}"}] for i, name in enumerate("ab")}
    history: dict[str, int] = {}
    with httpx.Client(timeout=60) as http:
        for turn in range(4):
            for name, messages in conversations.items():
                body = {"messages": messages, "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS,
                        "grammar": "root ::= [a-z ]+"}
                data = http.post(f"{base}/v1/chat/completions", json=body).json()
                usage = data["usage"]
                if turn:
                    assert usage["prompt_tokens_details"]["cached_tokens"] >= history[name], (name, turn, usage)
                # all of this turn but the reply's last token, which is sampled and never evaluated
                history[name] = usage["prompt_tokens"] + usage["completion_tokens"] - 1
                messages += [data["choices"][0]["message"], {"role": "user", "content": f"and {turn}?"}]


def _first_content(lines) -> float:
    """When the first text arrived, read from `lines` (an iter_lines() the caller keeps: httpx closes the
    response when that generator is dropped, which the server would take for a client leaving)."""
    for line in lines:
        if line.startswith("data: {") and '"text": ""' not in line and '"content": ""' not in line:
            return time.monotonic()
    raise AssertionError("the stream ended without content")


def test_a_full_queue_answers_503_and_a_disconnect_lets_the_next_one_in(chat_gguf):
    """--parallel 2 --queue 1: two streams run, a third waits, a fourth is refused; when a client leaves,
    the waiting one starts at once."""
    long_body = {"prompt": "Once upon a time", "max_tokens": 4000, "logit_bias": NO_EOS, "stream": True}
    with running_server(chat_gguf, "--ctx", "4096", "--parallel", "2", "--queue", "1") as (base, _):
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, httpx.Client(timeout=60) as c:
            with a.stream("POST", f"{base}/v1/completions", json=long_body) as first, \
                 b.stream("POST", f"{base}/v1/completions", json=long_body) as second:  # fmt: skip
                first_lines, second_lines = first.iter_lines(), second.iter_lines()
                _first_content(first_lines)
                _first_content(second_lines)
                assert httpx.get(f"{base}/health").json()["slots"] == {"total": 2, "busy": 2, "idle": 0}
                waiting: dict[str, float] = {}

                def third() -> None:
                    with c.stream("POST", f"{base}/v1/completions", json={**long_body, "max_tokens": 50}) as r:
                        lines = r.iter_lines()
                        waiting["first_token"] = _first_content(lines)
                        for _ in lines:
                            pass

                t = threading.Thread(target=third)
                t.start()
                deadline = time.monotonic() + 10
                while httpx.get(f"{base}/health").json()["queued"] != 1:
                    assert time.monotonic() < deadline, "the third request never queued"
                    time.sleep(0.01)
                refused = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert error["code"] == "server_busy" and error["type"] == "server_error" and "retry" in error["message"]
                assert "first_token" not in waiting  # it waits
                left = time.monotonic()
            # both long streams are closed here: their slots free before the next step, and the third starts
            t.join(30)
            assert waiting["first_token"] - left < 2.0
            deadline = time.monotonic() + 5
            while httpx.get(f"{base}/health").json()["slots"]["busy"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)


@pytest.mark.parametrize("value, needle", [("0", "must be"), ("257", "must be"), ("x", "expected"), ("2.5", "expected")])
def test_bad_parallel_is_refused_clearly(chat_gguf, value, needle):
    r = run_cli("serve", str(chat_gguf), "--parallel", value, "--port", "0")
    assert r.returncode == 1 and needle in r.stderr and "--parallel" in r.stderr and "Traceback" not in r.stderr


def test_parallel_beyond_the_batch_is_refused(chat_gguf):
    r = run_cli("serve", str(chat_gguf), "--parallel", "8", "--batch", "4", "--port", "0")
    assert r.returncode == 1 and "batch" in r.stderr and "Traceback" not in r.stderr


def test_queue_flag_is_checked(chat_gguf):
    r = run_cli("serve", str(chat_gguf), "--queue", "-1", "--port", "0")
    assert r.returncode == 1 and "--queue" in r.stderr and "Traceback" not in r.stderr
