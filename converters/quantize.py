"""llama.cpp's own quantization, in-process through llama-cpp-python's `llama_model_quantize`."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import Keys

from yi_local.atomic import atomic_output
from yi_local.errors import YiLocalError
from yi_local.units import format_size
from yi_local.gguf_header import read_header
from yi_local.llama_lib import llama_cpp as load_llama_cpp
from yi_local.quant_types import (KEY_IMATRIX_CHUNKS, KEY_IMATRIX_DATASET, KEY_IMATRIX_ENTRIES,
                                  KEY_IMATRIX_FILE, QuantType)

# Bytes of tensor rows llama.cpp keeps in memory at once (its default is 8 GiB): small enough to
# keep peak RSS below llama-quantize's, large enough not to slow it down.
MAX_BUF_BYTES = 256 << 20


@dataclass(frozen=True)
class ImatrixUse:
    """An importance matrix as the quantizer takes it: per weight, each column's mean squared input."""

    weights: dict[str, np.ndarray]  # float32, by tensor name
    file: str  # the matrix file's name, recorded in the output
    dataset: str  # the calibration text's name
    chunks: int

    def provenance(self) -> dict[str, str | int]:
        return {KEY_IMATRIX_FILE: self.file, KEY_IMATRIX_DATASET: self.dataset,
                KEY_IMATRIX_ENTRIES: len(self.weights), KEY_IMATRIX_CHUNKS: self.chunks}  # fmt: skip


def quantize_file(
    src: Path,
    dest: Path,
    quant: QuantType,
    threads: int,
    force: bool = False,
    on_progress: Callable[[int], None] | None = None,
    expected_bytes: int = 0,
    imatrix: ImatrixUse | None = None,
) -> None:
    """Quantize the GGUF `src` into `dest` atomically; `on_progress` gets the bytes written so far."""
    llama_cpp = load_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(quant.ftype)
    params.max_buf_size = MAX_BUF_BYTES
    if quant.needs_imatrix and imatrix is None:
        raise YiLocalError(f"{quant.name} needs an importance matrix",
                           hint=f"add --imatrix to compute one (or --imatrix-file FILE to reuse one): --q {quant.name} --imatrix")  # fmt: skip
    keep_alive = _set_imatrix(llama_cpp, params, imatrix) if imatrix is not None else None
    result: list[int] = []

    # llama.cpp opens its output by name: it writes into a private folder, never through a path
    # someone else could have put a link at.
    with atomic_output(dest, force, private_dir=True) as tmp:

        def run() -> None:
            result.append(llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params)))

        # A daemon thread: ctypes releases the GIL, so Ctrl+C reaches the main thread at once and
        # atomic_output removes the temporary folder while the process exits.
        worker = threading.Thread(target=run, name=f"quantize-{quant.name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if on_progress and tmp.exists():
                on_progress(tmp.stat().st_size)
        del keep_alive  # the arrays llama.cpp read from, kept until it returned
        if not result or result[0] != 0:
            _explain_failure(src, dest, tmp, quant, expected_bytes)
        _verify(tmp, quant)


def _set_imatrix(llama_cpp, params, imatrix: ImatrixUse) -> list:
    """Point `params` at the matrix (a NULL-named entry ends the array) and its provenance keys."""
    names = sorted(imatrix.weights)
    arrays = [np.ascontiguousarray(imatrix.weights[n], dtype=np.float32) for n in names]
    data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, (name, a) in enumerate(zip(names, arrays)):
        data[i].name = name.encode()
        data[i].data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        data[i].size = a.size
    provenance = imatrix.provenance()
    kvs = (llama_cpp.llama_model_kv_override * (len(provenance) + 1))()  # an empty key ends the array
    for kv, (key, value) in zip(kvs, provenance.items()):
        kv.key = key.encode()
        if isinstance(value, int):
            kv.tag, kv.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            kv.tag, kv.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127].decode("utf-8", "ignore").encode()
    params.imatrix = data
    params.kv_overrides = kvs
    return [data, arrays, kvs]


def _explain_failure(src: Path, dest: Path, tmp: Path, quant: QuantType, expected: int) -> None:
    """llama.cpp says only that it failed: tell a full disk (or a file size limit) from a model it cannot quantize."""
    written = tmp.stat().st_size if tmp.exists() else 0
    free = shutil.disk_usage(dest.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and written >= limit:
        raise YiLocalError(
            f"could not write {dest}: it reached this shell's file size limit ({limit:,} bytes, `ulimit -f`)",
            hint="raise the limit (`ulimit -f unlimited`) and convert again; nothing was written",
        )
    if free < max(expected - written, 0) + (16 << 20):
        raise YiLocalError(
            f"could not write {dest}: the disk is full ({format_size(free)} free in {dest.parent}, "
            f"the {quant.name} file needs about {format_size(expected)})",
            hint="free some space or write elsewhere with -o; nothing was written",
        )
    raise YiLocalError(
        f"llama.cpp could not quantize {src.name} to {quant.name}",
        hint="see the llama.cpp messages above (run with -v for all of them); a model with unusual tensor "
        "shapes may not support this level",
    )


def _verify(path: Path, quant: QuantType) -> None:
    header = read_header(path)  # also refuses a file whose tensors run past its end
    file_type = header.get_int(Keys.General.FILE_TYPE)
    if file_type != int(quant.ftype):
        raise YiLocalError(f"{path.name}: general.file_type is {file_type}, expected {int(quant.ftype)} ({quant.name})")
