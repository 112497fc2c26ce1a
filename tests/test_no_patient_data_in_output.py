"""No patient data in logs, messages, exception texts or reports (issue 10).

Every `twin` command is run on the fixtures at debug level (`-vv`), and everything it
prints (stdout, stderr and its log lines), every report and log-like file it writes and
every exception text is searched for every name, identifier and birth date present in
the inputs. The values are read from the fixture files themselves (FHIR Patient
resources, HL7 PID and MRG segments, DICOM headers and DICOMDIR records, the patient
columns and headers of device logs), never written by hand, so a new fixture brings its
patients into the test.

Which values are searched (`sensitive_values`):

- FHIR Patient: every `name.family` and `name.given`, every `identifier.value`,
  `birthDate`, the mother's maiden name extension;
- HL7 v2 PID-2, PID-3, PID-4, PID-19, PID-20 (identifiers, each repetition's CX.1),
  PID-5 and PID-6 (family and given names), PID-7 (birth date), MRG-1 (prior identifiers);
- DICOM PatientID, OtherPatientIDs, PatientName (each component of each group,
  ideographic and phonetic included), PatientBirthDate, in files and DICOMDIR records;
- device logs: the patient columns of the linked log, the patient id and birth date in
  Spacelabs headers, the PhysioNet RecordID.

Birth dates are searched in the forms that appear in the inputs and the other one
(YYYY-MM-DD and YYYYMMDD, whichever the input had), and an HL7 date-time is cut to its
date.

Which values are not searched, because a match would say nothing (`meaningful`):

- shorter than 4 characters ("Doe", "Li", "A", "14"): such strings occur everywhere;
- made only of digits (and separators) and shorter than 5 digits ("3722"): counts and line
  numbers look the same;
- words that Twinline's own text contains (the code in pipeline/, the mapping, config
  and schema files): "Test", "Frame", "First", "Last" are placeholder names in public
  test samples, and when they appear in the output the program may have written them.

A value is found when it stands alone: not inside a longer word or number (so "Peter"
is not found in "Peterson", nor a birth date inside a run id), and not inside the path of
a file or folder that exists. File paths are the locators the operator gave (a
DICOMDIR's folders are named by patient number in pydicom's samples); a path is where a
value came from, not a value read from inside a file. Other text with slashes is
searched: `Patient/<MRN>` or a URL with an identifier is a leak.

Output that exists to show patient data to the operator who asked for it is not
searched, each place saying why: `twin show` (a readable twin: birth date, record ids),
`twin export` Bundle files (FHIR resources, the purpose of the command), and
`twin quarantine show --payload` (the raw unit, printed only with that flag). Their logs,
messages and summaries are searched like every other command's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from pipeline.cli import main as twin
from pipeline.store import Store
from tests.conftest import FIXTURES, REPO

INPUT_FOLDERS = ("fhir", "fhir-server", "hl7v2", "dicom", "devices", "demo")

# --------------------------------------------------------------------------- the values


def _fhir_patients(doc) -> list[dict]:
    """Patient resources in a resource, a Bundle (nested too), or a list of them."""
    if isinstance(doc, list):
        return [p for d in doc for p in _fhir_patients(d)]
    if not isinstance(doc, dict):
        return []
    if doc.get("resourceType") == "Patient":
        return [doc]
    if doc.get("resourceType") == "Bundle":
        return [p for e in doc.get("entry") or [] for p in _fhir_patients(e.get("resource"))]
    return []


def _fhir_documents(path: Path):
    text = path.read_bytes()
    if path.suffix == ".ndjson":
        for line in text.splitlines():
            if line.strip():
                with contextlib.suppress(ValueError):
                    yield json.loads(line)
    else:
        with contextlib.suppress(ValueError):
            yield json.loads(text)


def _dates(value: str) -> set[str]:
    """A birth date in the form the input had, and the other one."""
    v = value.strip()
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", v)
    if m:
        return {v, "".join(m.groups())}
    m = re.match(r"(\d{4})(\d{2})(\d{2})", v)
    if m:
        return {v, m.group(0), "-".join(m.groups())}
    return {v} if v else set()


def fhir_values(path: Path) -> set[str]:
    found: set[str] = set()
    for doc in _fhir_documents(path):
        for p in _fhir_patients(doc):
            for name in p.get("name") or []:
                found.update(filter(None, [name.get("family"), *(name.get("given") or [])]))
            for ident in p.get("identifier") or []:
                if ident.get("value"):
                    found.add(ident["value"])
            if p.get("birthDate"):
                found |= _dates(p["birthDate"])
            for ext in p.get("extension") or []:
                if ext.get("url", "").endswith("patient-mothersMaidenName") and ext.get("valueString"):
                    found.update(ext["valueString"].split())
    return found


def _hl7_messages(data: bytes):
    """(segment lines, field/component/repetition/escape/subcomponent characters) of each message."""
    text = data.decode("utf-8") if _is_utf8(data) else data.decode("latin-1")
    lines = [ln.strip("\x0b\x1c\ufeff ") for ln in re.split(r"[\r\n]+", text)]
    seps = None
    segments: list[str] = []
    for ln in lines:
        if ln[:3] in ("MSH", "FHS", "BHS") and len(ln) > 7:
            if ln.startswith("MSH"):
                if segments and seps:
                    yield segments, seps
                fs, enc = ln[3], ln[4:8]
                seps = (fs, enc[0], enc[1], enc[2] if len(enc) > 2 else "\\", enc[3] if len(enc) > 3 else "&")
                segments = []
            continue
        if seps and len(ln) > 3:
            segments.append(ln)
    if segments and seps:
        yield segments, seps


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _unescape(value: str, seps: tuple[str, ...]) -> str:
    """The text a value stands for: Quill\\S\\feather is Quill^feather (HL7 v2.5 2.7.1)."""
    fs, cs, rs, esc, ss = seps
    chars = {"F": fs, "S": cs, "R": rs, "E": esc, "T": ss}
    return re.sub(re.escape(esc) + "([FSRET])" + re.escape(esc), lambda m: chars[m.group(1)], value)


def hl7_values(path: Path) -> set[str]:
    found: set[str] = set()
    for segments, (fs, cs, rs, esc, ss) in _hl7_messages(path.read_bytes()):
        for seg in segments:
            fields = seg.split(fs)
            name = fields[0]

            def field(n: int, fields=fields, cs=cs, rs=rs) -> list[list[str]]:
                """Field n, as repetitions of components (subcomponents joined back)."""
                raw = fields[n] if len(fields) > n else ""
                return [rep.split(cs) for rep in raw.split(rs) if rep]

            if name == "PID":
                for n in (2, 3, 4, 19, 20):
                    for rep in field(n):
                        found.add(rep[0])
                for n in (5, 6):
                    for rep in field(n):
                        for comp in rep[:2]:
                            for c in comp.split(ss):
                                found |= {c, _unescape(c, (fs, cs, rs, esc, ss))}
                for rep in field(7):
                    found |= _dates(rep[0])
            elif name == "MRG":
                for rep in field(1):
                    found.add(rep[0])
    return found


def _dicom_values(ds) -> set[str]:
    found: set[str] = set()
    pid = ds.get("PatientID")
    if pid:
        found.add(str(pid))
    others = ds.get("OtherPatientIDs")
    if others:
        found.update(str(o) for o in (others if isinstance(others, (list, tuple)) or hasattr(others, "__iter__")
                                      and not isinstance(others, str) else [others]))
    name = ds.get("PatientName")
    if name:
        for group in str(name).split("="):
            found.update(c for c in group.split("^") if c)
    bd = ds.get("PatientBirthDate")
    if bd:
        found |= _dates(str(bd))
    for record in ds.get("DirectoryRecordSequence") or []:
        found |= _dicom_values(record)
    return found


def dicom_values(path: Path) -> set[str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - a truncated sample: what could be read of it is in the other files
        return set()
    return _dicom_values(ds)


def device_values(path: Path) -> set[str]:
    import csv
    import io

    found: set[str] = set()
    text = path.read_bytes().decode("utf-8", "replace")
    if path.suffix == ".abp":  # Spacelabs: the patient id on the first line, <DOB> in the XML trailer
        first = text.lstrip().splitlines()[0].strip() if text.strip() else ""
        if first:
            found.add(first)
        found.update(re.findall(r"<DOB>([^<]+)</DOB>", text))
        return found
    if path.suffix not in (".csv", ".txt"):
        return found
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return found
    header = [h.strip().lower() for h in rows[0]]
    for col in ("patient_id", "patient", "mrn"):
        if col in header:
            i = header.index(col)
            found.update(r[i] for r in rows[1:] if len(r) > i and r[i])
    if header[:3] == ["time", "parameter", "value"]:  # PhysioNet 2012
        found.update(r[2] for r in rows[1:] if len(r) > 2 and r[1] == "RecordID")
    return found


@cache
def _own_words() -> frozenset[str]:
    """Every word in Twinline's own code, mappings, config and schemas (lower case)."""
    words: set[str] = set()
    for folder in ("pipeline", "mappings", "config", "schemas"):
        for f in (REPO / folder).rglob("*"):
            if f.is_file() and f.suffix in (".py", ".json", ".toml", ".csv", ".md", ".tsv", ".txt"):
                words.update(w.lower() for w in re.findall(r"\w+", f.read_text("utf-8", "replace")))
    return frozenset(words)


def meaningful(value: str) -> bool:
    """Long and specific enough that finding it in output means it came from the input."""
    v = value.strip()
    if len(v) < 4:
        return False
    digits = re.sub(r"[\s.\-/]", "", v)
    if digits.isdigit() and len(digits) < 5:
        return False
    return v.lower() not in _own_words()


@cache
def sensitive_values() -> tuple[str, ...]:
    found: set[str] = set()
    for folder in INPUT_FOLDERS:
        for f in sorted((FIXTURES / folder).rglob("*")):
            if not f.is_file() or f.suffix in (".py", ".md", ".toml") or f.name == "LICENSE":
                continue
            if folder.startswith("fhir") and f.suffix in (".json", ".ndjson"):
                found |= fhir_values(f)
            elif folder == "hl7v2":
                found |= hl7_values(f)
            elif folder == "dicom":
                found |= dicom_values(f)
            elif folder == "devices":
                found |= device_values(f)
    return tuple(sorted({v.strip() for v in found if meaningful(v)}))


@cache
def _pattern(values: tuple[str, ...]) -> re.Pattern:
    alts = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    # alone: not inside a longer word or number
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


_PATH_LIKE = re.compile(r"(?:/|\.{1,2}/|[\w.\-]+/)[\w.\-/]*")


def _mask_file_paths(text: str) -> str:
    """Paths of files and folders that exist (the operator's locators) become `<path>`.

    Only real paths: `Patient/<an MRN>` or a URL with an identifier in it stay and are searched.
    """
    def mask(m: re.Match) -> str:
        token = m.group(0).rstrip("/.")
        if token.count("/") and any(Path(base, token).exists() for base in ("/", REPO, os.getcwd())):
            return "<path>"
        return m.group(0)

    return _PATH_LIKE.sub(mask, text)


def find_leaks(text: str) -> list[str]:
    """Each sensitive value found in text, with a little context."""
    hits = []
    text = _mask_file_paths(text)
    for m in _pattern(sensitive_values()).finditer(text):
        a, b = max(0, m.start() - 60), min(len(text), m.end() + 60)
        hits.append(f"{m.group(0)!r} in ...{text[a:b]!r}...")
    return hits


def test_the_values_come_from_every_kind_of_input():
    values = set(sensitive_values())
    # one of each kind, as a check that the extraction works (not the list searched)
    for expected in ("Ullrich", "Napoleon", "999-83-2639", "1995-01-08", "19950108",  # FHIR and HL7
                     "cbc83bf2-c38e-4617-bc1d-f99fc86a80f0", "OLD-00042",            # PID-3, MRG-1
                     "98890234", "Archibald", "H31EXAMPLE",                          # DICOM files, names
                     "16.09.1966", "140001"):                                        # device logs
        assert expected in values, expected
    for short_or_common in ("Doe", "14", "Test", "3722"):
        assert short_or_common not in values


# --------------------------------------------------------------------------- running every command


@dataclass
class Said:
    """What one command said: its exit code and everything it printed or logged."""

    argv: list[str]
    code: int
    text: str


@contextlib.contextmanager
def _captured():
    """Everything written to stdout and stderr, by Python (print, logging, warnings) and by native code."""
    buf = io.StringIO()
    with tempfile.TemporaryFile() as native:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(native.fileno(), 1)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield buf
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            native.seek(0)
            buf.write(native.read().decode("utf-8", "replace"))


def twin_said(*argv: str) -> Said:
    """Run `twin ARGV -vv` in this process; what it printed and logged at debug level."""
    args = [*argv, "-vv"]
    with _captured() as buf:
        code = twin(args)
    logging.getLogger().handlers[:] = []  # the next command installs its own handler on its own stream
    return Said(args, code, buf.getvalue())


def files_said(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {str(p): p.read_text("utf-8", "replace") for p in sorted(folder.rglob(pattern)) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _patient_1() -> dict:
    bundle = json.loads((FIXTURES / "fhir" / "bundles" / "patient-1.json").read_bytes())
    return next(p for p in _fhir_patients(bundle))


def write_hostile_inputs(folder: Path) -> dict[str, Path]:
    """Broken inputs that put the fixture patient's own values where they do not belong.

    Each is a unit the pipeline must quarantine; the message it writes must say where
    and why, not quote the value it could not use.
    """
    p = _patient_1()
    family, given, born = p["name"][0]["family"], p["name"][0]["given"][0], p["birthDate"]
    mrn = next(i["value"] for i in p["identifier"] if i.get("type", {}).get("text") == "Medical Record Number")
    ssn = next(i["value"] for i in p["identifier"] if "ssn" in i.get("system", ""))
    out = {k: folder / k for k in ("fhir", "hl7v2", "csv", "dicom")}
    for d in out.values():
        d.mkdir(parents=True)

    bad_date = dict(p, id="hostile-1", birthDate=f"{given} {family}")
    bad_ident = dict(p, id="hostile-2", identifier=[{"system": "urn:x", "value": {"ssn": ssn}}])
    bad_name = dict(p, id="hostile-3", name=[{"family": [family, given]}], gender=family)
    odd_type = {"resourceType": family, "id": "hostile-4", "birthDate": born}
    cond_ref = {"resourceType": "Observation", "id": "hostile-5", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": f"Patient?identifier=http://hl7.org/fhir/sid/us-ssn|{ssn}"},
                "valueQuantity": {"value": family, "unit": given}}
    lines = [json.dumps(r) for r in (bad_date, bad_ident, bad_name, odd_type, cond_ref)]
    lines.append(json.dumps(dict(p, id="hostile-6"))[:-40])      # cut short: not JSON
    lines.append(f'{{"resourceType": "Patient", "id": "{family}", "name": [{{"family": "{family}"')
    (out["fhir"] / "hostile.ndjson").write_text("\n".join(lines) + "\n")
    (out["fhir"] / "bundle.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": bad_date}, {"resource": [family, mrn]}, given]}))

    pid = f"PID|1||{mrn}^^^SMARTHOSP&http://hospital.smarthealthit.org&URI^MR~{ssn}^^^USSSA^SS||{family}^{given}||"
    msh = "MSH|^~\\&|HOSTILE|H|TWINLINE|T|20240305081500||{type}|{cid}|P|2.5.1\r"
    hl7 = [
        msh.format(type="ADT^A01^ADT_A01", cid="HOSTILE-1") + f"EVN|A01|20240305\r{pid}{given}|{family}\r"
        + f"PV1|1|{family}|4E^412^B^H|||||||||||||||{given}^^^H^VN|||||||||||||||||||||||||{born}\r",
        msh.format(type="ORU^R01^ORU_R01", cid="HOSTILE-2") + pid + born.replace("-", "") + "|M\r"
        + f"OBR|1|||8867-4^Heart rate^LN|||{born}\rOBX|1|NM|8867-4^Heart rate^LN||{family}|/min|||||F|||{given}\r",
        msh.format(type=f"{family}^{given}", cid="HOSTILE-3") + pid + "\r",
        f"{family} {given} {born} {mrn}\r" + msh.format(type="ADT^A08^ADT_A01", cid="HOSTILE-4")
        + f"PID|1||{mrn}\r\nPV1|{family}\n{given}\r",
    ]
    (out["hl7v2"] / "hostile.hl7").write_text("\n".join(hl7))
    (out["hl7v2"] / "hostile.mllp").write_bytes(b"\x0b" + hl7[0].encode() + b"\x1c\r" + f"{family} {ssn}".encode()
                                                 + b"\x0b" + hl7[1].encode()[:60])

    csv_head = "time,patient_system,patient_id,device_id,hr,spo2,resp_rate,temp,sys,dia\n"
    rows = [f"2024-03-05T08:00:00Z,http://hospital.smarthealthit.org,{mrn},bedside-monitor-7,{family},94,18,37.2,112,85",
            f"{born},http://hospital.smarthealthit.org,{mrn},bedside-monitor-7,82,{given},18,37.2,112,85",
            f"{family},{given},{ssn}",
            "2024-03-05T08:02:00Z,http://hospital.smarthealthit.org," + "x" * 5000 + f"{family},m,80,94,18,37,1,1"]
    (out["csv"] / "vitals.csv").write_text(csv_head + "\n".join(rows) + "\n")

    import warnings

    import pydicom

    ds = pydicom.dcmread(FIXTURES / "dicom" / "generated" / "linked-patient.dcm")
    with warnings.catch_warnings():  # pydicom rightly says these values are wrong for their VR
        warnings.simplefilter("ignore")
        ds.StudyDate = family[:8]
        ds.PatientSex = given[:16]
        ds.StudyTime = born
    ds.save_as(out["dicom"] / "bad-values.dcm")
    whole = (FIXTURES / "dicom" / "generated" / "linked-patient.dcm").read_bytes()
    (out["dicom"] / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    (out["dicom"] / "not-dicom.dcm").write_text(f"{family}^{given} {born} {mrn}")
    return out


MLLP_START, MLLP_END = b"\x0b", b"\x1c\r"


def _listen_and_send(store: Path, hostile: Path) -> Said:
    """`twin listen mllp -vv` in its own process, fed real frames over TCP, stopped by SIGTERM."""
    port = _free_port()
    argv = ["listen", "mllp", "--port", str(port), "--store", str(store), "--drain-every", "0.2", "-vv"]
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.cli import console_main; "
            f"sys.argv = ['twin'] + {argv!r}; console_main()")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TWIN_NO_PROGRESS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    acks = []
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "the listener did not start"
            time.sleep(0.1)
        frames = [(FIXTURES / "hl7v2" / "twin-adt-a01.hl7").read_bytes().replace(b"\n", b"\r")]
        frames += [m.encode() for m in (hostile / "hostile.hl7").read_text().split("\n")]
        for frame in frames:  # one connection per message: a refused one may close its connection
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(MLLP_START + frame + MLLP_END)
                acks.append(_read_ack(s))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # junk, then a frame cut by a hang-up
            s.sendall(frames[1][:40] + MLLP_START + frames[1][:80])
        time.sleep(1.0)  # let the drainer store what was acknowledged
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    text = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
    text += "\nACKs:\n" + "\n".join(a.decode("utf-8", "replace") for a in acks)
    return Said(argv, proc.returncode, text)


def _read_ack(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(MLLP_END):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def said(tmp_path_factory) -> dict[str, list[Said]]:
    """Every command on the fixtures, at debug level: what each said, by the name of the check."""
    from tests.fhir_server import FhirTestServer

    tmp = tmp_path_factory.mktemp("leaks")
    store, report, export = str(tmp / "store"), tmp / "report", tmp / "export"
    hostile = write_hostile_inputs(tmp / "hostile")
    out: dict[str, list[Said]] = {}

    def say(name: str, *argv: str) -> Said:
        s = twin_said(*argv)
        out.setdefault(name, []).append(s)
        return s

    cwd = os.getcwd()
    os.chdir(tmp)  # whatever a command writes to its working folder lands here
    try:
        # the demo job once: every source kind, the gate, the build
        assert say("run", "run", "--config", str(FIXTURES / "demo" / "job.toml"), "--store", store).code == 3
        # the same job under the de-identification profile (docs/privacy.md): its own messages too
        deid = tmp / "deid-job.toml"
        deid.write_text(re.sub(r'^(kind = "\w+")$', r'\1\nprivacy = "deid"',
                               (FIXTURES / "demo" / "job.toml").read_text().replace('"../', f'"{FIXTURES}/'),
                               flags=re.MULTILINE))
        saved_key = os.environ.get("TWIN_KEY")
        os.environ["TWIN_KEY"] = "no-patient-data-test-key-0123456789abcdef"  # profiles refuse the public key
        try:
            say("run deid", "run", "--config", str(deid), "--store", str(tmp / "deid-store"))
            say("run deid", "quarantine", "list", "--all", "--store", str(tmp / "deid-store"))
        finally:
            if saved_key is None:
                os.environ.pop("TWIN_KEY", None)
            else:
                os.environ["TWIN_KEY"] = saved_key
        # every fixture file, the ones the demo leaves out included, then the hostile ones
        for kind, folder in (("fhir", "fhir"), ("hl7v2", "hl7v2"), ("dicom", "dicom"), ("csv", "devices")):
            say(f"import {kind}", "import", kind, str(FIXTURES / folder), "--store", store, "--reprocess")
            say(f"import {kind} hostile", "import", kind, str(hostile[kind]), "--store", store)
        say("import json logs", "import", "csv", str(FIXTURES / "devices"), "--store", store, "--reprocess",
            "--log-format", "json")
        # strict: a value that does not convert rejects its message, with a message saying why
        say("import hl7v2 hostile", "import", "hl7v2", str(hostile["hl7v2"]), "--store", store, "--strict",
            "--reprocess")
        say("check", "check", "--store", store, "--report", str(report))
        say("build", "build", "--store", store, "--force")
        say("status", "status", "--store", store)
        say("link-report", "link-report", "--store", store)
        say("maintain", "maintain", "--store", store, "--vacuum-days", "30")
        listed = say("quarantine list", "quarantine", "list", "--store", store, "--all", "--limit", "100000")
        ids = sorted(set(re.findall(r"^([0-9a-f]{12})  ", listed.text, re.MULTILINE)))
        assert len(ids) > 20, "the fixtures and hostile inputs should fill the quarantine"
        for qid in ids:
            say("quarantine show", "quarantine", "show", qid, "--store", store)
        say("quarantine retry", "quarantine", "retry", "--store", store)
        say("export", "export", "--all", "--store", store, "--out", str(export), "--validate")
        tid = next(r["twin_id"] for r in Store(Path(store)).read("identity").to_pylist()
                   if r["patient_id"] == "2354df0f-349f-4042-a827-2ef12013e69d")
        show = say("show", "show", tid, "--store", store)
        # `twin show` exists to print one twin to the operator who asked for it: its birth date and record
        # ids are the point. Only its log lines (stderr) are searched.
        out["show, not searched"] = [Said(show.argv, show.code, show.text)]
        show.text = "\n".join(ln for ln in show.text.splitlines() if re.match(r"(DEBUG|INFO|WARNING|ERROR) ", ln))
        with FhirTestServer(FIXTURES / "fhir-server") as server:
            say("fetch fhir", "fetch", "fhir", server.base_url, "--store", store, "--source", "server")
            say("fetch fhir", "fetch", "fhir", server.base_url, "--store", store, "--source", "server-bulk", "--bulk")
        out["listen mllp"] = [_listen_and_send(tmp / "listen-store", hostile["hl7v2"])]
        # error paths: a missing file, a bad job file, input of the wrong kind, servers that are not there
        bad_job = tmp / "bad-job.toml"
        bad_job.write_text('[job]\nname = "x"\n[[source]]\nname = "a"\nkind = "fhir"\npaths = ["nowhere"]\n')
        broken_job = tmp / "broken-job.toml"
        broken_job.write_text("[job\nname = ")
        p = _patient_1()
        family, ssn = p["name"][0]["family"], next(i["value"] for i in p["identifier"] if "ssn" in i.get("system", ""))
        errors = [("import", "fhir", str(tmp / "missing.ndjson")), ("run", "--config", str(bad_job)),
                  ("run", "--config", str(broken_job)), ("run", "--config", str(tmp / "missing.toml")),
                  ("import", "csv", str(hostile["hl7v2"] / "hostile.hl7")),
                  ("import", "hl7v2", str(FIXTURES / "fhir" / "bundles" / "patient-1.json")),
                  ("import", "fhir", str(FIXTURES / "hl7v2" / "twin-adt-a01.hl7")),
                  ("import", "dicom", str(FIXTURES / "devices" / "linked" / "vitals.csv")),
                  ("quarantine", "show", "0000000000"), ("show", "0" * 32),
                  # a name or an SSN given where a twin or record id is expected: not echoed back
                  ("show", ssn), ("export", family, "--out", str(tmp / "export-one")),
                  ("fetch", "fhir", "http://127.0.0.1:9/fhir", "--retries", "0"),
                  ("fetch", "dicomweb", "http://127.0.0.1:9/dicom-web", "--retries", "0")]
        for argv in errors:
            say("error paths", *argv, "--store", store)
    finally:
        os.chdir(cwd)
    # what the commands wrote besides the store's tables: reports, export index and messages
    out["files"] = [Said([name], 0, text) for name, text in {
        **files_said(report), **files_said(Path(store) / "_twin" / "reports"),
        **files_said(export, "index.ndjson"), **_rejected_messages(export),
        **{k: v for k, v in files_said(tmp).items() if k.endswith((".log", ".txt", ".md", ".html"))}}.items()]
    # the runs table: inputs, notes and counts of every run, as `twin status` and schedulers read them
    out["files"].append(Said(["runs table"], 0, json.dumps(Store(Path(store)).read("runs").to_pylist(), default=str)))
    return out


def _rejected_messages(export: Path) -> dict[str, str]:
    """rejected.ndjson without its payloads: a payload is the rejected resource itself (patient data,
    like the Bundles next to it, kept so the operator can see what was refused); its message is not."""
    f = export / "rejected.ndjson"
    if not f.exists():
        return {}
    lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {str(f): "\n".join(json.dumps({k: v for k, v in r.items() if k != "payload"}) for r in lines)}


CHECKS = ["run", "run deid", "import fhir", "import fhir hostile", "import hl7v2", "import hl7v2 hostile", "import json logs",
          "import dicom",
          "import dicom hostile", "import csv", "import csv hostile", "check", "build", "status", "link-report", "maintain",
          "quarantine list", "quarantine show", "quarantine retry", "export", "show", "fetch fhir", "listen mllp",
          "error paths", "files"]


@pytest.mark.parametrize("check", CHECKS)
def test_no_patient_data_in_what_the_command_said(said, check):
    assert said.get(check), f"nothing ran for {check}"
    leaks = [f"twin {' '.join(s.argv)} (exit {s.code}): {hit}" for s in said[check] for hit in find_leaks(s.text)]
    assert not leaks, "\n".join(leaks[:20])


def test_the_search_finds_what_it_looks_for(said):
    """Not blind: `twin show` prints the birth date and record ids it is asked to show."""
    hits = find_leaks(said["show, not searched"][0].text)
    assert any("'1995-01-08'" in h for h in hits), hits


def test_the_commands_ran_at_debug_level(said):
    # the search means something only if the commands spoke: debug lines, summaries, quarantine messages
    text = "\n".join(s.text for group in said.values() for s in group)
    assert "DEBUG " in text and "quarantined" in text and "report" in text
    assert '"level": "info"' in said["import json logs"][0].text
    assert any("MSA|AE" in s.text or "MSA|AR" in s.text for s in said["listen mllp"])


# --------------------------------------------------------------------------- exception texts


def test_an_internal_error_quoting_a_value_is_reported_without_it(monkeypatch, tmp_path):
    """A library exception that quotes a value (pyarrow does) leaves its type and place, at -vv its frames."""
    import pipeline.twins

    p = _patient_1()

    def fails(*a, **k):
        try:
            raise KeyError(p["identifier"][2]["value"])
        except KeyError as e:
            raise ValueError(f"Could not convert {p['name'][0]['family']!r} with type str: born {p['birthDate']}") from e

    monkeypatch.setattr(pipeline.twins, "build_twins", fails)
    s = twin_said("build", "--store", str(tmp_path / "s"))
    assert s.code == 1
    assert "internal error (ValueError at" in s.text and "Traceback" in s.text and "in fails" in s.text
    assert "KeyError" in s.text and "direct cause" in s.text
    assert not find_leaks(s.text), find_leaks(s.text)
    s = twin_said("build", "--store", str(tmp_path / "s"), "--log-format", "json")
    assert '"error": "ValueError"' in s.text and not find_leaks(s.text)


def test_library_warnings_and_log_lines_that_quote_values_are_withheld():
    import warnings

    from pydicom import config as pydicom_config
    from pydicom.dataset import Dataset

    from pipeline.logs import install

    p = _patient_1()
    buf = io.StringIO()
    saved = pydicom_config.settings.writing_validation_mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            install(logging.DEBUG, stream=buf)
            pydicom_config.settings.writing_validation_mode = pydicom_config.WARN
            Dataset().PatientSex = p["name"][0]["given"][0]  # pydicom warns and logs: Invalid value for VR CS: '...'
            warnings.warn(f"a library's warning about {p['birthDate']}", UserWarning, stacklevel=1)
    finally:
        pydicom_config.settings.writing_validation_mode = saved
        logging.getLogger().handlers[:] = []
    text = buf.getvalue()
    assert "WARNING pydicom" in text and "UserWarning at" in text and "withheld" in text
    assert not find_leaks(text), find_leaks(text)


@pytest.mark.server
def test_fetch_dicomweb_says_no_patient_data(tmp_path, monkeypatch):
    """`twin fetch dicomweb -vv` from a real Orthanc holding the DICOM fixtures and a hostile file."""
    from pipeline.connectors.dicom_files import walk
    from tests.test_dicomweb import AUTH, orthanc_server

    hostile = write_hostile_inputs(tmp_path / "hostile")["dicom"]
    (tmp_path / "orthanc").mkdir()
    with orthanc_server(tmp_path / "orthanc") as server:
        assert server.load(walk([FIXTURES / "dicom", hostile]))
        monkeypatch.setenv("DICOMWEB_AUTH", AUTH["Authorization"])
        store = str(tmp_path / "store")
        said = [twin_said("fetch", "dicomweb", server.dicomweb, "--store", store, "--auth-header-env", "DICOMWEB_AUTH"),
                twin_said("quarantine", "list", "--store", store, "--all")]
    assert said[0].code in (0, 3) and "DEBUG " in said[0].text
    leaks = [hit for s in said for hit in find_leaks(s.text)]
    assert not leaks, "\n".join(leaks[:20])
