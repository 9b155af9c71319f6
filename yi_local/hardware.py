"""What this machine has: cores, memory, and the GPU llama.cpp can offload to."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from yi_local.errors import YiLocalError
from yi_local.units import format_size


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def llama_gpu_kind() -> str | None:
    """'CUDA', 'Metal', another GPU backend's name, or None when llama.cpp has no GPU here.

    A build with the RPC backend says it "supports GPU offload" on a CPU-only machine (to workers), so
    the answer comes from the devices ggml lists on this machine, RPC ones excluded."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return None
    try:
        from yi_local import rpc

        gpus = [d for d in rpc.local_devices() if d.kind in (rpc.DEVICE_GPU, rpc.DEVICE_IGPU)]
    except (OSError, AttributeError, YiLocalError):
        gpus = None  # the registry cannot be read: fall back to the build's description
    if gpus == []:
        return None
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for key, name in (("CUDA", "CUDA"), ("METAL", "Metal"), ("MTL", "Metal"), ("VULKAN", "Vulkan"), ("HIP", "ROCm")):
        if key in info:
            return name
    return "GPU"


def llama_devices() -> list[str]:
    """llama.cpp's compute devices, e.g. ["CUDA0: NVIDIA H100 80GB HBM3", "CPU: AMD EPYC 7B13"]; [] when
    they cannot be listed (ggml's device registry is not part of llama-cpp-python's public API)."""
    import ctypes

    try:
        from llama_cpp._ggml import libggml as lib

        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
        for f in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_char_p
        devices = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            name = (lib.ggml_backend_dev_name(dev) or b"?").decode(errors="replace")
            about = (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace").strip()
            devices.append(f"{name}: {about}" if about and about != name else name)
        return devices
    except (ImportError, OSError, AttributeError):
        return []


def gpu_free_bytes(kind: str | None) -> int | None:
    """Free memory on the offload device, or None when it cannot be told."""
    if kind == "Metal":
        # Unified memory: Metal lets a process wire about three quarters of RAM.
        import psutil

        return int(min(psutil.virtual_memory().available, psutil.virtual_memory().total * 0.75))
    if kind == "CUDA":
        try:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.mem_get_info()[0])
        except ImportError:
            pass
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=10, check=True,
                ).stdout  # fmt: skip
                return int(out.split()[0]) * 1024 * 1024
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return None
    return None


def memory_budget(kind: str | None, gpu_free: int | None) -> int:
    """The free memory a model and its KV cache may take: free RAM, plus a discrete GPU's free memory
    (Metal's is the RAM itself)."""
    import psutil

    ram = int(psutil.virtual_memory().available)
    return ram + (gpu_free or 0) if kind not in (None, "Metal") else ram


def cpu_name() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_summary() -> dict[str, str]:
    import psutil

    return {
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_name(),
        "cores": str(cpu_count()),
        "ram": format_size(psutil.virtual_memory().total),
    }
