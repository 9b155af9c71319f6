"""Flags shared by `run`, `chat` and `serve`, and their translation to runtime dataclasses."""

from __future__ import annotations

import argparse
from typing import Callable

from yi_local.kv_types import FLASH_ATTN_MODES, KV_TYPES
from yi_local.runtime.params import LOAD_LIMITS, MIN_CTX, SAMPLING_LIMITS, Limit, LoadOptions, SamplingParams

SAMPLING = SamplingParams()  # the defaults, written once in the runtime
LOADING = LoadOptions()


def limited(limit: Limit, extra: Callable[[float], str | None] | None = None) -> Callable[[str], float]:
    """An argparse type for a value in `limit` (the runtime's own table, so the CLI and the API agree)."""

    def parse(text: str):
        try:
            value = int(text) if limit.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {limit.describe()}, not {text!r}") from None
        if not limit.contains(value):
            raise argparse.ArgumentTypeError(f"must be {limit.describe()}, not {text}")
        problem = extra(value) if extra else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _ctx_problem(value: float) -> str | None:
    if 0 < value < MIN_CTX:
        return f"a context of {value:g} tokens is too small: use at least {MIN_CTX}, or 0 for the model's own"
    return None


def _rpc(text: str) -> tuple[str, ...]:
    from yi_local.errors import YiLocalError
    from yi_local.rpc import parse_endpoints

    try:
        return tuple(e.llama for e in parse_endpoints(text))
    except YiLocalError as e:
        raise argparse.ArgumentTypeError(e.message.removeprefix("--rpc: ")) from None


def _gpu_layers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return limited(LOAD_LIMITS["n_gpu_layers"])(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of layers (-1: all): {e}") from None


MODEL_HELP = "a .gguf file, a store name (yi:6b-chat[:q5_k_m]), a Hugging Face folder or a hub repo id"


def _model(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("MODEL is empty: give a .gguf file, a store name, a folder or a repo id")
    return text


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=_model, help=MODEL_HELP)
    p.add_argument("--pull", action="store_true", help="download a MODEL missing from the store without asking")


def choose_backend(args: argparse.Namespace) -> str:
    """auto: transformers for --precision full on a Hugging Face folder or hub id, else llama.cpp."""
    if args.backend != "auto":
        return args.backend
    from pathlib import Path

    is_gguf = Path(args.model).suffix.lower() == ".gguf"
    if args.precision == "full" and is_gguf:
        from yi_local.errors import YiLocalError

        raise YiLocalError(f"--precision full runs the original weights, but {args.model} is a GGUF",
                           hint="give the Hugging Face folder or repo id, or leave out --precision full")  # fmt: skip
    return "transformers" if args.precision == "full" else "llama.cpp"


def resolve_model(args: argparse.Namespace) -> tuple[str, str]:
    """(what to load, backend): a GGUF for llama.cpp (pulled or converted when needed), a folder for transformers.

    A missing model is pulled with --pull, or after asking on a terminal.
    """
    from yi_local.progress import TerminalProgress
    from yi_local.resolve import resolve_gguf, resolve_hf_folder

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


def add_runtime_args(p: argparse.ArgumentParser, backends: bool = True) -> None:
    """Loading flags; without `backends` there is no --backend/--precision: the command runs on llama.cpp."""
    g = p.add_argument_group("runtime")
    if not backends:
        p.set_defaults(backend="llama.cpp", precision="quantized")
    else:
        g.add_argument("--backend", choices=("auto", "llama.cpp", "transformers"), default="auto",
                       help="llama.cpp (GGUF; default) or transformers (a Hugging Face folder in bf16 on CUDA, "
                       "fp32 on CPU; needs `pip install 'yi-local[cuda]'`); auto picks transformers for "
                       "--precision full on a folder or hub id")  # fmt: skip
        g.add_argument("--precision", choices=("quantized", "full"), default="quantized",
                       help="full: run the original weights with transformers (see --backend)")  # fmt: skip
    g.add_argument("--n-gpu-layers", "-ngl", type=_gpu_layers, default="auto", metavar="auto|N",
                   help="layers to offload to the GPU (auto: all when the model fits, else as many as fit; "
                   "-1: all; 0: CPU only)")
    g.add_argument("--ctx", type=limited(LOAD_LIMITS["n_ctx"], _ctx_problem), default=LOADING.n_ctx,
                   help=f"context length in tokens (0: the model's own, or the most of it that fits in free memory; "
                        f"default {LOADING.n_ctx})")  # fmt: skip
    g.add_argument("--threads", type=limited(LOAD_LIMITS["n_threads"]), default=None,
                   help="CPU threads (default: all cores)")  # fmt: skip
    g.add_argument("--batch", type=limited(LOAD_LIMITS["n_batch"]), default=LOADING.n_batch,
                   help=f"prompt evaluation batch size (default {LOADING.n_batch})")  # fmt: skip
    g.add_argument("--rpc", type=_rpc, default=(), metavar="HOST:PORT[,HOST:PORT...]",
                   help="llama.cpp RPC workers (`yi-local worker` on each machine): the model's layers are split "
                   "across them and this machine by free memory")  # fmt: skip
    g.add_argument("--kv-type", choices=tuple(KV_TYPES), default=LOADING.kv_type,
                   help="KV cache type for keys and values: q8_0 takes 53%% of f16's memory, q4_0 28%%; both need "
                   f"flash attention (default {LOADING.kv_type})")  # fmt: skip
    g.add_argument("--flash-attn", "-fa", choices=FLASH_ATTN_MODES, default=LOADING.flash_attn,
                   help="flash attention: auto lets llama.cpp choose for the device (on for a quantized "
                   f"KV cache); off is refused with --kv-type q8_0/q4_0 (default {LOADING.flash_attn})")  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = SAMPLING.max_tokens) -> None:
    g = p.add_argument_group("sampling")

    def add(flag: str, name: str, help_text: str, *aliases: str, default=None) -> None:
        value = getattr(SAMPLING, name) if default is None else default
        g.add_argument(flag, *aliases, dest=name, type=limited(SAMPLING_LIMITS[name]), default=value,
                       help=f"{help_text} (default {value})")  # fmt: skip

    add("--temperature", "temperature", "0 for greedy", "--temp")
    add("--top-k", "top_k", "keep the K most likely tokens; 0: off")
    add("--top-p", "top_p", "nucleus sampling; 1: off")
    add("--min-p", "min_p", "drop tokens below this share of the likeliest; 0: off")
    add("--repeat-penalty", "repeat_penalty", "penalize tokens seen in the last --repeat-last-n; 1: off")
    add("--repeat-last-n", "repeat_last_n", "how many recent tokens the penalties look at; 0: off")
    add("--frequency-penalty", "frequency_penalty", "subtract this times a token's recent count; 0: off")
    add("--presence-penalty", "presence_penalty", "subtract this from tokens seen recently; 0: off")
    g.add_argument("--seed", type=limited(SAMPLING_LIMITS["seed"]), default=None, help="random seed (default: random)")
    g.add_argument("--max-tokens", type=limited(SAMPLING_LIMITS["max_tokens"]), default=max_tokens,
                   help=f"most tokens to generate (default {max_tokens or 'until the context is full'})")  # fmt: skip
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at TEXT (repeatable)")


def load_options(args: argparse.Namespace, on_progress=None, n_parallel: int = 1) -> LoadOptions:
    """The loading flags, checked: call it before resolving the model, so that flags that cannot go
    together (--kv-type q8_0 --flash-attn off) fail before a pull, a conversion or a load."""
    options = LoadOptions(n_gpu_layers=args.n_gpu_layers, n_ctx=args.ctx, n_threads=args.threads,
                          n_batch=args.batch, n_parallel=n_parallel, kv_type=args.kv_type,
                          flash_attn=args.flash_attn, rpc=args.rpc, on_progress=on_progress)  # fmt: skip
    options.validate()
    transformers = args.backend == "transformers" or getattr(args, "precision", None) == "full"
    if transformers and options.rpc:
        from yi_local.errors import YiLocalError

        raise YiLocalError("--rpc spreads a GGUF over llama.cpp workers; the transformers backend cannot use them",
                           hint="leave out --rpc with --precision full / --backend transformers")  # fmt: skip
    if transformers and (options.kv_type != LOADING.kv_type or options.flash_attn != LOADING.flash_attn):
        from yi_local.errors import YiLocalError

        raise YiLocalError("--kv-type and --flash-attn are llama.cpp's settings; the transformers backend "
                           "keeps its cache in the model's own precision",
                           hint="leave them out with --precision full / --backend transformers")  # fmt: skip
    return options


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags, checked now: a bad --stop fails before a model is resolved or loaded."""
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty, seed=args.seed,
        stop=list(args.stop),
    )  # fmt: skip
    params.validate()
    return params
