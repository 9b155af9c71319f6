"""What a GGUF file says about itself, read from its checked header (no weights are loaded)."""

from __future__ import annotations

import math
from pathlib import Path

from yi_local.gguf_header import check_model


def describe_gguf(path: Path) -> list[tuple[str, str]]:
    from gguf import LlamaFileType

    header = check_model(path)
    arch = header.get("general.architecture", str, "?")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []

    def token(key: str) -> str:
        tid = header.get_int(key)
        if tid is None:
            return "-"
        text = tokens[tid].decode("utf-8", errors="replace") if 0 <= tid < len(tokens) else "?"
        return f"{text} ({tid})"

    file_type = header.get_int("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        quant = str(file_type)
    params = sum(math.prod(t.shape) for t in header.tensors)
    return [
        ("name", header.get("general.name", str) or path.stem),
        ("file", str(path)),
        ("size", f"{header.file_size / 1e9:.2f} GB"),
        ("architecture", arch),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params:,}"),
        ("quantization", quant),
        ("context", f"{header.get_int(f'{arch}.context_length', 0):,}"),
        ("layers", str(header.get(f"{arch}.block_count", int, "?"))),
        ("eos token", token("tokenizer.ggml.eos_token_id")),
        ("eot token", token("tokenizer.ggml.eot_token_id")),
        ("chat template", header.get("tokenizer.chat_template", str) or "none (a base model)"),
    ]
