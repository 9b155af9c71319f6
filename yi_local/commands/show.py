"""Show a model's metadata: architecture, parameters, quantization, context, chat template, eos/eot, source.

NAME is a store name (yi:6b-chat[:quant]) or a .gguf path. It only reads: a model missing from the
store is not pulled, and a Hugging Face folder is not converted (the message says how to get them).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="a store name or a .gguf file")


def run(args: argparse.Namespace) -> int:
    from yi_local.gguf_summary import describe_gguf
    from yi_local.resolve import locate_gguf
    from yi_local.store import list_models

    path = locate_gguf(args.name)
    rows = describe_gguf(path)  # checks the file first: a damaged one is named, not described
    stored = next((m for m in list_models() if m.path == path), None)
    if stored is not None:
        rows += [("source", stored.repo), ("revision", stored.revision or "-"), ("sha256", stored.sha256)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        lines = str(value).splitlines() or [""]
        print(f"{key:<{width}}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}  {line}")
    return 0
