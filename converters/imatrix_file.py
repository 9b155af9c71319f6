"""llama.cpp's importance-matrix files: the GGUF format llama-imatrix writes, and its legacy `.dat`.

An imatrix GGUF holds, per weight matrix NAME, `NAME.in_sum2` (the sum over evaluated tokens of each
input column's squared activation, one row per expert) and `NAME.counts` (tokens summed, per expert),
with `general.type = "imatrix"` and `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`.
The quantizer wants the mean, in_sum2 / counts, which `normalized()` computes as llama-quantize does
(common/imatrix-loader.cpp and tools/quantize/quantize.cpp in llama.cpp).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from yi_local.atomic import atomic_output
from yi_local.errors import YiLocalError

GENERAL_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Entry:
    sums: np.ndarray  # float32 [n_mat, n_cols]: squared activations summed over tokens
    counts: np.ndarray  # int64 [n_mat]: tokens summed into each row of `sums`


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)  # by weight name, e.g. blk.0.attn_q.weight
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file, whose sums are already means times the call count

    def normalized(self) -> dict[str, np.ndarray]:
        """Per weight, the mean squared activation of each column: what the quantizer weighs errors by."""
        out = {}
        for name, e in self.entries.items():
            sums = e.sums.astype(np.float32)
            if self.legacy:
                n = int(e.counts[0]) if e.counts.size else 0
                out[name] = (sums / n if n > 0 else sums).reshape(-1).astype(np.float32)
                continue
            counts = e.counts.astype(np.float32)[:, None]
            # An expert no token reached weighs every column alike, as llama.cpp does.
            mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.float32(1))
            out[name] = mean.reshape(-1).astype(np.float32)
        return out


def write_imatrix(path: Path, imatrix: Imatrix, force: bool = True) -> None:
    """Write `imatrix` as llama-imatrix does (entries sorted by name), atomically."""
    from gguf import GGUFWriter

    with atomic_output(path, force=force) as tmp:
        w = GGUFWriter(path=None, arch="")
        # llama-imatrix writes no architecture; gguf-py's writer always adds the key, so drop it.
        w.kv_data[0].clear()
        w.add_string(GENERAL_TYPE, "imatrix")
        w.add_array(KEY_DATASETS, list(imatrix.datasets))
        w.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        w.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            w.add_tensor(name + SUM_SUFFIX, np.ascontiguousarray(e.sums, dtype=np.float32))
            w.add_tensor(name + COUNT_SUFFIX, e.counts.astype(np.float32).reshape(-1, 1))
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix GGUF, or llama.cpp's older `.dat` format; a clear error for anything else."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise YiLocalError(f"cannot read the importance matrix {path}: {e.strerror}",
                           hint="give the path of an imatrix file made by yi-local or llama-imatrix") from None  # fmt: skip
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except (ValueError, struct.error, IndexError, KeyError) as e:
        raise YiLocalError(f"{path} is not a valid importance matrix ({e})",
                           hint="give an imatrix .gguf or .dat made by yi-local or llama-imatrix") from None  # fmt: skip


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    kind = r.get_field(GENERAL_TYPE)
    if kind is not None and kind.contents() != "imatrix":
        raise ValueError(f"it is a GGUF of type {kind.contents()!r}, not an imatrix")
    if not any(t.name.endswith(SUM_SUFFIX) for t in r.tensors) and r.get_field("general.architecture") is not None:
        raise ValueError("it is a model, not an imatrix")
    out = Imatrix()
    datasets = r.get_field(KEY_DATASETS)
    if datasets is not None and datasets.types[:2] == [GGUFValueType.ARRAY, GGUFValueType.STRING]:
        out.datasets = list(datasets.contents())
    for key, attr in ((KEY_CHUNK_COUNT, "chunk_count"), (KEY_CHUNK_SIZE, "chunk_size")):
        f = r.get_field(key)
        if f is not None:
            setattr(out, attr, int(f.contents()))
    if datasets is None or r.get_field(KEY_CHUNK_COUNT) is None or r.get_field(KEY_CHUNK_SIZE) is None:
        raise ValueError("its imatrix metadata is missing (llama-quantize refuses such a file too)")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.tensor_type != 0:  # F32
            raise ValueError(f"tensor {t.name} is not F32")
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name.removesuffix(SUM_SUFFIX)] = t
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name.removesuffix(COUNT_SUFFIX)] = t
    if not sums:
        raise ValueError("it holds no entries")
    for name in sorted(sums.keys() | counts.keys()):
        if name not in sums or name not in counts:
            raise ValueError(f"the sums and counts of {name} do not match")
        c = np.rint(np.asarray(counts[name].data, dtype=np.float32).reshape(-1)).astype(np.int64)
        s = np.asarray(sums[name].data, dtype=np.float32).reshape(len(c), -1)
        out.entries[name] = Entry(sums=s.copy(), counts=c)
    return out


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    (n_entries,) = take("i")
    if n_entries < 1 or n_entries > 1 << 20:
        raise ValueError("it is neither a GGUF nor a legacy imatrix file")
    out = Imatrix(legacy=True)
    for _ in range(n_entries):
        (length,) = take("i")
        if not 0 < length < 4096:
            raise ValueError("an entry name is damaged")
        name = data[pos : pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"entry {name} is truncated")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).reshape(1, nval).copy()
        pos += 4 * nval
        out.entries[name] = Entry(sums=sums, counts=np.array([ncall], dtype=np.int64))
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("i")
        if pos + 4 <= len(data):
            (length,) = take("i")
            if 0 < length <= len(data) - pos:
                out.datasets.append(data[pos : pos + length].decode("utf-8", "replace"))
    return out
