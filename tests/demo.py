"""`make demo`: the whole pipeline offline on a tiny Yi-shaped model, in well under a minute.

1. build a tiny Yi-faithful Hugging Face checkpoint (SentencePiece tokenizer with Yi's special ids,
   chat template, random bf16 weights in two safetensors shards);
2. `yi-local convert` it to GGUF and quantize it to Q4_K_M;
3. generate a few tokens from it through llama-cpp-python.
The weights are random, so the generated text is gibberish: the point is that every step runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "demo-out"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> int:
    from tests.synthetic import build_checkpoint

    start = time.monotonic()
    shutil.rmtree(OUT, ignore_errors=True)
    step("1. building a tiny Yi-shaped checkpoint (random weights)")
    model = build_checkpoint(OUT / "Yi-Tiny-Chat", REPO / "tests" / "data" / "corpus.txt", variant="chat")
    for f in sorted(model.iterdir()):
        print(f"   {f.name:40} {f.stat().st_size:>10,} bytes")

    step("2. yi-local convert Yi-Tiny-Chat --q Q4_K_M")
    cmd = [sys.executable, "-m", "yi_local", "convert", str(model), "--q", "Q4_K_M", "-o", str(OUT)]
    if subprocess.run(cmd).returncode != 0:
        return 1
    gguf = OUT / "Yi-Tiny-Chat-Q4_K_M.gguf"

    step("3. generating 16 tokens with llama.cpp")
    cmd = [sys.executable, "-m", "yi_local", "run", str(gguf), "Hello, Yi! 你好！", "--max-tokens", "16",
           "--seed", "1", "--verbose-timings"]
    if subprocess.run(cmd).returncode != 0:
        return 1
    print(f"\ndemo finished in {time.monotonic() - start:.1f} s; files are in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
