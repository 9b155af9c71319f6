"""`--n-gpu-layers auto`: every layer on the GPU when the model fits, else as many as fit, else none.

"Fits" is `doctor`'s rule (yi_local.fit): weights, KV cache and compute buffers within the headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from yi_local import hardware
from yi_local.fit import Need, fits, largest_context, usable_bytes
from yi_local.runtime.params import MIN_CTX


@dataclass(frozen=True)
class OffloadPlan:
    n_gpu_layers: int  # for llama.cpp: -1 means all
    description: str  # "CPU", "Metal", "CUDA 33/33 layers", ...


def plan_offload(requested: int | str, model_bytes: int, n_layers: int, kv_bytes: int,
                 gpu_kind: str | None, free_bytes: int | None) -> OffloadPlan:  # fmt: skip
    total_layers = n_layers + 1  # llama.cpp counts the output layer too
    if gpu_kind is None:
        return OffloadPlan(0, "CPU")
    if requested != "auto":
        n = int(requested)
        n = total_layers if n < 0 or n > total_layers else n
        return OffloadPlan(n, _describe(gpu_kind, n, total_layers))
    if free_bytes is None or fits(Need(weights=model_bytes, kv_cache=kv_bytes), free_bytes):
        return OffloadPlan(-1, _describe(gpu_kind, total_layers, total_layers))
    per_layer = (model_bytes + kv_bytes) / total_layers
    n = max(0, min(total_layers, int(usable_bytes(free_bytes) / per_layer)))
    return OffloadPlan(n, _describe(gpu_kind, n, total_layers))


def _describe(kind: str, n: int, total: int) -> str:
    if n == 0:
        return "CPU"
    if kind == "Metal" and n == total:
        return "Metal"
    return f"{kind} {n}/{total} layers"


def own_context(n_train: int, kv_bytes_per_token: int, weights: int, budget: int | None, gpu: str | None,
                gpu_free: int | None, workers_free: int = 0) -> tuple[int, int | None]:
    """`--ctx 0`: the model's own context (`n_train`), or the most of it whose KV cache fits beside the
    weights in `budget` free bytes (None: what is free here and on the RPC workers). (the context, the
    budget when it had to shrink, else None)."""
    if budget is None:
        budget = hardware.memory_budget(gpu, gpu_free) + workers_free
    n_ctx = largest_context(n_train, kv_bytes_per_token, weights, budget, MIN_CTX)
    return n_ctx, budget if n_ctx < n_train else None
