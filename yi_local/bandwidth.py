"""The memory bandwidth decoding gets where llama.cpp runs the model: it sets the decode speed.

GPUs: the maker's peak figure for the chip, times the share llama.cpp's decode reaches; unknown CUDA
cards are measured with torch when it is installed. CPUs: measured with llama.cpp's own kernel, the
Q4_K matrix-vector product decoding spends its time in, over a matrix beyond the caches on the threads
llama.cpp would use. On a CPU with few cores that kernel, not the memory, is the limit: a plain memory
copy ran 3-4x faster than decoding did on a 2-core VM, while this measure came within 20% of it.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from yi_local import hardware
from yi_local.errors import YiLocalError
from yi_local.runtime.params import MAX_THREADS  # ggml's GGML_MAX_N_THREADS: more aborts llama.cpp (its quantizer too)
from yi_local.llama_lib import llama_cpp
from yi_local.units import format_size

# Peak memory bandwidth in GB/s, from NVIDIA's data sheets; matched as whole words, first match wins.
NVIDIA_GBPS = {
    "H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100": 1555, "L40S": 864, "L4": 300,
    "A10G": 600, "A10": 600, "T4": 320, "RTX 4090": 1008, "RTX 4080": 717, "RTX 3090": 936, "RTX 3080": 760,
}  # fmt: skip
# Apple's tech specs; the M3 Max and M4 Max figures are those of their smaller-GPU models.
APPLE_GBPS = {
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800, "M2": 100, "M2 Pro": 200, "M2 Max": 400,
    "M2 Ultra": 800, "M3": 100, "M3 Pro": 150, "M3 Max": 300, "M3 Ultra": 819, "M4": 120, "M4 Pro": 273,
    "M4 Max": 410,
}  # fmt: skip
# The share of a GPU's peak llama.cpp's decode reaches: 57% on an M1 Max (Llama-3.1-8B Q4_K_M,
# 46 tok/s × 4.9 GB of 400 GB/s), 85% on an M4, ~57% on an RTX 4090 (7B Q4_0).
GPU_SHARE = 0.6
COPY_SHARE = 0.85  # the share of the peak a device-to-device copy reaches


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float  # what decoding gets
    how: str  # where the figure comes from, in a few words


def decode_bandwidth(gpu_kind: str | None) -> Bandwidth | None:
    """For llama.cpp's `gpu_kind` (None: a CPU build); None when it cannot be told."""
    if gpu_kind == "Metal":
        chip = apple_chip(hardware.cpu_name())
        if chip is not None:
            return _known(f"Apple {chip}", APPLE_GBPS[chip])
        cpu = measure_cpu()
        return None if cpu is None else Bandwidth(cpu.bytes_per_s, f"{cpu.how} on the CPU; the GPU may be faster")
    if gpu_kind == "CUDA":
        name = nvidia_name()
        gbps = known_nvidia(name) if name else None
        if gbps is not None:
            return _known(name, gbps)
        return measure_cuda()
    if gpu_kind is None:
        return measure_cpu()
    return None


def apple_chip(brand: str) -> str | None:
    """`Apple M2 Pro` → `M2 Pro`, when the table has it."""
    m = re.search(r"\b(M\d+)(?: (Pro|Max|Ultra))?\b", brand)
    chip = m and " ".join(filter(None, m.groups()))
    return chip if chip in APPLE_GBPS else None


def known_nvidia(name: str) -> int | None:
    for key, gbps in NVIDIA_GBPS.items():
        if re.search(rf"\b{re.escape(key)}\b", name, re.IGNORECASE):
            return gbps
    return None


def nvidia_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
            return out.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def _known(name: str, gbps: int) -> Bandwidth:
    return Bandwidth(gbps * 1e9 * GPU_SHARE, f"{name}: {gbps} GB/s peak × {GPU_SHARE:.0%} reached by llama.cpp")


class _InitParams(ctypes.Structure):  # ggml.h: struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def measure_cpu(threads: int | None = None) -> Bandwidth | None:
    """The bytes of Q4_K weights per second llama.cpp's CPU kernel multiplies by a vector, as in decoding:
    a 4096-wide matrix well beyond the caches, the best of a few passes. None without llama.cpp's libraries."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        base, cpu = _ggml()
    except (ImportError, OSError, AttributeError, RuntimeError, YiLocalError):  # no llama-cpp-python, or not this one
        return None
    threads = min(threads or hardware.cpu_count(), MAX_THREADS)
    cols, (block, block_bytes) = 4096, GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    row_bytes = cols // block * block_bytes
    rows = _buffer_bytes() // row_bytes
    bookkeeping = 8 * base.ggml_tensor_overhead() + base.ggml_graph_overhead() + (8 << 20)
    size = rows * row_bytes + 4 * (cols + rows) + bookkeeping
    buffer = np.ones(size, np.uint8)  # pages in before timing; the values do not change the speed
    ctx = base.ggml_init(_InitParams(size, buffer.ctypes.data, False))
    try:
        weights = base.ggml_new_tensor_2d(ctx, int(GGMLQuantizationType.Q4_K), cols, rows)
        vector = base.ggml_new_tensor_2d(ctx, int(GGMLQuantizationType.F32), cols, 1)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, base.ggml_mul_mat(ctx, weights, vector))
        best = float("inf")
        for _ in range(4):
            start = time.perf_counter()
            if cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) != 0:
                return None
            best = min(best, time.perf_counter() - start)
    finally:
        base.ggml_free(ctx)
    rate = rows * row_bytes / best
    return Bandwidth(rate, f"measured: llama.cpp's Q4_K kernel reads {rate / 1e9:.1f} GB/s of weights "
                           f"here ({threads} threads, {format_size(rows * row_bytes)})")  # fmt: skip


def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """ggml's base and CPU libraries as llama-cpp-python ships them, with the signatures used here."""
    from llama_cpp._ctypes_extensions import load_shared_library

    folder = Path(llama_cpp().__file__).parent / "lib"
    base, cpu = load_shared_library("ggml-base", folder), load_shared_library("ggml-cpu", folder)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn, restype, argtypes in (
        (base.ggml_init, p, [_InitParams]), (base.ggml_free, None, [p]),
        (base.ggml_tensor_overhead, ctypes.c_size_t, []), (base.ggml_graph_overhead, ctypes.c_size_t, []),
        (base.ggml_new_tensor_2d, p, [p, ctypes.c_int, i64, i64]), (base.ggml_mul_mat, p, [p, p, p]),
        (base.ggml_new_graph, p, [p]), (base.ggml_build_forward_expand, None, [p, p]),
        (cpu.ggml_graph_compute_with_ctx, ctypes.c_int, [p, p, ctypes.c_int]),
    ):  # fmt: skip
        fn.restype, fn.argtypes = restype, argtypes
    return base, cpu


def measure_cuda() -> Bandwidth | None:
    """A device-to-device copy with torch, when it is installed with CUDA, over up to 1 GiB (a quarter of
    what is free). A copy reaches about `COPY_SHARE` of the peak; decoding `GPU_SHARE` of it."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        size = min(1 << 30, torch.cuda.mem_get_info()[0] // 4)
        if size < 64 << 20:
            return None
        src, dst = torch.ones(size, dtype=torch.uint8, device="cuda"), torch.empty(size, dtype=torch.uint8, device="cuda")
        dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        name = torch.cuda.get_device_name(0)
        del src, dst
        torch.cuda.empty_cache()
    except RuntimeError:  # out of memory (another process holds the card), a driver error
        return None
    gbps = 2 * size * 5 / elapsed / 1e9
    share = GPU_SHARE / COPY_SHARE
    return Bandwidth(gbps * 1e9 * share, f"{name}: a copy measured {gbps:.0f} GB/s; × {share:.0%} for llama.cpp")


def _buffer_bytes() -> int:
    """Beyond the last-level cache and at least 256 MiB; at most 512 MiB and a sixteenth of the free memory."""
    import psutil

    cache = 0
    try:  # Linux; elsewhere the floor is beyond any cache a laptop has
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size", encoding="ascii") as f:
            text = f.read().strip()
        cache = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
    except (OSError, ValueError, IndexError):
        pass
    return int(min(max(2 * cache, 256 << 20), 512 << 20, psutil.virtual_memory().available // 16))
