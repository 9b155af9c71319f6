"""Long context on a laptop (issue 14): what a quantized KV cache saves at 32K tokens, what it costs in
decode speed deep into a conversation, and how fast a saved conversation resumes.

Model: Yi-6B's real tensor shapes, 8 layers, Q4_K_M (bench/models.py), on the CPU, flash attention on
throughout (llama.cpp reads a quantized V cache only inside it). Each figure has a baseline from the same run:
  1. The KV cache at --ctx tokens (32,768) for f16, q8_0 and q4_0, each type loaded in a process of its
     own (this script with a hidden --probe) so that the RSS is that type's alone: llama.cpp's report of
     the cache (ModelInfo.kv_bytes) next to the size worked out by hand (layers × tokens × 2 for K and V ×
     KV heads × head size × bytes a value: f16 2, q8_0 34/32, q4_0 18/32), the RSS right after the load
     (psutil; also less the GGUF's own pages, which the load reads in whole) and the peak. Targets
     (issue 14): the cache at q8_0 ≤ 0.55× and at q4_0 ≤ 0.30× of f16's.
  2. Decode at depth --depth (8,192) for each type: yi-local's engine evaluates that many random tokens,
     then generates --gen tokens greedily (end-of-generation tokens forbidden). Only the generation is
     timed, from the first token to the last: --gen evaluations at positions depth … depth+gen-1, which is
     what `llama-bench -d DEPTH -p 0 -n GEN` times (same threads, batch, KV type and flash attention).
     Order: yi-local, llama-bench (--rounds repetitions over one fill of its own), yi-local again (its
     cache kept: only the prompt's last token is evaluated again); the best of each side. Target ≥ 0.95×.
  3. Resuming a saved conversation: a chat of --resume-tokens (4,000) tokens of random words is evaluated
     with one token generated and saved with `save_state`. Then in freshly loaded backends (the load not
     timed; no warm-up, as `chat --session` right after it starts) the time to the first token of a new
     turn: `load_state` + generate, against the same turn evaluated afresh, alternating, --rounds each.
     The first 8 greedy tokens of both must agree, and the resumed run must evaluate only the new turn's
     tokens (Finish.timings.evaluated_tokens). Target ≤ 0.1×.

    PYTHONPATH=. .venv/bin/python bench/long_context.py [--tiny] [--ctx N] [--depth N] [--gen N]
        [--resume-tokens N] [--rounds N] [--threads N] [--batch N] [--parts kv,decode,resume] [--json PATH]

About 45 minutes on a 2-core VM, nearly all of it the six fills of 8,192 tokens (on the CPU llama.cpp fills a
q8_0 cache about 3× and a q4_0 one about 5× slower than an f16 one); `--parts kv,resume` takes minutes, and a
smaller --depth cuts the fills about quadratically. `--tiny` runs everything on the tests' tiny model with
small sizes in seconds: it checks the script.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from common import OUT, OtherLoad, llama_tool, machine, measure, table
from models import tiny_gguf, yi6b_gguf

from yi_local.benchmark import BAN, BareLoop, prompts_for
from yi_local.gguf_header import check_model, model_meta
from yi_local.runtime import Finish, LoadOptions, SamplingParams, TextDelta, load_backend

KV_TYPES = ("f16", "q8_0", "q4_0")
# Bytes a value, by hand (llama.cpp's blocks of 32: q8_0 32 bytes + an f16 scale, q4_0 16 + 2), to check
# llama.cpp's report against.
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
KV_TARGETS = {"q8_0": 0.55, "q4_0": 0.30}
DECODE_TARGET, RESUME_TARGET = 0.95, 0.1
CHECK_TOKENS = 8  # greedy tokens of the new turn compared between resumed and afresh
WORDS = ("the model reads every word of the question and answers in a short friendly way while the user "
         "asks about memory context tokens cache language science history city function version").split()  # fmt: skip
MIB = 1 << 20


def model_path(tiny: bool) -> Path:
    return tiny_gguf("Q8_0") if tiny else yi6b_gguf("Q4_K_M")


def options(args, kv_type: str, n_ctx: int) -> LoadOptions:
    return LoadOptions(n_gpu_layers=0, n_ctx=n_ctx, n_threads=args.threads, n_batch=args.batch, kv_type=kv_type,
                       flash_attn="on")  # fmt: skip


# -- 1. the KV cache at a long context ------------------------------------------------------------
def probe(args) -> None:
    """The hidden --probe: load at --ctx with one KV type and print what it took, as JSON."""
    import psutil

    backend = load_backend(str(model_path(args.tiny)), options(args, args.probe, args.ctx))
    mem = psutil.Process().memory_info()
    info = backend.info
    # Anonymous: RSS less the file's pages (the whole GGUF is read in at load; llama.cpp's repacked copies of
    # the weights, the KV cache and the compute buffers are anonymous).
    print(json.dumps({"kv_type": info.kv_type, "flash_attn": info.flash_attn, "n_ctx": info.n_ctx,
                      "kv_bytes": info.kv_bytes, "rss_bytes": mem.rss, "anon_rss_bytes": mem.rss - mem.shared}))  # fmt: skip
    backend.close()


def kv_sizes(args, path: Path) -> list[dict]:
    meta = model_meta(check_model(path))
    head_dim = meta.n_embd // meta.n_head
    values = meta.n_layers * args.ctx * 2 * meta.n_head_kv * head_dim
    rows = []
    for kv_type in KV_TYPES:
        cmd = [sys.executable, __file__, "--probe", kv_type, "--ctx", str(args.ctx), "--threads", str(args.threads),
               "--batch", str(args.batch), *(["--tiny"] if args.tiny else [])]  # fmt: skip
        run = measure(cmd)
        got = json.loads(run.stdout.strip().splitlines()[-1])
        if got["n_ctx"] != args.ctx:
            raise RuntimeError(f"{kv_type}: llama.cpp made a context of {got['n_ctx']} tokens, not {args.ctx}")
        got["expected_bytes"] = int(values * BYTES_PER_VALUE[kv_type])
        got["peak_rss_bytes"] = int(run.peak_rss_mb * MIB)
        print(f"{kv_type}: KV cache {got['kv_bytes'] / MIB:.1f} MiB (by hand {got['expected_bytes'] / MIB:.1f}), "
              f"RSS {got['rss_bytes'] / MIB:.0f} MiB, flash attention {got['flash_attn']}", flush=True)  # fmt: skip
        rows.append(got)
    f16 = rows[0]
    for row in rows:
        row["kv_ratio"] = row["kv_bytes"] / f16["kv_bytes"]
        row["rss_ratio"] = row["rss_bytes"] / f16["rss_bytes"]
        row["anon_rss_ratio"] = row["anon_rss_bytes"] / f16["anon_rss_bytes"]
        row["kv_target"] = KV_TARGETS.get(row["kv_type"])
    return rows


# -- 2. decode at depth -----------------------------------------------------------------------------
def ours_round(backend, prompt: list[int], n_gen: int, no_end: dict[int, float]) -> tuple[float, int]:
    """Generate n_gen + 1 tokens after `prompt`; (tokens/s over the n_gen evaluations after the first
    token, prompt tokens evaluated)."""
    params = SamplingParams(temperature=0, max_tokens=n_gen + 1, logit_bias=no_end)
    first = end = 0.0
    finish = None
    for event in backend.generate(prompt, params):
        if isinstance(event, TextDelta) and event.token_ids and not first:
            first = time.perf_counter()
        elif isinstance(event, Finish):
            end, finish = time.perf_counter(), event
    if finish is None or finish.usage.completion_tokens != n_gen + 1:
        got = finish.usage.completion_tokens if finish else 0
        raise RuntimeError(f"yi-local generated {got} of {n_gen + 1} tokens")
    return n_gen / (end - first), finish.timings.evaluated_tokens


def llama_bench_at_depth(args, path: Path, kv_type: str) -> tuple[list[float], float]:
    """llama-bench's tokens/s of each repetition, and the seconds of the rest of its run: the load, a one-token
    warm-up and the fill (which it does not time)."""
    run = measure([str(llama_tool("llama-bench")), "-m", str(path), "-d", str(args.depth), "-p", "0",
                   "-n", str(args.gen), "-ctk", kv_type, "-ctv", kv_type, "-fa", "on", "-t", str(args.threads),
                   "-b", str(args.batch), "-ub", str(args.batch), "-ngl", "0", "-r", str(args.rounds),
                   "-o", "json"])  # fmt: skip
    (result,) = json.loads(run.stdout)
    return list(result["samples_ts"]), run.seconds - sum(result["samples_ns"]) / 1e9


def decode_at_depth(args, path: Path) -> list[dict]:
    vocab = BareLoop(path, vocab_only=True)
    try:
        no_end = {t: BAN for t in vocab.end_tokens()}
        (prompt,) = prompts_for(vocab.ordinary, vocab.n_vocab, 1, args.depth)
    finally:
        vocab.close()
    rows = []
    for kv_type in KV_TYPES:
        backend = load_backend(str(path), options(args, kv_type, args.depth + args.gen + 1))
        try:
            start = time.perf_counter()
            for _ in backend.generate(prompt, SamplingParams(temperature=0, max_tokens=1)):
                pass
            fill_s = time.perf_counter() - start
            print(f"{kv_type}: yi-local filled {args.depth} tokens in {fill_s:.1f} s", flush=True)
            ours = []
            for side in ("yi-local", "llama-bench", "yi-local"):
                if side == "llama-bench":
                    theirs, theirs_rest_s = llama_bench_at_depth(args, path, kv_type)
                    print(f"{kv_type}: llama-bench {' '.join(f'{t:.2f}' for t in theirs)} tok/s", flush=True)
                    continue
                tps, evaluated = ours_round(backend, prompt, args.gen, no_end)
                if evaluated != 1:
                    raise RuntimeError(f"yi-local evaluated {evaluated} prompt tokens again; its cache held them")
                ours.append(tps)
                print(f"{kv_type}: yi-local {tps:.2f} tok/s", flush=True)
            flash = backend.info.flash_attn
        finally:
            backend.close()
        rows.append({"kv_type": kv_type, "flash_attn": flash, "yi_local_tps": ours, "llama_bench_tps": theirs,
                     "ratio": max(ours) / max(theirs), "fill_s": fill_s, "llama_bench_rest_s": theirs_rest_s})  # fmt: skip
    return rows


# -- 3. resuming a saved conversation ---------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(backend, n_tokens: int) -> tuple[list[dict], list[dict]]:
    """A chat of `n_tokens` tokens (or just over) ending with a user's message, and the same chat one turn on."""
    rng = random.Random(0)
    messages = [{"role": "system", "content": "You are Yi, a helpful assistant."}]
    while True:
        pair = [{"role": "user", "content": words(rng, 60)}, {"role": "assistant", "content": words(rng, 120)}]
        if len(backend.chat_tokens([*messages, *pair, {"role": "user", "content": "why"}])) > n_tokens:
            break
        messages += pair
    question = words(rng, n_tokens).split()
    n = 1  # the last message's words: as many as the length takes
    while len(backend.chat_tokens([*messages, {"role": "user", "content": " ".join(question[:n])}])) < n_tokens:
        n += 1
    messages.append({"role": "user", "content": " ".join(question[:n])})
    later = [*messages, {"role": "assistant", "content": words(rng, 40)}, {"role": "user", "content": words(rng, 30)}]
    return messages, later


def first_token(backend, prompt: list[int], no_end: dict[int, float], start: float) -> tuple[float, list[int], Finish]:
    """Seconds from `start` to the first token of the reply to `prompt`, its first tokens, and its Finish."""
    params = SamplingParams(temperature=0, max_tokens=CHECK_TOKENS, logit_bias=no_end)
    ttft, tokens, finish = 0.0, [], None
    for event in backend.generate(prompt, params):
        if isinstance(event, TextDelta) and event.token_ids:
            if not tokens:
                ttft = time.perf_counter() - start
            tokens += event.token_ids
        elif isinstance(event, Finish):
            finish = event
    assert finish is not None
    return ttft, tokens, finish


def resume(args, path: Path) -> dict:
    from yi_local.runtime.kv_state import load_state, save_state

    opts = options(args, args.resume_kv_type, args.resume_ctx)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        state = Path(tmp) / "conversation.kv"
        backend = load_backend(str(path), opts)
        try:
            no_end = {t: BAN for t in range(backend.n_vocab) if backend.is_end_of_generation(t)}
            before, after = conversation(backend, args.resume_tokens)
            old, new = backend.chat_tokens(before), backend.chat_tokens(after)
            for _ in backend.generate(old, SamplingParams(temperature=0, max_tokens=1)):
                pass
            saved = save_state(backend, state, max_bytes=1 << 62, keep=len(old))
        finally:
            backend.close()
        common = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        print(f"saved {saved.n_tokens} tokens ({saved.size / MIB:.1f} MiB); the new turn adds "
              f"{len(new) - len(old)} tokens ({len(new) - common} after the common prefix)", flush=True)  # fmt: skip
        runs: dict[str, list] = {"resumed": [], "afresh": []}
        for r in range(args.rounds):
            for side in ("resumed", "afresh"):
                backend = load_backend(str(path), opts)
                try:
                    start = time.perf_counter()
                    if side == "resumed":
                        load_state(backend, state)
                    load_s = time.perf_counter() - start
                    ttft, tokens, finish = first_token(backend, new, no_end, start)
                finally:
                    backend.close()
                evaluated = finish.timings.evaluated_tokens
                runs[side].append({"ttft_s": ttft, "load_state_s": load_s, "tokens": tokens,
                                   "evaluated_tokens": evaluated})  # fmt: skip
                print(f"round {r + 1}: {side:8} time to first token {ttft:.3f} s, {evaluated} tokens evaluated",
                      flush=True)  # fmt: skip
    best = {side: min(x["ttft_s"] for x in runs[side]) for side in runs}
    same = all(x["tokens"] == runs["afresh"][0]["tokens"] for side in runs for x in runs[side])
    only_new = all(x["evaluated_tokens"] == len(new) - common for x in runs["resumed"])
    return {"kv_type": args.resume_kv_type, "conversation_tokens": len(old), "state_bytes": saved.size,
            "new_prompt_tokens": len(new), "new_turn_tokens": len(new) - common, "runs": runs,
            "resumed_ttft_s": best["resumed"], "afresh_ttft_s": best["afresh"],
            "ratio": best["resumed"] / best["afresh"], "same_tokens": same, "evaluated_only_new_turn": only_new}  # fmt: skip


# -- report -----------------------------------------------------------------------------------------
def report_kv(args, kv: list[dict]) -> str:
    rows = [["KV type", f"KV at {args.ctx:,} (llama.cpp)", "by hand", "KV / f16", "target", "RSS after load",
             "RSS / f16", "anonymous", "anon. / f16", "peak RSS"]]  # fmt: skip
    for r in kv:
        target = f"≤ {r['kv_target']:.2f}×" if r["kv_target"] else ""
        rows.append([r["kv_type"], f"{r['kv_bytes'] / MIB:.1f} MiB", f"{r['expected_bytes'] / MIB:.1f} MiB",
                     f"{r['kv_ratio']:.3f}×", target, f"{r['rss_bytes'] / MIB:.0f} MiB", f"{r['rss_ratio']:.3f}×",
                     f"{r['anon_rss_bytes'] / MIB:.0f} MiB", f"{r['anon_rss_ratio']:.3f}×",
                     f"{r['peak_rss_bytes'] / MIB:.0f} MiB"])  # fmt: skip
    ratios = ", ".join(f"{r['kv_type']} {r['kv_ratio']:.3f}×" for r in kv[1:])
    return f"{table(rows)}\n\nKV cache vs f16: {ratios} (targets ≤ 0.55× / ≤ 0.30×)"


def report_decode(args, dec: list[dict]) -> str:
    rows = [["KV type", f"yi-local tok/s at {args.depth:,}", f"llama-bench -d {args.depth}", "ratio",
             f"fill of {args.depth:,}: yi-local", "llama-bench*"]]  # fmt: skip
    for r in dec:
        rows.append([r["kv_type"], " / ".join(f"{t:.2f}" for t in r["yi_local_tps"]),
                     " / ".join(f"{t:.2f}" for t in r["llama_bench_tps"]), f"{r['ratio']:.3f}×",
                     f"{r['fill_s']:.1f} s", f"{r['llama_bench_rest_s']:.1f} s"])  # fmt: skip
    ratios = ", ".join(f"{r['kv_type']} {r['ratio']:.3f}×" for r in dec)
    return (f"decode, {args.gen} tokens after {args.depth:,} (best of each side)\n\n{table(rows)}\n"
            "* its run less the timed repetitions: the fill, which it does not time, its load and a warm-up token\n\n"
            f"decode vs llama-bench: {ratios} (target ≥ {DECODE_TARGET}×)")  # fmt: skip


def report_resume(res: dict) -> str:
    rows = [["", "time to first token", "of it load_state", "tokens evaluated", f"first {CHECK_TOKENS} tokens"]]
    for side, what in (("resumed", "load_state + generate"), ("afresh", "evaluated afresh")):
        runs = res["runs"][side]
        rows.append([what, " / ".join(f"{x['ttft_s']:.3f} s" for x in runs),
                     " / ".join(f"{x['load_state_s']:.3f} s" for x in runs) if side == "resumed" else "",
                     " / ".join(str(x["evaluated_tokens"]) for x in runs), " ".join(map(str, runs[0]["tokens"]))])  # fmt: skip
    return (f"resuming a {res['conversation_tokens']:,}-token conversation ({res['kv_type']} cache, state file "
            f"{res['state_bytes'] / MIB:.1f} MiB), new turn of {res['new_turn_tokens']} tokens\n\n{table(rows)}\n\n"
            f"resumed / afresh: {res['ratio']:.3f}× (target ≤ {RESUME_TARGET}×); same greedy tokens: "
            f"{'yes' if res['same_tokens'] else 'NO'}; the resumed run evaluated only the new turn: "
            f"{'yes' if res['evaluated_only_new_turn'] else 'NO'}")  # fmt: skip


def report(args, figures: dict) -> None:
    print(f"\n{figures['machine']} · {figures['model']} · {args.threads} threads, batch {args.batch}, "
          f"flash attention on")  # fmt: skip
    if "kv" in figures:
        print("\n" + report_kv(args, figures["kv"]))
    if "decode" in figures:
        print("\n" + report_decode(args, figures["decode"]))
    if "resume" in figures:
        print("\n" + report_resume(figures["resume"]))
    others = ", ".join(f"{k} {v:.1f}" for k, v in figures["other_cpu_s"].items())
    print(f"\ntotal {figures['total_s'] / 60:.1f} min; other processes' CPU time meanwhile: {others} core-seconds "
          "(0: undisturbed)")  # fmt: skip


PARTS = {"kv": kv_sizes, "decode": decode_at_depth, "resume": resume}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model, small sizes: checks the script")
    ap.add_argument("--ctx", type=int, default=32768, help="context of the KV cache sizes (default 32768)")
    ap.add_argument("--depth", type=int, help="tokens in the cache before decode is timed (default 8192; tiny 1024)")
    ap.add_argument("--gen", type=int, help="tokens timed at that depth (default 64; tiny 16)")
    ap.add_argument("--resume-tokens", type=int, help="the saved conversation's length (default 4000; tiny 600)")
    ap.add_argument("--resume-ctx", type=int, default=8192, help="context of the resume runs (default 8192)")
    ap.add_argument("--resume-kv-type", choices=KV_TYPES, default="f16")
    ap.add_argument("--rounds", type=int, default=2, help="llama-bench repetitions, and resume rounds per side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--parts", default="kv,decode,resume", help="which measurements (default kv,decode,resume)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--probe", choices=KV_TYPES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args)
        return 0
    args.depth = args.depth or (1024 if args.tiny else 8192)
    args.gen = args.gen or (16 if args.tiny else 64)
    args.resume_tokens = args.resume_tokens or (600 if args.tiny else 4000)
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        ap.error(f"--parts takes a comma-separated list of {', '.join(PARTS)}, not {args.parts!r}")
    if args.resume_tokens + 200 > args.resume_ctx:
        ap.error(f"--resume-ctx {args.resume_ctx} leaves no room for a new turn after {args.resume_tokens} tokens")

    start = time.perf_counter()
    path = model_path(args.tiny)
    print(machine(), flush=True)
    figures: dict = {"machine": machine(), "model": path.name, "threads": args.threads, "batch": args.batch,
                     "ctx": args.ctx, "depth": args.depth, "gen": args.gen, "rounds": args.rounds}  # fmt: skip
    figures["other_cpu_s"] = {}
    for name, section in PARTS.items():
        if name not in parts:
            continue
        others = OtherLoad()
        figures[name] = section(args, path)
        figures["other_cpu_s"][name] = others.core_seconds()
    figures["total_s"] = time.perf_counter() - start
    report(args, figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
