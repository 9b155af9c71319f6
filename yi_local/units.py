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
