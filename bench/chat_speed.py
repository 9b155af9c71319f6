"""Does the chat slow the model down, or leave the screen behind? `yi-local chat` against `yi-local run`.

Both real commands run in a pseudo-terminal (120×40) that this script reads as a terminal would, with a
small screen model for what Textual writes. Same model, greedy, 400-token replies, 2 threads. The chat
gets ten turns; at turns 1, 5 and 10 it is compared with `run` given the same conversation, run just
before and just after the chat's reply while the chat waits idle, and averaged: both sides see the machine
as it is at that moment (a separate process cannot reuse the chat's KV cache, so `run` evaluates all of it).
With --repeats N the chat writes each compared reply N times (the first, then /retry: greedy, so the same
text from the same cache), each between two runs, and the median of the N ratios is compared: one reply
against two runs moves by a few percent on a busy VM. Then the tok/s and seconds columns are means and the
× columns the medians of the replies' ratios, each printed.

Per turn: the generator's tokens/s (the runtime's own figure: the chat's status line, `run
--verbose-timings`), and the time from Enter until the whole reply is on the screen (chat: the status line
says it is done and its end is in view) or from the prompt until the whole reply is printed (run). At
turn 1 both evaluate the same prompt; later the chat has the conversation in its KV cache and `run`
evaluates all of it, so `run`'s time is compared less its prompt's evaluation (its own timing) pro rata
for the part the chat had cached. (A /retry's whole prompt
is cached; its Enter→on screen includes redrawing the conversation without the old reply.)
Targets (issue 11): chat ≥ 0.97× run on the Yi-6B-shaped Q4_K_M, ≥ 0.8× on the tiny model.

Models: the tests' tiny chat model (Q8_0) and Yi-6B's real shapes with 8 layers (Q4_K_M), each with the
output rows of every token that is not plain prose zeroed (end of turn, control and byte tokens, padding,
Markdown punctuation): greedy replies then never end early and are prose, as a chat reply is.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import CORPUS, OUT, machine, table
from models import yi6b_checkpoint
from rich.cells import get_character_cell_size

from tests.synthetic import build_checkpoint

COLS, ROWS = 120, 40
REPLY_TOKENS = 400
CTX = 8192  # ten 400-token turns need more than the synthetic models' 4096
TARGETS = {"tiny": 0.8, "yi6b": 0.97}


# -- models -----------------------------------------------------------------------------------
def prose_model(src: Path, quant: str) -> Path:
    """`src` as a GGUF whose greedy replies are plain prose of any length (see the module's docstring)."""
    gguf = OUT / f"{src.name}-prose-{quant}.gguf"
    if gguf.is_file():
        return gguf
    import sentencepiece as spm

    dst = OUT / f"{src.name}-prose"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["max_position_embeddings"] = CTX
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    head_shard = index["weight_map"]["lm_head.weight"]
    for f in src.iterdir():
        if f.name not in ("config.json", head_shard):
            (dst / f.name).symlink_to(f.resolve())
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    prose = [i for i in range(sp.vocab_size()) if _is_prose(sp, i)]
    shutil.copyfile(src / head_shard, dst / head_shard)
    with open(dst / head_shard, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))["lm_head.weight"]
    assert entry["dtype"] == "BF16"
    head = np.memmap(dst / head_shard, dtype=np.uint16, mode="r+", offset=8 + header_len + entry["data_offsets"][0],
                     shape=tuple(entry["shape"]))  # fmt: skip
    kept = head[prose].copy()
    head[:] = 0  # a zero row scores 0; some prose token always scores higher
    head[prose] = kept
    head.flush()
    del head
    subprocess.run([sys.executable, "-m", "yi_local", "convert", str(dst), "--q", quant, "-o", str(gguf)], check=True)
    return gguf


def _is_prose(sp, i: int) -> bool:
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
        return False
    piece = sp.id_to_piece(i).replace("\u2581", " ")
    return bool(piece.strip()) and all(unicodedata.category(c)[0] == "L" or c in " .,;:?'" for c in piece)


def models(which: list[str]) -> dict[str, Path]:
    found = {}
    if "tiny" in which:
        tiny = OUT / "Yi-Tiny-chat"
        if not (tiny / "model.safetensors.index.json").is_file():
            build_checkpoint(tiny, CORPUS, variant="chat")
        found["tiny"] = prose_model(tiny, "Q8_0")
    if "yi6b" in which:
        found["yi6b"] = prose_model(yi6b_checkpoint(8), "Q4_K_M")
    return found


# -- a terminal ---------------------------------------------------------------------------------
_CONTROL = re.compile(r"\x1b\[([0-9;?<>=$]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[^\[\]()]"
                      r"|[\r\n\b]|[^\x1b\r\n\b]+")  # fmt: skip


class Screen:
    """What a terminal shows after the bytes so far: cursor moves, erases and text (styles ignored)."""

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.cells = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self._rest = ""

    def feed(self, text: str) -> None:
        text, self._rest = self._rest + text, ""
        pos = 0
        for m in _CONTROL.finditer(text):
            if m.start() != pos:
                break
            pos = m.end()
            token = m.group(0)
            if token.startswith("\x1b["):
                self._csi(m.group(1), m.group(2))
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self.row = min(self.row + 1, self.rows - 1)
            elif token == "\b":
                self.col = max(self.col - 1, 0)
            elif not token.startswith("\x1b"):
                self._text(token)
        self._rest = text[pos:]  # an escape sequence cut by the read

    def _csi(self, params: str, final: str) -> None:
        if final == "H":
            row, _, col = params.partition(";")
            self.row = min(int(row or 1), self.rows) - 1
            self.col = min(int(col or 1), self.cols) - 1
        elif final == "K":
            line = self.cells[self.row]
            start, end = {"1": (0, self.col + 1), "2": (0, self.cols)}.get(params, (self.col, self.cols))
            line[start:end] = [" "] * (end - start)
        elif final == "J" and params == "2":
            self.cells = [[" "] * self.cols for _ in range(self.rows)]

    def _text(self, text: str) -> None:
        line = self.cells[self.row]
        for ch in text:
            width = get_character_cell_size(ch)
            if width == 0 or self.col + width > self.cols:
                continue
            line[self.col] = ch
            if width == 2:
                line[self.col + 1] = ""
            self.col += width

    def line(self, row: int) -> str:
        return "".join(self.cells[row])

    def lines(self) -> list[str]:
        return [self.line(r) for r in range(self.rows)]


class Terminal:
    """A command in a pseudo-terminal; a thread reads its output as it comes (so the program never waits
    on a full pipe) and stamps each chunk with the time it arrived."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.environ.update(env)
            os.execvp(argv[0], argv)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.chunks: list[tuple[float, bytes]] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.screen = Screen(COLS, ROWS)
        self._seen, self._last_at = 0, 0.0
        self._decoder = __import__("codecs").getincrementaldecoder("utf-8")(errors="replace")

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                data = b""
            with self._arrived:
                self.chunks.append((time.perf_counter(), data))
                self._arrived.notify()
            if not data:
                return

    def write(self, data: bytes) -> float:
        os.write(self.fd, data)
        return time.perf_counter()

    def wait(self, predicate, timeout: float = 300.0, what: str = "") -> float:
        """Feed the screen chunk by chunk until `predicate(screen)`; the time that chunk arrived."""
        deadline = time.monotonic() + timeout
        if predicate(self.screen):
            return self._last_at
        while True:
            with self._arrived:
                while self._seen == len(self.chunks):
                    if not self._arrived.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise TimeoutError(f"the screen never showed {what}:\n" + "\n".join(self.screen.lines()))
                at, data = self.chunks[self._seen]
            self._seen += 1
            self._last_at = at
            if not data:
                raise RuntimeError(f"the program ended before {what}:\n" + "\n".join(self.screen.lines()))
            self.screen.feed(self._decoder.decode(data))
            if predicate(self.screen):
                return at

    def settle(self, quiet: float = 0.3) -> None:
        """Take in what comes until the program has been quiet for `quiet` seconds."""
        while True:
            try:
                self.wait(lambda s: False, timeout=quiet)
            except TimeoutError:
                return

    def finish(self, timeout: float = 30.0) -> bytes:
        self._reader.join(timeout)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return b"".join(data for _, data in self.chunks)


# -- chat and run ---------------------------------------------------------------------------------
WORDS = "the model reads every word of the question and answers in a short friendly way".split()


def user_message(turn: int) -> str:
    return f"Turn {turn}: " + " ".join(WORDS[(turn + i) % len(WORDS)] for i in range(12))


@dataclass
class Turn:
    tps: float
    to_screen_s: float  # Enter (run: the prompt) → the whole reply on the screen
    context: int  # chat: the tokens it had in its KV cache when the reply began; run: its prompt's tokens
    prompt_s: float = 0.0  # run: evaluating its prompt (its own timing)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "yi_local", *args]


def chat(model: Path, turns: list[int], threads: int, env: dict[str, str], repeats: int = 1) -> dict[int, Compared]:
    """The chat's ten turns; at each of `turns`, `run` given the same conversation just before and just
    after the chat's reply (the chat waits idle meanwhile), so both sides see the same machine; with
    `repeats` > 1 the chat writes that reply again (/retry: greedy, the same text from the same cache)
    and `run` follows each time. Per turn: each chat reply with the two runs around it."""
    session = f"bench-{model.stem}"
    term = Terminal(command("chat", str(model), "--temperature", "0", "--max-tokens", str(REPLY_TOKENS),
                            "--ctx", str(CTX), "--threads", str(threads), "--session", session), env)  # fmt: skip
    status = lambda s: s.line(0)  # noqa: E731
    term.wait(lambda s: f"ctx 0/{CTX}" in status(s), what="the model loaded")
    term.settle()
    results, used, messages = {}, 0, []
    for turn in range(1, max(turns) + 1):
        message = user_message(turn)
        prompt = "\n\n".join([m["content"] for m in messages] + [message])
        before = run(model, prompt, threads, env) if turn in turns else None
        term.write(message.encode())
        term.wait(lambda s, m=message: any(m in line for line in s.lines()), what="the message typed")
        term.settle(0.2)
        sent = term.write(b"\r")
        done = term.wait(lambda s, before=f"ctx {used}/": _finished(status(s), before) and _end_shown(s),
                         what="the reply finished and its end in view")  # fmt: skip
        line = status(term.screen)
        tps = float(re.search(r"([\d.]+) tok/s", line).group(1))
        context_before, used = used, int(re.search(r"ctx (\d+)/", line).group(1))
        term.settle()
        messages = json.loads((Path(env["YI_LOCAL_HOME"]) / "sessions" / f"{session}.json").read_text())["messages"]
        _check_screen(turn, messages, term.screen)
        if before is not None:
            runs = [before, run(model, prompt, threads, env)]
            chats = [Turn(tps, done - sent, context_before)]
            for _ in range(repeats - 1):
                chats.append(_retry(term, used - REPLY_TOKENS))
                # The same work: the context ends where the first reply's did (its 400 tokens; the text may
                # differ at a near tie).
                assert f"ctx {used}/" in status(term.screen), f"turn {turn}: /retry ended at {status(term.screen)}"
                runs.append(run(model, prompt, threads, env))
            results[turn] = Compared(chats, runs)
    term.write(b"\x11")  # Ctrl+Q
    term.finish()
    return results


def _retry(term: Terminal, cached: int) -> Turn:
    """/retry: the last reply written again, timed as a turn; its whole prompt (`cached` tokens) is in the cache."""
    status = lambda s: s.line(0)  # noqa: E731
    term.write(b"/retry")
    term.wait(lambda s: any("/retry" in line for line in s.lines()), what="/retry typed")
    term.settle(0.2)
    sent = term.write(b"\r")
    term.wait(lambda s: "writing" in status(s), what="the retry started")  # the conversation redrawn first
    done = term.wait(lambda s: "tok/s" in status(s) and "writing" not in status(s) and _end_shown(s),
                     what="the retried reply finished and its end in view")  # fmt: skip
    tps = float(re.search(r"([\d.]+) tok/s", status(term.screen)).group(1))
    term.settle()
    return Turn(tps, done - sent, cached)


def average(turns: list[Turn]) -> Turn:
    return Turn(statistics.mean(t.tps for t in turns), statistics.mean(t.to_screen_s for t in turns),
                turns[0].context, statistics.mean(t.prompt_s for t in turns))  # fmt: skip


def run_as_cached(chat: Turn, run: Turn) -> float:
    """`run`'s Enter→on screen less evaluating the part of its prompt that the chat had in its KV cache (a
    separate process has none), pro rata: the same work as the chat's reply. Pro rata takes off a little
    more than that part cost (later tokens attend to more), so it errs against the chat."""
    return run.to_screen_s - run.prompt_s * min(1.0, chat.context / run.context)


@dataclass
class Compared:
    """A turn's chat replies, and the runs around them: runs[i] just before chats[i], runs[i + 1] just after."""

    chats: list[Turn]
    runs: list[Turn]

    def pairs(self) -> list[tuple[Turn, Turn]]:
        """Each chat reply with the mean of the two runs around it."""
        return [(c, average(self.runs[i : i + 2])) for i, c in enumerate(self.chats)]

    def ratio(self, of) -> float:
        """The median over the replies of chat ÷ run for `of(chat, run)`."""
        return statistics.median(of(c, r) for c, r in self.pairs())


def _end_shown(screen: Screen) -> bool:
    """The reply's end is in view: the last line of the conversation, above the prompt's box, is the note a
    400-token reply ends with (the status line may say the reply is done a frame before the conversation
    has scrolled to it)."""
    lines = screen.lines()
    box = max((i for i, line in enumerate(lines) if line.strip().startswith("╭")), default=len(lines))
    shown = [text for text in map(_text, lines[1:box]) if text]
    return bool(shown) and shown[-1] == _text("cut at the token limit")


def _finished(status: str, context_before: str) -> bool:
    """The status line shows the reply's speed and a new context size (the app paints it last)."""
    return "tok/s" in status and "writing" not in status and context_before not in status


def _text(shown: str) -> str:
    """`shown` without spaces, borders and box drawing (U+2500–U+259F)."""
    return "".join(ch for ch in shown if not ch.isspace() and not "\u2500" <= ch <= "\u259f")


def _check_screen(turn: int, messages: list[dict], screen: Screen) -> None:
    """The reply ran to the token limit, and its end, as saved, is on the screen."""
    shown = "\n".join(screen.lines())
    assert len(messages) == 2 * turn and "cut at the token limit" in shown, \
        f"turn {turn}: the reply did not run to {REPLY_TOKENS} tokens:\n{shown}"  # fmt: skip
    flat = _text(shown)
    tail = "".join(messages[-1]["content"].split())[-30:]
    assert tail in flat, f"turn {turn}: the end of the reply ({tail!r}) is not on the screen:\n{shown}"


def run(model: Path, prompt: str, threads: int, env: dict[str, str]) -> Turn:
    term = Terminal(command("run", str(model), prompt, "--temperature", "0", "--max-tokens", str(REPLY_TOKENS),
                            "--ctx", str(CTX), "--threads", str(threads), "--verbose-timings"), env)  # fmt: skip
    term.finish()
    out = b"".join(d for _, d in term.chunks).decode(errors="replace")
    stats = re.search(r"\[length\] prompt (\d+) tok at ([\d.]+) tok/s, generated (\d+) tok at ([\d.]+) tok/s", out)
    assert stats and int(stats.group(3)) == REPLY_TOKENS, f"run did not write {REPLY_TOKENS} tokens:\n{out[-2000:]}"
    # Byte offsets: the banner's line ends where the reply starts; the reply ends at the "\n[length]" line.
    raw = b"".join(d for _, d in term.chunks)
    start = raw.index(b"\n", raw.index(b"yi-local: ")) + 1
    end = raw.index(b"\r\n[length]") if b"\r\n[length]" in raw else raw.index(b"\n[length]")
    times, offset = [], 0
    for at, data in term.chunks:
        times.append((offset, offset + len(data), at))
        offset += len(data)
    when = lambda pos: next(at for lo, hi, at in times if lo <= pos < hi)  # noqa: E731
    done = when(end - 1)
    prompt = int(stats.group(1))
    return Turn(float(stats.group(4)), done - when(start - 1), prompt, prompt / float(stats.group(2)))


# -- the benchmark ----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=("tiny", "yi6b"), default=["tiny", "yi6b"])
    ap.add_argument("--turns", type=int, nargs="+", default=[1, 5, 10], help="turns compared with run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="chat replies per compared turn (the first, then /retry), each between two runs; the "
                         "median ratio is compared")  # fmt: skip
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    found = models(args.models)
    print(f"\n{machine()} · {args.threads} threads · greedy {REPLY_TOKENS}-token replies · terminal {COLS}×{ROWS}")
    for name, model in found.items():
        with tempfile.TemporaryDirectory() as home:
            env = {"YI_LOCAL_HOME": home, "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
            measured = chat(model, sorted(set(args.turns)), args.threads, env, args.repeats)
            rows = [["turn", "context (chat/run)", "tok/s run", "tok/s chat", "×", "Enter→on screen: chat (s)",
                     "run (s)", "run less the cached context (s)", "×"]]  # fmt: skip
            if args.repeats > 1:
                rows[0] += ["tok/s × by reply", "screen × by reply"]
            speeds, screens = [], []
            for turn in sorted(set(args.turns)):
                m = measured[turn]
                c, r = average(m.chats), average(m.runs)
                speeds.append(m.ratio(lambda c, r: c.tps / r.tps))
                screens.append(m.ratio(lambda c, r: run_as_cached(c, r) / c.to_screen_s))
                rows.append([str(turn), f"{c.context}/{r.context}", f"{r.tps:.1f}", f"{c.tps:.1f}", f"{speeds[-1]:.2f}",
                             f"{c.to_screen_s:.3f}", f"{r.to_screen_s:.3f}", f"{run_as_cached(c, r):.3f}",
                             f"{screens[-1]:.2f}"])  # fmt: skip
                if args.repeats > 1:
                    rows[-1].append(" / ".join(f"{c.tps / r.tps:.2f}" for c, r in m.pairs()))
                    rows[-1].append(" / ".join(f"{run_as_cached(c, r) / c.to_screen_s:.2f}" for c, r in m.pairs()))
        print(f"\n{model.name}\n")
        print(table(rows))
        print(f"chat / run, lowest over turns {', '.join(map(str, args.turns))}: tokens/s {min(speeds):.2f}×, "
              f"Enter→on screen {min(screens):.2f}× (target ≥ {TARGETS[name]}×)")  # fmt: skip
    print("\nrun less the cached context: run's Enter→on screen less evaluating, pro rata, the part of its prompt the"
          " chat had in its KV cache (a separate process has none).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
