"""What llama.cpp's log says of a context it made, where its API says nothing: the KV cache's size and
types, whether flash attention is on, and why a context could not be made."""

from __future__ import annotations

import re
from dataclasses import dataclass

_MIB = 1 << 20
_KV = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB .*?K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_FA = re.compile(r"llama_context: flash_attn += (\w+)")
_FA_RESOLVED = re.compile(r"Flash Attention (enabled|not supported)")


@dataclass(frozen=True)
class ContextReport:
    kv_bytes: int  # the KV cache buffer, keys and values
    type_k: str
    type_v: str
    flash_attn: bool | None  # None: not said


def read_report(lines: list[str]) -> ContextReport | None:
    """The report in the log of a context's creation; None when the log has no KV cache line."""
    text = "".join(lines)
    kv = _KV.search(text)
    if kv is None:
        return None
    flash = None
    fa = _FA.search(text)
    if fa is not None:
        flash = {"enabled": True, "disabled": False}.get(fa.group(1))
    resolved = _FA_RESOLVED.findall(text)
    if resolved:
        flash = resolved[-1] == "enabled"
    return ContextReport(int(float(kv.group(1)) * _MIB), kv.group(2), kv.group(4), flash)


def errors(lines: list[str]) -> str:
    """llama.cpp's own words for what went wrong: the lines that say "error", "failed" or "requires"."""
    text = "".join(lines)
    found = [line.split(": ", 1)[-1].strip() for line in text.splitlines()
             if re.search(r"error|failed|requires|not supported|does not", line, re.IGNORECASE)]  # fmt: skip
    return "; ".join(dict.fromkeys(found))[:400]


_LAYER = re.compile(r"load_tensors: layer +(\d+) assigned to device (\S+?),")


def layer_split(lines: list[str], labels: dict[str, str] | None = None) -> str | None:
    """Where llama.cpp put the layers, from its model-loading log: "RPC0[127.0.0.1:50052] 5, RPC1[…] 4,
    CPU 1 of 10 layers" (counted as llama.cpp counts: the blocks and the output layer; `labels` renames
    devices); None when it did not say."""
    devices = [m.group(2) for m in _LAYER.finditer("".join(lines))]
    if not devices:
        return None
    counts: dict[str, int] = {}
    for device in devices:
        counts[device] = counts.get(device, 0) + 1
    labels = labels or {}
    return ", ".join(f"{labels.get(d, d)} {n}" for d, n in counts.items()) + f" of {len(devices)} layers"
