"""Long fuzzing of the FHIR input of the view runner, outside the test run.

    python bench/fuzz_fhir_views.py [--executions 1000000] [--seconds S] [--seed 1]

One execution is one mutated resource mapped by the ingest's `ResourceMapper` (every
SQL-on-FHIR view in mappings/views/ that takes its type, the value conversion to the
schema's types, the column checks); one in ten also goes through the file connector
first, as an NDJSON line with byte-level damage. Seeds: every resource of fixtures/fhir
(and ../shared/data/fhir when present). Mutations are structure-aware: a value anywhere
in the tree replaced by a value of another JSON type, odd dates, decimals and
references (conditional, urn:uuid, contained, absolute, half-formed), deleted or
duplicated elements, a list where an object belongs and the reverse, deep nesting,
huge strings, another resourceType.

Checked for every execution: no exception (only `Unresolved`, for a conditional or
urn:uuid reference while the resolver is not final); the result is None, a Rejected with
stage and reason, or rows of the tables' widths; no Rejected message quotes a name,
identifier value or birth date of the seed; the connector yields only Resource, Rejected
or Deletion units. A failing input is written to $TMPDIR/fuzz-fhir-failure-<n>.json and
the exit code is 1.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzzing import Fuzz, options  # noqa: E402  (bench/, the script's folder)

from pipeline.connectors.fhir_files import FhirFile  # noqa: E402
from pipeline.ingest import Mapped, ResourceMapper, ViewSet  # noqa: E402
from pipeline.references import IdentifierIndex, Resolver  # noqa: E402
from pipeline.schema import load_schema  # noqa: E402
from pipeline.units import Deletion, Rejected, Resource  # noqa: E402
from pipeline.views import Unresolved  # noqa: E402

ODD_STRINGS = ["", " ", "2020-13-45", "0000", "9999-12-31T23:59:60Z", "2020-01-01T00:00:00+25:00", "2020-02-30",
               "1e400", "-0", "NaN", "Infinity", "1" * 400, "Patient?identifier=a|b", "Patient?identifier=|",
               "Patient?", "urn:uuid:zzz", "urn:uuid:", "#", "#x", "Patient/", "/Patient/x/_history/",
               "http://x/fhir/Patient/y", "Observation/../../x", "\x00", "\ud7ff\ue000", "é" * 1000, "𝔘" * 50,
               "x" * 100_000, "2020", "2020-01", "T10:00", "12:00:00", "--", "|", "^~\\&"]
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**63, -(2**63) - 1, 1e308, -1e-308, 3.5, [], {}, [None], [[]],
                         [{}], {"": None}, {"reference": 5}, {"coding": "x"}, {"value": "7", "unit": 1}]
TYPES = ["Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "MedicationAdministration",
         "MedicationStatement", "Procedure", "Immunization", "AllergyIntolerance", "DiagnosticReport",
         "ImagingStudy", "Device", "Claim"]


def seeds() -> list[dict[str, Any]]:
    folders = [ROOT / "fixtures" / "fhir"]
    shared = ROOT.parent / "shared" / "data" / "fhir"
    if shared.is_dir():
        folders.append(shared)
    out: list[dict[str, Any]] = []
    for folder in folders:
        for p in sorted(folder.rglob("*.json")) + sorted(folder.rglob("*.ndjson")):
            if p.stat().st_size > 20_000_000:
                continue
            try:
                for unit in FhirFile(p):
                    if isinstance(unit, Resource):
                        out.append(unit.resource)
            except Exception:  # noqa: BLE001 - a seed the reader refuses is no seed
                continue
            if len(out) > 20_000:
                break
    return out


def secrets(res: dict[str, Any]) -> list[str]:
    found = []
    for n in res.get("name") or []:
        if isinstance(n, dict):
            found += [v for v in [n.get("family"), *(n.get("given") or [])] if isinstance(v, str) and len(v) > 4]
    for i in res.get("identifier") or []:
        if isinstance(i, dict) and isinstance(i.get("value"), str) and len(i["value"]) > 4:
            found.append(i["value"])
    if isinstance(res.get("birthDate"), str):
        found.append(res["birthDate"])
    return found


def _pick(rnd: random.Random, root: dict[str, Any]) -> tuple[Any, Any] | None:
    """A random (container, key) of the tree, by a random walk down from the root: O(depth),
    however wide the mutations made the tree."""
    node: Any = root
    picked = None
    for _ in range(40):
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        if not keys:
            break
        key = rnd.choice(keys) if isinstance(node, dict) else rnd.randrange(len(node))
        picked = (node, key)
        child = node[key]
        if not isinstance(child, dict | list) or rnd.random() < 0.3:
            break
        node = child
    return picked


def mutate(rnd: random.Random, res: dict[str, Any]) -> dict[str, Any]:
    res = copy.deepcopy(res)
    for _ in range(rnd.randint(1, 6)):
        picked = _pick(rnd, res)
        if picked is None:
            break
        holder, key = picked
        v = holder[key]
        op = rnd.randrange(11)
        if op == 0:
            holder[key] = copy.deepcopy(rnd.choice(ODD_VALUES))
        elif op == 1:
            holder[key] = rnd.choice(ODD_STRINGS)
        elif op == 2 and isinstance(holder, dict):
            del holder[key]
        elif op == 3:
            holder[key] = [v] * rnd.choice((2, 3, 200))
        elif op == 4 and isinstance(v, list) and v:
            holder[key] = v[0]
        elif op == 5:
            deep: Any = v
            for _ in range(rnd.choice((5, 50, 300))):
                deep = {"x": deep} if rnd.random() < 0.5 else [deep]
            holder[key] = deep
        elif op == 6 and isinstance(v, str):
            holder[key] = v[: rnd.randrange(len(v) + 1)] + rnd.choice(ODD_STRINGS)
        elif op == 7 and isinstance(holder, dict):
            holder[rnd.choice(["reference", "valueQuantity", "effectivePeriod", "component", "extension",
                               "contained", "subject", "identifier", "code", "valueString", "onsetPeriod"])] = \
                copy.deepcopy(rnd.choice(ODD_VALUES + ODD_STRINGS + [{"reference": rnd.choice(ODD_STRINGS)}]))
        elif op == 8 and isinstance(v, (int, float)) and not isinstance(v, bool):
            holder[key] = rnd.choice([str(v), -v, v * 1e300, float("nan"), float("inf")])
        elif op == 9:
            res["resourceType"] = rnd.choice(TYPES)
        else:
            res["id"] = rnd.choice([None, "", "x" * 100, "a b", 7, ["i"], rnd.choice(ODD_STRINGS)])
    if not isinstance(res.get("resourceType"), str):
        res["resourceType"] = rnd.choice(TYPES)
    if not isinstance(res.get("id"), str) or not res["id"]:
        res["id"] = "fuzz"
    return res


def damage_bytes(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        pos = rnd.randrange(len(b) + 1)
        op = rnd.randrange(4)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rnd.randrange(256)
        elif op == 1:
            b[pos:pos] = rnd.choice([b"\x00", b"\xff\xfe", b"{", b"]", b'"', b"\\u00", b"\n", b"\r\n", b"1e999"])
        elif op == 2:
            del b[pos:pos + rnd.randint(1, 8)]
        else:
            b = b[:pos]
    return bytes(b)


class Target:
    def __init__(self) -> None:
        self.views = ViewSet(load_schema())
        self.index = IdentifierIndex(lambda: [])
        self.index.add("Practitioner", "http://hl7.org/fhir/sid/us-npi", "9999999999", "prac-1")
        self.resolver = Resolver(self.index)
        self.mapper = ResourceMapper(self.views, self.resolver)
        self.widths = {t: len(self.views.schema.table(t).own_columns) for t in self.views.tables}
        self.shm = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()) / f"fuzz-fhir-{os.getpid()}.ndjson"

    def map(self, res: dict[str, Any], seed: dict[str, Any], final: bool) -> None:
        self.resolver.final = final
        try:
            out = self.mapper.map(Resource(res, "fuzz.ndjson:1", None))
        except Unresolved:
            assert not final, "Unresolved raised by a final resolver"
            return
        if out is None:
            return
        if isinstance(out, Rejected):
            assert out.stage and out.reason, "a Rejected without stage or reason"
            leaked = [s for s in secrets(seed) if s in out.message]
            assert not leaked, f"a refusal quotes patient values: {leaked}"
            return
        assert isinstance(out, Mapped)
        for table, rows in out.tables.items():
            assert all(len(r) == self.widths[table] for r in rows), f"rows of {table} have the wrong width"

    def read(self, data: bytes, seed: dict[str, Any]) -> None:
        self.shm.write_bytes(data)
        for unit in FhirFile(self.shm):
            assert isinstance(unit, Resource | Rejected | Deletion), type(unit)
            if isinstance(unit, Resource):
                self.map(unit.resource, seed, True)
            elif isinstance(unit, Rejected):
                assert unit.reason


def main() -> int:
    args = options(__doc__).parse_args()
    sys.setrecursionlimit(10_000)
    rnd = random.Random(args.seed)
    corpus = seeds()
    target = Target()
    fuzz = Fuzz("fhir", ".json", args)
    while fuzz.more():
        seed = rnd.choice(corpus)
        res = mutate(rnd, seed)
        try:
            if rnd.random() < 0.1:
                line = json.dumps(res, default=str, allow_nan=True).encode()
                target.read(damage_bytes(rnd, line) + b"\n" + line + b"\n", seed)
            else:
                target.map(res, seed, rnd.random() < 0.9)
        except Exception:  # noqa: BLE001 - every failure is reported and kept
            fuzz.failed(lambda out, res=res: _save(out, res))
    code = fuzz.finish(f"{len(corpus):,} seeds")
    target.shm.unlink(missing_ok=True)
    return code


def _save(out: Path, res: Any) -> None:
    try:
        out.write_bytes(orjson.dumps(res, default=str))
    except TypeError:  # deeper than orjson writes
        out.write_text(repr(res))


if __name__ == "__main__":
    sys.exit(main())
