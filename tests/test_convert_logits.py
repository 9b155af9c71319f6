"""The converted GGUF computes what transformers computes on the original checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

torch = pytest.importorskip("torch", reason="the reference logits come from transformers on torch")

PROMPT = "The Yi models are bilingual. 零一万物的模型能读中文，也能写English！Numbers: 2024."

# max |llama.cpp - transformers| / max |transformers| over every position and vocab entry.
# Measured on the fixture: f32 3.7e-4, f16 5.5e-4, bf16 3.9e-3, q8_0 2.3e-2. F32 is exact up to
# summation order; F16 rounds weights; BF16 keeps a bf16 checkpoint's weights exactly but llama.cpp
# then multiplies in bf16; Q8_0 adds 8-bit blocks.
TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "bf16": 1e-2, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def reference(chat_dir):
    from transformers import AutoModelForCausalLM

    ids = spm.SentencePieceProcessor(model_file=str(chat_dir / "tokenizer.model")).encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return ids, logits


def gguf_logits(path, ids) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_logits_match_transformers(ggufs, reference, outtype):
    ids, ref = reference
    assert len(ids) > 20
    got = gguf_logits(ggufs[outtype], ids)
    assert got.shape == ref.shape
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < TOLERANCE[outtype], f"{outtype}: relative error {rel:.2e}"
    # The last position decides generation: its argmax must agree too for the lossless types.
    if outtype in ("f32", "f16"):
        assert got[-1].argmax() == ref[-1].argmax()


def test_a_wrong_permutation_would_be_caught(chat_dir, reference, tmp_path, monkeypatch):
    """Guard for the guard: the same weights without the Q/K permutation differ far beyond tolerance."""
    import converters.gguf_file
    from converters.convert import convert

    monkeypatch.setattr(converters.gguf_file, "permute_rows", lambda rows, n_heads: rows)
    ids, ref = reference
    got = gguf_logits(convert(chat_dir, out=tmp_path, outtype="f32").files[0], ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() > 10 * TOLERANCE["f32"]
