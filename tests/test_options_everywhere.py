"""Every documented sampling and runtime option, with a non-default value, through `run`, `chat` and `serve`.

Each sampling option is chosen so that it changes the library's reply (checked here), and each front
end must give exactly the library's reply with it: a front end that dropped the option, or passed it
wrongly, would give another text. `--repeat-penalty` crashed every front end before.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.conftest import run_cli
from tests.server_helpers import running_server
from yi_local.cli import parse
from yi_local.commands.options import load_options, sampling_params
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend

PROMPT = "Tell me about the sea, Yi. 你好"
MESSAGES = [{"role": "user", "content": PROMPT}]
BASE = {"max_tokens": 16, "temperature": 0}
SAMPLED = {"temperature": 1.3, "seed": 7}

# (flags, API fields, library parameters) for each option; the option under test is the last one.
OPTIONS = {
    "temperature+seed": (SAMPLED, {}),
    "seed": ({"temperature": 1.3, "seed": 8}, {}),
    "top_k": (SAMPLED, {"top_k": 3}),
    "top_p": (SAMPLED, {"top_p": 0.5}),
    "min_p": (SAMPLED, {"min_p": 0.9}),
    "repeat_penalty": ({}, {"repeat_penalty": 1.5}),
    "repeat_last_n": ({"repeat_penalty": 1.5}, {"repeat_last_n": 4}),
    "frequency_penalty": ({}, {"frequency_penalty": 1.0}),
    "presence_penalty": ({}, {"presence_penalty": 1.0}),
    "max_tokens": ({}, {"max_tokens": 5}),
}


def flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def library(chat_gguf):
    backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2))

    def reply(params: dict, messages=MESSAGES) -> str:
        backend.reset()
        events = backend.generate(backend.chat_tokens(messages), SamplingParams(**params))
        return "".join(e.text for e in events if isinstance(e, TextDelta))

    return reply


def cases():
    for name, (context, option) in OPTIONS.items():
        yield pytest.param({**BASE, **context}, option, id=name)


@pytest.mark.parametrize(("context", "option"), list(cases()))
def test_the_option_changes_the_reply(library, context, option):
    """Guards the tests below: with an option that changes nothing, they could not fail."""
    if option:
        assert library({**context, **option}) != library(context)
    else:
        assert library(context) != library(BASE)


@pytest.mark.parametrize(("context", "option"), list(cases()))
def test_run(chat_gguf, library, context, option):
    values = {**context, **option}
    proc = run_cli("run", str(chat_gguf), *flags(values), PROMPT, "--ctx", "512", "--threads", "2", text=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == library(values) + "\n"  # bytes: the reply may hold a "\r"


def test_run_stop_system_raw_and_runtime_flags(chat_gguf, library):
    full = library(BASE)
    stop = full[2:4]
    proc = run_cli("run", str(chat_gguf), PROMPT, "--stop", stop, *flags(BASE), "--batch", "1", "--threads", "1",
                   "--n-gpu-layers", "0", "--ctx", "256")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == full[: full.index(stop)] + "\n"
    assert "CPU · ctx 256" in proc.stderr
    system = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    proc = run_cli("run", str(chat_gguf), "--system", "Be brief.", *flags(BASE), PROMPT)
    assert proc.returncode == 0 and proc.stdout == library(BASE, system) + "\n"


@pytest.fixture(scope="module")
def server(chat_gguf):
    with running_server(chat_gguf, "--ctx", "512") as (base, proc):
        yield base


@pytest.mark.parametrize(("context", "option"), list(cases()))
def test_serve_fields(server, library, context, option):
    values = {**context, **option}
    resp = httpx.post(f"{server}/v1/chat/completions", json={"messages": MESSAGES, **values}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == library(values)


@pytest.mark.parametrize(("context", "option"), list(cases()))
def test_serve_flags_are_the_defaults_for_requests(chat_gguf, library, context, option):
    """The sampling flags `serve` was started with apply to requests that leave the field out."""
    values = {**context, **option}
    with running_server(chat_gguf, "--ctx", "512", *flags(values)) as (base, _):
        resp = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == library(values)


@pytest.mark.parametrize(("context", "option"), list(cases()))
async def test_chat(chat_gguf, library, context, option):
    """The chat, started from the same command-line flags `yi-local chat` parses."""
    from tests.test_tui import SIZE, ready, type_and_send, wait_until
    from yi_local.commands.chat import build_app

    values = {**context, **option}
    args = parse(["chat", str(chat_gguf), *flags(values), "--ctx", "512", "--threads", "2"])
    app = build_app(args, str(chat_gguf), "llama.cpp")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, PROMPT)
        await wait_until(pilot, lambda: not app.generating and len(app.session.messages) == 2)
        assert app.session.messages[1]["content"] == library(values)
    await asyncio.sleep(0)
    assert load_options(args).n_ctx == 512 and sampling_params(args).repeat_last_n == values.get("repeat_last_n", 64)


def test_out_of_range_flags_are_refused_before_llama_cpp(chat_gguf):
    for flag, value, needle in [("--ctx", "8", "too small"), ("--ctx", "99999999999", "at most 16777216"),
                                ("--batch", "-1", "at least 1"), ("--threads", "100000", "at most 512"),
                                ("--temperature", "nan", "at most 2"), ("--top-p", "0", "above 0"),
                                ("--repeat-penalty", "0", "above 0"), ("--max-tokens", "0", "at least 1"),
                                ("--frequency-penalty", "-3", "at least -2"), ("--n-gpu-layers", "-5", "-1 is all")]:  # fmt: skip
        for command in ("run", "serve", "chat"):
            proc = run_cli(command, str(chat_gguf), flag, value, "hi" if command == "run" else "--port=0"
                           if command == "serve" else "--system=x")  # fmt: skip
            assert proc.returncode == 1, (command, flag, proc.stderr)
            assert needle in proc.stderr and "Traceback" not in proc.stderr and flag in proc.stderr
    proc = run_cli("run", str(chat_gguf), "--stop", "x" * 600, "hi")
    assert proc.returncode == 1 and "stop" in proc.stderr and "Traceback" not in proc.stderr


def test_arguments_in_any_order(chat_gguf, library):
    expected = library({**BASE, "max_tokens": 8}) + "\n"
    for argv in (["run", str(chat_gguf), "--temperature", "0", "--max-tokens", "8", PROMPT],
                 ["run", "--temperature", "0", str(chat_gguf), PROMPT, "--max-tokens", "8"],
                 ["-v", "run", str(chat_gguf), PROMPT, "--temperature=0", "--max-tokens=8"]):  # fmt: skip
        proc = run_cli(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert proc.stdout == expected
    assert json.dumps(vars(parse(["run", "m", "--top-k", "3", "p"]))["top_k"]) == "3"
