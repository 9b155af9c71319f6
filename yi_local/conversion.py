"""`yi-local convert`'s source: a local folder, an existing GGUF (requantized), or a hub repo / catalog name."""

from __future__ import annotations

from converters.convert import convert, requantize
from converters.importance import ImatrixRequest
from converters.progress import Progress
from yi_local import hub
from yi_local.catalog import parse_name
from yi_local.errors import YiLocalError
from yi_local.model_spec import as_path, looks_like_path, path_kind
from yi_local.pull import locked


def convert_source(spec: str, out: str | None, outtype: str, quants: list[str], threads: int | None,
                   force: bool, keep_source: bool, progress: Progress | None,
                   imatrix: ImatrixRequest | None = None):  # fmt: skip
    """Convert what `spec` names; (the result, bytes freed by removing a download)."""
    path = as_path(spec)
    kind = path_kind(path)
    if kind == "file" and path.suffix.lower() == ".gguf":
        return requantize(path, out, quants, threads, force, progress, imatrix=imatrix), None
    if kind == "dir":
        return convert(path, out, outtype, quants, threads, force, progress, imatrix=imatrix), None
    if path.suffix.lower() == ".gguf" or looks_like_path(spec):
        raise YiLocalError(f"{spec}: no such file or folder", hint="give a Hugging Face model folder, a .gguf, or a repo id")
    ref = parse_name(spec)
    with hub.using_download(ref.repo):
        lock = locked(ref.repo, f"yi-local convert {ref.repo}")
        try:
            download = hub.download(ref.repo)
            if keep_source:
                hub.keep_download(download.path)
        finally:
            lock.release()
        result = convert(download.path, out, outtype, quants or ([ref.quant] if ref.explicit_quant else []), threads,
                         force, progress, model_name=ref.repo.rsplit("/", 1)[-1], imatrix=imatrix)  # fmt: skip
    freed = 0 if keep_source else hub.release_download(ref.repo)
    return result, freed
