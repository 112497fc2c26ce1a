"""The hooks behind getResourceKey() and getReferenceKey(), and how a caller defers.

SQL-on-FHIR leaves key computation to the implementation. The views compute keys only
through a `ViewContext`, so the pipeline can subclass it to resolve `urn:uuid:`
references within a Bundle and conditional references, while tests and the conformance
suite use the default: the resource `id`, and the id part of a literal reference.
"""

from __future__ import annotations

from typing import Any


class Unresolved(Exception):
    """Raised by a ViewContext when a reference can be resolved only later.

    The runner lets it propagate out of `CompiledView.rows()` untouched; the caller sets
    the resource aside until the rest of the input has been read, then runs it again.
    """


class ViewContext:
    """Default keys: `id` for resources, `Type/id` (any base URL, any `_history`) for references."""

    def resource_key(self, resource: dict[str, Any]) -> str | None:
        key = resource.get("id") if type(resource) is dict else None
        return key if type(key) is str else None

    def reference_key(self, reference: str, type_filter: str | None) -> str | None:
        if type(reference) is not str:
            return None
        if "/_history/" in reference:
            reference = reference[:reference.index("/_history/")]
        head, _, rid = reference.rpartition("/")
        rtype = head.rpartition("/")[2]
        if not (rid and rtype[:1].isupper() and rtype.isalnum()) or "?" in rid or "#" in rid:
            return None
        if type_filter is not None and rtype != type_filter:
            return None
        return rid


DEFAULT_CONTEXT = ViewContext()
