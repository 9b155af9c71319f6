"""Bad input: a clear message that says how to fix it, exit 1, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli
from yi_local.atomic import TEMP_DIR_SUFFIX, TEMP_SUFFIX

TEMP_SUFFIXES = (TEMP_SUFFIX, TEMP_DIR_SUFFIX)


@pytest.fixture
def model(chat_dir, tmp_path):
    """A private copy of the chat checkpoint that a test may damage."""
    return shutil.copytree(chat_dir, tmp_path / "Yi-Tiny-Chat")


def fails_cleanly(proc, *needles: str, out=None) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    if out is not None:
        assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model", "tokenizer_config.json"])
def test_missing_file_is_named(model, tmp_path, name):
    (model / name).unlink()
    out = tmp_path / "out"
    fails_cleanly(run_cli("convert", str(model), "-o", str(out)), f"{name} is missing", out=out)


def test_other_architecture_is_named(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config["architectures"], config["model_type"] = ["Qwen2ForCausalLM"], "qwen2"
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    fails_cleanly(run_cli("convert", str(model), "-o", str(out)), "'Qwen2ForCausalLM'", "not supported", out=out)


def test_truncated_shard_is_detected_before_writing(model, tmp_path):
    shard = model / "model-00002-of-00002.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    out = tmp_path / "out"
    proc = run_cli("convert", str(model), "-o", str(out), "--q", "Q4_K_M")
    fails_cleanly(proc, "is truncated", f"{size - 1000:,} bytes on disk", "download it again", out=out)


def test_corrupt_shard_header(model, tmp_path):
    shard = model / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at "
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    fails_cleanly(run_cli("convert", str(model), "-o", str(out)), "not a readable safetensors file", out=out)


def test_shard_named_by_index_but_missing(model, tmp_path):
    (model / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    proc = run_cli("convert", str(model), "-o", str(out))
    fails_cleanly(proc, "the index names model-00002-of-00002.safetensors but the folder lacks it", out=out)


def test_unknown_quant_lists_valid_ones(model, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", str(model), "-o", str(out), "--q", "Q4_K_X")
    fails_cleanly(proc, "unknown quantization type 'Q4_K_X'", "IQ2_M, Q2_K_S, Q2_K", "Q6_K, Q8_0", out=out)


def test_existing_output_needs_force(model, tmp_path):
    target = tmp_path / "Yi-Tiny-Chat-Q4_0.gguf"
    target.write_bytes(b"precious")
    proc = run_cli("convert", str(model), "-o", str(tmp_path), "--q", "Q4_0")
    fails_cleanly(proc, "already exists", "--force")
    assert target.read_bytes() == b"precious"
    proc = run_cli("convert", str(model), "-o", str(tmp_path), "--q", "Q4_0", "--force")
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes()[:4] == b"GGUF"


def test_full_disk_removes_the_temporary_file(model, tmp_path):
    """A write that fails half-way (here: a 2 MB file size limit) leaves nothing behind."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "out"
    proc = run_cli("convert", str(model), "-o", str(out), "--outtype", "f32", preexec_fn=limit_file_size)
    fails_cleanly(proc, "could not write", "free some space", out=out)


@pytest.mark.parametrize(
    "args, interrupt_when",
    [
        (["--outtype", "q8_0"], "Q8_0.gguf"),  # during the numpy Q8_0 conversion
        (["--q", "Q4_K_M"], "Q4_K_M.gguf"),  # during llama.cpp's quantization (one level: seconds of work)
    ],
)
def test_ctrl_c_mid_write_leaves_nothing(medium_dir, tmp_path, args, interrupt_when):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "yi_local", "convert", str(medium_dir), "-o", str(out), "--threads", "1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and any(interrupt_when in p.name and p.name.endswith(TEMP_SUFFIXES) for p in out.iterdir()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == [], stderr
