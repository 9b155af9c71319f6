"""How much memory a model needs and how fast it decodes: the one formula `doctor` and the offload planner use.

Memory: weights (a level's bits per weight, or the file's size), the KV cache at the context and its
type (f16 unless `--kv-type` says otherwise), and the compute buffers. Speed: decoding is memory-bound, so tokens/s ≈ bandwidth ÷ bytes read per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from yi_local.catalog import CatalogEntry
from yi_local.kv_types import DEFAULT_KV_TYPE, KV_TYPES
from yi_local.quant_types import QUANT_TYPES

# Compute buffers and the runtime itself, beside weights and KV cache.
OVERHEAD_BYTES = 300 << 20
# Use at most this share of the memory that is free: the system and other programs need the rest.
HEADROOM = 0.9
# Tokens per second below which a chat no longer feels interactive (reading speed is ~5-8 words/s).
INTERACTIVE_TPS = 10.0
# The levels `doctor` shows (the full list is in yi_local.quant_types).
# IQ2_M and IQ3_M: what fits Yi-34B into 16 GB (the store makes them with an importance matrix).
DOCTOR_LEVELS = ("IQ2_M", "Q2_K", "IQ3_M", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def kv_cache_bytes(n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int, kv_type: str = DEFAULT_KV_TYPE) -> int:
    """The KV cache of `n_ctx` tokens: K and V for every layer and KV head, at `kv_type` (llama.cpp's
    default f16: 2 bytes a value; q8_0 34 bytes per 32 values, q4_0 18)."""
    return 2 * n_layers * n_ctx * KV_TYPES[kv_type].bytes_for(n_kv_heads * head_dim)


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int
    embeddings: int = 0  # of the weights, the token embeddings: decoding reads one row of them a token

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + OVERHEAD_BYTES

    @property
    def read_per_token(self) -> int:
        """Bytes read to decode one token: every weight but the embedding table, and the whole KV cache."""
        return self.weights - self.embeddings + self.kv_cache

    def tokens_per_second(self, bandwidth: float) -> float:
        """Decode speed with `bandwidth` bytes/s of memory bandwidth: decoding is memory-bound."""
        return bandwidth / self.read_per_token


def usable_bytes(budget: int) -> int:
    """What weights and KV cache may take of `budget` free bytes: the headroom and buffers set aside."""
    return int(budget * HEADROOM) - OVERHEAD_BYTES


def fits(need: Need, budget: int) -> bool:
    return need.weights + need.kv_cache <= usable_bytes(budget)


def memory_needed(entry: CatalogEntry, quant: str, n_ctx: int, kv_type: str = DEFAULT_KV_TYPE) -> Need:
    """Bytes to run `entry` at `quant` with `n_ctx` tokens of context (at most its own) in a `kv_type` KV cache."""
    shape = entry.shape
    bpw = QUANT_TYPES[quant].bits_per_weight if quant in QUANT_TYPES else 16.0
    weights = int(entry.parameters * bpw / 8)
    kv = kv_cache_bytes(shape.layers, min(n_ctx, entry.context), shape.kv_heads, shape.head_dim, kv_type)
    return Need(weights=weights, kv_cache=kv, embeddings=int(shape.vocab * shape.hidden * bpw / 8))


@dataclass(frozen=True)
class Pick:
    entry: CatalogEntry
    quant: str
    need: Need
    tokens_per_second: float | None  # None: the bandwidth is not known

    @property
    def interactive(self) -> bool:
        return self.tokens_per_second is None or self.tokens_per_second >= INTERACTIVE_TPS


def recommend(entries: list[CatalogEntry], n_ctx: int, budget: int, bandwidth: float | None = None,
              kv_type: str = DEFAULT_KV_TYPE) -> Pick | None:  # fmt: skip
    """The biggest chat model that fits and decodes at INTERACTIVE_TPS or faster, at its best level (Q4_K_M
    or better preferred); when nothing that fits is that fast, the fastest that fits; None when nothing fits."""
    picks = []
    for entry in entries:
        for quant in DOCTOR_LEVELS:
            need = memory_needed(entry, quant, n_ctx, kv_type)
            if fits(need, budget):
                picks.append(Pick(entry, quant, need, None if bandwidth is None else need.tokens_per_second(bandwidth)))
    if not picks:
        return None

    def level(p: Pick) -> tuple[bool, float]:
        bpw = QUANT_TYPES[p.quant].bits_per_weight
        return bpw >= 4.8, bpw  # Q4_K_M and up first: below it, quality drops fast

    fast = [p for p in picks if p.interactive]
    if fast:
        return max(fast, key=lambda p: (p.entry.chat, level(p)[0], p.entry.parameters, level(p)[1]))
    return max(picks, key=lambda p: (p.entry.chat, level(p)[0], p.tokens_per_second))


# `--ctx 0` shrinks the model's own context to what fits in steps of this many tokens.
CONTEXT_STEP = 1024


def largest_context(n_train: int, kv_bytes_per_token: int, weights: int, budget: int, minimum: int) -> int:
    """The context `--ctx 0` takes: the model's own (`n_train`) when its KV cache fits beside the weights
    in `budget` free bytes (doctor's rule), else the largest multiple of CONTEXT_STEP that does; at least
    `minimum` (then llama.cpp's own error, if any, says what did not fit)."""
    room = usable_bytes(budget) - weights
    if kv_bytes_per_token <= 0 or n_train * kv_bytes_per_token <= room:
        return n_train
    fitting = max(0, room) // kv_bytes_per_token // CONTEXT_STEP * CONTEXT_STEP
    return max(minimum, min(n_train, fitting))
