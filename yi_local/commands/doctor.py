"""What this machine has (OS, CPU, RAM, GPU, the llama-cpp-python build) and which Yi models fit it.

The table gives the memory each catalog model needs at each quantization level — weights at the
level's bits per weight, plus the KV cache at --ctx tokens, plus about 0.3 GiB of buffers — and marks
what fits in the memory llama.cpp would use: free GPU memory when the build offloads, else free RAM.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=4096, help="context length to plan the KV cache for (default 4096)")
    p.add_argument("--memory", type=float, default=None, metavar="GIB",
                   help="plan for this much memory instead of what is free here")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import math
    from importlib.metadata import PackageNotFoundError, version

    from yi_local.errors import YiLocalError

    if args.memory is not None and not (math.isfinite(args.memory) and 0 < args.memory <= 1 << 20):
        raise YiLocalError(f"--memory is {args.memory:g}; give the GiB to plan for, a positive number",
                           hint="e.g. --memory 16, or leave it out to use what is free here")  # fmt: skip
    if args.ctx < 1:
        raise YiLocalError(f"--ctx is {args.ctx}; it must be at least 1", hint="e.g. --ctx 4096 (the default)")

    import psutil
    from rich.console import Console
    from rich.table import Table

    from yi_local import hardware
    from yi_local.catalog import CATALOG
    from yi_local.fit import DOCTOR_LEVELS, GIB, fits, memory_needed, recommend

    console = Console(width=120)
    info = hardware.system_summary()
    vm = psutil.virtual_memory()
    try:
        llama_version = version("llama-cpp-python")
        gpu = hardware.llama_gpu_kind()
    except PackageNotFoundError:
        llama_version, gpu = None, None
    free_gpu = hardware.gpu_free_bytes(gpu)
    rows = [
        ("OS", info["os"]),
        ("CPU", f"{info['cpu']} ({info['cores']} cores)"),
        ("RAM", f"{vm.total / GIB:.1f} GiB ({vm.available / GIB:.1f} GiB free)"),
        ("llama.cpp", f"llama-cpp-python {llama_version}, " + (f"offloads to {gpu}" if gpu else "CPU-only build")
         if llama_version else "llama-cpp-python is not installed"),  # fmt: skip
        ("GPU", f"{gpu}, {free_gpu / GIB:.1f} GiB free" if gpu and free_gpu is not None
         else (gpu or "none llama.cpp can use (see the README to build llama-cpp-python with Metal or CUDA)")),  # fmt: skip
        ("torch", _torch_line()),
    ]
    for key, value in rows:
        console.print(f"[bold]{key:<10}[/bold] {value}", highlight=False)

    if args.memory is not None:
        budget, where = int(args.memory * GIB), f"{args.memory:g} GiB (--memory)"
    elif gpu and free_gpu is not None:
        budget, where = free_gpu, f"{free_gpu / GIB:.1f} GiB free on the {gpu} GPU"
    else:
        budget, where = vm.available, f"{vm.available / GIB:.1f} GiB free RAM"
    table = Table(title=f"Memory needed at ctx {args.ctx} (GiB) · ✓ fits in {where}", box=None,
                  header_style="bold", title_justify="left")  # fmt: skip
    table.add_column("MODEL")
    table.add_column("PARAMS", justify="right")
    for level in DOCTOR_LEVELS:
        table.add_column(level, justify="right")
    for entry in CATALOG.values():
        cells = []
        for level in DOCTOR_LEVELS:
            need = memory_needed(entry, level, args.ctx)
            ok = fits(need, budget)
            cells.append(f"[green]{need.total / GIB:.1f} ✓[/green]" if ok else f"[dim]{need.total / GIB:.1f} ✗[/dim]")
        table.add_row(entry.name, f"{entry.parameters / 1e9:.1f}B", *cells)
    console.print()
    console.print(table)
    best = recommend(list(CATALOG.values()), args.ctx, budget)
    console.print()
    if best is None:
        console.print("Nothing fits: even yi-coder:1.5b at Q2_K needs more memory than is free. Close other programs.")
    else:
        entry, level = best
        console.print(f"Recommended: [bold]{entry.name}:{level.lower()}[/bold] "
                      f"({memory_needed(entry, level, args.ctx).total / GIB:.1f} GiB) — "
                      f"`yi-local chat {entry.name}:{level.lower()} --pull`", highlight=False)  # fmt: skip
    return 0


def _torch_line() -> str:
    try:
        import torch
    except ImportError:
        return "not installed (only the transformers backend needs it)"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return f"{torch.__version__}, CUDA {torch.cuda.get_device_name(0)}, {free / (1 << 30):.1f} GiB free"
    return f"{torch.__version__}, no CUDA device"
