"""Flags shared by `run`, `chat` and `serve`, and their translation to runtime dataclasses."""

from __future__ import annotations

import argparse

from yi_local.runtime.params import LoadOptions, SamplingParams


def _gpu_layers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected 'auto' or a number of layers (-1: all)") from None


MODEL_HELP = "a .gguf file, a store name (yi:6b-chat[:q5_k_m]), a Hugging Face folder or a hub repo id"


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--pull", action="store_true", help="download a MODEL missing from the store without asking")


def choose_backend(args: argparse.Namespace) -> str:
    """auto: transformers for --precision full on a Hugging Face folder or hub id, else llama.cpp."""
    if args.backend != "auto":
        return args.backend
    from pathlib import Path

    is_gguf = Path(args.model).suffix.lower() == ".gguf"
    return "transformers" if args.precision == "full" and not is_gguf else "llama.cpp"


def resolve_model(args: argparse.Namespace) -> tuple[str, str]:
    """(what to load, backend): a GGUF for llama.cpp (pulled or converted when needed), a folder for transformers.

    A missing model is pulled with --pull, or after asking on a terminal.
    """
    from yi_local.progress import TerminalProgress
    from yi_local.pull import resolve_gguf, resolve_hf_folder

    def confirm(question: str) -> bool:
        from yi_local.commands.confirm import confirm as ask

        return ask(question)

    backend = choose_backend(args)
    if backend == "transformers":
        return str(resolve_hf_folder(args.model, pull_missing=args.pull, confirm=confirm)), backend
    with TerminalProgress() as progress:
        path = resolve_gguf(args.model, pull_missing=args.pull, confirm=confirm, progress=progress,
                            threads=getattr(args, "threads", None))  # fmt: skip
    return str(path), backend


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", choices=("auto", "llama.cpp", "transformers"), default="auto",
                   help="llama.cpp (GGUF; default) or transformers (a Hugging Face folder in bf16 on CUDA, "
                   "fp32 on CPU; needs `pip install 'yi-local[cuda]'`); auto picks transformers for "
                   "--precision full on a folder or hub id")  # fmt: skip
    g.add_argument("--precision", choices=("quantized", "full"), default="quantized",
                   help="full: run the original weights with transformers (see --backend)")  # fmt: skip
    g.add_argument("--n-gpu-layers", "-ngl", type=_gpu_layers, default="auto", metavar="auto|N",
                   help="layers to offload to the GPU (auto: all when the model fits, else as many as fit; "
                   "-1: all; 0: CPU only)")
    g.add_argument("--ctx", type=int, default=4096, help="context length in tokens (0: the model's own; default 4096)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--batch", type=int, default=512, help="prompt evaluation batch size (default 512)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 512) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=0.7, help="0 for greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=40, help="default 40 (0: off)")
    g.add_argument("--top-p", type=float, default=0.95, help="default 0.95 (1: off)")
    g.add_argument("--min-p", type=float, default=0.05, help="default 0.05 (0: off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 (off)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate (default {max_tokens})")  # fmt: skip
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at TEXT (repeatable)")


def load_options(args: argparse.Namespace, on_progress=None) -> LoadOptions:
    return LoadOptions(n_gpu_layers=args.n_gpu_layers, n_ctx=args.ctx, n_threads=args.threads,
                       n_batch=args.batch, on_progress=on_progress)  # fmt: skip


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=list(args.stop),
    )  # fmt: skip
