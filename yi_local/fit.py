"""How much memory a model needs: the one formula `doctor` and the offload planner use.

Weights (a level's bits per weight, or the file's size), the f16 KV cache at the context, and the
compute buffers, within a headroom of the free memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from yi_local.catalog import CatalogEntry
from yi_local.quant_types import QUANT_TYPES
from yi_local.units import GIB

# Compute buffers and the runtime itself, beside weights and KV cache.
OVERHEAD_BYTES = 300 << 20
# Use at most this share of the memory that is free: the system and other programs need the rest.
HEADROOM = 0.9
# The levels `doctor` shows (the full list is in yi_local.quant_types).
DOCTOR_LEVELS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def kv_cache_bytes(n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """The KV cache of `n_ctx` tokens: K and V for every layer and KV head, f16 (llama.cpp's default)."""
    return 2 * n_layers * n_ctx * n_kv_heads * head_dim * bytes_per_value


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + OVERHEAD_BYTES


def usable_bytes(budget: int) -> int:
    """What weights and KV cache may take of `budget` free bytes: the headroom and buffers set aside."""
    return int(budget * HEADROOM) - OVERHEAD_BYTES


def fits(need: Need, budget: int) -> bool:
    return need.weights + need.kv_cache <= usable_bytes(budget)


def memory_needed(entry: CatalogEntry, quant: str, n_ctx: int) -> Need:
    """Bytes to run `entry` at `quant` with `n_ctx` tokens of context (f16 KV cache)."""
    shape = entry.shape
    bpw = QUANT_TYPES[quant].bits_per_weight if quant in QUANT_TYPES else 16.0
    kv = kv_cache_bytes(shape.layers, min(n_ctx, entry.context), shape.kv_heads, shape.head_dim)
    return Need(weights=int(entry.parameters * bpw / 8), kv_cache=kv)


def recommend(entries: list[CatalogEntry], n_ctx: int, budget: int) -> tuple[CatalogEntry, str] | None:
    """The biggest chat model that fits at Q4_K_M or better (its best such level), else the best that fits."""
    best = None
    for entry in entries:
        for quant in reversed(DOCTOR_LEVELS):
            if fits(memory_needed(entry, quant, n_ctx), budget):
                rank = (entry.chat, QUANT_TYPES[quant].bits_per_weight >= 4.8, entry.parameters, QUANT_TYPES[quant].bits_per_weight)
                if best is None or rank > best[0]:
                    best = (rank, entry, quant)
                break
    return None if best is None else (best[1], best[2])
