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


def _locked(repo: str, doing: str):
    """`store.repo_lock(repo)`, acquired: waiting, with a word on whom for, while another command holds it."""
    lock = store.repo_lock(repo, doing)
    lock.acquire(waiting=f"waiting for another yi-local command working on {repo}")
    return lock


def _convert_into_store(src: Path, repo: str, name: str | None, quant: str, revision: str | None,
                        progress: Progress | None, threads: int | None, extra: dict | None = None) -> store.StoredModel:  # fmt: skip
    """Convert `src` into the store and record it. The caller holds `store.repo_lock(repo)`."""
    model_name = repo.rsplit("/", 1)[-1][:120]  # a local folder's name may be long: room for temp names
    params = read_model_params(src)
    dest = store.prepare_folder(repo) / f"{model_name}-{quant}.gguf"
    result = convert(src, out=dest, quants=[quant], threads=threads, force=True, progress=progress, model_name=model_name)
    options = {"quant": quant, "outtype": "auto", **(extra or {})}
    try:
        return store.record(repo, name, quant, result.files[0], revision=revision, context=params.context_length,
                            chat=result.is_chat, options=options)  # fmt: skip
    except BaseException:
        result.files[0].unlink(missing_ok=True)  # never a GGUF in the store that its manifest does not name
        raise


def pull(spec: str | ModelRef, keep_source: bool = False, progress: Progress | None = None,
         threads: int | None = None) -> PullResult:  # fmt: skip
    """Download, convert and store one model. Pulls of one model wait for each other and share the download."""
    if isinstance(spec, str) and (_kind(_path(spec)) is not None or _looks_like_path(spec)):
        raise YiLocalError(f"{spec[:200]} is a path: pull takes a model name or a hub repo id",
                           hint="a local folder needs no pull: `yi-local run FOLDER` converts it into the store, "
                           "`yi-local convert FOLDER` into a .gguf")  # fmt: skip
    ref = parse_name(spec) if isinstance(spec, str) else spec
    existing = store.find(ref.repo, ref.quant)
    if existing is not None:
        return PullResult(existing, already_present=True)
    with hub.using_download(ref.repo):
        lock = _locked(ref.repo, f"yi-local pull {ref.full_name}")
        try:
            model = store.find(ref.repo, ref.quant)  # made meanwhile by the command we waited for?
            if model is None:
                store.check_folder(ref.repo)  # before a download that could not be stored
                download = hub.download(ref.repo)
                if keep_source:
                    hub.keep_download(download.path)
                model = _convert_into_store(download.path, ref.repo, ref.entry.name if ref.entry else None,
                                            ref.quant, download.revision, progress, threads)  # fmt: skip
                present = False
            else:
                present = True
        finally:
            lock.release()
    if keep_source:
        kept = hub.download_path(ref.repo)
        return PullResult(model, already_present=present, kept_source=kept if kept.is_dir() else None)
    return PullResult(model, already_present=present, freed_bytes=hub.release_download(ref.repo))


def _path(spec: str) -> Path:
    try:
        return Path(spec).expanduser()
    except RuntimeError:  # ~user of no such user
        return Path(spec)


def _kind(path: Path) -> str | None:
    """'file', 'dir', 'other' (a device, a socket...) or None (missing, or a name the file system refuses)."""
    try:
        return "file" if path.is_file() else "dir" if path.is_dir() else "other" if path.exists() else None
    except (OSError, ValueError):
        return None


def _not_special(spec: str, kind: str | None) -> None:
    if kind == "other":
        raise YiLocalError(f"{spec} is neither a file nor a folder", hint="give a .gguf file, a model folder or a model name")


def _looks_like_path(spec: str) -> bool:
    """A file system path (that does not exist), rather than a model name or an org/name repo id."""
    return spec.startswith((".", "~", os.sep)) or spec.count("/") > 1


def convert_source(spec: str, out: str | None, outtype: str, quants: list[str], threads: int | None,
                   force: bool, keep_source: bool, progress: Progress | None):  # fmt: skip
    """`yi-local convert`: a local folder, an existing GGUF (requantized), or a hub repo / catalog name."""
    from converters.convert import requantize

    path = _path(spec)
    kind = _kind(path)
    if kind == "file" and path.suffix.lower() == ".gguf":
        return requantize(path, out, quants, threads, force, progress), None
    if kind == "dir":
        return convert(path, out, outtype, quants, threads, force, progress), None
    if path.suffix.lower() == ".gguf" or _looks_like_path(spec):
        raise YiLocalError(f"{spec}: no such file or folder", hint="give a Hugging Face model folder, a .gguf, or a repo id")
    ref = parse_name(spec)
    with hub.using_download(ref.repo):
        lock = _locked(ref.repo, f"yi-local convert {ref.repo}")
        try:
            download = hub.download(ref.repo)
            if keep_source:
                hub.keep_download(download.path)
        finally:
            lock.release()
        result = convert(download.path, out, outtype, quants or ([ref.quant] if ref.explicit_quant else []), threads,
                         force, progress, model_name=ref.repo.rsplit("/", 1)[-1])  # fmt: skip
    freed = 0 if keep_source else hub.release_download(ref.repo)
    return result, freed


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
    lock = _locked(repo, f"yi-local conversion of {folder}")
    try:
        found = _stored_local(folder, quant)
        if found is not None:
            return found.path
        extra = {"source_path": str(folder), "source_signature": signature}
        return _convert_into_store(folder, repo, None, quant, None, progress, threads, extra).path
    finally:
        lock.release()


def locate_gguf(spec: str) -> Path:
    """The GGUF MODEL names when it exists already: a .gguf path, or a model in the store. Never writes."""
    path = _path(spec)
    kind = _kind(path)
    _not_special(spec, kind)
    if path.suffix.lower() == ".gguf" or kind == "file":
        return path
    if kind == "dir":
        found = _stored_local(path.resolve(), DEFAULT_QUANT)
        if found is None:
            raise YiLocalError(f"{spec} is a model folder that has not been converted yet",
                               hint=f"`yi-local convert {spec} --q {DEFAULT_QUANT}` makes a GGUF of it "
                               f"(`yi-local run {spec}` converts it into the store)")  # fmt: skip
        return found.path
    if _looks_like_path(spec):
        raise YiLocalError(f"{spec}: no such file or folder", hint="give a .gguf file, a model folder or a model name")
    ref = parse_name(spec)
    found = store.find(ref.repo, ref.quant)
    if found is None:
        raise YiLocalError(f"{ref.full_name} is not in the store",
                           hint=f"`yi-local pull {ref.full_name}` downloads it; `yi-local list` shows what is there")  # fmt: skip
    return found.path


def resolve_gguf(spec: str, *, pull_missing: bool = False, confirm: Callable[[str], bool] | None = None,
                 progress: Progress | None = None, threads: int | None = None) -> Path:  # fmt: skip
    """The GGUF file MODEL names, converting or pulling it into the store when needed (and allowed)."""
    path = _path(spec)
    kind = _kind(path)
    _not_special(spec, kind)
    if path.suffix.lower() == ".gguf" or kind == "file":
        return path
    if kind == "dir":
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
    path = _path(spec)
    if _kind(path) == "dir":
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
        lock = _locked(ref.repo, f"yi-local download of {ref.repo}")
        try:
            download = hub.download(ref.repo)
            hub.keep_download(download.path)
        finally:
            lock.release()
    return download.path
