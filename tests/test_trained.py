"""The trained test model (tests/trained.py): really trained, converted faithfully, cached, deterministic."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import sentencepiece as spm

from converters.convert import convert
from tests import trained
from tests.conftest import CORPUS
from tests.synthetic import random_tensor, tensor_shapes, write_shards

pytest.importorskip("torch", reason="the trained model is trained with torch")

WINDOW = 128  # the training sequence length
MAX_TOKENS = 2048


def heldout_ids(model_dir) -> list[int]:
    if not trained.HELDOUT.exists():
        pytest.skip(f"{trained.HELDOUT} is not there")
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return sp.encode(trained.HELDOUT.read_text(encoding="utf-8"))[:MAX_TOKENS]


def gguf_loss(path, ids: list[int]) -> float:
    """Mean next-token NLL (nats) that llama.cpp gives `ids`, in independent windows of WINDOW tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=WINDOW, n_batch=WINDOW, logits_all=True, n_threads=2, verbose=False)
    total, count = 0.0, 0
    for i in range(0, len(ids) - 1, WINDOW):
        window = ids[i : i + WINDOW]
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: len(window) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return total / count


def random_twin(model_dir, out_dir):
    """The same folder (tokenizer, config) with synthetic.py's random weights instead of the trained ones."""
    out_dir.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "config.json"):
        shutil.copy(model_dir / name, out_dir / name)
    dims = replace(trained.DIMS, vocab=json.loads((model_dir / "config.json").read_text())["vocab_size"])
    rng = np.random.default_rng(0)
    write_shards(out_dir, list(tensor_shapes(dims)), lambda n, shape: random_tensor(rng, n, shape))
    return out_dir


@pytest.fixture(scope="module")
def random_dir(trained_dir, tmp_path_factory):
    return random_twin(trained_dir, tmp_path_factory.mktemp("random") / "Yi-Tiny-Random")


@pytest.fixture(scope="module")
def f16_ggufs(trained_dir, random_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained-gguf")
    return {
        name: convert(src, out=out, outtype="f16").files[0]
        for name, src in (("trained", trained_dir), ("random", random_dir))
    }


def test_trained_model_predicts_heldout_text_far_better_than_random_weights(trained_dir, f16_ggufs):
    ids = heldout_ids(trained_dir)
    assert len(ids) > 4 * WINDOW
    got = {name: gguf_loss(path, ids) for name, path in f16_ggufs.items()}
    unigram = trained.unigram_entropy(np.array(ids))  # an oracle that knows heldout's own token frequencies
    assert got["random"] > np.log(1000) - 0.5, got
    assert got["trained"] < got["random"] - 2, got
    assert got["trained"] < unigram - 0.5, (got, unigram)


def test_the_f16_gguf_computes_what_transformers_computes(trained_dir, f16_ggufs):
    """Trained weights and activations are larger than random ones: F16 must still hold them."""
    import torch
    from transformers import LlamaForCausalLM

    ids = heldout_ids(trained_dir)[: 4 * WINDOW]
    model = LlamaForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, WINDOW):
            window = torch.tensor([ids[i : i + WINDOW]])
            logits = model(window).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
    reference = total / (len(ids) - len(range(0, len(ids) - 1, WINDOW)))
    assert abs(gguf_loss(f16_ggufs["trained"], ids) - reference) < 0.02


def test_trained_activations_have_outlier_channels(trained_dir, random_dir):
    """What makes an importance matrix worth having: a few input columns carry far more energy than most.

    Measured at the inputs of down_proj (llama.cpp's ffn_down), where training makes it strongest.
    """
    if not trained.HELDOUT.exists():
        pytest.skip(f"{trained.HELDOUT} is not there")
    text = trained.HELDOUT.read_bytes()
    got = trained.channel_outliers(trained_dir, text)["down_proj"]
    random = trained.channel_outliers(random_dir, text)["down_proj"]
    assert min(got) > 3 * max(random), (got, random)


def test_the_checkpoint_is_cached(trained_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(trained, "build_trained", no_training)
    start = time.monotonic()
    folder = trained.trained_checkpoint()
    assert time.monotonic() - start < 5
    assert (folder / "model.safetensors.index.json").exists()
    assert folder.parent == trained.cache_root()


def test_concurrent_callers_build_once_and_see_a_whole_folder(tmp_path, monkeypatch):
    calls = []

    def slow_build(out_dir, *args, **kwargs):
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(trained, "build_trained", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(trained.trained_checkpoint(CORPUS, cache=tmp_path)))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [results[0].name]

    # A build that fails leaves nothing that looks finished.
    monkeypatch.setattr(trained, "build_trained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trained.trained_checkpoint(CORPUS, cache=tmp_path, recipe=replace(trained.RECIPE, steps=1))
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [results[0].name]


def test_two_builds_are_byte_identical(tmp_path):
    """Fixed seeds, threads and deterministic kernels: the cache key really does name one set of bytes."""
    recipe = replace(trained.RECIPE, steps=2, batch=4, warmup=1)
    a, b = (trained.build_trained(tmp_path / name, CORPUS, recipe) for name in ("a", "b"))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "tokenizer.model" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
