"""Benchmark `yi-local convert` against llama.cpp's convert_hf_to_gguf.py + llama-quantize, same run.

Synthesizes once (cached in bench/out) a checkpoint with Yi-6B's real tensor shapes and 8 layers
(1.9 B parameters, about 3.8 GB bf16 in two shards), then times with peak RSS:
  - a plain copy of the same bytes (the floor: page-cached read + write);
  - llama.cpp: convert_hf_to_gguf.py --outtype f16, then llama-quantize F16 → Q4_K_M;
  - yi-local convert --outtype f16, and yi-local convert --q Q4_K_M (HF → Q4_K_M end to end).
Targets (issue 2): F16 ≥ 2× faster than llama.cpp's converter in ≤ 0.5 GB peak RSS; HF → Q4_K_M
≤ 0.9× llama.cpp's two steps with peak RSS no higher than llama-quantize's.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from common import OUT, Measured, llama_cpp_source, llama_tool, machine, measure, table
from models import yi6b_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true", help="time yi-local only")
    args = ap.parse_args()

    model = yi6b_checkpoint(args.layers)
    work = OUT / "convert-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards = sorted(model.glob("*.safetensors"))
    size_gb = sum(f.stat().st_size for f in shards) / 1e9
    py = sys.executable
    results: dict[str, Measured] = {}

    # Warm the page cache so every contender reads from memory, as the reference figures do.
    measure(["cat", *map(str, shards)], keep_output=False)
    results["plain copy of the bytes"] = measure(["cp", *map(str, shards), str(work)])
    for f in work.glob("*.safetensors"):
        f.unlink()

    if not args.skip_baseline:
        src = llama_cpp_source()
        results["llama.cpp convert_hf_to_gguf → F16"] = measure(
            [py, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16", "--outfile", str(work / "ref-F16.gguf")],
            env={"PYTHONPATH": str(src / "gguf-py")},
        )
        results["llama-quantize F16 → Q4_K_M"] = measure(
            [str(llama_tool("llama-quantize")), str(work / "ref-F16.gguf"), str(work / "ref-Q4_K_M.gguf"), "Q4_K_M",
             str(args.threads)]
        )  # fmt: skip
        (work / "ref-F16.gguf").unlink()

    yi = [py, "-m", "yi_local", "convert", str(model), "--threads", str(args.threads)]
    results["yi-local convert --outtype f16"] = measure(yi + ["--outtype", "f16", "-o", str(work / "yi-F16.gguf")])
    (work / "yi-F16.gguf").unlink()
    results["yi-local convert --q Q4_K_M (HF → Q4_K_M)"] = measure(yi + ["--q", "Q4_K_M", "-o", str(work / "yi-Q4_K_M.gguf")])

    rows = [["step", "seconds", "peak RSS MB"]]
    rows += [[name, f"{m.seconds:.1f}", f"{m.peak_rss_mb:.0f}"] for name, m in results.items()]
    print(f"\n{machine()} · {size_gb:.2f} GB bf16 checkpoint ({args.layers} layers) · {args.threads} threads\n")
    print(table(rows))
    if not args.skip_baseline:
        ref_f16 = results["llama.cpp convert_hf_to_gguf → F16"]
        ref_q = results["llama-quantize F16 → Q4_K_M"]
        ours_f16 = results["yi-local convert --outtype f16"]
        ours_q = results["yi-local convert --q Q4_K_M (HF → Q4_K_M)"]
        print(f"\nF16: yi-local is {ref_f16.seconds / ours_f16.seconds:.2f}× as fast as convert_hf_to_gguf "
              f"(target ≥ 2×), peak RSS {ours_f16.peak_rss_mb:.0f} MB (target ≤ 500)")
        two_steps = ref_f16.seconds + ref_q.seconds
        print(f"HF → Q4_K_M: {ours_q.seconds / two_steps:.2f}× llama.cpp's two steps ({two_steps:.1f} s; target ≤ 0.9×), "
              f"peak RSS {ours_q.peak_rss_mb:.0f} MB vs llama-quantize's {ref_q.peak_rss_mb:.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
