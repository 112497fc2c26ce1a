"""Names from input never lead outside their folder (issue 10, "path traversal ... refused").

Every place where a name read from input becomes a file path is tested with `..`,
absolute paths, NUL bytes and symbolic links that point elsewhere: folder walks,
DICOMDIR Referenced File IDs, the local names of Bulk Data manifest files, source names
that name spool and download folders, the export's file names, and the paths of a job
file. The audit, with the places that take no name from input (quarantine payload_ref,
archives), is in docs/privacy-logs.md.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import orjson
import pydicom
import pytest

from pipeline.cli import main as twin
from pipeline.connectors import FILE_CONNECTORS
from pipeline.connectors.csv_files import read_csv_logs
from pipeline.connectors.dicom_files import read_dicom
from pipeline.connectors.dicom_files import walk as dicom_walk
from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir
from pipeline.connectors.hl7v2_files import ReadStats
from pipeline.connectors.hl7v2_files import walk as hl7_walk
from pipeline.errors import ConfigError
from pipeline.listen import Spool
from pipeline.paths import UnsafePath, contained, inside, safe_name
from pipeline.units import Rejected, Resource
from tests.conftest import FIXTURES

PD = FIXTURES / "dicom" / "pydicom"


# --------------------------------------------------------------------------- folder walks

SAMPLES = {"fhir": FIXTURES / "fhir" / "bundles" / "patient-1.json", "hl7v2": FIXTURES / "hl7v2" / "twin-adt-a01.hl7",
           "csv": FIXTURES / "devices" / "linked" / "vitals.csv"}


@pytest.fixture
def tree(tmp_path):
    """root/ holds a link to a file outside it and a link to a file inside it."""
    root, outside = tmp_path / "export", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    for sample in SAMPLES.values():
        shutil.copy(sample, outside / sample.name)
        (root / f"out-{sample.name}").symlink_to(outside / sample.name)
        shutil.copy(sample, root / sample.name)
        (root / "sub").mkdir(exist_ok=True)
        (root / "sub" / f"in-{sample.name}").symlink_to(root / sample.name)
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    return root


@pytest.mark.parametrize("kind", ["fhir", "hl7v2", "csv", "dicom"])
def test_walking_a_folder_never_leaves_it(tree, kind, caplog):
    found = [p.name for p in FILE_CONNECTORS[kind].files([tree])]
    assert not any(n.startswith("out-") for n in found)
    assert "linked-dir" not in " ".join(str(p) for p in FILE_CONNECTORS[kind].files([tree]))
    if kind != "dicom":
        assert SAMPLES[kind].name in found and f"in-{SAMPLES[kind].name}" in found
        assert "a symbolic link to a file outside" in caplog.text


def test_the_library_walkers_agree(tree, tmp_path):
    assert not any(p.name.startswith("out-") for p in hl7_walk([tree], ReadStats()))
    assert not any(p.startswith(str(tree / "out-")) for p in dicom_walk([tree]))
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SAMPLES["csv"], logs / "a.csv")
    (logs / "b.csv").symlink_to(tree.parent / "elsewhere" / SAMPLES["csv"].name)
    refs = {u.source_ref.split(":")[0] for u in read_csv_logs([str(logs)], format="twinline-vitals")}
    assert refs == {str(logs / "a.csv")}


def test_a_file_named_directly_is_read_even_through_a_link(tree):
    link = tree / f"out-{SAMPLES['fhir'].name}"
    assert list(FILE_CONNECTORS["fhir"].files([link])) == [link]


# --------------------------------------------------------------------------- the helper


@pytest.mark.parametrize(("parts", "reason"), [
    (("..",), "parent-reference"), ((".",), "parent-reference"), (("a", ".."), "parent-reference"),
    (("../etc/passwd",), "path-separator"), (("a/b",), "path-separator"), (("a\\b",), "path-separator"),
    (("/etc/passwd",), "absolute-path"), (("a\x00b",), "nul-byte"), (("",), "empty-name"), ((), "empty-name"),
])
def test_names_that_would_leave_the_folder_are_refused(tmp_path, parts, reason):
    with pytest.raises(UnsafePath) as e:
        contained(tmp_path, *parts)
    assert e.value.reason == reason


def test_a_symbolic_link_may_point_inside_its_folder_but_not_out(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    (tmp_path / "secret").write_text("y")
    os.symlink(root / "sub", root / "inside")
    os.symlink(tmp_path / "secret", root / "outside")
    os.symlink(tmp_path, root / "up")
    assert contained(root, "inside", "f") == str(root / "inside" / "f")
    assert contained(root, "not-yet-there") == str(root / "not-yet-there")
    assert contained(root, "up", "root", "sub") == str(root / "up" / "root" / "sub")  # out and back in: inside
    for parts in (("outside",), ("up", "secret")):
        with pytest.raises(UnsafePath, match="symbolic link") as e:
            contained(root, *parts)
        assert e.value.reason == "outside-root"
    assert inside(root, root / "inside" / "f") and not inside(root, root / "outside")


@pytest.mark.parametrize(("name", "safe"), [
    ("hl7v2", "hl7v2"), ("..", "_.."), (".", "_."), (".hidden", "_.hidden"), ("../../etc", "_.._.._etc"),
    ("a/b", "a_b"), ("a\x00b", "a_b"), ("", "source"), ("adt-lab_feed.1", "adt-lab_feed.1"),
])
def test_a_source_name_becomes_one_harmless_folder_name(name, safe):
    assert safe_name(name) == safe


# --------------------------------------------------------------------------- DICOMDIR


def _dicomdir_pointing_at(folder: Path, file_id) -> None:
    ds = pydicom.dcmread(folder / "DICOMDIR")
    with_file = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    with warnings.catch_warnings():  # pydicom too says most of these are not valid CS values
        warnings.simplefilter("ignore")
        with_file[-1].ReferencedFileID = file_id
    ds.save_as(folder / "DICOMDIR")


@pytest.mark.parametrize("file_id", [["..", "outside.dcm"], "/etc/passwd", ["77654033", "..", "..", "outside.dcm"],
                                     "OUTSIDE\\..\\..\\outside.dcm", "ESCAPE"])
def test_a_dicomdir_naming_a_file_outside_its_folder_is_not_followed(tmp_path, file_id):
    folder = tmp_path / "media"
    shutil.copytree(PD / "dicomdirtests", folder)
    shutil.copy(PD / "CT_small.dcm", tmp_path / "outside.dcm")   # a readable instance, outside the media
    os.symlink(tmp_path / "outside.dcm", folder / "ESCAPE")      # a link on the media that leads out
    _dicomdir_pointing_at(folder, file_id)
    reader = read_dicom([str(folder / "DICOMDIR")])
    units = list(reader)
    assert reader.counts.reconciles()
    bad = [u for u in units if isinstance(u, Rejected) and u.reason == "dicomdir-bad-reference"]
    assert len(bad) == 1 and "outside its folder" in bad[0].message
    assert not any("outside.dcm" in u.source_ref or "ESCAPE" in u.source_ref for u in units)
    ct = pydicom.dcmread(PD / "CT_small.dcm", stop_before_pixels=True)
    assert not any(isinstance(u, Resource) and ct.SOPInstanceUID in orjson.dumps(u.resource).decode() for u in units)


# --------------------------------------------------------------------------- Bulk Data manifest


HOSTILE_TYPES = ["../../../../outside", "/etc/passwd", "Patient/../../../outside", "Patient\x00.json", "..",
                 "Patient.000.ndjson/../../x", "C:\\Windows\\x", 42, None]


def test_bulk_manifest_types_never_name_a_local_file(tmp_path):
    from tests.fhir_server import FhirTestServer

    with FhirTestServer(FIXTURES / "fhir-server", stamp_meta=False) as server:
        original = server._status

        def hostile_manifest(jid, method):
            reply = original(jid, method)
            if reply.status == 200:
                doc = orjson.loads(reply.body)
                real = doc["output"][0]
                doc["output"] += [dict(real, type=t) for t in HOSTILE_TYPES]
                doc["deleted"] = [dict(real, type="../../deleted")]
                reply.body = orjson.dumps(doc)
            return reply

        server._status = hostile_manifest
        state = tmp_path / "state"
        fetch = fetch_fhir(FetchOptions(base_url=server.base_url, state_dir=state, bulk=True, types=["Patient"],
                                        sleep=lambda s: None))
        units = list(fetch.units())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"], "nothing may be written beside the state folder"
    names = [p.name for p in state.rglob("*") if p.is_file() and p.parent.name == "files"]
    assert names and all(re.fullmatch(r"(Patient|output|deleted)\.\d{3}\.ndjson(\.gz)?", n) for n in names), names
    assert all(inside(state, p) for p in state.rglob("*"))
    # each listed file was still read (the type only names the local copy): read = written + rejected
    assert sum(isinstance(u, Resource) for u in units) == 2 * (1 + len(HOSTILE_TYPES))


# --------------------------------------------------------------------------- spool and download folders


def test_source_names_cannot_move_the_spool_or_the_download_folder(tmp_path):
    from pipeline.imports import _safe as fetch_folder_name
    from pipeline.listen import _safe as spool_folder_name

    store_meta = tmp_path / "store" / "_twin"
    for name in ("..", "../../outside", ".", "/etc"):
        for make in (spool_folder_name, fetch_folder_name):
            folder = store_meta / "spool" / make(name)
            assert inside(store_meta / "spool", folder) and folder.parent == store_meta / "spool"
            assert folder.name not in (".", "..") and not folder.name.startswith(".")
    spool = Spool(store_meta / "spool" / spool_folder_name(".."))
    spool.append([(b"M", "ref", b"MSH|...")])
    spool.seal()
    assert [p.parent.name for p in (store_meta / "spool").rglob("*.ready")] == ["_.."]


# --------------------------------------------------------------------------- export


def test_export_does_not_write_through_a_planted_symbolic_link(tmp_path):
    store = tmp_path / "store"
    assert twin(["import", "fhir", str(FIXTURES / "fhir" / "bundles" / "patient-1.json"), "--store", str(store)]) == 0
    assert twin(["build", "--store", str(store), "--force"]) == 0
    out = tmp_path / "export"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.symlink(victim, out / ".index.ndjson.tmp")
    assert twin(["export", "--all", "--store", str(store), "--out", str(out)]) == int(ConfigError.exit_code)
    assert victim.read_text() == "untouched"


# --------------------------------------------------------------------------- job files


def test_a_job_path_with_a_nul_byte_is_a_config_error(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('[job]\nname = "x"\n[[source]]\nname = "a"\nkind = "fhir"\npaths = ["a\\u0000b"]\n')
    assert twin(["run", "--config", str(job), "--store", str(tmp_path / "s")]) == int(ConfigError.exit_code)
    assert "a path with a NUL byte" in capsys.readouterr().err


def test_quarantine_payload_refs_are_never_opened(tmp_path):
    """A payload_ref is a locator shown to the operator; retry replays the kept payload only."""
    from pipeline import quarantine

    source = Path(quarantine.__file__).read_text()
    assert "payload_ref" in source and "open(" not in source and "read_bytes" not in source



@pytest.mark.parametrize("kind", ["fhir", "hl7v2", "dicom", "csv"])
def test_a_pipe_named_as_input_is_refused_not_read(tmp_path, kind, capsys):
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)  # opening it for reading would block for ever
    assert twin(["import", kind, str(fifo), "--store", str(tmp_path / "s")]) == int(ConfigError.exit_code)
    assert "not a regular file" in capsys.readouterr().err
