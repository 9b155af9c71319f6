"""The importance matrix: computed as llama-imatrix does, saved in its format, used by the quantizer."""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest

from converters.imatrix import CalibrationText, GgmlTensor, compute_imatrix, ggml
from converters.imatrix_file import Entry, Imatrix, read_imatrix, write_imatrix
from tests.conftest import CORPUS

torch = pytest.importorskip("torch", reason="the reference activations come from transformers on torch")

N_CTX, N_BATCH = 64, 128  # small windows: two to a batch, so the batching is exercised too
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}  # fmt: skip


@pytest.fixture(scope="module")
def calibration() -> CalibrationText:
    return CalibrationText(CORPUS.read_text("utf-8") * 2, "corpus.txt")


@pytest.fixture(scope="module")
def matrix(ggufs, calibration) -> Imatrix:
    return compute_imatrix(ggufs["f32"], calibration, threads=2, n_ctx=N_CTX, n_batch=N_BATCH)


def reference_means(chat_dir, ggufs, calibration) -> dict[str, np.ndarray]:
    """Mean squared input of every linear layer, from transformers' activations, over the same windows."""
    from transformers import AutoModelForCausalLM

    from yi_local.llama_lib import llama_cpp, load_model, tokenize

    L = llama_cpp()
    model_ptr = load_model(ggufs["f32"], vocab_only=True)
    try:
        vocab = L.llama_model_get_vocab(model_ptr)
        tokens = tokenize(vocab, calibration.text.encode(), add_special=True, parse_special=False)
        bos = L.llama_vocab_bos(vocab) if L.llama_vocab_get_add_bos(vocab) else None  # Yi adds none
    finally:
        L.llama_model_free(model_ptr)
    windows = [tokens[i * N_CTX : (i + 1) * N_CTX] for i in range(len(tokens) // N_CTX)]
    for w in windows:
        w[0] = w[0] if bos is None else bos
    model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().double().numpy().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(axis=0)
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    for name, module in model.named_modules():
        for hf, gguf_name in HF_TO_GGUF.items():
            if name.endswith(hf):
                layer = name.split(".")[2]
                module.register_forward_hook(hook(f"blk.{layer}.{gguf_name}.weight"))
    with torch.no_grad():
        model(torch.tensor(windows))
    return {name: sums[name] / rows[name] for name in sums}


def test_entries_are_the_mean_squared_activations(chat_dir, ggufs, calibration, matrix):
    ref = reference_means(chat_dir, ggufs, calibration)
    got = matrix.normalized()
    assert sorted(got) == sorted(ref)  # every blk.* matrix multiplication, nothing else
    n_windows = len(next(iter(matrix.entries.values())).counts) and matrix.entries["blk.0.attn_q.weight"].counts[0]
    assert n_windows % N_CTX == 0 and matrix.chunk_count == n_windows // N_CTX and matrix.chunk_size == N_CTX
    for name, want in ref.items():
        # llama.cpp keeps the KV cache in f16, so attention outputs (and what follows) round a little:
        # measured at most 2e-3 relative here.
        np.testing.assert_allclose(got[name], want, rtol=1e-2, atol=1e-6, err_msg=name)


def test_stopping_each_graph_after_the_last_layer_changes_nothing(ggufs, calibration, matrix, monkeypatch):
    """The graph stops after the last layer's ffn_down (the logits are never computed), once per ubatch;
    the matrix is bit for bit the one computed with every graph run to its end, as llama-imatrix runs it."""
    import converters.imatrix as imatrix

    made = []

    class Counting(imatrix._Collector):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(imatrix, "_Collector", Counting)
    whole = compute_imatrix(ggufs["f32"], calibration, threads=2, n_ctx=N_CTX, n_batch=N_BATCH, stop_early=False)
    early = compute_imatrix(ggufs["f32"], calibration, threads=2, n_ctx=N_CTX, n_batch=N_BATCH)
    tokens = matrix.chunk_count * N_CTX
    assert [c.stops for c in made] == [0, -(-tokens // N_BATCH)]  # one ubatch (the whole batch) per llama_decode
    assert sorted(early.entries) == sorted(whole.entries) == sorted(matrix.entries)
    for name, entry in whole.entries.items():
        np.testing.assert_array_equal(early.entries[name].sums, entry.sums, err_msg=name)
        np.testing.assert_array_equal(early.entries[name].counts, entry.counts, err_msg=name)


def test_llama_cpp_gguf_parser_reads_the_saved_matrix(matrix, tmp_path):
    """The file, read by llama.cpp's own GGUF parser as common_imatrix_load reads it, holds the same numbers."""
    path = tmp_path / "m.imatrix.gguf"
    write_imatrix(path, matrix)
    loaded = _load_like_llama_cpp(path)
    assert loaded["general.type"] == "imatrix"
    assert loaded["imatrix.datasets"] == ["corpus.txt"]
    assert (loaded["imatrix.chunk_count"], loaded["imatrix.chunk_size"]) == (matrix.chunk_count, N_CTX)
    assert sorted(loaded["entries"]) == sorted(matrix.entries)
    for name, (sums, counts) in loaded["entries"].items():
        np.testing.assert_array_equal(sums, matrix.entries[name].sums.reshape(-1))
        np.testing.assert_array_equal(counts, matrix.entries[name].counts)
    again = read_imatrix(path)
    for name, values in again.normalized().items():
        np.testing.assert_array_equal(values, matrix.normalized()[name])


def _load_like_llama_cpp(path) -> dict:
    """common/imatrix-loader.cpp's reading, through libggml's gguf_init_from_file (no_alloc = false)."""
    g = ggml()
    lib = g.lib

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    sigs = {"gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, Params]),
            "gguf_free": (None, [ctypes.c_void_p]), "gguf_find_key": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
            "gguf_get_val_u32": (ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
            "gguf_get_val_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
            "gguf_get_arr_n": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            "gguf_get_arr_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
            "ggml_get_first_tensor": (ctypes.c_void_p, [ctypes.c_void_p]),
            "ggml_get_next_tensor": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p])}  # fmt: skip
    for name, (res, args) in sigs.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    ctx = ctypes.c_void_p()
    gguf = lib.gguf_init_from_file(str(path).encode(), Params(False, ctypes.pointer(ctx)))
    assert gguf, "llama.cpp's gguf_init_from_file refused the file"
    try:
        out: dict = {"entries": {}}
        out["general.type"] = lib.gguf_get_val_str(gguf, lib.gguf_find_key(gguf, b"general.type")).decode()
        key = lib.gguf_find_key(gguf, b"imatrix.datasets")
        out["imatrix.datasets"] = [lib.gguf_get_arr_str(gguf, key, i).decode() for i in range(lib.gguf_get_arr_n(gguf, key))]
        for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
            out[k] = lib.gguf_get_val_u32(gguf, lib.gguf_find_key(gguf, k.encode()))
        tensors = {}
        t = lib.ggml_get_first_tensor(ctx)
        while t:
            info = GgmlTensor.from_address(t)
            name = info.name.decode()
            t = lib.ggml_get_next_tensor(ctx, t)
            if not name.endswith((".in_sum2", ".counts")):
                continue  # the loader skips them too (e.g. the blob holding all tensor data)
            assert info.type == 0  # F32, as the loader demands
            n = int(np.prod(list(info.ne)))
            tensors[name] = np.ctypeslib.as_array((ctypes.c_float * n).from_address(info.data)).copy()
        for name in tensors:
            if name.endswith(".in_sum2"):
                base = name.removesuffix(".in_sum2")
                out["entries"][base] = (tensors[name], np.rint(tensors[base + ".counts"]).astype(np.int64))
        assert len(tensors) == 2 * len(out["entries"])  # every sum has its count
        return out
    finally:
        lib.gguf_free(gguf)
        lib.ggml_free(ctx)


def test_legacy_dat_files_are_read_as_llama_quantize_reads_them(tmp_path):
    """llama-imatrix's older format: sums already divided by the count, times the number of calls."""
    values = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    blob = struct.pack("<i", 1) + struct.pack("<i", 9) + b"blk.0.x.w" + struct.pack("<ii", 5, 3) + values.tobytes()
    blob += struct.pack("<i", 12) + struct.pack("<i", 4) + b"wiki"
    path = tmp_path / "old.dat"
    path.write_bytes(blob)
    m = read_imatrix(path)
    assert m.legacy and m.datasets == ["wiki"] and m.chunk_count == 12
    np.testing.assert_allclose(m.normalized()["blk.0.x.w"], values / 5)


def test_unused_experts_weigh_every_column_alike():
    m = Imatrix(entries={"w": Entry(sums=np.array([[4.0, 8.0], [1.0, 1.0]], dtype=np.float32),
                                    counts=np.array([2, 0]))}, datasets=["d"], chunk_count=1, chunk_size=2)  # fmt: skip
    np.testing.assert_array_equal(m.normalized()["w"], [2.0, 4.0, 1.0, 1.0])


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"\x00\x00\x00\x00", b"\xff" * 40])
def test_a_damaged_matrix_is_a_clear_error(tmp_path, content):
    from yi_local.errors import YiLocalError

    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(YiLocalError, match="not a valid importance matrix"):
        read_imatrix(path)


def test_a_model_gguf_is_not_taken_for_a_matrix(ggufs):
    from yi_local.errors import YiLocalError

    with pytest.raises(YiLocalError, match="not an imatrix"):
        read_imatrix(ggufs["f16"])
