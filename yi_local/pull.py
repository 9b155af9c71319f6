"""Pull: download a model from the hub, convert and quantize it into the store.

Pulls (and conversions) of one model wait for each other and share the download; the download is
removed when no command uses it any more, unless it is to be kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.convert import convert
from converters.hf_config import read_model_params
from converters.importance import ImatrixRequest
from converters.progress import Progress
from yi_local import hub, store
from yi_local.catalog import ModelRef, parse_name
from yi_local.errors import YiLocalError
from yi_local.model_spec import as_path, looks_like_path, path_kind
from yi_local.quant_types import QUANT_TYPES


@dataclass(frozen=True)
class PullResult:
    model: store.StoredModel
    already_present: bool
    freed_bytes: int = 0
    kept_source: Path | None = None


def locked(repo: str, doing: str):
    """`store.repo_lock(repo)`, acquired: waiting, with a word on whom for, while another command holds it."""
    lock = store.repo_lock(repo, doing)
    lock.acquire(waiting=f"waiting for another yi-local command working on {repo}")
    return lock


def wants_imatrix(quant: str) -> bool:
    """The store quantizes the IQ levels (and Q2_K_S) with an importance matrix: they need or gain most from one."""
    return QUANT_TYPES[quant].needs_imatrix or quant.startswith("IQ")


def convert_into_store(src: Path, repo: str, name: str | None, quant: str, revision: str | None,
                        progress: Progress | None, threads: int | None, extra: dict | None = None,
                        imatrix: bool = False) -> store.StoredModel:  # fmt: skip
    """Convert `src` into the store and record it. The caller holds `store.repo_lock(repo)`.

    With `imatrix` (or at a level that wants one) an importance matrix is computed on the packaged
    calibration text on the way; the manifest records which.
    """
    model_name = repo.rsplit("/", 1)[-1][:120]  # a local folder's name may be long: room for temp names
    params = read_model_params(src)
    dest = store.prepare_folder(repo) / f"{model_name}-{quant}.gguf"
    matrix = ImatrixRequest(compute=True, save=False) if imatrix or wants_imatrix(quant) else None
    result = convert(src, out=dest, quants=[quant], threads=threads, force=True, progress=progress, model_name=model_name,
                     imatrix=matrix)  # fmt: skip
    options = {"quant": quant, "outtype": "auto", **(extra or {})}
    if result.imatrix_provenance is not None:
        options["imatrix"] = result.imatrix_provenance
    try:
        return store.record(repo, name, quant, result.files[0], revision=revision, context=params.context_length,
                            chat=result.is_chat, options=options)  # fmt: skip
    except BaseException:
        result.files[0].unlink(missing_ok=True)  # never a GGUF in the store that its manifest does not name
        raise


def pull(spec: str | ModelRef, keep_source: bool = False, progress: Progress | None = None,
         threads: int | None = None, imatrix: bool = False) -> PullResult:  # fmt: skip
    """Download, convert and store one model. Pulls of one model wait for each other and share the download.

    `imatrix`: quantize with an importance matrix even at a level that does not want one by default."""
    if isinstance(spec, str) and (path_kind(as_path(spec)) is not None or looks_like_path(spec)):
        raise YiLocalError(f"{spec[:200]} is a path: pull takes a model name or a hub repo id",
                           hint="a local folder needs no pull: `yi-local run FOLDER` converts it into the store, "
                           "`yi-local convert FOLDER` into a .gguf")  # fmt: skip
    ref = parse_name(spec) if isinstance(spec, str) else spec
    existing = store.find(ref.repo, ref.quant)
    if existing is not None:
        return PullResult(existing, already_present=True)
    with hub.using_download(ref.repo):
        lock = locked(ref.repo, f"yi-local pull {ref.full_name}")
        try:
            model = store.find(ref.repo, ref.quant)  # made meanwhile by the command we waited for?
            if model is None:
                store.check_folder(ref.repo)  # before a download that could not be stored
                download = hub.download(ref.repo)
                if keep_source:
                    hub.keep_download(download.path)
                model = convert_into_store(download.path, ref.repo, ref.entry.name if ref.entry else None,
                                            ref.quant, download.revision, progress, threads, imatrix=imatrix)  # fmt: skip
                present = False
            else:
                present = True
        finally:
            lock.release()
    if keep_source:
        kept = hub.download_path(ref.repo)
        return PullResult(model, already_present=present, kept_source=kept if kept.is_dir() else None)
    return PullResult(model, already_present=present, freed_bytes=hub.release_download(ref.repo))
