"""The importance matrix of a conversion: asked for, computed or reused, saved, and handed to the quantizer."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from converters.imatrix import CalibrationText, compute_imatrix
from converters.imatrix_file import Imatrix, read_imatrix, write_imatrix
from converters.progress import Progress
from converters.quantize import ImatrixUse, quantize_file
from yi_local.atomic import check_writable, scratch_file
from yi_local.errors import YiLocalError
from yi_local.quant_types import QUANT_TYPES, QuantType

# The packaged calibration text, recorded under this name in the matrix and the quantized files.
PACKAGED_CALIBRATION = "yi-local/calibration.txt"
MATRIX_SUFFIX = ".imatrix.gguf"
# Above this share of the memory available, the matrix is computed from a Q8_0 copy of the model:
# llama.cpp would otherwise page the F16 weights in from disk for every window.
MEMORY_SHARE = 0.7


@dataclass(frozen=True)
class ImatrixRequest:
    compute: bool = False  # --imatrix
    file: Path | None = None  # --imatrix-file: reuse this matrix
    calibration: Path | None = None  # --calibration: instead of the packaged text
    save: bool = True  # keep the computed matrix beside the outputs

    @property
    def wanted(self) -> bool:
        return self.compute or self.file is not None


def check_request(request: ImatrixRequest | None, quants: Sequence[QuantType]) -> Imatrix | None:
    """Everything wrong with the request, before anything is written; the reused matrix, read."""
    request = request or ImatrixRequest()
    needing = [q.name for q in quants if q.needs_imatrix]
    if needing and not request.wanted:
        raise YiLocalError(
            f"{', '.join(needing)} {'needs' if len(needing) == 1 else 'need'} an importance matrix",
            hint=f"add --imatrix to compute one from a packaged calibration text (or --imatrix-file FILE to reuse "
            f"one made by yi-local or llama-imatrix): --q {needing[0]} --imatrix",
        )
    if request.compute and request.file is not None:
        raise YiLocalError("--imatrix computes a matrix and --imatrix-file reuses one: give one of them")
    if request.calibration is not None and request.file is not None:
        raise YiLocalError("--calibration is the text a matrix is computed from; --imatrix-file reuses a matrix",
                           hint="leave out one of them")  # fmt: skip
    if request.wanted and not quants:
        raise YiLocalError("an importance matrix is used when quantizing", hint="add --q TYPE, e.g. --q IQ3_M")
    if request.calibration is not None:
        read_calibration(request.calibration)  # a missing or binary file is named now, not after converting
    return read_imatrix(request.file) if request.file is not None else None


def check_fit(imatrix: Imatrix, tensors: Sequence[tuple[str, tuple[int, ...]]], quants: Sequence[QuantType],
              source: Path) -> None:  # fmt: skip
    """A reused matrix must be this model's: llama.cpp would stop mid-quantization (or abort) otherwise."""
    weights = imatrix.normalized()
    shapes = dict(tensors)
    common = [n for n in weights if n in shapes]
    if not common:
        raise YiLocalError(f"the importance matrix {source} has no entry for any tensor of this model",
                           hint="use a matrix computed for this model, or --imatrix to compute one")  # fmt: skip
    for name in common:
        shape = shapes[name]
        want = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if weights[name].size != want:
            raise YiLocalError(
                f"the importance matrix {source} is for another model: it has {weights[name].size} values for "
                f"{name}, whose rows have {want}",
                hint="use a matrix computed for this model, or --imatrix to compute one",
            )
        if not np.isfinite(weights[name]).all():
            raise YiLocalError(f"the importance matrix {source} holds non-finite values for {name}",
                               hint="compute a new one with --imatrix")  # fmt: skip
    missing = [n for n, shape in tensors if n.startswith("blk.") and len(shape) >= 2 and n not in weights]
    needing = [q.name for q in quants if q.needs_imatrix]
    if missing and needing:
        raise YiLocalError(f"the importance matrix {source} has no entry for {missing[0]}, which {needing[0]} needs",
                           hint="compute a matrix for this model with --imatrix")  # fmt: skip


def read_calibration(path: Path | None) -> CalibrationText:
    if path is None:
        text = (importlib.resources.files("yi_local") / "texts" / "calibration.txt").read_text("utf-8")
        return CalibrationText(text, PACKAGED_CALIBRATION)
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise YiLocalError(f"cannot read the calibration text {path}: {e.strerror}", hint="give a readable text file") from None
    except UnicodeDecodeError:
        raise YiLocalError(f"the calibration text {path} is not UTF-8 text", hint="give a plain UTF-8 text file") from None
    return CalibrationText(text, path.name)


def matrix_path(out_dir: Path, model_name: str) -> Path:
    return out_dir / f"{model_name}{MATRIX_SUFFIX}"


def check_matrix_output(request: ImatrixRequest | None, out_dir: Path, model_name: str, force: bool,
                        inputs: Sequence[Path]) -> Path | None:  # fmt: skip
    """Where a computed matrix will be saved (checked writable now), or None when none is saved."""
    if request is None or not request.compute or not request.save:
        return None
    path = matrix_path(out_dir, model_name)
    check_writable(path, force, inputs)
    return path


def prepare_imatrix(request: ImatrixRequest, reused: Imatrix | None, base: Path, save_to: Path | None,
                    threads: int, progress: Progress, force: bool) -> tuple[ImatrixUse, Imatrix]:  # fmt: skip
    """The matrix the quantizer takes: `reused`, or computed from the unquantized GGUF `base` (and saved)."""
    if reused is not None:
        assert request.file is not None
        return _use(reused, request.file.name), reused
    calibration = read_calibration(request.calibration)
    if base.stat().st_size > MEMORY_SHARE * _available_memory():
        with scratch_file(base.parent, f"{base.stem}.imatrix-source-Q8_0.gguf") as q8:
            task = progress.task("quantize → Q8_0 (for the importance matrix)", base.stat().st_size // 2)
            try:
                quantize_file(base, q8, QUANT_TYPES["Q8_0"], threads, force=True, on_progress=task.update)
            finally:
                task.close()
            imatrix = compute_imatrix(q8, calibration, threads, progress)
    else:
        imatrix = compute_imatrix(base, calibration, threads, progress)
    name = base.name
    if save_to is not None:
        write_imatrix(save_to, imatrix, force=force)
        name = save_to.name
    return _use(imatrix, name), imatrix


def _use(imatrix: Imatrix, file_name: str) -> ImatrixUse:
    return ImatrixUse(weights=imatrix.normalized(), file=file_name, dataset=imatrix.datasets[0] if imatrix.datasets else "",
                      chunks=imatrix.chunk_count)  # fmt: skip


def provenance(use: ImatrixUse, imatrix: Imatrix) -> dict:
    """What the store records of the matrix a file was quantized with (its digest: of the weights it gave)."""
    digest = hashlib.sha256()
    for name in sorted(use.weights):
        digest.update(name.encode())
        digest.update(use.weights[name].tobytes())
    return {"file": use.file, "dataset": use.dataset, "chunks": imatrix.chunk_count, "entries": len(use.weights),
            "sha256": digest.hexdigest()}  # fmt: skip


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
