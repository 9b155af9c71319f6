"""The KV cache types (`--kv-type`) and flash-attention modes (`--flash-attn`), as data.

A quantized cache stores keys and values in blocks of 32 with a scale: q8_0 takes 34 bytes a block
(1.0625 bytes a value, 53% of f16), q4_0 18 (0.5625, 28%). llama.cpp can read a quantized V cache
only inside flash attention, so q8_0 and q4_0 need it on; CUDA builds compile flash attention only
for matching K/V pairs (f16, bf16, q8_0/q8_0, q4_0/q4_0) unless built with all quants, so one type
sets both. Plain numbers (ggml's `ggml_type` ids), so that `--help` loads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from yi_local.errors import YiLocalError


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_type: int  # ggml's enum ggml_type
    block_values: int  # values per block
    block_bytes: int  # bytes per block

    @property
    def quantized(self) -> bool:
        return self.block_values > 1

    def bytes_for(self, n_values: int) -> int:
        """Bytes of `n_values` values in rows whose length is a multiple of the block (head_dim is)."""
        return -(-n_values // self.block_values) * self.block_bytes


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f16", 1, 1, 2),
        KVType("bf16", 30, 1, 2),
        KVType("q8_0", 8, 32, 34),
        KVType("q4_0", 2, 32, 18),
    )
}
DEFAULT_KV_TYPE = "f16"

FLASH_ATTN_MODES = ("auto", "on", "off")
# llama.cpp's enum llama_flash_attn_type
FLASH_ATTN_IDS = {"auto": -1, "off": 0, "on": 1}


class KVSettingError(YiLocalError):
    """A KV type and flash-attention mode that cannot go together, or that this model cannot use."""

    def __init__(self, message: str, hint: str | None = None, name: str = "kv_type"):
        super().__init__(message, hint=hint)
        self.name = name


def check_kv(kv_type: str, flash_attn: str, head_dim: int | None = None) -> KVType:
    """The KV type, once it is known to work with `flash_attn` (and with `head_dim`, when known)."""
    kv = KV_TYPES.get(kv_type)
    if kv is None:
        raise KVSettingError(f"unknown KV cache type {kv_type!r}", hint=f"use one of {', '.join(KV_TYPES)}")
    if flash_attn not in FLASH_ATTN_MODES:
        raise KVSettingError(f"unknown flash-attention mode {flash_attn!r}",
                             hint=f"use one of {', '.join(FLASH_ATTN_MODES)}", name="flash_attn")  # fmt: skip
    if kv.quantized and flash_attn == "off":
        raise KVSettingError(f"a {kv.name} KV cache needs flash attention, but it is off",
                             hint=f"use --flash-attn auto or on with --kv-type {kv.name}, "
                             "or --kv-type f16 with --flash-attn off", name="flash_attn")  # fmt: skip
    if kv.quantized and head_dim is not None and head_dim % kv.block_values:
        raise KVSettingError(f"a {kv.name} KV cache stores blocks of {kv.block_values} values, and this model's "
                             f"attention heads have {head_dim}, which is not a multiple of that",
                             hint="use --kv-type f16 with this model")  # fmt: skip
    return kv
