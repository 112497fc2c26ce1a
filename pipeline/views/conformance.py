"""Runs the official SQL-on-FHIR v2 test files against this runner (`twin views test DIR`).

A test file holds `resources` and `tests`; each test has a `view` and one of:
`expect` (the rows, compared in any order), `expectColumns` (the column names, in
order) or `expectError: true`. An expected error passes when `compile_view` rejects the
view, or when running it over the file's resources raises RowError: the spec's own
processing model raises some errors only on data ("multiple values found but not
expected for column"), and a valid view such as `telecom.system` without `first()`
must still run on resources that hold one telecom.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import orjson

from ..errors import Exit
from .errors import ViewError
from .view import compile_view


class TestResult(NamedTuple):
    __test__ = False  # a result, not a pytest test class

    file: str
    title: str
    passed: bool
    message: str


def run_test_file(path: str | Path) -> list[TestResult]:
    path = Path(path)
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        return [TestResult(path.name, "(file)", False, f"cannot read the test file: {e}")]
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        return [TestResult(path.name, "(file)", False, "not a test file: no `tests` list")]
    resources = data.get("resources") or []
    return [_run_test(path.name, i, t, resources) for i, t in enumerate(data["tests"])]


def run_test_folder(folder: str | Path) -> list[TestResult]:
    results: list[TestResult] = []
    for p in sorted(Path(folder).glob("*.json")):
        results.extend(run_test_file(p))
    return results


def main(folder: str, out: TextIO = sys.stdout) -> int:
    """Print one line per failing test, then `N passed, M failed`; 0 iff none failed, 1 if
    some did (the runner has a bug). A folder that is missing or holds no test file is a
    usage error (2, README's exit codes): "0 passed, 0 failed" there would let a CI job
    pointed at the wrong folder pass.
    """
    if not Path(folder).is_dir() or not any(Path(folder).glob("*.json")):
        print(f"not a folder of test files (*.json): {folder}", file=out)
        print("0 passed, 1 failed", file=out)
        return int(Exit.USAGE)
    results = run_test_folder(folder)
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"FAIL {r.file}: {r.title}: {r.message}", file=out)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed", file=out)
    return 0 if not failed else 1


def _run_test(file: str, i: int, test: Any, resources: list) -> TestResult:
    title = test.get("title", f"test {i}") if isinstance(test, dict) else f"test {i}"
    if not isinstance(test, dict):
        return TestResult(file, title, False, "the test is not a JSON object")

    def result(passed: bool, message: str = "") -> TestResult:
        return TestResult(file, title, passed, message)

    try:
        view = compile_view(test.get("view"))
    except ViewError as e:
        if test.get("expectError"):
            return result(True)
        return result(False, f"the view was rejected: {e}")
    try:
        rows = view.run(resources)
    except ViewError as e:
        if test.get("expectError"):
            return result(True)
        return result(False, f"running the view failed: {e}")
    if test.get("expectError"):
        return result(False, "expected an error, but the view compiled and ran")

    names = [c.name for c in view.columns]
    if "expectColumns" in test and names != test["expectColumns"]:
        return result(False, f"columns {names}, expected {test['expectColumns']}")
    if "expect" in test:
        got = sorted(_canonical(r) for r in rows)
        want = sorted(_canonical(r) for r in test["expect"])
        if got != want:
            missing = [w for w in want if w not in got]
            extra = [g for g in got if g not in want]
            return result(False, f"{len(rows)} rows, expected {len(want)}; "
                                 f"missing {_show(missing)}; unexpected {_show(extra)}")
    return result(True)


def _normal(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_normal(x) for x in v]
    if isinstance(v, dict):
        return {k: _normal(x) for k, x in v.items()}
    return v


def _canonical(row: Any) -> str:
    return orjson.dumps(_normal(row), option=orjson.OPT_SORT_KEYS).decode()


def _show(rows: list[str]) -> str:
    return "none" if not rows else ", ".join(rows[:3]) + (" ..." if len(rows) > 3 else "")
