"""GPU check (issue 6): prompt-512 and generation-128 tokens/s on one CUDA GPU, all in one run, of
  - llama.cpp F16 with full offload (llama-bench; the baseline),
  - yi-local's llama.cpp backend with full offload on the same F16 GGUF,
  - yi-local's transformers backend in bf16 (static cache, compiled decode step).
The model has Yi-6B's real shapes (32 layers) with synthetic weights, built here: a bf16 Hugging Face
folder, converted to F16 GGUF by yi-local. Targets: transformers ≥ 1.0× llama.cpp F16 decode; yi-local's
llama.cpp backend ≥ 0.95× llama-bench. `bench/gpu_driver.sh` builds llama.cpp with CUDA and runs this.

`--smoke` runs the same steps on a tiny model (CPU is fine) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, OUT, table

from converters.convert import convert
from tests.synthetic import TINY, YI_6B, build_checkpoint
from yi_local.runtime import Finish, LoadOptions, SamplingParams, load_backend

NO_END = {2: -100.0, 7: -100.0}  # the API's limit: enough to ban a token


def measure_backend(backend, n_prompt: int, n_gen: int, rounds: int) -> tuple[float, float]:
    """Best (prompt tok/s, generation tok/s) over `rounds`, from an empty cache each time."""
    text = CORPUS.read_text(encoding="utf-8")
    prompt = backend.tokenize(text * (1 + 4 * n_prompt // max(1, len(text))))[:n_prompt]
    best = (0.0, 0.0)
    for _ in range(rounds):
        backend.reset()
        finish = [e for e in backend.generate(prompt, SamplingParams(max_tokens=n_gen + 1, temperature=0, logit_bias=NO_END))
                  if isinstance(e, Finish)][0]  # fmt: skip
        t = finish.timings
        best = (max(best[0], t.prompt_tps), max(best[1], t.generate_tps))  # n_gen steps after the first token
    return best


def llama_bench(exe: str, gguf: Path, n_prompt: int, n_gen: int) -> tuple[float, float]:
    out = subprocess.run([exe, "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-ngl", "99", "-r", "3",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    tps = {("prompt" if b["n_prompt"] else "gen"): b["avg_ts"] for b in json.loads(out)}
    return tps["prompt"], tps["gen"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"), help="path of a CUDA llama-bench")
    ap.add_argument("--out", type=Path, default=OUT / "gpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens: checks the script (CPU is fine)")
    args = ap.parse_args()
    dims = TINY if args.smoke else replace(YI_6B, layers=args.layers)
    if args.smoke:
        args.prompt, args.gen, args.rounds = 32, 8, 1

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    t0 = time.perf_counter()
    folder = build_checkpoint(args.out / "Yi-6B-synthetic", CORPUS, variant="chat", dims=dims, fast_weights=True)
    gguf = convert(folder, out=args.out / "Yi-6B-synthetic-F16.gguf", outtype="f16", force=True).files[0]
    print(f"built the model in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = [["engine (on " + device + ")", f"prompt {args.prompt} tok/s", f"generation {args.gen} tok/s"]]
    results = {}
    if args.llama_bench:
        results["llama.cpp F16 (llama-bench)"] = llama_bench(args.llama_bench, gguf, args.prompt, args.gen)
    llama = load_backend(str(gguf), LoadOptions(n_ctx=2048, n_gpu_layers=-1))
    print(f"yi-local llama.cpp backend: {llama.info.offload}", flush=True)
    results["yi-local llama.cpp backend F16"] = measure_backend(llama, args.prompt, args.gen, args.rounds)
    llama.close()
    del llama
    t1 = time.perf_counter()
    hf = load_backend(str(folder), LoadOptions(n_ctx=2048), backend="transformers")
    print(f"transformers backend loaded and warmed up in {time.perf_counter() - t1:.0f} s", flush=True)
    results[f"yi-local transformers {hf.info.quantization}"] = measure_backend(hf, args.prompt, args.gen, args.rounds)
    for name, (pp, tg) in results.items():
        rows.append([name, f"{pp:.0f}", f"{tg:.1f}"])
    print()
    print(table(rows))
    base = results.get("llama.cpp F16 (llama-bench)")
    if base:
        ours, trf = results["yi-local llama.cpp backend F16"], results[f"yi-local transformers {hf.info.quantization}"]
        print(f"\nllama.cpp backend / llama-bench: prompt {ours[0] / base[0]:.2f}×, generation {ours[1] / base[1]:.2f}× "
              f"(target ≥ 0.95×)\ntransformers / llama.cpp F16 decode: {trf[1] / base[1]:.2f}× (target ≥ 1.0×)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
