"""Shared test fixtures.

The core suite runs on `fixtures/` alone. Tests on the real public samples in
`../shared/data` (or $TWIN_SHARED_DATA) use the `shared_data` fixture, which skips with
a clear reason in a clone that does not have them.
"""

from __future__ import annotations

import os
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
