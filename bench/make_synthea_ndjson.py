"""Make a Bulk-Data-style NDJSON set from the Synthea transaction bundles, N times larger.

Each copy gets fresh ids (uuid5 of copy number and old id) and fresh identifier values,
and its references are rewritten to match, so the copies are distinct patients with
consistent references.
`urn:uuid:` references become `Type/id`, as a Bulk Data export writes them.

    python bench/make_synthea_ndjson.py --copies 10 --out bench/data/synthea-x10
"""

from __future__ import annotations

import argparse
import re
import uuid
from pathlib import Path

import orjson

SRC = Path(__file__).resolve().parent.parent.parent / "shared/data/fhir/generated-sample-data/R4/SYNTHEA"
NS = uuid.UUID("6f1e3b1c-2a55-4a0e-9f0e-6b1d2a3c4d5e")
_URN = re.compile(rb'"urn:uuid:([0-9a-f-]{36})"')


def _target(m: re.Match, ids: dict[str, tuple[str, str]]) -> bytes:
    old = m.group(1).decode()
    if old not in ids:
        return m.group(0)
    rtype, new = ids[old]
    return f'"{rtype}/{new}"'.encode()


def convert(src: Path, out: Path, copies: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    handles: dict[str, object] = {}
    n = 0
    try:
        for f in sorted(src.glob("*.json")):
            bundle = orjson.loads(f.read_bytes())
            for k in range(copies):
                ids = {}
                for e in bundle["entry"]:
                    r = e["resource"]
                    new = str(uuid.uuid5(NS, f"{k}/{r['id']}")) if copies > 1 else r["id"]
                    ids[e["fullUrl"].removeprefix("urn:uuid:")] = (r["resourceType"], new)
                for e in bundle["entry"]:
                    r = dict(e["resource"])
                    r["id"] = ids[e["fullUrl"].removeprefix("urn:uuid:")][1]
                    if copies > 1 and isinstance(r.get("identifier"), list):
                        # fresh identifiers too (MRN, SSN, ...): copies are different people, not
                        # records of one person that identity linking would rightly merge
                        r["identifier"] = [dict(i, value=f"{i['value']}-{k}") if "value" in i else i
                                           for i in r["identifier"]]
                    raw = orjson.dumps(r)
                    raw = _URN.sub(lambda m, ids=ids: _target(m, ids), raw)
                    t = r["resourceType"]
                    if t not in handles:
                        handles[t] = open(out / f"{t}.000.ndjson", "wb")  # noqa: SIM115
                    handles[t].write(raw + b"\n")
                    n += 1
    finally:
        for h in handles.values():
            h.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--src", type=Path, default=SRC)
    a = ap.parse_args()
    print(f"{convert(a.src, a.out, a.copies):,} resources written to {a.out}")


if __name__ == "__main__":
    main()
