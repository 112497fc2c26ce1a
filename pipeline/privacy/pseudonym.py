"""Pseudonymisation: identifiers and logical ids replaced by a keyed hash (HMAC-SHA256).

The same value gives the same pseudonym in every source, run and machine that shares the
key (pipeline/keys.py: TWIN_KEY or TWIN_KEY_FILE, never the store), so records still link
across sources by identifier and references still resolve; without the key a pseudonym
cannot be reversed by hashing guessed MRNs.

What is replaced, in a FHIR resource (every connector's units are FHIR, except device rows):
- every Identifier.value, wherever it sits (resource, Reference.identifier, extensions
  with valueIdentifier, contained resources), and the value of a conditional reference
  `Type?identifier=system|value`; the system is kept (linking needs the namespace);
- the logical id of the resource (`ids = true`) and every literal reference to one
  (`Type/id`, `base/Type/id`, with or without `_history`), and the targets of the Bundle's
  fullUrl map, so that `urn:uuid:` references land on the new ids;
- in device rows (Rows units): the patient column of every table, patient_identifier.value.
The value is hashed as it is (no normalisation), so `00123` and `123` stay different, as
they are to the linker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote

from ..keys import keyed_hash
from ..references import split_literal


def pseudonym(value: str) -> str:
    """The pseudonym of an identifier value (any system: aliased namespaces still link)."""
    return keyed_hash("identifier", value)


def pseudonym_id(rtype: str, rid: str) -> str:
    """The pseudonym of a logical id; a valid FHIR id (32 hex characters)."""
    return keyed_hash("id", rtype, rid)


def pseudonym_reference(reference: str, ids: bool) -> str:
    """A reference with its id (ids=True) or conditional identifier value replaced."""
    if reference.startswith(("#", "urn:")):
        return reference  # contained (local) or resolved through the Bundle's fullUrl map
    if "?" in reference:
        head, _, query = reference.partition("?")
        params = []
        for name, val in parse_qsl(query, keep_blank_values=True):
            if name == "identifier" and val:
                system, sep, value = val.partition("|")
                val = f"{system}|{pseudonym(value)}" if sep else pseudonym(system)
            params.append(f"{name}={quote(val, safe='|:/')}")
        return f"{head}?{'&'.join(params)}"
    if not ids:
        return reference
    rtype, rid = split_literal(reference)
    if rtype is None or rid is None:
        return reference
    return f"{rtype}/{pseudonym_id(rtype, rid)}"


_IDENTIFIER_KEYS = frozenset(("identifier", "valueIdentifier"))


def _walk(node: Any, ids: bool) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _IDENTIFIER_KEYS:
                out[k] = [_identifier(i, ids) for i in v] if isinstance(v, list) else _identifier(v, ids)
            elif k == "reference" and isinstance(v, str):
                out[k] = pseudonym_reference(v, ids)
            else:
                out[k] = _walk(v, ids)
        return out
    if isinstance(node, list):
        return [_walk(v, ids) for v in node]
    return node


def _identifier(ident: Any, ids: bool) -> Any:
    out = _walk(ident, ids)
    if isinstance(out, dict) and isinstance(out.get("value"), str):
        out["value"] = pseudonym(out["value"])
    return out


class Pseudonymiser:
    """Resource -> the same resource with identifiers and (ids=True) logical ids replaced."""

    def __init__(self, *, ids: bool = True):
        self.ids = ids

    def resource(self, res: dict[str, Any]) -> dict[str, Any]:
        out = _walk(res, self.ids)
        rid = res.get("id")
        if self.ids and isinstance(rid, str) and rid:
            out["id"] = pseudonym_id(res["resourceType"], rid)
        return out

    def full_urls(self, full_urls: Mapping[str, str] | None) -> Mapping[str, str] | None:
        """The Bundle's fullUrl -> Type/id map, pointing at the new ids."""
        if not full_urls or not self.ids:
            return full_urls
        out = {}
        for url, target in full_urls.items():
            rtype, _, rid = target.partition("/")
            out[url] = f"{rtype}/{pseudonym_id(rtype, rid)}"
        return out
