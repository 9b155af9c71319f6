"""What this machine has (OS, CPU, RAM, GPU, the llama-cpp-python build) and which Yi models fit it, how fast.

The table gives the memory each catalog model needs at each quantization level — weights at the
level's bits per weight, plus the KV cache of --ctx tokens (a model's own context where that is shorter)
at --kv-type (f16 unless told), plus about 0.3 GiB of buffers — and marks what fits in the memory
llama.cpp would use: free GPU memory when the build offloads, else free RAM. Beside it, the decode
speed: memory bandwidth ÷ bytes read per token (decoding is memory-bound). The recommendation is the
biggest chat model that holds --ctx tokens, fits and decodes at 10 tokens/s or more, with the
`yi-local chat` command that runs it as planned. With --rpc, each worker is asked for its free memory
(one serving another client is shown busy, not waited for) and the answering ones' memory joins this
machine's.

Examples:
  yi-local doctor
  yi-local doctor --ctx 131072 --kv-type q8_0
  yi-local doctor --memory 16 --bandwidth 60
  yi-local doctor --rpc 192.168.1.20:50052,192.168.1.21:50052
"""

from __future__ import annotations

import argparse

from yi_local.kv_types import DEFAULT_KV_TYPE, KV_TYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=4096, metavar="N",
                   help="context length in tokens to plan the KV cache for; a model whose own context is shorter "
                   "is planned at its own (default 4096)")  # fmt: skip
    p.add_argument("--kv-type", choices=tuple(KV_TYPES), default=DEFAULT_KV_TYPE,
                   help="KV cache type to plan for, as `run --kv-type`: q8_0 takes 53%% of f16's memory, q4_0 "
                   f"28%% (default {DEFAULT_KV_TYPE})")  # fmt: skip
    p.add_argument("--memory", type=float, default=None, metavar="GIB",
                   help="plan for this much memory instead of what is free here")  # fmt: skip
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="llama.cpp RPC workers (`yi-local worker`) whose free memory joins this machine's")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBPS",
                   help="estimate decode speed with this memory bandwidth in GB/s (what decoding gets, about 60%% "
                        "of a GPU's peak) instead of measuring it or looking the GPU up")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import math
    from importlib.metadata import PackageNotFoundError, version

    from yi_local.errors import YiLocalError
    from yi_local.runtime.params import MAX_CTX

    if args.memory is not None and not (math.isfinite(args.memory) and 0 < args.memory <= 1 << 20):
        raise YiLocalError(f"--memory is {args.memory:g}; give the GiB to plan for, a positive number",
                           hint="e.g. --memory 16, or leave it out to use what is free here")  # fmt: skip
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and 0 < args.bandwidth <= 1e5):
        raise YiLocalError(f"--bandwidth is {args.bandwidth:g}; give the memory bandwidth in GB/s, "
                           "above 0 and at most 100000",
                           hint="e.g. --bandwidth 60, or leave it out to measure it here")  # fmt: skip
    if not 1 <= args.ctx <= MAX_CTX:
        raise YiLocalError(f"--ctx is {args.ctx}; it must be at least 1 and at most {MAX_CTX}",
                           hint="e.g. --ctx 4096 (the default), or --ctx 131072 for Yi-Coder's whole context")  # fmt: skip

    import psutil
    from rich.console import Console
    from rich.table import Table

    from yi_local import hardware
    from yi_local.bandwidth import Bandwidth, decode_bandwidth
    from yi_local.catalog import CATALOG
    from yi_local.fit import DOCTOR_LEVELS, INTERACTIVE_TPS, OVERHEAD_BYTES, fits, memory_needed, recommend
    from yi_local.runtime.params import LoadOptions
    from yi_local.units import GIB, format_size

    console = Console(width=144)  # the table: 8 levels of "20.6 0.9/s ✗" beside the longest names
    info = hardware.system_summary()
    vm = psutil.virtual_memory()
    try:
        llama_version = version("llama-cpp-python")
        gpu = hardware.llama_gpu_kind()
    except PackageNotFoundError:
        llama_version, gpu = None, None
    free_gpu = hardware.gpu_free_bytes(gpu)
    if args.bandwidth is not None:
        bandwidth = Bandwidth(args.bandwidth * 1e9, f"{args.bandwidth:g} GB/s (--bandwidth)")
    else:
        bandwidth = decode_bandwidth(gpu)
    rows = [
        ("OS", info["os"]),
        ("CPU", f"{info['cpu']} ({info['cores']} cores)"),
        ("RAM", f"{format_size(vm.total)} ({format_size(vm.available)} free)"),
        ("llama.cpp", f"llama-cpp-python {llama_version}, " + (f"offloads to {gpu}" if gpu else "CPU-only build")
         if llama_version else "llama-cpp-python is not installed"),  # fmt: skip
        ("GPU", f"{gpu}, {format_size(free_gpu)} free" if gpu and free_gpu is not None
         else (gpu or "none llama.cpp can use (see the README to build llama-cpp-python with Metal or CUDA)")),  # fmt: skip
        ("torch", _torch_line()),
        ("bandwidth", bandwidth.how if bandwidth else f"unknown {f'for this {gpu} GPU' if gpu else 'here'}: "
                                                       "pass --bandwidth GBPS"),
    ]
    pooled, answering = _workers(args.rpc, rows)
    for key, value in rows:
        console.print(f"[bold]{key:<10}[/bold] {value}", highlight=False)

    if args.memory is not None:
        budget, where = int(args.memory * GIB), f"{args.memory:g} GiB (--memory)"
    elif gpu and free_gpu is not None:
        budget, where = free_gpu, f"{format_size(free_gpu)} free on the {gpu} GPU"
    else:
        budget, where = vm.available, f"{format_size(vm.available)} free RAM"
    if answering:
        budget += pooled
        where += f" + {format_size(pooled)} on {len(answering)} worker{'s' if len(answering) > 1 else ''}"
    speed = "" if bandwidth is None else " and decode speed (tokens/s)"
    kv = args.kv_type
    table = Table(title=f"Memory needed (GiB){speed} at ctx {args.ctx}, KV cache {kv}", box=None,
                  header_style="bold", title_justify="left")  # fmt: skip
    table.add_column("MODEL")
    table.add_column("PARAMS", justify="right")
    for level in DOCTOR_LEVELS:
        table.add_column(level, justify="right")
    for entry in CATALOG.values():
        cells = []
        for level in DOCTOR_LEVELS:
            need = memory_needed(entry, level, args.ctx, kv)
            gib = f"{need.total / GIB:.1f}"
            if bandwidth is None:
                cells.append(f"[green]{gib} ✓[/green]" if fits(need, budget) else f"[dim]{gib} ✗[/dim]")
                continue
            tps = need.tokens_per_second(bandwidth.bytes_per_s)
            text = f"{gib} {_rate(tps)}"
            if not fits(need, budget):
                cells.append(f"[dim]{text} ✗[/dim]")
            else:
                cells.append(f"[green]{text} ✓[/green]" if tps >= INTERACTIVE_TPS else f"[yellow]{text} ~[/yellow]")
        table.add_row(entry.name, f"{entry.parameters / 1e9:.1f}B", *cells)
    console.print()
    console.print(table)
    fast = f", decodes at {INTERACTIVE_TPS:g} tok/s or more · ~ fits, decodes slower" if bandwidth else ""
    console.print(f"✓ fits in {where}{fast} · ✗ does not fit", highlight=False)
    console.print(f"Memory = weights + {kv} KV cache ({_kv_share(kv)}) at ctx {args.ctx}, or at a model's own "
                  f"context where shorter, + {OVERHEAD_BYTES / GIB:.1f} GiB of buffers.", highlight=False)  # fmt: skip
    if bandwidth is not None:
        console.print(f"Speed ≈ memory bandwidth ÷ bytes read per token (the weights and the {kv} KV cache at ctx "
                      f"{args.ctx}), with {bandwidth.bytes_per_s / 1e9:.1f} GB/s.", highlight=False)  # fmt: skip
    # A model with a shorter context than asked for is no answer to "what runs --ctx tokens here".
    longest = max(entry.context for entry in CATALOG.values())
    holding = [entry for entry in CATALOG.values() if entry.context >= min(args.ctx, longest)]
    best = recommend(holding, args.ctx, budget, None if bandwidth is None else bandwidth.bytes_per_s, kv)
    console.print()
    if best is None:
        smallest = min(((entry, level) for entry in holding for level in DOCTOR_LEVELS),
                       key=lambda el: memory_needed(*el, args.ctx, kv).total)  # fmt: skip
        every = len(holding) == len(CATALOG)
        what = "Nothing" if every else f"No model that holds {args.ctx} tokens"
        console.print(f"{what} fits in {where}: the smallest, {smallest[0].name}:{smallest[1].lower()}, needs "
                      f"{format_size(memory_needed(*smallest, args.ctx, kv).total)}.", highlight=False)  # fmt: skip
        first = "Close other programs" if args.memory is None else "Plan for more --memory"
        console.print(f"{first}{_smaller_kv_hint(kv)}{'' if every else ', or plan a smaller --ctx'}.", highlight=False)
        return 0
    name = f"{best.entry.name}:{best.quant.lower()}"
    about = format_size(best.need.total)
    if best.tokens_per_second is not None:
        about += f", ~{_rate(best.tokens_per_second).removesuffix('/s')} tok/s"
    if not best.interactive:
        console.print(f"Nothing that fits decodes at {INTERACTIVE_TPS:g} tok/s or more here.")
    label = "Recommended" if best.interactive else "Fastest"
    n_ctx = min(args.ctx, best.entry.context)
    flags = (f" --ctx {n_ctx}" if n_ctx != LoadOptions.n_ctx else "") + (f" --kv-type {kv}" if kv != DEFAULT_KV_TYPE else "")
    if answering:
        flags += " --rpc " + ",".join(str(e) for e in answering)
    console.print(f"{label}: [bold]{name}[/bold] ({about}) — `yi-local chat {name} --pull{flags}`", highlight=False)
    return 0


def _workers(text: str | None, rows: list) -> tuple[int, list]:
    """Probe the --rpc workers, adding a row for each to `rows`; (their free memory, the answering ones)."""
    if not text:
        return 0, []
    from yi_local import rpc
    from yi_local.units import format_size

    pooled, answering = 0, []
    for endpoint in rpc.parse_endpoints(text):
        try:
            worker = rpc.probe(endpoint, timeout=2.0)
        except rpc.WorkerError as e:
            said = e.message.removeprefix(f"the worker {endpoint} ")
            rows.append(("worker", f"{endpoint}: {'busy' if 'busy' in said else 'unusable'} ({said})"))
            continue
        free, total = worker.free, sum(d.total for d in worker.devices)
        rows.append(("worker", f"{endpoint}: {format_size(free)} free of {format_size(total)}, RPC {worker.version}"))
        pooled += free
        answering.append(endpoint)
    return pooled, answering


def _kv_share(kv: str) -> str:
    """A `kv` cache's size: "2 bytes a value" for f16 and bf16, "53% of f16's" for q8_0."""
    t, f16 = KV_TYPES[kv], KV_TYPES["f16"]
    share = t.block_bytes / t.block_values / (f16.block_bytes / f16.block_values)
    return f"{t.block_bytes // t.block_values} bytes a value" if share == 1 else f"{share:.0%} of f16's"


def _smaller_kv_hint(kv: str) -> str:
    """", or --kv-type q8_0 or q4_0 to shrink the KV cache": the types smaller than `kv`, if any."""
    per_value = {name: t.block_bytes / t.block_values for name, t in KV_TYPES.items()}
    smaller = [name for name, size in per_value.items() if size < per_value[kv]]
    return f", or --kv-type {' or '.join(smaller)} to shrink the KV cache" if smaller else ""


def _rate(tps: float) -> str:
    # 9.96 tok/s shows as 9.9: "10.0" would pass for interactive.
    return f"{tps:.0f}/s" if tps >= 10 else f"{min(tps, 9.9):.1f}/s"


def _torch_line() -> str:
    try:
        import torch
    except ImportError:
        return "not installed (only the transformers backend needs it)"
    if torch.cuda.is_available():
        from yi_local.units import format_size

        free, _total = torch.cuda.mem_get_info()
        return f"{torch.__version__}, CUDA {torch.cuda.get_device_name(0)}, {format_size(free)} free"
    return f"{torch.__version__}, no CUDA device"
