"""A llama.cpp vocabulary's side of a backend: tokenizing, token texts, end-of-generation and control tokens.

Shared by the backend that runs the model in this process and the one that runs it in a supervised
child (`supervised.py`), which keeps a vocabulary-only copy of the model here so that tokenizing never
waits on the child.
"""

from __future__ import annotations

import ctypes

from yi_local.llama_lib import tokenize
from yi_local.runtime.backend import utf8


class LlamaVocab:
    """Needs `_L` (llama_cpp), `_vocab` (a llama_vocab pointer), `_n_vocab`, `_add_bos` and `_specials` (None)."""

    _L: object
    _vocab: object
    _n_vocab: int
    _add_bos: bool
    _specials: frozenset[bytes] | None

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        return tokenize(self._vocab, utf8(text), add_bos, special)

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._L.llama_vocab_is_eog(self._vocab, token))

    def special_texts(self) -> frozenset[bytes]:
        if self._specials is None:
            n = self._L.llama_vocab_n_tokens(self._vocab)
            is_control = self._L.llama_vocab_is_control
            self._specials = frozenset(
                self.token_bytes(t, special=True) for t in range(n) if is_control(self._vocab, t)
            ) - {b""}
        return self._specials
