"""The converter checks everything llama.cpp relies on before it writes anything, naming the field and the file.

Each case damages a copy of the tiny chat checkpoint the way a careless (or hostile) model folder could;
before these checks most of them gave a traceback, a GGUF llama.cpp then refused ("the file may be
damaged; convert it again") or aborted on, or memory growing without bound.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.convert import convert
from tests.conftest import REPO
from tests.llama_load import load_all
from yi_local.errors import YiLocalError

SHARD = "model-00001-of-00002.safetensors"  # holds the embeddings and layer 0


def config(**changes: Any) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        data = json.loads((model / "config.json").read_text())
        data.update(changes)
        (model / "config.json").write_text(json.dumps(data))

    return edit


def added_token(key: str, entry: Any) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        data = json.loads((model / "tokenizer_config.json").read_text())
        data["added_tokens_decoder"][key] = entry
        (model / "tokenizer_config.json").write_text(json.dumps(data))

    return edit


def shard_header(change: Callable[[dict, list[str]], None]) -> Callable[[Path], None]:
    """Rewrite the first shard's JSON header; `change` gets it and its tensor names (sorted)."""

    def edit(model: Path) -> None:
        path = model / SHARD
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        change(header, sorted(k for k in header if k != "__metadata__"))
        raw = json.dumps(header).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])

    return edit


def _set(key: str, value: Any, index: int = 0) -> Callable[[dict, list[str]], None]:
    return lambda header, names: header[names[index]].__setitem__(key, value)


def _overlap(header: dict, names: list[str]) -> None:
    first, second = header[names[0]], header[names[1]]
    second.update(dtype=first["dtype"], shape=first["shape"], data_offsets=list(first["data_offsets"]))


def _header_length(n: int) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        with open(model / SHARD, "r+b") as f:
            f.write(n.to_bytes(8, "little"))

    return edit


def _replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        (model / name).unlink()
        make(model / name)

    return edit


# name -> (how the folder is damaged, what the message must say besides the file's name)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # config.json: wrong types, zero, negative, non-finite, absurd
    "heads a string": (config(num_attention_heads="4"), "config.json", 'num_attention_heads is "4"'),
    "heads a bool": (config(num_attention_heads=True), "config.json", "num_attention_heads is true"),
    "hidden a fraction": (config(hidden_size=256.5), "config.json", "hidden_size is 256.5"),
    "hidden null": (config(hidden_size=None), "config.json", "hidden_size is null"),
    "vocab a list": (config(vocab_size=[1024]), "config.json", "vocab_size is [1024]"),
    "layers zero": (config(num_hidden_layers=0), "config.json", "num_hidden_layers is 0"),
    "ffn negative": (config(intermediate_size=-512), "config.json", "intermediate_size is -512"),
    "context zero": (config(max_position_embeddings=0), "config.json", "max_position_embeddings is 0"),
    "heads do not divide hidden": (config(num_attention_heads=3), "config.json", "num_attention_heads (3) does not divide"),
    "kv heads do not divide heads": (config(num_key_value_heads=3), "config.json", "num_key_value_heads (3) does not divide"),
    "odd head size": (config(hidden_size=250, num_attention_heads=2), "config.json", "odd head size (125)"),
    "eps NaN": (config(rms_norm_eps=math.nan), "config.json", "rms_norm_eps is nan"),
    "eps -1": (config(rms_norm_eps=-1), "config.json", "rms_norm_eps is -1"),
    "eps inf": (config(rms_norm_eps=math.inf), "config.json", "rms_norm_eps is inf"),
    "eps zero in float32": (config(rms_norm_eps=1e-50), "config.json", "rms_norm_eps is 1e-50"),
    "rope NaN": (config(rope_theta=math.nan), "config.json", "rope_theta is nan"),
    "rope -1": (config(rope_theta=-1), "config.json", "rope_theta is -1"),
    "rope beyond float32": (config(rope_theta=1e300), "config.json", "rope_theta is 1e+300"),
    # (vocab_size 10^10 and a million layers: test_absurd_sizes_are_refused_before_memory_grows, in a bounded process)
    "architectures a dict": (config(architectures={"a": 1}), "config.json", "architectures is"),
    "tie_word_embeddings a string": (config(tie_word_embeddings="yes"), "config.json", "tie_word_embeddings is"),
    "bos id negative": (config(bos_token_id=-1), "config.json", "bos_token_id is -1"),
    "eos id past the vocabulary": (config(eos_token_id=10**9), "config.json", "eos_token_id is 1000000000"),
    "a key given twice": (
        lambda m: (m / "config.json").write_text((m / "config.json").read_text()[:-1] + ', "hidden_size": 512}'),
        "config.json", "the key 'hidden_size' is given twice",
    ),
    "config.json a folder": (_replace("config.json", Path.mkdir), "config.json", "is a folder"),
    "config.json a pipe": (_replace("config.json", os.mkfifo), "config.json", "is not a regular file"),  # read hung
    # config.json against the tensors: llama.cpp said "the file may be damaged; convert it again"
    "hidden_size contradicts": (config(hidden_size=512), SHARD, "config.json's vocab_size and hidden_size make it [1024, 512]"),
    "intermediate_size contradicts": (config(intermediate_size=1024), SHARD, "intermediate_size and hidden_size make it"),
    "vocab_size contradicts": (config(vocab_size=2048), SHARD, "model.embed_tokens.weight is [1024, 256]"),
    "kv heads contradict": (config(num_key_value_heads=4), SHARD, "k_proj.weight is [128, 256]"),
    "too few layers": (config(num_hidden_layers=1), "layers.1.", "config.json's num_hidden_layers is 1"),
    "too many layers": (config(num_hidden_layers=3), "the checkpoint lacks tensors", "blk.2.attn_k.weight"),
    # the vocabulary: added tokens
    "added token id negative": (added_token("-1", {"content": "<x>", "special": True}), "tokenizer_config.json",
                                "added token -1 is outside the vocabulary"),
    "added token id past the vocabulary": (added_token("5000", {"content": "<x>"}), "tokenizer_config.json",
                                           "added token 5000 is outside the vocabulary (0 to 1023"),
    "added token id twice": (added_token("07", {"content": "<y>", "special": True}), "tokenizer_config.json",
                             "added token 7 is given twice"),
    "added token text twice": (added_token("950", {"content": "<|im_end|>", "special": True}), "tokenizer_config.json",
                               "added token 950 has the same text as added token 7"),
    "added token text of a piece": (added_token("950", {"content": "<|im_start|>\x00x"}), "Yi-Tiny-Chat",
                                    "tokens 6 and 950 are both '<|im_start|>'"),
    "added token id not a number": (added_token("abc", {"content": "<z>"}), "tokenizer_config.json",
                                    "added token id 'abc' is not a number"),
    "added token without text": (added_token("950", "x"), "tokenizer_config.json", "added token 950 has no text"),
    "chat template a number": (
        lambda m: (m / "tokenizer_config.json").write_text(
            json.dumps({**json.loads((m / "tokenizer_config.json").read_text()), "chat_template": 5})),
        "tokenizer_config.json", "chat_template is neither a template nor a list",
    ),
    "generation eos a fraction": (lambda m: (m / "generation_config.json").write_text('{"eos_token_id": 2.5}'),
                                  "generation_config.json", "eos_token_id is 2.5"),
    "tokenizer.model a folder": (_replace("tokenizer.model", Path.mkdir), "tokenizer.model", "is a folder"),
    # safetensors headers
    "negative offset": (shard_header(_set("data_offsets", [-8, 524288])), SHARD, "has data offsets [-8, 524288]"),
    "end before begin": (shard_header(_set("data_offsets", [524288, 0])), SHARD, "has data offsets [524288, 0]"),
    "overlapping tensors": (shard_header(_overlap), SHARD, "overlap"),
    "offset past the file": (shard_header(_set("data_offsets", [10**9, 10**9 + 524288])), SHARD, "is truncated"),
    "offsets not numbers": (shard_header(_set("data_offsets", ["0", "2"])), SHARD, "not a readable safetensors file"),
    "negative dimension": (shard_header(_set("shape", [-256])), SHARD, "has shape [-256]"),
    "dtype a list": (shard_header(_set("dtype", ["BF16"])), SHARD, "has dtype ['BF16']"),
    "header a list": (lambda m: (m / SHARD).write_bytes((6).to_bytes(8, "little") + b"[1, 2]"), SHARD,
                      "not a readable safetensors file"),
    "absurd header length": (_header_length(1 << 60), SHARD, "its header alone claims 1,152,921,504,606,846,984"),
    "header longer than allowed": (
        lambda m: (_header_length(150_000_000)(m), open(m / SHARD, "r+b").truncate(200_000_000)),
        SHARD, "claims a 150,000,000-byte header (the format allows 100 MB)",
    ),
    "index names a file outside": (
        lambda m: (m / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}'),
        "model.safetensors.index.json", "names '../x.safetensors', which is not a file in",
    ),
}


@pytest.fixture
def model(chat_dir, tmp_path) -> Path:
    return shutil.copytree(chat_dir, tmp_path / "Yi-Tiny-Chat")


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_is_refused_before_writing(case, model, tmp_path):
    damage, where, needle = CASES[case]
    damage(model)
    out = tmp_path / "out"
    with pytest.raises(YiLocalError) as e:
        convert(model, out=out, quants=["Q8_0"])
    assert where in e.value.message and needle in e.value.message, e.value.message
    assert not out.exists() or list(out.iterdir()) == []


ABSURD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from converters.convert import convert
from yi_local.errors import YiLocalError
try:
    convert(sys.argv[1], out=sys.argv[2])
except YiLocalError as e:
    print(e.message)
"""


@pytest.mark.parametrize("field, value", [("vocab_size", 10**10), ("num_hidden_layers", 10**6)])
def test_absurd_sizes_are_refused_before_memory_grows(model, tmp_path, field, value):
    """With 3 GB of address space, the refusal comes first (it used to be a MemoryError, or the OOM killer)."""
    config(**{field: value})(model)
    proc = subprocess.run([sys.executable, "-c", ABSURD, str(model), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{field} is {value:,}" in proc.stdout


# The config fields and values the fuzz draws from: wrong types, edge numbers, and sizes near the real ones.
FUZZ_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
               "architectures", "model_type", "rope_scaling", "torch_dtype", "bos_token_id", "eos_token_id"]  # fmt: skip
FUZZ_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 2, 3, 4, 7, 8, 64, 128, 255, 256, 512, 1024, 4096, 1 << 31, 1 << 63, -1]),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-5, 1e-6, 0.5, 1.0, 5e6, 1e30, 1e39, 256.0, 256.5, -0.0]),
    st.text(max_size=4),
    st.sampled_from(["llama", "Yi", "LlamaForCausalLM", "bfloat16"]),
    st.lists(st.integers(-2, 2000), max_size=3),
    st.dictionaries(st.sampled_from(["type", "rope_type", "factor"]), st.sampled_from(["default", "linear", 2.0]),
                    max_size=2),
)  # fmt: skip


@contextmanager
def bounded_memory(extra: int) -> Iterator[None]:
    """At most `extra` more bytes of address space for this process while the block runs."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_fuzzed_configs_are_refused_or_load(chat_dir, tmp_path):
    """No config.json value gives a traceback, and every GGUF the converter accepts loads in llama.cpp."""
    model = shutil.copytree(chat_dir, tmp_path / "Yi-Tiny-Chat")
    original = json.loads((model / "config.json").read_text())
    written: list[Path] = []

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(FUZZ_FIELDS), FUZZ_VALUES, min_size=1, max_size=3))
    def one(changes: dict) -> None:
        (model / "config.json").write_text(json.dumps({**original, **changes}))
        out = tmp_path / f"out{len(written)}-{abs(hash(json.dumps(changes, sort_keys=True)))}"
        try:
            result = convert(model, out=out, outtype="f16")
        except YiLocalError:
            assert not out.exists() or list(out.iterdir()) == []
            return
        written.extend(result.files)

    with bounded_memory(4 << 30):  # a size check that lets 10^10 through fails here instead of swapping the machine
        one()
    assert written, "no fuzzed config was accepted: the fuzz does not reach llama.cpp"
    assert {path: outcome for path, outcome in load_all(written).items() if outcome != "OK"} == {}
