"""Twinline's SQL-on-FHIR v2 view runner.

    view = compile_view(view_definition)       # ViewError if the view is invalid
    view.rows(resource, ctx) -> list[tuple]    # values in the order of view.columns
    view.run(resources, ctx) -> list[dict]

FHIRPath expressions are compiled once into closures (parser.py -> compiler.py); a
ViewDefinition into one function per select structure (view.py). Keys come only from
a `ViewContext` (context.py). The supported FHIRPath subset and its limits are in
docs/views.md.
"""

from .context import Unresolved, ViewContext
from .errors import RowError, ViewError
from .view import Column, CompiledView, compile_view

__all__ = ["Column", "CompiledView", "RowError", "Unresolved", "ViewContext", "ViewError", "compile_view"]
