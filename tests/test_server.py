"""`yi-local serve` with the official `openai` client, error bodies, concurrency and disconnects."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server_helpers import running_server
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend

NO_EOS = {"2": -100.0, "7": -100.0}  # keep the random model talking (both end a reply)


@pytest.fixture(scope="module")
def server(chat_gguf):
    with running_server(chat_gguf, "--ctx", "8192") as (base, proc):
        yield base, proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(chat_gguf):
    """The library itself, to compare the server's output with."""
    # as the server loads it: `--parallel auto` is 2 on the CPU
    return load_backend(str(chat_gguf), LoadOptions(n_ctx=8192, n_threads=2, n_parallel=2))


def library_reply(backend, tokens, **params):
    events = list(backend.generate(tokens, SamplingParams(**params)))
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello Yi, 你好！"}]


def test_binds_loopback_and_says_so(server):
    """The banner names the address, and the only listening socket is on 127.0.0.1 (so no other address
    of this machine reaches it), read from the kernel's socket table for the server's process."""
    import psutil

    base, proc = server
    port = int(base.rsplit(":", 1)[1])
    lines = iter(proc.stderr.readline, "")
    banner = next(line for line in lines if line.startswith("yi-local: serving"))  # llama.cpp may warn first
    assert banner.strip() == (
        f"yi-local: serving Yi-Tiny-chat (Q8_0, CPU, ctx 8192, KV f16, 2 parallel) at http://127.0.0.1:{port}/  (OpenAI API at /v1)"
    )
    listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    health = httpx.get(f"{base}/health").json()
    assert (health["status"], health["model_loaded"]) == ("ok", True) and "reason" not in health


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["Yi-Tiny-chat"]


def test_chat_non_streamed_matches_library_and_counts_usage(client, reference):
    resp = client.chat.completions.create(model="Yi-Tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                          logit_bias=NO_EOS)  # fmt: skip
    text, finish = library_reply(reference, reference.chat_tokens(MESSAGES), max_tokens=10, temperature=0,
                                 logit_bias={2: -100.0, 7: -100.0})  # fmt: skip
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(reference.chat_tokens(MESSAGES))
    assert resp.usage.completion_tokens == 10 == finish.usage.completion_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 10


def test_chat_streamed_equals_non_streamed(client):
    kwargs = dict(model="Yi-Tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0, logit_bias=NO_EOS)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_logit_bias_forcing_im_end_stops_cleanly(client):
    for stream in (False, True):
        resp = client.chat.completions.create(model="Yi-Tiny-chat", messages=MESSAGES, max_tokens=20,
                                              logit_bias={"7": 100}, stream=stream)  # fmt: skip
        if stream:
            chunks = [c for c in resp if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            content, reason = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert (content, reason) == ("", "stop")
        assert "<|im_end|>" not in content


def test_stop_string_does_not_leak(client):
    kwargs = dict(model="Yi-Tiny-chat", messages=MESSAGES, max_tokens=20, temperature=0, logit_bias=NO_EOS)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[4:7]
    resp = client.chat.completions.create(**kwargs, stop=[stop])
    assert resp.choices[0].message.content == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_completions(client, reference):
    resp = client.completions.create(model="Yi-Tiny-chat", prompt="The capital of France is", max_tokens=8,
                                     temperature=0, logit_bias=NO_EOS)  # fmt: skip
    text, _ = library_reply(reference, reference.tokenize("The capital of France is"), max_tokens=8, temperature=0,
                            logit_bias={2: -100.0, 7: -100.0})  # fmt: skip
    assert resp.object == "text_completion" and resp.choices[0].text == text
    assert resp.usage.prompt_tokens == len(reference.tokenize("The capital of France is"))
    streamed = client.completions.create(model="Yi-Tiny-chat", prompt="The capital of France is", max_tokens=8,
                                         temperature=0, logit_bias=NO_EOS, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == text


def assert_error(resp: httpx.Response, status: int, needle: str, code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and needle in err["message"]
    if code:
        assert err["code"] == code


@pytest.mark.parametrize(
    "body, status, needle, code",
    [
        (b"{not json", 400, "not valid JSON", None),
        (b"[1, 2]", 400, "valid dictionary", None),
        (json.dumps({"messages": []}).encode(), 400, "messages", None),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role", None),
        (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), 400, "temperature", None),
        (json.dumps({"messages": MESSAGES, "max_tokens": -5}).encode(), 400, "max_tokens", None),
        (json.dumps({"messages": MESSAGES, "logit_bias": {"x": 1}}).encode(), 400, "token ids", None),
        (json.dumps({"messages": MESSAGES, "n": 3}).encode(), 400, "n", None),
        (json.dumps({"messages": MESSAGES, "model": "gpt-4"}).encode(), 404, "'gpt-4' does not exist", "model_not_found"),
        (json.dumps({"messages": [{"role": "user", "content": "词 " * 9000}]}).encode(), 400, "context holds 8192",
         "context_length_exceeded"),
        (b"x" * (5 << 20), 413, "larger than", "request_too_large"),
    ],
)
def test_errors_are_openai_shaped_and_the_server_survives(server, body, status, needle, code):
    base, _ = server
    resp = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                      timeout=60)  # fmt: skip
    assert_error(resp, status, needle, code)
    ok = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_hostile_payloads_never_crash_it(server):
    base, proc = server
    payloads = [b"", b"null", b"\xff\xfe\x00", b'{"messages": null}', b'{"messages": [{"role": "user"}]}',
                b'{"messages": [{"role": "user", "content": {"a": 1}}]}', b'{"prompt": 5}',
                b'{"messages": "' + b"A" * 100000 + b'"}', b'{"stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                json.dumps({"messages": MESSAGES, "grammar": "root ::= ("}).encode(),
                json.dumps({"messages": MESSAGES, "stop": ["x"] * 100}).encode()]  # fmt: skip
    for path in ("/v1/chat/completions", "/v1/completions"):
        for payload in payloads:
            resp = httpx.post(f"{base}{path}", content=payload, timeout=60)
            assert 400 <= resp.status_code < 500, (payload[:40], resp.status_code, resp.text[:200])
            assert "error" in resp.json()
    assert proc.poll() is None
    assert httpx.get(f"{base}/health").status_code == 200


def test_api_key_required_when_set(chat_gguf):
    with running_server(chat_gguf, env={"YI_LOCAL_API_KEY": "s3cret"}) as (base, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES}, headers=headers)
            assert_error(resp, 401, "API key", "invalid_api_key")
        assert_error(httpx.get(f"{base}/v1/models"), 401, "API key")
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="Yi-Tiny-chat", messages=MESSAGES, max_tokens=2).choices
        assert httpx.get(f"{base}/health").status_code == 200  # health stays open for monitors


def test_disconnect_mid_stream_frees_the_server(server, client):
    base, _ = server
    body = {"messages": MESSAGES, "max_tokens": 8000, "logit_bias": NO_EOS, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data:")
            for _ in range(6):
                next(lines)
            assert http.get(f"{base}/health").json()["busy"] is True
    # The connection is closed: the 8000-token generation must stop at once.
    start = time.monotonic()
    while httpx.get(f"{base}/health").json()["busy"]:
        assert time.monotonic() - start < 1.0, "generation went on after the client left"
        time.sleep(0.02)
    resp = client.chat.completions.create(model="Yi-Tiny-chat", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_cors_only_for_the_origins_given(chat_gguf):
    with running_server(chat_gguf, "--cors-origin", "http://localhost:3000") as (base, _):
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": "http://evil.test", **preflight})
        assert "access-control-allow-origin" not in other.headers
    with running_server(chat_gguf) as (base, _):  # none by default
        resp = httpx.get(f"{base}/v1/models", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in resp.headers
