"""llama.cpp reading the converted GGUF tokenizes, templates and stops exactly like Yi's own tokenizer.

References: sentencepiece itself for plain text (the tokenizer Yi was trained with), and for text with
special tokens the Hugging Face SentencePiece-backed tokenizer (what Yi's `LlamaTokenizer` config
loaded as before transformers 5). transformers 5's default `LlamaTokenizer` is built on `tokenizers`
and always adds a "▁" prefix, even after special tokens and for a model whose SentencePiece normalizer
has `add_dummy_prefix: false` as Yi's has; it is therefore not the reference.
"""

from __future__ import annotations

import jinja2.sandbox
import llama_cpp
import pytest
import sentencepiece as spm
from gguf import GGUFReader, TokenType

from converters.convert import convert
from tests.conftest import CORPUS
from tests.synthetic import SPECIAL_PIECES, build_checkpoint

PLAIN = [
    "Hello world",
    "你好，世界",
    "Hello 你好 world",
    "混合 mixed 文本 text，一起。",
    " one leading space",
    "   three leading spaces",
    "trailing space ",
    "multiple     spaces   between",
    "a\n\nb",
    "\n\nnewlines first",
    "line1\nline2\r\nline3",
    "tabs\tand\ttabs",
    "123456789",
    "3.14159 and 2.71828, 1,000,000",
    "100元 and $25.50",
    "emoji 😀🎉",
    "🤖",
    "Ünïcödé àccents",
    "日本語のテキスト",
    "한국어 텍스트",
    "Привет мир",
    "def f(x):\n    return x ** 2\n",
    "<not special> but <|im_start|> looks special",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are Yi, a helpful assistant."},
    {"role": "user", "content": "Hi! 你好，请介绍一下你自己。"},
    {"role": "assistant", "content": "Hello, I am Yi.\n我是Yi。"},
    {"role": "user", "content": "  What is 2+2?"},
]


def vocab_model(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def chat_vocab(ggufs):
    return vocab_model(ggufs["q8_0"])


@pytest.fixture(scope="module")
def sp(chat_dir):
    return spm.SentencePieceProcessor(model_file=str(chat_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def hf_tokenizer(chat_dir):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend.from_pretrained(chat_dir)


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_matches_sentencepiece(chat_vocab, sp, text):
    assert chat_vocab.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)


def test_a_tokenizer_with_a_dummy_prefix_also_matches(tmp_path):
    """Llama-style tokenizers add a space prefix; the converter carries that setting over too."""
    model_dir = build_checkpoint(tmp_path / "prefixed", CORPUS, variant="base", add_dummy_prefix=True)
    gguf = convert(model_dir, out=tmp_path, outtype="f16").files[0]
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    vocab = vocab_model(gguf)
    for text in PLAIN:
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text


def test_chat_text_with_special_tokens_matches_hf(chat_vocab, hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = hf_tokenizer.encode(text, add_special_tokens=False)
    assert expected[0] == 6 and 7 in expected  # <|im_start|> ... <|im_end|> as single ids
    assert chat_vocab.tokenize(text.encode(), add_bos=False, special=True) == expected


def test_embedded_template_renders_like_apply_chat_template(ggufs, hf_tokenizer):
    reader = GGUFReader(ggufs["f16"])
    template = reader.get_field("tokenizer.chat_template").contents()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    for add_generation_prompt in (True, False):
        rendered = env.from_string(template).render(messages=MESSAGES, add_generation_prompt=add_generation_prompt)
        expected = hf_tokenizer.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert rendered == expected
    assert rendered.endswith("<|im_start|>user\n  What is 2+2?<|im_end|>\n")


def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def test_chat_metadata(ggufs, chat_dir, sp):
    r = GGUFReader(ggufs["f16"])
    assert field(r, "general.architecture") == "llama"
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert field(r, "tokenizer.ggml.bos_token_id") == 1
    assert field(r, "tokenizer.ggml.eos_token_id") == 7  # <|im_end|>, not config.json's 2
    assert field(r, "tokenizer.ggml.eot_token_id") == 7
    assert field(r, "tokenizer.ggml.unknown_token_id") == 0
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.ggml.add_space_prefix") is False
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    scores = field(r, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == 1024  # config's vocab_size, beyond the 900 pieces
    for i, piece in SPECIAL_PIECES.items():
        assert tokens[i] == piece
    assert types[0] == TokenType.UNKNOWN
    assert all(types[i] == TokenType.CONTROL for i in (1, 2, 6, 7, 8))
    assert types[9] == TokenType.BYTE and tokens[9] == "<0x00>"
    n = sp.vocab_size()
    assert all(t == TokenType.UNUSED for t in types[n:]) and tokens[n] == f"[PAD{n}]"
    assert all(tokens[i] == sp.IdToPiece(i) and scores[i] == pytest.approx(sp.GetScore(i)) for i in range(9, n))
    assert field(r, "llama.context_length") == 4096
    assert field(r, "llama.rope.freq_base") == pytest.approx(5e6)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "general.file_type") == 1  # MOSTLY_F16


def test_generation_stops_at_im_end(chat_gguf):
    """A logit bias forcing <|im_end|> ends the completion: llama.cpp knows it is the end of turn."""
    llm = llama_cpp.Llama(str(chat_gguf), n_ctx=256, n_threads=2, verbose=False)
    out = llm.create_completion(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", max_tokens=16, logit_bias={7: 100.0}, temperature=0
    )
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == ""
    assert out["usage"]["completion_tokens"] <= 1
