"""`yi-local quality`: perplexity and KL divergence against a reference, on the tiny checkpoint's quants.

The text is the tests' corpus (about a thousand tokens): 16 windows of 64 tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.convert import convert
from tests.conftest import CORPUS, run_cli
from tests.synthetic import build_checkpoint
from yi_local.errors import YiLocalError
from yi_local.quality import measure_quality, percentile

CTX = ["--ctx", "64", "--threads", "2"]


@pytest.fixture(scope="module")
def quants(chat_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("quality")
    files = convert(chat_dir, out=out, outtype="f16", quants=["Q2_K", "Q4_K_M", "Q8_0"]).files
    return {f.stem.rsplit("-", 1)[1]: f for f in files}


@pytest.fixture(scope="module")
def report(quants, tmp_path_factory):
    """Every quant and a byte-for-byte copy of the reference, in one run."""
    copy = tmp_path_factory.mktemp("copy") / "copy-of-ref.gguf"
    shutil.copyfile(quants["F16"], copy)
    models = [quants["Q8_0"], quants["Q2_K"], copy, quants["Q4_K_M"], quants["F16"]]
    return measure_quality(models, quants["F16"], text=CORPUS, ctx=64, threads=2)


def by_name(report) -> dict:
    return {r.name: r for r in report.rows}


def test_a_file_against_itself_has_no_divergence(report):
    rows = by_name(report)
    ref, copy = rows["Yi-Tiny-chat-F16.gguf"], rows["copy-of-ref.gguf"]
    assert ref.reference and not copy.reference
    assert copy.kld_mean == 0.0 and copy.kld_p99 == 0.0 and copy.top1 == 1.0
    assert copy.ppl == ref.ppl and copy.ppl_uncertainty == ref.ppl_uncertainty
    assert ref.kld_mean == 0.0 and ref.top1 == 1.0


def test_divergence_grows_as_bits_shrink(report):
    rows = {r.quantization: r for r in report.rows}
    assert rows["Q2_K"].kld_mean > rows["Q4_K_M"].kld_mean > rows["Q8_0"].kld_mean > 0
    assert rows["Q2_K"].kld_p99 > rows["Q4_K_M"].kld_p99 > rows["Q8_0"].kld_p99 > 0
    assert rows["Q8_0"].top1 > rows["Q2_K"].top1


def test_rows_settings_and_the_reference_listed_once(report):
    assert [r.size_bytes for r in report.rows] == sorted(r.size_bytes for r in report.rows)
    assert [r.name for r in report.rows].count("Yi-Tiny-chat-F16.gguf") == 1
    assert len(report.rows) == 5
    # llama-perplexity's windows: whole windows of the text, the last ctx/2 - 1 positions of each scored
    assert report.ctx == 64 and report.chunks >= 2 and report.tokens_scored == report.chunks * 31


def test_percentile_is_llama_perplexitys():
    import numpy as np

    values = np.arange(201, dtype=np.float32)
    assert percentile(values, 0.99) == pytest.approx(198.0)
    assert percentile(np.array([1.0, 2.0], np.float32), 0.5) == 1.5


def test_table_and_json(quants):
    models = [str(quants[q]) for q in ("Q8_0", "Q4_K_M")]
    proc = run_cli("quality", *models, "--ref", str(quants["F16"]), "--text", str(CORPUS), *CTX, "--chunks", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("|")[1].strip() == "file" and "KLD 99%" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:5]] == [
        "Yi-Tiny-chat-Q4_K_M.gguf", "Yi-Tiny-chat-Q8_0.gguf", "Yi-Tiny-chat-F16.gguf (ref)"]  # fmt: skip
    assert "124 tokens scored in 4 windows of 64" in proc.stdout

    proc = run_cli("quality", *models, "--ref", str(quants["F16"]), "--text", str(CORPUS), *CTX, "--chunks", "4",
                   "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {k: data[k] for k in ("text", "ctx", "chunks", "tokens_scored")} == {
        "text": str(CORPUS), "ctx": 64, "chunks": 4, "tokens_scored": 124}  # fmt: skip
    assert [r["quantization"] for r in data["rows"]] == ["Q4_K_M", "Q8_0", "F16"]
    for row in data["rows"]:
        assert {"path", "size_bytes", "ppl", "ppl_uncertainty", "kld_mean", "kld_p99", "top1", "reference"} <= set(row)
    assert data["rows"][-1]["reference"] and data["rows"][-1]["kld_mean"] == 0


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory) -> Path:
    """The same model shape with a tokenizer of another size: token ids mean other things."""
    folder = build_checkpoint(tmp_path_factory.mktemp("other") / "Yi-Other", CORPUS, tokenizer_vocab=700)
    return convert(folder, out=tmp_path_factory.mktemp("other-gguf"), outtype="q8_0").files[0]


def test_a_reference_with_another_vocabulary_is_refused(quants, other_vocab):
    proc = run_cli("quality", str(quants["Q8_0"]), "--ref", str(other_vocab), "--text", str(CORPUS), *CTX)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has another vocabulary than the reference" in proc.stderr and "same model" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ctx", "63"], "even number of tokens"),
        (["--ctx", "32"], "at least 64"),
        (["--text", "/nonexistent/text.txt"], "cannot be read"),
        (["--ctx", "4096"], "two windows of --ctx 4096 need 8,192"),
        (["--chunks", "0"], "at least 1"),
    ],
)
def test_bad_settings_are_clear_errors(quants, args, needle):
    proc = run_cli("quality", str(quants["Q8_0"]), "--ref", str(quants["F16"]), "--threads", "2",
                   *(["--text", str(CORPUS)] if "--text" not in args else []), *args)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_bad_files_are_clear_errors(quants, tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    for model, ref, needle in [(tmp_path / "missing.gguf", quants["F16"], "no such model file"),
                               (not_gguf, quants["F16"], "is not a GGUF file"),
                               (quants["Q8_0"], not_gguf, "is not a GGUF file")]:  # fmt: skip
        with pytest.raises(YiLocalError, match=needle):
            measure_quality([model], ref, text=CORPUS, ctx=64, threads=1)


def test_a_short_text_names_the_largest_context_it_allows(quants, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(CORPUS.read_text()[:800])
    with pytest.raises(YiLocalError) as e:
        measure_quality([quants["Q8_0"]], quants["F16"], text=text, ctx=512, threads=1)
    assert "need 1,024" in e.value.message and "a smaller --ctx (at most" in (e.value.hint or "")


def test_too_little_room_for_the_reference_is_said_before_any_pass(quants, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("yi_local.quality.shutil.disk_usage", lambda _: usage(1 << 20, 1 << 20, 1000))
    with pytest.raises(YiLocalError) as e:
        measure_quality([quants["Q8_0"]], quants["F16"], text=CORPUS, ctx=64, threads=1)
    assert "need" in e.value.message and "1000 B free" in e.value.message and "--chunks" in (e.value.hint or "")

