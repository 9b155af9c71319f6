"""The Yi model family as data: short names, Hugging Face ids, shapes, contexts.

A name may carry a quantization (`yi:6b-chat:q5_k_m`, default Q4_K_M). Names not in the catalog are
taken as Hugging Face repo ids (`org/name[:QUANT]`) of any Llama-architecture model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from yi_local.errors import YiLocalError
from yi_local.quant_types import QUANT_TYPES, parse_quant

DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 64000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.ffn
        per_layer = attn + mlp + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden


YI_6B = Shape(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=4)
YI_9B = Shape(hidden=4096, ffn=11008, layers=48, heads=32, kv_heads=4)
YI_34B = Shape(hidden=7168, ffn=20480, layers=60, heads=56, kv_heads=8)
YI_CODER_1_5B = Shape(hidden=2048, ffn=5504, layers=24, heads=16, kv_heads=16)


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # yi:6b-chat
    repo: str  # 01-ai/Yi-6B-Chat
    shape: Shape
    context: int
    chat: bool

    @property
    def parameters(self) -> int:
        return self.shape.parameters


def _entries() -> list[CatalogEntry]:
    e = CatalogEntry
    return [
        e("yi:6b", "01-ai/Yi-6B", YI_6B, 4096, False),
        e("yi:6b-chat", "01-ai/Yi-6B-Chat", YI_6B, 4096, True),
        e("yi:6b-200k", "01-ai/Yi-6B-200K", YI_6B, 200000, False),
        e("yi:9b", "01-ai/Yi-9B", YI_9B, 4096, False),
        e("yi:9b-200k", "01-ai/Yi-9B-200K", YI_9B, 262144, False),
        e("yi:34b", "01-ai/Yi-34B", YI_34B, 4096, False),
        e("yi:34b-chat", "01-ai/Yi-34B-Chat", YI_34B, 4096, True),
        e("yi:34b-200k", "01-ai/Yi-34B-200K", YI_34B, 200000, False),
        e("yi-1.5:6b", "01-ai/Yi-1.5-6B", YI_6B, 4096, False),
        e("yi-1.5:6b-chat", "01-ai/Yi-1.5-6B-Chat", YI_6B, 4096, True),
        e("yi-1.5:9b", "01-ai/Yi-1.5-9B", YI_9B, 4096, False),
        e("yi-1.5:9b-chat", "01-ai/Yi-1.5-9B-Chat", YI_9B, 4096, True),
        e("yi-1.5:9b-chat-16k", "01-ai/Yi-1.5-9B-Chat-16K", YI_9B, 16384, True),
        e("yi-1.5:34b", "01-ai/Yi-1.5-34B", YI_34B, 4096, False),
        e("yi-1.5:34b-chat", "01-ai/Yi-1.5-34B-Chat", YI_34B, 4096, True),
        e("yi-1.5:34b-chat-16k", "01-ai/Yi-1.5-34B-Chat-16K", YI_34B, 16384, True),
        e("yi-coder:1.5b", "01-ai/Yi-Coder-1.5B", YI_CODER_1_5B, 131072, False),
        e("yi-coder:1.5b-chat", "01-ai/Yi-Coder-1.5B-Chat", YI_CODER_1_5B, 131072, True),
        e("yi-coder:9b", "01-ai/Yi-Coder-9B", YI_9B, 131072, False),
        e("yi-coder:9b-chat", "01-ai/Yi-Coder-9B-Chat", YI_9B, 131072, True),
    ]


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _entries()}
BY_REPO: dict[str, CatalogEntry] = {e.repo.lower(): e for e in CATALOG.values()}

# The hub's rule: an owner and a name of letters, digits, '-', '_' and '.', at most 96 characters each.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$", re.ASCII)


@dataclass(frozen=True)
class ModelRef:
    """What a model name refers to: a Hugging Face repo (maybe in the catalog) and a quantization."""

    repo: str
    quant: str
    entry: CatalogEntry | None
    explicit_quant: bool = False  # the name carried the quantization

    @property
    def display(self) -> str:
        return self.entry.name if self.entry else self.repo

    @property
    def full_name(self) -> str:
        return f"{self.display}:{self.quant.lower()}"


def _shown(spec: str, limit: int = 80) -> str:
    return repr(spec if len(spec) <= limit else spec[:limit] + "…")


def parse_name(spec: str) -> ModelRef:
    """`yi:6b-chat`, `yi:6b-chat:q5_k_m`, `01-ai/Yi-6B-Chat`, `org/model:Q8_0` → a ModelRef."""
    base, quant, explicit = spec, DEFAULT_QUANT, False
    head, sep, tail = spec.rpartition(":")
    if sep and tail.upper() in QUANT_TYPES:
        base, quant, explicit = head, parse_quant(tail).name, True
    elif sep and (head.lower() in CATALOG or _REPO_ID.fullmatch(head)):
        raise YiLocalError(f"{_shown(tail)} is not a quantization the store keeps (in {_shown(spec)})",
                           hint=f"use one of {', '.join(QUANT_TYPES)} (e.g. {head}:{DEFAULT_QUANT.lower()})")  # fmt: skip
    entry = CATALOG.get(base.lower())
    if entry is not None:
        return ModelRef(entry.repo, quant, entry, explicit)
    if _REPO_ID.fullmatch(base):
        entry = BY_REPO.get(base.lower())
        return ModelRef(entry.repo if entry else base, quant, entry, explicit)  # the catalog's spelling: one folder
    close = [n for n in CATALOG if n.split(":")[0] == base.split(":")[0]] or list(CATALOG)[:4]
    raise YiLocalError(
        f"{_shown(spec)} is not a known model name, a .gguf file, a model folder or a Hugging Face repo id",
        hint=f"try one of: {', '.join(close[:6])} (`yi-local doctor` lists them all), or org/name",
    )
