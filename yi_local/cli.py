"""`yi-local`: a small dispatcher; each subcommand lives in `yi_local/commands/` and is imported lazily."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
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
    "bench": ("bench", "prompt and generation tokens/s of yi-local next to a bare llama-cpp-python loop"),
    "quality": ("quality", "perplexity and KL divergence of quantized GGUFs against a reference"),
    "worker": ("worker", "lend this machine to a model run elsewhere with --rpc (llama.cpp's RPC server)"),
}


class Parser(argparse.ArgumentParser):
    """Usage errors exit with code 1, like every other user mistake."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message}\n  see `{self.prog} --help`\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (its help lists the commands) and each command's own parser."""
    parser = Parser(prog="yi-local", description="Run 01.AI's Yi models on your own machine, offline and fast.")
    parser.add_argument("--version", action="version", version=f"yi-local {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands = {}
    for name, (module, help_text) in COMMANDS.items():
        cmd = importlib.import_module(f"yi_local.commands.{module}")
        p = commands[name] = sub.add_parser(name, help=help_text, description=cmd.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        cmd.add_arguments(p)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show library log messages")
        p.set_defaults(run=cmd.run, command=name)
    return parser, commands


def parse(argv: list[str]) -> argparse.Namespace | None:
    """Global options, then the command's arguments in any order (`run MODEL --temp 0 "prompt"`).

    argparse's intermixed parsing, which lets options sit between positionals, refuses parsers with
    subcommands, so the command's parser gets the words after the command name on its own.
    """
    parser, commands = build_parser()
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    args = parser.parse_args(argv[:at])  # --help, --version, -v, or an unknown global option
    if at == len(argv):
        parser.print_help()
        return None
    name = argv[at]
    if name not in commands:
        parser.error(f"unknown command {name!r} (choose from {', '.join(commands)})")
    return commands[name].parse_intermixed_args(argv[at + 1 :], namespace=args)


def main(argv: list[str] | None = None) -> int:
    from yi_local import signals

    signals.install()
    # File names need not be UTF-8: print them back byte for byte, as ls does, instead of failing.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        args = parse(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as e:  # Ctrl+C while the command modules load
        return signals.exit_code(e)
    if args is None:
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args) or 0
    except YiLocalError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  {e.hint}", file=sys.stderr)
        return 1
    except UnicodeEncodeError as e:
        if "surrogates" not in e.reason:
            raise
        # Bytes that are not UTF-8 in an argument (Python keeps them as surrogates) reached text.
        bad = e.object[e.start : e.end].encode("utf-8", "surrogateescape")
        print(f"error: the text {_excerpt(e.object, e.start)} has bytes that are not UTF-8 ({bad!r})", file=sys.stderr)
        print("  give text in UTF-8 (convert it with iconv); file and folder names may use any bytes", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`yi-local show X | head -3`): stop quietly, as a shell tool does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        try:
            print("\ninterrupted: nothing was left half-written", file=sys.stderr)
        except OSError:  # SIGHUP: the terminal is gone
            pass
        return signals.exit_code(e)


def _excerpt(text: str, at: int) -> str:
    start = max(0, at - 20)
    shown = text[start : at + 20].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return ("..." if start else "") + '"' + shown.replace("\n", "\\n") + '"' + ("..." if at + 20 < len(text) else "")


if __name__ == "__main__":
    sys.exit(main())
