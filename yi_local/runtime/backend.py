"""The backend interface and the one generation loop every backend shares.

A backend supplies the model-specific steps (tokenize, evaluate the prompt reusing the KV cache,
sample a token, feed it back); `Backend.generate` turns them into events: UTF-8 text deltas, stops
at end-of-generation tokens and user stop strings (whose text never reaches the output),
max_tokens, cancellation, usage and timings.
"""

from __future__ import annotations

import bisect
import queue
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

from yi_local.errors import YiLocalError
from yi_local.runtime.chat_template import ChatPrompt, render_chat
from yi_local.runtime.engine import Chunk, Engine
from yi_local.runtime.events import Event
from yi_local.runtime.grammar import check_grammar
from yi_local.runtime.params import ParamError, SamplingParams

__all__ = ["Backend", "Chunk", "ContextOverflowError", "ModelInfo", "utf8"]


_ENGINE_LOCK = threading.Lock()


class ContextOverflowError(YiLocalError):
    def __init__(self, n_prompt: int, n_ctx: int, at_least: bool = False):
        super().__init__(
            f"the prompt is {'at least ' if at_least else ''}{n_prompt} tokens but the context holds {n_ctx}",
            hint="shorten the conversation, or load the model with a larger --ctx",
        )
        self.n_prompt, self.n_ctx = n_prompt, n_ctx


class GrammarDeadEndError(YiLocalError):
    def __init__(self) -> None:
        super().__init__("the grammar admits no token here: no token of the vocabulary can spell what it requires next",
                         hint="check that the grammar's characters exist in the model's vocabulary")  # fmt: skip


def utf8(text: str) -> bytes:
    """`text` as UTF-8; text that cannot be (a lone surrogate such as "\\ud800" in JSON) is the user's error."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise YiLocalError(f"the text contains {text[e.start:e.end].encode('unicode_escape').decode()!r}, which is "
                           "not a Unicode character (a lone surrogate)", hint="send valid Unicode text") from None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    quantization: str  # e.g. Q4_K_M
    n_ctx: int  # the context of each sequence
    n_ctx_train: int
    n_layers: int
    offload: str  # "CPU", "Metal", "CUDA 33/33 layers"
    backend: str  # "llama.cpp", "transformers"
    chat_template: str | None
    bos_token: str
    eos_token: str
    gpu_layers: int = 0  # layers on a GPU (all of them: n_layers)
    n_parallel: int = 1  # sequences decoded together
    kv_type: str = "f16"  # the KV cache's type (keys and values)
    flash_attn: str = "off"  # on or off as llama.cpp settled it (auto where it did not say)
    kv_bytes: int = 0  # the KV cache's size, as llama.cpp reports it (all sequences)
    notes: tuple[str, ...] = ()  # what loading chose that the user should hear (--ctx 0 cut to what fits)

    @property
    def runs_on_cpu(self) -> bool:
        """Some layers run on the CPU (all but a full GPU offload): the model keeps the cores busy."""
        return self.gpu_layers < self.n_layers


class Backend(ABC):
    """A loaded model: tokenization and prompt layout here, the model's own steps in each backend, and
    generation in the `Engine`, which drives those steps for every sequence at once."""

    info: ModelInfo
    _pieces: dict[int, bytes]  # token id -> its text, special tokens spelled out
    _engine: Engine | None = None

    # -- model-specific steps -------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]: ...

    @abstractmethod
    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The token's bytes; with `special`, control tokens are spelled out (b"<|im_end|>")."""

    @abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    @abstractmethod
    def special_texts(self) -> frozenset[bytes]:
        """The text of every special (control) token, e.g. b"<|im_end|>"."""

    @property
    @abstractmethod
    def n_vocab(self) -> int:
        """Token ids are 0..n_vocab-1."""

    # The engine's steps, called from its worker thread only. A slot is a sequence of the model's
    # context (0..n_parallel-1) with KV cells of its own.
    @abstractmethod
    def _slot_truncate(self, seq: int, keep: int) -> int:
        """Drop the slot's cache after its first `keep` tokens; return how many it keeps (0 if it cannot cut)."""

    @abstractmethod
    def _decode(self, batch: list[Chunk]) -> None:
        """Evaluate the chunks together; keep logits for the last token of each chunk that wants them.

        Raise YiLocalError on failure."""

    @abstractmethod
    def _begin_sampling(self, seq: int, params: SamplingParams, prompt: list[int]) -> None: ...

    @abstractmethod
    def _sample(self, seq: int, row: int) -> int:
        """A token for the slot from the logits at batch row `row` of the last `_decode`."""

    def _end_sampling(self, seq: int) -> None:
        """The slot's reply has ended: free its sampler."""

    # Saved KV caches (yi_local.runtime.kv_state); a backend that offers them returns its binding.
    def state_binding(self) -> dict | None:
        """What a saved state of this loaded model depends on (model file, context settings, cache
        type); None when this backend cannot save its KV cache."""
        return None

    def _slot_state_size(self, seq: int) -> int:
        raise NotImplementedError

    def _slot_save(self, seq: int, path, tokens: list[int]) -> bool:
        """Write the slot's state, holding `tokens`, to `path`; False when it could not."""
        raise NotImplementedError

    def _slot_load(self, seq: int, path, n_tokens: int) -> list[int] | None:
        """Load the state at `path` into the (empty) slot; its tokens, or None when it could not."""
        raise NotImplementedError

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            with _ENGINE_LOCK:  # two first callers at once must not get two engines on one context
                if self._engine is None:
                    self._engine = Engine(self, self.info.n_parallel, self.n_batch)
        return self._engine

    @property
    def n_batch(self) -> int:
        """Tokens one step may evaluate."""
        return 512

    def unavailable(self) -> str | None:
        """Why the model cannot answer now; None when it can (/health says so)."""
        return None

    def reset(self) -> None:
        """Empty the KV cache of every slot that is not generating."""
        self.engine.reset()

    def close(self) -> bool:
        """Stop generating; False if the engine's worker is still mid-step (then keep the model's memory)."""
        return self._engine is None or self._engine.close()

    # -- shared --------------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        return False

    def render_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> ChatPrompt:
        return render_chat(self.info, messages, add_generation_prompt)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return self.render_prompt(messages, add_generation_prompt).text

    def chat_tokens(self, messages: Sequence[dict]) -> list[int]:
        """The conversation in the chat template, ready to generate, reusing what the KV cache holds.

        Only the template's own markers become control tokens: message contents are tokenized as
        text, so "<|im_end|>" typed by a user stays the characters it is.
        """
        prompt = self.render_prompt(messages)
        if prompt.contents is None:
            # The template changed the contents, so their places are unknown: accept only when the
            # conversation has exactly the control tokens the template makes with empty contents.
            self._special_ids()
            found = [m.group() for m in self._special_re.finditer(utf8(prompt.text))] if self._special_re else []
            own = [m.group() for m in self._special_re.finditer(utf8(prompt.template_text))] if self._special_re else []
            if found != own:
                raise YiLocalError(
                    "the messages contain text that this model's chat template turns into control tokens "
                    "(like <|im_end|>); it cannot keep them apart from its own markers",
                    hint="remove that text from the messages, or use a model with a standard chat template",
                )
        return self.tokens_reusing_cache(prompt)

    def text_tokens(self, text: str) -> list[int]:
        """Plain text (completions, `run --raw`): control-token text stays text; BOS as the model wants."""
        self.check_prompt_size(len(utf8(text)))
        return self.tokenize(text, special=False, add_bos=self.add_bos)

    # -- prompt layout -------------------------------------------------------------------------
    def _special_ids(self) -> dict[bytes, int]:
        ids = getattr(self, "_special_id_map", None)
        if ids is None:
            ids = {}
            for text in self.special_texts():
                tokens = self.tokenize(text.decode("utf-8", errors="replace"), special=True)
                if len(tokens) == 1:
                    ids[text] = tokens[0]
            self._special_id_map = ids
            self._control_ids = frozenset(ids.values())
            alternatives = sorted(ids, key=len, reverse=True)
            self._special_re = re.compile(b"|".join(re.escape(t) for t in alternatives)) if alternatives else None
        return ids

    def _layout(self, prompt: ChatPrompt) -> tuple[bytes, dict[int, tuple[int, int]]]:
        """The prompt's bytes, and {byte offset: (token id, length)} of the template's control tokens."""
        ids = self._special_ids()
        text, spans = prompt.text, prompt.contents or ()
        chunks: list[bytes] = []
        specials: dict[int, tuple[int, int]] = {}
        length = pos = 0
        for start, end in [*spans, (len(text), len(text))]:
            template = utf8(text[pos:start])
            if self._special_re is not None:
                for m in self._special_re.finditer(template):
                    specials[length + m.start()] = (ids[m.group()], m.end() - m.start())
            content = utf8(text[start:end])
            chunks += [template, content]
            length += len(template) + len(content)
            pos = end
        return b"".join(chunks), specials

    def _tokenize_layout(self, data: bytes, specials: dict[int, tuple[int, int]], start: int, add_bos: bool) -> list[int]:
        out = self.tokenize("", add_bos=True) if add_bos else []
        pos = start
        for at in sorted(p for p in specials if p >= start):
            if at > pos:
                out += self.tokenize(data[pos:at].decode("utf-8"), special=False)
            token, n = specials[at]
            out.append(token)
            pos = at + n
        if pos < len(data):
            out += self.tokenize(data[pos:].decode("utf-8"), special=False)
        return out

    def max_token_bytes(self) -> int:
        """The longest token's text: a prompt of n bytes needs at least n / this many tokens."""
        longest = getattr(self, "_max_token_bytes", None)
        if longest is None:
            longest = self._max_token_bytes = max(
                [len(self.token_bytes(t, special=True)) for t in range(min(self.n_vocab, 1 << 20))] or [1]
            )
        return max(1, longest)

    def check_prompt_size(self, n_bytes: int) -> None:
        """Refuse, without tokenizing, text that cannot fit the context whatever its tokens."""
        if n_bytes < self.info.n_ctx:
            return  # fewer bytes than the context holds tokens: it may fit (and the vocabulary scan waits)
        at_least = -(-n_bytes // self.max_token_bytes())
        if at_least >= self.info.n_ctx:
            raise ContextOverflowError(at_least, self.info.n_ctx, at_least=True)

    def tokens_reusing_cache(self, prompt: ChatPrompt | str) -> list[int]:
        """Tokens for `prompt` that keep what the KV cache already holds.

        A previous reply re-tokenized often differs from the ids that were generated, which would
        end token-level reuse there. So cached tokens are kept as long as they spell a prefix of
        the prompt (control tokens only where the template put them), up to the last point that is
        either a template control token or the end of the model's own generated tokens; the rest is
        tokenized as usual. Control tokens split tokenization into independent pieces, so text from
        a prompt is never tokenized differently than plain tokenization would, and a reply keeps
        the ids the model generated. A plain string is taken as all template (control text parsed).
        With several slots, the slot whose cache keeps the most counts (the engine then gives the
        request that slot).
        """
        data, specials = self._layout(prompt if isinstance(prompt, ChatPrompt) else ChatPrompt(prompt))
        self.check_prompt_size(len(data))
        # Copies: the server prepares prompts while another request may be extending a cache.
        kept, kept_bytes = max((self._kept(cached, generated, data, specials) for cached, generated in self.engine.caches()),
                               key=lambda k: len(k[0]), default=([], 0))  # fmt: skip
        if not kept:
            return self._tokenize_layout(data, specials, 0, add_bos=self.add_bos)
        return kept + self._tokenize_layout(data, specials, kept_bytes, add_bos=False)

    def _kept(self, cached: list[int], generated: list[bool], data: bytes,
              specials: dict[int, tuple[int, int]]) -> tuple[list[int], int]:  # fmt: skip
        """The cached tokens `data` can keep (see tokens_reusing_cache), and the bytes they spell."""
        starts = sorted(specials)
        control = self._control_ids
        cached = cached[: len(generated)]
        keep = kept_bytes = pos = 0
        for i, token in enumerate(cached):
            piece = self._piece(token)
            if not piece:  # an empty piece proves nothing: stop
                break
            here = specials.get(pos)
            if token in control:
                if here is None or here[0] != token:
                    break
            else:
                nxt = bisect.bisect_left(starts, pos)
                if here is not None or not data.startswith(piece, pos):
                    break
                if nxt < len(starts) and starts[nxt] < pos + len(piece):
                    break  # this text token would swallow the start of a template control token
            pos += len(piece)
            if pos < len(data) and data[pos] & 0xC0 == 0x80:
                continue  # inside a UTF-8 character (byte-fallback tokens): no boundary here
            end_of_reply = generated[i] and (i + 1 == len(cached) or not generated[i + 1])
            if end_of_reply or pos == len(data) or pos in specials:
                keep, kept_bytes = i + 1, pos
        return cached[:keep], kept_bytes

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.token_bytes(token, special=True)
        return piece

    def generate(
        self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream the continuation of `prompt`; any number of threads may call this at once (the engine
        decodes up to `info.n_parallel` of them together; the rest wait their turn). Bad input raises
        here, when called, not at the stream's first step; the request starts at the first `next()`,
        and stopping early (closing the iterator) cancels it."""
        self.check_prompt(prompt)
        self.check_sampling(params)
        return self._stream(prompt, params, cancel or threading.Event())

    def _stream(self, prompt: list[int], params: SamplingParams, cancel: threading.Event) -> Iterator[Event]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        request = self.engine.submit(prompt, params, cancel, events.put)
        try:
            while (item := events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.stop.set()  # a reader that stopped early: the engine drops the request (else a no-op)

    def check_prompt(self, prompt: list[int]) -> None:
        """A prompt can be continued: not empty, and with room for at least one token in the context."""
        if not prompt:
            raise YiLocalError("the prompt is empty", hint="give some text to continue")
        if len(prompt) >= self.info.n_ctx:
            raise ContextOverflowError(len(prompt), self.info.n_ctx)

    def check_sampling(self, params: SamplingParams, parse_grammar: bool = False) -> None:
        """Refuse what this model cannot sample: values out of range, unknown token ids, bad grammars.

        `parse_grammar` also has the backend parse the grammar its own way (slower: for requests that
        must be refused before their reply starts)."""
        params.validate()
        for token in params.logit_bias:
            if not 0 <= token < self.n_vocab:
                raise ParamError("logit_bias", f"logit_bias names token {token}, but this model's tokens are "
                                 f"0..{self.n_vocab - 1}")  # fmt: skip
        if params.grammar:
            check_grammar(params.grammar)

    def token_bytes_special(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")
