"""Yi's SentencePiece tokenizer and special tokens, as llama.cpp's GGUF keys expect them.

On top of what llama.cpp's converter does this:
- writes `add_space_prefix` from the SentencePiece model's own normalizer (Yi has none), so
  llama.cpp tokenizes exactly like sentencepiece;
- makes `<|im_end|>` the eos and end-of-turn token of chat models, so generation stops at the
  end of the assistant's turn with no hand patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

from converters.hf_config import read_json
from yi_local.errors import YiLocalError
from yi_local.gguf_header import first_duplicate_token

# Yi's ChatML facts; the chat template is embedded for chat models whose tokenizer_config lacks one.
from yi_local.runtime.chat_template import IM_END, YI_CHAT_TEMPLATE

MAX_TOKENIZER_BYTES = 256 << 20  # Yi's tokenizer.model is 1 MB, the largest SentencePiece models a few MB



@dataclass
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    special: SpecialVocab
    is_chat: bool
    eot_id: int | None = None
    notes: list[str] = field(default_factory=list)

    def add_to_gguf(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        self.special.add_to_gguf(writer, quiet=True)
        if self.eot_id is not None:
            writer.add_eot_token_id(self.eot_id)


def _load_sentencepiece(path: Path):
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    if path.is_dir():
        raise YiLocalError(f"{path} is a folder, not a file", hint="download tokenizer.model from the model's repository")
    if not path.is_file():
        raise YiLocalError(
            f"tokenizer.model is missing in {path.parent}",
            hint="Yi uses a SentencePiece tokenizer; download tokenizer.model from the model's repository",
        )
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise YiLocalError(f"{path} is {path.stat().st_size:,} bytes, too large for a tokenizer",
                           hint="download tokenizer.model again")  # fmt: skip
    try:
        data = path.read_bytes()
    except OSError as e:
        raise YiLocalError(f"{path} cannot be read: {e.strerror}", hint="check the file's permissions") from None
    proto = sp_model.ModelProto()
    try:
        proto.ParseFromString(data)
        sp = SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
    except Exception as e:  # protobuf and sentencepiece raise assorted types
        raise YiLocalError(f"{path} is not a SentencePiece model ({e})", hint="download tokenizer.model again") from None
    return sp, proto


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    sp, proto = _load_sentencepiece(model_dir / "tokenizer.model")
    tokenizer_config = read_json(model_dir / "tokenizer_config.json")
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise YiLocalError(
            f"tokenizer.model has {n_sp} pieces but config.json's vocab_size is {vocab_size}",
            hint="the tokenizer and the weights come from different models",
        )

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i in range(n_sp):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = TokenType.BYTE
        elif proto.pieces[i].type == proto.pieces[i].USER_DEFINED:
            types[i] = TokenType.USER_DEFINED
        else:
            types[i] = TokenType.NORMAL

    # added_tokens_decoder: Yi's <|im_start|>/<|im_end|>/<|im_sep|> and friends are special -> control.
    for tid, content, is_special in _added_tokens(model_dir / "tokenizer_config.json", tokenizer_config, vocab_size):
        tokens[tid] = content
        if tid >= n_sp:
            scores[tid] = -1000.0
        if types[tid] != TokenType.UNKNOWN:
            types[tid] = TokenType.CONTROL if is_special else TokenType.USER_DEFINED
    twins = first_duplicate_token(tokens)
    if twins is not None:
        i, j, text = twins
        raise YiLocalError(
            f"{model_dir.name}: tokens {i} and {j} are both {text.decode(errors='replace')!r} "
            "(tokenizer.model and tokenizer_config.json's added_tokens_decoder)",
            hint="each token needs its own text: llama.cpp refuses a vocabulary with duplicates; fix "
            "added_tokens_decoder or download the tokenizer files again",
        )

    special = _special_vocab(model_dir, vocab_size)
    if sp.unk_id() >= 0:
        special.special_token_ids.setdefault("unk", sp.unk_id())
    # A Yi chat model: a template in tokenizer_config, or generation_config naming <|im_end|> as eos.
    im_end_id = tokens.index(IM_END.encode()) if IM_END.encode() in tokens else None
    gen_eos = _generation_eos(model_dir)
    is_chat = special.chat_template is not None or (im_end_id is not None and im_end_id in gen_eos)
    vocab = Vocab(
        tokens=tokens,
        scores=scores,
        types=[int(t) for t in types],
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces),
        special=special,
        is_chat=is_chat,
    )
    if is_chat:
        if im_end_id is None:
            raise YiLocalError(
                f"{model_dir.name} has a chat template but no {IM_END} token",
                hint="Yi chat models end their turn with <|im_end|>; check tokenizer_config.json",
            )
        if special.chat_template is None:
            special.chat_template = YI_CHAT_TEMPLATE
            vocab.notes.append("embedded Yi's ChatML chat template (tokenizer_config.json had none)")
        old_eos = special.special_token_ids.get("eos")
        special.special_token_ids["eos"] = im_end_id
        vocab.eot_id = im_end_id
        if old_eos != im_end_id:
            vocab.notes.append(f"eos set to {IM_END} ({im_end_id}) instead of {old_eos}, so chat replies stop")
    return vocab


def _added_tokens(path: Path, tokenizer_config: dict, vocab_size: int) -> list[tuple[int, bytes, bool]]:
    """(id, text, special) of tokenizer_config.json's added_tokens_decoder, every entry checked."""
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    hint = "fix added_tokens_decoder in tokenizer_config.json, or download it again"
    if not isinstance(decoder, dict):
        raise YiLocalError(f"{path}: added_tokens_decoder is not an object of id -> token", hint=hint)
    added: dict[int, tuple[int, bytes, bool]] = {}
    texts: dict[bytes, int] = {}
    for key, entry in decoder.items():
        try:
            tid = int(key)
        except ValueError:
            raise YiLocalError(f"{path}: added token id {key!r} is not a number", hint=hint) from None
        what = f"{path}: added token {tid}"
        if not 0 <= tid < vocab_size:
            raise YiLocalError(f"{what} is outside the vocabulary (0 to {vocab_size - 1}, config.json's vocab_size)",
                               hint=hint)  # fmt: skip
        if tid in added:
            raise YiLocalError(f"{what} is given twice ({key!r})", hint=hint)
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
            raise YiLocalError(f"{what} has no text (a \"content\" string)", hint=hint)
        try:
            text = entry["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise YiLocalError(f"{what}: its text is not valid Unicode", hint=hint) from None
        if text in texts:
            raise YiLocalError(f"{what} has the same text as added token {texts[text]}: {entry['content']!r}", hint=hint)
        texts[text] = tid
        added[tid] = (tid, text, bool(entry.get("special")))
    return list(added.values())


def _special_vocab(model_dir: Path, vocab_size: int) -> SpecialVocab:
    """gguf-py's reading of the special token ids and chat template, with the inputs it trusts checked."""
    config_path, tc_path = model_dir / "config.json", model_dir / "tokenizer_config.json"
    config = read_json(config_path)
    for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        ids = config.get(f"{typ}_token_id")
        for tid in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < vocab_size:
                raise YiLocalError(f"{config_path}: {typ}_token_id is {ids!r}, not a token id below vocab_size "
                                   f"({vocab_size})", hint="fix that field or download config.json again")  # fmt: skip
    template = read_json(tc_path).get("chat_template")
    if isinstance(template, list):  # named templates, as gguf-py writes them
        ok = all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                 for t in template)  # fmt: skip
        texts = [t["template"] for t in template] if ok else []
    else:
        ok, texts = template is None or isinstance(template, str), [template] if template else []
    if not ok:
        raise YiLocalError(f"{tc_path}: chat_template is neither a template nor a list of {{name, template}}",
                           hint="fix chat_template or download the file again")  # fmt: skip
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise YiLocalError(f"{tc_path}: chat_template is not valid Unicode",
                               hint="fix chat_template or download the file again") from None  # fmt: skip
    if (model_dir / "tokenizer.json").exists():
        read_json(model_dir / "tokenizer.json")  # a readable JSON object, or a message saying what it is
    try:
        return SpecialVocab(model_dir, n_vocab=vocab_size)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError, RecursionError) as e:
        raise YiLocalError(f"{model_dir.name}: the tokenizer files could not be read ({e})",
                           hint="download tokenizer_config.json (and tokenizer.json) again") from None  # fmt: skip


def _generation_eos(model_dir: Path) -> set[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return set()
    eos = read_json(path).get("eos_token_id")
    if eos is None:
        return set()
    if isinstance(eos, int) and not isinstance(eos, bool):
        return {eos}
    if isinstance(eos, list):
        return {e for e in eos if isinstance(e, int) and not isinstance(e, bool)}
    raise YiLocalError(f"{path}: eos_token_id is {eos!r}, not a token id or a list of them",
                       hint="fix that field or download generation_config.json again")  # fmt: skip
