"""HF tensor names and layouts to llama.cpp's, and chunked conversion to the output type."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH, GGMLQuantizationType, get_tensor_name_map
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from converters.checkpoint import TensorSource
from converters.hf_config import ModelParams
from yi_local.errors import YiLocalError

F32, F16, BF16, Q8_0 = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
)

# Early Yi snapshots named the layer norms ln1/ln2.
_LEGACY_RENAMES = {".ln1.": ".input_layernorm.", ".ln2.": ".post_attention_layernorm."}
# Buffers of rotary frequencies some checkpoints carry; llama.cpp computes them itself.
_SKIP_SUFFIXES = (".rotary_emb.inv_freq",)

CHUNK_BYTES = 8 << 20  # source bytes per conversion chunk


@dataclass
class TensorPlan:
    """How one checkpoint tensor becomes one GGUF tensor."""

    src: TensorSource
    name: str
    out_type: GGMLQuantizationType
    permute_heads: int | None  # Q/K: undo HF's rotary layout over this many heads

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.out_type]
        return self.src.n_rows * (self.src.row_len // block) * type_size

    def row_chunks(self) -> list[tuple[int, int]]:
        """Row ranges of about CHUNK_BYTES, on head boundaries when rows get permuted."""
        step = max(1, CHUNK_BYTES // max(1, self.src.row_len * self.src.itemsize))
        if self.permute_heads:
            rows_per_head = self.src.n_rows // self.permute_heads
            step = max(rows_per_head, step // rows_per_head * rows_per_head)
        n = self.src.n_rows
        return [(s, min(n, s + step)) for s in range(0, n, step)]


def plan_tensors(sources: list[TensorSource], params: ModelParams, out_type: GGMLQuantizationType) -> list[TensorPlan]:
    """Every checkpoint tensor mapped to its llama.cpp name and checked against config.json."""
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, params.num_layers)
    shapes = expected_shapes(params)
    plans = []
    for src in sources:
        if src.name.endswith(_SKIP_SUFFIXES):
            continue
        hf_name = src.name
        for old, new in _LEGACY_RENAMES.items():
            hf_name = hf_name.replace(old, new)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name not in shapes:
            raise _unexpected(src.name, params)
        want, fields = shapes.pop(name)
        if src.shape != want:
            where = f"{src.path.name}: " if src.path else ""
            raise YiLocalError(
                f"{where}tensor {src.name} is {list(src.shape)}, but config.json's {fields} make it {list(want)}",
                hint="config.json and the weights disagree (a config from another model?); download the model again",
            )
        permute = None
        if hf_name.endswith("q_proj.weight"):
            permute = params.num_heads
        elif hf_name.endswith("k_proj.weight"):
            permute = params.num_kv_heads
        tensor_type = out_type
        if len(src.shape) == 1:
            tensor_type = F32
        elif out_type == Q8_0 and src.row_len % GGML_QUANT_SIZES[Q8_0][0] != 0:
            tensor_type = F16
        plans.append(TensorPlan(src, name, tensor_type, permute))
    if params.tie_word_embeddings:
        shapes.pop("output.weight", None)  # optional: llama.cpp reuses token_embd without it
    if shapes:
        missing = sorted(shapes)
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise YiLocalError(
            f"the checkpoint lacks tensors: {shown}",
            hint="a weight shard is missing or incomplete; download the model again",
        )
    return plans


def expected_shapes(params: ModelParams) -> dict[str, tuple[tuple[int, ...], str]]:
    """llama.cpp tensor name -> (the checkpoint's shape for it, the config fields that set it)."""
    hidden, ffn, vocab = params.hidden_size, params.intermediate_size, params.vocab_size
    kv = params.num_kv_heads * params.head_dim
    h, f, v, k = "hidden_size", "intermediate_size and hidden_size", "vocab_size and hidden_size", (
        "num_key_value_heads, num_attention_heads and hidden_size")  # fmt: skip
    shapes = {"token_embd.weight": ((vocab, hidden), v), "output.weight": ((vocab, hidden), v),
              "output_norm.weight": ((hidden,), h)}  # fmt: skip
    per_layer = {"attn_norm": ((hidden,), h), "attn_q": ((hidden, hidden), h), "attn_k": ((kv, hidden), k),
                 "attn_v": ((kv, hidden), k), "attn_output": ((hidden, hidden), h), "ffn_norm": ((hidden,), h),
                 "ffn_gate": ((ffn, hidden), f), "ffn_up": ((ffn, hidden), f), "ffn_down": ((hidden, ffn), f)}  # fmt: skip
    for i in range(params.num_layers):
        shapes |= {f"blk.{i}.{t}.weight": want for t, want in per_layer.items()}
    return shapes


def _unexpected(name: str, params: ModelParams) -> YiLocalError:
    layer = re.search(r"layers\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= params.num_layers:
        return YiLocalError(
            f"tensor {name} is in layer {layer.group(1)}, but config.json's num_hidden_layers is {params.num_layers}",
            hint="config.json and the weights disagree (a config from another model?); download the model again",
        )
    return YiLocalError(
        f"tensor {name} has no place in a Llama/Yi model (or is given twice)",
        hint="this checkpoint is not a plain Llama/Yi model; yi-local cannot convert it",
    )


def permute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K layout: rows.reshape(h, 2, d/2, cols).swapaxes(1, 2), on whole heads."""
    n_rows, cols = rows.shape
    return rows.reshape(n_heads, 2, n_rows // n_heads // 2, cols).swapaxes(1, 2).reshape(n_rows, cols)


def _view(buf: np.ndarray, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """The first bytes of the reusable buffer `buf` seen as an array of `dtype` and `shape`."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return buf.view(np.uint8)[:n].view(dtype).reshape(shape)


def to_float32(rows: np.ndarray, src_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Rows as float32; bf16 (uint16 bits) widens exactly by a shift. `out` is a reusable buffer."""
    if src_dtype == "F32":
        return rows
    if src_dtype == "BF16":
        bits = np.left_shift(rows, 16, dtype=np.uint32, out=None if out is None else _view(out, np.uint32, rows.shape))
        return bits.view(np.float32)
    if out is None:
        return rows.astype(np.float32)
    f32 = _view(out, np.float32, rows.shape)
    np.copyto(f32, rows)
    return f32


# bf16 bit patterns (sign cleared) whose f16 value is a normal number: exponents 113..142.
_F16_NORMAL_LO, _F16_NORMAL_HI = 113 << 7, 143 << 7


def bf16_to_f16(bits: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """bf16 (uint16 bits) to f16, exactly as float32 -> float16 rounding does, about twice as fast.

    bf16 keeps 7 mantissa bits and f16 10, so wherever the result is a normal f16 the conversion is
    exact: rebias the exponent (112) and shift the mantissa, two integer operations. The few values
    that become f16 subnormals, zero, infinity or NaN go through numpy's float cast.
    """
    out = np.empty(bits.shape, np.uint16) if out is None else _view(out, np.uint16, bits.shape)
    mag = np.bitwise_and(bits, np.uint16(0x7FFF), out=None if scratch is None else _view(scratch, np.uint16, bits.shape))
    np.subtract(mag, np.uint16(_F16_NORMAL_LO - (1 << 7)), out=out)
    np.left_shift(out, 3, out=out)
    np.bitwise_or(out, np.bitwise_and(bits, np.uint16(0x8000)), out=out)
    special = (mag < _F16_NORMAL_LO) | (mag >= _F16_NORMAL_HI)
    if special.any():
        with np.errstate(over="ignore"):
            out[special] = to_float32(bits[special], "BF16").astype(np.float16).view(np.uint16)
    return out.view(np.float16)


def convert_rows(
    rows: np.ndarray, src_dtype: str, out_type: GGMLQuantizationType, scratch: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Rows in the source dtype (BF16 as uint16) to the bytes of `out_type`.

    `scratch` (float32, one element per value) and `out` (bytes) are reusable buffers: with them the
    common paths allocate nothing, which keeps page faults (and time) out of the conversion loop.
    """
    if out_type == BF16:
        return rows if src_dtype == "BF16" else quantize(to_float32(rows, src_dtype, scratch), BF16)
    if out_type == F16 and src_dtype == "F16":
        return rows
    if out_type == F16 and src_dtype == "BF16":
        return bf16_to_f16(rows, out, scratch)
    if out_type == F32 and src_dtype == "F32":
        return rows
    f32 = to_float32(rows, src_dtype, out if out_type == F32 and out is not None else scratch)
    if out_type == F32:
        return f32
    if out_type == F16:
        if out is None:
            return f32.astype(np.float16)
        f16 = _view(out, np.float16, f32.shape)
        np.copyto(f16, f32, casting="same_kind")
        return f16
    if out_type == Q8_0:
        return quantize(f32, Q8_0)
    raise ValueError(f"unsupported output type {out_type!r}")  # plan_tensors never makes one
