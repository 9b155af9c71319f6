"""Sizes for people: the one format every size yi-local prints goes through.

Binary units (KiB, MiB, GiB), as memory is counted: `doctor` compares model files with RAM, and
llama.cpp itself reports model sizes in GiB.
"""

from __future__ import annotations

GIB = 1 << 30
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n_bytes: float) -> str:
    """`512 B`, `1.6 MiB`, `4.0 GiB`: one decimal in the largest unit that keeps the number under 1024."""
    if n_bytes < 1024:
        return f"{max(0, int(n_bytes))} B"
    value = n_bytes / 1024
    for unit in _UNITS[:-1]:
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"


_FACTORS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
            "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}  # fmt: skip


def parse_size(text: str) -> int:
    """`2G`, `512MiB`, `1.5 GB`, `0`: bytes (binary units, as `format_size` prints); ValueError otherwise."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _FACTORS:
        raise ValueError(f"{text!r} is not a size: give a number with K, M, G or T (e.g. 2G, 512M), or 0")
    value = float(m.group(1)) * _FACTORS[unit]
    if value >= 1 << 60:
        raise ValueError(f"{text!r} is too large a size")
    return int(value)
