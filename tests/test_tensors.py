"""Numeric kernels of the converter, checked exhaustively where the input space allows."""

from __future__ import annotations

import numpy as np

from converters.tensors import bf16_to_f16, permute_rows, to_float32


def test_bf16_to_f16_equals_the_float_cast_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(over="ignore"):
        want = to_float32(bits, "BF16").astype(np.float16)
    got = bf16_to_f16(bits)
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got[nan]).all()
    # The special cases really occur: subnormals, zeros, infinities.
    assert (want[~nan] == 0).sum() > 1 and np.isinf(want).sum() > 1 and (np.abs(want[~nan]) < 6.1e-5).sum() > 100


def test_bf16_to_f16_with_reused_buffers():
    rng = np.random.default_rng(0)
    f = (rng.standard_normal((64, 256), dtype=np.float32) * 0.02).view(np.uint32)
    bits = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)
    out, scratch = np.empty(1 << 20, np.uint8), np.empty(1 << 18, np.float32)
    got = bf16_to_f16(bits, out, scratch)
    assert got.shape == bits.shape and np.shares_memory(got, out)
    assert np.array_equal(got, to_float32(bits, "BF16").astype(np.float16))


def test_permute_rows_matches_llama_cpp():
    """llama.cpp's convert_hf_to_gguf: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)."""
    w = np.arange(8 * 3).reshape(8, 3)
    got = permute_rows(w, 2)
    assert got[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_fast_header_reader_agrees_with_gguf_reader(ggufs):
    from gguf import GGUFReader

    from yi_local.gguf_header import read_header

    for path in ggufs.values():
        ours, theirs = read_header(path), GGUFReader(path)
        assert [(t.name, t.type, t.n_bytes, tuple(reversed(t.shape))) for t in ours.tensors] == [
            (t.name, t.tensor_type, int(t.n_bytes), tuple(int(d) for d in t.shape)) for t in theirs.tensors
        ]
        assert ours.data_offset == theirs.data_offset
        assert ours.metadata["general.file_type"] == theirs.get_field("general.file_type").contents()
        assert ours.metadata["tokenizer.chat_template"] == theirs.get_field("tokenizer.chat_template").contents()
        assert ours.data_end == max(int(t.data_offset) + int(t.n_bytes) for t in theirs.tensors)


def test_truncated_gguf_is_refused(ggufs, tmp_path):
    import pytest

    from yi_local.errors import YiLocalError
    from yi_local.gguf_header import read_header

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ggufs["f16"].read_bytes()[:5000])
    with pytest.raises(YiLocalError, match="is damaged or incomplete"):
        read_header(cut)
