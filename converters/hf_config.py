"""A Hugging Face Yi/Llama `config.json` read into the hyperparameters a GGUF needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yi_local.errors import YiLocalError

# Yi ships as plain Llama; the Nov 2023 snapshots said YiForCausalLM / model_type "Yi".
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "YiForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "Yi")


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
    torch_dtype: str | None
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise YiLocalError(
            f"{path.name} is missing in {path.parent}",
            hint="a Hugging Face model folder needs config.json, tokenizer.model and "
            "tokenizer_config.json beside the weights; download the whole repository",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise YiLocalError(f"{path} is not valid JSON ({e})", hint="download the file again") from None
    if not isinstance(data, dict):
        raise YiLocalError(f"{path} does not hold a JSON object", hint="download the file again")
    return data


def read_model_params(model_dir: Path) -> ModelParams:
    config = read_json(model_dir / "config.json")
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    architecture = architectures[0] if architectures else str(model_type)
    if architecture not in SUPPORTED_ARCHITECTURES and model_type not in SUPPORTED_MODEL_TYPES:
        raise YiLocalError(
            f"{model_dir.name}: architecture {architecture!r} (model_type {model_type!r}) is not supported",
            hint="yi-local converts Llama-architecture models (Yi, Yi-1.5, Yi-Coder: LlamaForCausalLM "
            "or the early YiForCausalLM)",
        )
    try:
        heads = int(config["num_attention_heads"])
        rope_scaling = config.get("rope_scaling")
        if rope_scaling not in (None, {}) and (rope_scaling or {}).get("type", rope_scaling.get("rope_type")) not in (
            None,
            "default",
        ):
            raise YiLocalError(
                f"{model_dir.name}: rope_scaling {rope_scaling} is not supported",
                hint="Yi models use no rope scaling; convert this model with llama.cpp's own script",
            )
        return ModelParams(
            architecture=architecture,
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            context_length=int(config.get("max_position_embeddings", 4096)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise YiLocalError(
            f"{model_dir / 'config.json'} lacks {e.args[0]!r}",
            hint="this does not look like a complete Llama/Yi config; download config.json again",
        ) from None
