"""What a GGUF file says about itself, read from its header (no weights are loaded)."""

from __future__ import annotations

import math
from pathlib import Path


def describe_gguf(path: Path) -> list[tuple[str, str]]:
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)

    def get(key, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = get("general.architecture", "?")
    tokens = get("tokenizer.ggml.tokens") or []

    def token(key):
        tid = get(key)
        return "-" if tid is None else f"{tokens[tid] if tid < len(tokens) else '?'} ({tid})"

    try:
        quant = LlamaFileType(get("general.file_type")).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        quant = str(get("general.file_type"))
    params = sum(math.prod(int(d) for d in t.shape) for t in reader.tensors)
    return [
        ("name", get("general.name", path.stem)),
        ("file", str(path)),
        ("size", f"{path.stat().st_size / 1e9:.2f} GB"),
        ("architecture", arch),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params:,}"),
        ("quantization", quant),
        ("context", f"{get(f'{arch}.context_length', 0):,}"),
        ("layers", str(get(f"{arch}.block_count", "?"))),
        ("eos token", token("tokenizer.ggml.eos_token_id")),
        ("eot token", token("tokenizer.ggml.eot_token_id")),
        ("chat template", get("tokenizer.chat_template") or "none (a base model)"),
    ]
