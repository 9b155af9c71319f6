"""The batching engine on the real llama.cpp and the tests' tiny chat model: several sequences in one
context, no cross-talk, batch composition, capacity per sequence, cancellation and slot choice.

Batched arithmetic may round differently from a solo run, so "the same output" means: equal to the solo
run up to the first step where the solo run's top-two logit margin is MARGIN or less (tests/margins.py)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.margins import assert_same_under_margin, clear_prefix
from yi_local.errors import YiLocalError
from yi_local.runtime import Finish, LoadOptions, SamplingParams, TextDelta, load_backend
from yi_local.runtime.engine import Chunk, QueueFullError

NO_EOS = {2: -100.0, 7: -100.0}
PROMPTS = ["Tell me about the sea", "写一首诗", "List three colours please", "What is two plus two?"]


@pytest.fixture(scope="module")
def backend(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=512, n_threads=2, n_parallel=4, n_batch=64))
    yield b
    b.close()


@pytest.fixture
def steps(backend):
    """Every step's batch: [(sequence, tokens, start, logits)], recorded by the engine's hook."""
    seen: list[list[Chunk]] = []
    backend.engine.on_step = seen.append
    backend.reset()
    yield seen
    backend.engine.on_step = None


def run_one(backend, prompt: list[int], params: SamplingParams, cancel=None) -> tuple[str, list[int], Finish]:
    text, ids, finish = [], [], None
    for event in backend.generate(prompt, params, cancel):
        if isinstance(event, TextDelta):
            text.append(event.text)
            ids += event.token_ids
        else:
            finish = event
    assert finish is not None
    return "".join(text), ids, finish


def run_together(backend, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, list[int], Finish]]:
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = run_one(backend, *jobs[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return [results[i] for i in range(len(jobs))]


def chat(backend, text: str) -> list[int]:
    return backend.chat_tokens([{"role": "user", "content": text}])


def test_requests_together_get_what_they_get_alone(backend, steps):
    params = SamplingParams(temperature=0, max_tokens=24, logit_bias=NO_EOS)
    prompts = [chat(backend, p) for p in PROMPTS]
    solo = []
    for p in prompts:
        backend.reset()
        solo.append(run_one(backend, p, params))
    backend.reset()
    steps.clear()
    together = run_together(backend, [(p, params) for p in prompts])
    assert max(len({c.seq for c in batch}) for batch in steps) == 4, "the four never shared a step"
    for p, (_, solo_ids, _), (_, ids, finish) in zip(prompts, solo, together):
        assert finish.reason == "length" and finish.usage.completion_tokens == 24
        assert_same_under_margin(backend, p, solo_ids, ids)
    assert len({tuple(ids) for _, ids, _ in solo}) > 1  # the prompts really lead to different replies


def test_caches_cut_back_while_others_run_give_what_a_solo_run_gives(backend, steps):
    """Rounds of the same prompts: the first reads them, the next ones reuse and cut back the slots' caches
    while the others generate. Every round, each reply is its solo run under the margin rule."""
    params = SamplingParams(temperature=0, max_tokens=20, logit_bias=NO_EOS)
    prompts = [chat(backend, p) for p in PROMPTS]
    solo = []
    for p in prompts:
        backend.reset()
        solo.append(run_one(backend, p, params)[1])
    must = [clear_prefix(backend, p, ids) for p, ids in zip(prompts, solo)]  # (this empties the caches)
    for _ in range(3):
        together = run_together(backend, [(p, params) for p in prompts])
        for n, solo_ids, (_, ids, _) in zip(must, solo, together):
            assert ids[:n] == solo_ids[:n] and len(ids) == len(solo_ids)


def test_each_request_honours_only_its_own_sampling(backend, steps):
    """Logit bias, a grammar, a stop string and penalties, all in one batch: no sampler state crosses over."""
    forced = backend.tokenize("sea", special=False)[-1]
    jobs = [
        (chat(backend, PROMPTS[0]), SamplingParams(temperature=0, max_tokens=12, logit_bias={forced: 100.0})),
        (chat(backend, PROMPTS[1]), SamplingParams(temperature=0, max_tokens=12, grammar='root ::= [0-9]+ "."')),
        (chat(backend, PROMPTS[2]), SamplingParams(temperature=0, max_tokens=40, logit_bias=NO_EOS)),
        (chat(backend, PROMPTS[3]), SamplingParams(temperature=0.9, seed=7, max_tokens=16, logit_bias=NO_EOS,
                                                   repeat_penalty=1.5, repeat_last_n=16)),  # fmt: skip
    ]
    # the stop string: a piece of what the third request says alone
    plain, _, _ = run_one(backend, *jobs[2])
    stop = plain[10:14]
    assert stop and plain.index(stop) >= 1
    jobs[2] = (jobs[2][0], SamplingParams(temperature=0, max_tokens=40, logit_bias=NO_EOS, stop=[stop]))
    solo = []
    for prompt, params in jobs:
        backend.reset()
        solo.append(run_one(backend, prompt, params))
    backend.reset()
    steps.clear()
    together = run_together(backend, jobs)
    assert max(len({c.seq for c in batch}) for batch in steps) == 4
    biased, digits, stopped, sampled = together
    assert biased[1] == [forced] * 12
    assert re.fullmatch(r"[0-9]+\.?", digits[0]), digits[0]
    assert_same_under_margin(backend, jobs[1][0], solo[1][1], digits[1])
    assert stopped[2].reason == "stop" and stopped[2].stop_text == stop and stop not in stopped[0]
    assert_same_under_margin(backend, jobs[2][0], solo[2][1], stopped[1])
    assert sampled[1] == solo[3][1], "a seeded sampler's draws depend only on its own request"


def test_a_long_prompt_is_read_in_chunks_between_decode_steps(backend, steps):
    """Every step carries one token of each generating sequence and at most one prompt chunk."""
    params = SamplingParams(temperature=0, max_tokens=60, logit_bias=NO_EOS)
    long_prompt = chat(backend, " ".join(["many words"] * 120))[:300]
    assert len(long_prompt) > 3 * 64

    results: dict[str, tuple] = {}
    first = threading.Thread(target=lambda: results.__setitem__("a", run_one(backend, chat(backend, PROMPTS[0]), params)))
    second = threading.Thread(target=lambda: results.__setitem__("b", run_one(backend, chat(backend, PROMPTS[2]), params)))
    first.start()
    second.start()
    deadline = time.monotonic() + 30
    while sum(len(b) == 2 and all(len(c.tokens) == 1 for c in b) for b in steps) < 3:  # both generating
        assert time.monotonic() < deadline
        time.sleep(0.001)
    at = len(steps)
    results["long"] = run_one(backend, long_prompt, SamplingParams(temperature=0, max_tokens=4))
    first.join(60)
    second.join(60)
    for batch in steps:
        assert len([c for c in batch if len(c.tokens) > 1]) <= 1, "two prompt chunks in one step"
        assert sum(len(c.tokens) for c in batch) <= 64
        assert len({c.seq for c in batch}) == len(batch)  # one chunk per sequence
    reading = [b for b in steps[at:] if any(c.start < len(long_prompt) and len(c.tokens) > 1 for c in b)]
    long_seq = next(c.seq for b in reading for c in b if len(c.tokens) > 1)
    chunks = [c for b in steps[at:] for c in b if c.seq == long_seq and c.start < len(long_prompt)]
    assert all(c.seq == long_seq for b in reading for c in b if len(c.tokens) > 1)
    assert [c.start for c in chunks] == [sum(len(x.tokens) for x in chunks[:i]) for i in range(len(chunks))]
    assert sum(len(c.tokens) for c in chunks) == len(long_prompt)  # all of it, in order
    assert len(chunks) >= 3
    # While the long prompt was read the other two were generating: each of those steps carried one token
    # for each of them, and the chunk took what the batch had left (64 - 2), but for the prompt's last piece.
    for b in reading:
        decoding = [c for c in b if c.seq != long_seq]
        assert len(decoding) == 2 and all(len(c.tokens) == 1 and c.logits for c in decoding), b
        chunk = next(c for c in b if c.seq == long_seq)
        assert len(chunk.tokens) == 62 or chunk.logits
    assert results["a"][2].usage.completion_tokens == 60 and results["long"][2].usage.prompt_tokens == len(long_prompt)


def test_a_sequence_at_the_end_of_its_context_ends_alone(backend, steps):
    """Each sequence has its own context: one running into its end stops there; the others go on."""
    n_ctx = backend.info.n_ctx
    assert n_ctx == 512 and backend.info.n_parallel == 4
    big = chat(backend, " ".join(["word"] * 600))[: n_ctx - 20]
    assert len(big) == n_ctx - 20
    short = chat(backend, PROMPTS[0])
    together = run_together(backend, [
        (big, SamplingParams(temperature=0, max_tokens=None, logit_bias=NO_EOS)),
        (short, SamplingParams(temperature=0, max_tokens=100, logit_bias=NO_EOS)),
    ])  # fmt: skip
    (_, ids_big, end_big), (_, ids_short, end_short) = together
    assert end_big.reason == "length" and len(big) + len(ids_big) == n_ctx
    assert end_short.reason == "length" and len(ids_short) == 100
    for batch in steps:
        for c in batch:
            assert c.start + len(c.tokens) <= n_ctx


def test_cancelling_frees_the_slot_before_the_next_step(backend, steps):
    params = SamplingParams(temperature=0, max_tokens=400, logit_bias=NO_EOS)
    cancels = [threading.Event() for _ in range(5)]
    streams = [backend.generate(chat(backend, f"{PROMPTS[i % 4]} {i}"), params, cancels[i]) for i in range(5)]
    seen: dict[int, list] = {i: [] for i in range(5)}

    def drain(i: int) -> None:
        for event in streams[i]:
            seen[i].append(event)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(5)]
    for t in threads[:4]:
        t.start()
    while len(steps) < 20:
        time.sleep(0.001)
    threads[4].start()  # the fifth waits: all four slots are busy
    time.sleep(0.05)
    assert backend.engine.queued == 1 and backend.engine.busy == 4
    cancels[0].set()
    at = len(steps)
    threads[0].join(10)
    threads[4].join(0.5)
    deadline = time.monotonic() + 10
    while not any(len(c.tokens) > 1 for b in steps[at:] for c in b):  # the fifth's prompt
        assert time.monotonic() < deadline, "the queued request never started"
        time.sleep(0.001)
    first_new = next(i for i in range(at, len(steps)) if any(len(c.tokens) > 1 for c in steps[i]))
    assert first_new <= at + 2, "the waiting request started later than the step after the cancel"
    assert isinstance(seen[0][-1], Finish) and seen[0][-1].reason == "cancelled"
    for c in cancels:
        c.set()
    for t in threads:
        t.join(30)
    assert all(isinstance(seen[i][-1], Finish) for i in range(5))
    assert backend.engine.busy == 0


def test_a_returning_conversation_goes_to_the_slot_holding_it(backend, steps):
    """Four conversations taking turns on four slots: each stays in its slot and reuses its whole history.
    (Replies are held to plain letters: the random model's byte tokens would not survive as text.)"""
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias=NO_EOS, grammar="root ::= [a-z ]+")
    conversations = {name: [{"role": "user", "content": f"{name}: {PROMPTS[i]}"}] for i, name in enumerate("abcd")}
    seqs: dict[str, set[int]] = {name: set() for name in conversations}
    history: dict[str, int] = {}
    for turn in range(3):
        for name, messages in conversations.items():
            prompt = backend.chat_tokens(messages)
            at = len(steps)
            text, ids, finish = run_one(backend, prompt, params)
            seqs[name] |= {c.seq for b in steps[at:] for c in b}
            if turn:  # the last turn's prompt and reply, but for the reply's last token (sampled, never fed)
                assert finish.usage.cached_tokens >= history[name], (name, turn)
            history[name] = len(prompt) + len(ids) - 1
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"more {turn}"}]
    assert all(len(s) == 1 for s in seqs.values()) and len(set().union(*seqs.values())) == 4


def test_a_full_queue_refuses_at_once(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=1, n_parallel=1))
    try:
        b.engine.max_queue = 1
        gate = threading.Event()
        b.engine.on_step = lambda batch: gate.wait(10)
        prompt = chat(b, "hi")
        params = SamplingParams(temperature=0, max_tokens=4)
        first, second = b.generate(prompt, params), b.generate(prompt, params)
        got: list = []
        t1 = threading.Thread(target=lambda: got.append(run_list(first)))
        t1.start()
        while b.engine.busy == 0:
            time.sleep(0.001)
        t2 = threading.Thread(target=lambda: got.append(run_list(second)))
        t2.start()
        while b.engine.queued == 0:
            time.sleep(0.001)
        with pytest.raises(QueueFullError):
            next(b.generate(prompt, params))
        gate.set()
        t1.join(10)
        t2.join(10)
        assert [e[-1].reason for e in got] == ["length", "length"]
    finally:
        b.close()


def run_list(stream) -> list:
    return list(stream)


def test_parallel_is_checked(chat_gguf):
    with pytest.raises(YiLocalError, match="batch of at least"):
        load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_parallel=8, n_batch=4))
    with pytest.raises(YiLocalError, match="n_parallel"):
        load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_parallel=0))


def test_context_per_sequence_is_what_info_reports(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=300, n_threads=1, n_parallel=3))
    try:
        # llama.cpp rounds the cache up (to 1024 cells here): each sequence gets its share, at least --ctx
        assert b.info.n_ctx >= 300 and b.info.n_parallel == 3
        assert 3 * b.info.n_ctx <= b._L.llama_n_ctx(b._ctx) < 3 * (b.info.n_ctx + 1)
        assert b.engine.n_ctx == b.info.n_ctx
    finally:
        b.close()


def test_a_step_that_fails_before_the_reply_starts_reaches_its_caller(backend, steps, monkeypatch):
    def broken(seq: int, keep: int) -> int:
        raise YiLocalError("the slot could not be cut back")

    monkeypatch.setattr(backend, "_slot_truncate", broken)
    with pytest.raises(YiLocalError, match="could not be cut back"):
        run_one(backend, chat(backend, "hi"), SamplingParams(max_tokens=2))
    monkeypatch.undo()
    assert run_one(backend, chat(backend, "hi"), SamplingParams(max_tokens=2, logit_bias=NO_EOS))[2].reason == "length"


def test_a_finished_reply_leaves_the_callers_cancel_event_alone(backend, steps):
    """Callers may share one cancel event among requests: a reply that ends, or a reader that stops early,
    must not set it (that would cancel the others)."""
    shared = threading.Event()
    params = SamplingParams(temperature=0, max_tokens=3, logit_bias=NO_EOS)
    assert run_one(backend, chat(backend, "one"), params, shared)[2].reason == "length"
    stream = backend.generate(chat(backend, "two"), SamplingParams(temperature=0, max_tokens=300, logit_bias=NO_EOS),
                              shared)  # fmt: skip
    next(stream)
    stream.close()  # the reader stops early: that request is dropped, nothing else
    assert not shared.is_set()
    assert run_one(backend, chat(backend, "three"), params, shared)[2].reason == "length"
    deadline = time.monotonic() + 5
    while backend.engine.busy:
        assert time.monotonic() < deadline, "the dropped request kept its slot"
        time.sleep(0.001)


def test_a_reader_that_cannot_take_events_stops_only_its_own_request(backend, steps):
    """A sink that raises (a server whose event loop has closed) ends its request; the others and the
    engine go on."""
    def broken(item) -> None:
        raise RuntimeError("Event loop is closed")

    cancel = threading.Event()
    backend.engine.submit(chat(backend, "lost"), SamplingParams(temperature=0, max_tokens=50, logit_bias=NO_EOS),
                          cancel, broken)  # fmt: skip
    _, ids, finish = run_one(backend, chat(backend, "kept"), SamplingParams(temperature=0, max_tokens=20, logit_bias=NO_EOS))
    assert finish.reason == "length" and len(ids) == 20
    deadline = time.monotonic() + 5
    while backend.engine.busy:
        assert time.monotonic() < deadline, "the broken reader's request kept its slot"
        time.sleep(0.001)


def test_queue_bound_counts_only_requests_that_wait(chat_gguf):
    """--queue 0: an idle slot still takes a request; with every slot busy the next is refused at once; a
    waiting request whose caller leaves gives its place back at once."""
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=1, n_parallel=1))
    try:
        gate = threading.Event()
        b.engine.on_step = lambda batch: gate.wait(10)
        b.engine.max_queue = 0
        params = SamplingParams(temperature=0, max_tokens=3)
        first = threading.Thread(target=lambda: list(b.generate(chat(b, "hi"), params)))
        first.start()
        while not b.engine.busy:
            time.sleep(0.001)
        with pytest.raises(QueueFullError):
            next(b.generate(chat(b, "hi"), params))
        b.engine.max_queue = 1
        leaving = threading.Event()
        b.engine.submit(chat(b, "bye"), params, leaving, lambda item: None)
        assert b.engine.queued == 1
        with pytest.raises(QueueFullError):
            next(b.generate(chat(b, "hi"), params))
        leaving.set()  # its caller left: the place is free again
        assert b.engine.queued == 0
        waiting = b.generate(chat(b, "hi"), params)
        got: list = []
        t = threading.Thread(target=lambda: got.extend(waiting))
        t.start()
        gate.set()
        first.join(10)
        t.join(10)
        assert got and got[-1].reason == "length"
    finally:
        b.close()


@pytest.mark.parametrize("n", [0, 512, 600])
def test_the_engine_refuses_prompts_it_cannot_continue(backend, n):
    with pytest.raises(YiLocalError, match="cannot be continued"):
        backend.engine.submit([5] * n, SamplingParams(max_tokens=1), threading.Event(), lambda item: None)


def test_closing_stops_what_runs_and_what_waits(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=1, n_parallel=1))
    params = SamplingParams(temperature=0, max_tokens=200, logit_bias=NO_EOS)
    b.engine.on_step = lambda batch: time.sleep(0.005)
    results: dict[int, list] = {0: [], 1: []}
    threads = [threading.Thread(target=lambda i=i: results[i].extend(b.generate(chat(b, f"hi {i}"), params)))
               for i in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    while not (b.engine.busy and b.engine.queued):
        time.sleep(0.001)
    b.close()
    for t in threads:
        t.join(10)
    assert [results[i][-1].reason for i in range(2)] == ["cancelled", "cancelled"]


def test_a_prompt_chunk_that_fails_to_evaluate_fails_only_its_own_request(backend, steps, monkeypatch):
    """A step whose decode fails (e.g. out of memory on a big prompt chunk) fails that prompt's request;
    the sequences already generating are evaluated again without it and finish."""
    real = backend._decode

    def decode(batch):
        if len(batch) > 1 and len(batch[-1].tokens) > 1:
            raise YiLocalError("out of memory")
        real(batch)

    backend.engine.on_step = lambda batch: (steps.append(batch), time.sleep(0.002))  # 40 steps outlast the test
    params = SamplingParams(temperature=0, max_tokens=40, logit_bias=NO_EOS)
    results: list = []
    running = threading.Thread(target=lambda: results.append(run_one(backend, chat(backend, PROMPTS[0]), params)))
    running.start()
    while not any(len(c.tokens) == 1 for b in steps for c in b):  # it generates
        time.sleep(0.001)
    monkeypatch.setattr(backend, "_decode", decode)
    with pytest.raises(YiLocalError, match="out of memory"):
        run_one(backend, chat(backend, PROMPTS[1]), params)
    running.join(30)
    assert results[0][2].reason == "length" and len(results[0][1]) == 40
