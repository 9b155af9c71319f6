"""`yi-local run`: the real command in a subprocess, its output compared with the library's."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend

FLAGS = ["--temperature", "0", "--max-tokens", "12", "--ctx", "512", "--threads", "2"]


@pytest.fixture(scope="module")
def backend(chat_gguf):
    return load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2))


def library_reply(backend, tokens) -> str:
    events = backend.generate(tokens, SamplingParams(max_tokens=12, temperature=0))
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_run_streams_the_reply(chat_gguf, backend):
    proc = run_cli("run", str(chat_gguf), "Hello, Yi!", *FLAGS, "--verbose-timings")
    assert proc.returncode == 0, proc.stderr
    tokens = backend.chat_tokens([{"role": "user", "content": "Hello, Yi!"}])
    assert proc.stdout == library_reply(backend, tokens) + "\n"
    assert f"prompt {len(tokens)} tok" in proc.stderr
    assert "Q8_0 · CPU · ctx 512" in proc.stderr


def test_run_honours_system(chat_gguf, backend):
    proc = run_cli("run", str(chat_gguf), "Hello, Yi!", "--system", "You answer in French.", *FLAGS, "--verbose-timings")
    assert proc.returncode == 0, proc.stderr
    tokens = backend.chat_tokens(
        [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello, Yi!"}]
    )
    assert proc.stdout == library_reply(backend, tokens) + "\n"
    assert f"prompt {len(tokens)} tok" in proc.stderr


def test_run_reads_stdin_and_raw(chat_gguf, backend):
    proc = run_cli("run", str(chat_gguf), "--raw", *FLAGS, input="The capital of France is")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == library_reply(backend, backend.tokenize("The capital of France is")) + "\n"


@pytest.mark.parametrize("make_bad, needle", [
    (lambda d: d / "missing.gguf", "no such model file"),
    (lambda d: (d / "notes.gguf").write_text("hello") and d / "notes.gguf", "is not a GGUF file"),
])  # fmt: skip
def test_run_bad_model_file(tmp_path, make_bad, needle):
    proc = run_cli("run", str(make_bad(tmp_path)), "hi")
    assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_run_prompt_too_long(chat_gguf):
    proc = run_cli("run", str(chat_gguf), "word " * 400, "--ctx", "256")
    assert proc.returncode == 1
    assert "but the context holds 256" in proc.stderr and "--ctx" in proc.stderr


def test_careless_invocations_get_one_line(chat_gguf, tmp_path):
    for argv, stdin, needle in [
        (["run", "", "hi"], None, "MODEL is empty"),
        (["run", str(chat_gguf)], "", "standard input was empty"),
        (["run", str(chat_gguf), "--precision", "full", "hi"], None, "is a GGUF"),
    ]:
        proc = run_cli(*argv, input=stdin)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
    proc = run_cli("run", str(chat_gguf), "-v", "hi", "--max-tokens", "2", "--ctx", "256")  # -v after the command
    assert proc.returncode == 0, proc.stderr
