"""Turning FHIR references into the keys stored in the tables.

Three kinds of reference reach the views:

- literal: `Patient/123`, `http://server/fhir/Patient/123`, `Patient/123/_history/2` -> `123`;
- `urn:uuid:...` fullUrls inside a transaction Bundle -> the id of the entry it names;
- conditional: `Practitioner?identifier=system|value` -> the id of the resource that holds
  that identifier, found in this run or in an earlier one (the `resource_identifier`
  table). Bulk exports write these, and the target usually sits in another file.

When a conditional reference names a resource not seen yet, `Unresolved` is raised and
the ingest stage sets the resource aside until the whole input has been read; only then
is a reference that still does not resolve stored as null (and counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from .fhir import RESOURCE_TYPES
from .views import Unresolved, ViewContext

_AMBIGUOUS = "\x00ambiguous"


class IdentifierIndex:
    """(type, system, value) -> id for directory resources, across files and runs."""

    def __init__(self, load_stored: Callable[[], Iterable[tuple[str, str, str, str]]] | None = None):
        self._exact: dict[tuple[str, str, str], str] = {}
        self._by_value: dict[tuple[str, str], str] = {}
        self._load_stored = load_stored
        self._stored_loaded = load_stored is None

    def add(self, rtype: str, system: str, value: str, rid: str) -> None:
        self._exact[(rtype, system, value)] = rid
        k = (rtype, value)
        old = self._by_value.get(k)
        self._by_value[k] = rid if old is None or old == rid else _AMBIGUOUS

    def lookup(self, rtype: str, system: str | None, value: str) -> str | None:
        rid = self._find(rtype, system, value)
        if rid is None and not self._stored_loaded:
            self._stored_loaded = True
            assert self._load_stored is not None
            for t, s, v, i in self._load_stored():
                if (t, s, v) not in self._exact:
                    self.add(t, s, v, i)
            rid = self._find(rtype, system, value)
        return rid

    def _find(self, rtype: str, system: str | None, value: str) -> str | None:
        if system is not None:
            return self._exact.get((rtype, system, value))
        rid = self._by_value.get((rtype, value))
        return None if rid == _AMBIGUOUS else rid


def identifiers_of(resource: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for ident in resource.get("identifier") or ():
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system")
            out.append((system if isinstance(system, str) else "", ident["value"]))
    return out


def split_literal(reference: str) -> tuple[str | None, str | None]:
    """`[base/]Type/id[/_history/v]` -> (Type, id); (None, None) when it is not one."""
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] in RESOURCE_TYPES and parts[-1]:
        return parts[-2], parts[-1]
    return None, None


class Resolver(ViewContext):
    """The ViewContext the ingest stage gives the views. Set `full_urls` per resource."""

    def __init__(self, index: IdentifierIndex):
        self.index = index
        self.full_urls: Mapping[str, str] | None = None
        self.final = False
        self.unresolved: dict[str, int] = {}

    def reference_key(self, reference: str, type_filter: str | None) -> str | None:
        if not isinstance(reference, str):
            return None
        fu = self.full_urls
        target = fu.get(reference) if fu else None
        if target is not None:
            rtype, _, rid = target.partition("/")
        elif reference.startswith("urn:"):
            self._miss("urn")
            return None
        elif "?" in reference:
            rtype, _, query = reference.partition("?")
            rtype = rtype.rsplit("/", 1)[-1]
            found = self._conditional(rtype, query)
            if found is None:
                if not self.final:
                    raise Unresolved(reference)
                self._miss(rtype)
                return None
            rid = found
        else:
            t, i = split_literal(reference)
            if t is None:
                return None
            rtype, rid = t, i  # type: ignore[assignment]
        if type_filter is not None and rtype != type_filter:
            return None
        return rid

    def _miss(self, kind: str) -> None:
        self.unresolved[kind] = self.unresolved.get(kind, 0) + 1

    def _conditional(self, rtype: str, query: str) -> str | None:
        for name, val in parse_qsl(query, keep_blank_values=True):
            if name == "identifier" and val:
                system, sep, value = val.partition("|")
                return self.index.lookup(rtype, system if sep else None, value if sep else system)
        return None
