"""Shared test fixtures.

The core suite runs on `fixtures/` alone. Tests on the real public samples in
`../shared/data` (or $TWIN_SHARED_DATA) use the `shared_data` fixture, which skips with
a clear reason in a clone that does not have them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
SHARED = Path(os.environ.get("TWIN_SHARED", REPO.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"
CONFORMANCE = SHARED / "conformance" / "sql-on-fhir-v2"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the public sample data is not here ({SHARED_DATA}); set TWIN_SHARED to the folder holding data/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"the SQL-on-FHIR v2 test suite is not here ({CONFORMANCE}); set TWIN_SHARED")
    return CONFORMANCE


@contextlib.contextmanager
def secret_key(key: str) -> Iterator[None]:
    """TWIN_KEY set to `key` (the privacy profiles refuse the public development key),
    restored afterwards; usable in module-scoped fixtures, where monkeypatch is not."""
    from pipeline import keys

    mp = pytest.MonkeyPatch()
    mp.setenv("TWIN_KEY", key)
    keys.secret_key.cache_clear()
    try:
        yield
    finally:
        mp.undo()
        keys.secret_key.cache_clear()
