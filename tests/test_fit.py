"""The memory arithmetic of `doctor`, against sizes computed by hand for Yi-6B and Yi-34B."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest

from tests.conftest import run_cli
from yi_local.catalog import CATALOG, parse_name
from yi_local.errors import YiLocalError
from yi_local.fit import (
    CONTEXT_STEP,
    DOCTOR_LEVELS,
    INTERACTIVE_TPS,
    OVERHEAD_BYTES,
    fits,
    kv_cache_bytes,
    largest_context,
    memory_needed,
    recommend,
    usable_bytes,
)
from yi_local.runtime.offload import plan_offload
from yi_local.units import GIB

# Yi-6B: 2 x 64000 x 4096 embeddings and output; per layer q 4096^2, k and v 4096 x 512, o 4096^2,
# mlp 3 x 4096 x 11008, two norms of 4096; 32 layers; a final norm.
YI_6B_PARAMS = 2 * 64000 * 4096 + 32 * (2 * 4096**2 + 2 * 4096 * 512 + 3 * 4096 * 11008 + 2 * 4096) + 4096
# Yi-34B: hidden 7168, 56 heads of 128, 8 KV heads, mlp 20480, 60 layers.
YI_34B_PARAMS = 2 * 64000 * 7168 + 60 * (2 * 7168**2 + 2 * 7168 * 1024 + 3 * 7168 * 20480 + 2 * 7168) + 7168


def test_parameter_counts():
    assert YI_6B_PARAMS == 6_061_035_520 == CATALOG["yi:6b-chat"].parameters
    assert YI_34B_PARAMS == 34_388_917_248 == CATALOG["yi:34b-chat"].parameters


def test_yi_6b_chat_at_q4_k_m():
    need = memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096)
    assert need.weights == int(6_061_035_520 * 4.85 / 8) == 3_674_502_783
    assert need.kv_cache == 2 * 32 * 4096 * 4 * 128 * 2 == 268_435_456
    assert need.total == 3_674_502_783 + 268_435_456 + OVERHEAD_BYTES
    assert round(need.total / GIB, 1) == 4.0  # the Yi README: Yi-6B-Chat 4-bit about 4 GB


def test_yi_34b_chat_at_q4_k_m_and_q8_0():
    need = memory_needed(CATALOG["yi:34b-chat"], "Q4_K_M", 4096)
    assert need.weights == int(34_388_917_248 * 4.85 / 8) == 20_848_281_081
    assert need.kv_cache == 2 * 60 * 4096 * 8 * 128 * 2 == 1_006_632_960
    assert 19.5 < need.total / GIB < 21  # the Yi README: Yi-34B-Chat 4-bit 19-20 GB
    q8 = memory_needed(CATALOG["yi:34b-chat"], "Q8_0", 4096)
    assert q8.weights == int(34_388_917_248 * 8.5 / 8)
    assert 35 < q8.total / GIB < 38  # the Yi README: 8-bit 35-38 GB


def test_kv_cache_follows_ctx_up_to_the_model_context():
    entry = CATALOG["yi:6b-chat"]  # a 4K model: a longer --ctx cannot grow its cache
    assert memory_needed(entry, "Q4_K_M", 32768).kv_cache == memory_needed(entry, "Q4_K_M", 4096).kv_cache
    long = CATALOG["yi:6b-200k"]
    assert memory_needed(long, "Q4_K_M", 32768).kv_cache == 8 * memory_needed(long, "Q4_K_M", 4096).kv_cache


def test_fits_and_recommend():
    need = memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096)
    assert fits(need, 5 * GIB) and not fits(need, 4 * GIB)
    entries = list(CATALOG.values())
    # The bandwidth not known: the best that fits.
    assert picked(recommend(entries, 4096, 8 * GIB)) == ("yi-1.5:9b-chat", "Q5_K_M")
    assert picked(recommend(entries, 4096, 48 * GIB)) == ("yi:34b-chat", "Q8_0")
    assert recommend(entries, 4096, 1 * GIB) is None


def picked(pick) -> tuple[str, str]:
    return pick.entry.name, pick.quant


def test_decode_speed_is_bandwidth_over_the_bytes_read_per_token():
    need = memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096)
    embeddings = int(64000 * 4096 * 4.85 / 8)  # one row of them is read a token, not the table
    assert need.read_per_token == 3_674_502_783 - embeddings + 268_435_456 == 3_784_013_439
    assert need.tokens_per_second(20e9) == 20e9 / 3_784_013_439  # 5.3 tok/s
    q8 = memory_needed(CATALOG["yi-1.5:9b-chat"], "Q8_0", 4096)  # what fits 16 GiB best
    assert q8.read_per_token == 9_381_245_184 - int(64000 * 4096 * 8.5 / 8) + 402_653_184 == 9_505_370_368


@pytest.mark.parametrize("gbps, name, quant, tps", [
    # A 2-core machine with 16 GiB: yi-1.5:9b-chat:q8_0 fits but would decode at 20e9 / 9.5e9 = 2.1 tok/s.
    (20, "yi-coder:1.5b-chat", "Q6_K", 10.5),
    (60, "yi-1.5:9b-chat", "Q4_K_M", 10.7),  # a desktop's dual-channel DDR5
    (240, "yi-1.5:9b-chat", "Q8_0", 25.2),  # an M-series Max (400 GB/s x 60%): the fit is the limit
])  # fmt: skip
def test_recommend_stays_interactive(gbps, name, quant, tps):
    entries = list(CATALOG.values())
    pick = recommend(entries, 4096, 16 * GIB, gbps * 1e9)
    assert picked(pick) == (name, quant) and pick.interactive
    assert round(pick.tokens_per_second, 1) == tps and pick.tokens_per_second >= INTERACTIVE_TPS
    # The next level up of the same model would be slower than interactive, or not fit.
    higher = DOCTOR_LEVELS[DOCTOR_LEVELS.index(quant) + 1 :]
    if higher:
        need = memory_needed(pick.entry, higher[0], 4096)
        assert need.tokens_per_second(gbps * 1e9) < INTERACTIVE_TPS or not fits(need, 16 * GIB)


def test_when_nothing_is_interactive_the_fastest_that_fits():
    pick = recommend(list(CATALOG.values()), 4096, 16 * GIB, 2e9)  # 2 GB/s: slower than any machine's
    assert picked(pick) == ("yi-coder:1.5b-chat", "Q4_K_M") and not pick.interactive
    assert round(pick.tokens_per_second, 2) == 1.23  # 2e9 / (895_125_311 - 79_462_400 + 805_306_368)


def test_the_offload_planner_follows_doctors_rule():
    """`--n-gpu-layers auto` puts the whole model on the GPU exactly where doctor marks it ✓, else the
    layers that fit in the same room (weights and KV cache within the headroom, buffers set aside)."""
    need = memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096)
    for free in range(3 * GIB, 6 * GIB, 16 << 20):
        plan = plan_offload("auto", need.weights, 32, need.kv_cache, "CUDA", free)
        if fits(need, free):
            assert plan.n_gpu_layers == -1 and plan.description == "CUDA 33/33 layers"
        else:
            per_layer = (need.weights + need.kv_cache) / 33
            assert plan.n_gpu_layers * per_layer <= usable_bytes(free) < (plan.n_gpu_layers + 1) * per_layer


@pytest.mark.parametrize("spec, repo, quant, explicit", [
    ("yi:6b-chat", "01-ai/Yi-6B-Chat", "Q4_K_M", False),
    ("yi:34b-200k:q5_k_m", "01-ai/Yi-34B-200K", "Q5_K_M", True),
    ("yi-coder:9b-chat:Q8_0", "01-ai/Yi-Coder-9B-Chat", "Q8_0", True),
    ("01-ai/Yi-1.5-9B-Chat", "01-ai/Yi-1.5-9B-Chat", "Q4_K_M", False),
    ("someone/Llama-Thing:q4_0", "someone/Llama-Thing", "Q4_0", True),
])  # fmt: skip
def test_names(spec, repo, quant, explicit):
    ref = parse_name(spec)
    assert (ref.repo, ref.quant, ref.explicit_quant) == (repo, quant, explicit)


def test_unknown_name_suggests_catalog_names():
    with pytest.raises(YiLocalError) as err:
        parse_name("yi:7b")
    assert "yi:6b" in err.value.hint


def test_quant_table_ids_are_llama_cpps():
    """quant_types holds llama.cpp's ftype ids as plain numbers (so --help need not load gguf)."""
    from gguf import GGMLQuantizationType, LlamaFileType

    from yi_local.quant_types import OUT_TYPES, QUANT_TYPES, file_type_name

    for q in QUANT_TYPES.values():
        assert q.ftype == LlamaFileType[f"MOSTLY_{q.name}"], q.name
        assert file_type_name(q.ftype) == q.name
    for o in OUT_TYPES.values():
        assert o.ftype == LlamaFileType[("ALL_" if o.name == "F32" else "MOSTLY_") + o.name], o.name
        assert o.tensor_type == GGMLQuantizationType[o.name]
    assert file_type_name(int(LlamaFileType.MOSTLY_IQ2_XS)) == "IQ2_XS" and file_type_name(None) == "unknown"


# -- the KV cache at each --kv-type ---------------------------------------------------------------
KIB = 1024
# Bytes a token of context takes, K and V for every layer: f16 and bf16 2 bytes a value; q8_0 blocks of
# 32 values in 34 bytes, q4_0 in 18. Yi-6B: 32 layers x 4 KV heads x 128 = 512 values a layer, so
# 2 x 32 x 512 x 2 = 64 KiB at f16, 2 x 32 x (512 / 32 x 34) = 34 KiB at q8_0, 2 x 32 x (16 x 18) = 18 KiB
# at q4_0. Yi-34B: 60 layers x 8 KV heads x 128 = 1024 values: 240 KiB, 127.5 KiB, 67.5 KiB.
YI_6B_KV_PER_TOKEN = {"f16": 64 * KIB, "bf16": 64 * KIB, "q8_0": 34 * KIB, "q4_0": 18 * KIB}
YI_34B_KV_PER_TOKEN = {"f16": 240 * KIB, "bf16": 240 * KIB, "q8_0": 127 * KIB + 512, "q4_0": 67 * KIB + 512}


@pytest.mark.parametrize("kv", ["f16", "bf16", "q8_0", "q4_0"])
def test_kv_cache_at_each_type_is_the_hand_computed_size(kv):
    assert kv_cache_bytes(32, 1, 4, 128, kv) == YI_6B_KV_PER_TOKEN[kv]
    assert kv_cache_bytes(60, 1, 8, 128, kv) == YI_34B_KV_PER_TOKEN[kv]
    assert memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096, kv).kv_cache == 4096 * YI_6B_KV_PER_TOKEN[kv]
    assert memory_needed(CATALOG["yi:34b-200k"], "Q4_K_M", 32768, kv).kv_cache == 32768 * YI_34B_KV_PER_TOKEN[kv]
    # The weights do not depend on the cache.
    assert memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096, kv).weights == 3_674_502_783


def test_the_default_kv_type_is_f16():
    assert kv_cache_bytes(32, 4096, 4, 128) == 4096 * 64 * KIB == 268_435_456
    assert memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096) == memory_needed(CATALOG["yi:6b-chat"], "Q4_K_M", 4096, "f16")


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_the_offload_planner_counts_a_quantized_cache(kv):
    """Yi-6B-200K at Q4_K_M with 32K tokens of context on a GPU with 5.5 GiB free: usable 0.9 x 5.5 GiB
    - 300 MiB = 5,000,449,228 bytes; the weights (3,674,502,783) and an f16 cache (2 GiB) do not fit and
    go 28 of 33 layers to the GPU; a q8_0 cache (1.0625 GiB) or q4_0 (0.5625 GiB) puts all on it."""
    weights, free = 3_674_502_783, 5 * GIB + GIB // 2
    assert usable_bytes(free) == 5_000_449_228
    f16 = plan_offload("auto", weights, 32, 32768 * 64 * KIB, "CUDA", free)
    assert f16 == plan_offload("auto", weights, 32, kv_cache_bytes(32, 32768, 4, 128, "f16"), "CUDA", free)
    assert (f16.n_gpu_layers, f16.description) == (28, "CUDA 28/33 layers")  # 5.00e9 / (5,821,986,431 / 33)
    kv_bytes = kv_cache_bytes(32, 32768, 4, 128, kv)
    assert kv_bytes == 32768 * YI_6B_KV_PER_TOKEN[kv] == {"q8_0": 1_140_850_688, "q4_0": 603_979_776}[kv]
    plan = plan_offload("auto", weights, 32, kv_bytes, "CUDA", free)
    assert (plan.n_gpu_layers, plan.description) == (-1, "CUDA 33/33 layers")
    # The same rule as doctor's: what doctor marks as fitting is what the planner puts whole on the GPU.
    assert fits(memory_needed(CATALOG["yi:6b-200k"], "Q4_K_M", 32768, kv), free)
    assert not fits(memory_needed(CATALOG["yi:6b-200k"], "Q4_K_M", 32768, "f16"), free)


def test_recommend_counts_the_kv_type():
    """At 131072 tokens in 16 GiB, an f16 cache leaves no Yi-Coder-9B-Chat that fits (4.99 GiB of Q4_K_M
    weights + 12 GiB of cache); q8_0 (6.375 GiB) fits it."""
    coder = CATALOG["yi-coder:9b-chat"]
    assert not any(fits(memory_needed(coder, q, 131072, "f16"), 16 * GIB) for q in ("Q4_K_M", "Q5_K_M"))
    pick = recommend([coder], 131072, 16 * GIB, kv_type="q8_0")
    assert picked(pick) == ("yi-coder:9b-chat", "Q6_K")  # the best level that fits, the bandwidth not known
    assert pick.need.kv_cache == 131072 * 2 * 48 * 544 == 6_845_104_128
    assert recommend([coder], 131072, 16 * GIB, kv_type="f16") is None  # even IQ2_M: 3.0 + 12 GiB


# -- --ctx 0: the largest context that fits ---------------------------------------------------------
# Yi-6B-200K at Q4_K_M with 16 GiB free: usable int(16 GiB x 0.9) - 300 MiB = 15,147,309,465 bytes, less
# the weights 3,674,502,783: 11,472,806,682 bytes of room for the cache.
ROOM_16_GIB = 11_472_806_682


def test_largest_context_is_the_models_own_when_it_fits():
    assert usable_bytes(16 * GIB) - 3_674_502_783 == ROOM_16_GIB
    # q8_0: 200,000 x 34 KiB = 6.96e9 bytes fit; q4_0 too.
    assert largest_context(200_000, 34 * KIB, 3_674_502_783, 16 * GIB, 64) == 200_000
    assert largest_context(200_000, 18 * KIB, 3_674_502_783, 16 * GIB, 64) == 200_000
    # Exactly the room: still fits.
    assert largest_context(ROOM_16_GIB, 1, 3_674_502_783, 16 * GIB, 64) == ROOM_16_GIB
    assert largest_context(4096, 0, 3_674_502_783, 16 * GIB, 64) == 4096  # nothing to count


def test_largest_context_is_the_largest_multiple_of_the_step_that_fits():
    # f16: 11,472,806,682 / 65,536 = 175,061 tokens, down to a multiple of 1024: 170 x 1024 = 174,080.
    assert CONTEXT_STEP == 1024
    assert largest_context(200_000, 64 * KIB, 3_674_502_783, 16 * GIB, 64) == 174_080
    assert 174_080 * 64 * KIB <= ROOM_16_GIB < 175_104 * 64 * KIB
    # One byte less room than 2048 tokens need: 1024.
    budget = 8 * GIB
    room = usable_bytes(budget) - 3_674_502_783
    assert largest_context(4096, room // 2047, 3_674_502_783, budget, 64) == 1024


def test_largest_context_is_the_minimum_when_nothing_fits():
    assert largest_context(200_000, 64 * KIB, 3_674_502_783, 1 * GIB, 64) == 64  # the weights alone do not fit
    assert largest_context(200_000, 64 * KIB, 3_674_502_783, 4 * GIB, 256) == 256  # room for 0 whole steps
    assert largest_context(200, 64 * KIB, 3_674_502_783, 1 * GIB, 64) == 64


# -- doctor --kv-type, through the real CLI -----------------------------------------------------------
CODER_Q4_K_M_WEIGHTS = 5_352_828_134  # int(8,829,407,232 x 4.85 / 8): Yi-Coder-9B's 48 layers, as Yi-6B's shape
# Yi-Coder-9B at 131072 tokens: 48 layers x 512 values: 2 x 48 x 512 x 2 = 96 KiB a token at f16 (12 GiB in
# all), 2 x 48 x 16 x 34 = 51 KiB at q8_0 (6.375 GiB), 2 x 48 x 16 x 18 = 27 KiB at q4_0 (3.375 GiB).
CODER_KV_131072 = {"f16": 12 * GIB, "bf16": 12 * GIB, "q8_0": 6_845_104_128, "q4_0": 3_623_878_656}


def doctor_cell(out: str, model: str, level: str) -> tuple[float, str]:
    """(GiB, mark) in `model`'s row under `level` of doctor's table (bandwidth given: "11.7 5.0/s ~")."""
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("MODEL")).split()
    row = next(line for line in lines if line.strip().startswith(model + " ")).split()
    at = 2 + 3 * (header.index(level) - 2)  # each level cell is three words
    return float(row[at]), row[at + 2]


@pytest.fixture(scope="module")
def doctor_long() -> dict[str, str]:
    """What `yi-local doctor --memory 16 --ctx 131072 --kv-type KV --bandwidth 60` prints, for each KV type.
    In this process (each `yi-local doctor` spends two seconds importing torch); the tests below that run
    the command itself show it is the same command."""
    from yi_local.cli import main

    outs = {}
    for kv in ("f16", "bf16", "q8_0", "q4_0"):
        with redirect_stdout(io.StringIO()) as out:
            assert main(["doctor", "--memory", "16", "--ctx", "131072", "--kv-type", kv, "--bandwidth", "60"]) == 0
        outs[kv] = out.getvalue()
    return outs


def test_doctor_command_prints_the_same(doctor_long):
    proc = run_cli("doctor", "--memory", "16", "--ctx", "131072", "--kv-type", "q8_0", "--bandwidth", "60")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if not line.startswith(("RAM", "GPU", "torch"))]
    assert table == [line for line in doctor_long["q8_0"].splitlines() if not line.startswith(("RAM", "GPU", "torch"))]


@pytest.mark.parametrize("kv", ["f16", "bf16", "q8_0", "q4_0"])
def test_doctor_counts_the_kv_cache_at_its_type(doctor_long, kv):
    out = doctor_long[kv]
    assert f"at ctx 131072, KV cache {kv}" in out
    share = {"f16": "2 bytes a value", "bf16": "2 bytes a value", "q8_0": "53% of f16's", "q4_0": "28% of f16's"}[kv]
    assert f"Memory = weights + {kv} KV cache ({share}) at ctx 131072" in out
    gib, _ = doctor_cell(out, "yi-coder:9b-chat", "Q4_K_M")
    expected = (CODER_Q4_K_M_WEIGHTS + CODER_KV_131072[kv] + OVERHEAD_BYTES) / GIB
    assert f"{gib:.1f}" == f"{expected:.1f}" == {"f16": "17.3", "bf16": "17.3", "q8_0": "11.7", "q4_0": "8.7"}[kv]
    # A 4K model's cache stays at its own 4096 tokens whatever --ctx says: Yi-6B-Chat 0.25 GiB at f16.
    gib6, _ = doctor_cell(out, "yi:6b-chat", "Q4_K_M")
    assert f"{gib6:.1f}" == f"{(3_674_502_783 + 4096 * YI_6B_KV_PER_TOKEN[kv] + OVERHEAD_BYTES) / GIB:.1f}"


def test_doctor_kv_type_changes_the_cache_in_proportion(doctor_long):
    """The cache part of each total (total - weights - buffers), read off the table at 0.1 GiB: q8_0 is
    34/64 of f16, q4_0 18/64; Yi-34B-200K's 30 GiB f16 cache likewise."""

    def cache(kv, model, weights):
        return doctor_cell(doctor_long[kv], model, "Q4_K_M")[0] - (weights + OVERHEAD_BYTES) / GIB

    for model, weights in (("yi-coder:9b-chat", CODER_Q4_K_M_WEIGHTS), ("yi:34b-200k", 20_848_281_081)):
        f16 = cache("f16", model, weights)
        assert cache("bf16", model, weights) == f16
        for kv, share in (("q8_0", 34 / 64), ("q4_0", 18 / 64)):
            assert abs(cache(kv, model, weights) - share * f16) <= 0.1, (model, kv)
    assert abs(cache("f16", "yi:34b-200k", 20_848_281_081) - 131072 * 240 * KIB / GIB) <= 0.05  # 30 GiB


def test_doctor_long_context_says_what_fits(doctor_long):
    """16 GiB at 131072 tokens: Yi-Coder-9B-Chat at Q4_K_M does not fit with f16 (17.3 GiB), does with
    q8_0; the recommendation holds 131072 tokens and its command carries --ctx and --kv-type."""
    assert doctor_cell(doctor_long["f16"], "yi-coder:9b-chat", "Q4_K_M")[1] == "✗"
    assert doctor_cell(doctor_long["q8_0"], "yi-coder:9b-chat", "Q4_K_M")[1] in ("✓", "~")
    assert doctor_cell(doctor_long["q8_0"], "yi-coder:9b-chat", "Q8_0")[1] == "✗"  # 15.4 GiB: over 0.9 x 16
    last = doctor_long["q8_0"].strip().splitlines()[-1]
    assert re.fullmatch(r"(Recommended|Fastest): yi-coder:9b-chat:q4_k_m \(11\.7 GiB, ~5\.0 tok/s\) — "
                        r"`yi-local chat yi-coder:9b-chat:q4_k_m --pull --ctx 131072 --kv-type q8_0`", last), last  # fmt: skip
    # Never a model whose own context is shorter than asked for (the 4K and 16K ones).
    for kv, out in doctor_long.items():
        name = re.search(r"(?:Recommended|Fastest): (\S+):", out).group(1)
        assert CATALOG[name].context >= 131072, (kv, name)
        assert f"--ctx 131072{'' if kv == 'f16' else f' --kv-type {kv}'}`" in out


def test_doctor_says_nothing_holding_the_context_fits():
    proc = run_cli("doctor", "--memory", "4", "--ctx", "131072", "--kv-type", "q8_0", "--bandwidth", "60")
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout.strip().splitlines()[-2:]
    # The smallest that holds 131072 tokens: Yi-6B-200K at IQ2_M, 2,159,243,904 bytes of weights (2.85 bits a
    # weight) + 4.25 GiB of q8_0 cache (2 x 32 layers x 16 blocks x 34 bytes a token) + 300 MiB = 6.55 GiB.
    assert tail[0] == "No model that holds 131072 tokens fits in 4 GiB (--memory): the smallest, yi:6b-200k:iq2_m, needs 6.6 GiB."
    assert tail[1] == "Plan for more --memory, or --kv-type q4_0 to shrink the KV cache, or plan a smaller --ctx."


@pytest.mark.parametrize("value", ["0", "-5", "16777217"])
def test_doctor_ctx_out_of_range_is_refused(value):
    proc = run_cli("doctor", "--ctx", value, "--memory", "16", "--bandwidth", "60")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--ctx is {value}; it must be at least 1 and at most 16777216" in proc.stderr
    assert proc.stdout == ""


def test_doctor_unknown_kv_type_is_refused():
    proc = run_cli("doctor", "--kv-type", "q5_1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "argument --kv-type: invalid choice: 'q5_1' (choose from 'f16', 'bf16', 'q8_0', 'q4_0')" in proc.stderr
