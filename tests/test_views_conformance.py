"""The official SQL-on-FHIR v2 test suite, one pytest case per test.

Runs the copy in fixtures/sql-on-fhir-v2 always, and the one in ../shared when it is
there (the two should be the same files; running both catches a stale copy).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.views.conformance import TestResult, main, run_test_file, run_test_folder

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sql-on-fhir-v2"


def _cases(folder: Path) -> list[tuple[Path, int, str]]:
    import orjson

    cases = []
    for p in sorted(folder.glob("*.json")):
        for i, t in enumerate(orjson.loads(p.read_bytes())["tests"]):
            cases.append((p, i, f"{p.stem}: {t['title']}"))
    return cases


CASES = _cases(FIXTURES)


def test_the_fixture_copy_is_complete():
    assert len(list(FIXTURES.glob("*.json"))) == 22
    assert len(CASES) == 134


@pytest.mark.parametrize(("path", "index"), [(p, i) for p, i, _ in CASES], ids=[name for _, _, name in CASES])
def test_official(path: Path, index: int):
    result = run_test_file(path)[index]
    assert result.passed, result.message


def test_official_suite_in_shared(conformance_dir: Path):
    results = run_test_folder(conformance_dir)
    failed = [r for r in results if not r.passed]
    assert len(results) == 134
    assert not failed, failed


def test_main_prints_failures_then_the_count(tmp_path: Path):
    (tmp_path / "one.json").write_text("""{
      "resources": [{"resourceType": "Patient", "id": "p1"}],
      "tests": [
        {"title": "passes", "view": {"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]},
         "expect": [{"id": "p1"}]},
        {"title": "wrong rows", "view": {"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]},
         "expect": [{"id": "p2"}]},
        {"title": "no error", "view": {"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]},
         "expectError": true},
        {"title": "wrong columns", "view": {"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]},
         "expectColumns": ["x"]}
      ]}""")
    out = io.StringIO()
    assert main(str(tmp_path), out) == 1
    lines = out.getvalue().splitlines()
    assert lines[-1] == "1 passed, 3 failed"
    assert lines[0].startswith("FAIL one.json: wrong rows: 1 rows, expected 1; missing")
    assert "expected an error" in lines[1]
    assert "columns ['id'], expected ['x']" in lines[2]


def test_main_on_the_fixtures_returns_zero():
    out = io.StringIO()
    assert main(str(FIXTURES), out) == 0
    assert out.getvalue().splitlines()[-1] == "134 passed, 0 failed"


def test_main_reports_a_missing_or_empty_folder_as_a_usage_error(tmp_path: Path):
    """Exit 2 (fix the command), not 1 (a bug), and not "0 passed, 0 failed" with exit 0
    for a folder without test files (a CI job pointed at the wrong folder)."""
    for folder in (tmp_path / "nope", tmp_path):
        out = io.StringIO()
        assert main(str(folder), out) == 2
        assert out.getvalue().splitlines()[-1] == "0 passed, 1 failed"


def test_a_broken_test_file_is_a_failure_not_a_crash(tmp_path: Path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"no": "tests"}')
    results = run_test_folder(tmp_path)
    assert [r.passed for r in results] == [False, False]
    assert all(isinstance(r, TestResult) for r in results)
