"""The DICOM file connector: walk, DICOMDIR, grouping, duplicates, linking rules, counts."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class

from pipeline.connectors.dicom_files import read_dicom, walk
from pipeline.errors import ConfigError
from pipeline.units import Rejected, Resource

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "dicom"
PD = FIX / "pydicom"

EXPECTED_REJECTS = {  # fixtures/dicom: reason -> files
    "truncated": {"MR_truncated.dcm", "rtplan_truncated.dcm"},
    "no-patient-id": {"image_dfl.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"},
    "not-dicom": {"README.md", "make_fixtures.py"},
}


def run(paths, **kw):
    reader = read_dicom([str(p) for p in paths], **kw)
    units = list(reader)
    assert reader.counts.reconciles(), reader.counts
    assert reader.counts.rejected == sum(isinstance(u, Rejected) for u in units)
    assert reader.counts.resources == sum(isinstance(u, Resource) for u in units)
    return reader, units


def resources(units) -> dict[tuple[str, str], dict]:
    return {(u.resource["resourceType"], u.resource["id"]): u.resource for u in units if isinstance(u, Resource)}


def validate(units) -> None:
    for u in units:
        if isinstance(u, Resource):
            get_fhir_model_class(u.resource["resourceType"]).model_validate(u.resource)


def test_fixtures_folder(tmp_path):
    reader, units = run([FIX])
    c = reader.counts
    rejected = {}
    for u in units:
        if isinstance(u, Rejected):
            rejected.setdefault(u.reason, set()).add(Path(u.source_ref).name)
    assert rejected == EXPECTED_REJECTS
    assert c.dicomdirs == 1
    assert c.duplicates == 1  # MR_small_bigendian.dcm holds MR_small.dcm's instance
    assert c.instances == 31 + 8 + 3  # the DICOMDIR set, the other copied files, the generated ones
    assert c.read == c.instances + c.duplicates + c.dicomdirs + c.rejected
    validate(units)
    kinds = Counter(u.resource["resourceType"] for u in units if isinstance(u, Resource))
    assert kinds["ImagingStudy"] == c.studies


def test_same_files_same_resources_in_any_order():
    files = list(walk([FIX]))
    _, a = run(files)
    _, b = run(list(reversed(files)))
    assert resources(a) == resources(b)


def test_dicomdir_alone_brings_the_files_it_lists():
    reader, units = run([PD / "dicomdirtests" / "DICOMDIR"])
    assert reader.counts.dicomdirs == 1 and reader.counts.read == 32 and reader.counts.instances == 31
    assert reader.counts.studies == 6
    _, walked = run([PD / "dicomdirtests"])
    assert resources(units) == resources(walked)


def test_dicomdir_naming_missing_and_unsafe_files(tmp_path):
    folder = tmp_path / "media"
    shutil.copytree(PD / "dicomdirtests", folder)
    (folder / "77654033" / "CR1" / "6154").unlink()
    ds = pydicom.dcmread(folder / "DICOMDIR")
    with_file = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    with pytest.warns(UserWarning):  # pydicom too says it is not a valid CS value
        with_file[-1].ReferencedFileID = ["..", "etc", "passwd"]
    ds.save_as(folder / "DICOMDIR")
    reader, units = run([folder / "DICOMDIR"])
    reasons = Counter(u.reason for u in units if isinstance(u, Rejected))
    assert reasons == {"dicomdir-missing-file": 1, "dicomdir-bad-reference": 1}
    assert reader.counts.instances == 29


def test_duplicate_instance_with_other_metadata_is_rejected(tmp_path):
    ds = pydicom.dcmread(PD / "MR_small.dcm")
    ds.StudyDescription = "changed"
    ds.save_as(tmp_path / "z_copy.dcm")
    shutil.copy(PD / "MR_small.dcm", tmp_path / "a_original.dcm")
    reader, units = run([tmp_path])
    rejected = [u for u in units if isinstance(u, Rejected)]
    assert [(u.reason, Path(u.source_ref).name) for u in rejected] == [("duplicate-sop-instance", "z_copy.dcm")]
    assert "a_original.dcm" in rejected[0].message and "changed" not in rejected[0].message
    assert reader.counts.instances == 1


def test_no_patient_id_is_rejected_unless_a_rule_links_it():
    files = [PD / "ExplVR_LitEndNoMeta.dcm", PD / "image_dfl.dcm"]
    reader, units = run(files)
    assert {u.reason for u in units if isinstance(u, Rejected)} == {"no-patient-id"}
    assert reader.counts.instances == 0

    reader, units = run(files, patient_rule="patient_id=ANON-7")
    patients = [r for (t, _), r in resources(units).items() if t == "Patient"]
    assert reader.counts.instances == 2 and reader.counts.rejected == 0
    assert {p["identifier"][0]["value"] for p in patients} == {"ANON-7"}

    reader, units = run(files, patient_rule="patient_id_from=StudyID")  # image_dfl.dcm's Study ID is empty
    assert reader.counts.instances == 1
    assert [(Path(u.source_ref).name, u.reason) for u in units if isinstance(u, Rejected)] == [
        ("image_dfl.dcm", "no-patient-id")]
    values = {r["identifier"][0]["value"] for (t, _), r in resources(units).items() if t == "Patient"}
    assert values == {"1234"}


def test_bad_rule_fails_before_reading():
    with pytest.raises(ConfigError):
        read_dicom([str(FIX)], patient_rule="patient_id_from=Nonsense")


def test_bad_rule_or_zone_is_a_usage_error_even_when_the_files_are_unchanged(tmp_path):
    from pipeline.cli import main as twin

    store, f = str(tmp_path / "store"), str(PD / "ExplVR_LitEndNoMeta.dcm")
    assert twin(["import", "dicom", f, "--store", store]) == 3  # no Patient ID: quarantined
    for option in (["--patient-rule", "patient_id_form=OtherPatientIDs"], ["--timezone", "Mars/Olympus"]):
        assert twin(["import", "dicom", f, "--store", store, *option]) == 2, option  # not "nothing new"


def test_hostile_folder(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("no\n")
    (tmp_path / "zeros.dcm").write_bytes(b"\0" * 5000)
    (tmp_path / "header-only.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "random.dcm").write_bytes(os.urandom(3000))
    (tmp_path / ".hidden.dcm").write_bytes(b"ignored")
    (tmp_path / "loop").symlink_to(tmp_path)  # os.walk does not follow it
    shutil.copy(PD / "MR_small.dcm", tmp_path / "valid.dcm")
    reader, units = run([tmp_path, tmp_path / "missing.dcm"])
    reasons = Counter(u.reason for u in units if isinstance(u, Rejected))
    assert reasons["unreadable-file"] == 1 and reasons["empty-file"] == 1 and reasons["no-dataset"] == 1
    assert reasons["not-dicom"] >= 2
    assert reader.counts.read == 7  # the hidden file is not read, the symlinked folder not followed
    assert reader.counts.instances == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, while collecting the values to look for
def test_rejections_never_quote_patient_data():
    _, units = run([FIX])
    secrets = set()
    for p in walk([FIX]):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for kw in ("PatientID", "PatientName", "PatientBirthDate", "StudyDescription"):
            value = str(ds.get(kw) or "")
            if len(value) > 3:
                secrets.add(value)
    for u in units:
        if isinstance(u, Rejected):
            assert not any(s in u.message for s in secrets), u.message


def test_walk_is_sorted_streams_and_skips_hidden(tmp_path):
    for name in ("b", "a", ".h"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f2").write_bytes(b"")
        (tmp_path / name / "f1").write_bytes(b"")
    (tmp_path / "a" / ".x").write_bytes(b"")
    found = [Path(p).relative_to(tmp_path).as_posix() for p in walk([tmp_path])]
    assert found == ["a/f1", "a/f2", "b/f1", "b/f2"]


@pytest.mark.slow
def test_all_pydicom_sample_files(shared_data):
    reader, units = run([shared_data / "dicom"])
    c = reader.counts
    assert (c.read, c.dicomdirs, c.duplicates) == (79, 1, 8)
    assert c.instances == 49 and c.studies == 21
    reasons = Counter(u.reason for u in units if isinstance(u, Rejected))
    assert reasons == {"no-patient-id": 8, "missing-required": 7, "not-dicom": 4, "truncated": 2}
    validate(units)
