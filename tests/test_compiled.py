"""The optional mypyc build (setup.py, pipeline/compiled.py): the same results as the
source, and never a compiled module older than its source.

These run in subprocesses: which module file is loaded is decided once per process.
Without a build (no C compiler at install, or TWINLINE_PURE_PYTHON=1 when installing)
the tests that need one skip and say why; the rest of the suite then tests the source.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import compiled
from tests.conftest import FIXTURES, REPO

# Maps every HL7 v2 fixture and runs every view over the FHIR fixtures and the mapped
# resources; prints one JSON document of everything, and which files were loaded.
PROBE = r"""
import json, sys
from pathlib import Path
import orjson
from pipeline import compiled
from pipeline.hl7v2_fhir import map_message
from pipeline.hl7v2_framing import RawMessage, frame_stream
from pipeline.ingest import ResourceMapper, ViewSet
from pipeline.references import IdentifierIndex, Resolver
from pipeline.schema import load_schema
from pipeline.units import Resource

fixtures = Path(sys.argv[1])
mapper = ResourceMapper(ViewSet(load_schema()), Resolver(IdentifierIndex(lambda: [])))
out = []
resources = []
for path in sorted(fixtures.glob("hl7v2/**/*.hl7")) + sorted(fixtures.glob("hl7v2/**/*.mllp")):
    with open(path, "rb") as fh:
        for unit in frame_stream(fh):
            if not isinstance(unit, RawMessage):
                out.append(["framing", path.name, unit.reason, unit.message])
                continue
            m = map_message(unit.data, f"{path.name}:{unit.index}")
            out.append(["message", path.name, m.ack_code, m.rejected.message if m.rejected else None])
            resources.extend(r.resource for r in m.resources)
for path in sorted(fixtures.glob("fhir/bundles/*.json")):
    bundle = orjson.loads(path.read_bytes())
    resources.extend(e["resource"] for e in bundle.get("entry", []) if "resource" in e)
for res in resources:
    mapped = mapper.map(Resource(res, "probe"))
    if mapped is None or not hasattr(mapped, "tables"):
        out.append(["resource", res, None if mapped is None else mapped.message])
    else:
        out.append(["resource", res, mapped.tables])
print(json.dumps({"status": compiled.status(), "n": len(resources),
                  "out": orjson.loads(orjson.dumps(out, option=orjson.OPT_PASSTHROUGH_DATETIME, default=str))}))
"""


def _built() -> dict[str, str]:
    if not compiled.MANIFEST.exists():
        pytest.skip(f"no compiled modules in this install ({compiled.MANIFEST.name} is absent: no C compiler at "
                    "install time, or TWINLINE_PURE_PYTHON was set); the suite tests the source")
    built = json.loads(compiled.MANIFEST.read_text())
    stale = sorted(n for n, digest in built.items() if not compiled._fresh(n, digest))
    if stale:  # a developer's edit since the last install: the source runs, and is what the suite tests
        pytest.skip(f"the compiled build is older than the source of {', '.join(stale)}: `pip install -e .` "
                    "rebuilds it (CI always tests a fresh build)")
    return built


def _python(code: str, *args: str, pure: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    if pure:
        env[compiled.PURE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300, check=False)


def test_compiled_and_source_give_the_same_fhir_rows_and_refusals():
    _built()
    runs = {}
    for pure in (False, True):
        p = _python(PROBE, str(FIXTURES), pure=pure)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[pure] = json.loads(p.stdout)
    fast, slow = runs[False], runs[True]
    assert set(fast["status"].values()) <= {"compiled", "not loaded"} and "compiled" in fast["status"].values()
    assert set(slow["status"].values()) <= {"source", "not loaded"}
    assert fast["n"] > 100  # the fixtures give real work: HL7 messages of every mapped type, Synthea bundles
    assert fast["out"] == slow["out"]


def test_an_edited_source_runs_instead_of_its_stale_build(tmp_path):
    built = _built()
    assert "pipeline.temporal" in built
    copy = tmp_path / "pipeline"
    shutil.copytree(compiled.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "temporal.py", "a") as f:
        f.write("\n\nEDITED = True\n")
    probe = ("import pipeline.temporal as t, pipeline.hl7v2 as h; from pipeline import compiled; "
             "print(t.__file__.endswith('.py'), getattr(t, 'EDITED', False), h.__file__.endswith('.py')); "
             "print(compiled.describe())")
    p = _python(probe, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    flags, described = p.stdout.splitlines()
    # the edited module runs from its source, with the edit, and so does the untouched one:
    # compiled modules call each other directly, so they run together or not at all
    assert flags.split() == ["True", "True", "True"]
    assert p.stderr.count("temporal.py changed since the build") == 1
    assert described == ("pure Python: temporal.py changed since the build (pip install -e . compiles the "
                         "hot-path modules again)")


def test_pure_python_mode_loads_every_source_and_the_version_says_how_it_runs():
    built = _built()
    probe = "import pipeline.ingest, pipeline.hl7v2_fhir; from pipeline import compiled; print(compiled.status())"
    p = _python(probe, pure=True)
    assert p.returncode == 0, p.stderr
    assert "'compiled'" not in p.stdout and "'source'" in p.stdout
    version = "from pipeline.cli import main; main(['--version'])"
    assert "(pure Python: TWINLINE_PURE_PYTHON is set)" in _python(version, pure=True).stdout
    assert f"({len(built)} of {len(built)} hot-path modules compiled)" in _python(version).stdout


def test_the_compiled_modules_type_check():
    """mypyc compiles what mypy accepts: a type error in one of these modules makes the
    install fall back to pure Python (about 1.6x slower), so it fails here first."""
    pytest.importorskip("mypy", reason="mypy is not installed (the test extra has it)")
    tree = ast.parse((REPO / "setup.py").read_text())  # (importing setup.py would run setup())
    accelerated = next(ast.literal_eval(n.value) for n in tree.body
                       if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "ACCELERATED")
    assert len(accelerated) == 11
    files = [str(compiled._source(m).relative_to(REPO)) for m in accelerated]
    p = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental", *files],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
