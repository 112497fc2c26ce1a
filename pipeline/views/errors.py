"""The two ways a view can fail, told apart by when they happen.

`ViewError` is raised by `compile_view` for a ViewDefinition that is not valid: a
configuration problem, fatal, fixed by editing the view. `RowError` is raised by
`CompiledView.rows` when one resource breaks a rule the view relies on (two values for
a column that is not a collection, a `where` that is not boolean): the caller
quarantines that resource under `reason` and goes on. Messages name the view's own
paths and columns, never values from the resource.
"""

from __future__ import annotations


class ViewError(ValueError):
    """The ViewDefinition is not valid (found at compile time)."""


class RowError(ViewError):
    """One resource cannot be put through the view; `reason` is a stable kebab-case code."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)
