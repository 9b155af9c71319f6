"""Where doctor's bandwidth comes from: GPUs looked up by the names their drivers report, CPUs measured."""

from __future__ import annotations

import re
import sys

import pytest

from yi_local.bandwidth import GPU_SHARE, apple_chip, decode_bandwidth, known_nvidia, measure_cpu


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H200", 4800),
    ("NVIDIA A100-SXM4-80GB", 1555), ("NVIDIA A10G", 600), ("NVIDIA A10", 600), ("NVIDIA L4", 300),
    ("NVIDIA L40S", 864), ("Tesla T4", 320), ("NVIDIA GeForce RTX 4090", 1008),
    ("NVIDIA GeForce GTX 1080", None), ("NVIDIA RTX A6000", None),  # not in the table: measured instead
])  # fmt: skip
def test_nvidia_names(name, gbps):
    assert known_nvidia(name) == gbps


@pytest.mark.parametrize("brand, chip", [
    ("Apple M1", "M1"), ("Apple M2 Pro", "M2 Pro"), ("Apple M3 Max", "M3 Max"), ("Apple M4", "M4"),
    ("Apple M9 Max", None), ("Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz", None),
])  # fmt: skip
def test_apple_chips(brand, chip):
    assert apple_chip(brand) == chip


def test_the_cpu_is_measured_with_llama_cpps_kernel():
    bw = measure_cpu()
    assert bw is not None and 0.2e9 < bw.bytes_per_s < 2e12, bw  # from a Raspberry Pi to a 12-channel server
    pattern = r"measured: llama.cpp's Q4_K kernel reads [\d.]+ GB/s of weights here \(\d+ threads, [\d.]+ MiB\)"
    assert re.fullmatch(pattern, bw.how), bw.how
    here = decode_bandwidth(None)  # a CPU build of llama.cpp
    assert here is not None and here.how.startswith("measured: llama.cpp's Q4_K kernel")


def test_a_gpu_backend_without_figures_is_unknown():
    assert decode_bandwidth("Vulkan") is None
    assert 0 < GPU_SHARE < 1


def test_without_llama_cpp_python_the_cpu_is_unknown_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp._ctypes_extensions", None)  # `import` raises ImportError
    assert measure_cpu() is None


def test_doctor_says_how_to_give_an_unknown_bandwidth(monkeypatch, capsys):
    from yi_local import bandwidth
    from yi_local.cli import main

    monkeypatch.setattr(bandwidth, "decode_bandwidth", lambda gpu_kind: None)
    assert main(["doctor", "--memory", "16"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("bandwidth"))
    assert line.split(None, 1)[1] == "unknown here: pass --bandwidth GBPS"
