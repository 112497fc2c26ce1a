"""HL7 v2 files in: folders walked, every unit mapped or rejected with where it came from, counts reconcile."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.connectors.hl7v2_files import ReadStats, read_hl7v2
from pipeline.hl7v2 import Limits
from pipeline.units import Rejected, Resource

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7v2"


def read_all(paths, **kw):
    stats = ReadStats()
    units = list(read_hl7v2([str(p) for p in paths], stats=stats, **kw))
    return units, stats


def test_fixture_folder_reconciles():
    units, stats = read_all([FIX])
    rejected = [u for u in units if isinstance(u, Rejected)]
    resources = [u for u in units if isinstance(u, Resource)]
    assert stats.reconciles()
    assert stats.rejected == len(rejected) and stats.resources == len(resources)
    assert stats.files == len([p for p in FIX.rglob("*") if p.is_file() and p.suffix in (".hl7", ".mllp")])
    assert stats.skipped_files == 2          # README.md and make_fixtures.py are not HL7
    assert sum(stats.by_reason.values()) == stats.rejected
    for r in rejected:
        assert r.reason and r.stage in ("read", "parse", "map")
        assert (r.payload is not None) or (r.payload_ref is not None)


def test_source_refs_say_file_message_and_line():
    units, _ = read_all([FIX / "syntax-batch.hl7"])
    refs = [u.source_ref for u in units]
    path = FIX / "syntax-batch.hl7"
    assert refs[0] == f"{path}:msg 1 (line 3) [TWIN-LAB-0001] PID"
    assert refs[1] == f"{path}:msg 1 (line 3) [TWIN-LAB-0001] PV1"   # the stay the results belong to
    assert refs[2] == f"{path}:msg 1 (line 3) [TWIN-LAB-0001] OBX"
    second_msh = [n for n, line in enumerate(path.read_bytes().split(b"\r"), 1) if line.startswith(b"MSH|")][1]
    assert refs[-1] == f"{path}:msg 2 (line {second_msh}) [TWIN-ADT-0001] PV1"
    assert all(u.raw is not None and u.raw.startswith(b"MSH|") for u in units)


def test_mllp_dump_units():
    data = (FIX / "syntax-mllp-dump.mllp").read_bytes()
    units, stats = read_all([FIX / "syntax-mllp-dump.mllp"])
    rejected = [u for u in units if isinstance(u, Rejected)]
    junk_at, cut_at = data.index(b"garbage"), data.rindex(b"\x0b")
    assert [(r.reason, r.source_ref.rsplit(":", 1)[1]) for r in rejected] == [
        ("junk-between-frames", f"byte {junk_at}"), ("truncated-frame", f"msg 3 (byte {cut_at})")]
    assert rejected[0].payload == b"garbage between frames\r\n"
    assert stats.messages == 3 and stats.mapped == 2 and stats.units == 4 and stats.reconciles()


def test_python_hl7_bad_files():
    units, stats = read_all(sorted((FIX / "python-hl7").glob("sample_bad*")))
    assert stats.reconciles()
    assert stats.mapped == 0
    assert stats.by_reason == {"no-msh": 6, "batch-count-mismatch": 7, "batch-structure": 4, "missing-segment": 3}


def test_unreadable_and_too_large_files(tmp_path):
    big = tmp_path / "big.hl7"
    shutil.copy(FIX / "twin-oru-r01.hl7", big)
    units, stats = read_all([tmp_path / "missing.hl7", big], limits=Limits(max_file_bytes=100))
    assert [(u.reason, u.stage) for u in units] == [("unreadable-file", "read"), ("file-too-large", "read")]
    assert units[1].payload is None and units[1].payload_ref == f"{big}:bytes 0-{big.stat().st_size}"
    assert stats.units == 2 and stats.rejected == 2 and stats.reconciles()


def test_large_rejected_message_keeps_a_pointer_not_the_bytes(tmp_path):
    f = tmp_path / "x.hl7"
    f.write_bytes((FIX / "twin-oru-r01.hl7").read_bytes().replace(b"|2.5.1|", b"|2.1|"))
    (unit,), _ = read_all([f], limits=Limits(max_payload_bytes=100))
    assert unit.reason == "unsupported-version" and unit.payload is None
    assert unit.payload_ref == f"{f}:bytes 0-{f.stat().st_size - 1}"


def test_strict_mode_is_passed_through():
    _, lenient = read_all([FIX / "python-hl7" / "sample_hl7.hl7"])
    _, strict = read_all([FIX / "python-hl7" / "sample_hl7.hl7"], strict=True)
    assert (lenient.mapped, strict.mapped) == (1, 0)
    assert strict.by_reason == {"bad-value": 1}


def test_hidden_files_and_other_suffixes_are_skipped(tmp_path):
    (tmp_path / ".hidden").mkdir()
    shutil.copy(FIX / "twin-adt-a01.hl7", tmp_path / ".hidden" / "a.hl7")
    shutil.copy(FIX / "twin-adt-a01.hl7", tmp_path / "notes.md")
    shutil.copy(FIX / "twin-adt-a01.hl7", tmp_path / "ADT_A01")      # no suffix: read
    units, stats = read_all([tmp_path])
    assert stats.files == 1 and stats.skipped_files == 1 and len(units) == 2


def test_a_drop_file_rewritten_with_another_bad_message_is_quarantined_again(tmp_path):
    """HL7 drop folders reuse file names: the second bad message under the same name (and
    the same `msg 1 (line 1)` locator) is a new quarantine entry, not lost behind the first."""
    import os

    from pipeline.imports import run_import
    from pipeline.store import Store

    store = Store(tmp_path / "store")
    drop = tmp_path / "out.hl7"
    base = (FIX / "twin-adt-a01.hl7").read_bytes().replace(b"ADT^A01^ADT_A01", b"ADT^A24^ADT_A24")
    drop.write_bytes(base)
    run_import(store, "hl7v2", [drop])
    drop.write_bytes(base.replace(b"TWIN-ADT-0001", b"TWIN-ADT-0777"))
    os.utime(drop, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    run_import(store, "hl7v2", [drop])
    entries = store.read("quarantine").to_pylist()
    assert sorted(e["payload"].split(b"|")[9] for e in entries) == [b"TWIN-ADT-0001", b"TWIN-ADT-0777"]
    run_import(store, "hl7v2", [drop], reprocess=True)  # the same bad message again: still one entry for it
    assert store.count("quarantine") == 2
