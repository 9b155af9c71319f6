"""Perplexity and KL divergence of quantized GGUFs against a reference, as llama-perplexity measures them.

The text is cut into windows of --ctx tokens and the second half of each window is scored, as in
llama-perplexity's --kl-divergence mode, so the figures compare with llama.cpp's own. The reference
(usually the F16 or Q8_0 file) is run once and its token distributions are kept in a temporary file,
not in memory; each other file is then run once against them. The table, smallest file first, gives
each file's size, its perplexity (PPL, ± its standard error), the mean and 99th percentile of the KL
divergence from the reference per token, and how often its most likely next token is the reference's.
The default text is a held-out English and Chinese text shipped with yi-local, never the text that
quantization calibrates on.

Examples:
  yi-local quality Yi-6B-Chat-Q4_K_M.gguf Yi-6B-Chat-Q2_K.gguf --ref Yi-6B-Chat-F16.gguf
  yi-local quality *.gguf --ref Yi-6B-Chat-Q8_0.gguf --text wiki.test.raw --ctx 1024
  yi-local quality Yi-6B-Chat-Q4_K_M.gguf --ref Yi-6B-Chat-F16.gguf --chunks 20 --json > quality.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from yi_local.commands.options import limited
from yi_local.runtime.params import LOAD_LIMITS, MAX_CTX, Limit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", metavar="MODEL", nargs="+", type=Path, help=".gguf files to score")
    p.add_argument("--ref", required=True, type=Path, metavar="REF", help="the .gguf whose distributions the "
                   "others are compared with (same vocabulary), e.g. the F16 file")  # fmt: skip
    p.add_argument("--text", type=Path, metavar="FILE", help="score on this text instead of the built-in "
                   "held-out one (at least two windows long)")  # fmt: skip
    p.add_argument("--ctx", type=limited(Limit(2, MAX_CTX, integer=True)), default=512, metavar="N",
                   help="window length in tokens, even; the second half of each is scored (default 512, as "
                   "llama-perplexity)")  # fmt: skip
    p.add_argument("--chunks", type=limited(Limit(1, 1 << 30, integer=True)), default=None, metavar="N",
                   help="score only the first N windows (default: all the text holds)")  # fmt: skip
    p.add_argument("--threads", type=limited(LOAD_LIMITS["n_threads"]), default=None,
                   help="CPU threads (default: all cores)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from yi_local.progress import TerminalProgress
    from yi_local.quality import check_ctx, measure_quality

    check_ctx(args.ctx)  # before any file is read
    with TerminalProgress(unit="tokens") as progress:
        tasks: dict = {}

        def on_progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                stem = name.removesuffix(".gguf")
                tasks[name] = progress.task(stem if len(stem) <= 20 else "…" + stem[-19:], total)  # the quant shows
            tasks[name].update(done)

        report = measure_quality(args.models, args.ref, text=args.text, ctx=args.ctx, chunks=args.chunks,
                                 threads=args.threads, on_progress=on_progress)  # fmt: skip
    if args.json:
        print(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    else:
        print(_table(report))
    return 0


def _table(report) -> str:
    from yi_local.commands.tables import markdown_table
    from yi_local.units import format_size

    head = ["file", "type", "size", "PPL", "KLD mean", "KLD 99%", "top-1 same"]
    rows = [
        [r.name + (" (ref)" if r.reference else ""), r.quantization, format_size(r.size_bytes),
         f"{r.ppl:.4f} ± {r.ppl_uncertainty:.4f}", f"{r.kld_mean:.6f}", f"{r.kld_p99:.6f}", f"{100 * r.top1:.2f}%"]
        for r in report.rows
    ]  # fmt: skip
    setup = (f"{report.text}: {report.tokens_scored:,} tokens scored in {report.chunks} windows of {report.ctx} · "
             f"{report.threads} threads · {report.offload}")  # fmt: skip
    return f"{markdown_table(head, rows, left=2)}\n\n{setup}"
