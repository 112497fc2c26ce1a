"""Scheduled jobs: one config, incremental, safe to kill at any moment, safe to run twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from pipeline.cli import main as twin
from pipeline.errors import ConfigError
from pipeline.jobs import load_job, parse_job
from pipeline.store import Store
from tests.conftest import FIXTURES, REPO
from tests.fhir_server import FhirTestServer
from tests.test_import_fhir import snapshot

JOB = FIXTURES / "demo" / "job.toml"
TABLES = ("patient", "observation", "encounter", "condition", "medication", "procedure", "immunization", "twin",
          "timeline", "identity")


def content(store: Store) -> dict[str, list]:
    out = {}
    for t in TABLES:
        if t == "identity":
            rows = store.read(t).drop_columns(["run_id"]).to_pylist() if store.exists(t) else []
            out[t] = sorted(rows, key=lambda r: (r["source"], r["patient_id"]))
            continue
        rows = snapshot(store, t) if store.exists(t) else []
        for r in rows:
            r.pop("as_of", None)
            r.pop("source_ref", None) if t in ("twin", "timeline") else None
        out[t] = rows
    return out


def test_demo_job_runs_then_has_nothing_new(tmp_path, capsys):
    store = str(tmp_path / "s")
    # the demo has broken inputs on purpose: success, with quarantined units (exit 3)
    assert twin(["run", "--config", str(JOB), "--store", store]) == 3
    out = capsys.readouterr().out
    assert "(run): quarantined" in out and "(check): passed" in out and "twins: 20" in out
    assert twin(["run", "--config", str(JOB), "--store", store]) == 0
    out = capsys.readouterr().out
    assert "nothing_new" in out and "nothing new since the last run" in out
    assert twin(["status", "--store", store]) == 0
    assert "nothing_new" in capsys.readouterr().out


def test_config_problems_are_all_reported_with_their_paths(tmp_path):
    raw = {
        "job": {"name": 3, "colour": "red"},
        "source": [
            {"name": "a", "kind": "fhir", "paths": ["does/not/exist"], "extra": 1},
            {"name": "a", "kind": "telepathy"},
            {"name": "b", "kind": "fhir-server", "base_url": "ftp://x", "auth": {"kind": "magic", "pin": 1},
             "count": "many"},
        ],
        "gate": {"config": "missing.toml"},
        "build": {"force": "yes"},
    }
    with pytest.raises(ConfigError) as e:
        parse_job(raw, tmp_path / "job.toml")
    text = str(e.value)
    for expected in ("job.name: expected string", "job.colour: unknown key", "source[0].paths[0]: no such file",
                     "source[0].extra: unknown key", "source[1].name: 'a' names another source too",
                     "source[1].kind: unknown kind 'telepathy'", "source[2].base_url: expected an http",
                     "source[2].auth.kind: expected none, bearer, basic or smart", "source[2].auth.pin: unknown key",
                     "source[2].count: expected int", "gate.config: no such file", "build.force: expected bool"):
        assert expected in text, expected
    assert "has 12 problem(s)" in text


def test_a_bad_since_is_a_config_error_with_its_path(tmp_path):
    # found when the job file is read, like every other problem, not halfway through the run
    raw = {"source": [{"name": "api", "kind": "fhir-server", "base_url": "http://127.0.0.1:9/fhir", "since": "today"}]}
    with pytest.raises(ConfigError) as e:
        parse_job(raw, tmp_path / "job.toml")
    assert "source[0].since: not a date or date-time" in str(e.value)


def test_a_bad_device_format_and_server_timeout_are_config_errors_with_their_paths(tmp_path):
    # the format check never ran (it imported a function devices.py does not have), and a
    # timeout of ["a", 2] stopped the job inside the run with an internal error
    raw = {"source": [{"name": "icu", "kind": "csv", "paths": [str(FIXTURES / "devices")], "format": "nope"},
                      {"name": "api", "kind": "fhir-server", "base_url": "http://127.0.0.1:9/fhir",
                       "timeout": ["a", 2], "retries": -1}]}
    with pytest.raises(ConfigError) as e:
        parse_job(raw, tmp_path / "job.toml")
    text = str(e.value)
    for expected in ("source[0].format: unknown format 'nope'", "source[1].timeout: expected [connect, read]",
                     "source[1].retries: expected 0 or more"):
        assert expected in text, expected


def test_a_config_error_exits_2_and_names_the_key(tmp_path, capsys):
    bad = tmp_path / "job.toml"
    bad.write_text('[[source]]\nname = "x"\nkind = "fhir"\npaths = ["nowhere"]\n')
    assert twin(["run", "--config", str(bad), "--store", str(tmp_path / "s")]) == 2
    assert "source[0].paths[0]: no such file" in capsys.readouterr().err


@pytest.mark.server
def test_an_unreachable_server_does_not_stop_the_other_sources(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(f"""
[[source]]
name = "files"
kind = "fhir"
paths = ["{FIXTURES / 'fhir' / 'bundles'}"]

[[source]]
name = "api"
kind = "fhir-server"
base_url = "http://127.0.0.1:9/fhir"
retries = 0
timeout = [0.5, 0.5]
""")
    store = tmp_path / "s"
    assert twin(["run", "--config", str(job), "--store", str(store)]) == 5
    out = capsys.readouterr().out
    assert "api: unavailable, retry later" in out
    assert Store(store).count("patient") == 3  # the files were committed


@pytest.mark.server
def test_job_with_a_fhir_server_source_is_incremental(tmp_path, capsys):
    with FhirTestServer(FIXTURES / "fhir" / "bulk") as server:
        job = tmp_path / "job.toml"
        job.write_text(f'[[source]]\nname = "api"\nkind = "fhir-server"\nbase_url = "{server.base_url}"\nbulk = true\n')
        store = str(tmp_path / "s")
        assert twin(["run", "--config", str(job), "--store", store]) == 0
        assert twin(["run", "--config", str(job), "--store", store]) == 0
        assert "_since" in server.seen[-1].query or any("_since" in s.query for s in server.seen[-6:])


def _job_process(store: Path) -> subprocess.Popen:
    env = dict(os.environ, TWIN_NO_PROGRESS="1")
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.cli import console_main; sys.argv = ['twin', 'run', '--config', {str(JOB)!r}, '--store', {str(store)!r}]; console_main()"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_minus_nine_at_random_moments_then_finish_equals_an_uninterrupted_run(tmp_path):
    reference = Store(tmp_path / "reference")
    t0 = time.monotonic()
    assert _job_process(reference.root).wait() == 3
    patients = reference.count("patient")
    full = time.monotonic() - t0
    rng = random.Random(20261128)
    expected = content(reference)
    kills = 0
    for trial in range(3):
        store = tmp_path / f"killed-{trial}"
        # the first run on an empty store is killed at a random moment of its work; the second
        # (which first rolls back what the first left) is killed at a random moment too, if it is still running
        for attempt in range(2):
            proc = _job_process(store)
            time.sleep(rng.uniform(0.05, full * (0.3 if attempt == 0 else 0.9)))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
            # between runs, what Twinline reads is always a committed state
            s = Store(store)
            if s.exists("patient"):
                assert s.count("patient") in (0, patients)
        assert _job_process(store).wait() in (0, 3)
        assert content(Store(store)) == expected, f"trial {trial}"
    assert kills >= 2, "the job finished before it could be killed: the machine is faster than this test assumes"


def test_load_job_reads_the_demo():
    spec = load_job(JOB)
    assert [s.kind for s in spec.sources] == ["fhir", "hl7v2", "dicom", "csv"]
    assert spec.sources[0].options["paths"][0].is_dir()


def test_a_source_option_of_another_kind_is_a_job_file_error(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[[source]]\nname = "ehr"\nkind = "fhir"\npaths = ["."]\npatient_id = "p1"\n\n'
                   '[[source]]\nname = "pacs"\nkind = "dicom"\npaths = ["."]\ntimezone = "Europe/Paris"\n')
    with pytest.raises(ConfigError) as e:
        load_job(job)
    assert e.value.problems == ["source[0].patient_id: applies to csv sources, not fhir"]


def test_a_device_source_names_the_namespace_of_its_patient(tmp_path):
    """An Empatica export names no patient: the job gives the hospital's MRN and its system,
    so the wristband's samples join the FHIR patient's twin."""
    job = tmp_path / "job.toml"
    job.write_text(f'[[source]]\nname = "ehr"\nkind = "fhir"\npaths = ["{FIXTURES / "fhir" / "bundles"}"]\n\n'
                   f'[[source]]\nname = "wrist"\nkind = "csv"\npaths = ["{FIXTURES / "devices" / "devicely" / "empatica"}"]\n'
                   'patient_id = "cbc83bf2-c38e-4617-bc1d-f99fc86a80f0"\n'
                   'patient_system = "http://hospital.smarthealthit.org"\n')
    assert twin(["run", "--config", str(job), "--store", str(tmp_path / "s")]) in (0, 3)  # 3: the gate on samples
    obs = Store(tmp_path / "s").read("observation", ["source", "twin_id"])
    wrist = {t for s, t in zip(*(obs.column(c).to_pylist() for c in ("source", "twin_id")), strict=True) if s == "wrist"}
    patients = Store(tmp_path / "s").read("patient_identifier", ["source", "system", "value", "twin_id"])
    ehr = [r["twin_id"] for r in patients.to_pylist() if r["source"] == "ehr"
           and r["value"] == "cbc83bf2-c38e-4617-bc1d-f99fc86a80f0"]
    assert wrist == set(ehr) and len(set(ehr)) == 1
    assert {(r["system"], r["value"]) for r in patients.to_pylist() if r["source"] == "wrist"} == \
        {("http://hospital.smarthealthit.org", "cbc83bf2-c38e-4617-bc1d-f99fc86a80f0")}


def test_the_identity_config_of_a_job_is_the_one_it_links_with(tmp_path):
    """[identity] config names the rules: here an alias that makes two sources' systems one
    namespace, so their records of one MRN become one twin. The default rules have no such
    alias: the same job without it keeps them apart."""
    for name, (system, pid) in {"a": ("urn:hospital:a", "pa"), "b": ("urn:hospital:b", "pb")}.items():
        pat = {"resourceType": "Patient", "id": pid, "identifier": [{"system": system, "value": "M7"}]}
        (tmp_path / f"{name}.ndjson").write_bytes(orjson.dumps(pat) + b"\n")
    (tmp_path / "identity.toml").write_text('[[namespaces]]\nsystems = ["urn:hospital:a", "urn:hospital:b"]\n')
    sources = "".join(f'[[source]]\nname = "{n}"\nkind = "fhir"\npaths = ["{tmp_path / f"{n}.ndjson"}"]\n\n' for n in "ab")
    twins = {}
    for with_config in (True, False):
        job = tmp_path / f"job-{with_config}.toml"
        job.write_text(sources + '[gate]\nenabled = false\n\n[build]\nenabled = false\n'
                       + ('\n[identity]\nconfig = "identity.toml"\n' if with_config else ""))
        store = tmp_path / f"s-{with_config}"
        assert twin(["run", "--config", str(job), "--store", str(store)]) == 0
        twins[with_config] = set(Store(store).read("patient", ["twin_id"]).column("twin_id").to_pylist())
    assert len(twins[True]) == 1 and len(twins[False]) == 2
