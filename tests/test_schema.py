"""The unified twin schema: released versions are frozen (ARCHITECTURE.md, issue 2)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from pipeline.schema import load_schema

from .conftest import REPO

# A released schema is never edited: a change makes twin-v2.json. If this fails, revert the
# edit to twin-v1.json and put the change into a new version instead.
RELEASED = {"twin-v1.json": "77fb0fe81f952b966264fbad8ab3ff4de61642cf6e6daf85cc6a030644a15f3d"}


def test_released_schemas_are_unchanged():
    for name, digest in RELEASED.items():
        path = REPO / "schemas" / name
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert doc["status"] == "released" and doc["released"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{name} is released and was edited"


def test_the_store_uses_the_released_schema():
    schema = load_schema()
    assert (schema.version, schema.status) == ("1", "released")
    assert len(schema.tables) == 21


def test_the_generator_refuses_to_overwrite_a_released_schema(tmp_path):
    before = (REPO / "schemas" / "twin-v1.json").read_bytes()
    proc = subprocess.run([sys.executable, "schemas/tools/make_v1.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "released" in proc.stderr
    assert (REPO / "schemas" / "twin-v1.json").read_bytes() == before


def test_a_twin_home_without_the_schema_is_a_usage_error(tmp_path):
    # a user who puts only a new vendor's mapping into $TWIN_HOME/mappings/devices/
    home = tmp_path / "home"
    (home / "mappings" / "devices").mkdir(parents=True)
    log = tmp_path / "vitals.csv"
    log.write_text("time,patient_id,hr\n2024-03-05T08:00:00Z,p1,80\n")
    env = {k: v for k, v in os.environ.items() if k != "TWIN_HOME"}
    env.update(TWIN_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "import", "csv", str(log), "--store",
                           str(tmp_path / "s")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "TWIN_HOME" in proc.stderr and "schemas/" in proc.stderr
