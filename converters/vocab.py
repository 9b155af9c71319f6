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

IM_END = "<|im_end|>"

# Yi-34B-Chat's chat template, embedded for chat models whose tokenizer_config lacks one.
YI_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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

    if not path.is_file():
        raise YiLocalError(
            f"tokenizer.model is missing in {path.parent}",
            hint="Yi uses a SentencePiece tokenizer; download tokenizer.model from the model's repository",
        )
    data = path.read_bytes()
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
    for key, data in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        tid = int(key)
        if tid >= vocab_size:
            continue
        tokens[tid] = data["content"].encode("utf-8")
        if tid >= n_sp:
            scores[tid] = -1000.0
        if types[tid] != TokenType.UNKNOWN:
            types[tid] = TokenType.CONTROL if data.get("special") else TokenType.USER_DEFINED

    special = SpecialVocab(model_dir, n_vocab=vocab_size)
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


def _generation_eos(model_dir: Path) -> set[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return set()
    eos = read_json(path).get("eos_token_id")
    if isinstance(eos, int):
        return {eos}
    return {e for e in eos or [] if isinstance(e, int)}
