"""Benchmark models, synthesized once into bench/out: Yi-6B's real tensor shapes with fewer layers, and the
tests' tiny Yi-shaped chat model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from common import CORPUS, OUT

from tests.synthetic import YI_6B, build_checkpoint


def yi6b_checkpoint(layers: int = 8) -> Path:
    model = OUT / f"Yi-6B-{layers}L"
    if not (model / "model.safetensors.index.json").is_file():
        print(f"synthesizing {model} (Yi-6B shapes, {layers} layers)…", flush=True)
        shutil.rmtree(model, ignore_errors=True)
        build_checkpoint(model, CORPUS, variant="chat", dims=replace(YI_6B, layers=layers), fast_weights=True)
    return model


def yi6b_gguf(quant: str = "Q4_K_M", layers: int = 8) -> Path:
    path = OUT / f"Yi-6B-{layers}L-{quant}.gguf"
    if not path.is_file():
        model = yi6b_checkpoint(layers)
        subprocess.run([sys.executable, "-m", "yi_local", "convert", str(model), "--q", quant, "-o", str(path)],
                       check=True)  # fmt: skip
    return path


def tiny_gguf(quant: str = "Q8_0") -> Path:
    """The tests' tiny chat model: checks a benchmark script end to end in seconds."""
    path = OUT / f"Yi-Tiny-chat-{quant}.gguf"
    if not path.is_file():
        model = OUT / "Yi-Tiny-chat"
        if not (model / "model.safetensors.index.json").is_file():
            build_checkpoint(model, CORPUS, variant="chat")
        subprocess.run([sys.executable, "-m", "yi_local", "convert", str(model), "--q", quant, "-o", str(path)],
                       check=True)  # fmt: skip
    return path
