"""What a GGUF file says about itself, read from its checked header (no weights are loaded)."""

from __future__ import annotations

from pathlib import Path

from yi_local.gguf_header import check_model, model_meta
from yi_local.units import format_size


def describe_gguf(path: Path) -> list[tuple[str, str]]:
    meta = model_meta(check_model(path))
    params = meta.n_params
    return [
        ("name", meta.name),
        ("file", str(path)),
        ("size", format_size(meta.file_size)),
        ("architecture", meta.architecture),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params:,}"),
        ("quantization", meta.quantization),
        ("context", f"{meta.context_length:,}"),
        ("layers", str(meta.n_layers or "?")),
        ("eos token", meta.token_text(meta.eos_id)),
        ("eot token", meta.token_text(meta.eot_id)),
        ("chat template", meta.chat_template or "none (a base model)"),
    ]
