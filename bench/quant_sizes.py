"""Bits per weight of every `--q` level on the real Yi shapes, from llama.cpp's own quantization rules.

A header-only F16 GGUF of each shape (its data a hole in a sparse file, no disk space) goes through
`llama_model_quantize` with `dry_run`, which applies llama.cpp's per-tensor type choices and sums the
sizes without quantizing. Prints file-level bits per weight (weights only), the figures
yi_local/quant_types.py keeps. Takes seconds; no model weights needed.

    PYTHONPATH=. .venv/bin/python bench/quant_sizes.py
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from bench.common import CORPUS
from converters.checkpoint import load_tensor_sources
from converters.convert import _metadata_writer
from converters.gguf_file import write_header
from converters.hf_config import read_model_params
from converters.tensors import plan_tensors
from converters.vocab import read_vocab
from tests.synthetic import YI_6B, Dims, build_checkpoint, build_sparse_checkpoint
from yi_local.llama_lib import llama_cpp
from yi_local.quant_types import OUT_TYPES, QUANT_TYPES

SHAPES = {
    "Yi-6B": YI_6B,
    "Yi-9B": Dims(hidden=4096, ffn=11008, layers=48, heads=32, kv_heads=4, vocab=64000),
    "Yi-34B": Dims(hidden=7168, ffn=20480, layers=60, heads=56, kv_heads=8, vocab=64000),
}


def header_only_gguf(folder: Path, dest: Path) -> int:
    """An F16 GGUF of the checkpoint `folder` whose tensor data is a hole; its parameter count."""
    params = read_model_params(folder)
    f16 = OUT_TYPES["F16"]
    plans = plan_tensors(load_tensor_sources(folder), params, f16.tensor_type)
    writer = _metadata_writer(folder.name, params, read_vocab(folder, params.vocab_size), f16)
    fout = write_header(dest, writer, plans)
    end = fout.tell() + sum(p.nbytes + (-p.nbytes % writer.data_alignment) for p in plans)
    writer.close()
    os.truncate(dest, end)
    return sum(math.prod(p.shape) for p in plans)


def dry_run_bytes(src: Path, ftype: int) -> int:
    """llama.cpp's size of `src` quantized to `ftype`, read from its log."""
    L = llama_cpp()
    params = L.llama_model_quantize_default_params()
    params.ftype, params.dry_run, params.nthread = ftype, True, 1
    # llama-cpp-python prints llama.cpp's log lines to sys.stderr when its logger lets them through.
    logging.getLogger("llama-cpp-python").setLevel(logging.INFO)
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        rc = L.llama_model_quantize(os.fsencode(src), b"/dev/null", ctypes.byref(params))
    finally:
        log, sys.stderr = sys.stderr.getvalue(), saved
    m = re.search(r"quant size\s*=\s*([\d.]+) MiB", log)
    if rc != 0 or m is None:
        raise SystemExit(f"dry run failed for ftype {ftype}:\n{log[-2000:]}")
    return int(float(m.group(1)) * (1 << 20))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        like = build_checkpoint(root / "like", CORPUS, variant="chat")
        print(f"{'level':<8}" + "".join(f"{name:>10}" for name in SHAPES))
        files = {}
        for name, dims in SHAPES.items():
            folder = build_sparse_checkpoint(root / name, like, dims)
            files[name] = (root / f"{name}.gguf", header_only_gguf(folder, root / f"{name}.gguf"))
        for level, q in QUANT_TYPES.items():
            row = [dry_run_bytes(path, q.ftype) * 8 / n for path, n in files.values()]
            print(f"{level:<8}" + "".join(f"{b:>10.2f}" for b in row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
