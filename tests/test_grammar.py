"""Untrusted GBNF grammars: checked in Python before llama.cpp parses them, and dead ends that cannot abort.

Each hostile grammar here crashed or froze the process before the checks: llama.cpp's recursive
parser overflows its stack on deep nesting, `{5,2}` makes it allocate without bound, and a grammar
that admits no token made its sampler throw a C++ exception through ctypes.
"""

from __future__ import annotations

import time

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from yi_local.errors import YiLocalError
from yi_local.runtime import LoadOptions, SamplingParams, TextDelta, load_backend
from yi_local.runtime.backend import GrammarDeadEndError
from yi_local.runtime.grammar import MAX_DEPTH, GrammarError, check_grammar

VALID = [
    'root ::= "a"',
    'root ::= [a-z]+ ("," [a-z]+)*',
    'root ::= x\nx ::= "b" | "c"',
    'root ::= "a"{2,5} "b"{3} "c"{1,}',
    'root ::= ( "a" \n | "b" )',
    'root ::= [^"\\\\]',
    'root ::= "\\u00e9" [\\u0100-\\u017f]',
    "root ::= <[7]>",
    "root ::= !<[7]>*",
    "root ::= .{0,3}",
    '# comment\nroot ::= "a" # trailing\n\n',
    'root::="a"',
    'root ::= "a" | ',
    'root ::= "a"{ 2 , 3 }',
    'root ::= ("a"\n{2})',
]
INVALID = [
    ('root ::= "a"\n| "b"', "expecting a rule name at line 2"),
    ('root ::= "a" (', "expecting ')'"),
    ('root ::= "a" )', "expecting a newline"),
    ("root ::= undefined", "undefined rule 'undefined'"),
    ('foo ::= "a"', "no `root` rule"),
    ('root ::= * "a"', "expecting an item before '*'"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "2 hex digits"),
    ("root ::= [", "unexpected end of input"),
    ('root ::= "abc', "unexpected end of input"),
]


def _schema_grammars() -> list[str]:
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schemas = [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 200}, "n": {"type": "integer"}},
         "required": ["name"]},
        {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 9},
    ]  # fmt: skip
    return [JSON_GBNF] + [json_schema_to_gbnf(json.dumps(s)) for s in schemas]


@pytest.fixture(scope="module")
def vocab(chat_gguf):
    """llama.cpp's own grammar parser, on the test model's vocabulary."""
    from yi_local.llama_lib import llama_cpp

    L = llama_cpp()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(chat_gguf).encode(), params)
    yield L, L.llama_model_get_vocab(model)
    L.llama_model_free(model)


def llama_accepts(vocab, grammar: str) -> bool:
    L, v = vocab
    sampler = L.llama_sampler_init_grammar(v, grammar.encode(), b"root")
    if sampler:
        L.llama_sampler_free(sampler)
    return bool(sampler)


@pytest.mark.parametrize("grammar", VALID + _schema_grammars(), ids=lambda g: g[:30])
def test_valid_grammars_pass_both_parsers(vocab, grammar):
    check_grammar(grammar)
    assert llama_accepts(vocab, grammar)


@pytest.mark.parametrize(("grammar", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_grammars_fail_both_parsers_with_a_position(vocab, grammar, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        check_grammar(grammar)
    assert not llama_accepts(vocab, grammar)


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ("root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000, f"nested more than {MAX_DEPTH} deep"),  # stack overflow
        ('root ::= "a"{5,2}', "maximum is below its minimum"),  # llama.cpp allocates until it is killed
        ('root ::= "a"{0,5000}', "repetition over 2000"),
        ("root ::= " + " ".join(f"r{i}" for i in range(2100)) + "\n"
         + "\n".join(f'r{i} ::= "a"?' for i in range(2100)), "more than 4096 rules"),  # fmt: skip
        ("root ::= " + '"a" ' * 40_000, "the limit is 100,000"),
        ('root ::= "a\x00"', "NUL"),
        ('root ::= "a"?{2000}', "match nothing"),  # minutes per token in llama.cpp
        ("root ::= " + '"a"? ' * 20, "match nothing"),
        ('root ::= "' + "a" * 50_000 + '"{2000}', "expands to more than"),  # 1.9 GB in llama.cpp
    ],
    ids=["deep", "min-over-max", "long-repetition", "many-rules", "large", "nul", "nullable-repeat", "nullable-run",
         "expansion"],
)
def test_hostile_grammars_are_refused_before_llama_cpp(grammar, message):
    with pytest.raises(GrammarError, match=message):
        check_grammar(grammar)


def test_deep_grammar_through_the_backend_is_an_error_not_a_crash(chat_gguf):
    """In a child process, so that a regression shows as a signal exit instead of killing pytest."""
    code = f"""
from yi_local.runtime import LoadOptions, SamplingParams, load_backend
from yi_local.errors import YiLocalError
b = load_backend({str(chat_gguf)!r}, LoadOptions(n_ctx=256, n_threads=2))
for grammar in ["root ::= " + "(" * 20000 + '"a"' + ")" * 20000, 'root ::= "a"{{5,2}}', 'root ::= a\\na ::= a "x"']:
    try:
        list(b.generate([6, 7], SamplingParams(max_tokens=4, grammar=grammar)))
        print("generated")
    except YiLocalError as e:
        print("refused:", e.message[:100])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused"] * 3, proc.stdout
    assert "nested more than" in lines[0] and "below its minimum" in lines[1] and "llama.cpp refused" in lines[2]


@pytest.fixture(scope="module")
def backend(chat_gguf):
    return load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=2))


def test_a_grammar_with_no_possible_token_ends_with_an_error(backend):
    """No token spells a NUL byte, so after "a" nothing is allowed: llama.cpp's sampler would pick a
    token anyway and its accept would throw through ctypes (process abort)."""
    prompt = backend.tokenize("Hello")
    events = []
    with pytest.raises(GrammarDeadEndError, match="admits no token"):
        for event in backend.generate(prompt, SamplingParams(max_tokens=8, temperature=0, grammar='root ::= "a" "\\x00"')):
            events.append(event)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "a"
    # the backend is still usable
    text = "".join(e.text for e in backend.generate(prompt, SamplingParams(max_tokens=3, temperature=0, grammar='root ::= "ok"'))
                   if isinstance(e, TextDelta))  # fmt: skip
    assert text == "ok"


def test_grammar_constrains_sampled_output_with_penalties(backend):
    """The grammar path samples in Python; penalties must not feed prompt tokens to the grammar."""
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5, repeat_penalty=1.3, presence_penalty=0.5,
                            grammar='root ::= [0-9]{3} "-" [a-z]+', logit_bias={2: -100.0, 7: -100.0})  # fmt: skip
    text = "".join(e.text for e in backend.generate(backend.tokenize("digits"), params) if isinstance(e, TextDelta))
    head, _, tail = text.partition("-")
    assert len(head) == 3 and head.isdigit() and tail and tail.isalpha() and tail.islower(), text


def test_a_grammar_child_that_dies_mid_reply_ends_the_reply(chat_gguf):
    """Killed between tokens (OOM killer, an admin), its replacement would know no grammar: the reply
    must end with an error rather than go on unconstrained."""
    import os
    import signal

    from yi_local.runtime.sandbox import SandboxError

    backend = load_backend(str(chat_gguf), LoadOptions(n_ctx=256, n_threads=2))
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=1, grammar="root ::= [a-z ]+",
                            logit_bias={2: -100.0, 7: -100.0})  # fmt: skip
    backend.engine.on_step = lambda batch: time.sleep(0.01)  # the engine must not finish the reply first
    events = backend.generate(backend.tokenize("hi"), params)
    text = next(events).text
    os.kill(backend._grammar_box("generate-0")._proc.pid, signal.SIGKILL)
    with pytest.raises(SandboxError, match="ended"):
        for event in events:
            text += getattr(event, "text", "")
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz ")
    backend.engine.on_step = None
    text = "".join(e.text for e in backend.generate(backend.tokenize("hi"), params) if isinstance(e, TextDelta))
    assert text and set(text) <= set("abcdefghijklmnopqrstuvwxyz ")  # a new reply gets a new child


def test_the_grammar_child_reads_the_loaded_file_even_if_the_path_changes(chat_gguf, tmp_path):
    import shutil

    path = tmp_path / "model.gguf"
    shutil.copy(chat_gguf, path)
    backend = load_backend(str(path), LoadOptions(n_ctx=256, n_threads=2))
    path.unlink()  # a re-pull or convert --force replaces the file; here it is simply gone
    params = SamplingParams(max_tokens=5, temperature=0, grammar='root ::= "a"{5}')
    assert "".join(e.text for e in backend.generate(backend.tokenize("hi"), params) if isinstance(e, TextDelta)) == "aaaaa"


def test_a_reply_whose_grammar_steps_add_up_is_stopped(backend, monkeypatch):
    """Each step under the 5 s limit, but thousands of them would hold the generation for most of an
    hour: a reply's grammar work has a budget (here made small, with a grammar of slow steps)."""
    from yi_local.runtime import llama_cpp_backend

    monkeypatch.setattr(llama_cpp_backend, "GRAMMAR_REPLY_SECONDS", 0.3)
    k, r = 300, 2000  # alternatives that all stay open, over a wide character class
    char_class = "[" + "".join(chr(0x4E00 + i) for i in range(r)) + "\\x01-\\U0010FFFF]"
    grammar = ("root ::= " + "|".join(f"a{i}" for i in range(k)) + f"\nc ::= {char_class}\n"
               + "".join(f"a{i} ::= c a{i}\n" for i in range(k)))  # fmt: skip
    params = SamplingParams(max_tokens=2000, temperature=0, grammar=grammar, logit_bias={2: -100.0, 7: -100.0})
    with pytest.raises(YiLocalError, match="took more than 0.3 s of work in this reply"):
        list(backend.generate(backend.tokenize("hi"), params))
