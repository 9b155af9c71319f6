"""`yi-local bench`: the real command on the tiny model (its table and its JSON), bad flags refused with a
message and exit 1, and the bare loop's batched sequences generating what the engine generates for each
prompt alone. No speed is asserted: only that every figure was measured."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import run_cli
from yi_local import __version__
from yi_local.benchmark import BAN, BareLoop, Bench, _covered, prompts_for
from yi_local.fit import HEADROOM, OVERHEAD_BYTES, kv_cache_bytes, largest_context
from yi_local.errors import YiLocalError
from yi_local.gguf_header import check_model, model_meta
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend

SMALL = ["-p", "12", "-n", "4", "--parallel", "1,2", "--ctx", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(chat_gguf):
    """The table and the JSON, measured side by side (each process on one core)."""
    with ThreadPoolExecutor(2) as pool:
        table = pool.submit(run_cli, "bench", str(chat_gguf), *SMALL)
        data = pool.submit(run_cli, "bench", str(chat_gguf), *SMALL, "--json")
        return table.result(), data.result()


def test_table(runs, chat_gguf):
    proc = runs[0]
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"yi-local {__version__} · llama-cpp-python " in out
    assert f"model    {chat_gguf} · Q8_0 · " in out
    assert re.search(r"^build    CPU", out, re.M) and re.search(r"^machine  .+ · \d+ cores · .+ RAM$", out, re.M)
    assert "setup    prompt 12 · generate 4 · ctx 64 per sequence · 1 thread · batch 512 · offload CPU" in out
    rows = [line for line in out.splitlines() if re.match(r"\| +\d", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
    for row in rows:
        cells = [c.strip().rstrip("×") for c in row.strip("|").split("|")]
        assert len(cells) == 9 and all(float(c) > 0 for c in cells), row
    assert "Traceback" not in proc.stderr


def test_json(runs, chat_gguf):
    proc = runs[1]
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    setup, env, levels = data["setup"], data["environment"], data["levels"]
    assert setup["model"] == str(chat_gguf)
    assert setup["quantization"] == model_meta(check_model(chat_gguf)).quantization == "Q8_0"
    assert (setup["n_prompt"], setup["n_gen"], setup["n_ctx"], setup["n_threads"]) == (12, 4, 64, 1)
    assert setup["parallel"] == [1, 2] and setup["offload"] == "CPU" and setup["size_bytes"] == chat_gguf.stat().st_size
    assert env["yi_local_version"] == __version__ and isinstance(env["llama_cpp_python_version"], str)
    assert env["gpu_offload"] is False and env["build"] == "CPU" and isinstance(env["cores"], int)
    assert all(isinstance(d, str) for d in env["devices"]) and env["system_info"]
    assert [level["n_parallel"] for level in levels] == [1, 2]
    for level in levels:
        n = level["n_parallel"]
        for side in ("yi_local", "bare"):
            speed = level[side]
            assert speed["prompt_tokens"] == 12 * n and speed["generated_tokens"] == 3 * n
            for key in ("prompt_s", "generate_s", "prompt_tps", "generate_tps", "generate_tps_per_sequence"):
                assert isinstance(speed[key], float) and speed[key] > 0, (side, key)
            assert speed["generate_tps_per_sequence"] == pytest.approx(speed["generate_tps"] / n)
        assert level["prompt_ratio"] == pytest.approx(level["yi_local"]["prompt_tps"] / level["bare"]["prompt_tps"])
        assert level["generate_ratio"] > 0


BAD = {
    "parallel 0": (["--parallel", "0"], "argument --parallel: each level must be at least 1 and at most 256"),
    "parallel x": (["--parallel", "x"], "argument --parallel: expected whole numbers separated by commas"),
    "parallel 1,,2": (["--parallel", "1,,2"], "expected whole numbers separated by commas, such as 1,2,4, not '1,,2'"),
    "p 0": (["-p", "0"], "argument -p/--n-prompt: must be an integer at least 1"),
    "n 1": (["-n", "1"], "argument -n/--n-gen: must be an integer at least 2"),
    "p+n over ctx": (["-p", "60", "-n", "10", "--ctx", "64"],
                     "a prompt of 60 tokens and 10 generated tokens (70) do not fit a context of 64 tokens per "
                     "sequence"),  # fmt: skip
    "p+n over the model's own": (["-p", "100000", "--ctx", "0"], "tokens per sequence (the model's own: --ctx 0)"),
}


@pytest.fixture(scope="module")
def refused(chat_gguf):
    with ThreadPoolExecutor(4) as pool:
        procs = {name: pool.submit(run_cli, "bench", str(chat_gguf), *args) for name, (args, _) in BAD.items()}
        return {name: p.result() for name, p in procs.items()}


@pytest.mark.parametrize("name", BAD)
def test_bad_flags_are_refused(refused, name):
    proc = refused[name]
    assert proc.returncode == 1, proc.stderr
    assert BAD[name][1] in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    if "ctx" in name:
        assert "raise --ctx to at least" in proc.stderr


def test_batched_bare_loop_generates_what_the_engine_does(chat_gguf):
    """Sequences decoded together in the bare loop get the tokens each gets alone, in the loop and in yi-local's
    engine: positions, sequence ids and per-sequence samplers are right."""
    loop = BareLoop(chat_gguf)
    try:
        prompts = prompts_for(loop.ordinary, loop.n_vocab, 2, 10)
        assert prompts[0] != prompts[1]
        ban = {t: BAN for t in loop.end_tokens()}
        speed = loop.run(prompts, 6, 64, 1, 512, ban)
        batched = loop.generated
        alone = []
        for prompt in prompts:
            loop.run([prompt], 6, 64, 1, 512, ban)
            alone += loop.generated
    finally:
        loop.close()
    backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=64, n_threads=1))
    try:
        params = SamplingParams(temperature=0, max_tokens=6, logit_bias=ban)
        engine = [[t for e in backend.generate(p, params) if isinstance(e, TextDelta) for t in e.token_ids] for p in prompts]
    finally:
        backend.close()
    assert batched == alone == engine
    assert (speed.prompt_tokens, speed.generated_tokens) == (20, 10)


def test_time_covered_by_spans():
    assert _covered([(0, 2), (1, 3), (5, 6)]) == 4
    assert _covered([(1, 2), (0, 4)]) == 4
    assert _covered([]) == 0


def test_help_lists_bench():
    proc = run_cli("--help")
    assert "bench" in proc.stdout


def test_ctx_0_takes_the_most_of_the_models_own_context_that_fits_as_run_does(chat_gguf):
    """--ctx 0 is the model's own context where its KV cache fits (for the most sequences measured), else
    the largest that does, planned as `run --ctx 0` plans it; said in the setup line."""
    meta = model_meta(check_model(chat_gguf))
    per_token = kv_cache_bytes(meta.n_layers, 1, meta.n_head_kv, meta.n_embd // meta.n_head) * 4
    roomy = Bench(chat_gguf, 12, 4, [1, 4], 0, 1, 512, 0, memory_budget=64 << 30).setup
    assert (roomy.n_ctx, roomy.ctx_note) == (meta.context_length, "the model's own: --ctx 0")
    # Free memory whose usable part holds the weights and 2.5k tokens for each of 4 sequences: 2048 of them.
    budget = int((OVERHEAD_BYTES + meta.file_size + 2560 * per_token) / HEADROOM) + 1
    expected = largest_context(meta.context_length, per_token, meta.file_size, budget, 64)
    assert expected == 2048 < meta.context_length
    tight = Bench(chat_gguf, 12, 4, [1, 4], 0, 1, 512, 0, memory_budget=budget).setup
    assert tight.n_ctx == expected
    assert f"the most of the model's own {meta.context_length:,} that fits" in tight.ctx_note
    assert "at --parallel 4" in tight.ctx_note
    with pytest.raises(YiLocalError, match=f"of {expected} tokens per sequence \\(--ctx 0: the most of"):
        Bench(chat_gguf, expected, 4, [1, 4], 0, 1, 512, 0, memory_budget=budget)
    proc = run_cli("bench", str(chat_gguf), "-p", "12", "-n", "4", "--ctx", "0", "--parallel", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"ctx {meta.context_length} per sequence (the model's own: --ctx 0) · 1 thread" in proc.stdout
