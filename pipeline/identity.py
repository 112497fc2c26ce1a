"""Which twin a row belongs to: linking the records of one person across sources.

A row names a patient record of its source (`source`, `patient_id`). Records are
linked into groups by deterministic rules first: a shared identifier (namespace and
value, namespaces aliased in config/identity.toml), and Patient.link / HL7 merges
(replaced-by, replaces). Demographic matching (name, birth date, sex, postal code) is
optional, scored against a threshold and reported, never silent.

The twin id of a group is a keyed hash of the smallest record key in it. A record
alone keeps the hash of its own key, which the ingest stage can compute without
looking anything up; only records that join a group whose smallest key is another's
change twin id, and `relink` rewrites exactly those rows. The same inputs give the
same ids on any machine with the same key, and an id reveals no identifier.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError
from .keys import keyed_hash
from .privacy.reshift import Move, reshift
from .resources import config_dir

# --------------------------------------------------------------------------- twin ids


def record_key(source: str, patient_id: str) -> str:
    return f"{source}|Patient/{patient_id}"


def twin_id_for_record(source: str, patient_id: str) -> str:
    return twin_id_of_key(record_key(source, patient_id))


def twin_id_of_key(key: str) -> str:
    """The twin id named for a record key: a record's own, or its group's (the smallest key)."""
    return keyed_hash("twin", key)


class TwinIds:
    """Maps (source, patient_id) to twin ids during a run: the stored links, else the record's own hash."""

    def __init__(self, links: dict[str, str] | None = None):
        self._cache: dict[tuple[str, str], str] = {}
        self._links = links or {}

    def __call__(self, source: str, patient_id: str | None) -> str | None:
        if patient_id is None:
            return None
        k = (source, patient_id)
        tid = self._cache.get(k)
        if tid is None:
            tid = self._links.get(record_key(source, patient_id)) or twin_id_for_record(source, patient_id)
            self._cache[k] = tid
        return tid


def stored_links(store) -> dict[str, str]:
    """record key -> twin id, for records whose twin id is not their own hash."""
    if not store.exists("identity"):
        return {}
    t = store.read("identity", ["source", "patient_id", "twin_id", "group_size"], latest=True)
    t = t.filter(pc.greater(t.column("group_size"), 1))  # most records are alone: only groups leave Arrow
    return {record_key(s, p): tw for s, p, tw in zip(
        *(t.column(c).to_pylist() for c in ("source", "patient_id", "twin_id")), strict=True)}


# --------------------------------------------------------------------------- config

_WEIGHTS = ("family", "given", "birth_date", "sex", "postal_code")


@dataclass
class IdentityConfig:
    link_types: set[str] = field(default_factory=set)
    ignore_systems: set[str] = field(default_factory=set)
    link_without_system: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    link_types_patient: set[str] = field(default_factory=lambda: {"replaced-by", "replaces"})
    demographic: bool = False
    threshold: float = 0.95
    review_margin: float = 0.15
    weights: dict[str, float] = field(default_factory=lambda: {"family": 0.3, "given": 0.2, "birth_date": 0.3,
                                                                "sex": 0.1, "postal_code": 0.1})

    def namespace(self, system: str | None) -> str | None:
        if not system:
            return None
        return self.aliases.get(system, system)


def load_identity_config(path: str | Path | None = None) -> IdentityConfig:
    """Read config/identity.toml (or `path`); every problem is reported at once, with its key."""
    p = Path(path) if path else config_dir() / "identity.toml"
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"identity config {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"identity config {p} is not valid TOML: {e}") from None
    return parse_identity_config(raw, str(p))


def parse_identity_config(raw: dict[str, Any], where: str = "identity") -> IdentityConfig:
    problems: list[str] = []
    cfg = IdentityConfig()

    def table(key: str) -> dict[str, Any]:
        v = raw.get(key, {})
        if not isinstance(v, dict):
            problems.append(f"{key}: expected a table")
            return {}
        return v

    def known(section: str, d: dict[str, Any], keys: set[str]) -> None:
        for k in d:
            if k not in keys:
                problems.append(f"{section}.{k}: unknown key (known: {', '.join(sorted(keys))})")

    known("", raw, {"identifiers", "namespaces", "links", "demographic"})
    ident = table("identifiers")
    known("identifiers", ident, {"link_types", "ignore_systems", "link_without_system"})
    for key in ("link_types", "ignore_systems"):
        v = ident.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            problems.append(f"identifiers.{key}: expected a list of strings")
        else:
            setattr(cfg, key, set(v))
    lws = ident.get("link_without_system", False)
    if not isinstance(lws, bool):
        problems.append("identifiers.link_without_system: expected true or false")
    else:
        cfg.link_without_system = lws
    spaces = raw.get("namespaces", [])
    if not isinstance(spaces, list):
        problems.append("namespaces: expected an array of tables ([[namespaces]])")
        spaces = []
    for i, ns in enumerate(spaces):
        systems = ns.get("systems") if isinstance(ns, dict) else None
        if not isinstance(systems, list) or not systems or not all(isinstance(x, str) for x in systems):
            problems.append(f"namespaces[{i}].systems: expected a non-empty list of strings")
            continue
        known(f"namespaces[{i}]", ns, {"systems"})
        for s in systems:
            if s in cfg.aliases and cfg.aliases[s] != systems[0]:
                problems.append(f"namespaces[{i}].systems: {s!r} is already in another namespace")
            cfg.aliases[s] = systems[0]
    links = table("links")
    known("links", links, {"types"})
    lt = links.get("types", ["replaced-by", "replaces"])
    if not isinstance(lt, list) or not all(x in ("replaced-by", "replaces", "refer", "seealso") for x in lt):
        problems.append("links.types: expected a list of replaced-by, replaces, refer, seealso")
    else:
        cfg.link_types_patient = set(lt)
    demo = table("demographic")
    known("demographic", demo, {"enabled", "threshold", "review_margin", "weights"})
    if not isinstance(demo.get("enabled", False), bool):
        problems.append("demographic.enabled: expected true or false")
    else:
        cfg.demographic = demo.get("enabled", False)
    for key in ("threshold", "review_margin"):
        v = demo.get(key, getattr(cfg, key))
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            problems.append(f"demographic.{key}: expected a number from 0 to 1")
        else:
            setattr(cfg, key, float(v))
    w = demo.get("weights", cfg.weights)
    if not isinstance(w, dict) or any(k not in _WEIGHTS or not isinstance(v, (int, float)) for k, v in w.items()):
        problems.append(f"demographic.weights: expected numbers for {', '.join(_WEIGHTS)}")
    else:
        cfg.weights = {k: float(v) for k, v in w.items()}
    if problems:
        raise ConfigError(f"{where}: the identity configuration has problems", problems)
    return cfg


# --------------------------------------------------------------------------- linking


class _Groups:
    """Union-find over record keys; the root of a group is its smallest key."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, k: str) -> None:
        self.parent.setdefault(k, k)

    def find(self, k: str) -> str:
        root = k
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[k] != root:
            self.parent[k], k = root, self.parent[k]
        return root

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return True


def normalise_name(text: str | None) -> str | None:
    if not text:
        return None
    s = unicodedata.normalize("NFKD", text)
    s = "".join(ch for ch in s if ch.isalpha() or ch == " ").lower().split()
    return " ".join(s) or None


@dataclass
class Linkage:
    """The result of linking: every record's group, the rules that joined it, and what to review."""

    groups: dict[str, list[str]]                  # root record key -> member record keys (sorted)
    rules: dict[str, set[str]]                    # record key -> rules that joined it to others
    conflicts: list[dict[str, Any]]               # for review: kind, records, namespace
    candidates: list[dict[str, Any]]              # demographic pairs near the threshold, not linked
    by_rule: dict[str, int]                       # links made, per rule


def link_records(patients: pa.Table, identifiers: pa.Table, links: pa.Table, cfg: IdentityConfig) -> Linkage:
    """Link patient records. Inputs are the patient, patient_identifier and patient_link tables."""
    g = _Groups()
    rules: dict[str, set[str]] = defaultdict(set)
    by_rule: dict[str, int] = defaultdict(int)
    records = [record_key(s, p) for s, p in zip(patients.column("source").to_pylist(),
                                                 patients.column("patient_id").to_pylist(), strict=True)]
    # birth dates as int64 microseconds: they are only compared with each other, and turning
    # a timezone-aware Arrow timestamp into a datetime costs 30,000 instructions a value
    birth: dict[str, Any] = {}
    for k, b in zip(records, patients.column("birth_date").cast(pa.int64()).to_pylist(), strict=True):
        g.add(k)
        birth[k] = b
    demo: dict[str, dict[str, Any]] = {}  # the fields demographic scoring compares, only when it is on
    if cfg.demographic:
        demo = dict(zip(records, patients.select(["name_family", "name_given", "birth_date", "sex", "postal_code"])
                        .to_pylist(), strict=True))

    # identifiers: records sharing (namespace, value) are one person
    by_ident: dict[tuple[str, str], list[str]] = defaultdict(list)
    mrns: dict[tuple[str, str], set[str]] = defaultdict(set)  # (record, namespace) -> MR values
    for s, p, system, value, typ in zip(*(identifiers.column(c).to_pylist() for c in (
            "source", "patient_id", "system", "value", "type_code")), strict=True):
        k = record_key(s, p)
        g.add(k)
        ns = cfg.namespace(system)
        if ns is None and not cfg.link_without_system:
            continue
        ns = ns or ""
        if ns in cfg.ignore_systems or (cfg.link_types and typ not in cfg.link_types):
            continue
        by_ident[(ns, value)].append(k)
        if typ == "MR":
            mrns[(k, ns)].add(value)
    # Most identifiers belong to one record: those join nothing and are passed over. The
    # union-find's roots do not depend on the order of the unions, so only the conflicts
    # found are put in (namespace, value) order, not every identifier (a sort of all of
    # them was a third of linking 20,000 patients).
    found: list[tuple[tuple[str, str], dict[str, Any]]] = []
    for nv, keys in by_ident.items():
        if len(keys) > 1:
            keys = sorted(set(keys))
        if len(keys) < 2:
            continue
        births = {birth[k] for k in keys if birth.get(k) is not None}
        if len(births) > 1:
            found.append((nv, {"kind": "identifier-on-different-birth-dates", "namespace": nv[0], "records": keys}))
        for other in keys[1:]:
            if g.union(keys[0], other):
                by_rule["identifier"] += 1
            rules[keys[0]].add("identifier")
            rules[other].add("identifier")

    # Patient.link and merges. A record replaced by another (an HL7 A40 merge, FHIR
    # replaced-by) is retired: its old number in the namespace is not a second MRN.
    retired: set[str] = set()
    for s, p, other, typ in zip(*(links.column(c).to_pylist() for c in (
            "source", "patient_id", "other_patient_id", "link_type")), strict=True):
        if typ not in cfg.link_types_patient:
            continue
        a, b = record_key(s, p), record_key(s, other)
        retired.add(a if typ == "replaced-by" else b if typ == "replaces" else "")
        g.add(a)
        g.add(b)
        if g.union(a, b):
            by_rule["patient-link"] += 1
        rules[a].add("patient-link")
        rules[b].add("patient-link")

    candidates: list[dict[str, Any]] = []
    if cfg.demographic:
        _demographic(g, demo, cfg, rules, by_rule, candidates)

    groups: dict[str, list[str]] = defaultdict(list)
    for k in g.parent:
        groups[g.find(k)].append(k)
    for root in groups:
        groups[root].sort()
    found.sort(key=lambda f: f[0])
    conflicts = [c for _, c in found]
    # one person with two medical record numbers in one namespace
    per_group: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (k, ns), values in mrns.items():
        if k not in retired:
            per_group[(g.find(k), ns)] |= values
    for (root, ns) in sorted(k for k, values in per_group.items() if len(values) > 1):
        conflicts.append({"kind": "two-mrns-in-one-namespace", "namespace": ns, "records": groups[root]})
    return Linkage(dict(groups), dict(rules), conflicts, candidates, dict(by_rule))


def _demographic(g: _Groups, demo: dict[str, dict[str, Any]], cfg: IdentityConfig, rules, by_rule, candidates) -> None:
    """Score pairs that share a birth date (the blocking key); link at the threshold."""
    blocks: dict[Any, list[str]] = defaultdict(list)
    for k, r in demo.items():
        if r["birth_date"] is not None:
            blocks[r["birth_date"]].append(k)
    for keys in blocks.values():
        keys.sort()
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if a.split("|", 1)[0] == b.split("|", 1)[0]:
                    continue  # within one source, records are distinct unless the source says otherwise
                score = demographic_score(demo[a], demo[b], cfg.weights)
                if score is None:
                    continue
                if score >= cfg.threshold:
                    if g.union(a, b):
                        by_rule["demographic"] += 1
                    rules[a].add("demographic")
                    rules[b].add("demographic")
                    candidates.append({"records": [a, b], "score": round(score, 3), "linked": True})
                elif score >= cfg.threshold - cfg.review_margin:
                    candidates.append({"records": [a, b], "score": round(score, 3), "linked": False})


def demographic_score(a: dict[str, Any], b: dict[str, Any], weights: dict[str, float]) -> float | None:
    """Weighted share of the fields both records have that agree (None if they share none)."""
    fields = {
        "family": (normalise_name(a["name_family"]), normalise_name(b["name_family"])),
        "given": ((normalise_name(a["name_given"]) or "").split(" ")[0] or None,
                  (normalise_name(b["name_given"]) or "").split(" ")[0] or None),
        "birth_date": (a["birth_date"], b["birth_date"]),
        "sex": (a["sex"], b["sex"]),
        "postal_code": ((a["postal_code"] or "")[:5] or None, (b["postal_code"] or "")[:5] or None),
    }
    total = agree = 0.0
    for name, (x, y) in fields.items():
        w = weights.get(name, 0.0)
        if x is None or y is None or not w:
            continue
        total += w
        if x == y:
            agree += w
    return agree / total if total else None


# --------------------------------------------------------------------------- applying


@dataclass
class RelinkResult:
    records: int            # records linked again (all of them when `full`)
    twins: int              # the groups they form
    changed_records: int    # records that moved to another twin
    by_rule: dict[str, int]
    conflicts: int          # conflicts among those records
    full: bool = True       # every record was linked again, not only the region a run touched
    rules_changed: bool = False  # ... because the store had been linked under other rules


# Bump when link_records changes what it computes for the same inputs: every store then
# links in full once, at its next writing run, instead of trusting its identity table.
LINKING_VERSION = 1

_PATIENT_COLUMNS = ["source", "patient_id", "name_family", "name_given", "birth_date", "sex", "postal_code"]
_IDENTIFIER_COLUMNS = ["source", "patient_id", "system", "value", "type_code"]
_LINK_COLUMNS = ["source", "patient_id", "other_patient_id", "link_type"]


def linking_fingerprint(cfg: IdentityConfig) -> str:
    """What the identity table was computed under: the rules (config) and their version.
    A store linked under another fingerprint is linked again in full."""
    doc = {k: sorted(v) if isinstance(v, set) else v for k, v in asdict(cfg).items()}
    text = json.dumps([LINKING_VERSION, doc], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def compute_linkage(store, cfg: IdentityConfig | None = None, *, latest: bool = True) -> Linkage:
    cfg = cfg or load_identity_config()
    patients = store.read("patient", _PATIENT_COLUMNS, latest=latest)
    idents = store.read("patient_identifier", _IDENTIFIER_COLUMNS, latest=latest)
    links = store.read("patient_link", _LINK_COLUMNS, latest=latest)
    return link_records(patients, idents, links, cfg)


def _keys(t: pa.Table, column: str = "patient_id") -> pa.Array:
    """record_key() of every row, in Arrow."""
    if t.num_rows == 0:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(_col(t, "source"), _col(t, column), "|Patient/")


def _col(t: pa.Table, name: str) -> pa.Array:
    return t.column(name).combine_chunks()


def _in(values: pa.Array, among: pa.Array) -> pa.Array:
    return pc.fill_null(pc.is_in(values, value_set=among), False)


def _region(patients: pa.Table, idents: pa.Table, links: pa.Table, old: pa.Table,
            keys: tuple[pa.Array, pa.Array, pa.Array, pa.Array], run_id: str, cfg: IdentityConfig) -> pa.Array:
    """The records whose group this run may have changed, as record keys: a union of whole
    groups of the new linkage, so that linking only them gives what linking everyone would.

    Seeds: records with a row this run wrote, records the identity table has and the
    tables no longer name (deleted), records the tables name and the identity table does
    not; both ends of a link this run wrote. Then, until nothing is added: the records of
    an old group of one already in (a group that may split), and every record a rule could
    join to one already in: the same identifier value in any namespace, the same birth date
    when demographic linking is on (a superset of what link_records joins). A Patient.link
    needs no such step: it joins the two records its row names, and a row this run did not
    write joined them before, into one old group.

    A record outside the region had no row written, and nothing joined or left its group:
    its group is what the identity table says. The work in Python is the size of the region;
    the scans over the whole store are Arrow's.
    """
    pk, ik, lk, ok = keys  # the record keys of the rows of each table
    lo, otwin = _keys(links, "other_patient_id"), _col(old, "twin_id")
    present = pc.unique(pa.concat_arrays([pk, ik, lk, lo]))
    wrote = pc.equal(_col(links, "run_id"), run_id)
    mine = [pk.filter(pc.equal(_col(patients, "run_id"), run_id)), ik.filter(pc.equal(_col(idents, "run_id"), run_id)),
            lk.filter(wrote), lo.filter(wrote)]
    seeds = mine + [ok.filter(pc.invert(_in(ok, present))), present.filter(pc.invert(_in(present, ok)))]
    region = pc.unique(pa.concat_arrays([s.cast(pa.string()) for s in seeds]))
    values, births = _col(idents, "value"), _col(patients, "birth_date")
    frontier = region
    while len(frontier):
        twins = pc.unique(otwin.filter(_in(ok, frontier)))
        found = [ok.filter(_in(otwin, twins)), ik.filter(_in(values, pc.unique(values.filter(_in(ik, frontier)))))]
        if cfg.demographic:
            dates = pc.drop_null(pc.unique(births.filter(_in(pk, frontier))))
            found.append(pk.filter(_in(births, dates)))
        found_keys = pc.unique(pa.concat_arrays([f.cast(pa.string()) for f in found]))
        frontier = found_keys.filter(pc.invert(_in(found_keys, region)))
        region = pa.concat_arrays([region, frontier])
    return region


def _links_of(identity: pa.Table) -> set[tuple]:
    """The identity rows as what linking decided (which run decided it left out); relink
    compares them with its own, which hold linked_by sorted already."""
    cols = [identity.column(c).to_pylist() for c in ("source", "patient_id", "twin_id", "linked_by", "group_size")]
    return {(s, p, t, tuple(sorted(by or ())), n) for s, p, t, by, n in zip(*cols, strict=True)}


def relink(store, run_id: str, cfg: IdentityConfig | None = None) -> RelinkResult:
    """Link the records this run may have moved, and rewrite the twin id of rows whose record
    changed group.

    Called at the end of every run that wrote or deleted patient data, inside its lock and
    before its commit, so a run never becomes visible with rows under a stale twin id.
    Only the region of the run (see _region) is linked again, so the cost of a small run
    does not grow with the store; the whole store is linked when there is no identity
    table yet or it was computed under other rules (linking_fingerprint).
    """
    cfg = cfg or load_identity_config()
    fingerprint = linking_fingerprint(cfg)
    patients = store.read("patient", _PATIENT_COLUMNS + ["run_id"], latest=True)
    idents = store.read("patient_identifier", _IDENTIFIER_COLUMNS + ["run_id"], latest=True)
    links = store.read("patient_link", _LINK_COLUMNS + ["run_id"], latest=True)
    old = store.read("identity", latest=True) if store.exists("identity") else None
    linked_under = store.manifest().get("linking")
    full = old is None or linked_under != fingerprint
    if not full:
        assert old is not None
        keys = (_keys(patients), _keys(idents), _keys(links), _keys(old))
        region = _region(patients, idents, links, old, keys, run_id, cfg)
        patients, idents, links, old, kept = (
            patients.filter(_in(keys[0], region)), idents.filter(_in(keys[1], region)),
            links.filter(_in(keys[2], region)), old.filter(_in(keys[3], region)),
            old.filter(pc.invert(_in(keys[3], region))))
    linkage = link_records(patients, idents, links, cfg)
    old_links = _links_of(old) if old is not None else set()
    before_of = {record_key(s, p): tw for s, p, tw, _, _ in old_links}
    changed = []
    cols: dict[str, list] = {c: [] for c in ("source", "patient_id", "twin_id", "linked_by", "group_size")}
    for root, members in linkage.groups.items():
        tid = twin_id_of_key(root)
        for k in members:
            source, _, pid = k.partition("|Patient/")
            before = before_of.get(k) or (tid if k == root else twin_id_of_key(k))
            if before != tid:
                changed.append(Move(source, pid, before, tid))
            cols["source"].append(source)
            cols["patient_id"].append(pid)
            cols["twin_id"].append(tid)
            cols["linked_by"].append(sorted(linkage.rules.get(k, ())))
            cols["group_size"].append(len(members))
    if changed:
        data = pa.table({"source": [c.source for c in changed], "patient_id": [c.patient_id for c in changed],
                         "twin_id": [c.new_twin for c in changed]})
        for name, table in store.schema.tables.items():
            if table.patient_column == "patient_id" and table.provenance:
                store.update_columns(name, ["source", "patient_id"], data, ["twin_id"])
        reshift(store, changed)  # dates shifted per person follow the record to its new twin
    schema = store.schema.table("identity").arrow_schema
    new = pa.table({**cols, "run_id": [run_id] * len(cols["source"])}, schema=schema)
    if not full:
        assert old is not None
        new_links = {(s, p, t, tuple(by), n) for s, p, t, by, n in zip(*cols.values(), strict=True)}
        if new_links != old_links:  # the region's rows replaced, the rest kept as they are
            store.replace("identity", pa.concat_tables([kept.select(schema.names).cast(schema), new]))
        # else nothing moved (a drain of updates to known patients, mostly): no new version of the table
    elif new.num_rows or old is not None:
        store.replace("identity", new)
    store.note_linking(fingerprint)
    return RelinkResult(new.num_rows, len(linkage.groups), len(changed), linkage.by_rule, len(linkage.conflicts),
                        full, old is not None and linked_under is not None and linked_under != fingerprint)


def link_report(store, cfg: IdentityConfig | None = None) -> str:
    """Persons, links by rule, and conflicts for review (record keys only, never identifier values)."""
    linkage = compute_linkage(store, cfg, latest=False)
    n_records = sum(len(m) for m in linkage.groups.values())
    multi = [m for m in linkage.groups.values() if len(m) > 1]
    lines = [f"{len(linkage.groups):,} persons from {n_records:,} patient records; "
             f"{len(multi):,} persons have records in more than one place"]
    if linkage.by_rule:
        lines.append("links by rule: " + ", ".join(f"{k} {v:,}" for k, v in sorted(linkage.by_rule.items())))
    else:
        lines.append("links by rule: none")
    sources: dict[tuple[str, ...], int] = defaultdict(int)
    for m in multi:
        sources[tuple(sorted({k.split("|", 1)[0] for k in m}))] += 1
    for combo, n in sorted(sources.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:,} persons linked across {' + '.join(combo)}")
    if linkage.conflicts:
        lines.append(f"conflicts to review ({len(linkage.conflicts)}):")
        for c in linkage.conflicts:
            lines.append(f"  {c['kind']} (namespace {c['namespace'] or '(none)'}): {', '.join(c['records'])}")
    else:
        lines.append("conflicts to review: none")
    review = [c for c in linkage.candidates if not c["linked"]]
    linked = [c for c in linkage.candidates if c["linked"]]
    if linked:
        lines.append(f"demographic links made ({len(linked)}):")
        lines += [f"  score {c['score']}: {' = '.join(c['records'])}" for c in linked]
    if review:
        lines.append(f"demographic pairs below the threshold, for review ({len(review)}):")
        lines += [f"  score {c['score']}: {' ? '.join(c['records'])}" for c in review]
    return "\n".join(lines)
