"""Decode and prompt speed of the yi-local runtime against a bare llama-cpp-python loop, same run.

Model: Yi-6B's real tensor shapes, 8 layers, Q4_K_M (synthesized and converted once into bench/out).
Both sides load the same file with the same threads and batch, evaluate the same random prompt in one
batch, then generate greedily token by token with a native sampler:
  - baseline: llama_decode + llama_sampler (greedy) in a plain Python loop over the low-level API;
  - yi-local: LlamaCppBackend.generate (the loop `run`, `chat` and `serve` use: events, stop
    handling, UTF-8 decoding).
The two alternate for --rounds rounds; the best round of each is compared. Target (issue 3): ≥ 0.97×
for both prompt and generation tokens/s. llama-bench's figures are printed for reference.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import sys
import time

from common import llama_tool, machine, measure, table
from models import yi6b_gguf

from yi_local.llama_lib import llama_cpp
from yi_local.runtime import Finish, LoadOptions, SamplingParams, load_backend

NO_END = {2: -100.0, 7: -100.0}  # the API's limit: enough to ban a token


def bare_loop(path: str, prompt: list[int], n_gen: int, threads: int, batch: int) -> tuple[float, float]:
    """(prompt tok/s, generation tok/s) of the plainest low-level loop."""
    L = llama_cpp()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, batch, batch
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    bias = (L.llama_logit_bias * 2)(*[L.llama_logit_bias(token=t, bias=b) for t, b in NO_END.items()])
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(L.llama_vocab_n_tokens(vocab), 2, bias))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    arr = (L.llama_token * len(prompt))(*prompt)
    t0 = time.perf_counter()
    for start in range(0, len(prompt), batch):
        n = min(batch, len(prompt) - start)
        ptr = ctypes.cast(ctypes.byref(arr, start * ctypes.sizeof(L.llama_token)), ctypes.POINTER(L.llama_token))
        assert L.llama_decode(ctx, L.llama_batch_get_one(ptr, n)) == 0
    t1 = time.perf_counter()
    one = (L.llama_token * 1)()
    for _ in range(n_gen):
        one[0] = L.llama_sampler_sample(chain, ctx, -1)
        assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
    t2 = time.perf_counter()
    L.llama_sampler_free(chain)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return len(prompt) / (t1 - t0), n_gen / (t2 - t1)


def yi_local(path: str, prompt: list[int], n_gen: int, threads: int, batch: int) -> tuple[float, float]:
    backend = load_backend(path, LoadOptions(n_ctx=2048, n_threads=threads, n_batch=batch, n_gpu_layers=0))
    params = SamplingParams(max_tokens=n_gen + 1, temperature=0, logit_bias=NO_END)
    finish = [e for e in backend.generate(prompt, params) if isinstance(e, Finish)][0]
    backend.close()
    t = finish.timings
    # generate_s spans n_gen + 1 samples and n_gen evaluations, as the baseline's n_gen steps do (+1 sample).
    return t.prompt_tps, n_gen / t.generate_s


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
    rng = random.Random(0)
    prompt = [rng.randrange(300, 60000) for _ in range(args.prompt)]
    best = {"bare llama-cpp-python loop": [0.0, 0.0], "yi-local runtime": [0.0, 0.0]}
    for r in range(args.rounds):
        for name, fn in (("bare llama-cpp-python loop", bare_loop), ("yi-local runtime", yi_local)):
            pp, tg = fn(path, prompt, args.gen, args.threads, args.batch)
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
