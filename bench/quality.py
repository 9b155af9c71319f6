"""Importance matrix and `yi-local quality` next to llama.cpp's llama-imatrix and llama-perplexity.

On the Yi-6B-shaped model (8 layers, synthetic weights) in the same run:
  1. the importance matrix of the F16 model on the packaged calibration text: yi-local in-process vs
     `llama-imatrix` (its defaults: windows of 512, four to a batch; once with its perplexity pass, once
     `--no-ppl`, which is what yi-local computes), time and peak RSS, and how far the two matrices differ;
     then `llama-quantize --imatrix` on yi-local's file (llama.cpp's own tool reads it);
  2. `yi-local quality Q4_K_M --ref F16` vs `llama-perplexity --kl-divergence` (its base pass saving
     the F16 logits, then the Q4_K_M pass) on the packaged held-out text, time, peak RSS and the figures;
  3. the quality table of the tests' trained tiny model (tests/trained.py) at Q2_K, Q2_K + imatrix, IQ2_M,
     Q3_K_M, Q4_K_M and Q8_0 against its F16.

    PYTHONPATH=. .venv/bin/python bench/quality.py [--model yi6b|tiny] [--chunks N] [--quality-chunks N] [--rounds N]
                                                    [--skip-imatrix] [--skip-table] [--json PATH]

With --rounds N the tools alternate N times; the table shows the best time of each, and the quality race
also prints each round's own ratio and their median (a round's two sides run minutes apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import OUT, llama_tool, machine, measure, table
from models import yi6b_checkpoint

from converters.imatrix_file import read_imatrix

REPO = Path(__file__).resolve().parent.parent
TEXTS = REPO / "yi_local" / "texts"
PY = sys.executable


def f16_of(folder: Path, where: Path = OUT) -> Path:
    path = where / f"{folder.name}-F16.gguf"
    if not path.is_file():
        subprocess.run([PY, "-m", "yi_local", "convert", str(folder), "--outtype", "f16", "-o", str(path)], check=True)
    return path


def quantized(f16: Path, quant: str, extra: list[str] = (), suffix: str = "") -> Path:
    path = f16.parent / f"{f16.stem.removesuffix('-F16')}-{quant}{suffix}.gguf"
    if not path.is_file():
        subprocess.run([PY, "-m", "yi_local", "convert", str(f16), "--q", quant, *extra, "-o", str(path)], check=True)
    return path


def imatrix_race(f16: Path, tmp: Path, threads: int, chunks: int | None, rounds: int) -> dict:
    ours_out, theirs_out = tmp / "ours.imatrix.gguf", tmp / "theirs.imatrix.gguf"
    code = ("import sys; from pathlib import Path; from converters.imatrix import compute_imatrix; "
            "from converters.importance import read_calibration; from converters.imatrix_file import write_imatrix; "
            f"write_imatrix(Path({str(ours_out)!r}), compute_imatrix(Path({str(f16)!r}), read_calibration(None), {threads}, "
            f"max_chunks={chunks}))")  # fmt: skip
    exe = str(llama_tool("llama-imatrix"))
    base = [exe, "-m", str(f16), "-f", str(TEXTS / "calibration.txt"), "-t", str(threads), *_chunks(chunks)]
    runs: dict[str, list] = {"ours": [], "noppl": [], "ppl": []}
    for _ in range(rounds):  # alternating, so that the VM's drift reaches every side alike; the best of each
        runs["ours"].append(measure([PY, "-c", code], env={"PYTHONPATH": str(REPO)}))
        runs["noppl"].append(measure([*base, "-o", str(theirs_out), "--no-ppl"]))
        runs["ppl"].append(measure([*base, "-o", str(tmp / "theirs-ppl.imatrix.gguf")]))
    ours, theirs_noppl, theirs = (min(runs[k], key=lambda m: m.seconds) for k in ("ours", "noppl", "ppl"))
    a, b = read_imatrix(ours_out), read_imatrix(theirs_out)
    na, nb = a.normalized(), b.normalized()
    rel = max(float(np.abs(na[k] - nb[k]).max() / np.abs(nb[k]).max()) for k in nb)
    # llama.cpp's own quantizer reads yi-local's file.
    # (Q2_K: quick; IQ2_XS would take many minutes on 2 cores and say no more.)
    q = measure([str(llama_tool("llama-quantize")), "--imatrix", str(ours_out), str(f16), str(tmp / "iq.gguf"), "Q2_K",
                 str(threads)])  # fmt: skip
    return {
        "yi_local_s": ours.seconds, "yi_local_rss_mb": ours.peak_rss_mb,
        "llama_imatrix_s": theirs.seconds, "llama_imatrix_rss_mb": theirs.peak_rss_mb,
        "llama_imatrix_noppl_s": theirs_noppl.seconds, "llama_imatrix_noppl_rss_mb": theirs_noppl.peak_rss_mb,
        "ratio": ours.seconds / theirs.seconds, "ratio_noppl": ours.seconds / theirs_noppl.seconds,
        "entries": [len(na), len(nb)], "chunks": [a.chunk_count, b.chunk_count], "max_rel_diff": rel,
        "llama_quantize_read_it": "load_imatrix: loaded" in q.stdout and (tmp / "iq.gguf").is_file(),
        "llama_quantize_says": next((line for line in q.stdout.splitlines() if "load_imatrix: loaded" in line), ""),
        "rounds_s": {k: [m.seconds for m in v] for k, v in runs.items()},
    }  # fmt: skip


def _chunks(chunks: int | None) -> list[str]:
    return [] if chunks is None else ["--chunks", str(chunks)]


def quality_race(f16: Path, q4: Path, tmp: Path, threads: int, chunks: int | None, rounds: int) -> dict:
    text = str(TEXTS / "heldout.txt")
    exe = str(llama_tool("llama-perplexity"))
    kld = tmp / "base.kld"
    common = ["-f", text, "-t", str(threads), "--kl-divergence-base", str(kld), *_chunks(chunks)]
    mine, theirs = [], []
    for _ in range(rounds):  # alternating; the best of each
        mine.append(measure([PY, "-m", "yi_local", "quality", str(q4), "--ref", str(f16), "--threads", str(threads),
                             "--json", *_chunks(chunks)], env={"PYTHONPATH": str(REPO)}))  # fmt: skip
        theirs.append((measure([exe, "-m", str(f16), *common]), measure([exe, "-m", str(q4), *common, "--kl-divergence"])))
    ours = min(mine, key=lambda m: m.seconds)
    base, kl = min(theirs, key=lambda pair: pair[0].seconds + pair[1].seconds)
    theirs_s = base.seconds + kl.seconds
    report = json.loads(ours.stdout)
    keys = {"Mean PPL(Q)": "ppl", "Mean    KLD": "kld_mean", "99.0%   KLD": "kld_p99", "Same top p": "top1"}
    figures = {}
    for line in kl.stdout.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in keys:
            figures[keys[name.strip()]] = float(value.split()[0])
    row = next(r for r in report["rows"] if not r["reference"])
    compared = {k: (row[k] * (100 if k == "top1" else 1), v) for k, v in figures.items()}  # (yi-local, llama.cpp)
    return {
        "yi_local_s": ours.seconds, "yi_local_rss_mb": ours.peak_rss_mb,
        "llama_perplexity_s": theirs_s, "llama_perplexity_rss_mb": max(base.peak_rss_mb, kl.peak_rss_mb),
        "ratio": ours.seconds / theirs_s, "yi_local_report": report, "compared": compared,
        "rounds_s": {"yi_local": [m.seconds for m in mine], "llama_perplexity": [a.seconds + b.seconds for a, b in theirs]},
        # Each round's two sides ran minutes apart, the best-of-each pair maybe an hour apart: on a VM whose
        # speed drifts by 5-8%, the median of the rounds' own ratios is the steadier comparison.
        "ratio_by_round": [m.seconds / (a.seconds + b.seconds) for m, (a, b) in zip(mine, theirs)],
    }  # fmt: skip


def quality_table(tmp: Path, threads: int) -> str:
    """The tests' trained tiny model, with the outlier channels real LLMs have (tests/trained.py)."""
    import shutil

    from tests.trained import add_outlier_channels, trained_checkpoint

    folder = tmp / "Yi-Tiny-Trained"
    shutil.copytree(trained_checkpoint(), folder)
    add_outlier_channels(folder)
    f16 = f16_of(folder, tmp)
    files = [quantized(f16, "Q2_K"), quantized(f16, "Q2_K", ["--imatrix"], "-imatrix"), quantized(f16, "IQ2_M", ["--imatrix-file", str(tmp / "Yi-Tiny-Trained.imatrix.gguf")]),
             quantized(f16, "Q3_K_M"), quantized(f16, "Q4_K_M"), quantized(f16, "Q8_0")]  # fmt: skip
    out = subprocess.run([PY, "-m", "yi_local", "quality", *map(str, files), "--ref", str(f16), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("yi6b", "tiny"), default="yi6b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-table", action="store_true", help="leave out the trained model's quality table")
    p.add_argument("--skip-imatrix", action="store_true", help="leave out the importance-matrix race")
    p.add_argument("--chunks", type=int, help="only the first N windows of the calibration text, for both tools "
                   "(the whole text: ~14 min a run for the F16 model on 2 cores)")
    p.add_argument("--quality-chunks", type=int, help="only the first N windows of the held-out text, for both tools")
    p.add_argument("--rounds", type=int, default=1, help="alternate the tools this many times, the best of each")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    print(machine(), flush=True)
    if args.model == "yi6b":
        folder = yi6b_checkpoint(8)
    else:
        from tests.synthetic import build_checkpoint

        folder = OUT / "Yi-Tiny-chat"
        if not (folder / "model.safetensors.index.json").is_file():
            build_checkpoint(folder, REPO / "tests" / "data" / "corpus.txt", variant="chat")
    f16 = f16_of(folder)
    q4 = quantized(f16, "Q4_K_M")
    figures: dict = {"model": f16.name, "machine": machine()}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        figures["chunks"], figures["quality_chunks"] = args.chunks, args.quality_chunks
        if not args.skip_imatrix:
            im = figures["imatrix"] = imatrix_race(f16, Path(tmp), args.threads, args.chunks, args.rounds)
            print(table([["importance matrix", "time s", "peak RSS MB", "yi-local ÷ it"],
                         ["yi-local", f"{im['yi_local_s']:.1f}", f"{im['yi_local_rss_mb']:.0f}", ""],
                         ["llama-imatrix", f"{im['llama_imatrix_s']:.1f}", f"{im['llama_imatrix_rss_mb']:.0f}", f"{im['ratio']:.2f}×"],
                         ["llama-imatrix --no-ppl", f"{im['llama_imatrix_noppl_s']:.1f}", f"{im['llama_imatrix_noppl_rss_mb']:.0f}",
                          f"{im['ratio_noppl']:.2f}×"]]), flush=True)  # fmt: skip
            print("rounds, s: " + "; ".join(f"{k} {' / '.join(f'{x:.1f}' for x in v)}" for k, v in im["rounds_s"].items()))
            print(f"entries {im['entries']}, windows {im['chunks']}, max relative difference {im['max_rel_diff']:.2e}; "
                  f"llama-quantize --imatrix read yi-local's file: {im['llama_quantize_read_it']} ({im['llama_quantize_says']})", flush=True)  # fmt: skip
        qa = figures["quality"] = quality_race(f16, q4, Path(tmp), args.threads, args.quality_chunks, args.rounds)
        print(table([["quality (KL mode)", "time s", "peak RSS MB", "yi-local ÷ it"],
                     ["yi-local quality", f"{qa['yi_local_s']:.1f}", f"{qa['yi_local_rss_mb']:.0f}", ""],
                     ["llama-perplexity (base + kld)", f"{qa['llama_perplexity_s']:.1f}", f"{qa['llama_perplexity_rss_mb']:.0f}",
                      f"{qa['ratio']:.2f}×"]]), flush=True)  # fmt: skip
        print("rounds, s: " + "; ".join(f"{k} {' / '.join(f'{x:.1f}' for x in v)}" for k, v in qa["rounds_s"].items()))
        print(f"yi-local ÷ llama-perplexity by round: {' / '.join(f'{r:.3f}' for r in qa['ratio_by_round'])}, "
              f"median {statistics.median(qa['ratio_by_round']):.3f}×", flush=True)
        print(table([["figure of Q4_K_M", "yi-local", "llama-perplexity"],
                     *[[k, f"{a:.6f}", f"{b:.6f}"] for k, (a, b) in qa["compared"].items()]]), flush=True)  # fmt: skip
        if not args.skip_table:
            figures["table"] = quality_table(Path(tmp), args.threads)
            print(figures["table"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
