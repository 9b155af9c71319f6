"""A sequence's KV cache saved to a file, and loaded back instead of evaluating its tokens again.

Two files. The state is llama.cpp's sequence-state file (its tokens, then their keys and values),
written by `llama_state_seq_save_file` under a temporary name and renamed into place. Beside it,
`<state>.meta` (JSON, written after the state is in place) binds it to what made it: the model file
(size, mtime and a hash of its first MiB), the context settings (context per sequence, number of
sequences, unified cache), the KV cache type, flash attention as llama.cpp settled it, the
llama-cpp-python version, and the state file's own size and sha256. Any difference, a truncated or
damaged file, or a missing meta makes `load_state` refuse with the reason in one line, and the caller
evaluates the tokens instead: a state is used exactly as it was saved, or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from yi_local.atomic import atomic_output, write_atomic
from yi_local.errors import YiLocalError
from yi_local.units import format_size

if TYPE_CHECKING:
    from yi_local.runtime.backend import Backend

FORMAT = 1
META_SUFFIX = ".meta"
HEAD_BYTES = 4 << 20  # of the model file, hashed into its identity (the header and the first tensors)
SAMPLES, SAMPLE_BYTES = 32, 64 << 10  # and these blocks across the rest: 6 MiB read in all
MAX_META_BYTES = 16 << 20
DEFAULT_MAX_BYTES = 2 << 30  # states above this are not saved (a 32K-token Yi-6B conversation at f16)
_CHUNK = 8 << 20

# What a difference in each bound setting means, for the one-line note.
_SETTINGS = {
    "format": "the state was saved by another version of yi-local",
    "llama_cpp_python": "llama-cpp-python is another version",
    "model": "the model file is not the one the state was saved with",
    "n_ctx": "the context size differs",
    "n_parallel": "the number of parallel sequences differs",
    "kv_unified": "the KV cache layout differs",
    "kv_type": "the KV cache type differs",
    "flash_attn": "flash attention differs",
}


class StateUnusable(YiLocalError):
    """A state that cannot be saved or used; `message` says why in a few words."""


class StateTooLarge(StateUnusable):
    """The state is over the cap it may take on disk."""


class SlotBusy(StateUnusable):
    """The slot is generating a reply: its cache is changing."""

    def __init__(self) -> None:
        super().__init__("a reply is being generated")


@dataclass(frozen=True)
class Saved:
    n_tokens: int
    size: int  # bytes of the state file


@dataclass(frozen=True)
class Loaded:
    tokens: list[int]  # what the slot's cache now holds
    size: int


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + META_SUFFIX)


def model_identity(fd: int) -> dict:
    """The model file open at `fd`: size, mtime, the sha256 of its first HEAD_BYTES (a Yi GGUF's header
    alone is about 1.5 MB: its vocabulary) and of SAMPLES blocks spread over the tensor data, so that
    two files of one size and mtime (`cp -p`, a fine-tune of the same shape) differ here too."""
    st = os.fstat(fd)
    h = hashlib.sha256(os.pread(fd, HEAD_BYTES, 0))
    for i in range(1, SAMPLES + 1):
        h.update(os.pread(fd, SAMPLE_BYTES, st.st_size * i // (SAMPLES + 1)))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_sampled": h.hexdigest()}


def state_size(path: Path) -> int | None:
    """The size of the state at `path`, or None when there is none."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def remove_state(path: Path) -> None:
    """Delete the state and its meta (what is missing is fine)."""
    for p in (meta_path(path), path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def save_state(backend: Backend, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int | None = None,
               seq: int = 0, bound_to: str | None = None) -> Saved:  # fmt: skip
    """Save what slot `seq` holds (its first `keep` tokens, the rest dropped first) to `path`;
    `bound_to`: what else the state belongs to (a conversation's hash), checked by `load_state`.

    StateUnusable when it is not saved: the backend cannot, the slot is generating or empty, the
    state would be over `max_bytes`, or the disk refuses (nothing is left half written)."""
    binding = backend.state_binding()
    if binding is None:
        raise StateUnusable(f"the {backend.info.backend} backend cannot save its KV cache")
    path = Path(path)
    with atomic_output(path, force=True) as tmp:
        with backend.engine.idle_slot(seq) as slot:  # the other slots' steps wait meanwhile
            if slot is None:
                raise SlotBusy()
            if keep is not None and keep < len(slot.cache):
                keep = backend._slot_truncate(seq, keep)
                slot.cache, slot.generated = slot.cache[:keep], slot.generated[:keep]
            tokens, generated = list(slot.cache), list(slot.generated)
            if not tokens:
                raise StateUnusable("there is nothing to save")
            size = backend._slot_state_size(seq)
            if size > max_bytes:
                raise StateTooLarge(f"the state would take {format_size(size)}, more than the "
                                    f"{format_size(max_bytes)} allowed")  # fmt: skip
            free = _free_bytes(path.parent)
            if free is not None and free < 2 * size:  # leave room: a full disk hurts more than a slow resume
                raise StateUnusable(f"the state takes {format_size(size)} and {format_size(free)} are free")
            if not backend._slot_save(seq, tmp, tokens):
                raise StateUnusable("llama.cpp could not write the state")
        digest, written = _sha256(tmp)  # read back with the model free: the other slots generate meanwhile
    meta = {"binding": binding, "size": written, "sha256": digest, "n_tokens": len(tokens),
            "tokens_sha256": _tokens_sha256(tokens), "generated": _runs(generated), "bound_to": bound_to}  # fmt: skip
    write_atomic(meta_path(path), json.dumps(meta, indent=1))
    return Saved(len(tokens), written)


def load_state(backend: Backend, path: Path, seq: int = 0, bound_to: str | None = None,
               what: str = "the conversation") -> Loaded:  # fmt: skip
    """Load the state at `path` into slot `seq` (emptied first); StateUnusable saying why it was not.

    `bound_to` must be what the state was saved with (`what` names it in the refusal). On any refusal
    the slot is empty, as before a first prompt."""
    binding = backend.state_binding()
    if binding is None:
        raise StateUnusable(f"the {backend.info.backend} backend cannot load a saved KV cache")
    path = Path(path)
    meta = _read_meta(path)
    _check_binding(meta.get("binding"), binding)
    if meta.get("bound_to") != bound_to:
        raise StateUnusable(f"{what} differs from the one the state was saved with")
    size = state_size(path)
    if size is None:
        raise StateUnusable("the state file is missing")
    if size != meta.get("size"):
        raise StateUnusable(f"the state file is {size:,} bytes, {meta.get('size')!r} were saved (truncated?)")
    if _sha256(path)[0] != meta.get("sha256"):
        raise StateUnusable("the state file is damaged (its checksum differs)")
    n_tokens = meta["n_tokens"]
    if n_tokens > binding["n_ctx"] or 12 + 4 * n_tokens > size:  # never trust it for a size to allocate
        raise StateUnusable("its meta file is damaged")
    generated = _flags(meta.get("generated"), n_tokens)
    with backend.engine.idle_slot(seq) as slot:
        if slot is None:
            raise SlotBusy()
        backend._slot_truncate(seq, 0)
        slot.cache, slot.generated = [], []
        tokens = backend._slot_load(seq, path, n_tokens)
        if tokens is None or len(tokens) != n_tokens or _tokens_sha256(tokens) != meta.get("tokens_sha256"):
            backend._slot_truncate(seq, 0)
            raise StateUnusable("llama.cpp could not load the state")
        slot.cache, slot.generated = tokens, generated
    return Loaded(tokens, size)


def read_meta_file(path: Path) -> dict:
    """The JSON object in the meta file `path`: a regular file (not a FIFO, not /dev/zero) of at most
    MAX_META_BYTES; FileNotFoundError when there is none, ValueError or OSError when it is not one."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META_BYTES:
            raise ValueError("not a regular file of at most 16 MiB")
        meta = json.loads(f.read(MAX_META_BYTES + 1))
    if not isinstance(meta, dict) or not isinstance(meta.get("binding"), dict):
        raise ValueError("not a yi-local state's meta file")
    return meta


def _read_meta(path: Path) -> dict:
    try:
        meta = read_meta_file(meta_path(path))
    except FileNotFoundError:
        raise StateUnusable("the state has no meta file (saving it was cut short?)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise StateUnusable(f"its meta file cannot be read ({str(e)[:80]})") from None
    n = meta.get("n_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise StateUnusable("its meta file is damaged")
    return meta


def _check_binding(saved, now: dict) -> None:
    if not isinstance(saved, dict):
        raise StateUnusable("its meta file is damaged")
    for key, what in _SETTINGS.items():
        if saved.get(key) != now.get(key):
            if key == "model" or not isinstance(saved.get(key), (str, int, bool)):
                raise StateUnusable(what)
            raise StateUnusable(f"{what} ({saved.get(key)} then, {now.get(key)} now)")
    if saved != now:
        raise StateUnusable("the settings it was saved with differ")


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _tokens_sha256(tokens: list[int]) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


def _runs(flags: list[bool]) -> list[list[int]]:
    """[[flag, count], ...]: a conversation's generated flags come in long runs."""
    runs: list[list[int]] = []
    for f in flags:
        if runs and runs[-1][0] == int(f):
            runs[-1][1] += 1
        else:
            runs.append([int(f), 1])
    return runs


def _flags(runs, n: int) -> list[bool]:
    ok = isinstance(runs, list) and all(
        isinstance(r, list) and len(r) == 2 and r[0] in (0, 1) and isinstance(r[1], int) and r[1] > 0 for r in runs
    )
    if not ok or sum(count for _, count in runs) != n:
        raise StateUnusable("its meta file is damaged")
    return [bool(f) for f, count in runs for _ in range(count)]


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
