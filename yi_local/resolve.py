"""What a MODEL argument names, made ready to load: a GGUF (pulled or converted into the store when
needed and allowed) for llama.cpp, or a Hugging Face folder for transformers.

MODEL may be a .gguf path, a local Hugging Face folder, a store/catalog name (`yi:6b-chat[:q5_k_m]`)
or a hub repo id (`org/name[:QUANT]`). A model already in the store is used with no network request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from converters.progress import Progress
from yi_local import hub, store
from yi_local.catalog import DEFAULT_QUANT, ModelRef, parse_name
from yi_local.errors import YiLocalError
from yi_local.model_spec import as_path, looks_like_path, not_special, path_kind
from yi_local.pull import convert_into_store, locked, pull


def _local_repo(folder: Path) -> tuple[str, int]:
    """The store's repo id for a local folder, and a signature that changes when its files do."""
    try:
        signature = max((f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()), default=0)
    except OSError as e:
        raise YiLocalError(f"cannot read the folder {folder} ({e.strerror or e})", hint="check its permissions") from None
    return f"local/{folder.name}", signature


def _stored_local(folder: Path, quant: str) -> store.StoredModel | None:
    """A local folder's conversion in the store, if it is up to date with the folder's files."""
    repo, signature = _local_repo(folder)
    found = store.find(repo, quant)
    if found is not None and found.options.get("source_signature") == signature \
            and found.options.get("source_path", str(folder)) == str(folder):  # fmt: skip
        return found
    return None


def _local_folder(folder: Path, quant: str, progress: Progress | None, threads: int | None) -> Path:
    """A local HF folder converted once into the store (again when its files change)."""
    folder = folder.resolve()
    found = _stored_local(folder, quant)
    if found is not None:
        return found.path
    repo, signature = _local_repo(folder)
    lock = locked(repo, f"yi-local conversion of {folder}")
    try:
        found = _stored_local(folder, quant)
        if found is not None:
            return found.path
        extra = {"source_path": str(folder), "source_signature": signature}
        return convert_into_store(folder, repo, None, quant, None, progress, threads, extra).path
    finally:
        lock.release()


def _named(spec: str) -> Path | ModelRef:
    """What MODEL names: a path (a .gguf or other file, a folder) or a model name."""
    path = as_path(spec)
    kind = path_kind(path)
    not_special(spec, kind)
    if path.suffix.lower() == ".gguf" or kind in ("file", "dir"):
        return path
    if looks_like_path(spec):
        raise YiLocalError(f"{spec}: no such file or folder", hint="give a .gguf file, a model folder or a model name")
    return parse_name(spec)


def _model_folder(named: Path | ModelRef) -> bool:
    """Whether MODEL names a Hugging Face folder to convert (a folder called *.gguf is not one)."""
    return isinstance(named, Path) and named.suffix.lower() != ".gguf" and path_kind(named) == "dir"


def locate_gguf(spec: str) -> Path:
    """The GGUF MODEL names when it exists already: a .gguf path, or a model in the store. Never writes."""
    named = _named(spec)
    if _model_folder(named):
        found = _stored_local(named.resolve(), DEFAULT_QUANT)
        if found is None:
            raise YiLocalError(f"{spec} is a model folder that has not been converted yet",
                               hint=f"`yi-local convert {spec} --q {DEFAULT_QUANT}` makes a GGUF of it "
                               f"(`yi-local run {spec}` converts it into the store)")  # fmt: skip
        return found.path
    if isinstance(named, Path):
        return named
    found = store.find(named.repo, named.quant)
    if found is None:
        raise YiLocalError(f"{named.full_name} is not in the store",
                           hint=f"`yi-local pull {named.full_name}` downloads it; `yi-local list` shows what is there")  # fmt: skip
    return found.path


def resolve_gguf(spec: str, *, pull_missing: bool = False, confirm: Callable[[str], bool] | None = None,
                 progress: Progress | None = None, threads: int | None = None) -> Path:  # fmt: skip
    """The GGUF file MODEL names, converting or pulling it into the store when needed (and allowed)."""
    named = _named(spec)
    if _model_folder(named):
        return _local_folder(named, DEFAULT_QUANT, progress, threads)
    if isinstance(named, Path):
        return named
    found = store.find(named.repo, named.quant)
    if found is not None:
        return found.path
    if not pull_missing and not (confirm and confirm(f"{named.full_name} is not in the store. Download it now?")):
        raise YiLocalError(f"{named.full_name} is not in the store",
                           hint=f"run `yi-local pull {named.full_name}` first, or add --pull")  # fmt: skip
    return pull(named, progress=progress, threads=threads).model.path


def resolve_hf_folder(spec: str, *, pull_missing: bool = False, confirm: Callable[[str], bool] | None = None) -> Path:
    """The Hugging Face folder MODEL names, for the transformers backend: a folder, or a download (kept)."""
    path = as_path(spec)
    if path_kind(path) == "dir":
        return path
    if path.suffix.lower() == ".gguf":
        raise YiLocalError(f"{spec} is a GGUF file, which the transformers backend cannot load",
                           hint="give the Hugging Face folder or repo id, or use --backend llama.cpp")  # fmt: skip
    ref = parse_name(spec)
    local = hub.download_path(ref.repo)
    if (local / "config.json").is_file() and (hub.offline() or not pull_missing):
        hub.keep_download(local)  # in use by this backend: a pull of the same model must not remove it
        return local
    if not pull_missing and not (confirm and confirm(f"{ref.repo} is not downloaded. Download it now?")):
        raise YiLocalError(f"{ref.repo} is not downloaded",
                           hint=f"add --pull to download it, or run `yi-local pull {ref.repo} --keep-source`")  # fmt: skip
    with hub.using_download(ref.repo):
        lock = locked(ref.repo, f"yi-local download of {ref.repo}")
        try:
            download = hub.download(ref.repo)
            hub.keep_download(download.path)
        finally:
            lock.release()
    return download.path
