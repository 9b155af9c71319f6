"""Yi-faithful Hugging Face checkpoints with random weights, for tests, the demo and benchmarks.

A SentencePiece BPE tokenizer with Yi's special ids (0 <unk>, 1 <|startoftext|>, 2 <|endoftext|>,
6 <|im_start|>, 7 <|im_end|>, 8 <|im_sep|>), Yi-34B-Chat's tokenizer_config and chat template,
generation_config, and bf16 safetensors shards with an index. Variants: "chat" (template, eos 7),
"base" (no template, eos 2) and "legacy" (YiForCausalLM, model_type "Yi", ln1/ln2 norm names).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from yi_local.runtime.chat_template import YI_CHAT_TEMPLATE

SPECIAL_PIECES = {
    0: "<unk>",
    1: "<|startoftext|>",
    2: "<|endoftext|>",
    3: "<fim_prefix>",
    4: "<fim_middle>",
    5: "<fim_suffix>",
    6: "<|im_start|>",
    7: "<|im_end|>",
    8: "<|im_sep|>",
}
# The ids Yi's tokenizer_config lists in added_tokens_decoder.
YI_ADDED_TOKEN_IDS = (0, 1, 2, 6, 7, 8)
VARIANTS = ("chat", "base", "legacy")


@dataclass(frozen=True)
class Dims:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # config vocab_size; the tokenizer may be smaller (the rest is padding)
    context: int = 4096
    rope_theta: float = 5e6
    rms_eps: float = 1e-5


# Multiples of 256 so k-quants really are exercised (llama.cpp falls back to Q4_0/Q5_0/Q8_0 otherwise).
TINY = Dims(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=1024)
YI_6B = Dims(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=4, vocab=64000)


def train_tokenizer(
    corpus: Path, out_dir: Path, vocab_size: int = 900, add_dummy_prefix: bool = False, character_coverage: float = 1.0
) -> Path:
    """Train a SentencePiece BPE like Yi's: identity normalization, byte fallback, split digits.

    Characters outside `character_coverage` (the rarest) get no piece: they are spelled in bytes, as in Yi.
    """
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=SPECIAL_PIECES[0],
        bos_piece=SPECIAL_PIECES[1],
        eos_piece=SPECIAL_PIECES[2],
        control_symbols=[SPECIAL_PIECES[i] for i in range(3, 9)],
        num_threads=2,
        minloglevel=2,
    )
    prefix.with_suffix(".vocab").unlink()
    return prefix.with_suffix(".model")


def _config(dims: Dims, variant: str) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": dims.hidden,
        "initializer_range": 0.02,
        "intermediate_size": dims.ffn,
        "max_position_embeddings": dims.context,
        "model_type": "llama",
        "num_attention_heads": dims.heads,
        "num_hidden_layers": dims.layers,
        "num_key_value_heads": dims.kv_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": dims.rms_eps,
        "rope_scaling": None,
        "rope_theta": dims.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": dims.vocab,
    }
    if variant == "legacy":
        config["architectures"] = ["YiForCausalLM"]
        config["model_type"] = "Yi"
        config["auto_map"] = {"AutoConfig": "configuration_yi.YiConfig", "AutoModelForCausalLM": "modeling_yi.YiForCausalLM"}
    return config


def _tokenizer_config(variant: str) -> dict:
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": SPECIAL_PIECES[i], **token} for i in YI_ADDED_TOKEN_IDS},
        "bos_token": SPECIAL_PIECES[1],
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_PIECES[2],
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": SPECIAL_PIECES[0],
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "YiTokenizer" if variant == "legacy" else "LlamaTokenizer",
        "unk_token": SPECIAL_PIECES[0],
        "use_default_system_prompt": False,
    }
    if variant == "chat":
        config["chat_template"] = YI_CHAT_TEMPLATE
    return config


def tensor_shapes(dims: Dims, variant: str = "chat") -> Iterator[tuple[str, tuple[int, ...]]]:
    head_dim = dims.hidden // dims.heads
    norm1, norm2 = ("ln1", "ln2") if variant == "legacy" else ("input_layernorm", "post_attention_layernorm")
    yield "model.embed_tokens.weight", (dims.vocab, dims.hidden)
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        yield p + f"{norm1}.weight", (dims.hidden,)
        yield p + "self_attn.q_proj.weight", (dims.heads * head_dim, dims.hidden)
        yield p + "self_attn.k_proj.weight", (dims.kv_heads * head_dim, dims.hidden)
        yield p + "self_attn.v_proj.weight", (dims.kv_heads * head_dim, dims.hidden)
        yield p + "self_attn.o_proj.weight", (dims.hidden, dims.heads * head_dim)
        yield p + f"{norm2}.weight", (dims.hidden,)
        yield p + "mlp.gate_proj.weight", (dims.ffn, dims.hidden)
        yield p + "mlp.up_proj.weight", (dims.ffn, dims.hidden)
        yield p + "mlp.down_proj.weight", (dims.hidden, dims.ffn)
    yield "model.norm.weight", (dims.hidden,)
    yield "lm_head.weight", (dims.vocab, dims.hidden)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], fast: bool = False) -> np.ndarray:
    """bf16 bits of a plausible weight: norms near 1, matrices ~N(0, 0.02)."""
    n = math.prod(shape)
    if len(shape) == 1:
        values = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
    elif fast:
        # Benchmark-sized tensors: tile a random block instead of drawing billions of normals.
        block = f32_to_bf16(0.02 * rng.standard_normal(1 << 20, dtype=np.float32))
        reps = -(-n // block.size)
        return np.tile(block, reps)[:n].reshape(shape)
    else:
        values = 0.02 * rng.standard_normal(n, dtype=np.float32)
    return f32_to_bf16(values).reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16") -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def fit_vocab(dims: Dims, tokenizer: Path) -> Dims:
    """`dims` with a config vocab at least the tokenizer's piece count (rounded up to a multiple of 128)."""
    import sentencepiece as spm

    n_pieces = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    return replace(dims, vocab=-(-n_pieces // 128) * 128) if dims.vocab < n_pieces else dims


def write_model_files(out_dir: Path, dims: Dims, variant: str) -> None:
    """config.json, tokenizer_config.json (with the chat template for "chat") and generation_config.json."""
    (out_dir / "config.json").write_text(json.dumps(_config(dims, variant), indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(variant), indent=2, ensure_ascii=False))
    generation = {"bos_token_id": 1, "eos_token_id": 7 if variant == "chat" else 2, "pad_token_id": 0}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_shards(
    out_dir: Path,
    shapes: list[tuple[str, tuple[int, ...]]],
    make: Callable[[str, tuple[int, ...]], np.ndarray],
    shards: int = 2,
) -> None:
    """bf16 safetensors shards (tensors made one shard at a time by `make(name, shape)`) and their index."""
    per_shard = -(-len(shapes) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        part = shapes[s * per_shard : (s + 1) * per_shard]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        tensors = {n: make(n, shape) for n, shape in part}
        write_safetensors(out_dir / name, tensors)
        weight_map.update({n: name for n in tensors})
        total += sum(a.nbytes for a in tensors.values())
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_checkpoint(
    out_dir: Path,
    corpus: Path,
    variant: str = "chat",
    dims: Dims = TINY,
    shards: int = 2,
    seed: int = 0,
    tokenizer_vocab: int = 900,
    add_dummy_prefix: bool = False,
    fast_weights: bool = False,
) -> Path:
    """Write a complete HF model folder at `out_dir` and return it."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = fit_vocab(dims, train_tokenizer(corpus, out_dir, tokenizer_vocab, add_dummy_prefix))
    write_model_files(out_dir, dims, variant)
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return random_tensor(rng, name, shape, fast_weights)

    write_shards(out_dir, list(tensor_shapes(dims, variant)), make, shards)
    return out_dir


def build_sparse_checkpoint(out_dir: Path, like: Path, dims: Dims) -> Path:
    """A checkpoint of `dims` whose weights are holes (sparse files): any size, no disk space, all zeros.

    The tokenizer and chat files come from the checkpoint folder `like`; one shard per layer.
    """
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(like / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps(_config(dims, "chat"), indent=2))
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in tensor_shapes(dims):
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(layer, []).append((name, shape))
    for layer, part in groups.items():
        header: dict = {}
        offset = 0
        for name, shape in part:
            size = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        with open(out_dir / f"model-{layer}.safetensors", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
    return out_dir
