"""Reading the columns of one select from one focus item, sharing common path prefixes.

Views repeat prefixes: `value.ofType(Quantity).value`, `.code`, `.unit`;
`code.coding.first().code` and `.display`. The member chains of a select's columns are
merged into a trie, and one closure per trie node does the lookup once for every column
below it, which is what a hand-written extractor does by keeping a local variable.
Constant columns are filled in from a template; other columns call their own closure.

A column whose chain meets a repeating element without an index gets DEFER: the select
then evaluates that column with its list closure (a list, or RowError when it is not a
collection column).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .compiler import DEFER, Compiled, Scope, _lookup, holds, item_of

Reader = Callable[[Any, Scope], list]
Visit = Callable[[Any, list], None]
# One child of a trie node: (key, candidate keys of a choice element or None, what to do
# with its value, the column it fills when it is a plain leaf or -1). Typed, so that the
# compiled build unpacks it without generic tuple operations.
Kid = tuple[str, Any, Visit, int]


class _Node:
    __slots__ = ("step", "children", "ends")

    def __init__(self, step: tuple):
        self.step = step
        self.children: dict[tuple, _Node] = {}
        self.ends: list[int] = []

    def under(self) -> list[int]:
        out = list(self.ends)
        for c in self.children.values():
            out.extend(c.under())
        return out


def _as_list(fn: Callable[[list, Scope], Any]) -> Callable[[Any, Scope], list]:
    return lambda f, scope: list(fn([f], scope))


def make_reader(columns: list[tuple[Compiled, bool]]) -> Reader:
    """`read(f, scope) -> list` of the own column values of a select, DEFER where several."""
    template: list[Any] = [None] * len(columns)
    others: list[tuple[int, Callable[[Any, Scope], Any]]] = []
    roots: dict[tuple, _Node] = {}
    for i, (c, collection) in enumerate(columns):
        if collection:
            others.append((i, _as_list(c.fn)))
        elif c.const is not None and len(c.const) <= 1:
            template[i] = c.const[0] if c.const else None
        elif c.chain:  # a non-empty member chain: into the trie
            level = roots
            node = None
            for step in c.chain:
                node = level.get(step)
                if node is None:
                    node = level[step] = _Node(step)
                level = node.children
            assert node is not None
            node.ends.append(i)
        else:
            others.append((i, item_of(c)))
    kids = _kids(roots)
    others_t = tuple(others)

    if not kids:
        def read_others(f: Any, scope: Scope) -> list:
            out = template.copy()
            for i, fn in others_t:
                out[i] = fn(f, scope)
            return out
        return read_others

    def read(f: Any, scope: Scope) -> list:
        out = template.copy()
        for i, fn in others_t:
            out[i] = fn(f, scope)
        if type(f) is dict:
            _descend(f, kids, out)
        return out

    return read


def _descend(x: dict, kids: tuple[Kid, ...], out: list) -> None:
    """Look up every child key in x; plain leaves are stored here, the rest visit on."""
    for key, cands, visit, leaf in kids:
        v = x.get(key) if cands is None else _lookup(x, key, cands)
        if v is not None:
            if leaf >= 0 and type(v) is not list:
                out[leaf] = v
            else:
                visit(v, out)


def _kids(level: dict[tuple, _Node]) -> tuple[Kid, ...]:
    """(key, candidates, visitor, leaf column or -1) for each node of one trie level."""
    out: list[Kid] = []
    for node in level.values():
        key, cands, pick = node.step
        leaf = node.ends[0] if pick is None and not node.children and len(node.ends) == 1 else -1
        out.append((key, cands, _visitor(node), leaf))
    return tuple(out)


def _visitor(node: _Node) -> Visit:
    """What to do with the value found for this node's step (never None)."""
    pick: int | None = node.step[2]
    kids = _kids(node.children)
    ends = tuple(node.ends)
    under = tuple(node.under())

    def visit(v: Any, out: list) -> None:
        if type(v) is list:
            if holds(v, None):
                v = [o for o in v if o is not None]
            if pick is None:
                if len(v) != 1:
                    if v:  # several items: the columns below take the list path
                        for i in under:
                            out[i] = DEFER
                    return
                v = v[0]
            elif pick < len(v):
                v = v[pick]
            else:
                return
        elif pick:
            return
        for i in ends:
            out[i] = v
        if kids and type(v) is dict:
            _descend(v, kids, out)

    return visit
