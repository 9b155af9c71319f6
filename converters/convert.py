"""`convert()`: a Hugging Face Yi folder to a correct GGUF, then any llama.cpp quantization levels."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gguf import GGML_QUANT_VERSION, GGUFWriter

from converters.checkpoint import TensorSource, load_tensor_sources
from converters.gguf_file import verify_gguf, write_gguf
from converters.hf_config import ModelParams, read_model_params
from converters.importance import (ImatrixRequest, check_fit, check_matrix_output, check_request, prepare_imatrix,
                                  provenance)
from converters.progress import NullProgress, Progress
from converters.quantize import quantize_file
from converters.tensors import plan_tensors
from converters.vocab import Vocab, read_vocab
from yi_local.atomic import atomic_output, check_room, check_writable, scratch_file
from yi_local.errors import YiLocalError
from yi_local.runtime.params import MAX_THREADS  # ggml's GGML_MAX_N_THREADS: more aborts llama.cpp (its quantizer too)
from yi_local.gguf_header import Header, check_model, model_meta
from yi_local.hardware import cpu_count
from yi_local.quant_types import AUTO_OUT_TYPE, OUT_TYPES, UNQUANTIZED, OutType, QuantType, parse_outtype, parse_quant

@dataclass
class ConvertResult:
    files: list[Path]
    model_name: str
    is_chat: bool
    notes: list[str] = field(default_factory=list)
    imatrix: Path | None = None  # the importance matrix computed and saved beside the outputs
    imatrix_provenance: dict | None = None  # of the matrix the files were quantized with


# The files of a model folder the converter reads, besides the weights: none may be overwritten.
INPUT_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json", "tokenizer.json", "generation_config.json",
               "model.safetensors.index.json", "chat_template.json", "chat_template.jinja")  # fmt: skip


def _threads(threads: int | None) -> int:
    if threads is None:
        return cpu_count()
    if not 1 <= threads <= MAX_THREADS:
        raise YiLocalError(f"--threads is {threads}; it must be from 1 to {MAX_THREADS}",
                           hint=f"leave it out to use every core ({cpu_count()} here)")  # fmt: skip
    return threads


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
    imatrix: ImatrixRequest | None = None,
) -> ConvertResult:
    """Convert the Hugging Face model folder `src`; see `yi-local convert --help` for the options."""
    progress = progress or NullProgress()
    threads = _threads(threads)
    model_dir = Path(src)
    if not model_dir.is_dir():
        raise YiLocalError(f"{model_dir} is not a folder", hint="give the path of a downloaded Hugging Face model folder")
    # A folder name need not be UTF-8; the model's name in the GGUF must be.
    model_name = model_name or os.fsencode(model_dir.resolve().name).decode("utf-8", "replace")
    quant_types = list(dict.fromkeys(parse_quant(q) for q in quants))
    explicit = parse_outtype(outtype)
    reused = check_request(imatrix, quant_types)

    # Everything that can be wrong with the input is found before anything is written.
    params = read_model_params(model_dir)
    sources = load_tensor_sources(model_dir)
    unquantized = explicit or OUT_TYPES[AUTO_OUT_TYPE[_checkpoint_type(sources)]]
    plans = plan_tensors(sources, params, unquantized.tensor_type)
    if reused is not None:
        check_fit(reused, [(p.name, p.shape) for p in plans], quant_types, imatrix.file)
    vocab = read_vocab(model_dir, params.vocab_size)
    keep_path, quant_paths = _output_paths(
        Path(out) if out is not None else None, model_name, unquantized, explicit is not None or not quant_types, quant_types
    )
    inputs = {s.path for s in sources if s.path} | {model_dir / n for n in INPUT_FILES} | set(model_dir.glob("*.bin"))
    for p in [keep_path, *quant_paths]:
        if p is not None:
            check_writable(p, force, inputs)
    matrix_out = check_matrix_output(imatrix, quant_paths[0].parent, model_name, force, list(inputs)) if quant_paths else None

    result = ConvertResult(files=[], model_name=model_name, is_chat=vocab.is_chat, notes=list(vocab.notes))
    total = sum(p.src.nbytes for p in plans)
    n_params = sum(math.prod(p.shape) for p in plans)
    base_bytes = sum(p.nbytes for p in plans) + 32 * len(vocab.tokens) + (1 << 20)
    quant_bytes = [_quantized_bytes(n_params, q) for q in quant_types]
    check_room(_needs([(keep_path or quant_paths[0], base_bytes), *zip(quant_paths, quant_bytes)]))

    def write_base(path: Path, kept: bool) -> None:
        task = progress.task(f"convert → {unquantized.name}", total)
        try:
            # A kept file goes to the disk directly; a scratch one stays in the page cache, where
            # llama.cpp reads it straight back.
            write_gguf(path, _metadata_writer(model_name, params, vocab, unquantized), plans, threads, task.advance,
                       direct_io=kept)
        finally:
            task.close()
        verify_gguf(path, plans)

    def quantize_all(base: Path) -> None:
        _quantize_each(base, quant_types, quant_paths, quant_bytes, threads, force, progress, result,
                       imatrix, reused, matrix_out)  # fmt: skip

    if keep_path is not None:
        with atomic_output(keep_path, force=True) as tmp:
            write_base(tmp, kept=True)
        result.files.append(keep_path)
        quantize_all(keep_path)
    else:
        # Without a kept unquantized file it is a scratch intermediate beside the outputs, removed at the end.
        with scratch_file(quant_paths[0].parent, f"{model_name}-{unquantized.name}.intermediate.gguf") as tmp:
            write_base(tmp, kept=False)
            quantize_all(tmp)
    return result


def _quantize_each(base: Path, quant_types: Sequence[QuantType], dests: Sequence[Path], sizes: Sequence[int],
                   threads: int, force: bool, progress: Progress, result: ConvertResult,
                   imatrix: ImatrixRequest | None, reused, matrix_out: Path | None) -> None:  # fmt: skip
    """Quantize `base` to each level, with the importance matrix when one was asked for."""
    use = None
    if imatrix is not None and imatrix.wanted:
        use, matrix = prepare_imatrix(imatrix, reused, base, matrix_out, threads, progress, force)
        result.imatrix = matrix_out
        result.imatrix_provenance = provenance(use, matrix)
    for quant, dest, size in zip(quant_types, dests, sizes):
        task = progress.task(f"quantize → {quant.name}", size)
        try:
            quantize_file(base, dest, quant, threads, force, on_progress=task.update, expected_bytes=size, imatrix=use)
        finally:
            task.close()
        result.files.append(dest)


def _quantized_bytes(n_params: int, quant: QuantType) -> int:
    """About what llama.cpp writes for `quant` (its bits per weight, measured on Llama-2-7B)."""
    return int(n_params * quant.bits_per_weight / 8)


def _needs(files: list[tuple[Path, int]]) -> dict[Path, int]:
    """Bytes to be written in each folder: the estimates plus a margin (5% and 1 MB a file)."""
    needs: dict[Path, int] = {}
    for path, n in files:
        needs[path.parent] = needs.get(path.parent, 0) + int(n * 1.05) + (1 << 20)
    return needs


def requantize(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    quants: Sequence[str] = (),
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    imatrix: ImatrixRequest | None = None,
) -> ConvertResult:
    """Quantize an existing (unquantized) GGUF to each of `quants` with llama.cpp."""
    progress = progress or NullProgress()
    threads = _threads(threads)
    path = Path(src)
    quant_types = list(dict.fromkeys(parse_quant(q) for q in quants))
    if not quant_types:
        raise YiLocalError(f"{path.name} is already a GGUF", hint="give --q TYPE to quantize it to another level")
    reused = check_request(imatrix, quant_types)
    header = _check_unquantized(path)
    if reused is not None:
        check_fit(reused, [(t.name, t.shape) for t in header.tensors], quant_types, imatrix.file)
    stem = path.stem
    for suffix in ("-F32", "-F16", "-BF16", "-f32", "-f16", "-bf16"):
        stem = stem.removesuffix(suffix)
    _, dests = _output_paths(Path(out) if out is not None else None, stem, OUT_TYPES["F16"], False, quant_types)
    for dest in dests:
        check_writable(dest, force, [path])
    matrix_out = check_matrix_output(imatrix, dests[0].parent, stem, force, [path])
    n_params = sum(math.prod(t.shape) for t in header.tensors)
    sizes = [_quantized_bytes(n_params, q) for q in quant_types]
    check_room(_needs(list(zip(dests, sizes))))
    result = ConvertResult(files=[], model_name=stem, is_chat=False)
    _quantize_each(path, quant_types, dests, sizes, threads, force, progress, result, imatrix, reused, matrix_out)
    return result


def _check_unquantized(path: Path) -> Header:
    header = check_model(path)
    meta = model_meta(header)
    if meta.file_type not in UNQUANTIZED:
        raise YiLocalError(
            f"{path.name} is already quantized ({meta.quantization})",
            hint="quantize from the Hugging Face folder or an F32/F16/BF16 GGUF: quantizing twice loses quality",
        )
    return header
