"""Check an untrusted GBNF grammar before llama.cpp sees it.

llama.cpp parses grammars with a recursive-descent parser on the calling thread's stack: a grammar
of 20,000 nested parentheses overflows it and takes the process down, and its sampler throws C++
exceptions that ctypes cannot catch. This module parses the same syntax as llama.cpp
(`llama-grammar.cpp`) in Python, with an explicit nesting limit instead of recursion into the
unknown, and refuses grammars over the size, nesting and rule limits with a message that says where.
A grammar that passes is small and shallow enough for llama.cpp's parser and its stack walks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from yi_local.errors import YiLocalError

MAX_BYTES = 100_000
# llama.cpp's parser and its stack walks use about 0.5 KB of stack per nesting level or chained rule;
# 17,000 levels overflow a thread's 8 MB. These limits stay far below that and above what real
# grammars (JSON schemas with maxLength 1000 nest that deep) need.
MAX_DEPTH = 1_000  # nested parentheses
MAX_RULES = 4_096  # named rules plus the ones groups and repetitions create
MAX_REPETITION = 2_000  # llama.cpp's MAX_REPETITION_THRESHOLD
# llama.cpp copies what a repetition repeats: "x"{2000} over a 50 KB literal took 1.9 GB. Elements of
# the expanded grammar stay below this.
MAX_ELEMENTS = 1_000_000
# Items in a row that can each match nothing (`"a"?{2000}`, or `x? x? x? ...`) multiply llama.cpp's
# parse stacks: each token then takes seconds to minutes. A few in a row are harmless.
MAX_NULLABLE_REPEAT = 16

_ESCAPES = {"x": 2, "u": 4, "U": 8}
_SIMPLE_ESCAPES = set('trn\\"[]-')


class GrammarError(YiLocalError):
    pass


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


@dataclass
class GrammarInfo:
    rules: set[str]
    n_rules: int  # named and synthesized, as llama.cpp will count them
    depth: int
    elements: int  # of the grammar with its repetitions expanded, as llama.cpp builds it


@dataclass
class _Item:
    """One item of a sequence: a literal, class, token, rule reference or group, maybe repeated."""

    pos: int
    size: int = 1  # elements it adds (a literal's characters)
    ref: str | None = None
    group: list[list[_Item]] | None = None  # alternatives of sequences
    low: int = 1
    high: int | None = 1  # None: unbounded

    @property
    def copies(self) -> int:
        return max(self.low, 1) + (1 if self.high is None else self.high - self.low)


class _Parser:
    def __init__(self, src: str):
        self.src = src
        self.pos = 0
        self.defined: set[str] = set()
        self.referenced: dict[str, int] = {}  # name -> position of first use
        self.n_rules = 0
        self.max_depth = 0
        self.bodies: dict[str, list[list[_Item]]] = {}

    # -- errors and positions ----------------------------------------------------------------
    def fail(self, what: str, pos: int | None = None, refused: bool = False) -> GrammarError:
        pos = self.pos if pos is None else pos
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        verdict = "is refused" if refused else "does not parse"
        return GrammarError(f"the grammar {verdict}: {what} at line {line}, column {col}",
                            hint="check its GBNF syntax (llama.cpp's grammar format); the start rule is `root`")  # fmt: skip

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.src[i] if i < len(self.src) else ""

    def space(self, newline_ok: bool) -> None:
        src, n = self.src, len(self.src)
        while self.pos < n:
            c = src[self.pos]
            if c == "#":
                while self.pos < n and src[self.pos] not in "\r\n":
                    self.pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                self.pos += 1
            else:
                break

    def name(self) -> str:
        start = self.pos
        while _is_word(self.peek()):
            self.pos += 1
        if self.pos == start:
            raise self.fail("expecting a rule name")
        return self.src[start : self.pos]

    def integer(self) -> int:
        start = self.pos
        while self.peek().isascii() and self.peek().isdigit():
            self.pos += 1
        if self.pos == start:
            raise self.fail("expecting an integer")
        return int(self.src[start : self.pos])

    def char(self) -> None:
        c = self.peek()
        if not c:
            raise self.fail("unexpected end of input")
        if c != "\\":
            self.pos += 1
            return
        e = self.peek(1)
        if e in _ESCAPES:
            digits = self.src[self.pos + 2 : self.pos + 2 + _ESCAPES[e]]
            if len(digits) != _ESCAPES[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"expecting {_ESCAPES[e]} hex digits after \\{e}")
            self.pos += 2 + _ESCAPES[e]
        elif e in _SIMPLE_ESCAPES:
            self.pos += 2
        else:
            raise self.fail(f"unknown escape \\{e}")

    # -- the grammar ---------------------------------------------------------------------------
    def parse(self) -> GrammarInfo:
        self.space(True)
        while self.pos < len(self.src):
            self.rule()
        if "root" not in self.defined:
            raise GrammarError("the grammar has no `root` rule", hint="GBNF grammars start at `root ::= ...`")
        for name, pos in self.referenced.items():
            if name not in self.defined:
                raise self.fail(f"undefined rule {name!r}", pos)
        return GrammarInfo(self.defined, self.n_rules, self.max_depth, self.check_cost())

    def check_cost(self) -> int:
        """Refuse what would make llama.cpp allocate or compute without bound; return the element count."""
        nullable_rules: set[str] = set()
        changed = True
        while changed:  # which named rules can match nothing (a fixpoint over the references)
            changed = False
            for name, body in self.bodies.items():
                if name not in nullable_rules and _nullable(body, nullable_rules):
                    nullable_rules.add(name)
                    changed = True
        elements = 0
        todo = list(self.bodies.values())
        while todo:
            for sequence in todo.pop():
                run = 0  # consecutive items that may match nothing
                for item in sequence:
                    elements += item.size * item.copies
                    if item.group is not None:
                        todo.append(item.group)
                    if not _item_nullable(item, nullable_rules):
                        run = 0
                        continue
                    inner = _item_nullable(item, nullable_rules, ignore_own=True)
                    run += (MAX_NULLABLE_REPEAT + 1 if item.high is None else item.copies) if inner else 1
                    if run > MAX_NULLABLE_REPEAT:
                        raise self.fail(f"more than {MAX_NULLABLE_REPEAT} items in a row that can each match nothing "
                                        '(like "a"?{100}), which llama.cpp would take minutes per token to follow',
                                        item.pos, refused=True)  # fmt: skip
            if elements > MAX_ELEMENTS:
                raise GrammarError(f"the grammar expands to more than {MAX_ELEMENTS:,} elements",
                                   hint="repeat smaller items, or fewer times")  # fmt: skip
        return elements

    def rule(self) -> None:
        name = self.name()
        self.space(False)
        if self.src[self.pos : self.pos + 3] != "::=":
            raise self.fail("expecting ::=")
        self.pos += 3
        self.space(True)
        if name not in self.defined:
            self.new_rule()
        self.defined.add(name)
        self.bodies[name] = self.alternates()
        c = self.peek()
        if c == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif c == "\n":
            self.pos += 1
        elif c:
            raise self.fail(f"expecting a newline or the end, found {c!r}")
        self.space(True)

    def new_rule(self, count: int = 1) -> None:
        self.n_rules += count
        if self.n_rules > MAX_RULES:
            raise GrammarError(f"the grammar makes more than {MAX_RULES} rules",
                               hint="simplify it: fewer rules, groups and bounded repetitions")  # fmt: skip

    def alternates(self) -> list[list[_Item]]:
        """A rule's body: alternatives of sequences, with groups kept on a stack, not by recursion."""
        stack: list[list[list[_Item]]] = [[[]]]  # the bodies of the enclosing groups
        while True:
            body = stack[-1]
            sequence = body[-1]
            c = self.peek()
            start = self.pos
            if c == '"':
                self.pos += 1
                size = 0
                while self.peek() != '"':
                    self.char()
                    size += 1
                self.pos += 1
                sequence.append(_Item(start, size=size))
            elif c == "[":
                self.pos += 1
                if self.peek() == "^":
                    self.pos += 1
                size = 0
                while self.peek() != "]":
                    self.char()
                    size += 1
                    if self.peek() == "-" and self.peek(1) != "]":
                        if not self.peek(1):
                            raise self.fail("unexpected end of input")
                        self.pos += 1
                        self.char()
                self.pos += 1
                sequence.append(_Item(start, size=max(size, 1)))
            elif c in ("<", "!"):
                self.token()
                sequence.append(_Item(start))
            elif c and _is_word(c):
                name = self.name()
                self.referenced.setdefault(name, start)
                sequence.append(_Item(start, ref=name))
            elif c == "(":
                if len(stack) > MAX_DEPTH:
                    raise self.fail(f"parentheses nested more than {MAX_DEPTH} deep")
                self.new_rule()
                group: list[list[_Item]] = [[]]
                sequence.append(_Item(start, group=group))
                stack.append(group)
                self.max_depth = max(self.max_depth, len(stack) - 1)
                self.pos += 1
                self.space(True)
                continue
            elif c == ")" and len(stack) > 1:
                stack.pop()
                self.pos += 1
            elif c == ".":
                self.pos += 1
                sequence.append(_Item(start))
            elif c == "|":
                body.append([])
                self.pos += 1
                self.space(True)
                continue
            elif c in ("*", "+", "?", "{"):
                if not sequence:
                    raise self.fail(f"expecting an item before {c!r}")
                low, high = self.repetition(len(stack) > 1)
                item = sequence[-1]
                if (item.low, item.high) != (1, 1):  # "a"?{2000}: llama.cpp repeats the rule that ? made
                    item = _Item(item.pos, group=[[item]])
                    sequence[-1] = item
                item.low, item.high = low, high
            else:
                if len(stack) > 1:
                    raise self.fail("expecting ')'")
                return stack[0]
            self.space(len(stack) > 1)

    def token(self) -> None:
        if self.peek() == "!":
            self.pos += 1
        if self.peek() != "<":
            raise self.fail("expecting '<'")
        end = self.src.find(">", self.pos)
        if end < 0:
            raise self.fail("expecting '>'")
        self.pos = end + 1

    def repetition(self, nested: bool) -> tuple[int, int | None]:
        c = self.peek()
        self.pos += 1
        if c != "{":
            self.new_rule()
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        self.space(nested)
        low = self.integer()
        self.space(nested)
        high: int | None = low
        if self.peek() == ",":
            self.pos += 1
            self.space(nested)
            high = self.integer() if self.peek().isascii() and self.peek().isdigit() else None
            self.space(nested)
        if self.peek() != "}":
            raise self.fail("expecting '}'")
        self.pos += 1
        if low > MAX_REPETITION or (high is not None and high > MAX_REPETITION):
            raise self.fail(f"a repetition over {MAX_REPETITION}")
        if high is not None and high < low:
            raise self.fail(f"a repetition {{{low},{high}}} whose maximum is below its minimum")
        self.new_rule(max(1, (high if high is not None else 1) - low))
        return low, high


def _item_nullable(item: _Item, nullable_rules: set[str], ignore_own: bool = False) -> bool:
    if item.low == 0 and not ignore_own:
        return True
    if item.ref is not None:
        return item.ref in nullable_rules
    if item.group is not None:
        return _nullable(item.group, nullable_rules)
    return item.size == 0  # ""


def _nullable(body: list[list[_Item]], nullable_rules: set[str]) -> bool:
    return any(all(_item_nullable(i, nullable_rules) for i in sequence) for sequence in body)



def check_grammar(src: str) -> GrammarInfo:
    """Parse `src` as llama.cpp would, within the limits above; raise GrammarError saying what is wrong."""
    size = len(src.encode("utf-8", errors="surrogatepass"))
    if size > MAX_BYTES:
        raise GrammarError(f"the grammar is {size:,} bytes; the limit is {MAX_BYTES:,}", hint="send a smaller grammar")
    if "\x00" in src:
        raise GrammarError("the grammar contains a NUL character", hint="remove it")
    try:
        src.encode("utf-8")
    except UnicodeEncodeError:
        raise GrammarError("the grammar is not valid Unicode text", hint="send it as UTF-8") from None
    return _Parser(src).parse()


MAX_SCHEMA_BYTES = 100_000
MAX_SCHEMA_DEPTH = 64
# llama-cpp-python's converter expands counts into nested rules before anything can check them:
# {"maxLength": 10**9} allocates until the process is killed. Counts stay below this.
MAX_SCHEMA_COUNT = 1_000
_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
               "minContains", "maxContains")  # fmt: skip
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _check_schema(schema: object) -> None:
    """Bound what the converter would expand: nesting, counts, and quantifiers in patterns."""
    todo = [(schema, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} deep", hint="flatten it")
        if isinstance(node, dict):
            for key in _COUNT_KEYS:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_SCHEMA_COUNT:
                    raise GrammarError(f"the JSON schema's {key} is {value}; the limit is {MAX_SCHEMA_COUNT}",
                                       hint="use a smaller bound")  # fmt: skip
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                for m in _QUANTIFIER.finditer(pattern):
                    if any(g and int(g) > MAX_SCHEMA_COUNT for g in m.groups()):
                        raise GrammarError(f"the JSON schema's pattern repeats more than {MAX_SCHEMA_COUNT} times",
                                           hint="use a smaller bound")  # fmt: skip
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)


def json_grammar(schema: str | None = None) -> str:
    """A grammar for any JSON value, or for JSON matching `schema` (a JSON Schema, as text).

    The schema is converted by llama-cpp-python's own converter and the result is checked like any
    untrusted grammar.
    """
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema is None or schema.strip() in ("true", "{}"):
        return JSON_GBNF
    if len(schema) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the JSON schema is {len(schema):,} bytes; the limit is {MAX_SCHEMA_BYTES:,}",
                           hint="send a smaller schema")  # fmt: skip
    try:
        _check_schema(json.loads(schema))
    except RecursionError:
        raise GrammarError("the JSON schema is nested too deeply", hint="flatten it") from None
    except ValueError:
        raise GrammarError("the JSON schema is not valid JSON", hint="send a JSON Schema object") from None
    try:
        grammar = json_schema_to_gbnf(schema)
    except RecursionError:
        raise GrammarError("the JSON schema is too large or nested too deeply to convert",
                           hint="use fewer properties or less nesting") from None  # fmt: skip
    except Exception as e:  # the converter raises assorted types for schemas it cannot express
        raise GrammarError(f"the JSON schema cannot be turned into a grammar ({type(e).__name__}: {e})"[:300],
                           hint="use the JSON Schema features llama.cpp supports (types, properties, "
                           "required, items, enum, const, anyOf, min/max lengths)") from None  # fmt: skip
    check_grammar(grammar)
    return grammar
