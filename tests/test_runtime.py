"""The llama.cpp backend and the one generation loop, on the tiny converted chat model."""

from __future__ import annotations

import threading
import time

import llama_cpp
import pytest

from converters.convert import convert
from yi_local.errors import YiLocalError
from yi_local.runtime import Finish, LoadOptions, SamplingParams, TextDelta, Timings, load_backend
from yi_local.runtime.backend import ContextOverflowError
from yi_local.runtime.reply import StopMatcher

GREEDY = dict(temperature=0.0)
NO_END = {2: -100.0, 7: -100.0}  # keep the random model talking: <|endoftext|> and <|im_end|> both end a reply


@pytest.fixture(scope="module")
def backend(chat_gguf):
    b = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=2))
    yield b
    b.close()


def collect(events):
    events = list(events)
    assert isinstance(events[-1], Finish) and all(isinstance(e, TextDelta) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), [t for e in events[:-1] for t in e.token_ids], events[-1]


def test_info(backend, chat_gguf):
    info = backend.info
    assert (info.quantization, info.offload, info.backend, info.n_ctx) == ("Q8_0", "CPU", "llama.cpp", 256)
    assert info.eos_token == "<|im_end|>" and info.bos_token == "<|startoftext|>"
    assert "<|im_start|>" in info.chat_template
    assert backend.add_bos is False


def test_greedy_tokens_equal_llama_cpp_python(backend, chat_gguf):
    prompt = backend.tokenize("Hello 你好, Yi")
    _, ids, finish = collect(backend.generate(prompt, SamplingParams(max_tokens=12, **GREEDY)))
    reference = llama_cpp.Llama(str(chat_gguf), n_ctx=256, n_threads=2, verbose=False)
    ref_ids = []
    for tok in reference.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        if tok == reference.token_eos() or len(ref_ids) == 12:
            break
        ref_ids.append(tok)
    assert ids == ref_ids[: len(ids)]
    assert finish.reason in ("length", "stop") and finish.usage.completion_tokens == 12


def test_chat_tokens_render_template_and_match_the_tokenizer(backend):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"}]
    text = backend.render_chat(messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n<|im_start|>assistant\n"
    tokens = backend.chat_tokens(messages)
    assert tokens[0] == 6 and tokens.count(7) == 2 and tokens == backend.tokenize(text, special=True)


def test_logit_bias_forcing_im_end_stops_with_no_text(backend):
    prompt = backend.chat_tokens([{"role": "user", "content": "Hi"}])
    text, ids, finish = collect(backend.generate(prompt, SamplingParams(max_tokens=20, logit_bias={7: 100.0})))
    assert (text, ids, finish.reason, finish.stop_text) == ("", [], "stop", "<|im_end|>")
    assert finish.usage.completion_tokens == 0 and finish.timings.sampled_tokens == 1
    assert finish.timings.generate_tps == 0.0  # one token, from the prompt's evaluation: no generation step


def test_generation_speed_counts_the_steps_after_the_first_token():
    """The first token comes with the prompt: n tokens sampled in `generate_s` are n - 1 steps (llama.cpp's
    count), so a 2-token reply is not reported at twice its speed."""
    assert Timings(10, 1.0, 5, 2.0, 0.5).generate_tps == 2.0
    assert Timings(10, 1.0, 2, 0.25, 0.5).generate_tps == 4.0
    assert Timings(10, 1.0, 1, 0.0, 0.5).generate_tps == 0.0
    assert Timings(0, 0.0, 0, 0.0, 0.0).generate_tps == 0.0


def test_max_tokens_gives_length(backend):
    prompt = backend.tokenize("The model")
    text, ids, finish = collect(backend.generate(prompt, SamplingParams(max_tokens=5, logit_bias=NO_END, **GREEDY)))
    assert finish.reason == "length" and finish.usage.completion_tokens == 5 and len(ids) == 5
    assert finish.usage.prompt_tokens == len(prompt)


def test_stop_string_never_leaks(backend):
    prompt = backend.tokenize("Numbers and words")
    params = SamplingParams(max_tokens=24, logit_bias=NO_END, **GREEDY)
    full, _, _ = collect(backend.generate(prompt, params))
    assert len(full) > 6
    stop = full[3:6]
    params.stop = [stop]
    text, _, finish = collect(backend.generate(prompt, params))
    assert text == full[: full.index(stop)]
    assert finish.reason == "stop" and finish.stop_text == stop


def test_kv_cache_is_reused_across_turns(backend):
    first = backend.chat_tokens([{"role": "user", "content": "first question"}])
    collect(backend.generate(first, SamplingParams(max_tokens=4, **GREEDY)))
    second = backend.chat_tokens(
        [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "x"},
         {"role": "user", "content": "second"}]
    )  # fmt: skip
    _, _, finish = collect(backend.generate(second, SamplingParams(max_tokens=2, **GREEDY)))
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) if first != second[: len(first)] else len(first)
    assert finish.usage.cached_tokens >= common - 1 > 0
    assert finish.timings.evaluated_tokens == len(second) - finish.usage.cached_tokens


def test_reuse_gives_the_same_tokens_as_a_fresh_cache(chat_gguf, backend):
    prompt = backend.tokenize("same prompt twice, 同样的提示")
    params = SamplingParams(max_tokens=8, logit_bias=NO_END, **GREEDY)
    _, warm_ids, warm = collect(backend.generate(prompt, params))
    _, again_ids, again = collect(backend.generate(prompt, params))
    assert again.usage.cached_tokens == len(prompt) - 1
    fresh = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=2))
    _, fresh_ids, _ = collect(fresh.generate(prompt, params))
    assert warm_ids == again_ids == fresh_ids


def test_prompt_longer_than_context_is_refused(backend):
    with pytest.raises(ContextOverflowError) as err:
        list(backend.generate(list(range(20, 320)), SamplingParams()))
    assert err.value.n_prompt == 300 and err.value.n_ctx == 256
    assert "300 tokens" in str(err.value) and "256" in str(err.value)


def test_generation_stops_at_the_context_end(backend):
    prompt = backend.tokenize("x y " * 100)[:250]
    assert len(prompt) > 200
    _, _, finish = collect(backend.generate(prompt, SamplingParams(max_tokens=100, logit_bias=NO_END)))
    assert finish.reason == "length" and finish.usage.completion_tokens == 256 - len(prompt)


def test_cancel_stops_generation(backend):
    """The engine generates ahead of its reader; a cancel stops it at its next step, and the reader still
    gets every token generated until then, then a Finish that counts exactly those."""
    cancel = threading.Event()
    events = []
    backend.engine.on_step = lambda batch: time.sleep(0.002)  # slower than the reader
    try:
        for event in backend.generate(backend.tokenize("go on"), SamplingParams(max_tokens=100, logit_bias=NO_END), cancel):
            events.append(event)
            if len(events) == 3:
                cancel.set()
    finally:
        backend.engine.on_step = None
    finish = events[-1]
    assert finish.reason == "cancelled" and 3 <= finish.usage.completion_tokens <= 5
    assert finish.usage.completion_tokens == sum(len(e.token_ids) for e in events[:-1])


def test_seeded_sampling_is_reproducible(backend):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=42, logit_bias=NO_END)
    prompt = backend.tokenize("Once upon a time")
    assert collect(backend.generate(prompt, params))[1] == collect(backend.generate(prompt, params))[1]


def test_grammar_constrains_output(backend):
    params = SamplingParams(max_tokens=6, grammar='root ::= [0-9]+', temperature=0.8, seed=1)
    text, _, _ = collect(backend.generate(backend.tokenize("Numbers:"), params))
    assert text and text.isdigit()
    with pytest.raises(YiLocalError, match="grammar"):
        list(backend.generate(backend.tokenize("x"), SamplingParams(grammar="root ::= (")))


def test_base_model_has_no_chat(checkpoints, tmp_path):
    path = convert(checkpoints["base"], out=tmp_path, quants=["Q8_0"]).files[0]
    b = load_backend(str(path), LoadOptions(n_ctx=128))
    with pytest.raises(YiLocalError, match="base model") as err:
        b.chat_tokens([{"role": "user", "content": "hi"}])
    assert "--raw" in err.value.hint


@pytest.mark.parametrize(
    "chunks, stops, expected_text, expected_stop",
    [
        (["Hel", "lo <", "|end", "|> more"], ["<|end|>"], "Hello ", "<|end|>"),
        (["a<", "b"], ["<|end|>"], "a<b", None),
        (["abc"], [], "abc", None),
        (["x", "STOP"], ["ST", "STOP"], "x", "ST"),
        (["中文", "停止", "后"], ["停止"], "中文", "停止"),
    ],
)
def test_stop_matcher(chunks, stops, expected_text, expected_stop):
    m = StopMatcher(stops)
    out, hit = "", None
    for c in chunks:
        text, hit = m.push(c)
        out += text
        if hit:
            break
    if hit is None:
        out += m.flush()
    assert (out, hit) == (expected_text, expected_stop)


def test_chat_turns_keep_the_generated_reply_tokens(backend):
    """Turn 2's prompt reuses turn 1's prompt and reply ids from the cache, even where re-tokenizing
    the reply would give other ids, so only the new message is evaluated."""
    backend.reset()
    turn1 = [{"role": "user", "content": "Tell me something, 说点什么"}]
    prompt1 = backend.chat_tokens(turn1)
    assert prompt1 == backend.tokenize(backend.render_chat(turn1), special=True)  # empty cache: canonical
    # Plain letters (a grammar), so the reply's text is valid UTF-8 as a real model's would be.
    params = SamplingParams(max_tokens=12, temperature=0, grammar="root ::= [a-z ]+")
    text, ids, _ = collect(backend.generate(prompt1, params))
    assert len(ids) == 12
    turn2 = turn1 + [{"role": "assistant", "content": text}, {"role": "user", "content": "and more"}]
    prompt2 = backend.chat_tokens(turn2)
    assert prompt2[: len(prompt1) + 11] == prompt1 + ids[:11]  # the reply's own ids (the 12th was never fed)
    assert backend.render_chat(turn2).encode() == b"".join(backend._piece(t) for t in prompt2)
    _, _, finish = collect(backend.generate(prompt2, SamplingParams(max_tokens=1, temperature=0)))
    assert finish.usage.cached_tokens == len(prompt1) + 11
    new_part = backend.tokenize("<|im_end|>\n<|im_start|>user\nand more<|im_end|>\n<|im_start|>assistant\n", special=True)
    assert finish.timings.evaluated_tokens <= len(new_part) + 1


def test_an_unrelated_cache_never_changes_tokenization(backend):
    backend.reset()
    collect(backend.generate(backend.chat_tokens([{"role": "user", "content": "Hello there"}]), SamplingParams(max_tokens=3)))
    other = [{"role": "user", "content": "Hello therapist"}]
    assert backend.chat_tokens(other) == backend.tokenize(backend.render_chat(other), special=True)


def test_same_prompt_after_a_reply_tokenizes_the_same(backend):
    """A cache holding prompt + reply gives the prompt alone back unchanged (no stray reply token)."""
    backend.reset()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello Yi, 你好！"}]
    first = backend.chat_tokens(messages)
    collect(backend.generate(first, SamplingParams(max_tokens=10, temperature=0, logit_bias=NO_END)))
    assert backend.chat_tokens(messages) == first


def test_prompts_can_be_prepared_while_another_request_generates(backend):
    """The server tokenizes new requests while the worker extends the cache. Between appending a token
    and its flag, a reader sees one more cached token than flags: that state must not break it."""
    backend.reset()
    turn1 = [{"role": "user", "content": "Tell me something, 说点什么"}]
    params = SamplingParams(max_tokens=8, temperature=0, grammar="root ::= [a-z ]+")
    text, ids, _ = collect(backend.generate(backend.chat_tokens(turn1), params))
    turn2 = turn1 + [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    expected = backend.chat_tokens(turn2)
    backend.engine.slots[0].cache.append(ids[-1])  # the worker, half-way through recording the next token
    try:
        assert backend.chat_tokens(turn2) == expected
    finally:
        backend.reset()


def test_reuse_never_splits_a_character(backend):
    """A reply that ended in byte-fallback tokens may leave only the first bytes of a character in the
    cache (its last byte was sampled, never fed): the reuse boundary must not fall inside it."""
    backend.reset()
    turn1 = [{"role": "user", "content": "Say 你"}]
    prompt = backend.chat_tokens(turn1)
    collect(backend.generate(prompt, SamplingParams(max_tokens=1)))
    first_bytes = [9 + b for b in "你".encode()[:2]]  # the fixture's byte pieces <0x00>..<0xFF> start at id 9
    assert [backend.token_bytes(t) for t in first_bytes] == [b"\xe4", b"\xbd"]
    slot = backend.engine.slots[0]
    slot.cache, slot.generated = prompt + first_bytes, [False] * len(prompt) + [True, True]
    turn2 = turn1 + [{"role": "assistant", "content": "你"}, {"role": "user", "content": "again"}]
    tokens = backend.chat_tokens(turn2)
    assert b"".join(backend._piece(t) for t in tokens) == backend.render_chat(turn2).encode()
    backend.reset()
