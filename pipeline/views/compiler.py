"""FHIRPath syntax tree -> Python closures, compiled once per view.

Every expression becomes `fn(focus: list, env: Env) -> list`: a FHIRPath collection is
a Python list of the JSON values themselves (dict, str, int, float, bool), and the
empty collection is `[]`. Nothing walks the tree per resource.

The hot path is member navigation, so a run of member steps with `first()`, `[n]` and
`ofType()` on a choice element (`code.coding.first().system`,
`value.ofType(Quantity).unit`) is fused into one `Chain` that walks a single resource
with plain dict lookups and builds no intermediate lists; it drops to the general list
walk only when it meets a repeating element without an index.

Static types come from `model.py`: they pick the JSON key of a choice element at
compile time (`value.ofType(Quantity)` is a lookup of `valueQuantity`), and let the
view compiler reject a `where` that can never be boolean. Where the type is not known
(an element the model lacks), navigation falls back to JSON shapes.

Hostile input never raises: navigating into a string, a number or `null` yields the
empty collection. Errors at run time are only those FHIRPath itself defines (a
comparison of several items, `single()` on several): they raise `RowError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from . import boundary, model
from .context import DEFAULT_CONTEXT, ViewContext
from .errors import RowError, ViewError
from .parser import Binary, Call, Env, Index, Literal, Member, Special, This, TypeOp, Unary, parse

Fn = Callable[[list, "Scope"], list]

_NUMBER = (int, float)
_WELL_KNOWN = {
    "ucum": "http://unitsofmeasure.org",
    "sct": "http://snomed.info/sct",
    "loinc": "http://loinc.org",
}


class Scope:
    """What an expression sees besides its focus: the resource, the key hooks, %rowIndex."""

    __slots__ = ("root", "ctx", "row_index")

    def __init__(self, root: Any, ctx: ViewContext, row_index: int = 0):
        self.root = root
        self.ctx = ctx
        self.row_index = row_index


# What a constant sub-expression is evaluated against while a view is compiled: it reads
# neither the resource nor the context.
_CONSTANT_SCOPE = Scope(None, DEFAULT_CONTEXT)


class Compiled(NamedTuple):
    fn: Fn
    type: str | None  # static FHIR type of every item, None when not known
    chain: tuple | None = None  # fused member steps from the focus, when the expression is one
    const: tuple | None = None  # the values, when the expression is a literal or a constant
    # item(f, scope): the value from the single focus item f (None if empty, DEFER if several);
    # the fast path of columns and where() criteria, next to the list closure `fn`
    item: Callable[[Any, Scope], Any] | None = None


# --------------------------------------------------------------------------- member walking
#
# A chain step is (key, candidates, pick):
#   key         the JSON key to look up, or None when `candidates` decides;
#   candidates  None, or the keys of a choice element's alternatives (first found wins),
#               or "" to try `key` and then any `key<Upper>...` (type not known);
#   pick        None, or the index taken from the collection after the step (first(), [n]).


def _lookup(x: dict, key: str | None, candidates: Any) -> Any:
    if candidates is None:
        return x.get(key)
    if candidates == "":
        v = x.get(key)
        if v is not None:
            return v
        assert key is not None  # a choice element [x] is looked up by its name
        n = len(key)
        for k, v in x.items():
            if len(k) > n and k.startswith(key) and k[n].isupper():
                return v
        return None
    for k in candidates:
        v = x.get(k)
        if v is not None:
            return v
    return None


def holds(items: list, x: object) -> bool:
    """`x in items` by identity: `in` compares with ==, which costs a Python-level call for
    every item that is not x itself (a dict against None). For None and DEFER identity is
    what is meant. (mypyc compiles this any() into a plain loop.)"""
    return any(o is x for o in items)


def _walk(items: list, steps: tuple) -> list:
    """The general, collection-at-a-time member walk."""
    for key, candidates, pick in steps:
        out: list = []
        for it in items:
            if type(it) is dict:
                v = it.get(key) if candidates is None else _lookup(it, key, candidates)
                if v is None:
                    continue
                if type(v) is list:
                    out.extend(v)
                    if holds(v, None):  # primitive arrays may hold null beside an extension
                        out = [o for o in out if o is not None]
                else:
                    out.append(v)
        if pick is not None:
            out = out[pick:pick + 1]
        if not out:
            return out
        items = out
    return items


def walk_one(x: Any, steps: tuple) -> list:
    """The same walk from one item, with plain lookups while the path stays single."""
    for i, (key, candidates, pick) in enumerate(steps):
        if type(x) is not dict:
            return []
        v = x.get(key) if candidates is None else _lookup(x, key, candidates)
        if v is None:
            return []
        if type(v) is list:
            if pick is None:
                return _walk([o for o in v if o is not None] if holds(v, None) else v, steps[i + 1:])
            if holds(v, None):
                v = [o for o in v if o is not None]
            if pick >= len(v):
                return []
            v = v[pick]
        elif pick:
            return []
        x = v
    return [x]


def _chained(steps: tuple, t: str | None) -> Compiled:
    return Compiled(_chain_fn(steps), t, steps, None, chain_value(steps))


def _chain_fn(steps: tuple) -> Fn:
    if len(steps) == 1 and steps[0][1] is None and steps[0][2] is None:
        key = steps[0][0]

        def one(focus: list, scope: Scope) -> list:  # the commonest path of all: `status`, `id`
            if len(focus) == 1:
                x = focus[0]
                if type(x) is dict:
                    v = x.get(key)
                    if v is None:
                        return []
                    if type(v) is list:
                        return [o for o in v if o is not None]
                    return [v]
                return []
            return _walk(focus, steps)

        return one

    def chain(focus: list, scope: Scope) -> list:
        if len(focus) == 1:
            return walk_one(focus[0], steps)
        return _walk(focus, steps)

    return chain


def chain_value(steps: tuple) -> Callable[[Any, Scope], Any]:
    """The chain's value from one item: the value, None when empty, DEFER when several.

    The same walk as `walk_one`, but each step is its own small closure that hands what
    it found to the next one, so a path costs one call and one dict lookup per step, with
    no list built along the way; this is what most columns of most views run per resource.
    """
    if not steps:
        return lambda f, scope: f
    nxt: Callable[[Any, Any], Any] | None = None
    for i in range(len(steps) - 1, -1, -1):
        nxt = _step_closure(steps[i], nxt, steps[i + 1:])
    assert nxt is not None
    return nxt


def _step_closure(step: tuple, nxt: Callable[[Any, Any], Any] | None, rest: tuple) -> Callable[[Any, Any], Any]:
    """One step of `chain_value`: look up, pick, and pass the result on (or return it at the end)."""
    key, cands, pick = step

    def from_list(v: list) -> Any:
        if holds(v, None):
            v = [o for o in v if o is not None]
        if pick is None:
            return scalar(_walk(v, rest))
        if pick >= len(v):
            return None
        return v[pick] if nxt is None else nxt(v[pick], None)

    if cands is None and nxt is None:
        def last(x: Any, scope: Any) -> Any:
            if type(x) is not dict:
                return None
            v = x.get(key)
            if type(v) is list:
                return from_list(v)
            return None if pick else v
        return last

    if cands is None:
        assert nxt is not None
        then = nxt

        def middle(x: Any, scope: Any) -> Any:
            if type(x) is not dict:
                return None
            v = x.get(key)
            if type(v) is list:
                return from_list(v)
            return None if v is None or pick else then(v, None)
        return middle

    def choice(x: Any, scope: Any) -> Any:
        if type(x) is not dict:
            return None
        v = _lookup(x, key, cands)
        if type(v) is list:
            return from_list(v)
        if v is None or pick:
            return None
        return v if nxt is None else nxt(v, None)
    return choice


class _Defer:
    """The answer of an `item` closure that cannot give one value: use the list closure."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFER"


DEFER: Any = _Defer()


def scalar(r: list) -> Any:
    """A collection as one value: None when empty, DEFER when several."""
    if not r:
        return None
    return r[0] if len(r) == 1 else DEFER


def item_of(c: Compiled) -> Callable[[Any, Scope], Any]:
    """The one-item evaluator of an expression: its own, or one made from its list closure."""
    if c.item is not None:
        return c.item
    fn = c.fn
    return lambda f, scope: scalar(fn([f], scope))


def _truth1(v: Any) -> bool | None:
    """truth() of one value from an item closure (not DEFER)."""
    if v is None:
        return None
    return v if type(v) is bool else True


# --------------------------------------------------------------------------- value helpers


def truth(coll: list, what: str = "a boolean") -> bool | None:
    """FHIRPath singleton evaluation to Boolean: None for empty."""
    if not coll:
        return None
    if len(coll) > 1:
        raise RowError("not-singleton", f"{what}: expected one value, got {len(coll)}")
    v = coll[0]
    return v if type(v) is bool else True


def _num(v: Any) -> bool:
    return type(v) in _NUMBER  # bool is not a number here


def item_equal(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    if ta is tb:
        return a == b
    return ta in _NUMBER and tb in _NUMBER and a == b


def _equal(left: list, right: list) -> list:
    if not left or not right:
        return []
    if len(left) == 1 and len(right) == 1:
        return [item_equal(left[0], right[0])]
    if len(left) != len(right):
        return [False]
    return [all(item_equal(a, b) for a, b in zip(left, right, strict=True))]


def _norm_text(v: Any) -> Any:
    return " ".join(v.lower().split()) if type(v) is str else v


def _equivalent(left: list, right: list) -> list:
    if not left and not right:
        return [True]
    if len(left) != len(right):
        return [False]
    rest = [_norm_text(b) for b in right]
    for a in left:
        a = _norm_text(a)
        for j, b in enumerate(rest):
            if item_equal(a, b) or (_num(a) and _num(b) and math.isclose(a, b)):
                del rest[j]
                break
        else:
            return [False]
    return [True]


def _single(coll: list, op: str) -> Any:
    if len(coll) > 1:
        raise RowError("not-singleton", f"operator {op}: expected one value on each side, got {len(coll)}")
    return coll[0]


def _compare(op: str) -> Callable[[list, list], list]:
    test = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}[op]

    def cmp(left: list, right: list) -> list:
        if not left or not right:
            return []
        a, b = _single(left, op), _single(right, op)
        if (_num(a) and _num(b)) or (type(a) is str and type(b) is str):
            return [test(a, b)]
        return []  # different kinds of value: no answer rather than an error on odd data

    return cmp


def _arith(op: str) -> Callable[[list, list], list]:
    def calc(left: list, right: list) -> list:
        if not left or not right:
            return []
        a, b = _single(left, op), _single(right, op)
        if op == "+" and type(a) is str and type(b) is str:
            return [a + b]
        if not (_num(a) and _num(b)):
            return []
        if op == "+":
            return [a + b]
        if op == "-":
            return [a - b]
        if op == "*":
            return [a * b]
        if b == 0:
            return []  # FHIRPath: division by zero is empty
        if op == "/":
            return [a / b]
        if op == "div":
            return [int(a / b)]
        return [math.fmod(a, b) if isinstance(a, float) or isinstance(b, float) else int(math.fmod(a, b))]

    return calc


def _concat(left: list, right: list) -> list:
    a = _single(left, "&") if left else ""
    b = _single(right, "&") if right else ""
    return [a + b] if type(a) is str and type(b) is str else []


def to_text(v: Any) -> str | None:
    if type(v) is str:
        return v
    if type(v) is bool:
        return "true" if v else "false"
    if type(v) is int:
        return str(v)
    if type(v) is float:
        return repr(v)
    return None


def _json_type_ok(v: Any, t: str) -> bool:
    """ofType() where the FHIR type is not known: judge by the JSON shape."""
    if t == "boolean":
        return type(v) is bool
    if t in model.INTEGER_TYPES:
        return type(v) is int
    if t == "decimal":
        return _num(v)
    if t in model.STRING_TYPES:
        return type(v) is str
    if t[:1].isupper():
        return type(v) is dict and (v.get("resourceType") in (None, t))
    return False


# --------------------------------------------------------------------------- the compiler


class Compiler:
    """Compiles the expressions of one view: knows its constants and resource type."""

    def __init__(self, constants: dict[str, tuple[tuple, str | None]]):
        self.constants = constants

    def expression(self, text: Any, focus_type: str | None, where: str) -> Compiled:
        try:
            return self.node(parse(text), focus_type)
        except ViewError as e:
            raise ViewError(f"{where}: {e}") from None
        except RecursionError:
            raise ViewError(f"{where}: the expression is nested too deeply") from None

    # ----------------------------------------------------------------- nodes

    def node(self, n: Any, ft: str | None) -> Compiled:
        kind = type(n)
        if kind is This:
            return Compiled(_identity, ft, (), None, lambda f, scope: f)
        if kind is Literal:
            return _literal(n.value, n.type)
        if kind is Member:
            return self.member(n, ft)
        if kind is Call:
            return self.call(n, ft)
        if kind is Index:
            return self.index(n, ft)
        if kind is Binary:
            return self.binary(n, ft)
        if kind is Unary:
            return self.unary(n, ft)
        if kind is TypeOp:
            return self.of_type(n.target, n.type_name, ft, n.op)
        if kind is Env:
            return self.env(n.name)
        if kind is Special:
            raise ViewError(f"{n.name} is not supported")
        raise ViewError(f"cannot compile {kind.__name__}")  # pragma: no cover - parser makes no other node

    def env(self, name: str) -> Compiled:
        if name in self.constants:
            values, t = self.constants[name]
            return _literal(values, t)
        if name == "rowIndex":
            return Compiled(lambda focus, scope: [scope.row_index], "integer", None, None,
                            lambda f, scope: scope.row_index)
        if name in ("resource", "rootResource", "context"):
            return Compiled(lambda focus, scope: [scope.root], None)
        if name in _WELL_KNOWN:
            return _literal((_WELL_KNOWN[name],), "string")
        known = ", ".join(f"%{k}" for k in sorted(self.constants)) or "none"
        raise ViewError(f"unknown constant %{name} (constants of this view: {known})")

    def member(self, n: Member, ft: str | None) -> Compiled:
        target = self.node(n.target, ft)
        name = n.name
        if type(n.target) is This and name[:1].isupper() and model.element(ft, name) is None \
                and model.is_known_type(name):
            # `Patient.name`: a leading type name filters the focus by resource type
            return self._filter_type(target, name)
        el = model.element(target.type, name)
        if isinstance(el, list):
            keys = tuple(model.choice_key(name, t) for t in el)
            step = (name, keys if len(keys) <= 8 else "", None)
            return self._step(target, step, el[0] if len(el) == 1 else None)
        if el is None:
            return self._step(target, (name, "", None), None)
        return self._step(target, (name, None, None), el.rstrip("*"))

    def _step(self, target: Compiled, step: tuple, t: str | None) -> Compiled:
        if target.chain is not None:
            return _chained(target.chain + (step,), t)
        tfn, steps1 = target.fn, (step,)
        return Compiled(lambda focus, scope: _walk(tfn(focus, scope), steps1), t)

    def _filter_type(self, target: Compiled, name: str) -> Compiled:
        tfn = target.fn

        def by_type(focus: list, scope: Scope) -> list:
            return [x for x in tfn(focus, scope) if type(x) is dict and x.get("resourceType") == name]

        return Compiled(by_type, name)

    def _pick(self, target: Compiled, pick: int) -> Compiled:
        """first() / [n] / last-step index: fuse into the chain when possible."""
        if target.chain and target.chain[-1][2] is None:
            key, cands, _ = target.chain[-1]
            return _chained(target.chain[:-1] + ((key, cands, pick),), target.type)
        tfn = target.fn
        return Compiled(lambda focus, scope: tfn(focus, scope)[pick:pick + 1], target.type)

    def index(self, n: Index, ft: str | None) -> Compiled:
        target = self.node(n.target, ft)
        idx = self.node(n.index, ft)
        if self._is_constant(n.index):
            values = idx.fn([], _CONSTANT_SCOPE)
            if len(values) == 1 and type(values[0]) is int:
                if values[0] < 0:
                    return _literal((), target.type)
                return self._pick(target, values[0])
        tfn, ifn = target.fn, idx.fn

        def at(focus: list, scope: Scope) -> list:
            i = ifn(focus, scope)
            if not i:
                return []
            k = _single(i, "[]")
            if type(k) is not int or k < 0:
                return []
            return tfn(focus, scope)[k:k + 1]

        return Compiled(at, target.type)

    def of_type(self, target_node: Any, type_name: str, ft: str | None, how: str = "ofType") -> Compiled:
        c = self._of_type(target_node, model.normalize_type(type_name), ft)
        if how != "is":
            return c
        raw, typed = self.node(target_node, ft).fn, c.fn

        def is_(focus: list, scope: Scope) -> list:
            r = raw(focus, scope)
            if not r:
                return []
            if len(r) > 1:
                raise RowError("not-singleton", f"is {type_name}: expected one item, got {len(r)}")
            return [bool(typed(focus, scope))]

        return Compiled(is_, "boolean")

    def _of_type(self, target_node: Any, t: str, ft: str | None) -> Compiled:
        if type(target_node) is Member and not (
                type(target_node.target) is This and target_node.name[:1].isupper()):
            parent = self.node(target_node.target, ft)
            name = target_node.name
            el = model.element(parent.type, name)
            if isinstance(el, list):  # a choice element: the type picks the JSON key
                if t not in el:
                    return _literal((), t)
                return self._step(parent, (model.choice_key(name, t), None, None), t)
            if el is None:  # type not known: `valueX` if there, else `value` of the right JSON shape
                pfn = parent.fn
                key, plain = model.choice_key(name, t), name

                def dynamic(focus: list, scope: Scope) -> list:
                    out = _walk(pfn(focus, scope), ((key, None, None),))
                    if out:
                        return out
                    return [v for v in _walk(pfn(focus, scope), ((plain, None, None),)) if _json_type_ok(v, t)]

                return Compiled(dynamic, t)
        target = self.node(target_node, ft)
        if target.type is not None:
            if model.is_subtype(target.type, t):
                return target._replace(type=t)
            return _literal((), t)
        tfn = target.fn
        return Compiled(lambda focus, scope: [v for v in tfn(focus, scope) if _json_type_ok(v, t)], t)

    def unary(self, n: Unary, ft: str | None) -> Compiled:
        inner = self.node(n.operand, ft)
        if n.op == "+":
            return inner
        fn = inner.fn

        def neg(focus: list, scope: Scope) -> list:
            r = fn(focus, scope)
            if not r:
                return []
            v = _single(r, "-")
            return [-v] if _num(v) else []

        return Compiled(neg, inner.type)

    def binary(self, n: Binary, ft: str | None) -> Compiled:
        left, right = self.node(n.left, ft), self.node(n.right, ft)
        lf, rf, op = left.fn, right.fn, n.op
        if op in ("and", "or", "xor", "implies"):
            fn = _logic(op, lf, rf)
            return Compiled(fn, "boolean", item=_logic_item(op, item_of(left), item_of(right), fn)
                            if op in ("and", "or") else None)
        if op in ("=", "!="):
            fn = (lambda focus, scope: _equal(lf(focus, scope), rf(focus, scope))) if op == "=" else \
                (lambda focus, scope: [not r for r in _equal(lf(focus, scope), rf(focus, scope))])
            return Compiled(fn, "boolean", item=_equal_item(op == "!=", item_of(left), item_of(right), fn))
        if op == "|":
            return Compiled(lambda focus, scope: _union(lf(focus, scope), rf(focus, scope)),
                            left.type if left.type == right.type else None)
        table: dict[str, Callable[[list, list], list]] = {
            "=": _equal, "!=": lambda a, b: [not r for r in _equal(a, b)],
            "~": _equivalent, "!~": lambda a, b: [not r for r in _equivalent(a, b)],
            "in": lambda a, b: _membership(a, b, op), "contains": lambda a, b: _membership(b, a, op),
            "&": _concat,
        }
        if op in table:
            f = table[op]
            return Compiled(lambda focus, scope: f(lf(focus, scope), rf(focus, scope)),
                            "string" if op == "&" else "boolean")
        if op in ("<", "<=", ">", ">="):
            f = _compare(op)
            return Compiled(lambda focus, scope: f(lf(focus, scope), rf(focus, scope)), "boolean")
        f = _arith(op)
        t = left.type if left.type == right.type and op != "/" else ("decimal" if op == "/" else None)
        return Compiled(lambda focus, scope: f(lf(focus, scope), rf(focus, scope)), t)

    # ----------------------------------------------------------------- functions

    def call(self, n: Call, ft: str | None) -> Compiled:
        spec = _FUNCTIONS.get(n.name)
        if spec is None:
            raise ViewError(f"unknown or unsupported function {n.name}() (supported: {', '.join(sorted(_FUNCTIONS))})")
        low, high, build = spec
        if not low <= len(n.args) <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise ViewError(f"{n.name}() takes {want} argument(s), got {len(n.args)}")
        if n.name in ("ofType", "as", "is"):
            return self.of_type(n.target, _type_arg(n), ft, n.name)
        if n.name in ("exists", "empty") and not n.args and type(n.target) is Call \
                and n.target.name == "where" and len(n.target.args) == 1:
            # X.where(c).exists() is X.exists(c): stop at the first match
            found = _b_exists(self, self.node(n.target.target, ft), n.target.args, ft)
            return found if n.name == "exists" else _negate(found)
        target = self.node(n.target, ft)
        return build(self, target, n.args, ft)

    def _is_constant(self, n: Any) -> bool:
        return type(n) is Literal or (type(n) is Env and (n.name in self.constants or n.name in _WELL_KNOWN))

    def lambda_arg(self, arg: Any, target: Compiled) -> Fn:
        """An argument evaluated per item of the target (where, select, exists, all)."""
        return self.node(arg, target.type).fn

    def value_arg(self, arg: Any, ft: str | None) -> Fn:
        """An argument evaluated once against the expression's own focus (join, substring)."""
        return self.node(arg, ft).fn

    def const_arg(self, arg: Any, fname: str, kind: type) -> Any:
        """An argument that must be known when the view is compiled (extension url, join separator)."""
        if self._is_constant(arg):
            values = self.node(arg, None).fn([], _CONSTANT_SCOPE)
            if len(values) == 1 and type(values[0]) is kind:
                return values[0]
        raise ViewError(f"the argument of {fname}() must be a {kind.__name__} literal or a %constant")


def _identity(focus: list, scope: Scope) -> list:
    return focus


def _literal(values: tuple, t: str | None) -> Compiled:
    def lit(focus: list, scope: Scope) -> list:
        return list(values)

    v = values[0] if values else None
    return Compiled(lit, t, None, values, (lambda f, scope: v) if len(values) <= 1 else None)


def _type_arg(n: Call) -> str:
    if len(n.args) == 1:
        a = n.args[0]
        if type(a) is Member and type(a.target) is This:
            return a.name
        if type(a) is Member and type(a.target) is Member and type(a.target.target) is This:
            return f"{a.target.name}.{a.name}"  # FHIR.Quantity, System.String
        if type(a) is Literal and a.type == "string":
            return a.value[0]
    raise ViewError(f"{n.name}() takes a type name, like {n.name}(Quantity)")


def _logic(op: str, lf: Fn, rf: Fn) -> Fn:
    if op in ("and", "or"):
        stop = op == "or"  # the value that decides alone: False for and, True for or

        def and_or(focus: list, scope: Scope) -> list:
            a = truth(lf(focus, scope), op)
            if a is stop:
                return [stop]
            b = truth(rf(focus, scope), op)
            if b is stop:
                return [stop]
            return [] if a is None or b is None else [not stop]

        return and_or

    def xor_(focus: list, scope: Scope) -> list:
        a, b = truth(lf(focus, scope), "xor"), truth(rf(focus, scope), "xor")
        return [] if a is None or b is None else [a != b]

    def implies_(focus: list, scope: Scope) -> list:
        a = truth(lf(focus, scope), "implies")
        if a is False:
            return [True]
        b = truth(rf(focus, scope), "implies")
        if b is True:
            return [True]
        return [False] if a is True and b is False else []

    return xor_ if op == "xor" else implies_


def _equal_item(negate: bool, li: Callable, ri: Callable, fn: Fn) -> Callable[[Any, Scope], Any]:
    def equal1(f: Any, scope: Scope) -> Any:
        a = li(f, scope)
        if a is None:
            return None
        b = ri(f, scope)
        if b is None:
            return None
        if a is DEFER or b is DEFER:
            return scalar(fn([f], scope))
        return item_equal(a, b) is not negate

    return equal1


def _logic_item(op: str, li: Callable, ri: Callable, fn: Fn) -> Callable[[Any, Scope], Any]:
    stop = op == "or"  # the value that decides alone: False for and, True for or

    def logic1(f: Any, scope: Scope) -> Any:
        a = li(f, scope)
        if a is DEFER:
            return scalar(fn([f], scope))
        a = _truth1(a)
        if a is stop:
            return stop
        b = ri(f, scope)
        if b is DEFER:
            return scalar(fn([f], scope))
        b = _truth1(b)
        if b is stop:
            return stop
        return None if a is None or b is None else not stop

    return logic1


def _union(a: list, b: list) -> list:
    out: list = []
    for v in a + b:
        if not any(item_equal(v, o) for o in out):
            out.append(v)
    return out


def _membership(item: list, coll: list, op: str) -> list:
    if not item:
        return []
    v = _single(item, op)
    return [any(item_equal(v, o) for o in coll)]


# ----------------------------------------------------------------- function table
# name -> (min args, max args, builder(compiler, target, args, focus type) -> Compiled)


def _simple(t: str | None | Callable[[Compiled], str | None], f: Callable[[list], list]):
    """A function of the target collection alone."""

    def build(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
        tfn = target.fn
        return Compiled(lambda focus, scope: f(tfn(focus, scope)), t(target) if callable(t) else t)

    return build


def _same(target: Compiled) -> str | None:
    return target.type


def _b_first(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    return c._pick(target, 0)


def _b_where(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    tfn = target.fn
    cc = c.node(args[0], target.type)
    crit, crit_list = item_of(cc), cc.fn

    def where(focus: list, scope: Scope) -> list:
        out = []
        for x in tfn(focus, scope):
            v = crit(x, scope)
            if v is DEFER:
                v = truth(crit_list([x], scope), "where()")
            if v is True or (v is not None and v is not False):
                out.append(x)
        return out

    return Compiled(where, target.type)


def _b_select(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    tfn, proj = target.fn, c.node(args[0], target.type)

    def select(focus: list, scope: Scope) -> list:
        out: list = []
        for x in tfn(focus, scope):
            out.extend(proj.fn([x], scope))
        return out

    return Compiled(select, proj.type)


def _b_exists(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    tfn = target.fn
    if not args:
        titem = item_of(target)

        def exists1(f: Any, scope: Scope) -> Any:
            return titem(f, scope) is not None  # DEFER: several, so it exists

        return Compiled(lambda focus, scope: [bool(tfn(focus, scope))], "boolean", item=exists1)
    cc = c.node(args[0], target.type)
    crit, crit_list = item_of(cc), cc.fn

    def exists(focus: list, scope: Scope) -> list:
        for x in tfn(focus, scope):
            v = crit(x, scope)
            if v is DEFER:
                v = truth(crit_list([x], scope), "exists()")
            if _truth1(v):
                return [True]
        return [False]

    return Compiled(exists, "boolean", item=lambda f, scope: exists([f], scope)[0])


def _negate(c: Compiled) -> Compiled:
    fn, item = c.fn, c.item
    return Compiled(lambda focus, scope: [not v for v in fn(focus, scope)], "boolean",
                    item=None if item is None else (lambda f, scope: not item(f, scope)))


def _b_all(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    tfn, crit = target.fn, c.lambda_arg(args[0], target)
    return Compiled(lambda focus, scope: [all(truth(crit([x], scope), "all()") is True
                                              for x in tfn(focus, scope))], "boolean")


def _b_iif(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    tfn = target.fn
    yes = c.node(args[1], target.type)
    no = c.node(args[2], target.type) if len(args) == 3 else _literal((), None)
    t = yes.type if (yes.type == no.type or len(args) == 2) else None
    if _is_coalesce(args):  # the condition is the true branch's exists(): not compiled on its own
        return _coalesce(tfn, target.chain, yes, no, t)
    cond = c.node(args[0], target.type)
    cf, yf, nf = cond.fn, yes.fn, no.fn

    def iif(focus: list, scope: Scope) -> list:
        f = tfn(focus, scope)
        if len(f) > 1:
            raise RowError("not-singleton", f"iif(): expected one input item, got {len(f)}")
        return yf(f, scope) if truth(cf(f, scope), "iif()") is True else nf(f, scope)

    if target.chain != ():  # iif() on something else than the focus: the list path only
        return Compiled(iif, t)
    ci, yi, ni = item_of(cond), item_of(yes), item_of(no)

    def iif1(f: Any, scope: Scope) -> Any:
        b = ci(f, scope)
        if b is DEFER:
            b = truth(cf([f], scope), "iif()")
        return yi(f, scope) if _truth1(b) else ni(f, scope)

    return Compiled(iif, t, item=iif1)


def _is_coalesce(args: tuple) -> bool:
    """`iif(X.exists(), X, Y)`: X when it has items, else Y. Views spell a fallback so
    (`effective.ofType(dateTime)`, else the Period's start); evaluated as written, X is
    found twice. (Compared by repr: the trees are named tuples, and a plain == would
    take two node types with equal fields for one.)"""
    cond = args[0]
    return (len(args) == 3 and type(cond) is Call and cond.name == "exists" and not cond.args
            and repr(cond.target) == repr(args[1]))


def _coalesce(tfn: Fn, chain: tuple | None, yes: Compiled, no: Compiled, t: str | None) -> Compiled:
    yf, nf = yes.fn, no.fn

    def first_of(focus: list, scope: Scope) -> list:
        f = tfn(focus, scope)
        if len(f) > 1:
            raise RowError("not-singleton", f"iif(): expected one input item, got {len(f)}")
        found = yf(f, scope)
        return found if found else nf(f, scope)

    if chain != ():
        return Compiled(first_of, t)
    yi, ni = item_of(yes), item_of(no)

    def first_of1(f: Any, scope: Scope) -> Any:
        v = yi(f, scope)  # DEFER (several items) exists, and is the answer: the list path takes it
        return ni(f, scope) if v is None else v

    return Compiled(first_of, t, item=first_of1)


def _b_extension(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    url = c.const_arg(args[0], "extension", str)
    tfn = target.fn

    def extension(focus: list, scope: Scope) -> list:
        return [e for e in _walk(tfn(focus, scope), (("extension", None, None),))
                if type(e) is dict and e.get("url") == url]

    return Compiled(extension, "Extension")


def _b_join(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    sep = c.const_arg(args[0], "join", str) if args else ""
    tfn = target.fn

    def join(focus: list, scope: Scope) -> list:
        return [sep.join(t for t in map(to_text, tfn(focus, scope)) if t is not None)]

    return Compiled(join, "string")


def _per_item(target: Compiled, each: Callable[[Any, Scope], Any], t: str) -> Compiled:
    """A function applied to every item of the target, dropping None (the key functions)."""
    tfn, titem = target.fn, item_of(target)

    def many(focus: list, scope: Scope) -> list:
        out = []
        for x in tfn(focus, scope):
            v = each(x, scope)
            if v is not None:
                out.append(v)
        return out

    def one(f: Any, scope: Scope) -> Any:
        x = titem(f, scope)
        if x is None:
            return None
        return scalar(many([f], scope)) if x is DEFER else each(x, scope)

    return Compiled(many, t, item=one)


def _b_resource_key(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    def resource_key(r: Any, scope: Scope) -> Any:
        if type(r) is not dict or "resourceType" not in r:
            r = scope.root  # called on an element: the key of the resource it sits in
        return scope.ctx.resource_key(r)

    return _per_item(target, resource_key, "string")


def _b_reference_key(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    want = None
    if args:
        a = args[0]
        if type(a) is Member and type(a.target) is This:
            want = a.name
        elif type(a) is Literal and a.type == "string":
            want = a.value[0]
        else:
            raise ViewError("getReferenceKey() takes a resource type, like getReferenceKey(Patient)")

    def reference_key(ref: Any, scope: Scope) -> Any:
        if type(ref) is dict:
            r = ref.get("reference")
            if type(r) is str:
                return scope.ctx.reference_key(r, want)  # Unresolved passes through untouched
        return None

    return _per_item(target, reference_key, "string")


def _b_boundary(high: bool):
    def build(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
        precision = c.const_arg(args[0], "boundary", int) if args else None
        tfn, t = target.fn, target.type
        f = boundary.high if high else boundary.low

        def bound(focus: list, scope: Scope) -> list:
            out = []
            for v in tfn(focus, scope):
                b = f(v, t, precision)
                if b is not None:
                    out.append(b)
            return out

        return Compiled(bound, t if t not in ("instant",) else "dateTime")

    return build


def _b_single(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
    tfn = target.fn

    def single(focus: list, scope: Scope) -> list:
        r = tfn(focus, scope)
        if len(r) > 1:
            raise RowError("not-singleton", f"single(): expected at most one item, got {len(r)}")
        return r

    return Compiled(single, target.type)


def _b_skip_take(take: bool):
    def build(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
        tfn, nfn = target.fn, c.value_arg(args[0], ft)

        def skip_take(focus: list, scope: Scope) -> list:
            n = nfn(focus, scope)
            if len(n) != 1 or type(n[0]) is not int:
                return []
            r = tfn(focus, scope)
            return r[:max(n[0], 0)] if take else r[max(n[0], 0):]

        return Compiled(skip_take, target.type)

    return build


def _b_combine(distinct: bool):
    def build(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
        tfn, ofn = target.fn, c.value_arg(args[0], ft)
        if distinct:
            return Compiled(lambda focus, scope: _union(tfn(focus, scope), ofn(focus, scope)), None)
        return Compiled(lambda focus, scope: tfn(focus, scope) + ofn(focus, scope), None)

    return build


def _string_fn(name: str, nargs: int, f: Callable[..., Any], t: str | None):
    """A function of one string input and constant-or-expression arguments."""

    def build(c: Compiler, target: Compiled, args: tuple, ft: str | None) -> Compiled:
        tfn = target.fn
        afns = [c.value_arg(a, ft) for a in args]

        def string_fn(focus: list, scope: Scope) -> list:
            r = tfn(focus, scope)
            if not r:
                return []
            v = _single(r, name + "()")
            if type(v) is not str:
                return []
            vals = []
            for af in afns:
                a = af(focus, scope)
                if len(a) != 1:
                    return []
                vals.append(a[0])
            try:
                out = f(v, *vals)
            except (TypeError, ValueError, re.error, IndexError):
                return []
            return [] if out is None else [out]

        return Compiled(string_fn, t)

    return build


def _substring(s: str, start: Any, length: Any = None) -> str | None:
    if type(start) is not int or start < 0 or start >= len(s):
        return None
    if length is None:
        return s[start:]
    return s[start:start + length] if type(length) is int else None


_INTEGER = re.compile(r"[+-]?\d+")  # compiled once: re.fullmatch(str, ...) looks its pattern up per call
_DECIMAL = re.compile(r"[+-]?\d+(\.\d+)?")


def _to_integer(r: list) -> list:
    if len(r) != 1:
        return []
    v = r[0]
    if type(v) is int:
        return [v]
    if type(v) is bool:
        return [int(v)]
    if type(v) is str and _INTEGER.fullmatch(v):
        return [int(v)]
    return []


def _to_decimal(r: list) -> list:
    if len(r) != 1:
        return []
    v = r[0]
    if _num(v):
        return [float(v)]
    if type(v) is bool:
        return [1.0 if v else 0.0]
    if type(v) is str and _DECIMAL.fullmatch(v):
        return [float(v)]
    return []


def _distinct(r: list) -> list:
    return _union(r, [])


def _math(f: Callable[[float], Any]):
    def m(r: list) -> list:
        if not r:
            return []
        v = _single(r, "math")
        return [f(v)] if _num(v) else []

    return m


def _round(v: float) -> float:
    try:
        return float(Decimal(repr(v)).quantize(Decimal(1), rounding="ROUND_HALF_UP"))
    except InvalidOperation:  # pragma: no cover - inf / nan cannot come from JSON
        return v


def _not(r: list) -> list:
    b = truth(r, "not()")
    return [] if b is None else [not b]


def _all_bool(want: bool, every: bool):
    def f(r: list) -> list:
        bools = [v for v in r if type(v) is bool]
        return [all(v is want for v in bools)] if every else [any(v is want for v in bools)]

    return f


def _has_value(r: list) -> list:
    return [len(r) == 1 and type(r[0]) in (str, int, float, bool)]


_FUNCTIONS: dict[str, tuple[int, int, Callable[..., Compiled]]] = {
    "where": (1, 1, _b_where),
    "select": (1, 1, _b_select),
    "exists": (0, 1, _b_exists),
    "all": (1, 1, _b_all),
    "empty": (0, 0, _simple("boolean", lambda r: [not r])),
    "count": (0, 0, _simple("integer", lambda r: [len(r)])),
    "first": (0, 0, _b_first),
    "last": (0, 0, _simple(_same, lambda r: r[-1:])),
    "tail": (0, 0, _simple(_same, lambda r: r[1:])),
    "skip": (1, 1, _b_skip_take(False)),
    "take": (1, 1, _b_skip_take(True)),
    "single": (0, 0, _b_single),
    "distinct": (0, 0, _simple(_same, _distinct)),
    "union": (1, 1, _b_combine(True)),
    "combine": (1, 1, _b_combine(False)),
    "not": (0, 0, _simple("boolean", _not)),
    "allTrue": (0, 0, _simple("boolean", _all_bool(True, True))),
    "anyTrue": (0, 0, _simple("boolean", _all_bool(True, False))),
    "allFalse": (0, 0, _simple("boolean", _all_bool(False, True))),
    "anyFalse": (0, 0, _simple("boolean", _all_bool(False, False))),
    "hasValue": (0, 0, _simple("boolean", _has_value)),
    "iif": (2, 3, _b_iif),
    "ofType": (1, 1, None),  # type: ignore[dict-item]  # handled in Compiler.call
    "as": (1, 1, None),  # type: ignore[dict-item]
    "is": (1, 1, None),  # type: ignore[dict-item]
    "extension": (1, 1, _b_extension),
    "join": (0, 1, _b_join),
    "getResourceKey": (0, 0, _b_resource_key),
    "getReferenceKey": (0, 1, _b_reference_key),
    "lowBoundary": (0, 1, _b_boundary(False)),
    "highBoundary": (0, 1, _b_boundary(True)),
    "trace": (1, 2, _simple(_same, lambda r: r)),
    "toString": (0, 0, _simple("string", lambda r: [t] if len(r) == 1 and (t := to_text(r[0])) is not None else [])),
    "toInteger": (0, 0, _simple("integer", _to_integer)),
    "toDecimal": (0, 0, _simple("decimal", _to_decimal)),
    "startsWith": (1, 1, _string_fn("startsWith", 1, lambda s, p: s.startswith(p), "boolean")),
    "endsWith": (1, 1, _string_fn("endsWith", 1, lambda s, p: s.endswith(p), "boolean")),
    "contains": (1, 1, _string_fn("contains", 1, lambda s, p: p in s, "boolean")),
    "matches": (1, 1, _string_fn("matches", 1, lambda s, p: re.search(p, s, re.DOTALL) is not None, "boolean")),
    "replace": (2, 2, _string_fn("replace", 2, lambda s, a, b: s.replace(a, b), "string")),
    "indexOf": (1, 1, _string_fn("indexOf", 1, lambda s, p: s.find(p), "integer")),
    "substring": (1, 2, _string_fn("substring", 2, _substring, "string")),
    "lower": (0, 0, _string_fn("lower", 0, str.lower, "string")),
    "upper": (0, 0, _string_fn("upper", 0, str.upper, "string")),
    "trim": (0, 0, _string_fn("trim", 0, str.strip, "string")),
    "length": (0, 0, _string_fn("length", 0, len, "integer")),
    "abs": (0, 0, _simple(_same, _math(abs))),
    "floor": (0, 0, _simple("integer", _math(math.floor))),
    "ceiling": (0, 0, _simple("integer", _math(math.ceil))),
    "truncate": (0, 0, _simple("integer", _math(math.trunc))),
    "round": (0, 0, _simple("decimal", _math(_round))),
}
