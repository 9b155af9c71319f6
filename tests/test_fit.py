"""The memory arithmetic of `doctor`, against sizes computed by hand for Yi-6B and Yi-34B."""

from __future__ import annotations

import pytest

from yi_local.catalog import CATALOG, parse_name
from yi_local.errors import YiLocalError
from yi_local.fit import DOCTOR_LEVELS, INTERACTIVE_TPS, OVERHEAD_BYTES, fits, memory_needed, recommend, usable_bytes
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
