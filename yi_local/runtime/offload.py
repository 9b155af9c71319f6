"""`--n-gpu-layers auto`: every layer on the GPU when the model fits, else as many as fit, else none."""

from __future__ import annotations

from dataclasses import dataclass

# Room left on the device for the KV cache, compute buffers and other programs.
HEADROOM = 0.9


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
    if free_bytes is None or model_bytes + kv_bytes <= free_bytes * HEADROOM:
        return OffloadPlan(-1, _describe(gpu_kind, total_layers, total_layers))
    per_layer = (model_bytes + kv_bytes) / total_layers
    n = max(0, min(total_layers, int(free_bytes * HEADROOM / per_layer)))
    return OffloadPlan(n, _describe(gpu_kind, n, total_layers))


def _describe(kind: str, n: int, total: int) -> str:
    if n == 0:
        return "CPU"
    if kind == "Metal" and n == total:
        return "Metal"
    return f"{kind} {n}/{total} layers"
