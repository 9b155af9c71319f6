"""Prompt and generation tokens/s of yi-local's engine next to a bare llama-cpp-python loop, in one run.

For each --parallel level N, N sequences with different prompts of -p random tokens generate -n tokens
each (greedy, end-of-generation tokens forbidden): first through yi-local's engine (N requests at once),
then through a plain loop over llama-cpp-python's low-level API with the same model, context (per
sequence), threads, batch and GPU layers. The table gives the tokens/s of all sequences together, the
ratio yi-local / bare loop, and generation tokens/s per sequence. The lines above it name the model, the
llama.cpp build, this machine and the versions: paste all of it into a bug report.

Examples:
  yi-local bench Yi-6B-Chat-Q4_K_M.gguf
  yi-local bench yi:6b-chat -p 256 -n 64 --parallel 1,2,4
  yi-local bench model.gguf --json > bench.json
"""

from __future__ import annotations

import argparse
import sys

from yi_local.commands.options import add_model_arg, add_runtime_args, limited
from yi_local.runtime.params import MAX_CTX, Limit


def _parallel(text: str) -> list[int]:
    from yi_local.benchmark import MAX_PARALLEL

    levels: list[int] = []
    for word in text.split(","):
        try:
            n = int(word.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected whole numbers separated by commas, such as 1,2,4, not {text!r}"
            ) from None
        if not 1 <= n <= MAX_PARALLEL:
            raise argparse.ArgumentTypeError(f"each level must be at least 1 and at most {MAX_PARALLEL} (llama.cpp's "
                                             f"limit of sequences in one context), not {n}")  # fmt: skip
        if n not in levels:
            levels.append(n)
    return levels


def _n_gen(text: str) -> int:
    from yi_local.benchmark import MIN_GEN

    return limited(Limit(MIN_GEN, MAX_CTX, integer=True, note="the first token comes with the prompt"))(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("-p", "--n-prompt", type=limited(Limit(1, MAX_CTX, integer=True)), default=512, metavar="N",
                   help="prompt tokens per sequence (default 512)")  # fmt: skip
    p.add_argument("-n", "--n-gen", type=_n_gen, default=128, metavar="N",
                   help="tokens to generate per sequence (default 128)")  # fmt: skip
    p.add_argument("--parallel", type=_parallel, default=[1], metavar="N[,N...]",
                   help="sequences decoded together, one row each, e.g. 1,2,4 (default 1)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_runtime_args(p, backends=False)


def run(args: argparse.Namespace) -> int:
    from yi_local.benchmark import check_fit

    if args.ctx:  # the model's own context (--ctx 0) is checked once its header is read
        check_fit(args.n_prompt, args.n_gen, args.ctx)

    import json
    from dataclasses import asdict

    from yi_local.benchmark import Bench, environment
    from yi_local.commands.options import resolve_model

    from yi_local.commands.options import load_options

    load_options(args)  # flags that cannot go together fail before a pull or a load
    path, _ = resolve_model(args)
    bench = Bench(path, args.n_prompt, args.n_gen, args.parallel, args.ctx, args.threads, args.batch,
                  args.n_gpu_layers, kv_type=args.kv_type, flash_attn=args.flash_attn, rpc=args.rpc)  # fmt: skip
    env = environment()
    if not args.json:
        print(_header(env, bench.setup), flush=True)
    levels = []
    for n in args.parallel:
        print(
            f"measuring {n} sequence{'s' if n > 1 else ''}: yi-local, then the bare loop…", file=sys.stderr, flush=True
        )
        levels.append(bench.level(n))
    if args.json:
        print(json.dumps({"environment": asdict(env), "setup": asdict(bench.setup),
                          "levels": [asdict(level) for level in levels]}, indent=2))  # fmt: skip
    else:
        print(_table(levels))
    return 0


def _header(env, setup) -> str:
    from yi_local.units import format_size

    build = env.build if env.gpu_offload else "CPU (llama.cpp built without GPU offload)"
    if env.devices:
        build += " · devices " + ", ".join(env.devices)
    return "\n".join([
        f"yi-local {env.yi_local_version} · llama-cpp-python {env.llama_cpp_python_version} · Python {env.python_version}",
        f"model    {setup.model} · {setup.quantization} · {format_size(setup.size_bytes)} · {_count(setup.n_params)} parameters",
        f"build    {build}",
        f"         {env.system_info}",
        f"machine  {env.os} · {env.cpu} · {env.cores} cores · {env.ram} RAM",
        f"setup    prompt {setup.n_prompt} · generate {setup.n_gen} · ctx {setup.n_ctx} per sequence"
        f"{f' ({setup.ctx_note})' if setup.ctx_note else ''} · "
        f"{setup.n_threads} thread{'s' if setup.n_threads != 1 else ''} · batch {setup.n_batch} · offload {setup.offload}",
        f"         KV cache {setup.kv_type} · flash attention {setup.flash_attn}"
        + (f" · RPC workers {', '.join(setup.rpc)}" if setup.rpc else ""),
        "",
    ])  # fmt: skip


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _table(levels) -> str:
    from yi_local.commands.tables import markdown_table

    head = ["parallel", "prompt tok/s yi-local", "bare", "ratio", "gen tok/s yi-local", "bare", "ratio",
            "gen tok/s per seq yi-local", "bare"]  # fmt: skip
    rows = [
        [str(lv.n_parallel), f"{lv.yi_local.prompt_tps:.1f}", f"{lv.bare.prompt_tps:.1f}", f"{lv.prompt_ratio:.2f}×",
         f"{lv.yi_local.generate_tps:.1f}", f"{lv.bare.generate_tps:.1f}", f"{lv.generate_ratio:.2f}×",
         f"{lv.yi_local.generate_tps_per_sequence:.1f}", f"{lv.bare.generate_tps_per_sequence:.1f}"]
        for lv in levels
    ]  # fmt: skip
    return markdown_table(head, rows)
