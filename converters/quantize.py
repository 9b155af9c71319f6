"""llama.cpp's own quantization, in-process through llama-cpp-python's `llama_model_quantize`."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Callable

from yi_local.atomic import atomic_output
from yi_local.gguf_header import read_header
from converters.llama_lib import llama_cpp as load_llama_cpp
from converters.quant_types import QuantType
from yi_local.errors import YiLocalError

# Bytes of tensor rows llama.cpp keeps in memory at once (its default is 8 GiB): small enough to
# keep peak RSS below llama-quantize's, large enough not to slow it down.
MAX_BUF_BYTES = 256 << 20


def quantize_file(
    src: Path,
    dest: Path,
    quant: QuantType,
    threads: int,
    force: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Quantize the GGUF `src` into `dest` atomically; `on_progress` gets the bytes written so far."""
    llama_cpp = load_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(quant.ftype)
    params.max_buf_size = MAX_BUF_BYTES
    result: list[int] = []

    with atomic_output(dest, force) as tmp:

        def run() -> None:
            result.append(llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)))

        # A daemon thread: ctypes releases the GIL, so Ctrl+C reaches the main thread at once and
        # atomic_output removes the temporary file while the process exits.
        worker = threading.Thread(target=run, name=f"quantize-{quant.name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if on_progress and tmp.exists():
                on_progress(tmp.stat().st_size)
        if not result or result[0] != 0:
            raise YiLocalError(
                f"llama.cpp could not quantize {src.name} to {quant.name} (code {result[0] if result else '?'})",
                hint="see the llama.cpp messages above; a model with unusual tensor shapes may not support this level",
            )
        _verify(tmp, quant)


def _verify(path: Path, quant: QuantType) -> None:
    header = read_header(path)
    file_type = header.metadata.get("general.file_type")
    if file_type != int(quant.ftype):
        raise YiLocalError(f"{path.name}: general.file_type is {file_type}, expected {int(quant.ftype)} ({quant.name})")
    if path.stat().st_size < header.data_end:
        raise YiLocalError(f"{path.name} is truncated: {path.stat().st_size} bytes, tensors need {header.data_end}")
