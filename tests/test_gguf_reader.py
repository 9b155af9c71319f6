"""A damaged .gguf (cut short, corrupt, huge counts, ...) is named in `show`, `run` and `serve`: exit 1, no traceback.

The reader is also fuzzed: mutations and truncations of a real GGUF either are refused with a message
or load in llama.cpp without aborting.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, run_cli
from tests.llama_load import crashes
from yi_local.errors import YiLocalError
from yi_local.gguf_header import check_model, read_header


def _offset(reader: GGUFReader, part) -> int:
    return part.ctypes.data - reader.data.ctypes.data


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    size = struct.calcsize(fmt)
    return data[:offset] + struct.pack(fmt, value) + data[offset + size :]


def _value_at(reader: GGUFReader, key: str) -> int:
    field = reader.fields[key]
    return _offset(reader, field.parts[field.data[0]])


def _duplicate_token(data: bytes, reader: GGUFReader) -> bytes:
    """Token 300's text overwritten with that of another token of the same length."""
    field = reader.fields["tokenizer.ggml.tokens"]
    texts = [bytes(field.parts[i]) for i in field.data]
    twin = next(i for i in range(301, len(texts)) if len(texts[i]) == len(texts[300]))
    at = _offset(reader, field.parts[field.data[twin]])
    return data[:at] + texts[300] + data[at + len(texts[300]) :]


def _tensor_part(reader: GGUFReader, index: int, part: int) -> int:
    return _offset(reader, reader.tensors[index].field.parts[part])


# name -> (damage(data, reader) -> bytes, what the message must say)
CASES = {
    "empty": (lambda d, r: b"", "is damaged or incomplete (0 of at least 24 bytes)"),
    "cut in the header": (lambda d, r: d[:10], "is damaged or incomplete (10 of at least"),
    "cut in the metadata": (lambda d, r: d[:4000], "is damaged or incomplete (4,000 of at least"),
    "cut in the tensor infos": (lambda d, r: d[: r.tensors[5].field.offset + 6], "is damaged or incomplete"),
    "cut in the tensor data": (lambda d, r: d[:-1000], "is damaged or incomplete ({cut:,} of {n:,} bytes)"),
    "random bytes": (lambda d, r: bytes(range(256)) * 20, "is not a GGUF file"),
    "version 1": (lambda d, r: _patch(d, 4, "<I", 1), "GGUF version 1"),
    "byte-swapped version": (lambda d, r: _patch(d, 4, "<I", 3 << 24), "GGUF version 50331648"),
    "huge metadata count": (lambda d, r: _patch(d, 16, "<Q", 1 << 60), "is damaged or incomplete"),
    "huge tensor count": (lambda d, r: _patch(d, 8, "<Q", 1 << 40), "is damaged or incomplete"),
    "huge key length": (lambda d, r: _patch(d, 24, "<Q", 1 << 40), "metadata key 0 claims 1,099,511,627,776 bytes"),
    "huge array count": (
        lambda d, r: _patch(d, _offset(r, r.fields["tokenizer.ggml.scores"].parts[4]), "<Q", 1 << 40),
        "tokenizer.ggml.scores claims 1,099,511,627,776 items",
    ),
    "huge string length": (
        lambda d, r: _patch(d, _offset(r, r.fields["general.name"].parts[3]), "<Q", 1 << 29),
        "is damaged or incomplete",
    ),
    "unknown value type": (
        lambda d, r: _patch(d, _offset(r, r.fields["general.name"].parts[2]), "<I", 77),
        "general.name has unknown type 77",
    ),
    "unknown tensor type": (lambda d, r: _patch(d, _tensor_part(r, 3, 4), "<I", 99), "has unknown type 99"),
    "misaligned tensor offset": (
        lambda d, r: _patch(d, _tensor_part(r, 4, 5), "<Q", int(r.tensors[4].data_offset - r.data_offset) + 1),
        "expected",
    ),
    "tensor data past the end": (
        lambda d, r: _patch(d, _tensor_part(r, len(r.tensors) - 1, 3), "<q", 1 << 20),
        "is damaged or incomplete ({n:,} of ",
    ),
    "five dimensions": (lambda d, r: _patch(d, _tensor_part(r, 2, 2), "<I", 5), "has 5 dimensions"),
    # llama.cpp aborted the whole process on these three instead of refusing them.
    "duplicate token": (_duplicate_token, "are both"),
    "negative rms epsilon": (
        lambda d, r: _patch(d, _value_at(r, "llama.attention.layer_norm_rms_epsilon"), "<f", -1.0),
        "llama.attention.layer_norm_rms_epsilon is -1.0",
    ),
    "zero layers": (lambda d, r: _patch(d, _value_at(r, "llama.block_count"), "<I", 0), "llama.block_count is 0"),
}


@pytest.fixture(scope="module")
def original(chat_gguf) -> tuple[bytes, GGUFReader]:
    return chat_gguf.read_bytes(), GGUFReader(chat_gguf)


def _fails_cleanly(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "download or convert it again" in proc.stderr or "not a GGUF file" in proc.stderr


def _damaged(case: str, original: tuple[bytes, GGUFReader], folder: Path) -> tuple[Path, str]:
    damage, needle = CASES[case]
    bad = folder / "model.gguf"
    bad.write_bytes(damage(*original))
    return bad, needle.format(n=len(original[0]), cut=bad.stat().st_size)


@pytest.mark.parametrize("case", CASES)
def test_reader_names_the_damage(case, original, tmp_path):
    bad, needle = _damaged(case, original, tmp_path)
    with pytest.raises(YiLocalError) as e:
        check_model(bad)
    assert str(bad) in e.value.message and needle in e.value.message


# One case of each kind through the real commands (each run costs about a second).
CLI_CASES = ["cut in the header", "cut in the tensor data", "unknown tensor type", "duplicate token", "zero layers"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_damaged_gguf_is_named_by_show_and_run(case, original, tmp_path):
    bad, needle = _damaged(case, original, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        show = pool.submit(run_cli, "show", str(bad))
        run = pool.submit(run_cli, "run", str(bad), "hi", "--max-tokens", "2", "--ctx", "64")
    for proc in (show.result(), run.result()):
        _fails_cleanly(proc, needle)
        assert str(bad) in proc.stderr


@pytest.mark.parametrize("case", ["duplicate token"])
def test_serve_refuses_a_damaged_gguf_before_listening(case, original, tmp_path):
    bad, needle = _damaged(case, original, tmp_path)
    _fails_cleanly(run_cli("serve", str(bad), "--port", "0", timeout=60), needle)


def test_folder_named_gguf(tmp_path):
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    for command in ("show", "run"):
        proc = run_cli(command, str(folder), *(["hi"] if command == "run" else []))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"{folder} is a folder, not a GGUF file" in proc.stderr


def test_counts_are_checked_before_allocating(original, tmp_path):
    """A count of 2**60 entries is refused at once, not after trying to read (or allocate) that many."""
    import resource

    bad = tmp_path / "model.gguf"
    bad.write_bytes(_patch(original[0], 16, "<Q", 1 << 60))
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from yi_local.gguf_header import read_header
from yi_local.errors import YiLocalError
try:
    read_header({str(bad)!r})
except YiLocalError as e:
    print(e.message)
"""
    del resource
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "is damaged or incomplete" in proc.stdout


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def _fuzz_one(data, original: bytes, header_end: int, folder: Path, accepted: list[Path]) -> None:
    blob = bytearray(original)
    if data.draw(st.booleans(), label="truncate") and data.draw(st.integers(0, 9)) == 0:
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="mutations")):
            at = data.draw(st.integers(0, header_end - 1), label="offset")
            blob[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255), label="byte")
    path = folder / f"m{len(list(folder.iterdir()))}.gguf"
    path.write_bytes(bytes(blob))
    try:
        check_model(path)
    except YiLocalError:
        path.unlink()
        return
    accepted.append(path)


def test_fuzzed_headers_are_refused_or_load(chat_gguf, tmp_path):
    """No mutation of the header gives a traceback, and none that passes the checks makes llama.cpp abort."""
    original = chat_gguf.read_bytes()
    accepted: list[Path] = []
    _fuzz_one(original=original, header_end=read_header(chat_gguf).data_offset, folder=tmp_path, accepted=accepted)
    assert 10 < len(accepted) < 150  # both sides of the check are exercised
    assert crashes(accepted) == []
