"""Saved KV caches (yi_local.runtime.kv_state): a resumed conversation continues exactly as an uninterrupted
one, evaluating only what is new; every mismatch (model, settings, conversation) and every damaged
file falls back to evaluating everything, with the reason, and the answer is the one a fresh run gives."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from yi_local.runtime import Finish, LoadOptions, SamplingParams, load_backend
from yi_local.runtime.kv_state import StateTooLarge, StateUnusable, load_state, meta_path, save_state

GREEDY = SamplingParams(temperature=0, max_tokens=12)
TURN_1 = [{"role": "system", "content": "You are Yi. 你好"}, {"role": "user", "content": "Tell me about the sea " * 8}]
NEW_TURN = {"role": "user", "content": "And about the mountains, briefly."}


def options(**kw) -> LoadOptions:
    return LoadOptions(**{"n_ctx": 512, "n_threads": 2, **kw})


def reply(backend, messages) -> tuple[list[int], list[int], Finish]:
    """(prompt tokens, reply token ids, the Finish event) of a greedy reply to `messages`."""
    prompt = backend.chat_tokens(messages)
    ids: list[int] = []
    finish = None
    for event in backend.generate(prompt, GREEDY):
        if isinstance(event, Finish):
            finish = event
        else:
            ids += event.token_ids
    assert finish is not None
    return prompt, ids, finish


def text_of(backend, ids: list[int]) -> str:
    return b"".join(backend.token_bytes(t) for t in ids).decode("utf-8", errors="replace")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def first_turn(model: Path, state: Path, **kw) -> list[dict]:
    """Turn one in a backend, its state saved to `state`; the conversation after it."""
    backend = load_backend(str(model), options(**kw))
    try:
        _, ids, _ = reply(backend, TURN_1)
        conversation = [*TURN_1, {"role": "assistant", "content": text_of(backend, ids)}]
        saved = save_state(backend, state, bound_to="conversation-1")
        assert saved.n_tokens == len(backend.engine.caches()[0][0]) > 0 and saved.size == state.stat().st_size
    finally:
        backend.close()
    return conversation


@pytest.fixture
def model(chat_gguf, tmp_path) -> Path:
    """A copy of the test model, which a test may touch."""
    return Path(shutil.copy(chat_gguf, tmp_path / chat_gguf.name))


def test_a_resumed_conversation_is_the_uninterrupted_one_and_evaluates_only_the_new_turn(model, tmp_path):
    state = tmp_path / "talk.kv"
    # uninterrupted: both turns in one backend
    backend = load_backend(str(model), options())
    _, ids_1, _ = reply(backend, TURN_1)
    conversation = [*TURN_1, {"role": "assistant", "content": text_of(backend, ids_1)}, NEW_TURN]
    prompt_1 = backend.chat_tokens(TURN_1)
    saved = save_state(backend, state, bound_to="c")
    cached_after_turn_1 = backend.engine.caches()[0][0]
    prompt_2, ids_2, finish_2 = reply(backend, conversation)
    backend.close()
    assert ids_2, "the reference reply is empty: the test would prove nothing"

    # resumed: a new backend, the saved state loaded instead of evaluating turn one
    resumed = load_backend(str(model), options())
    loaded = load_state(resumed, state, bound_to="c")
    assert loaded.tokens == cached_after_turn_1 and len(loaded.tokens) == saved.n_tokens
    assert resumed.engine.caches()[0] == (cached_after_turn_1, [i >= len(prompt_1) for i in range(saved.n_tokens)])
    again_2, again_ids, again_finish = reply(resumed, conversation)
    resumed.close()
    assert again_2 == prompt_2 and again_ids == ids_2  # exactly the tokens, greedily
    kept = common_prefix(prompt_2, cached_after_turn_1)
    assert kept >= len(prompt_1)  # all of turn one, and as much of the reply as re-renders the same
    assert again_finish.timings.evaluated_tokens == len(prompt_2) - kept == finish_2.timings.evaluated_tokens
    assert again_finish.usage.cached_tokens == kept

    # without the state everything is evaluated (in one pass: its logits may differ in the last bits)
    fresh = load_backend(str(model), options())
    _, _, fresh_finish = reply(fresh, conversation)
    fresh.close()
    assert fresh_finish.timings.evaluated_tokens == len(prompt_2)


def test_a_prompt_extended_token_by_token_evaluates_exactly_the_extension(model, tmp_path):
    state = tmp_path / "doc.kv"
    backend = load_backend(str(model), options())
    document = backend.text_tokens("A long document about the sea and the mountains. " * 6)
    list(backend.generate(document, SamplingParams(temperature=0, max_tokens=4)))
    save_state(backend, state, keep=len(document))
    question = document + backend.text_tokens(" What is it about?")[1 if backend.add_bos else 0 :]
    backend.close()
    resumed = load_backend(str(model), options())
    assert load_state(resumed, state).tokens == document
    finish = [e for e in resumed.generate(question, GREEDY) if isinstance(e, Finish)][0]
    resumed.close()
    assert finish.timings.evaluated_tokens == len(question) - len(document) and finish.usage.cached_tokens == len(document)


def _other_model(model: Path, ggufs) -> dict:
    return {"load": ggufs["f16"]}


def _touched(model: Path, ggufs) -> dict:
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return {}


def _truncated(state: Path) -> None:
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size - 100)


def _flipped(state: Path) -> None:
    with open(state, "r+b") as f:
        f.seek(state.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


def _meta_edit(change):
    def edit(state: Path) -> None:
        meta = json.loads(meta_path(state).read_text())
        change(meta)
        meta_path(state).write_text(json.dumps(meta))

    return edit


def _lie_about_tokens(meta: dict) -> None:
    """A meta that matches the file's size and checksum but not its token count: llama.cpp's load must fail."""
    meta["n_tokens"] += 1
    meta["generated"][-1][1] += 1


MISMATCHES = {
    "another model file": ({"model_change": _other_model}, None, "the model file is not the one"),
    "the model file touched": ({"model_change": _touched}, None, "the model file is not the one"),
    "another context size": ({"n_ctx": 1024}, None, "the context size differs (512 then, 1024 now)"),
    "another KV type": ({"kv_type": "q8_0"}, None, "the KV cache type differs (f16 then, q8_0 now)"),
    "flash attention off": ({"flash_attn": "off"}, None, "flash attention differs (on then, off now)"),
    "two sequences": ({"n_parallel": 2}, None, "the number of parallel sequences differs (1 then, 2 now)"),
    "another conversation": ({"bound_to": "conversation-2"}, None, "the conversation differs"),
    "a truncated state": ({}, _truncated, "truncated"),
    "a damaged byte": ({}, _flipped, "damaged (its checksum differs)"),
    "no meta": ({}, lambda s: meta_path(s).unlink(), "no meta file"),
    "a meta that is not JSON": ({}, lambda s: meta_path(s).write_bytes(b"\x00{garbage"), "cannot be read"),
    "a meta of another shape": ({}, lambda s: meta_path(s).write_text("[1, 2]"), "cannot be read"),
    "a meta whose flags do not add up": ({}, _meta_edit(lambda m: m.update(generated=[[0, 1]])), "damaged"),
    "a meta whose token count lies": ({}, _meta_edit(_lie_about_tokens), "llama.cpp could not load the state"),
    # allocating for these would take all the memory there is
    "a meta claiming 10**12 tokens": ({}, _meta_edit(lambda m: m.update(n_tokens=10**12, generated=[[0, 10**12]])),
                                      "damaged"),
    "a meta that is a FIFO": ({}, lambda s: (meta_path(s).unlink(), os.mkfifo(meta_path(s))), "cannot be read"),
    "a meta linked to /dev/zero": ({}, lambda s: (meta_path(s).unlink(), meta_path(s).symlink_to("/dev/zero")),
                                   "cannot be read"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_every_mismatch_falls_back_to_evaluating_with_the_reason(case, model, ggufs, tmp_path):
    change, damage, reason = MISMATCHES[case]
    change = dict(change)
    state = tmp_path / "talk.kv"
    conversation = [*first_turn(model, state), NEW_TURN]
    if damage is not None:
        damage(state)
    model_change = change.pop("model_change", None)
    load_path = (model_change(model, ggufs) if model_change else {}).get("load", model)
    bound_to = change.pop("bound_to", "conversation-1")

    backend = load_backend(str(load_path), options(**change))
    with pytest.raises(StateUnusable) as refused:
        load_state(backend, state, bound_to=bound_to)
    assert reason in refused.value.message
    assert backend.engine.caches()[0] == ([], [])  # the slot is as before any prompt
    prompt, ids, finish = reply(backend, conversation)
    backend.close()
    assert finish.timings.evaluated_tokens == len(prompt)  # everything evaluated ...

    fresh = load_backend(str(load_path), options(**change))
    _, fresh_ids, _ = reply(fresh, conversation)
    fresh.close()
    assert ids == fresh_ids  # ... to the answer a run without any state gives


def test_a_state_over_the_cap_is_not_written_and_the_old_one_stays(model, tmp_path):
    state = tmp_path / "talk.kv"
    first_turn(model, state)
    before = (state.read_bytes(), meta_path(state).read_bytes())
    backend = load_backend(str(model), options())
    reply(backend, TURN_1)
    with pytest.raises(StateTooLarge, match=r"more than the 1\.0 KiB allowed"):
        save_state(backend, state, max_bytes=1024)
    backend.close()
    assert (state.read_bytes(), meta_path(state).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model.name, "talk.kv", "talk.kv.meta"])


def test_a_save_that_cannot_write_leaves_nothing(model, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    backend = load_backend(str(model), options())
    reply(backend, TURN_1)
    with pytest.raises(Exception) as failed:
        save_state(backend, blocker / "talk.kv")
    backend.close()
    assert "not a folder" in str(failed.value) or isinstance(failed.value, OSError)
    assert blocker.read_text() == "a file where the folder should be"


def test_nothing_to_save_and_a_generating_slot_are_refused(model, tmp_path):
    backend = load_backend(str(model), options())
    with pytest.raises(StateUnusable, match="nothing to save"):
        save_state(backend, tmp_path / "empty.kv")
    backend.close()
    assert not (tmp_path / "empty.kv").exists()


def test_the_saved_state_is_read_back_and_synced_with_the_model_free_for_other_slots(model, tmp_path, monkeypatch):
    """Only llama.cpp's write holds the engine's step lock: hashing and syncing a state of hundreds of MB
    would stall every other slot's stream."""
    from yi_local import atomic
    from yi_local.runtime import kv_state

    backend = load_backend(str(model), options())
    reply(backend, TURN_1)
    lock = backend.engine._step_lock
    held: dict[str, list[bool]] = {"write": [], "hash": [], "sync": []}
    write, sha256, fsync = backend._slot_save, kv_state._sha256, atomic.os.fsync

    def writing(*args):
        held["write"].append(lock.locked())
        return write(*args)

    def hashing(path):
        held["hash"].append(lock.locked())
        return sha256(path)

    def syncing(fd):
        held["sync"].append(lock.locked())
        return fsync(fd)

    monkeypatch.setattr(backend, "_slot_save", writing)
    monkeypatch.setattr(kv_state, "_sha256", hashing)
    monkeypatch.setattr(atomic.os, "fsync", syncing)
    saved = save_state(backend, tmp_path / "talk.kv")
    backend.close()
    # llama.cpp's write reads the KV cache: that alone holds the lock. (The meta's write syncs too.)
    assert held["write"] == [True] and held["hash"] == [False] and held["sync"] and not any(held["sync"]), held
    assert saved.size == (tmp_path / "talk.kv").stat().st_size > 0


def test_the_model_identity_sees_data_past_the_header(tmp_path):
    """Two files of one size and mtime (`cp -p` of a fine-tune of the same shape) differ in their identity
    when their tensor data differs, not only when their first MiB does."""
    from yi_local.runtime.kv_state import HEAD_BYTES, SAMPLES, model_identity

    size = 64 << 20
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    data = bytearray(os.urandom(size))
    a.write_bytes(bytes(data))
    data[size * (SAMPLES // 2) // (SAMPLES + 1)] ^= 1  # one byte, far past the header
    b.write_bytes(bytes(data))
    st = a.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert size * (SAMPLES // 2) // (SAMPLES + 1) > HEAD_BYTES
    ids = []
    for path in (a, b):
        fd = os.open(path, os.O_RDONLY)
        ids.append(model_identity(fd))
        os.close(fd)
    assert ids[0]["size"] == ids[1]["size"] and ids[0]["mtime_ns"] == ids[1]["mtime_ns"]
    assert ids[0] != ids[1]
