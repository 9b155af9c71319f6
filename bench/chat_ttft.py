"""Time to first token at turns 1 and 10 of a chat, with the same new-message length each turn.

Model: Yi-6B's real tensor shapes, 8 layers, Q4_K_M. Each turn adds a user message of the same length
and generates a 32-token reply (letters only, through a grammar, so the reply is valid text as a real
model's is); the conversation goes through `Backend.chat_tokens` exactly as `chat` and `serve` do.
For contrast the same conversation is replayed with the KV cache emptied before every turn (what a
server without prefix reuse does). Target (issue 3): turn-10 TTFT ≤ 1.2× turn-1's.
"""

from __future__ import annotations

import argparse
import sys

from common import machine, table
from models import yi6b_gguf

from yi_local.runtime import Finish, LoadOptions, SamplingParams, TextDelta, load_backend

WORDS = "the model reads every word of the question and answers in a short friendly way".split()


def user_message(turn: int, n_words: int) -> str:
    return " ".join(WORDS[(turn + i) % len(WORDS)] for i in range(n_words))


def chat(backend, turns: int, words: int, reuse: bool) -> list[float]:
    messages, ttft = [{"role": "system", "content": "You are Yi, a helpful assistant."}], []
    params = SamplingParams(max_tokens=32, temperature=0, grammar='root ::= [a-z] [a-z ]+')
    for turn in range(turns):
        messages.append({"role": "user", "content": user_message(turn, words)})
        if not reuse:
            backend.reset()
        reply, finish = "", None
        for event in backend.generate(backend.chat_tokens(messages), params):
            if isinstance(event, TextDelta):
                reply += event.text
            elif isinstance(event, Finish):
                finish = event
        ttft.append(finish.timings.first_token_s)
        messages.append({"role": "assistant", "content": reply})
    return ttft


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--words", type=int, default=40, help="words per user message")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    backend = load_backend(str(yi6b_gguf("Q4_K_M")), LoadOptions(n_ctx=4096, n_threads=args.threads, n_gpu_layers=0))
    chat(backend, 2, args.words, reuse=True)  # warm up
    backend.reset()
    with_reuse = chat(backend, args.turns, args.words, reuse=True)
    backend.reset()
    without = chat(backend, args.turns, args.words, reuse=False)
    rows = [["turn", "TTFT yi-local (s)", "TTFT without prefix reuse (s)"]]
    rows += [[str(i + 1), f"{a:.3f}", f"{b:.3f}"] for i, (a, b) in enumerate(zip(with_reuse, without))]
    print(f"\n{machine()} · Yi-6B shapes, 8 layers, Q4_K_M · {args.threads} threads · {args.words}-word messages\n")
    print(table(rows))
    print(f"\nturn {args.turns} / turn 1 TTFT: yi-local {with_reuse[-1] / with_reuse[0]:.2f}× (target ≤ 1.2×), "
          f"without reuse {without[-1] / without[0]:.2f}×")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
