"""The weights of a Hugging Face checkpoint folder, checked up front and read one tensor at a time.

Safetensors shards are parsed by `gguf.utility.SafetensorsLocal` (header only) and read with
`readinto` into caller-owned buffers, so memory stays flat however large the model is.
`pytorch_model*.bin` checkpoints need torch and are loaded memory-mapped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.hf_config import read_json
from yi_local.errors import YiLocalError

MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit
# safetensors dtype -> (our dtype name, bytes per element)
_ST_DTYPES = {"BF16": ("BF16", 2), "F16": ("F16", 2), "F32": ("F32", 4)}
_NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


@dataclass
class TensorSource:
    """One tensor of the checkpoint: where its bytes are and how to read a range of its rows."""

    name: str
    dtype: str  # BF16, F16 or F32
    shape: tuple[int, ...]
    path: Path | None = None  # safetensors file
    offset: int = 0  # absolute byte offset of the data in `path`
    array: Any = None  # a numpy array (from a .bin checkpoint) instead of a file range

    @property
    def itemsize(self) -> int:
        return np.dtype(_NP_DTYPES[self.dtype]).itemsize

    @property
    def row_len(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else self.shape[0]

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def read_rows(self, fd: int | None, start: int, stop: int, buf: np.ndarray) -> np.ndarray:
        """Rows [start, stop) as a 2-D array of the source dtype (BF16 as uint16) backed by `buf`.

        `fd` is the open file of `path`; `pread` makes concurrent reads from threads safe.
        """
        n = (stop - start) * self.row_len
        out = buf[: n * self.itemsize].view(_NP_DTYPES[self.dtype]).reshape(stop - start, self.row_len)
        if self.array is not None:
            np.copyto(out, self.array.reshape(self.n_rows, self.row_len)[start:stop])
            return out
        assert fd is not None
        got = os.preadv(fd, [memoryview(out).cast("B")], self.offset + start * self.row_len * self.itemsize)
        if got != out.nbytes:
            raise YiLocalError(
                f"{self.path}: ended early while reading {self.name}",
                hint="the file changed or was truncated during conversion; download it again",
            )
        return out


def _check_safetensors(path: Path) -> list[TensorSource]:
    """The tensors of one shard, their header checked against the file: types, sizes, offsets, overlaps."""
    from gguf.utility import SafetensorsLocal

    fix = f"delete {path.name} and download it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise YiLocalError(f"{path} cannot be read: {e.strerror}", hint="check the file's permissions") from None
    header_len = int.from_bytes(head, "little")
    if len(head) < 8 or 8 + header_len > size:
        raise YiLocalError(f"{path} is truncated or not a safetensors file: {size:,} bytes on disk, its header "
                           f"alone claims {8 + header_len:,}", hint=fix)  # fmt: skip
    if header_len > MAX_SAFETENSORS_HEADER:
        raise YiLocalError(f"{path} claims a {header_len:,}-byte header (the format allows 100 MB)", hint=fix)
    try:
        tensors = SafetensorsLocal(path).tensors
    except (ValueError, UnicodeDecodeError, OSError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise YiLocalError(f"{path} is not a readable safetensors file ({e})", hint=fix) from None
    data_start, data_size = 8 + header_len, size - 8 - header_len
    sources, extents = [], []
    for name, t in tensors.items():
        if not isinstance(t.dtype, str) or t.dtype not in _ST_DTYPES:
            raise YiLocalError(
                f"{path}: tensor {name} has dtype {t.dtype}",
                hint="yi-local reads bf16, f16 and f32 checkpoints; this one looks quantized or corrupt",
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t.shape):
            raise YiLocalError(f"{path}: tensor {name} has shape {list(t.shape)}", hint=fix)
        begin, length = t.data_range.offset - data_start, t.data_range.size
        if not (isinstance(begin, int) and isinstance(length, int)) or begin < 0 or length < 0:
            raise YiLocalError(f"{path}: tensor {name} has data offsets [{begin}, {begin + length}]", hint=fix)
        dtype, itemsize = _ST_DTYPES[t.dtype]
        expected = math.prod(t.shape) * itemsize
        if length != expected:
            raise YiLocalError(
                f"{path}: tensor {name} header says {length} bytes but its shape "
                f"{list(t.shape)} needs {expected}",
                hint=fix,
            )
        extents.append((begin, begin + length, name))
        sources.append(TensorSource(name, dtype, tuple(t.shape), path=path, offset=t.data_range.offset))
    extents.sort()
    for (_, end, first), (begin, _, second) in zip(extents, extents[1:]):
        if begin < end:
            raise YiLocalError(f"{path}: the data of tensors {first} and {second} overlap", hint=fix)
    data_end = max((end for _, end, _ in extents), default=0)
    if data_end > data_size:
        raise YiLocalError(
            f"{path} is truncated: {size:,} bytes on disk, its header needs {data_start + data_end:,}",
            hint=fix,
        )
    return sources


def _safetensors_files(model_dir: Path) -> list[Path] | None:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise YiLocalError(f"{index} has no weight_map of tensor -> file", hint="download it again")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).name != n or n in (".", "..")]
        if outside:
            raise YiLocalError(f"{index} names {outside[0]!r}, which is not a file in {model_dir}",
                               hint="the index may only name shards beside it; download it again")  # fmt: skip
        not_files = [n for n in names if (model_dir / n).exists() and not (model_dir / n).is_file()]
        if not_files:
            raise YiLocalError(f"{model_dir / not_files[0]} is not a file", hint="put the shard itself there")
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise YiLocalError(
                f"{model_dir.name}: the index names {', '.join(missing)} but the folder lacks "
                f"{'it' if len(missing) == 1 else 'them'}",
                hint="download the missing shard(s) into " + str(model_dir),
            )
        return [model_dir / n for n in names]
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    return files or None


def _bin_sources(model_dir: Path) -> list[TensorSource]:
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise YiLocalError(
            f"no weights in {model_dir}: neither *.safetensors nor pytorch_model*.bin",
            hint="download the model's weight files into this folder",
        )
    try:
        import torch
    except ImportError:
        raise YiLocalError(
            f"{model_dir.name} stores its weights as pytorch_model*.bin, which needs PyTorch to read",
            hint="install it with `pip install 'yi-local[torch]'`, or use the model's safetensors files",
        ) from None
    sources = []
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle/zip
            raise YiLocalError(f"{f} could not be read ({e})", hint=f"delete {f.name} and download it again") from None
        for name, t in state.items():
            if t.dtype == torch.bfloat16:
                arr, dtype = t.view(torch.int16).numpy().view(np.uint16), "BF16"
            elif t.dtype in (torch.float16, torch.float32):
                arr, dtype = t.numpy(), "F16" if t.dtype == torch.float16 else "F32"
            else:
                raise YiLocalError(f"{f.name}: tensor {name} has dtype {t.dtype}", hint="expected bf16, f16 or f32")
            sources.append(TensorSource(name, dtype, tuple(t.shape), array=arr))
    return sources


def load_tensor_sources(model_dir: Path) -> list[TensorSource]:
    """Every weight tensor of the checkpoint, validated before anything is written."""
    files = _safetensors_files(model_dir)
    if files is None:
        return _bin_sources(model_dir)
    sources: list[TensorSource] = []
    where: dict[str, Path] = {}
    for f in files:
        for src in _check_safetensors(f):
            if src.name in where:
                raise YiLocalError(f"tensor {src.name} is in both {where[src.name].name} and {f.name}",
                                   hint="a stray shard from another download is in the folder; remove it")  # fmt: skip
            where[src.name] = f
            sources.append(src)
    return sources


class ShardReader:
    """Keeps one open file per shard while tensors are streamed out."""

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}

    def fd_for(self, src: TensorSource) -> int | None:
        if src.path is None:
            return None
        f = self._files.get(src.path)
        if f is None:
            f = self._files[src.path] = open(src.path, "rb", buffering=0)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return f.fileno()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

