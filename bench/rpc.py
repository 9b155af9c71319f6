"""Several machines (issue 15): what llama.cpp's RPC backend costs yi-local, measured on one machine.

Model: Yi-6B's real tensor shapes, 8 layers, Q4_K_M (bench/models.py). The script starts two `yi-local worker`
processes on free loopback ports for each --worker-threads setting and measures, alternating for --rounds
rounds, one sequence's prompt and generation tokens/s (`yi_local.benchmark`'s measurement, the one
`yi-local bench` makes: --prompt random tokens in one batch, then --gen greedy tokens with the end-of-generation
tokens forbidden) of:
  - local: a plain load on this machine, --threads threads;
  - RPC, 2 workers × T threads: every layer on the two workers (llama.cpp splits them; the split is printed),
    the model in yi-local's supervised child process, whose engine steps are calls over a socket.
Each is measured through yi-local's engine (the load timed too: for RPC it includes sending the weights to the
workers) and through the bare llama-cpp-python loop over the same devices (in this process): engine over RPC /
bare loop over RPC is what the supervised child costs, bare over RPC / bare local what the protocol costs.
The best round of each is compared. Target (issue 15): generation over RPC ≥ 0.7× local.

On one machine only one worker computes at a time (one layer after another), so 2 workers × --threads
threads each use the cores as the local run does; 2 × 1 gives the workers together the local thread count.
The workers run ggml's plain CPU kernels: llama.cpp repacks weights for faster kernels only on the machine
that loads the model (compare `llama-bench --repack 0,1`), so prompt speed over RPC can beat the local one.

    PYTHONPATH=. .venv/bin/python bench/rpc.py [--tiny] [--prompt N] [--gen N] [--rounds N] [--threads N]
        [--worker-threads 1,2] [--batch N] [--json PATH]

About 4 minutes on 2 cores. `--tiny` runs it on the tests' tiny model with small sizes in seconds: it checks
the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import OtherLoad, machine, table
from models import tiny_gguf, yi6b_gguf

from yi_local import rpc
from yi_local.benchmark import BAN, BareLoop, Bench, engine_run, prompts_for
from yi_local.runtime import LoadOptions, load_backend

TARGET = 0.7  # generation over RPC / local (issue 15)
WORKER_START_SECONDS = 30.0


class Workers:
    """`n` yi-local workers on free loopback ports with `threads` threads each, until the block ends."""

    def __init__(self, n: int, threads: int):
        self.threads = threads
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.logs = [tempfile.TemporaryFile() for _ in range(n)]

    def __enter__(self) -> "Workers":
        try:
            for log in self.logs:
                with socket.socket() as s:  # a free port: the worker checks the bind itself and says so
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                cmd = [sys.executable, "-m", "yi_local", "worker", "--port", str(port), "--threads", str(self.threads)]
                # stdout has a line per connection; the banner and errors go to stderr
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
                self.ports.append(port)
            for proc, port, log in zip(self.procs, self.ports, self.logs):
                self._wait(proc, port, log)
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _wait(proc: subprocess.Popen, port: int, log) -> None:
        deadline = time.monotonic() + WORKER_START_SECONDS
        while True:
            try:
                rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2.0)
                return
            except rpc.WorkerError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    said = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"the worker on port {port} did not start:\n{said}") from None
                time.sleep(0.1)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{p}" for p in self.ports)

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


def prompt_and_bans(path: str, n_tokens: int) -> tuple[list[int], dict[int, float]]:
    """The prompt Bench builds (the same seed) and the end-of-generation tokens it forbids."""
    vocab = BareLoop(path, vocab_only=True)
    try:
        return prompts_for(vocab.ordinary, vocab.n_vocab, 1, n_tokens)[0], {t: BAN for t in vocab.end_tokens()}
    finally:
        vocab.close()


def engine_side(bench: Bench, prompt: list[int], no_end: dict[int, float]) -> dict:
    """yi-local's engine, as Bench.yi_local runs it, with the load timed."""
    s = bench.setup
    options = LoadOptions(n_gpu_layers=s.n_gpu_layers, n_ctx=s.n_ctx, n_threads=s.n_threads, n_batch=s.n_batch,
                          rpc=s.rpc)  # fmt: skip
    start = time.perf_counter()
    backend = load_backend(s.model, options)
    load_s = time.perf_counter() - start
    try:
        speed = engine_run(backend, [prompt], s.n_gen, no_end)
        info = backend.info
    finally:
        backend.close()
    return {"load_s": load_s, "prompt_tps": speed.prompt_tps, "generate_tps": speed.generate_tps,
            "offload": info.offload}  # fmt: skip


def bare_side(bench: Bench) -> dict:
    speed = bench.bare(1)
    return {"prompt_tps": speed.prompt_tps, "generate_tps": speed.generate_tps}


def measure_rounds(args, path: str, sides: list[dict]) -> None:
    """Each side once a round, in order; the engine, then the bare loop."""
    prompt, no_end = prompt_and_bans(path, args.prompt)
    for side in sides:
        side["engine"], side["bare"] = [], []
    for r in range(args.rounds):
        for side in sides:
            meanwhile = OtherLoad()
            e = engine_side(side["bench"], prompt, no_end)
            side["engine"].append(e)
            line = (f"round {r + 1}: {side['name']:28} load {e['load_s']:5.2f} s  prompt {e['prompt_tps']:7.1f} "
                    f"tok/s  generation {e['generate_tps']:6.2f} tok/s")  # fmt: skip
            if not args.no_bare:
                b = bare_side(side["bench"])
                side["bare"].append(b)
                line += f"  (bare loop {b['prompt_tps']:.1f} / {b['generate_tps']:.2f})"
            e["other_cpu_s"] = meanwhile.core_seconds()
            print(f"{line}  others {e['other_cpu_s']:.1f} core-s", flush=True)


def best(runs: list[dict], key: str, low: bool = False) -> float:
    values = [r[key] for r in runs]
    return min(values) if low else max(values)


def report(args, figures: dict) -> None:
    sides = figures["sides"]
    local = sides[0]
    lb = {k: best(local["engine"], k) for k in ("prompt_tps", "generate_tps")}
    print(f"\n{figures['machine']} · {figures['model']} · prompt {args.prompt}, generate {args.gen} · "
          f"local {args.threads} threads, batch {args.batch}\n")  # fmt: skip
    rows = [["", "load", "prompt tok/s", "× local", "generation tok/s", "× local", "bare loop pp / tg",
             "engine / bare pp / tg"]]  # fmt: skip
    for side in sides:
        e = {k: best(side["engine"], k) for k in ("prompt_tps", "generate_tps")}
        row = [side["name"], f"{best(side['engine'], 'load_s', low=True):.2f} s", f"{e['prompt_tps']:.1f}",
               f"{e['prompt_tps'] / lb['prompt_tps']:.3f}×", f"{e['generate_tps']:.2f}",
               f"{e['generate_tps'] / lb['generate_tps']:.3f}×"]  # fmt: skip
        if side["bare"]:
            b = {k: best(side["bare"], k) for k in ("prompt_tps", "generate_tps")}
            row += [f"{b['prompt_tps']:.1f} / {b['generate_tps']:.2f}",
                    f"{e['prompt_tps'] / b['prompt_tps']:.3f}× / {e['generate_tps'] / b['generate_tps']:.3f}×"]  # fmt: skip
        else:
            row += ["", ""]
        rows.append(row)
    print(table(rows))
    print()
    for side in sides:
        runs = side["engine"]
        print(f"{side['name']}: split {runs[0]['offload']}; load "
              + " / ".join(f"{r['load_s']:.2f}" for r in runs) + " s; generation "
              + " / ".join(f"{r['generate_tps']:.2f}" for r in runs) + " tok/s by round")  # fmt: skip
    if local["bare"]:
        lbb = best(local["bare"], "generate_tps")
        print("bare loop, generation over RPC / local (the protocol's cost): "
              + ", ".join(f"{s['name']} {best(s['bare'], 'generate_tps') / lbb:.3f}×" for s in sides[1:]))  # fmt: skip
    print(f"generation over RPC / local (target ≥ {TARGET}×): "
          + ", ".join(f"{s['name']} {best(s['engine'], 'generate_tps') / lb['generate_tps']:.3f}×" for s in sides[1:])
          + f"; total {figures['total_s'] / 60:.1f} min")  # fmt: skip
    print(f"other processes' CPU time meanwhile: {figures['other_cpu_s']:.1f} core-seconds (0 = undisturbed)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model, small sizes: checks the script")
    ap.add_argument("--prompt", type=int, help="prompt tokens (default 128; tiny 32)")
    ap.add_argument("--gen", type=int, help="generated tokens timed after the first (default 64; tiny 16)")
    ap.add_argument("--rounds", type=int, help="rounds, each side once a round (default 3; tiny 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the local run and of the RPC client")
    ap.add_argument("--worker-threads", default="1,2", help="threads of each worker, one setting a row (default 1,2)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--no-bare", action="store_true", help="only yi-local's engine (no bare-loop columns)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.prompt = args.prompt or (32 if args.tiny else 128)
    args.gen = args.gen or (16 if args.tiny else 64)
    args.rounds = args.rounds or (2 if args.tiny else 3)
    worker_threads = [int(t) for t in args.worker_threads.split(",")]

    start = time.perf_counter()
    path = str(tiny_gguf("Q8_0") if args.tiny else yi6b_gguf("Q4_K_M"))
    n_ctx = 512 if args.tiny else 2048
    print(machine(), flush=True)
    with contextlib.ExitStack() as stack:
        pools = [stack.enter_context(Workers(2, t)) for t in worker_threads]
        # args.gen timed steps after the first token, as decode.py counts them; CPU only locally, every layer
        # on the workers over RPC (what stays here is the token embeddings' lookup).
        sides = [{"name": f"local, {args.threads} threads", "bench": Bench(path, args.prompt, args.gen + 1, [1],
                  n_ctx, args.threads, args.batch, n_gpu_layers=0)}]  # fmt: skip
        for pool in pools:
            sides.append({"name": f"RPC, 2 workers × {pool.threads} thread{'s' if pool.threads > 1 else ''}",
                          "worker_threads": pool.threads, "workers": list(pool.endpoints),
                          "bench": Bench(path, args.prompt, args.gen + 1, [1], n_ctx, args.threads, args.batch,
                                         n_gpu_layers=-1, rpc=pool.endpoints)})  # fmt: skip
        others = OtherLoad()
        measure_rounds(args, path, sides)
    other_cpu_s = others.core_seconds()
    for side in sides:
        side["setup"] = asdict(side.pop("bench").setup)
    figures = {"machine": machine(), "model": Path(path).name, "prompt": args.prompt, "gen": args.gen,
               "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "sides": sides,
               "other_cpu_s": other_cpu_s, "total_s": time.perf_counter() - start}  # fmt: skip
    report(args, figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
