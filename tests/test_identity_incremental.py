"""Incremental linking: after every run, the store is linked exactly as linking everyone
again would link it, while a run links only the records it may have moved.

Each scenario is a seeded series of small imports into one store (new patients, new
versions that gain or lose identifiers and links, deletions) from three sources whose
identifiers are drawn from a small pool, so that groups form, grow, merge and split.
After each run the identity table and the twin id of every patient row are compared
with a full linkage of the store (`compute_linkage`, which `twin link-report` uses).
"""

from __future__ import annotations

import random

import orjson
import pytest

from pipeline import identity, imports
from pipeline.identity import IdentityConfig, compute_linkage, linking_fingerprint, record_key, twin_id_of_key
from pipeline.imports import run_import
from pipeline.store import Store

SYSTEMS = ["urn:mrn:east", "urn:mrn:west", "https://github.com/synthetichealth/synthea", "SYNTHEA"]
ALIASES = {"SYNTHEA": "https://github.com/synthetichealth/synthea"}
BIRTHS = ["1970-01-01", "1980-02-02", "1990-03-03"]
NAMES = [("Smith", "Ann"), ("Lee", "Kim"), ("Park", "Jo")]


def _patient(rnd: random.Random, pid: str, ids: list[str]) -> dict:
    family, given = rnd.choice(NAMES)
    r = {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": [given]}],
         "birthDate": rnd.choice(BIRTHS), "gender": rnd.choice(["female", "male"]),
         "address": [{"postalCode": rnd.choice(["02139", "02140"])}]}
    if rnd.random() < 0.8:
        r["identifier"] = [{"system": rnd.choice(SYSTEMS), "value": f"V{rnd.randrange(8)}",
                            "type": {"coding": [{"code": rnd.choice(["MR", "MR", "SS"])}]}}
                           for _ in range(rnd.randrange(1, 3))]
    if rnd.random() < 0.25:
        other = rnd.choice([i for i in ids if i != pid] or [pid])
        r["link"] = [{"other": {"reference": f"Patient/{other}"},
                      "type": rnd.choice(["replaced-by", "replaces", "seealso"])}]
    return r


def _run_file(rnd: random.Random, tmp, n: int, ids: list[str]):
    """One run's input: a transaction Bundle of new or changed patients and some deletions."""
    entries = []
    for pid in rnd.sample(ids, k=min(len(ids), rnd.randrange(1, 6))):
        entries.append({"resource": _patient(rnd, pid, ids), "request": {"method": "PUT", "url": f"Patient/{pid}"}})
    if n > 2 and rnd.random() < 0.3:
        gone = rnd.choice(ids)
        entries = [e for e in entries if e["resource"]["id"] != gone]
        entries.append({"request": {"method": "DELETE", "url": f"Patient/{gone}"}})
    path = tmp / f"run{n}.json"
    path.write_bytes(orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
    return path


def _check(store: Store, cfg: IdentityConfig) -> None:
    expected = compute_linkage(store, cfg)
    twin_of = {m: twin_id_of_key(root) for root, members in expected.groups.items() for m in members}
    sizes = {k: len(m) for m in expected.groups.values() for k in m}
    got = store.read("identity").to_pylist()
    assert {record_key(r["source"], r["patient_id"]): r["twin_id"] for r in got} == twin_of
    for r in got:
        k = record_key(r["source"], r["patient_id"])
        assert r["group_size"] == sizes[k], k
        assert sorted(r["linked_by"]) == sorted(expected.rules.get(k, ())), k
    for table in ("patient", "patient_identifier", "patient_link"):
        t = store.read(table, ["source", "patient_id", "twin_id"])
        for s, p, tw in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            assert tw == twin_of[record_key(s, p)], (table, s, p)


@pytest.mark.parametrize(("seed", "demographic"), [(1, False), (2, False), (3, True), (4, True)])
def test_linking_only_what_a_run_touched_equals_linking_everyone(tmp_path, monkeypatch, seed, demographic):
    cfg = IdentityConfig(aliases=dict(ALIASES), demographic=demographic, threshold=0.9, review_margin=0.2)
    monkeypatch.setattr(identity, "load_identity_config", lambda path=None: cfg)
    results = []
    real = imports.relink
    monkeypatch.setattr(imports, "relink", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    rnd = random.Random(seed)
    store = Store(tmp_path / "s")
    ids = {s: [f"{s}{i}" for i in range(10)] for s in ("a", "b", "c")}
    for n in range(14):
        source = rnd.choice(sorted(ids))
        run_import(store, "fhir", [_run_file(rnd, tmp_path, n, ids[source])], source=source)
        _check(store, cfg)
    assert results[0].full and not any(r.full for r in results[1:])
    assert sum(r.records for r in results[1:]) < sum(len(v) for v in ids.values()) * (len(results) - 1)
    assert any(r.changed_records for r in results[1:])  # groups did form and change on the way


def test_other_rules_link_the_whole_store_once_and_a_failed_run_keeps_the_old_fingerprint(tmp_path, monkeypatch):
    cfg = IdentityConfig()
    monkeypatch.setattr(identity, "load_identity_config", lambda path=None: cfg)
    results = []
    real = imports.relink
    monkeypatch.setattr(imports, "relink", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    store = Store(tmp_path / "s")
    rnd = random.Random(5)
    ids = [f"p{i}" for i in range(10)]
    run_import(store, "fhir", [_run_file(rnd, tmp_path, 0, ids)], source="a")
    run_import(store, "fhir", [_run_file(rnd, tmp_path, 1, ids)], source="a")
    assert [(r.full, r.rules_changed) for r in results] == [(True, False), (False, False)]
    assert store.manifest()["linking"] == linking_fingerprint(cfg)
    # the aliases join two namespaces: what was linked under the old rules is linked again
    cfg = IdentityConfig(aliases=dict(ALIASES))
    run = run_import(store, "fhir", [_run_file(rnd, tmp_path, 2, ids)], source="a")
    assert results[-1].full and results[-1].rules_changed and store.manifest()["linking"] == linking_fingerprint(cfg)
    assert any("linked under other rules" in n for n in run.notes)
    _check(store, cfg)
    # a run that fails after linking leaves the manifest's fingerprint as it was
    cfg = IdentityConfig(aliases=dict(ALIASES), link_types={"MR"})

    def fail(run):
        raise RuntimeError("killed after linking")

    monkeypatch.setattr(imports.Run, "record", fail)
    with pytest.raises(RuntimeError):
        run_import(store, "fhir", [_run_file(rnd, tmp_path, 3, ids)], source="a")
    assert store.manifest()["linking"] == linking_fingerprint(IdentityConfig(aliases=dict(ALIASES)))
    assert Store(tmp_path / "s").manifest()["linking"] != linking_fingerprint(cfg)


def test_a_deletion_only_run_removes_the_record_from_its_group(tmp_path):
    """x and y share an MRN: one twin, named for x (the smaller key). Deleting x leaves y
    alone, under its own twin id, by a run that writes nothing."""
    store = Store(tmp_path / "s")
    same = [{"system": "urn:mrn:east", "value": "1", "type": {"coding": [{"code": "MR"}]}}]
    a = {"resourceType": "Patient", "id": "x", "identifier": same}
    b = {"resourceType": "Patient", "id": "y", "identifier": same}
    (tmp_path / "p.ndjson").write_bytes(orjson.dumps(a) + b"\n" + orjson.dumps(b) + b"\n")
    run_import(store, "fhir", [tmp_path / "p.ndjson"], source="h")
    assert set(store.read("identity").column("group_size").to_pylist()) == {2}
    (tmp_path / "d.json").write_bytes(orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/x"}}]}))
    run_import(store, "fhir", [tmp_path / "d.json"], source="h")
    rows = store.read("identity").to_pylist()
    assert [(r["patient_id"], r["group_size"]) for r in rows] == [("y", 1)]
    t = store.read("patient", ["patient_id", "twin_id"])
    assert t.to_pylist() == [{"patient_id": "y", "twin_id": identity.twin_id_for_record("h", "y")}]


def test_a_run_that_moves_nobody_leaves_the_identity_table_as_it_was(tmp_path):
    """An update to a known patient (a new postal code, say) changes no group: no new version
    of the identity table, so a live feed of updates does not copy it at every drain."""
    store = Store(tmp_path / "s")
    mrn = [{"system": "urn:mrn:east", "value": "1", "type": {"coding": [{"code": "MR"}]}}]
    for n, postal in enumerate(("02139", "01970")):
        p = {"resourceType": "Patient", "id": "x", "identifier": mrn, "address": [{"postalCode": postal}]}
        (tmp_path / f"{n}.ndjson").write_bytes(orjson.dumps(p) + b"\n")
    run_import(store, "fhir", [tmp_path / "0.ndjson"], source="h")
    version = store.committed_version("identity")
    run = run_import(store, "fhir", [tmp_path / "1.ndjson"], source="h")
    assert run.counts["h"].written == 1  # the patient was written again...
    assert store.committed_version("identity") == version  # ...and linking had nothing to write
    other = {"resourceType": "Patient", "id": "y", "identifier": mrn}
    (tmp_path / "2.ndjson").write_bytes(orjson.dumps(other) + b"\n")
    run_import(store, "fhir", [tmp_path / "2.ndjson"], source="h")
    assert store.committed_version("identity") == version + 1
    assert set(store.read("identity").column("group_size").to_pylist()) == {2}
