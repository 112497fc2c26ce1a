"""FHIRPath text -> syntax tree.

A hand-written tokenizer and precedence-climbing parser for the FHIRPath grammar
(https://hl7.org/fhirpath/N1/grammar.html). The tree is made of the small tuples below
and is compiled once into closures by `compiler.py`; nothing here runs per resource.

Every syntax error is a `ViewError` that names the character position and what was
expected, so that a view author can fix the expression without reading this code.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import ViewError

# --------------------------------------------------------------------------- syntax tree


class Literal(NamedTuple):
    """A constant collection: `'a'`, `1.5`, `true`, `@2020-01`, `{}`."""

    value: tuple
    type: str | None  # FHIR type name of the value, None for {}


class This(NamedTuple):
    """`$this`, and the implicit focus an expression starts from."""


class Member(NamedTuple):
    """`target.name` (target is This() for a leading identifier)."""

    target: object
    name: str


class Call(NamedTuple):
    """`target.name(args)`; args stay unevaluated trees (where, exists, iif take expressions)."""

    target: object
    name: str
    args: tuple


class Index(NamedTuple):
    """`target[index]`."""

    target: object
    index: object


class Binary(NamedTuple):
    op: str
    left: object
    right: object


class Unary(NamedTuple):
    op: str
    operand: object


class TypeOp(NamedTuple):
    """`target is Type` / `target as Type`."""

    op: str
    target: object
    type_name: str


class Env(NamedTuple):
    """`%name`: a view constant, `%rowIndex`, `%resource`, ..."""

    name: str


class Special(NamedTuple):
    """`$index` / `$total`: parsed so that the compiler can say they are not supported."""

    name: str


# --------------------------------------------------------------------------- tokens

_TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<delimited>`(?:[^`\\]|\\.)*`)
  | (?P<datetime>@T?[0-9][0-9:.TZ+\-]*)
  | (?P<number>[0-9]+(?:\.[0-9]+)?L?)
  | (?P<env>%(?:[A-Za-z_][A-Za-z0-9_]*|'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`))
  | (?P<special>\$[A-Za-z]+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|!~|[=~<>+\-*/&|()\[\]{},.])
""", re.VERBOSE | re.DOTALL)

_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class Token(NamedTuple):
    kind: str  # string, ident, number, datetime, env, special, op, end
    text: str
    pos: int


def _unescape(body: str, pos: int, expr: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", body[i + 2:i + 6]):
            out.append(chr(int(body[i + 2:i + 6], 16)))
            i += 6
        elif nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            raise _error(expr, pos + i, f"unknown escape \\{nxt} in a string")
    return "".join(out)


def tokenize(expr: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise _error(expr, pos, f"unexpected character {expr[pos]!r}")
        kind = m.lastgroup
        text = m.group()
        if kind == "string":
            tokens.append(Token("string", _unescape(text[1:-1], pos + 1, expr), pos))
        elif kind == "delimited":
            tokens.append(Token("ident", _unescape(text[1:-1], pos + 1, expr), pos))
        elif kind == "env":
            name = text[1:]
            if name[0] in "'`":
                name = _unescape(name[1:-1], pos + 2, expr)
            tokens.append(Token("env", name, pos))
        elif kind != "ws":
            tokens.append(Token(kind, text, pos))  # type: ignore[arg-type]
        pos = m.end()
    tokens.append(Token("end", "", len(expr)))
    return tokens


def _error(expr: str, pos: int, what: str) -> ViewError:
    return ViewError(f"FHIRPath syntax error at character {pos + 1} of {expr!r}: {what}")


# --------------------------------------------------------------------------- parser

# binary operators by precedence, loosest first (FHIRPath §"Operator precedence")
_LEVELS: list[tuple[str, ...]] = [
    ("implies",),
    ("or", "xor"),
    ("and",),
    ("in", "contains"),
    ("=", "~", "!=", "!~"),
    ("<=", "<", ">", ">="),
    ("|",),
    ("is", "as"),
    ("+", "-", "&"),
    ("*", "/", "div", "mod"),
]
_WORD_OPS = {"implies", "or", "xor", "and", "in", "contains", "is", "as", "div", "mod"}

_DATETIME = re.compile(
    r"@(?P<date>\d{4}(?:-\d{2}(?:-\d{2})?)?)"
    r"(?:T(?P<time>\d{2}(?::\d{2}(?::\d{2}(?:\.\d+)?)?)?)?(?P<tz>Z|[+\-]\d{2}:\d{2})?)?$"
)
_TIME = re.compile(r"@T(?P<time>\d{2}(?::\d{2}(?::\d{2}(?:\.\d+)?)?)?)$")


class _Parser:
    def __init__(self, expr: str):
        self.expr = expr
        self.tokens = tokenize(expr)
        self.i = 0

    # helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        t = self.tokens[self.i]
        self.i += 1
        return t

    def is_op(self, *ops: str) -> bool:
        t = self.tok
        if t.kind == "op":
            return t.text in ops
        return t.kind == "ident" and t.text in ops and t.text in _WORD_OPS

    def expect(self, op: str) -> None:
        if not (self.tok.kind == "op" and self.tok.text == op):
            raise self.error(f"expected {op!r}")
        self.i += 1

    def error(self, what: str, tok: Token | None = None) -> ViewError:
        t = tok or self.tok
        found = "the end of the expression" if t.kind == "end" else repr(t.text)
        return _error(self.expr, t.pos, f"{what}, found {found}")

    # grammar
    def parse(self) -> object:
        if self.tok.kind == "end":
            raise self.error("expected an expression")
        node = self.binary(0)
        if self.tok.kind != "end":
            raise self.error("expected an operator or the end of the expression")
        return node

    def binary(self, level: int) -> object:
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        ops = _LEVELS[level]
        while self.is_op(*ops):
            op = self.take().text
            if op in ("is", "as"):
                left = TypeOp(op, left, self.type_specifier())
            else:
                left = Binary(op, left, self.binary(level + 1))
        return left

    def unary(self) -> object:
        if self.is_op("+", "-"):
            op = self.take().text
            return Unary(op, self.unary())
        return self.postfix()

    def postfix(self) -> object:
        node = self.term()
        while True:
            if self.is_op("."):
                self.take()
                node = self.invocation(node)
            elif self.is_op("["):
                self.take()
                index = self.binary(0)
                self.expect("]")
                node = Index(node, index)
            else:
                return node

    def type_specifier(self) -> str:
        t = self.take()
        if t.kind != "ident":
            raise self.error("expected a type name", t)
        name = t.text
        while self.is_op(".") and self.tokens[self.i + 1].kind == "ident":
            self.take()
            name += "." + self.take().text
        return name

    def invocation(self, target: object) -> object:
        t = self.take()
        if t.kind == "special":
            if t.text == "$this":
                return target if isinstance(target, This) else Call(target, "select", (This(),))
            raise self.error("expected a name or function", t)
        if t.kind != "ident":
            raise self.error("expected a name or function after '.'", t)
        if self.is_op("("):
            return Call(target, t.text, self.arguments())
        return Member(target, t.text)

    def arguments(self) -> tuple:
        self.expect("(")
        args: list[object] = []
        if not self.is_op(")"):
            args.append(self.binary(0))
            while self.is_op(","):
                self.take()
                args.append(self.binary(0))
        self.expect(")")
        return tuple(args)

    def term(self) -> object:
        t = self.tok
        if t.kind == "op":
            if t.text == "(":
                self.take()
                node = self.binary(0)
                self.expect(")")
                return node
            if t.text == "{":
                self.take()
                self.expect("}")
                return Literal((), None)
            raise self.error("expected a value, a name or '('")
        self.take()
        if t.kind == "string":
            return Literal((t.text,), "string")
        if t.kind == "number":
            if self.tok.kind == "string" or (self.tok.kind == "ident" and self.tok.text in _CALENDAR_UNITS):
                raise self.error("quantity literals are not supported")
            if t.text.endswith("L"):
                return Literal((int(t.text[:-1]),), "integer")
            if "." in t.text:
                return Literal((float(t.text),), "decimal")
            return Literal((int(t.text),), "integer")
        if t.kind == "datetime":
            return self.datetime_literal(t)
        if t.kind == "env":
            return Env(t.text)
        if t.kind == "special":
            if t.text == "$this":
                return This()
            if t.text in ("$index", "$total"):
                return Special(t.text)
            raise self.error("unknown special variable", t)
        if t.kind == "ident":
            if t.text in ("true", "false"):
                return Literal((t.text == "true",), "boolean")
            if self.is_op("("):
                return Call(This(), t.text, self.arguments())
            return Member(This(), t.text)
        raise self.error("expected a value, a name or '('", t)

    def datetime_literal(self, t: Token) -> Literal:
        m = _TIME.match(t.text)
        if m:
            return Literal((m["time"],), "time")
        m = _DATETIME.match(t.text)
        if not m:
            raise self.error("malformed date/time literal", t)
        if "T" in t.text:
            return Literal((t.text[1:].rstrip("T"),), "dateTime")
        return Literal((m["date"],), "date")


_CALENDAR_UNITS = {
    "year", "years", "month", "months", "week", "weeks", "day", "days", "hour", "hours",
    "minute", "minutes", "second", "seconds", "millisecond", "milliseconds",
}


def parse(expr: str) -> object:
    """Parse one FHIRPath expression; raises ViewError with the position of the problem."""
    if not isinstance(expr, str):
        raise ViewError(f"a FHIRPath expression must be a string, not {type(expr).__name__}")
    return _Parser(expr).parse()
