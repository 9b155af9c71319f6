"""KV cache types (`--kv-type`) and flash attention (`--flash-attn`) on the tiny model, through the real
llama.cpp: the logits each cache type gives, the cache size llama.cpp reports, `--ctx 0` cut to what fits,
the flags through run, chat, serve and bench, and the combinations refused before anything loads.

Sizes are written by hand from the tiny model's shape (tests/synthetic.py TINY): 2 layers, 2 KV heads of
64 values (hidden 256 / 4 heads), so K and V hold 2 x 64 = 128 values a layer each. A token of context
takes 2 (K, V) x 2 layers x 128 values x 2 bytes = 1024 bytes at f16 and bf16; q8_0 stores 32 values in
34 bytes: 2 x 2 x (128 / 32 x 34) = 544 bytes; q4_0 in 18: 2 x 2 x (4 x 18) = 288 bytes.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import CORPUS, REPO, run_cli
from tests.margins import assert_same_under_margin
from tests.server_helpers import free_port, running_server
from tests.synthetic import TINY
from yi_local.fit import HEADROOM, OVERHEAD_BYTES
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend
from yi_local.runtime.engine import Chunk

KV_TYPES = ("f16", "bf16", "q8_0", "q4_0")
PER_TOKEN = {"f16": 1024, "bf16": 1024, "q8_0": 544, "q4_0": 288}  # bytes of K and V a token, by hand
N_CTX = 1024
MIB = 1 << 20

# How far each cache type moves the logits from the f16 cache's, at most (the tiny model's logits are of
# size ~1: at most 1.2, standard deviation 0.32). Measured over 210 prompts of 4-511 tokens of the corpus
# with flash attention auto (on, here): bf16 0.022, q8_0 0.024, q4_0 0.142, and f16 with flash attention
# off 0.017; the tolerances are about twice that. f16 is the reference itself: the same numbers exactly.
TOLERANCE = {"f16": 0.0, "bf16": 0.05, "q8_0": 0.05, "q4_0": 0.3}
FLASH_OFF_TOLERANCE = 0.05

GREEDY = dict(temperature=0.0)
NO_END = {2: -100.0, 7: -100.0}  # keep the random model talking: <|endoftext|> and <|im_end|> both end a reply
IMPOSSIBLE = "a q4_0 KV cache needs flash attention, but it is off"


def same_as_reported(kv_bytes: int, expected: int) -> bool:
    """llama.cpp reports the cache's size in MiB with two decimals ("0.53 MiB"): `expected` bytes, written
    the same way, are what it said."""
    return f"{kv_bytes / MIB:.2f}" == f"{expected / MIB:.2f}"


def test_the_tiny_models_shape_is_what_the_sizes_assume():
    assert (TINY.layers, TINY.kv_heads, TINY.hidden // TINY.heads) == (2, 2, 64)


@pytest.fixture(scope="module")
def backends(chat_gguf):
    """One backend per KV type, flash attention auto, and f16 with flash attention off."""
    loaded = {kv: load_backend(str(chat_gguf), LoadOptions(n_ctx=N_CTX, n_threads=2, kv_type=kv)) for kv in KV_TYPES}
    loaded["f16-off"] = load_backend(str(chat_gguf), LoadOptions(n_ctx=N_CTX, n_threads=2, flash_attn="off"))
    yield loaded
    for backend in loaded.values():
        backend.close()


@pytest.fixture(scope="module")
def prompts(backends) -> list[list[int]]:
    """A short chat prompt and 230 tokens of the corpus."""
    b = backends["f16"]
    return [b.chat_tokens([{"role": "user", "content": "Hello Yi, 你好! Tell me about the sea."}]),
            b.tokenize(CORPUS.read_text(encoding="utf-8")[:600])]  # fmt: skip


def last_logits(backend, prompt: list[int]) -> np.ndarray:
    """The logits after `prompt`, decoded in one batch into an empty cache (left empty afterwards)."""
    backend._slot_truncate(0, 0)
    backend._decode([Chunk(0, prompt, 0, True)])
    logits = np.ctypeslib.as_array(backend._L.llama_get_logits_ith(backend._ctx, -1), shape=(backend.n_vocab,))
    out = logits.copy()
    backend._slot_truncate(0, 0)
    return out


@pytest.fixture(scope="module")
def differences(backends, prompts) -> dict[str, list[float]]:
    """For each backend, the largest difference from the f16 cache's logits, one per prompt."""
    reference = [last_logits(backends["f16"], p) for p in prompts]
    return {name: [float(np.abs(last_logits(b, p) - ref).max()) for p, ref in zip(prompts, reference)]
            for name, b in backends.items()}  # fmt: skip


@pytest.mark.parametrize("kv", KV_TYPES)
def test_logits_are_close_to_the_f16_caches(differences, kv):
    assert max(differences[kv]) <= TOLERANCE[kv], differences[kv]


def test_each_type_reaches_llama_cpp(differences):
    """A type that never reached llama.cpp would give f16's logits exactly; the coarser cache, the farther."""
    assert differences["f16"] == [0.0, 0.0]  # the same cache gives the same numbers
    for i in range(2):
        assert differences["bf16"][i] > 0 and 0 < differences["q8_0"][i] < differences["q4_0"][i], differences


def test_flash_attention_off_is_close_and_different(differences, backends):
    assert backends["f16-off"].info.flash_attn == "off" and backends["f16-off"].info.kv_type == "f16"
    assert 0 < max(differences["f16-off"]) <= FLASH_OFF_TOLERANCE, differences["f16-off"]


@pytest.mark.parametrize("kv", KV_TYPES)
def test_info_reports_the_type_and_llama_cpps_size(backends, kv):
    info = backends[kv].info
    assert info.kv_type == kv and info.n_ctx == N_CTX
    expected = N_CTX * PER_TOKEN[kv]  # f16 1 MiB, q8_0 0.53 MiB, q4_0 0.28 MiB
    assert same_as_reported(info.kv_bytes, expected), (info.kv_bytes, expected)
    if kv in ("q8_0", "q4_0"):
        assert info.flash_attn == "on"  # llama.cpp reads a quantized V cache only inside flash attention
    assert info.notes == ()


def test_greedy_generation_with_q8_0_follows_f16(backends, prompts):
    """Up to the first near tie (tests/margins.py): q8_0 moves logits by at most 0.024 (measured), so a
    top-two margin above MARGIN (0.05) keeps its order."""
    prompt = prompts[0]
    params = SamplingParams(max_tokens=12, logit_bias=NO_END, **GREEDY)

    def generate(backend):
        events = list(backend.generate(prompt, params))
        return "".join(e.text for e in events if isinstance(e, TextDelta)), [
            t for e in events if isinstance(e, TextDelta) for t in e.token_ids
        ]

    text, ids = generate(backends["q8_0"])
    _, f16_ids = generate(backends["f16"])
    assert len(ids) == 12 and text.strip()
    assert_same_under_margin(backends["f16"], prompt, f16_ids, ids)


# -- --ctx 0: the model's own context, or what fits ----------------------------------------------------
def budget_for_room(chat_gguf, room: int) -> int:
    """The free memory that leaves `room` bytes for the KV cache beside the tiny model's weights
    (doctor's rule: 90% of what is free, less 300 MiB of buffers)."""
    return math.ceil((OVERHEAD_BYTES + os.path.getsize(chat_gguf) + room) / HEADROOM)


def test_ctx_0_takes_the_largest_context_that_fits(chat_gguf):
    """2.5 MiB of room: the model's own 4096 tokens need 4 MiB at f16; 2.5 MiB / 1024 bytes = 2560 tokens,
    down to a multiple of 1024: 2048. q8_0 needs 4096 x 544 bytes = 2.1 MiB: the whole context."""
    budget = budget_for_room(chat_gguf, 5 * MIB // 2)
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=0, n_threads=2, memory_budget=budget))
    try:
        info = b.info
        assert (info.n_ctx, info.n_ctx_train) == (2048, 4096)
        assert same_as_reported(info.kv_bytes, 2048 * 1024)
        assert len(info.notes) == 1
        note = info.notes[0]
        assert note.startswith("--ctx 0: the model's own context of 4,096 tokens needs 4.0 MiB of f16 KV cache")
        assert "using 2,048 tokens" in note
    finally:
        b.close()
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=0, n_threads=2, kv_type="q8_0", memory_budget=budget))
    try:
        assert (b.info.n_ctx, b.info.notes) == (4096, ())
        assert same_as_reported(b.info.kv_bytes, 4096 * 544)
    finally:
        b.close()


def test_ctx_0_with_room_is_the_models_own(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=0, n_threads=2, memory_budget=1 << 40))
    try:
        assert (b.info.n_ctx, b.info.notes) == (4096, ())
        assert same_as_reported(b.info.kv_bytes, 4096 * 1024)  # 4 MiB
    finally:
        b.close()


# -- refused before anything loads ----------------------------------------------------------------------
MISSING = "/nonexistent/Yi-Missing-Q8_0.gguf"
IMPOSSIBLE_RUNS = {
    "run": ["run", MISSING, "hi", "--kv-type", "q4_0", "--flash-attn", "off"],
    "chat": ["chat", MISSING, "--kv-type", "q4_0", "--flash-attn", "off"],
    "serve": ["serve", MISSING, "--kv-type", "q4_0", "--flash-attn", "off", "--port", "0"],
    "bench": ["bench", MISSING, "--kv-type", "q4_0", "--flash-attn", "off"],
}
TRANSFORMERS_RUNS = {
    "run --backend transformers": ["run", "/nonexistent/Yi-Missing", "hi", "--backend", "transformers", "--kv-type", "q8_0"],
    "chat --precision full": ["chat", "/nonexistent/Yi-Missing", "--precision", "full", "--kv-type", "q8_0"],
    "serve --precision full": ["serve", "/nonexistent/Yi-Missing", "--precision", "full", "--flash-attn", "on",
                               "--port", "0"],
}  # fmt: skip


@pytest.fixture(scope="module")
def refused() -> dict[str, subprocess.CompletedProcess]:
    runs = {**IMPOSSIBLE_RUNS, **TRANSFORMERS_RUNS}
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(runs, pool.map(lambda args: run_cli(*args, timeout=60), runs.values())))


@pytest.mark.parametrize("name", list(IMPOSSIBLE_RUNS))
def test_a_quantized_cache_without_flash_attention_is_refused(refused, name):
    proc = refused[name]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (f"error: {IMPOSSIBLE}\n"
                           "  use --flash-attn auto or on with --kv-type q4_0, or --kv-type f16 with --flash-attn off\n")  # fmt: skip
    assert proc.stdout == ""  # the model was never looked for: its name is in neither stream


@pytest.mark.parametrize("name", list(TRANSFORMERS_RUNS))
def test_the_transformers_backend_refuses_llama_cpp_cache_settings(refused, name):
    proc = refused[name]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --kv-type and --flash-attn are llama.cpp's settings; the transformers "
                                  "backend keeps its cache in the model's own precision\n"), proc.stderr  # fmt: skip
    assert "Yi-Missing" not in proc.stderr and proc.stdout == ""


# -- each front end with a non-default type ---------------------------------------------------------------
def test_run_with_a_q8_0_cache(chat_gguf, backends):
    proc = run_cli("run", str(chat_gguf), "Hello, Yi!", "--kv-type", "q8_0", "--temperature", "0", "--max-tokens", "8",
                   "--ctx", str(N_CTX), "--threads", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    b = backends["q8_0"]
    prompt = b.chat_tokens([{"role": "user", "content": "Hello, Yi!"}])
    events = b.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
    reply = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert reply.strip() and proc.stdout == reply + "\n"


def test_serve_with_a_q4_0_cache(chat_gguf):
    with running_server(chat_gguf, "--kv-type", "q4_0", "--ctx", "256", "--parallel", "1") as (base, proc):
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello Yi"}], "max_tokens": 4, "temperature": 0,
            "logit_bias": {"2": -100, "7": -100}})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == 4
        banner = next(line for line in iter(proc.stderr.readline, "") if line.startswith("yi-local: serving"))
    assert "(Q8_0, CPU, ctx 256, KV q4_0, 1 parallel)" in banner, banner


# The real command, with only the free memory it sees replaced (as LoadOptions.memory_budget does in-process).
WITH_BUDGET = ("import sys; from yi_local import hardware; hardware.memory_budget = lambda *a: int(sys.argv[1]); "
               "from yi_local.cli import main; sys.exit(main(sys.argv[2:]))")  # fmt: skip


def test_serve_prints_the_notes_before_the_banner(chat_gguf):
    budget = budget_for_room(chat_gguf, 5 * MIB // 2)  # room for 2048 tokens at f16 (see above)
    proc = subprocess.Popen([sys.executable, "-c", WITH_BUDGET, str(budget), "serve", str(chat_gguf), "--ctx", "0",
                             "--parallel", "1", "--threads", "2", "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        lines = []
        for line in iter(proc.stderr.readline, ""):
            lines.append(line.rstrip("\n"))
            if line.startswith("yi-local: serving"):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ours = [line for line in lines if line.startswith("yi-local: ")]  # llama.cpp may warn too
    assert len(ours) == 2, lines
    assert ours[0].startswith("yi-local: note: --ctx 0: the model's own context of 4,096 tokens needs 4.0 MiB")
    assert "using 2,048 tokens" in ours[0]
    assert "(Q8_0, CPU, ctx 2048, KV f16, 1 parallel)" in ours[1]


def test_bench_with_a_q8_0_cache(chat_gguf):
    proc = run_cli("bench", str(chat_gguf), "-p", "16", "-n", "4", "--kv-type", "q8_0", "--ctx", "256",
                   "--threads", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "\n         KV cache q8_0 · flash attention auto\n" in proc.stdout
    assert re.search(r"^\|\s+1 \|", proc.stdout, re.MULTILINE), proc.stdout  # the table's row for 1 sequence


async def test_chat_with_a_q8_0_cache(chat_gguf):
    from yi_local.cli import parse
    from yi_local.commands.chat import build_app

    args = parse(["chat", str(chat_gguf), "--kv-type", "q8_0", "--ctx", "256", "--threads", "2"])
    app = build_app(args, str(chat_gguf), "llama.cpp")
    async with app.run_test(size=(80, 24)) as pilot:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while app.backend is None and app.load_error is None:
            assert loop.time() < deadline, "the model did not load"
            await pilot.pause(0.05)
        assert app.load_error is None
        info = app.backend.info
        assert (info.kv_type, info.flash_attn, info.n_ctx) == ("q8_0", "on", 256)
        assert same_as_reported(info.kv_bytes, 256 * 544)
