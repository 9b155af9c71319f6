"""What a GGUF file says about itself, read from its checked header (no weights are loaded)."""

from __future__ import annotations

from pathlib import Path

from yi_local.gguf_header import Header, check_model, model_meta
from yi_local.quant_types import KEY_IMATRIX_CHUNKS, KEY_IMATRIX_DATASET, KEY_IMATRIX_ENTRIES, KEY_IMATRIX_FILE, UNQUANTIZED
from yi_local.units import format_size


def describe_gguf(path: Path) -> list[tuple[str, str]]:
    header = check_model(path)
    meta = model_meta(header)
    params = meta.n_params
    matrix = [] if meta.file_type in UNQUANTIZED else [("imatrix", imatrix_summary(header))]
    return [
        ("name", meta.name),
        ("file", str(path)),
        ("size", format_size(meta.file_size)),
        ("architecture", meta.architecture),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params:,}"),
        ("quantization", meta.quantization),
        *matrix,
        ("context", f"{meta.context_length:,}"),
        ("layers", str(meta.n_layers or "?")),
        ("eos token", meta.token_text(meta.eos_id)),
        ("eot token", meta.token_text(meta.eot_id)),
        ("chat template", meta.chat_template or "none (a base model)"),
    ]


def imatrix_summary(header: Header) -> str:
    """The importance matrix the file was quantized with, from the keys llama-quantize and yi-local write."""
    file = header.get(KEY_IMATRIX_FILE, str)
    if file is None:
        return "none"
    dataset = header.get(KEY_IMATRIX_DATASET, str) or "unknown text"
    chunks, entries = header.get_int(KEY_IMATRIX_CHUNKS), header.get_int(KEY_IMATRIX_ENTRIES)
    details = [f"computed on {dataset}"]
    if chunks:
        details.append(f"{chunks} windows")
    if entries:
        details.append(f"{entries} entries")
    return f"{file} ({', '.join(details)})"
