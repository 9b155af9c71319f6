"""`yi-local`: a small dispatcher; each subcommand lives in `yi_local/commands/` and is imported lazily."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from yi_local import __version__
from yi_local.errors import YiLocalError

# name -> (module under yi_local.commands, one-line help)
COMMANDS = {
    "convert": ("convert", "convert a Hugging Face Yi model folder to GGUF and quantize it"),
    "run": ("run", "generate one reply from a model and stream it to stdout"),
    "chat": ("chat", "chat with a model in the terminal"),
    "serve": ("serve", "serve a model over a local OpenAI-compatible HTTP API with a web chat page"),
    "pull": ("pull", "download, convert and quantize a model into the store"),
    "list": ("list_models", "list the models in the store"),
    "show": ("show", "show a model's metadata"),
    "rm": ("rm", "remove a model from the store"),
    "doctor": ("doctor", "what this machine has, and which Yi models fit it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yi-local",
        description="Run 01.AI's Yi models on your own machine, offline and fast.",
    )
    parser.add_argument("--version", action="version", version=f"yi-local {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = importlib.import_module(f"yi_local.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=cmd.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args) or 0
    except YiLocalError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
