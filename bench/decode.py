"""Decode and prompt speed of the yi-local runtime against a bare llama-cpp-python loop, same run.

Model: Yi-6B's real tensor shapes, 8 layers, Q4_K_M (synthesized and converted once into bench/out).
Both sides are `yi_local.benchmark`'s, the measurement `yi-local bench` makes, at one sequence: the same
file, threads and batch, the same random prompt evaluated in one batch, then greedy generation token by
token with a native sampler and the end-of-generation tokens forbidden:
  - baseline: llama_decode + llama_sampler (greedy) in a plain Python loop over the low-level API;
  - yi-local: LlamaCppBackend.generate (the loop `run`, `chat` and `serve` use: events, stop
    handling, UTF-8 decoding).
The two alternate for --rounds rounds; the best round of each is compared. Target (issue 3): ≥ 0.97×
for both prompt and generation tokens/s. llama-bench's figures are printed for reference.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import llama_tool, machine, measure, table
from models import yi6b_gguf

from yi_local.benchmark import Bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llama-bench", action="store_true")
    args = ap.parse_args()

    path = str(yi6b_gguf("Q4_K_M"))
    # args.gen timed steps after the first token, as llama-bench's tg counts them; CPU only on both sides.
    bench = Bench(path, args.prompt, args.gen + 1, [1], 2048, args.threads, args.batch, n_gpu_layers=0)
    best = {"bare llama-cpp-python loop": [0.0, 0.0], "yi-local runtime": [0.0, 0.0]}
    for r in range(args.rounds):
        for name, side in (("bare llama-cpp-python loop", bench.bare), ("yi-local runtime", bench.yi_local)):
            speed = side(1)
            pp, tg = speed.prompt_tps, speed.generate_tps
            print(f"round {r + 1}: {name:28} prompt {pp:7.1f} tok/s  generation {tg:6.2f} tok/s", flush=True)
            best[name] = [max(best[name][0], pp), max(best[name][1], tg)]
    rows = [["", f"prompt {args.prompt} tok/s", f"generation {args.gen} tok/s"]]
    rows += [[name, f"{pp:.1f}", f"{tg:.2f}"] for name, (pp, tg) in best.items()]
    if not args.no_llama_bench:
        out = measure([str(llama_tool("llama-bench")), "-m", path, "-p", str(args.prompt), "-n", str(args.gen),
                       "-t", str(args.threads), "-b", str(args.batch), "-r", "3", "-o", "json"]).stdout  # fmt: skip
        tps = {("prompt" if b["n_prompt"] else "gen"): b["avg_ts"] for b in json.loads(out)}
        rows.append(["llama-bench (reference)", f"{tps['prompt']:.1f}", f"{tps['gen']:.2f}"])
    base, ours = best["bare llama-cpp-python loop"], best["yi-local runtime"]
    print(f"\n{machine()} · Yi-6B shapes, 8 layers, Q4_K_M · {args.threads} threads, batch {args.batch}\n")
    print(table(rows))
    print(f"\nyi-local / bare loop: prompt {ours[0] / base[0]:.3f}×, generation {ours[1] / base[1]:.3f}× (target ≥ 0.97×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
