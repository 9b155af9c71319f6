"""What this machine has (OS, CPU, RAM, GPU, the llama-cpp-python build) and which Yi models fit it, how fast.

The table gives the memory each catalog model needs at each quantization level — weights at the
level's bits per weight, plus the KV cache at --ctx tokens, plus about 0.3 GiB of buffers — and marks
what fits in the memory llama.cpp would use: free GPU memory when the build offloads, else free RAM.
Beside it, the decode speed: memory bandwidth ÷ bytes read per token (decoding is memory-bound). The
recommendation is the biggest chat model that fits and decodes at 10 tokens/s or more.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=4096, help="context length to plan the KV cache for (default 4096)")
    p.add_argument("--memory", type=float, default=None, metavar="GIB",
                   help="plan for this much memory instead of what is free here")  # fmt: skip
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBPS",
                   help="estimate decode speed with this memory bandwidth in GB/s (what decoding gets, about 60%% "
                        "of a GPU's peak) instead of measuring it or looking the GPU up")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import math
    from importlib.metadata import PackageNotFoundError, version

    from yi_local.errors import YiLocalError

    if args.memory is not None and not (math.isfinite(args.memory) and 0 < args.memory <= 1 << 20):
        raise YiLocalError(f"--memory is {args.memory:g}; give the GiB to plan for, a positive number",
                           hint="e.g. --memory 16, or leave it out to use what is free here")  # fmt: skip
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and 0 < args.bandwidth <= 1e5):
        raise YiLocalError(f"--bandwidth is {args.bandwidth:g}; give the memory bandwidth in GB/s, "
                           "above 0 and at most 100000",
                           hint="e.g. --bandwidth 60, or leave it out to measure it here")  # fmt: skip
    if args.ctx < 1:
        raise YiLocalError(f"--ctx is {args.ctx}; it must be at least 1", hint="e.g. --ctx 4096 (the default)")

    import psutil
    from rich.console import Console
    from rich.table import Table

    from yi_local import hardware
    from yi_local.bandwidth import Bandwidth, decode_bandwidth
    from yi_local.catalog import CATALOG
    from yi_local.fit import DOCTOR_LEVELS, INTERACTIVE_TPS, fits, memory_needed, recommend
    from yi_local.units import GIB, format_size

    console = Console(width=136)  # the table: 8 levels of "20.6 0.9/s ✗" beside the names
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
    for key, value in rows:
        console.print(f"[bold]{key:<10}[/bold] {value}", highlight=False)

    if args.memory is not None:
        budget, where = int(args.memory * GIB), f"{args.memory:g} GiB (--memory)"
    elif gpu and free_gpu is not None:
        budget, where = free_gpu, f"{format_size(free_gpu)} free on the {gpu} GPU"
    else:
        budget, where = vm.available, f"{format_size(vm.available)} free RAM"
    speed = "" if bandwidth is None else " and decode speed (tokens/s)"
    table = Table(title=f"Memory needed (GiB){speed} at ctx {args.ctx}", box=None, header_style="bold",
                  title_justify="left")  # fmt: skip
    table.add_column("MODEL")
    table.add_column("PARAMS", justify="right")
    for level in DOCTOR_LEVELS:
        table.add_column(level, justify="right")
    for entry in CATALOG.values():
        cells = []
        for level in DOCTOR_LEVELS:
            need = memory_needed(entry, level, args.ctx)
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
    if bandwidth is not None:
        console.print(f"Speed ≈ memory bandwidth ÷ bytes read per token (the weights and the KV cache at ctx "
                      f"{args.ctx}), with {bandwidth.bytes_per_s / 1e9:.1f} GB/s.", highlight=False)  # fmt: skip
    best = recommend(list(CATALOG.values()), args.ctx, budget, None if bandwidth is None else bandwidth.bytes_per_s)
    console.print()
    if best is None:
        console.print("Nothing fits: even yi-coder:1.5b at Q2_K needs more memory than is free. Close other programs.")
        return 0
    name = f"{best.entry.name}:{best.quant.lower()}"
    about = format_size(best.need.total)
    if best.tokens_per_second is not None:
        about += f", ~{_rate(best.tokens_per_second).removesuffix('/s')} tok/s"
    if not best.interactive:
        console.print(f"Nothing that fits decodes at {INTERACTIVE_TPS:g} tok/s or more here.")
    label = "Recommended" if best.interactive else "Fastest"
    console.print(f"{label}: [bold]{name}[/bold] ({about}) — `yi-local chat {name} --pull`", highlight=False)
    return 0


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
