"""Concurrent streaming clients: `yi-local serve --parallel 4` against llama.cpp's `llama-server -np 4`, same run.

Model: Yi-6B's real tensor shapes, 8 layers, Q4_K_M (`--model tiny` checks the script in seconds). Both
servers load the same file on the CPU with the same threads and batch, and 2048 tokens of context per
sequence (yi-local: --ctx 2048; llama-server: -c 8192 with -np 4, as its context is shared out among its
slots). Both servers are up for the whole run, each idle but for its own loads, and the loads run in
--rounds rounds (default 2) that alternate the servers' order, each round ending with the bare loop, so
that the VM's drift over minutes reaches every side alike; the best round of each load is compared, all
rounds are printed. Each server gets, over /v1/completions with stream=true:
  - 1, 2 and 4 clients at once (--clients), each with its own prompt;
  - "4 serial": as many requests as the most clients, one after another.
Every request is greedy with a fixed max_tokens and the end tokens banned through logit_bias (</s> 2,
<|im_end|> 7), so every reply is max_tokens long. Every prompt (about --prompt-tokens tokens) is new: it
starts with its own number and takes the corpus's lines in its own order, so no prefix cache helps.

Per server and load: aggregate tokens/s (all replies' tokens ÷ the time from the first request sent to the
last reply done), per-client tokens/s (a client's tokens after its first ÷ the time from its first text to
its last, averaged over the clients) and TTFT (request sent → first text), mean and worst. Then each
server's speed-up of 4 concurrent clients over 4 serial requests (aggregate tokens/s); target (issue 12):
yi-local's ≥ llama-server's. And one client's decode speed against bench/decode.py's bare llama-cpp-python
loop with a prompt and a reply of the same lengths (target: ≥ 0.97×).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import httpx
from common import CORPUS, REPO, OtherLoad, llama_tool, machine, table
from models import tiny_gguf, yi6b_gguf

from yi_local.benchmark import BareLoop
from yi_local.llama_lib import llama_cpp

CTX = 2048  # tokens per sequence, on both servers
SERVERS = ("llama-server", "yi-local")
BANNER = re.compile(r"yi-local: serving .* at (http://[^/\s]+)/")

NO_END = {2: -100.0, 7: -100.0}  # </s> and <|im_end|>: every reply runs to max_tokens


# -- prompts ----------------------------------------------------------------------------------
class Prompts:
    """New prompts of about `n` tokens each (see the module's docstring), cut with the model's own tokenizer."""

    def __init__(self, model: Path, n: int) -> None:
        self.L = llama_cpp()
        params = self.L.llama_model_default_params()
        params.vocab_only = True
        self._model = self.L.llama_model_load_from_file(str(model).encode(), params)
        if not self._model:
            raise RuntimeError(f"cannot read the vocabulary of {model}")
        self._vocab = self.L.llama_model_get_vocab(self._model)
        self.lines = [line for line in CORPUS.read_text().splitlines() if line.strip()]
        self.n, self.count = n, 0

    def tokens(self, text: str, bos: bool = True) -> list[int]:
        data = text.encode()
        buf = (self.L.llama_token * (len(data) + 2))()
        n = self.L.llama_tokenize(self._vocab, data, len(data), buf, len(buf), bos, False)
        return list(buf[:n])

    def next(self) -> str:
        self.count += 1
        rng = random.Random(self.count)
        text = f"Request {self.count}."
        while len(self.tokens(text, bos=False)) < self.n:
            text += " " + " ".join(rng.sample(self.lines, len(self.lines)))
        kept = self.tokens(text, bos=False)[: self.n]
        out = ctypes.create_string_buffer(len(text.encode()) + 64)
        size = self.L.llama_detokenize(self._vocab, (self.L.llama_token * len(kept))(*kept), len(kept), out, len(out),
                                       True, False)  # fmt: skip
        return out.raw[:size].decode(errors="ignore")

    def close(self) -> None:
        self.L.llama_model_free(self._model)


# -- servers ----------------------------------------------------------------------------------
class Server:
    """A server process in its own session (Ctrl-C reaches this script, which stops it), its stderr drained
    so that it never blocks on a full pipe; the last lines are kept for errors."""

    def __init__(self, name: str, cmd: list[str], url: str | None = None, env: dict | None = None) -> None:
        self.name, self.url = name, url
        self.tail: deque[str] = deque(maxlen=30)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace", cwd=REPO, env={**os.environ, **(env or {})},
                                     start_new_session=True)  # fmt: skip
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.tail.append(line.rstrip())
            if self.url is None and (m := BANNER.search(line)):
                self.url = m.group(1)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n" + "\n".join(self.tail))
            if self.url:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5, trust_env=False).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n" + "\n".join(self.tail))

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, model: Path, args: argparse.Namespace) -> Server:
    threads, batch, parallel = str(args.threads), str(args.batch), args.parallel
    if server == "llama-server":
        port = free_port()
        cmd = [str(llama_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(parallel), "-c", str(CTX * parallel), "--no-kv-unified", "-t", threads, "-tb", threads,
               "-b", batch, "-ub", batch, "-ngl", "0", "--no-webui"]  # fmt: skip
        return Server(server, cmd, url=f"http://127.0.0.1:{port}")
    cmd = [sys.executable, "-m", "yi_local", "serve", str(model), "--port", "0", "--ctx", str(CTX),
           "--threads", threads, "--batch", batch, "--n-gpu-layers", "0"]  # fmt: skip
    if not args.no_parallel_flag:
        cmd += ["--parallel", str(parallel)]
    # This checkout's yi_local, whichever one the virtual environment has installed.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return Server(server, cmd, env={"PYTHONPATH": path})


# -- clients ----------------------------------------------------------------------------------
@dataclass
class Reply:
    """One request as its client saw it (time.perf_counter seconds)."""

    sent: float
    first: float  # first text
    last: float  # last text
    done: float
    tokens: int
    prompt_tokens: int
    finish: str


async def complete(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Reply:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(t): b for t, b in NO_END.items()}}  # fmt: skip
    first = last = usage = finish = None
    texts = 0
    sent = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    last = time.perf_counter()
                    first = first or last
                    texts += 1
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    done = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: a reply with no text")
    tokens = usage["completion_tokens"] if usage else max_tokens if finish == "length" else texts
    return Reply(sent, first, last, done, tokens, usage["prompt_tokens"] if usage else 0, finish or "?")


@dataclass
class Load:
    server: str
    name: str
    clients: int
    replies: list[Reply]

    @property
    def wall(self) -> float:
        return max(r.done for r in self.replies) - min(r.sent for r in self.replies)

    @property
    def aggregate(self) -> float:
        return sum(r.tokens for r in self.replies) / self.wall

    @property
    def per_client(self) -> float:
        return mean((r.tokens - 1) / (r.last - r.first) for r in self.replies)

    @property
    def score(self) -> float:
        """What the best round is chosen by: one client's decode speed, else the aggregate speed."""
        return self.per_client if self.clients == 1 else self.aggregate

    @property
    def ttft(self) -> list[float]:
        return [r.first - r.sent for r in self.replies]

    def summary(self) -> dict:
        return {"server": self.server, "load": self.name, "clients": self.clients, "aggregate_tps": self.aggregate,
                "per_client_tps": self.per_client, "ttft_mean_s": mean(self.ttft), "ttft_max_s": max(self.ttft),
                "wall_s": self.wall, "replies": [asdict(r) for r in self.replies]}  # fmt: skip


async def loads(server: str, url: str, prompts: Prompts, args: argparse.Namespace) -> list[Load]:
    out = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=10), limits=limits, trust_env=False) as client:
        await complete(client, url, prompts.next(), 8)  # warm-up: a first request's one-off costs stay out
        for n in args.clients:
            batch = [prompts.next() for _ in range(n)]
            replies = await asyncio.gather(*(complete(client, url, p, args.max_tokens) for p in batch))
            out.append(Load(server, f"{n} client{'s' * (n > 1)}", n, list(replies)))
            print(f"{server}: {out[-1].name}: {out[-1].aggregate:.2f} tok/s", flush=True)
        n = max(args.clients)
        batch = [prompts.next() for _ in range(n)]
        out.append(Load(server, f"{n} serial", n, [await complete(client, url, p, args.max_tokens) for p in batch]))
        print(f"{server}: {out[-1].name}: {out[-1].aggregate:.2f} tok/s", flush=True)
    for load in out:
        short = [r for r in load.replies if r.tokens != args.max_tokens or r.finish != "length"]
        if short:
            print(f"warning: {server}, {load.name}: {len(short)} replies not {args.max_tokens} tokens long "
                  f"({', '.join(f'{r.tokens} tokens, {r.finish}' for r in short)})", flush=True)  # fmt: skip
    return out


# -- main -------------------------------------------------------------------------------------
def model_path(name: str) -> Path:
    if name == "yi6b":
        return yi6b_gguf("Q4_K_M", 8)
    if name == "tiny":
        return tiny_gguf()
    return Path(name)


def bare_loop(model: Path, prompts: Prompts, args: argparse.Namespace) -> float:
    """One client's decode tokens/s in bench/decode.py's bare llama-cpp-python loop, a new prompt of the same length."""
    tokens = prompts.tokens(prompts.next())
    loop = BareLoop(model)
    try:
        return loop.run([tokens], args.max_tokens, CTX, args.threads, args.batch,
                        {t: -100.0 for t in loop.end_tokens()}).generate_tps  # fmt: skip
    finally:
        loop.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yi6b", help="yi6b (Yi-6B shapes, 8 layers, Q4_K_M), tiny, or a .gguf path")
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="clients at once, per load")
    ap.add_argument("--parallel", type=int, default=4, help="sequences each server decodes at once (default 4)")
    ap.add_argument("--no-parallel-flag", action="store_true",
                    help="start `yi-local serve` without --parallel (for a serve that does not have it)")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every load on every server, alternating (default 2)")
    ap.add_argument("--no-bare-loop", action="store_true", help="skip the bare llama-cpp-python loop")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args()
    if args.max_tokens < 2 or min(args.clients) < 1 or args.rounds < 1:
        ap.error("--max-tokens must be at least 2, --clients and --rounds at least 1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed: stop the servers as Ctrl-C does

    model = model_path(args.model)
    prompts = Prompts(model, args.prompt_tokens)
    if "llama-server" in args.servers:
        llama_tool("llama-server")  # built (once) before anything is timed
    label = {"llama-server": "llama-server", "yi-local": "yi-local" + " (no --parallel)" * args.no_parallel_flag}
    measured: list[tuple[int, Load]] = []  # (round, load)
    bare: list[float] = []
    meanwhile = OtherLoad()
    with contextlib.ExitStack() as stack:
        # Every server is up for the whole run, idle but for its own loads: the rounds alternate them (and
        # the bare loop), so that the machine's drift over minutes reaches every side alike.
        running = {}
        for server in args.servers:
            print(f"starting {label[server]}…", flush=True)
            running[server] = stack.enter_context(start(server, model, args))
            running[server].wait_ready()
        for r in range(args.rounds):
            for server in args.servers if r % 2 == 0 else args.servers[::-1]:
                print(f"round {r + 1}, {label[server]}:", flush=True)
                measured += [(r, x) for x in asyncio.run(loads(label[server], running[server].url, prompts, args))]
            if not args.no_bare_loop:
                bare.append(bare_loop(model, prompts, args))
                print(f"round {r + 1}: bare llama-cpp-python loop: {bare[-1]:.2f} tok/s", flush=True)
    other = meanwhile.core_seconds()
    prompts.close()

    # Per server and load, the round with the best aggregate speed (one client: the best per-client speed).
    by: dict[tuple[str, str], Load] = {}
    for _, x in measured:
        key = x.server, x.name
        if key not in by or x.score > by[key].score:
            by[key] = x
    best = list(by.values())
    rounds_by = [{(x.server, x.name): x for q, x in measured if q == r} for r in range(args.rounds)]
    p, n = args.parallel, max(args.clients)
    prompt_tokens = mean(r.prompt_tokens for _, load in measured for r in load.replies)
    print(f"\n{machine()} · {model.name} · {args.threads} threads, batch {args.batch}, context {CTX} per sequence "
          f"(yi-local --ctx {CTX}{'' if args.no_parallel_flag else f' --parallel {p}'}; llama-server -np {p} "
          f"-c {CTX * p}) · prompts of {prompt_tokens:.0f} tokens, replies of {args.max_tokens}, greedy · "
          f"{args.rounds} rounds, best of each · other processes' CPU meanwhile {other:.1f} core-s\n")  # fmt: skip
    rows = [["server", "load", "aggregate tok/s", "per-client tok/s", "TTFT mean s", "TTFT max s", "wall s", "rounds"]]
    for x in best:
        rounds = [f"{r[x.server, x.name].score:.2f}" for r in rounds_by]
        rows.append([x.server, x.name, f"{x.aggregate:.2f}", f"{x.per_client:.2f}", f"{mean(x.ttft):.2f}",
                     f"{max(x.ttft):.2f}", f"{x.wall:.1f}", " / ".join(rounds)])  # fmt: skip
    if bare:
        rows.append(["bare llama-cpp-python loop", "1 client", "", f"{max(bare):.2f}", "", "", "",
                     " / ".join(f"{b:.2f}" for b in bare)])  # fmt: skip
    print(table(rows))

    servers = [label[s] for s in args.servers]
    speedup = {s: by[s, f"{n} clients"].aggregate / by[s, f"{n} serial"].aggregate for s in servers if n > 1}
    print()
    if speedup:
        print(f"speed-up of {n} concurrent clients over {n} serial requests (aggregate tok/s, best rounds): "
              + ", ".join(f"{s} {v:.2f}×" for s, v in speedup.items()))  # fmt: skip
        for s in servers:
            per_round = [r[s, f"{n} clients"].aggregate / r[s, f"{n} serial"].aggregate for r in rounds_by]
            print(f"  {s}, round by round: {' / '.join(f'{v:.2f}×' for v in per_round)}")
        if len(speedup) == 2:
            ours, theirs = speedup[label["yi-local"]], speedup["llama-server"]
            print(f"  target (issue 12): yi-local's ≥ llama-server's: {ours:.2f}× vs {theirs:.2f}× "
                  f"({'met' if ours >= theirs else 'not met'})")  # fmt: skip
    if len(servers) == 2:
        ratios = [f"{x.name} {x.aggregate / by['llama-server', x.name].aggregate:.2f}×"
                  for x in best if x.server == label["yi-local"]]  # fmt: skip
        print(f"yi-local / llama-server, aggregate tok/s: {', '.join(ratios)}")
    if bare and 1 in args.clients:
        single = {s: by[s, "1 client"].per_client for s in servers}
        print("one client's decode tok/s ÷ the bare llama-cpp-python loop's (best rounds): "
              + ", ".join(f"{s} {v / max(bare):.3f}×" for s, v in single.items()) + " (target ≥ 0.97× for yi-local)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(), "model": str(model), "ctx_per_sequence": CTX, "prompt_tokens": prompt_tokens,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "other_load_core_s": other, "loads": [dict(x.summary(), round=r + 1) for r, x in measured],
            "speedup": speedup, "bare_loop_decode_tps": bare,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
