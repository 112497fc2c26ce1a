"""The names, identifiers and birth dates present in the fixture inputs, read from them.

Used by the tests that prove a store holds none of them (tests/test_privacy.py); the
output test (tests/test_no_patient_data_in_output.py) reads a wider set (device logs,
DICOMDIR records, MRG-1, escaped HL7 names) with its own rules. Values shorter than five
characters are left out: "Doe", "Li", "M" or "12" match words and numbers everywhere.
"""

from __future__ import annotations

import functools
import json
import re

import pydicom

from .conftest import FIXTURES

MIN_LENGTH = 5


@functools.cache
def sensitive_values() -> dict[str, frozenset[str]]:
    names: set[str] = set()
    idents: set[str] = set()
    births: set[str] = set()
    for folder in (FIXTURES / "fhir", FIXTURES / "fhir-server"):
        for f in folder.rglob("*.*json"):
            text = f.read_text(encoding="utf-8")
            docs = [json.loads(line) for line in text.splitlines() if line.strip()] if f.suffix == ".ndjson" \
                else [json.loads(text)]
            for doc in docs:
                for res in [e.get("resource", {}) for e in doc.get("entry", [])] or [doc]:
                    if res.get("resourceType") != "Patient":
                        continue
                    for n in res.get("name", []):
                        names.update([n.get("family", ""), *n.get("given", [])])
                    idents.update(i["value"] for i in res.get("identifier", []) if "value" in i)
                    births.add(res.get("birthDate", ""))
    for f in (FIXTURES / "hl7v2").rglob("*"):
        if not f.is_file() or f.suffix in (".md", ".py"):
            continue
        for seg in re.split(rb"[\r\n]+", f.read_bytes()):
            if not seg.startswith(b"PID") or len(seg) < 4:
                continue
            sep = chr(seg[3])
            fields = seg.decode("latin-1").split(sep)
            if len(fields) > 3:
                idents.update(rep.split("^")[0] for rep in fields[3].split("~"))
            if len(fields) > 5:
                names.update(p for rep in fields[5].split("~") for p in rep.split("^")[:2])
            if len(fields) > 7:
                births.add(fields[7][:8])
    for f in (FIXTURES / "dicom").rglob("*"):
        if f.is_file() and f.suffix not in (".md", ".py", ".txt"):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - broken on purpose: they hold nothing readable
                continue
            names.update(str(ds.get("PatientName", "")).replace("^", " ").split())
            idents.add(str(ds.get("PatientID", "")))
            births.add(str(ds.get("PatientBirthDate", "")))
    iso = {f"{b[:4]}-{b[4:6]}-{b[6:8]}" for b in births if len(b) == 8 and b.isdigit()}

    def keep(values: set[str]) -> frozenset[str]:
        return frozenset(v.strip() for v in values if len(v.strip()) >= MIN_LENGTH)

    return {"names": keep(names), "identifiers": keep(idents), "births": keep(births | iso)}


def contains(text: str, value: str) -> bool:
    """`value` in `text` as a token: 99000 is an identifier in the inputs and also sits
    inside SNOMED code 4399000..."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", text) is not None


def found_in(text: str) -> dict[str, list[str]]:
    """Which sensitive values `text` holds, by kind (empty lists: none)."""
    return {kind: sorted(v for v in values if contains(text, v)) for kind, values in sensitive_values().items()}
