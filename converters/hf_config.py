"""A Hugging Face Yi/Llama `config.json` read into the hyperparameters a GGUF needs, every field checked.

A value of the wrong type, zero, negative, non-finite or absurdly large is refused here, naming the
field and the file, before anything is allocated or written: llama.cpp would otherwise load (or abort
on) whatever the converter wrote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yi_local.errors import YiLocalError

# Yi ships as plain Llama; the Nov 2023 snapshots said YiForCausalLM / model_type "Yi".
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "YiForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "Yi")

# Far above any real model (Yi-34B: hidden 7168, 60 layers, 64,000 tokens), low enough that nothing
# sized by them can exhaust memory. 512 layers is llama.cpp's own limit (LLAMA_MAX_LAYERS).
LIMITS = {
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 512,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "vocab_size": 1 << 21,
    "max_position_embeddings": 1 << 24,
}
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_JSON_BYTES = 64 << 20  # config and tokenizer JSON files are kilobytes; a huge one is not a config


@dataclass(frozen=True)
class ModelParams:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a missing, unreadable or malformed file is named with the fix."""
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # a pipe would block the read forever
            raise YiLocalError(f"{path} is not a regular file", hint=f"put the model's {path.name} there")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise YiLocalError(
            f"{path.name} is missing in {path.parent}",
            hint="a Hugging Face model folder needs config.json, tokenizer.model and "
            "tokenizer_config.json beside the weights; download the whole repository",
        ) from None
    except IsADirectoryError:
        raise YiLocalError(f"{path} is a folder, not a file", hint=f"put the model's {path.name} there") from None
    except OSError as e:
        raise YiLocalError(f"{path} cannot be read: {e.strerror}", hint="check the file's permissions") from None
    if len(raw) > MAX_JSON_BYTES:
        raise YiLocalError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB", hint="download the file again")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise YiLocalError(f"{path} is not valid JSON ({e})", hint="download the file again") from None
    except ValueError as e:  # a key given twice
        raise YiLocalError(f"{path}: {e}", hint="download the file again") from None
    if not isinstance(data, dict):
        raise YiLocalError(f"{path} does not hold a JSON object", hint="download the file again")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is refused (json.load would keep the last silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"the key {key!r} is given twice")
        data[key] = value
    return data


class _Fields:
    """Typed reads of config.json's fields, each failure naming the field and the file."""

    def __init__(self, config: dict[str, Any], path: Path):
        self.config, self.path = config, path

    def bad(self, key: str, why: str) -> YiLocalError:
        return YiLocalError(
            f"{self.path}: {key} {why}",
            hint="this is not a valid Llama/Yi config; download config.json again or fix that field",
        )

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key, default)
        if key not in self.config and default is None:
            raise YiLocalError(
                f"{self.path} lacks {key!r}",
                hint="this does not look like a complete Llama/Yi config; download config.json again",
            )
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(key, f"is {json.dumps(value)[:40]}, not a whole number")
        if value <= 0:
            raise self.bad(key, f"is {value}; it must be positive")
        if value > LIMITS[key]:
            raise self.bad(key, f"is {value:,}, more than any model has (at most {LIMITS[key]:,})")
        return value

    def positive_float(self, key: str, default: float, upper: float) -> float:
        value = self.config.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.bad(key, f"is {json.dumps(value)[:40]}, not a number")
        # Written as float32: it must stay finite and positive there.
        if not (math.isfinite(value) and 0 < value < upper and np.float32(value) > 0):
            raise self.bad(key, f"is {value}; it must be a positive number below {upper:g}")
        return float(value)

    def optional(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.config.get(key, default)
        if value is not None and not isinstance(value, kind):
            raise self.bad(key, f"is {json.dumps(value)[:40]}, not a {getattr(kind, '__name__', 'valid value')}")
        return value


def read_model_params(model_dir: Path) -> ModelParams:
    path = model_dir / "config.json"
    config = read_json(path)
    fields = _Fields(config, path)
    architectures = fields.optional("architectures", list) or []
    if not all(isinstance(a, str) for a in architectures):
        raise fields.bad("architectures", "must be a list of names")
    model_type = fields.optional("model_type", str)
    architecture = architectures[0] if architectures else str(model_type)
    if architecture not in SUPPORTED_ARCHITECTURES and model_type not in SUPPORTED_MODEL_TYPES:
        raise YiLocalError(
            f"{model_dir.name}: architecture {architecture!r} (model_type {model_type!r}) is not supported",
            hint="yi-local converts Llama-architecture models (Yi, Yi-1.5, Yi-Coder: LlamaForCausalLM "
            "or the early YiForCausalLM)",
        )
    rope_scaling = fields.optional("rope_scaling", dict)
    if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) not in (None, "default"):
        raise YiLocalError(
            f"{model_dir.name}: rope_scaling {rope_scaling} is not supported",
            hint="Yi models use no rope scaling; convert this model with llama.cpp's own script",
        )
    hidden = fields.positive_int("hidden_size")
    heads = fields.positive_int("num_attention_heads")
    # null (or no field) means one key/value head per attention head, as in transformers.
    kv_heads = heads if config.get("num_key_value_heads") is None else fields.positive_int("num_key_value_heads")
    if hidden % heads:
        raise fields.bad("num_attention_heads", f"({heads}) does not divide hidden_size ({hidden})")
    if (hidden // heads) % 2:
        raise fields.bad("hidden_size", f"/ num_attention_heads gives an odd head size ({hidden // heads}); rotary "
                         "embeddings need an even one")  # fmt: skip
    if heads % kv_heads:
        raise fields.bad("num_key_value_heads", f"({kv_heads}) does not divide num_attention_heads ({heads})")
    return ModelParams(
        architecture=architecture,
        hidden_size=hidden,
        intermediate_size=fields.positive_int("intermediate_size"),
        num_layers=fields.positive_int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        vocab_size=fields.positive_int("vocab_size"),
        context_length=fields.positive_int("max_position_embeddings", 4096),
        rope_theta=fields.positive_float("rope_theta", 10000.0, FLOAT32_MAX),
        rms_norm_eps=fields.positive_float("rms_norm_eps", 1e-6, 1.0),
        tie_word_embeddings=bool(fields.optional("tie_word_embeddings", bool, False)),
    )
