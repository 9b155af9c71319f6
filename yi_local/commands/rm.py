"""Remove a model from the store (asks first unless --yes).

NAME is a store name; without a quantization every stored quantization of that model is removed.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME[:QUANT]", help="e.g. yi:6b-chat or yi:6b-chat:q8_0")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")


def run(args: argparse.Namespace) -> int:
    from yi_local.catalog import parse_name
    from yi_local.commands.confirm import can_ask, confirm
    from yi_local.errors import YiLocalError
    from yi_local.store import list_models, remove
    from yi_local.units import format_size

    if args.name.startswith(("/", ".", "~")) or args.name.count("/") > 1 or args.name.lower().endswith(".gguf"):
        raise YiLocalError(f"{args.name[:200]} is a path: rm removes models from the store, by name",
                           hint="`yi-local list` shows the names; a file outside the store is yours to delete")  # fmt: skip
    ref = parse_name(args.name)
    targets = [m for m in list_models()
               if m.repo.lower() == ref.repo.lower() and (not ref.explicit_quant or m.quant == ref.quant)]  # fmt: skip
    if not targets:
        raise YiLocalError(f"{args.name} is not in the store", hint="`yi-local list` shows what is")
    total = sum(m.size for m in targets)
    names = ", ".join(m.full_name for m in targets)
    if not args.yes:
        if not can_ask():
            raise YiLocalError(f"removing {names} needs confirmation", hint="pass --yes to remove without asking")
        if not confirm(f"remove {names} ({format_size(total)})?"):
            print("kept")
            return 0
    for m in targets:
        remove(m)
    print(f"removed {names}, freeing {format_size(total)}")
    return 0
