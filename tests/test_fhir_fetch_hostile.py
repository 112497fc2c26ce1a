"""Whatever JSON a server sends, the fetch answers with units or a clear error, never a crash."""

from __future__ import annotations

from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.connectors.fhir_server import (
    FetchOptions,
    _deletions,
    _export_errors,
    _next_link,
    _server_time,
    fetch_fhir,
    search_entry,
)
from pipeline.errors import TwinlineError
from pipeline.units import Deletion, Rejected, Resource

KEYS = ["resourceType", "id", "entry", "request", "url", "method", "type", "output", "deleted", "error",
        "transactionTime", "link", "relation", "meta", "lastUpdated", "search", "mode", "resource", "issue",
        "severity", "code", "count", "requiresAccessToken"]
VALUES = ["Bundle", "Patient", "OperationOutcome", "DELETE", "outcome", "include", "next", "error", "Patient/1",
          "https://fhir.example.org/r4/x", "http://elsewhere.example/x", "2024-05-01T00:00:00Z", "a b", ""]

# what orjson.loads can produce: 64-bit integers, finite floats
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8) | \
    st.sampled_from(VALUES)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=6),
                           max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_search_entry_is_a_unit_or_nothing(entry):
    unit = search_entry(entry, "GET Patient: page 1 entry 0")
    assert unit is None or isinstance(unit, Resource | Rejected)
    if isinstance(unit, Rejected):
        assert unit.reason and unit.source_ref == "GET Patient: page 1 entry 0"


@settings(max_examples=300, deadline=None)
@given(json_values, st.text(max_size=40))
def test_any_bundle_links_and_dates_are_read_or_ignored(bundle, date):
    if isinstance(bundle, dict):
        url = _next_link(bundle, "https://fhir.example.org/r4/Patient")
        assert url is None or isinstance(url, str)
        mark = _server_time(bundle, date)
        assert mark is None or isinstance(mark[1], str)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_deleted_or_error_line_becomes_units(obj):
    raw = orjson.dumps(obj)
    for unit in [*_deletions(obj, "bulk deleted.000.ndjson:1", raw), *_export_errors(obj, "bulk error.000.ndjson:1", raw)]:
        assert isinstance(unit, Deletion | Rejected)


_bulk = fetch_fhir(FetchOptions(base_url="https://fhir.example.org/r4", bulk=True, state_dir=Path("/nonexistent")))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_manifest_is_accepted_or_refused_clearly(doc):
    try:
        manifest = _bulk._checked_manifest(doc, "https://fhir.example.org/r4/$export-status/1")
    except TwinlineError as e:
        assert str(e)
        return
    assert {"transactionTime", "requiresAccessToken", "files", "problems"} <= set(manifest)
    for f in manifest["files"]:
        assert f["url"].startswith("https://fhir.example.org/") and f["name"].endswith(".ndjson")


def test_manifest_names_never_become_paths():
    """A manifest's `type` names the local file only when it is a FHIR resource type: a
    hostile one (`../../etc/cron.d/x`, an absolute path, a NUL) cannot place a file."""
    hostile = ["../../etc/cron.d/x", "/etc/passwd", "Patient/../../x", "Observation\x00.sh", "..", "C:\\x"]
    doc = {"transactionTime": "2026-01-01T00:00:00Z", "request": "https://fhir.example.org/r4/$export",
           "requiresAccessToken": True,
           "output": [{"type": t, "url": f"https://fhir.example.org/r4/files/{i}.ndjson"} for i, t in enumerate(hostile)]
           + [{"type": "Patient", "url": "https://fhir.example.org/r4/files/p.ndjson"}]}
    manifest = _bulk._checked_manifest(doc, "https://fhir.example.org/r4/$export-status/1")
    names = [f["name"] for f in manifest["files"]]
    assert names == [f"output.{i:03d}.ndjson" for i in range(len(hostile))] + ["Patient.000.ndjson"]
    assert all("/" not in n and "\\" not in n and ".." not in n.replace("...", "") for n in names)
