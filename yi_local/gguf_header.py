"""A fast, independent read of a GGUF file's header: scalar metadata and tensor infos.

Used to check a file after writing it. `gguf.GGUFReader` builds numpy views of every metadata
element, which takes seconds for a 64,000-token vocabulary; this skips array payloads by size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from yi_local.errors import YiLocalError

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # from the start of the data section

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # scalar and string values; arrays are skipped
    tensors: list[TensorInfo]
    data_offset: int

    @property
    def data_end(self) -> int:
        return max((self.data_offset + t.offset + t.n_bytes for t in self.tensors), default=self.data_offset)


def read_header(path: Path) -> Header:
    try:
        with open(path, "rb") as f:
            return _parse(f)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
        raise YiLocalError(f"{path} is not a valid GGUF file ({e})", hint="convert the model again") from None


def _parse(f) -> Header:
    def read(fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string() -> str:
        return f.read(read("<Q")).decode("utf-8")

    def value(vtype: int):
        if vtype in _SCALARS:
            return read(_SCALARS[GGUFValueType(vtype)])
        if vtype == GGUFValueType.STRING:
            return string()
        if vtype == GGUFValueType.ARRAY:
            item, count = read("<I"), read("<Q")
            if item in _SCALARS:
                f.seek(count * struct.calcsize(_SCALARS[GGUFValueType(item)]), 1)
            else:
                for _ in range(count):
                    value(item)
            return None
        raise ValueError(f"unknown metadata type {vtype}")

    if f.read(4) != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = read("<I"), read("<Q"), read("<Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(read("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(read("<Q") for _ in range(read("<I")))
        tensors.append(TensorInfo(name, tuple(reversed(dims)), GGMLQuantizationType(read("<I")), read("<Q")))
    align = int(metadata.get("general.alignment") or 32)
    position = f.tell()
    return Header(metadata, tensors, (position + align - 1) // align * align)
