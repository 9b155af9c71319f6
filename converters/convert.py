"""`convert()`: a Hugging Face Yi folder to a correct GGUF, then any llama.cpp quantization levels."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gguf import GGML_QUANT_VERSION, GGUFWriter

from yi_local.atomic import atomic_output, check_writable
from converters.checkpoint import TensorSource, load_tensor_sources
from converters.gguf_file import verify_gguf, write_gguf
from converters.hf_config import ModelParams, read_model_params
from converters.progress import NullProgress, Progress
from converters.quant_types import AUTO_OUT_TYPE, OUT_TYPES, OutType, QuantType, parse_outtype, parse_quant
from converters.quantize import quantize_file
from converters.tensors import plan_tensors
from converters.vocab import Vocab, read_vocab
from yi_local.errors import YiLocalError

logger = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    files: list[Path]
    model_name: str
    is_chat: bool
    notes: list[str] = field(default_factory=list)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _checkpoint_type(sources: list[TensorSource]) -> str:
    dtypes = {s.dtype for s in sources if len(s.shape) > 1}
    return next((d for d in ("BF16", "F16", "F32") if d in dtypes), "F32")


def _output_paths(
    out: Path | None, model_name: str, unquantized: OutType, keep_unquantized: bool, quants: Sequence[QuantType]
) -> tuple[Path | None, list[Path]]:
    """(path of the unquantized GGUF if kept, paths of the quantized ones)."""
    names = [f"{model_name}-{q.name}.gguf" for q in quants]
    base_name = f"{model_name}-{unquantized.name}.gguf"
    n_files = len(names) + (1 if keep_unquantized else 0)
    out = out or Path.cwd()
    if out.suffix.lower() == ".gguf":
        if n_files != 1:
            raise YiLocalError(
                f"-o {out} names one file but this conversion makes {n_files}",
                hint="give -o a folder when asking for several --q levels (or --outtype with --q)",
            )
        return (out, []) if keep_unquantized else (None, [out])
    return (out / base_name if keep_unquantized else None), [out / n for n in names]


def _metadata_writer(model_name: str, params: ModelParams, vocab: Vocab, out_type: OutType) -> GGUFWriter:
    w = GGUFWriter(path=None, arch="llama")
    w.add_name(model_name)
    w.add_context_length(params.context_length)
    w.add_embedding_length(params.hidden_size)
    w.add_block_count(params.num_layers)
    w.add_feed_forward_length(params.intermediate_size)
    w.add_head_count(params.num_heads)
    w.add_head_count_kv(params.num_kv_heads)
    w.add_layer_norm_rms_eps(params.rms_norm_eps)
    w.add_rope_freq_base(params.rope_theta)
    w.add_rope_dimension_count(params.head_dim)
    w.add_vocab_size(params.vocab_size)
    w.add_file_type(int(out_type.ftype))
    if out_type.name == "Q8_0":
        w.add_quantization_version(GGML_QUANT_VERSION)
    vocab.add_to_gguf(w)
    return w


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    outtype: str = "auto",
    quants: Sequence[str] = (),
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    model_name: str | None = None,
) -> ConvertResult:
    """Convert the Hugging Face model folder `src`; see `yi-local convert --help` for the options."""
    progress = progress or NullProgress()
    threads = threads or default_threads()
    model_dir = Path(src)
    if not model_dir.is_dir():
        raise YiLocalError(f"{model_dir} is not a folder", hint="give the path of a downloaded Hugging Face model folder")
    model_name = model_name or model_dir.resolve().name
    quant_types = list(dict.fromkeys(parse_quant(q) for q in quants))
    explicit = parse_outtype(outtype)

    # Everything that can be wrong with the input is found before anything is written.
    params = read_model_params(model_dir)
    vocab = read_vocab(model_dir, params.vocab_size)
    sources = load_tensor_sources(model_dir)
    unquantized = explicit or OUT_TYPES[AUTO_OUT_TYPE[_checkpoint_type(sources)]]
    plans = plan_tensors(sources, params, unquantized.tensor_type)
    keep_path, quant_paths = _output_paths(
        Path(out) if out is not None else None, model_name, unquantized, explicit is not None or not quant_types, quant_types
    )
    for p in [keep_path, *quant_paths]:
        if p is not None:
            check_writable(p, force)

    result = ConvertResult(files=[], model_name=model_name, is_chat=vocab.is_chat, notes=list(vocab.notes))
    total = sum(p.src.nbytes for p in plans)
    n_params = sum(math.prod(p.shape) for p in plans)
    # Without a kept unquantized file, it is a scratch intermediate: buffered (llama.cpp reads it
    # straight back from the page cache), not fsynced, removed at the end.
    kept = keep_path is not None
    base_path = keep_path or quant_paths[0].with_name(f".{model_name}-{unquantized.name}.{os.getpid()}.intermediate.gguf")
    try:
        with atomic_output(base_path, force=True, durable=kept) as tmp:
            task = progress.task(f"convert → {unquantized.name}", total)
            try:
                write_gguf(tmp, _metadata_writer(model_name, params, vocab, unquantized), plans, threads, task.advance,
                           direct_io=kept)
            finally:
                task.close()
            verify_gguf(tmp, plans)
        if kept:
            result.files.append(base_path)
        for quant, dest in zip(quant_types, quant_paths):
            task = progress.task(f"quantize → {quant.name}", int(n_params * quant.bits_per_weight / 8))
            try:
                quantize_file(base_path, dest, quant, threads, force, on_progress=task.update)
            finally:
                task.close()
            result.files.append(dest)
    finally:
        if not kept:
            base_path.unlink(missing_ok=True)
    return result


def requantize(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    quants: Sequence[str] = (),
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Quantize an existing (unquantized) GGUF to each of `quants` with llama.cpp."""
    progress = progress or NullProgress()
    path = Path(src)
    quant_types = list(dict.fromkeys(parse_quant(q) for q in quants))
    if not quant_types:
        raise YiLocalError(f"{path.name} is already a GGUF", hint="give --q TYPE to quantize it to another level")
    _check_unquantized(path)
    stem = path.stem
    for suffix in ("-F32", "-F16", "-BF16", "-f32", "-f16", "-bf16"):
        stem = stem.removesuffix(suffix)
    _, dests = _output_paths(Path(out) if out is not None else None, stem, OUT_TYPES["F16"], False, quant_types)
    for dest in dests:
        check_writable(dest, force)
    result = ConvertResult(files=[], model_name=stem, is_chat=False)
    size = path.stat().st_size
    for quant, dest in zip(quant_types, dests):
        task = progress.task(f"quantize → {quant.name}", int(size * quant.bits_per_weight / 16))
        try:
            quantize_file(path, dest, quant, threads or default_threads(), force, on_progress=task.update)
        finally:
            task.close()
        result.files.append(dest)
    return result


def _check_unquantized(path: Path) -> None:
    from gguf import LlamaFileType

    from yi_local.gguf_header import read_header

    file_type = LlamaFileType(int(read_header(path).metadata.get("general.file_type", 0)))
    if file_type not in (LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_BF16):
        raise YiLocalError(
            f"{path.name} is already quantized ({file_type.name.replace('MOSTLY_', '')})",
            hint="quantize from the Hugging Face folder or an F16/BF16 GGUF: quantizing twice loses quality",
        )
