"""Pull (download, convert, quantize, store) and resolve what a MODEL argument names.

MODEL may be a .gguf path, a local Hugging Face folder, a store/catalog name (`yi:6b-chat[:q5_k_m]`)
or a hub repo id (`org/name[:QUANT]`). A model already in the store is used with no network request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from converters.convert import convert
from converters.hf_config import read_model_params
from converters.progress import Progress
from yi_local import hub, store
from yi_local.catalog import DEFAULT_QUANT, ModelRef, parse_name
from yi_local.errors import YiLocalError


@dataclass(frozen=True)
class PullResult:
    model: store.StoredModel
    already_present: bool
    freed_bytes: int = 0
    kept_source: Path | None = None


def _convert_into_store(src: Path, repo: str, name: str | None, quant: str, revision: str | None,
                        progress: Progress | None, threads: int | None, extra: dict | None = None) -> store.StoredModel:  # fmt: skip
    model_name = repo.rsplit("/", 1)[-1]
    dest = store.model_folder(repo) / f"{model_name}-{quant}.gguf"
    result = convert(src, out=dest, quants=[quant], threads=threads, force=True, progress=progress, model_name=model_name)
    params = read_model_params(src)
    options = {"quant": quant, "outtype": "auto", **(extra or {})}
    return store.record(repo, name, quant, result.files[0], revision=revision, context=params.context_length,
                        chat=result.is_chat, options=options)  # fmt: skip


def pull(spec: str | ModelRef, keep_source: bool = False, progress: Progress | None = None,
         threads: int | None = None) -> PullResult:  # fmt: skip
    ref = parse_name(spec) if isinstance(spec, str) else spec
    existing = store.find(ref.repo, ref.quant)
    if existing is not None:
        return PullResult(existing, already_present=True)
    download = hub.download(ref.repo)
    model = _convert_into_store(download.path, ref.repo, ref.entry.name if ref.entry else None, ref.quant,
                                download.revision, progress, threads)  # fmt: skip
    if keep_source:
        return PullResult(model, already_present=False, kept_source=download.path)
    return PullResult(model, already_present=False, freed_bytes=hub.remove_download(download.path))


def _looks_like_path(spec: str) -> bool:
    """A file system path (that does not exist), rather than a model name or an org/name repo id."""
    return spec.startswith((".", "~", os.sep)) or spec.count("/") > 1


def convert_source(spec: str, out: str | None, outtype: str, quants: list[str], threads: int | None,
                   force: bool, keep_source: bool, progress: Progress | None):  # fmt: skip
    """`yi-local convert`: a local folder, an existing GGUF (requantized), or a hub repo / catalog name."""
    from converters.convert import requantize

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return requantize(path, out, quants, threads, force, progress), None
    if path.is_dir():
        return convert(path, out, outtype, quants, threads, force, progress), None
    if path.suffix.lower() == ".gguf" or _looks_like_path(spec):
        raise YiLocalError(f"{spec}: no such file or folder", hint="give a Hugging Face model folder, a .gguf, or a repo id")
    ref = parse_name(spec)
    download = hub.download(ref.repo)
    result = convert(download.path, out, outtype, quants or ([ref.quant] if ref.explicit_quant else []), threads, force,
                     progress, model_name=ref.repo.rsplit("/", 1)[-1])  # fmt: skip
    freed = 0 if keep_source else hub.remove_download(download.path)
    return result, freed


def _local_folder(folder: Path, quant: str, progress: Progress | None, threads: int | None) -> Path:
    """A local HF folder converted once into the store (again when its files change)."""
    folder = folder.resolve()
    repo = f"local/{folder.name}"
    signature = max((f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()), default=0)
    found = store.find(repo, quant)
    if found is not None and found.options.get("source_signature") == signature:
        return found.path
    extra = {"source_path": str(folder), "source_signature": signature}
    return _convert_into_store(folder, repo, None, quant, None, progress, threads, extra).path


def resolve_gguf(spec: str, *, pull_missing: bool = False, confirm: Callable[[str], bool] | None = None,
                 progress: Progress | None = None, threads: int | None = None) -> Path:  # fmt: skip
    """The GGUF file MODEL names, converting or pulling it into the store when needed (and allowed)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        return path
    if path.is_dir():
        return _local_folder(path, DEFAULT_QUANT, progress, threads)
    if _looks_like_path(spec):
        raise YiLocalError(f"{spec}: no such file or folder", hint="give a .gguf file, a model folder or a model name")
    ref = parse_name(spec)
    found = store.find(ref.repo, ref.quant)
    if found is not None:
        return found.path
    if not pull_missing and not (confirm and confirm(f"{ref.full_name} is not in the store. Download it now?")):
        raise YiLocalError(f"{ref.full_name} is not in the store",
                           hint=f"run `yi-local pull {ref.full_name}` first, or add --pull")  # fmt: skip
    return pull(ref, progress=progress, threads=threads).model.path


def resolve_hf_folder(spec: str, *, pull_missing: bool = False, confirm: Callable[[str], bool] | None = None) -> Path:
    """The Hugging Face folder MODEL names, for the transformers backend: a folder, or a download (kept)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        raise YiLocalError(f"{spec} is a GGUF file, which the transformers backend cannot load",
                           hint="give the Hugging Face folder or repo id, or use --backend llama.cpp")  # fmt: skip
    ref = parse_name(spec)
    local = hub.downloads_dir() / store.slug(ref.repo)
    if (local / "config.json").is_file() and (hub.offline() or not pull_missing):
        return local
    if not pull_missing and not (confirm and confirm(f"{ref.repo} is not downloaded. Download it now?")):
        raise YiLocalError(f"{ref.repo} is not downloaded",
                           hint=f"add --pull to download it, or run `yi-local pull {ref.repo} --keep-source`")  # fmt: skip
    return hub.download(ref.repo).path
