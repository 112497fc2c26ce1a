"""No patient data in logs, messages or reports (issue 10; docs/privacy-logs.md).

Every command runs on the fixtures of every connector, in its own process, with debug
logging (-vv), and sometimes in JSON log format; all it prints (stdout, stderr), the
report files it writes and the store's run records are searched for every name,
identifier and birth date the inputs hold (tests/sensitive.py reads them from the
fixture files). Output whose purpose is to show a patient's data to an authorised user
is named below and left out of the search: `twin show`, the FHIR files `twin export`
writes, and `twin quarantine show --payload`. Their logs are still searched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FIXTURES, REPO
from .fhir_server import FhirTestServer
from .sensitive import found_in

NOTHING = {"names": [], "identifiers": [], "births": []}
# Not every value read from the fixtures is data about a person: DICOM test files name
# their patients after what they test ("Multi^Frame", "CompressedSamples^..."), and those
# words are also the names of features. Left out, with the reason.
NOT_PERSONAL = {"Frame", "Multi", "First", "CompressedSamples", "Component1", "GB18030-1", "XXXXXXXXXX"}


def twin(*args: str, env: dict[str, str], cwd: Path, check: bool = True) -> tuple[int, str]:
    """Run `twin ARGS -vv` in a fresh process; its exit code and everything it printed."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-vv"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600, errors="replace")
    return proc.returncode, proc.stdout + "\n" + proc.stderr


def leaks(text: str) -> dict[str, list[str]]:
    return {k: [v for v in vs if v not in NOT_PERSONAL] for k, vs in found_in(text).items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    e = dict(os.environ)
    e.update(TWIN_KEY="no-patient-data-test-key", TWIN_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    e.pop("TWIN_STORE", None)
    return e


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, env) -> dict[str, str]:
    """command -> what it printed (and wrote, for the reports), for every command."""
    tmp = tmp_path_factory.mktemp("outputs")
    store = str(tmp / "store")
    out: dict[str, str] = {}

    def run(name: str, *args: str, with_store: bool = True) -> str:
        code, text = twin(*args, *(["--store", store] if with_store else []), env=env, cwd=tmp)
        out[name] = text
        return text

    run("import fhir", "import", "fhir", str(FIXTURES / "fhir"))
    run("import hl7v2", "import", "hl7v2", str(FIXTURES / "hl7v2"))  # malformed samples included
    run("import dicom", "import", "dicom", str(FIXTURES / "dicom"))  # broken files included
    run("import csv", "import", "csv", str(FIXTURES / "devices"))
    run("import again, json logs", "import", "hl7v2", str(FIXTURES / "hl7v2"), "--reprocess", "--log-format", "json")
    report = tmp / "report"
    run("check", "check", "--report", str(report))
    out["check report files"] = "\n".join(p.read_text(errors="replace") for p in report.iterdir() if p.is_file())
    run("build", "build", "--force")
    run("status", "status")
    run("link-report", "link-report")
    listed = run("quarantine list", "quarantine", "list")
    ids = [line.split()[0] for line in listed.splitlines() if line[:12].isalnum() and len(line.split()[0]) == 12]
    assert ids, "the fixtures should put something in quarantine"
    for qid in ids:
        run(f"quarantine show {qid}", "quarantine", "show", qid)
    run("quarantine retry", "quarantine", "retry", "--all")
    # shows a patient's data on purpose: only its log lines are searched (stderr is in the text too,
    # so run it separately and keep stderr only)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "show", "2354df0f-349f-4042-a827-2ef12013e69d",
                           "--store", store, "-vv"], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    out["show (stderr)"] = proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "--all", "--format", "fhir", "--out",
                           str(tmp / "export"), "--store", store, "-vv"], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=300)
    out["export (stdout, stderr)"] = proc.stdout + proc.stderr
    # a whole job, from its own store
    run("run demo job", "run", "--config", str(FIXTURES / "demo" / "job.toml"), "--store", str(tmp / "job"),
        with_store=False)
    # error paths: messages name the problem and a locator, not the data
    bad = tmp / "bad.ndjson"
    bad.write_text('{"resourceType":"Patient","id":"x","name":[{"family":"Zebedee-Quarantine"}],'
                   '"birthDate":"1961-06-15","gender":7}\n{not json "Zebedee-Quarantine"\n')
    run("import bad fhir", "import", "fhir", str(bad))
    run("import missing file", "import", "fhir", str(tmp / "nope.ndjson"))
    job = tmp / "bad-job.toml"
    job.write_text('[job]\nname = "x"\n[[source]]\nname = "a"\nkind = "fhir"\npaths = ["no-such-folder"]\n')
    run("run bad job", "run", "--config", str(job))
    # a FHIR server: search and Bulk export
    with FhirTestServer(FIXTURES / "fhir-server") as server:
        run("fetch fhir", "fetch", "fhir", server.base_url, "--source", "server")
        run("fetch fhir bulk", "fetch", "fhir", server.base_url, "--bulk", "--source", "server-bulk")
    out["listen mllp"] = _listen(tmp / "listen-store", env, tmp)
    out["runs table"] = _runs(Path(store))
    return out


def _listen(store: Path, env: dict[str, str], cwd: Path) -> str:
    """`twin listen mllp` with a good message and a malformed one over a real socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "listen", "mllp", "--port", str(port),
                             "--store", str(store), "--drain-every", "0.2", "-vv"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        good = (FIXTURES / "hl7v2" / "twin-adt-a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        malformed = b"PID|1||MRN-Zebedee^^^X||Zebedee-Quarantine^Ann||19610615|F\r"
        with conn:
            for msg in (good, malformed):
                conn.sendall(b"\x0b" + msg + b"\x1c\r")
                conn.recv(65536)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    return text


def _runs(store: Path) -> str:
    import deltalake

    return json.dumps(deltalake.DeltaTable(str(store / "runs")).to_pyarrow_table().to_pylist(), default=str)


def test_the_commands_ran_and_printed_something(outputs):
    assert len(outputs) >= 20
    assert "fhir: read" in outputs["import fhir"] and "hl7v2: read" in outputs["import hl7v2"]
    assert any("DEBUG" in text for text in outputs.values())  # debug logging was on
    assert "twins:" in outputs["build"] and "(check)" in outputs["check"]
    assert "Zebedee" not in outputs["import bad fhir"]
    assert "2 message(s) stored" in outputs["listen mllp"], outputs["listen mllp"][-2000:]


@pytest.mark.parametrize("command", [
    "import fhir", "import hl7v2", "import dicom", "import csv", "import again, json logs", "check",
    "check report files", "build", "status", "link-report", "quarantine list", "quarantine retry", "show (stderr)",
    "export (stdout, stderr)", "run demo job", "import bad fhir", "import missing file", "run bad job", "fetch fhir",
    "fetch fhir bulk", "listen mllp", "runs table"])
def test_no_patient_data_in_the_output_of(outputs, command):
    assert leaks(outputs[command]) == NOTHING


def test_no_patient_data_in_quarantine_show_without_payload(outputs):
    shown = {k: v for k, v in outputs.items() if k.startswith("quarantine show")}
    assert shown
    for name, text in shown.items():
        assert leaks(text) == NOTHING, name


def test_the_search_finds_what_it_looks_for(outputs, tmp_path, env):
    """The search is not blind: `twin show` prints the patient's birth date."""
    store = tmp_path / "s"
    twin("import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", str(store), env=env, cwd=tmp_path)
    twin("build", "--store", str(store), env=env, cwd=tmp_path)
    code, text = twin("show", "2354df0f-349f-4042-a827-2ef12013e69d", "--store", str(store), env=env, cwd=tmp_path)
    assert code == 0
    assert leaks(text)["births"] == ["1995-01-08"]
