"""THE GGUF header reader: metadata and tensor infos, every count and length checked against the file size.

Everything that reads a GGUF goes through `read_header` (the converter's checks, `show`, the runtime's
load path), so a truncated or corrupt file gives one clear message instead of a traceback or a
llama.cpp abort. It checks what llama.cpp's own `gguf_init_from_file` checks (versions, value and
tensor types, name lengths, duplicate keys and names, alignment, contiguous tensor offsets) and that
the tensor data ends inside the file. `gguf.GGUFReader` is not used: it builds numpy views of every
array element (seconds for a 64,000-token vocabulary) and trusts the counts it reads.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from yi_local.errors import YiLocalError

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip
_INTS = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
         GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}  # fmt: skip
# llama.cpp's limits (ggml/src/gguf.cpp, ggml.h).
_U64 = struct.Struct("<Q")
MAX_STRING = 1 << 30
MAX_ARRAY = 1 << 30
MAX_NAME = 64  # GGML_MAX_NAME, including the terminating NUL
MAX_DIMS = 4
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_CHUNK = 1 << 20


class DamagedFile(YiLocalError):
    """The file is not the GGUF its header says it is (cut short, or corrupt)."""


@dataclass(frozen=True)
class ArrayInfo:
    """An array value that was not loaded: its item type, length and where its items start."""

    item_type: GGUFValueType
    count: int
    offset: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost dimension first, as in numpy
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
    path: Path
    file_size: int
    version: int
    metadata: dict[str, object]  # scalars, strings, loaded arrays as lists, others as ArrayInfo
    types: dict[str, GGUFValueType]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    data_end: int = field(default=0)

    def get(self, key: str, kind: type | tuple[type, ...], default: object = None) -> object:
        """`key`'s value; `default` when absent. A value of another kind means the file is damaged."""
        if key not in self.metadata:
            return default
        value = self.metadata[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
        if not ok:
            raise damaged(self.path, f"its metadata {key} is a {self.types[key].name.lower()}")
        return value

    def get_int(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key, int, default)
        return value if value is None else int(value)  # type: ignore[arg-type]


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def damaged(path: Path, detail: str) -> DamagedFile:
    return DamagedFile(f"{path} is damaged: {detail}", hint="download or convert it again")


def incomplete(path: Path, size: int, needed: int, at_least: bool = False) -> DamagedFile:
    of = f"of at least {needed:,}" if at_least else f"of {needed:,}"
    return DamagedFile(f"{path} is damaged or incomplete ({size:,} {of} bytes)", hint="download or convert it again")


def read_header(path: str | os.PathLike[str], load_arrays: Iterable[str] = ()) -> Header:
    """The header of the GGUF `path`, checked; arrays named in `load_arrays` are read into lists.

    Raises YiLocalError (a `DamagedFile` for a cut-short or corrupt file) with a message for the user.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise YiLocalError(f"{path}: no such model file", hint="give the path of a .gguf file") from None
    except OSError as e:
        raise YiLocalError(f"{path} cannot be read: {e.strerror}", hint="check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise YiLocalError(f"{path} is a folder, not a GGUF file", hint="give the path of a .gguf file")
    if not stat.S_ISREG(st.st_mode):
        raise YiLocalError(f"{path} is not a regular file", hint="give the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            return _Parser(path, f, st.st_size, frozenset(load_arrays)).parse()
    except OSError as e:
        raise YiLocalError(f"{path} cannot be read: {e.strerror}", hint="check the file and its permissions") from None


class _Parser:
    def __init__(self, path: Path, f: BinaryIO, size: int, load_arrays: frozenset[str]):
        self.path, self.f, self.size, self.load_arrays = path, f, size, load_arrays
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0

    def _need(self, n: int) -> None:
        """Bytes [pos, pos + n) must be in the file; they are buffered when small."""
        if self.pos + n > self.size:
            raise incomplete(self.path, self.size, self.pos + n, at_least=True)

    def take(self, n: int) -> bytes:
        self._need(n)
        start = self.pos - self.base
        if start + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf, self.base, start = self.f.read(max(n, _CHUNK)), self.pos, 0
            if len(self.buf) < n:  # the file shrank while it was read
                raise incomplete(self.path, self.pos + len(self.buf), self.pos + n, at_least=True)
        self.pos += n
        return self.buf[start : start + n]

    def skip(self, n: int) -> None:
        self._need(n)
        self.pos += n

    def unpack(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.unpack("<Q")
        if n > limit:
            raise damaged(self.path, f"{what} claims {n:,} bytes")
        self._need(n)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise damaged(self.path, f"{what} is not UTF-8 text") from None

    def raw_string(self, what: str) -> bytes:
        n = self.unpack("<Q")
        if n > MAX_STRING:
            raise damaged(self.path, f"{what} claims {n:,} bytes")
        return self.take(n)

    def value_type(self, key: str) -> GGUFValueType:
        code = self.unpack("<I")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise damaged(self.path, f"its metadata {key} has unknown type {code}") from None

    def value(self, key: str, vtype: GGUFValueType) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string(f"its metadata {key}")
        item = self.value_type(key)
        count = self.unpack("<Q")
        if item == GGUFValueType.ARRAY:
            raise damaged(self.path, f"its metadata {key} is an array of arrays")
        item_size = 8 if item == GGUFValueType.STRING else struct.calcsize(_SCALARS[item])
        if count > MAX_ARRAY:
            raise damaged(self.path, f"its metadata {key} claims {count:,} items")
        self._need(count * item_size)  # at least the items' length fields
        offset = self.pos
        keep = key in self.load_arrays
        if item == GGUFValueType.STRING:
            strings = self.strings(key, count, keep)
            return strings if keep else ArrayInfo(item, count, offset)
        if keep:
            return list(struct.unpack(f"<{count}{_SCALARS[item][1:]}", self.take(count * item_size)))
        self.skip(count * item_size)
        return ArrayInfo(item, count, offset)

    def strings(self, key: str, count: int, keep: bool) -> list[bytes]:
        """`count` length-prefixed strings (a vocabulary: tens of thousands), read from the buffer in a tight loop."""
        out: list[bytes] = []
        unpack = _U64.unpack_from
        i = 0
        while i < count:
            buf, start = self.buf, self.pos - self.base
            while i < count and start + 8 <= len(buf):
                end = start + 8 + unpack(buf, start)[0]
                if end > len(buf):
                    break
                if keep:
                    out.append(buf[start + 8 : end])
                start, i = end, i + 1
            self.pos = self.base + start
            if i < count:  # an item that crosses the end of the buffer: read it the careful way
                item = self.raw_string(f"item {i} of {key}")
                if keep:
                    out.append(item)
                i += 1
        return out

    def parse(self) -> Header:
        magic = self.f.read(4)
        if magic != b"GGUF":
            if len(magic) < 4 and b"GGUF".startswith(magic):
                raise incomplete(self.path, self.size, 24, at_least=True)
            raise YiLocalError(
                f"{self.path} is not a GGUF file",
                hint="give a .gguf model file, or convert a Hugging Face folder: `yi-local convert FOLDER --q Q4_K_M`",
            )
        self.pos = 4
        version = self.unpack("<I")
        if version not in SUPPORTED_VERSIONS:
            raise damaged(self.path, f"GGUF version {version} (llama.cpp reads versions 2 and 3)")
        n_tensors, n_kv = self.unpack("<Q"), self.unpack("<Q")
        # Each metadata entry takes at least 12 bytes and each tensor info 24: counts beyond what the
        # file can hold are refused before anything is allocated for them.
        if n_kv * 12 + n_tensors * 24 > self.size - self.pos:
            raise incomplete(self.path, self.size, self.pos + n_kv * 12 + n_tensors * 24, at_least=True)
        metadata: dict[str, object] = {}
        types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = self.string(f"metadata key {i}", limit=1 << 16)
            if not key:
                raise damaged(self.path, f"metadata key {i} is empty")
            if key in metadata:
                raise damaged(self.path, f"its metadata {key} appears twice")
            types[key] = self.value_type(key)
            metadata[key] = self.value(key, types[key])
        alignment = metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        if Keys.General.ALIGNMENT in metadata and types[Keys.General.ALIGNMENT] != GGUFValueType.UINT32:
            raise damaged(self.path, "its metadata general.alignment is not a uint32")
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise damaged(self.path, f"alignment {alignment} is not a power of 2")
        tensors = [self._tensor_info(i) for i in range(n_tensors)]
        names = set()
        for t in tensors:
            if t.name in names:
                raise damaged(self.path, f"tensor {t.name} appears twice")
            names.add(t.name)
        data_offset = self.pos + (-self.pos % alignment) if tensors else self.pos
        end = 0
        for t in tensors:
            if t.offset != end:
                raise damaged(self.path, f"tensor {t.name} starts at byte {t.offset:,} of the data, expected {end:,}")
            end += t.n_bytes + (-t.n_bytes % alignment)
        data_end = data_offset + (end if not tensors else tensors[-1].offset + tensors[-1].n_bytes)
        if data_end > self.size:
            raise incomplete(self.path, self.size, data_end)
        return Header(self.path, self.size, version, metadata, types, tensors, alignment, data_offset, data_end)

    def _tensor_info(self, i: int) -> TensorInfo:
        name = self.string(f"the name of tensor {i}", limit=1 << 16)
        if len(name.encode()) >= MAX_NAME:
            raise damaged(self.path, f"the name of tensor {i} is {len(name.encode())} bytes long (at most {MAX_NAME - 1})")
        n_dims = self.unpack("<I")
        if n_dims > MAX_DIMS:
            raise damaged(self.path, f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [self.unpack("<q") for _ in range(n_dims)]
        n = 1
        for d in dims:
            if d < 0:
                raise damaged(self.path, f"tensor {name} has a negative dimension ({d})")
            n *= d
        if n >= 1 << 63:
            raise damaged(self.path, f"tensor {name} claims {n:,} elements")
        code = self.unpack("<I")
        try:
            ttype = GGMLQuantizationType(code)
        except ValueError:
            raise damaged(self.path, f"tensor {name} has unknown type {code}") from None
        block, _ = GGML_QUANT_SIZES[ttype]
        row = dims[0] if dims else 1
        if row % block:
            raise damaged(self.path, f"tensor {name} has rows of {row} values, not a multiple of {ttype.name}'s {block}")
        offset = self.unpack("<Q")
        return TensorInfo(name, tuple(reversed(dims)), ttype, offset)


@dataclass(frozen=True)
class ModelMeta:
    """What yi-local needs from a model's header, read through gguf's key names (`gguf.Keys`)."""

    path: Path
    file_size: int
    name: str
    architecture: str
    file_type: int | None
    context_length: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    chat_template: str | None
    eos_id: int | None
    eot_id: int | None
    tokens: list[bytes] | None  # when the header was read with them
    n_params: int

    @property
    def quantization(self) -> str:
        from yi_local.quant_types import file_type_name

        return file_type_name(self.file_type)

    def token_text(self, token: int | None) -> str:
        if token is None:
            return "-"
        tokens = self.tokens or []
        text = tokens[token].decode("utf-8", errors="replace") if 0 <= token < len(tokens) else "?"
        return f"{text} ({token})"


def model_meta(header: Header) -> ModelMeta:
    arch = header.get(Keys.General.ARCHITECTURE, str, "llama")

    def hparam(key: str, default: int) -> int:
        value = header.get_int(key.format(arch=arch), default)
        return default if value is None else value

    n_head = hparam(Keys.Attention.HEAD_COUNT, 1)
    tokens = header.metadata.get(Keys.Tokenizer.LIST)
    return ModelMeta(
        path=header.path, file_size=header.file_size, name=header.get(Keys.General.NAME, str) or header.path.stem,
        architecture=arch, file_type=header.get_int(Keys.General.FILE_TYPE),
        context_length=hparam(Keys.LLM.CONTEXT_LENGTH, 0), n_layers=hparam(Keys.LLM.BLOCK_COUNT, 0),
        n_embd=hparam(Keys.LLM.EMBEDDING_LENGTH, 0), n_head=n_head, n_head_kv=hparam(Keys.Attention.HEAD_COUNT_KV, n_head),
        chat_template=header.get(Keys.Tokenizer.CHAT_TEMPLATE, str), eos_id=header.get_int(Keys.Tokenizer.EOS_ID),
        eot_id=header.get_int(Keys.Tokenizer.EOT_ID), tokens=tokens if isinstance(tokens, list) else None,
        n_params=sum(math.prod(t.shape) for t in header.tensors),
    )  # fmt: skip


# llama.cpp asserts (aborts the process) rather than refusing on these, so they are checked first.
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS


def check_model(path: str | os.PathLike[str]) -> Header:
    """`read_header` plus what llama.cpp would abort on rather than refuse: run before it loads `path`."""
    header = read_header(path, load_arrays=(Keys.Tokenizer.LIST,))
    arch = header.get(Keys.General.ARCHITECTURE, str, "")
    if arch == "llama":
        _check_llama_hparams(header)
    tokens = header.metadata.get(Keys.Tokenizer.LIST)
    if isinstance(tokens, list):
        twins = first_duplicate_token(tokens)
        if twins is not None:
            i, j, text = twins
            raise damaged(header.path, f"tokens {i} and {j} are both {text.decode(errors='replace')!r}")
    return header


def first_duplicate_token(tokens: list[bytes]) -> tuple[int, int, bytes] | None:
    """Two ids with one text, as llama.cpp sees them (it aborts on such a vocabulary)."""
    if len(set(tokens)) == len(tokens) and not any(not t or b"\0" in t for t in tokens):
        return None  # the common case, decided at C speed
    seen: dict[bytes, int] = {}
    for i, token in enumerate(tokens):
        # llama.cpp reads each token as a C string (up to a NUL) and names an empty one [EMPTY_i].
        text = token.split(b"\0", 1)[0] or f"[EMPTY_{i}]".encode()
        if text in seen:
            return seen[text], i, text
        seen[text] = i
    return None


def _check_llama_hparams(header: Header) -> None:
    def positive(key: str, limit: int = 1 << 31) -> int:
        key = key.format(arch="llama")
        value = header.get_int(key)
        if value is None or not 0 < value <= limit:
            raise damaged(header.path, f"{key} is {value}")
        return value

    positive(Keys.LLM.BLOCK_COUNT, MAX_LAYERS)
    positive(Keys.LLM.CONTEXT_LENGTH)
    positive(Keys.LLM.FEED_FORWARD_LENGTH)
    embd = positive(Keys.LLM.EMBEDDING_LENGTH)
    heads = positive(Keys.Attention.HEAD_COUNT)
    kv_heads = header.get_int(Keys.Attention.HEAD_COUNT_KV.format(arch="llama"), heads)
    if embd % heads or not kv_heads or kv_heads < 0 or heads % kv_heads:
        raise damaged(header.path, f"{heads} heads ({kv_heads} key/value heads) do not divide {embd} embeddings")
    for key in (Keys.Attention.LAYERNORM_RMS_EPS.format(arch="llama"), Keys.Rope.FREQ_BASE.format(arch="llama")):
        value = header.get(key, float, 1.0)
        if not (math.isfinite(value) and value > 0):  # type: ignore[arg-type]
            raise damaged(header.path, f"{key} is {value}")
