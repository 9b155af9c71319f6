"""The full-precision backend: a Hugging Face folder on transformers (bf16 on CUDA, fp32 on CPU).

It plugs into the same `Backend` interface and generation loop as llama.cpp. Sampling runs on the
device as a few tensor operations per token. Tokenization uses the model's SentencePiece tokenizer
through transformers' SentencePiece backend: transformers 5's default `LlamaTokenizer` adds a "▁"
prefix that Yi's tokenizer does not. The KV cache is reused across requests: a DynamicCache is cropped
to the common prefix; on CUDA a StaticCache with a compiled decode step (CUDA graphs) keeps decode
off the Python critical path, and is reused when a prompt extends what it holds.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from pathlib import Path

from yi_local.errors import YiLocalError
from yi_local.runtime.backend import Backend, Chunk, ModelInfo
from yi_local.runtime.chat_template import IM_END, YI_CHAT_TEMPLATE
from yi_local.runtime.params import LoadOptions, SamplingParams

INSTALL_HINT = "install it with `pip install 'yi-local[cuda]'` (torch and accelerate)"
# Libraries that load the Yi README's pre-quantized repos, by quant_method.
QUANTIZED_LIBS = {"awq": ("awq", "autoawq"), "gptq": ("gptqmodel", "gptqmodel")}


def _import_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise YiLocalError("the transformers backend needs PyTorch, which is not installed", hint=INSTALL_HINT) from None
    return torch


def _check_folder(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise YiLocalError(f"{folder} is not a Hugging Face model folder (no config.json)",
                           hint="--backend transformers takes a model folder or a hub repo id, not a .gguf")  # fmt: skip
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") == "Yi":
        raise YiLocalError(f"{folder.name} is an early YiForCausalLM snapshot that transformers cannot load as is",
                           hint="use the llama.cpp backend (yi-local converts these snapshots), or a later revision")  # fmt: skip
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method in QUANTIZED_LIBS:
        module, package = QUANTIZED_LIBS[method]
        if importlib.util.find_spec(module) is None:
            raise YiLocalError(f"{folder.name} is {method.upper()}-quantized, which needs {package}",
                               hint=f"install it with `pip install {package}` (it needs a CUDA GPU)")  # fmt: skip
    return config


class TransformersBackend(Backend):
    def __init__(self, folder: str | Path, options: LoadOptions | None = None, device: str | None = None,
                 static_cache: bool | None = None, compile: bool | None = None) -> None:  # fmt: skip
        options = options or LoadOptions()
        folder = Path(folder)
        config = _check_folder(folder)
        torch = self._torch = _import_torch()
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig

        if logging.getLogger().getEffectiveLevel() > logging.INFO:  # quiet unless yi-local runs verbose
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()

        cuda = torch.cuda.is_available() and device != "cpu"
        self.device = torch.device(device or ("cuda" if cuda else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if options.n_parallel > 1:
            raise YiLocalError("the transformers backend decodes one sequence at a time",
                               hint="leave out --parallel, or use the llama.cpp backend (a GGUF) for parallel requests")  # fmt: skip
        self._pieces: dict[int, bytes] = {}
        if options.n_threads and self.device.type == "cpu":
            torch.set_num_threads(options.n_threads)
        if options.on_progress:
            options.on_progress(0.0)
        self.tokenizer = self._load_tokenizer(folder)
        kwargs = {"dtype": self.dtype}
        if self.device.type == "cuda" and torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"  # spread a large model over several GPUs
        self.model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        # transformers 5.24 renamed `past_key_values` to `cache`; older 5.x releases only know the first.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if "device_map" not in kwargs:
            self.model.to(self.device)
        if options.on_progress:
            options.on_progress(1.0)

        template = self.tokenizer.chat_template
        gen_eos = self._generation_eos(folder, GenerationConfig)
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END) if IM_END in self.tokenizer.get_vocab() else None
        if template is None and im_end is not None and im_end in gen_eos:
            template = YI_CHAT_TEMPLATE  # a chat model whose tokenizer_config lacks the template
        self._eog = set(gen_eos) | {self.tokenizer.eos_token_id}
        if template is not None and im_end is not None:
            self._eog.add(im_end)  # chat models end their turn with <|im_end|>
        self._eog.discard(None)
        n_train = int(config.get("max_position_embeddings", 4096))
        n_ctx = options.n_ctx if options.n_ctx > 0 else n_train
        self._static = self.device.type == "cuda" if static_cache is None else static_cache
        self._compile = self._static and self.device.type == "cuda" if compile is None else compile
        self._n_ctx = n_ctx
        self._cache_obj = None
        self._n_cached = 0  # tokens the KV cache holds
        self._logits = None
        self._params = SamplingParams()
        self._decode_one = self._forward_one
        if self._compile:
            self._decode_one = torch.compile(self._forward_one, mode="reduce-overhead", fullgraph=True)
        self.info = ModelInfo(
            name=folder.name, path=str(folder), quantization="BF16" if self.dtype == torch.bfloat16 else "F32",
            n_ctx=n_ctx, n_ctx_train=n_train, n_layers=int(config.get("num_hidden_layers", 0)),
            offload="CUDA" if self.device.type == "cuda" else "CPU", backend="transformers",
            gpu_layers=int(config.get("num_hidden_layers", 0)) if self.device.type == "cuda" else 0,
            chat_template=template, bos_token=self.tokenizer.bos_token or "", eos_token=IM_END if im_end in self._eog
            else (self.tokenizer.eos_token or ""),
            kv_type="bf16" if self.dtype == torch.bfloat16 else "f32", flash_attn="off",
        )  # fmt: skip
        if self._compile:
            self._warm_up()

    # -- loading -----------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(folder: Path):
        if (folder / "tokenizer.model").is_file():
            from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

            return SentencePieceBackend.from_pretrained(folder)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)

    @staticmethod
    def _generation_eos(folder: Path, GenerationConfig) -> set[int]:
        try:
            eos = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:
            return set()
        return {eos} if isinstance(eos, int) else set(eos or [])

    def _warm_up(self) -> None:
        """Compile and capture the decode step at load time, not on the user's first token."""
        prompt = self.tokenize("Hello", add_bos=False) or [0]
        for _ in range(3):
            self._slot_truncate(0, 0)
            self._decode([Chunk(0, prompt, 0, True)])
            for i in range(3):
                self._decode([Chunk(0, [int(self._logits.argmax())], len(prompt) + i, True)])
        self._slot_truncate(0, 0)

    # -- vocabulary --------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        sp = getattr(self.tokenizer, "sp_model", None)
        if special or sp is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = sp.encode(text)  # no special-token parsing in plain text
        if add_bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        sp = getattr(self.tokenizer, "sp_model", None)
        if sp is None or token >= sp.get_piece_size():
            added = self.tokenizer.added_tokens_decoder.get(token)
            if added is not None:
                return added.content.encode() if special or not added.special else b""
            if sp is not None:
                return b""  # padding beyond the SentencePiece vocabulary (config vocab_size is larger)
            text = self.tokenizer.convert_ids_to_tokens(token) or ""
            return text.encode() if special or token not in self.tokenizer.all_special_ids else b""
        if sp.IsControl(token) or sp.IsUnknown(token):
            return sp.IdToPiece(token).encode() if special else b""
        piece = sp.IdToPiece(token)
        if sp.IsByte(token):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    def special_texts(self) -> frozenset[bytes]:
        """Control tokens, as the GGUF converter marks them: special added tokens and SentencePiece controls."""
        texts = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        texts.update(self.tokenizer.all_special_tokens)
        sp = getattr(self.tokenizer, "sp_model", None)
        if sp is not None:
            texts.update(sp.IdToPiece(i) for i in range(sp.get_piece_size()) if sp.IsControl(i))
        return frozenset(t.encode() for t in texts if t)

    # -- evaluation (one sequence: --parallel is refused for this backend) ------------------------
    def _new_cache(self):
        from transformers import DynamicCache, StaticCache

        if self._static:
            return StaticCache(config=self.model.config, max_cache_len=self._n_ctx)
        return DynamicCache(config=self.model.config)

    def _slot_truncate(self, seq: int, keep: int) -> int:
        if self._cache_obj is None or keep == 0 or (self._static and keep < self._n_cached):
            if self._cache_obj is not None and self._static:
                self._cache_obj.reset()  # a static cache only grows: start again
            else:
                self._cache_obj = None
            self._n_cached = 0
            return 0
        if keep < self._n_cached:
            self._cache_obj.crop(keep - self._n_cached)  # a negative count: drop that many from the end
            self._n_cached = keep
        return keep

    def _forward(self, ids: list[int], start: int):
        torch = self._torch
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)
        with torch.no_grad():
            return self._forward_one(input_ids, positions)

    def _forward_one(self, input_ids, positions):
        """The model on `input_ids` at `positions`, logits of the last one; compiled for decode on CUDA."""
        out = self.model(input_ids=input_ids, cache_position=positions, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: self._cache_obj})  # fmt: skip
        return out.logits[0, -1].float()

    def _decode(self, batch: list[Chunk]) -> None:
        (chunk,) = batch  # one sequence
        torch = self._torch
        if self._cache_obj is None:
            self._cache_obj = self._new_cache()
        if self._compile and len(chunk.tokens) == 1:
            input_ids = torch.tensor([chunk.tokens], device=self.device)
            positions = torch.tensor([chunk.start], device=self.device)
            with torch.no_grad():
                self._logits = self._decode_one(input_ids, positions).clone()
        else:
            self._logits = self._forward(chunk.tokens, chunk.start)
        self._n_cached = chunk.start + len(chunk.tokens)

    # -- sampling ----------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def check_sampling(self, params: SamplingParams, parse_grammar: bool = False) -> None:
        if params.grammar:
            raise YiLocalError("grammars need the llama.cpp backend (response_format too)",
                               hint="drop the grammar or use --backend llama.cpp")  # fmt: skip
        super().check_sampling(params)

    def _begin_sampling(self, seq: int, params: SamplingParams, prompt: list[int]) -> None:
        torch = self._torch
        self._params = params
        vocab = self.model.config.vocab_size
        self._bias = None
        if params.logit_bias:
            self._bias = torch.zeros(vocab, device=self.device)
            for token, bias in params.logit_bias.items():
                if 0 <= int(token) < vocab:
                    self._bias[int(token)] = float(bias)
        self._recent = list(prompt[-params.repeat_last_n :]) if params.penalized else []
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(params.seed32 if params.seed is not None else torch.seed() & 0xFFFFFFFF)

    def _sample(self, seq: int, row: int) -> int:
        p = self._params
        logits = self._logits
        if self._bias is not None:
            logits = logits + self._bias
        if self._recent:
            logits = self._penalize(logits, p)
        if p.temperature <= 0:
            token = int(logits.argmax())
        else:
            token = self._sample_filtered(logits, p)
        if p.penalized:
            self._recent = (self._recent + [token])[-p.repeat_last_n :]
        return token

    def _penalize(self, logits, p: SamplingParams):
        """llama.cpp's penalties sampler: repeat (divide or multiply), then frequency and presence."""
        torch = self._torch
        ids, counts = torch.unique(torch.tensor(self._recent, device=self.device), return_counts=True)
        picked = logits[ids]
        picked = torch.where(picked > 0, picked / p.repeat_penalty, picked * p.repeat_penalty)
        picked = picked - counts.to(picked.dtype) * p.frequency_penalty - p.presence_penalty
        logits = logits.clone()
        logits[ids] = picked
        return logits

    def _sample_filtered(self, logits, p: SamplingParams) -> int:
        """top-k, top-p and min-p on the distribution, then temperature (llama.cpp's order)."""
        torch = self._torch
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def close(self) -> None:
        if super().close():
            self._cache_obj = None
