"""Which model and quantization fits this machine: weights at each level's bits per weight plus the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

from yi_local.catalog import CatalogEntry
from yi_local.quant_types import QUANT_TYPES

GIB = 1 << 30
# Compute buffers and the runtime itself, beside weights and KV cache.
OVERHEAD_BYTES = 300 << 20
# Use at most this share of the memory that is free: the system and other programs need the rest.
HEADROOM = 0.9
# The levels `doctor` shows (the full list is in yi_local.quant_types).
DOCTOR_LEVELS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + OVERHEAD_BYTES


def memory_needed(entry: CatalogEntry, quant: str, n_ctx: int) -> Need:
    """Bytes to run `entry` at `quant` with `n_ctx` tokens of context (f16 KV cache)."""
    bpw = QUANT_TYPES[quant].bits_per_weight if quant in QUANT_TYPES else 16.0
    return Need(weights=int(entry.parameters * bpw / 8), kv_cache=entry.shape.kv_bytes(min(n_ctx, entry.context)))


def fits(need: Need, budget: int) -> bool:
    return need.total <= budget * HEADROOM


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
