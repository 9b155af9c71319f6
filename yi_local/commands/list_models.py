"""List the models in the store: name, quantization, size, context, path."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from yi_local.store import list_models, models_dir
    from yi_local.units import format_size

    models = list_models()
    if not models:
        print(f"no models in {models_dir()} yet: `yi-local pull yi:6b-chat` downloads one")
        return 0
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "QUANT", "SIZE", "CONTEXT", "PATH"):
        table.add_column(column, justify="right" if column in ("SIZE", "CONTEXT") else "left")
    for m in models:
        table.add_row(m.name, m.quant, format_size(m.size), f"{m.context:,}", str(m.path))
    Console(width=200).print(table)
    return 0
