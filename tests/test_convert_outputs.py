"""Every quantization level, the base/legacy/.bin variants, naming, and memory that stays flat."""

from __future__ import annotations

import json
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from converters.convert import convert
from tests.conftest import CORPUS, REPO, run_cli
from tests.synthetic import Dims, build_checkpoint
from yi_local.quant_types import QUANT_TYPES

# The type llama.cpp gives ffn_gate (the bulk of the weights) at each level: checks that the
# k-quant really was used, not a silent Q4_0/Q5_0/Q8_0 fallback.
FFN_GATE_TYPE = {
    "Q2_K": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K,
    "Q6_K": T.Q6_K, "Q8_0": T.Q8_0, "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S, "IQ4_XS": T.IQ4_XS, "IQ4_NL": T.IQ4_NL,
}  # fmt: skip
# The levels that need no importance matrix (the others: tests/test_imatrix_quantize.py).
LEVELS = [name for name, q in QUANT_TYPES.items() if not q.needs_imatrix]


@pytest.fixture(scope="module")
def all_levels(chat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("levels")
    result = convert(chat_dir, out=out, quants=[q.lower() for q in LEVELS])
    return out, result


def test_every_level_is_made_from_one_intermediate(all_levels, chat_dir):
    out, result = all_levels
    assert [p.name for p in result.files] == [f"{chat_dir.name}-{q}.gguf" for q in LEVELS]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.files)  # intermediate removed


@pytest.mark.parametrize("level", LEVELS)
def test_level_loads_with_its_file_type_and_tensor_types(all_levels, chat_dir, level):
    out, _ = all_levels
    path = out / f"{chat_dir.name}-{level}.gguf"
    reader = GGUFReader(path)
    assert reader.get_field("general.file_type").contents() == int(QUANT_TYPES[level].ftype)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_gate.weight"] == FFN_GATE_TYPE[level]
    assert types["blk.0.attn_norm.weight"] == T.F32
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 7
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval([6, 300, 301, 302])
    logits = np.array(llm.scores[:4])
    assert np.isfinite(logits).all() and logits.std() > 0


def tensor_bytes(path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(path).tensors}


def test_base_variant_keeps_eos_2_and_no_template(checkpoints, tmp_path):
    path = convert(checkpoints["base"], out=tmp_path, outtype="f16").files[0]
    reader = GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 2
    assert reader.get_field("tokenizer.chat_template") is None
    assert reader.get_field("tokenizer.ggml.eot_token_id") is None


def test_legacy_yi_checkpoint_converts_to_the_same_tensors(checkpoints, tmp_path):
    config = json.loads((checkpoints["legacy"] / "config.json").read_text())
    assert config["architectures"] == ["YiForCausalLM"] and config["model_type"] == "Yi"
    legacy = convert(checkpoints["legacy"], out=tmp_path / "legacy", outtype="bf16").files[0]
    base = convert(checkpoints["base"], out=tmp_path / "base", outtype="bf16").files[0]
    assert tensor_bytes(legacy) == tensor_bytes(base)


def test_chat_eos_fix_also_comes_from_generation_config_alone(checkpoints, tmp_path):
    """A chat model whose tokenizer_config lacks the template: generation_config's eos 7 is enough."""
    import shutil

    model = tmp_path / "Yi-NoTemplate-Chat"
    shutil.copytree(checkpoints["chat"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    result = convert(model, out=tmp_path, outtype="f16")
    reader = GGUFReader(result.files[0])
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 7
    assert "<|im_start|>" in reader.get_field("tokenizer.chat_template").contents()
    assert any("template" in n for n in result.notes)


def test_bin_checkpoint_converts_like_safetensors(checkpoints, tmp_path):
    torch = pytest.importorskip("torch", reason="reading .bin checkpoints needs torch")
    from safetensors.torch import load_file

    model = tmp_path / "Yi-Bin"
    import shutil

    shutil.copytree(checkpoints["base"], model)
    state = {}
    for f in sorted(model.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    (model / "model.safetensors.index.json").unlink()
    torch.save(state, model / "pytorch_model.bin")
    got = convert(model, out=tmp_path / "bin", outtype="bf16").files[0]
    want = convert(checkpoints["base"], out=tmp_path / "st", outtype="bf16").files[0]
    assert tensor_bytes(got) == tensor_bytes(want)

    # Without torch: a clear message with the install hint, exit 1, nothing written.
    out = tmp_path / "no-torch"
    code = (
        "import sys; sys.modules['torch'] = None; from yi_local.cli import main; "
        f"sys.exit(main(['convert', {str(model)!r}, '-o', {str(out)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "pytorch_model*.bin" in proc.stderr and "pip install 'yi-local[torch]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_output_naming(chat_dir, tmp_path):
    one = tmp_path / "custom.gguf"
    assert convert(chat_dir, out=one, quants=["q4_0"]).files == [one]
    both = convert(chat_dir, out=tmp_path / "both", outtype="f16", quants=["Q4_0"]).files
    assert [p.name for p in both] == [f"{chat_dir.name}-F16.gguf", f"{chat_dir.name}-Q4_0.gguf"]
    proc = run_cli("convert", str(chat_dir), "-o", str(tmp_path / "x.gguf"), "--q", "Q4_0", "--q", "Q8_0")
    assert proc.returncode == 1 and "names one file but this conversion makes 2" in proc.stderr


def test_cli_convert_writes_and_reports(chat_dir, tmp_path):
    proc = run_cli("convert", str(chat_dir), "--q", "Q4_K_M", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"{chat_dir.name}-Q4_K_M.gguf"
    assert f"wrote {path}" in proc.stdout
    assert "eos set to <|im_end|> (7)" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


_RSS_SCRIPT = """
import resource, sys
from converters.convert import convert
convert(sys.argv[1], out=sys.argv[2], outtype=sys.argv[3], threads=2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def peak_rss_mb(model, out, outtype) -> int:
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model), str(out), outtype],
                          capture_output=True, text=True, cwd=REPO, check=True)  # fmt: skip
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
def test_memory_does_not_grow_with_model_size(chat_dir, tmp_path):
    """A checkpoint 60x larger (200 MB) converts in about the same peak memory as the tiny one."""
    big = build_checkpoint(tmp_path / "big", CORPUS, variant="base",
                           dims=Dims(hidden=2048, ffn=5632, layers=2, heads=16, kv_heads=4, vocab=1024))  # fmt: skip
    assert sum(f.stat().st_size for f in big.glob("*.safetensors")) > 150e6
    small = peak_rss_mb(chat_dir, tmp_path / "o1", "f16")
    large = peak_rss_mb(big, tmp_path / "o2", "f16")
    assert large - small < 80, f"peak RSS {small} MB for 3 MB of weights, {large} MB for 200 MB"


def test_direct_io_and_buffered_writes_give_identical_files(medium_dir, tmp_path, monkeypatch):
    """The O_DIRECT path (page-aligned blocks, header's partial block rewritten) changes no byte."""
    direct = convert(medium_dir, out=tmp_path / "direct", outtype="f16").files[0]
    monkeypatch.setenv("YI_LOCAL_NO_DIRECT_IO", "1")
    buffered = convert(medium_dir, out=tmp_path / "buffered", outtype="f16").files[0]
    assert direct.stat().st_size > 64 << 20  # several 32 MB staging buffers
    assert direct.read_bytes() == buffered.read_bytes()


def test_200k_variant_keeps_its_context_and_rope_base(tmp_path):
    from dataclasses import replace

    from tests.synthetic import TINY

    dims = replace(TINY, context=262144, rope_theta=1e7, rms_eps=1e-6)  # Yi-9B-200K's settings
    model = build_checkpoint(tmp_path / "Yi-Tiny-200K", CORPUS, variant="base", dims=dims)
    reader = GGUFReader(convert(model, out=tmp_path, outtype="f16").files[0])
    assert reader.get_field("llama.context_length").contents() == 262144
    assert reader.get_field("llama.rope.freq_base").contents() == pytest.approx(1e7)
    assert reader.get_field("llama.attention.layer_norm_rms_epsilon").contents() == pytest.approx(1e-6)
