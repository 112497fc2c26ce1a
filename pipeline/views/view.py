"""A ViewDefinition, checked and compiled into a function from one resource to rows.

Implements the SQL-on-FHIR v2 ViewDefinition
(https://sql-on-fhir.org/ig/StructureDefinition-ViewDefinition.html) and its processing
model (https://sql-on-fhir.org/ig/processing_model.html): `select` with `column`,
nested `select`, `forEach`, `forEachOrNull`, `repeat` and `unionAll`; `where`;
`constant`; `%rowIndex`; collection columns.

Each select structure becomes one closure `emit(item, scope) -> list[tuple]` that
returns its partial rows; a row of a select is its own columns, then those of its
nested selects, then those of its unionAll, so a parent joins partial rows by tuple
concatenation, in column order, without names or dicts on the hot path.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from . import model
from .columns import make_reader
from .compiler import DEFER, Compiled, Compiler, Scope, holds, truth
from .context import DEFAULT_CONTEXT, ViewContext
from .errors import RowError, ViewError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESOURCE = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_SELECT_KEYS = {"column", "select", "forEach", "forEachOrNull", "repeat", "unionAll"}
_COLUMN_KEYS = {"name", "path", "type", "collection", "description", "tag", "tags", "id", "extension"}
# constant value[x] types allowed by the ViewDefinition model, and the JSON type each needs
_CONSTANT_TYPES: dict[str, tuple[type, ...]] = {
    "base64Binary": (str,), "boolean": (bool,), "canonical": (str,), "code": (str,), "date": (str,),
    "dateTime": (str,), "decimal": (int, float), "id": (str,), "instant": (str,), "integer": (int,),
    "integer64": (int, str), "oid": (str,), "string": (str,), "positiveInt": (int,), "time": (str,),
    "unsignedInt": (int,), "uri": (str,), "url": (str,), "uuid": (str,),
}

Emit = Callable[[Any, Scope], list]


class Column(NamedTuple):
    name: str
    type: str | None
    collection: bool
    description: str | None


class _Select(NamedTuple):
    emit: Emit
    columns: list[Column]


class CompiledView:
    """A compiled ViewDefinition. Thread-safe: rows() keeps its state in a fresh Scope."""

    def __init__(self, name: str | None, resource: str, columns: list[Column],
                 wheres: list[tuple[str, Callable]], emit: Emit):
        self.name = name
        self.resource = resource
        self.columns = columns
        self._wheres = wheres
        self._emit = emit

    def rows(self, resource: Any, ctx: ViewContext | None = None) -> list[tuple]:
        """The rows one resource yields, values in column order.

        [] when it is another resource type or the view's `where` excludes it. Raises
        RowError (with a `reason`) when the resource breaks a rule of the view, and lets
        the context's Unresolved through untouched.
        """
        if type(resource) is not dict or resource.get("resourceType") != self.resource:
            return []
        scope = Scope(resource, ctx or DEFAULT_CONTEXT)
        focus = [resource]
        for path, fn in self._wheres:
            r = fn(focus, scope)
            if not r:
                return []
            if len(r) != 1 or type(r[0]) is not bool:
                raise RowError("where-not-boolean", f"where {path!r} did not give one boolean")
            if not r[0]:
                return []
        return self._emit(resource, scope)

    def run(self, resources: Iterable[dict], ctx: ViewContext | None = None) -> list[dict]:
        """Every row of every resource, as dicts keyed by column name (a convenience)."""
        names = [c.name for c in self.columns]
        return [dict(zip(names, row, strict=True)) for r in resources for row in self.rows(r, ctx)]

    def __repr__(self) -> str:
        return f"<CompiledView {self.name or '?'} of {self.resource}: {len(self.columns)} columns>"


def compile_view(view_definition: Any) -> CompiledView:
    """Check a ViewDefinition and compile it; raises ViewError naming every problem's place."""
    v = view_definition
    if not isinstance(v, dict):
        raise ViewError(f"a ViewDefinition must be a JSON object, not {type(v).__name__}")
    resource = v.get("resource")
    if not isinstance(resource, str) or not _RESOURCE.match(resource):
        raise ViewError("the view needs `resource`: the FHIR resource type it reads, like \"Patient\"")
    name = v.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ViewError("`name` must be letters, digits and underscores, starting with a letter")
    selects = v.get("select")
    if not isinstance(selects, list) or not selects:
        raise ViewError("the view needs `select`: a list of select structures")
    compiler = Compiler(_constants(v.get("constant")))
    focus_type = resource if model.is_known_type(resource) else None

    wheres = []
    raw_wheres = v.get("where", [])
    if not isinstance(raw_wheres, list):
        raise ViewError("`where` must be a list of {\"path\": ...}")
    for i, w in enumerate(raw_wheres):
        if not isinstance(w, dict) or not isinstance(w.get("path"), str):
            raise ViewError(f"where[{i}] needs a `path` string")
        c = compiler.expression(w["path"], focus_type, f"where[{i}]")
        if c.type is not None and c.type != "boolean":
            raise ViewError(f"where[{i}]: {w['path']!r} gives {c.type}, not a boolean; "
                            "compare it (= 'x') or test it (.exists())")
        wheres.append((w["path"], c.fn))

    # one top-level select is the whole view: no container level to join through
    top = _compile_select(selects[0] if len(selects) == 1 else {"select": selects},
                          "select[0]" if len(selects) == 1 else "", compiler, focus_type, [])
    return CompiledView(name, resource, top.columns, wheres, top.emit)


def _constants(raw: Any) -> dict[str, tuple[tuple, str | None]]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ViewError("`constant` must be a list of {\"name\": ..., \"value[x]\": ...}")
    out: dict[str, tuple[tuple, str | None]] = {}
    for i, c in enumerate(raw):
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise ViewError(f"constant[{i}] needs a `name` of letters, digits and underscores")
        values = [(k[5:], val) for k, val in c.items() if k.startswith("value") and len(k) > 5]
        if len(values) != 1:
            raise ViewError(f"constant %{name} needs exactly one value[x] (valueString, valueInteger, ...)")
        suffix, val = values[0]
        t = suffix[0].lower() + suffix[1:]
        kinds = _CONSTANT_TYPES.get(t)
        if kinds is None:
            raise ViewError(f"constant %{name}: value{suffix} is not a type a constant can have")
        if type(val) not in kinds:
            raise ViewError(f"constant %{name}: value{suffix} must be a JSON {kinds[0].__name__}")
        if name in out:
            raise ViewError(f"constant %{name} is defined twice")
        out[name] = ((val,), t)
    return out


def _compile_select(s: Any, where: str, compiler: Compiler, ft: str | None, seen: list[str]) -> _Select:
    """Compile one select structure; `seen` holds the column names defined before it."""
    if not isinstance(s, dict):
        raise ViewError(f"{where} must be a JSON object")
    unknown = set(s) - _SELECT_KEYS
    if unknown:
        raise ViewError(f"{where}: unknown key(s) {sorted(unknown)} (a select has {sorted(_SELECT_KEYS)})")
    iterators = [k for k in ("forEach", "forEachOrNull", "repeat") if k in s]
    if len(iterators) > 1:
        raise ViewError(f"{where}: use only one of forEach, forEachOrNull and repeat")

    focus_fn: Callable[[Any, Scope], list] | None = None
    or_null = "forEachOrNull" in s
    inner_type = ft
    if iterators and iterators[0] != "repeat":
        key = iterators[0]
        c = compiler.expression(s[key], ft, f"{where}.{key}")
        focus_fn = _focus_of(c)
        inner_type = c.type
    elif iterators:
        focus_fn, inner_type = _repeat(s["repeat"], compiler, ft, f"{where}.repeat")

    columns: list[Column] = []
    compiled: list[tuple[Compiled, bool]] = []
    empty_fns: list[Callable[[list, Scope], Any]] = []  # value from a focus list
    raw_columns = s.get("column", [])
    if not isinstance(raw_columns, list):
        raise ViewError(f"{where}.column must be a list")
    for i, col in enumerate(raw_columns):
        column, c, empty_fn = _compile_column(col, f"{where}.column[{i}]", compiler, inner_type)
        _claim(column.name, seen, f"{where}.column[{i}]")
        columns.append(column)
        compiled.append((c, column.collection))
        empty_fns.append(empty_fn)

    parts: list[_Select] = []
    raw_selects = s.get("select", [])
    if not isinstance(raw_selects, list):
        raise ViewError(f"{where}.select must be a list")
    for i, sub in enumerate(raw_selects):
        sel = _compile_select(sub, f"{where}.select[{i}]".lstrip("."), compiler, inner_type, seen)
        parts.append(sel)
        columns.extend(sel.columns)

    union: list[_Select] = []
    if "unionAll" in s:
        branches = s["unionAll"]
        if not isinstance(branches, list) or not branches:
            raise ViewError(f"{where}.unionAll must be a non-empty list of selects")
        for i, b in enumerate(branches):
            union.append(_compile_select(b, f"{where}.unionAll[{i}]", compiler, inner_type, list(seen)))
        first = union[0].columns
        for i, b in enumerate(union[1:], 1):
            if [c.name for c in b.columns] != [c.name for c in first]:
                raise ViewError(f"{where}.unionAll[{i}] has columns {[c.name for c in b.columns]}, but "
                                f"unionAll[0] has {[c.name for c in first]}: every branch needs the same "
                                "columns in the same order")
            for a, other in zip(first, b.columns, strict=True):
                if a.type and other.type and a.type != other.type or a.collection != other.collection:
                    raise ViewError(f"{where}.unionAll[{i}] column {other.name!r} differs in type or collection "
                                    "from unionAll[0]")
        for col in first:
            _claim(col.name, seen, f"{where}.unionAll")
        columns.extend(first)

    emit = _emitter(make_reader(compiled) if compiled else None, empty_fns, [p.emit for p in parts], [u.emit for u in union],
                    focus_fn, or_null, len(columns))
    return _Select(emit, columns)


def _claim(name: str, seen: list[str], where: str) -> None:
    if name in seen:
        raise ViewError(f"{where}: column {name!r} is defined twice in this view")
    seen.append(name)


def _compile_column(col: Any, where: str, compiler: Compiler, ft: str | None) -> tuple[Column, Compiled, Callable]:
    if not isinstance(col, dict):
        raise ViewError(f"{where} must be a JSON object")
    name, path = col.get("name"), col.get("path")
    if not isinstance(path, str):
        raise ViewError(f"{where} needs a `path` string")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ViewError(f"{where} needs a `name` of letters, digits and underscores, starting with a letter")
    unknown = set(col) - _COLUMN_KEYS
    if unknown:
        raise ViewError(f"{where}: unknown key(s) {sorted(unknown)}")
    collection = col.get("collection", False)
    if not isinstance(collection, bool):
        raise ViewError(f"{where}.collection must be true or false")
    ctype = col.get("type")
    if ctype is not None and not isinstance(ctype, str):
        raise ViewError(f"{where}.type must be a FHIR type name")
    desc = col.get("description")
    c = compiler.expression(path, ft, f"{where} ({name})")
    return Column(name, ctype, collection, desc if isinstance(desc, str) else None), c, \
        _column_fn(c, name, path, collection)


def _column_fn(c: Compiled, name: str, path: str, collection: bool) -> Callable[[list, Scope], Any]:
    """The column's value from a focus list: a list for a collection column, else one value.

    The select's reader (columns.py) answers most columns from one item; this is asked
    when it answered DEFER (several values: RowError unless a collection), and for the
    empty focus of forEachOrNull.
    """
    fn = c.fn
    if collection:
        return lambda focus, scope: list(fn(focus, scope))

    def one(focus: list, scope: Scope) -> Any:
        r = fn(focus, scope)
        if not r:
            return None
        if len(r) == 1:
            return r[0]
        raise RowError("multiple-values", f"column {name} ({path!r}) gave {len(r)} values but is not a "
                                          "collection: add first() or \"collection\": true")

    return one


def _focus_of(c: Compiled) -> Callable[[Any, Scope], list]:
    fn = c.fn
    return lambda item, scope: fn([item], scope)


def _repeat(paths: Any, compiler: Compiler, ft: str | None, where: str):
    """`repeat`: every node reachable by applying the paths again and again, depth first."""
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ViewError(f"{where} must be a non-empty list of FHIRPath strings")
    start = [compiler.expression(p, ft, f"{where}[{i}]") for i, p in enumerate(paths)]
    t = start[0].type  # the nodes reached have the type the first path gives
    again = [compiler.expression(p, t, f"{where}[{i}]").fn for i, p in enumerate(paths)]
    first = [c.fn for c in start]

    def repeat(item: Any, scope: Scope) -> list:
        out: list = []
        todo: list = []
        for fn in first:
            todo.extend(fn([item], scope))
        todo.reverse()
        while todo:  # an explicit stack: document order, and no recursion limit on deep data
            node = todo.pop()
            out.append(node)
            children: list = []
            for fn in again:
                children.extend(fn([node], scope))
            todo.extend(reversed(children))
        return out

    return repeat, t


def _emitter(read: Callable[[Any, Scope], list] | None, empties: list, subs: list[Emit], union: list[Emit],
             focus_fn, or_null: bool, width: int) -> Emit:
    """The closure that turns one item into this select's partial rows."""

    def head_of(f: Any, scope: Scope) -> tuple:
        if read is None:
            return ()
        values = read(f, scope)
        if holds(values, DEFER):  # a column with several values: a list, or RowError
            focus = [f]
            return tuple([empties[i](focus, scope) if v is DEFER else v for i, v in enumerate(values)])
        return tuple(values)

    def rows_for(f: Any, scope: Scope) -> list[tuple]:
        head = head_of(f, scope)
        if not subs and not union:
            return [head]
        parts = [s(f, scope) for s in subs]
        if union:
            u: list = []
            for b in union:
                u.extend(b(f, scope))
            parts.append(u)
        if len(parts) == 1:
            return [head + r for r in parts[0]]
        if all(len(p) == 1 for p in parts):
            row = head
            for p in parts:
                row += p[0]
            return [row]
        return [head + tuple(itertools.chain.from_iterable(combo)) for combo in itertools.product(*parts)]

    if focus_fn is None:
        return rows_for

    def iterate(item: Any, scope: Scope) -> list[tuple]:
        foci = focus_fn(item, scope)
        saved = scope.row_index
        out: list[tuple] = []
        for i, f in enumerate(foci):
            scope.row_index = i
            out.extend(rows_for(f, scope))
        if not foci and or_null:
            # no item: one row, own columns seen over an empty focus (so %rowIndex is 0), the rest null
            scope.row_index = 0
            head = tuple([c([], scope) for c in empties])
            out.append(head + (None,) * (width - len(head)))
        scope.row_index = saved
        return out

    return iterate


__all__ = ["Column", "CompiledView", "compile_view", "truth"]
