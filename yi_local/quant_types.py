"""GGUF output and quantization types as data: names, llama.cpp ftype ids, bits per weight.

Plain numbers (llama.cpp's `llama_ftype`, the same as gguf's `LlamaFileType`, which a test checks), so
that `yi-local --help` does not load gguf and numpy to list the levels.
"""

from __future__ import annotations

from dataclasses import dataclass

from yi_local.errors import YiLocalError


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # general.file_type
    bits_per_weight: float  # of a whole Yi-6B file: bench/quant_sizes.py
    # llama.cpp refuses these without an importance matrix: some of their tensors get a type
    # (IQ1_*, IQ2_*, IQ3_XXS, Q2_K in Q2_K_S) that it will not quantize blind (src/llama-quant.cpp).
    needs_imatrix: bool = False


# The levels `--q` accepts, in order of size. Bits per weight of a whole Yi-6B file (weights only), from
# llama.cpp's own per-tensor choices: bench/quant_sizes.py (Yi-9B and Yi-34B come out 1-3% smaller).
QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        QuantType("IQ1_S", 24, 1.89, needs_imatrix=True),
        QuantType("IQ1_M", 31, 2.04, needs_imatrix=True),
        QuantType("IQ2_XXS", 19, 2.28, needs_imatrix=True),
        QuantType("IQ2_XS", 20, 2.50, needs_imatrix=True),
        QuantType("IQ2_S", 28, 2.66, needs_imatrix=True),
        QuantType("IQ2_M", 29, 2.85, needs_imatrix=True),
        QuantType("Q2_K_S", 21, 2.87, needs_imatrix=True),
        QuantType("Q2_K", 10, 3.08),
        QuantType("IQ3_XXS", 23, 3.31, needs_imatrix=True),
        QuantType("IQ3_XS", 22, 3.41, needs_imatrix=True),
        QuantType("Q3_K_S", 11, 3.57),
        QuantType("IQ3_S", 26, 3.59),
        QuantType("IQ3_M", 27, 3.71),
        QuantType("Q3_K_M", 12, 3.95),
        QuantType("Q3_K_L", 13, 4.27),
        QuantType("IQ4_XS", 30, 4.40),
        QuantType("Q4_0", 2, 4.59),
        QuantType("Q4_K_S", 14, 4.62),
        QuantType("IQ4_NL", 25, 4.63),
        QuantType("Q4_K_M", 15, 4.85),
        QuantType("Q4_1", 3, 5.07),
        QuantType("Q5_0", 8, 5.55),
        QuantType("Q5_K_S", 16, 5.55),
        QuantType("Q5_K_M", 17, 5.68),
        QuantType("Q5_1", 9, 6.03),
        QuantType("Q6_K", 18, 6.56),
        QuantType("Q8_0", 7, 8.50),
    )
}


@dataclass(frozen=True)
class OutType:
    """An unquantized (or numpy-quantized) GGUF the converter writes itself."""

    name: str
    ftype: int

    @property
    def tensor_type(self):
        """The ggml type of its weight tensors (gguf's GGMLQuantizationType)."""
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name]


OUT_TYPES: dict[str, OutType] = {
    o.name: o
    for o in (
        OutType("F32", 0),
        OutType("F16", 1),
        OutType("BF16", 32),
        OutType("Q8_0", 7),
    )
}

# `--outtype auto`: keep the checkpoint's precision; f32 checkpoints become F16.
AUTO_OUT_TYPE = {"BF16": "BF16", "F16": "F16", "F32": "F16"}


# What llama-quantize records of the importance matrix a file was quantized with (tools/quantize/quantize.cpp).
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"


def parse_quant(name: str) -> QuantType:
    quant = QUANT_TYPES.get(name.upper())
    if quant is None:
        raise YiLocalError(
            f"unknown quantization type {name!r}",
            hint="choose one of: " + ", ".join(QUANT_TYPES),
        )
    return quant


def parse_outtype(name: str) -> OutType | None:
    """None means auto (decided from the checkpoint's dtype)."""
    if name.lower() == "auto":
        return None
    out = OUT_TYPES.get(name.upper())
    if out is None:
        raise YiLocalError(
            f"unknown output type {name!r}",
            hint="choose one of: auto, " + ", ".join(o.lower() for o in OUT_TYPES),
        )
    return out


def file_type_name(code: int | None) -> str:
    """The name of a GGUF's general.file_type: Q4_K_M, F16, ... (one table for every reader)."""
    for table in (QUANT_TYPES, OUT_TYPES):
        for entry in table.values():
            if int(entry.ftype) == code:
                return entry.name
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(code).name  # a level yi-local does not make, e.g. IQ2_XS
    except (ValueError, TypeError):
        return "unknown" if code is None else f"type {code}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


UNQUANTIZED = frozenset(int(o.ftype) for o in OUT_TYPES.values() if o.name != "Q8_0")  # F32, F16, BF16
