"""Careful DICOM reading (pipeline.dicom) and the DICOM -> FHIR mapping (pipeline.dicom_fhir)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.dicom import (
    Directory,
    Instance,
    Wanted,
    _element_value,
    _raw_value,
    dataset_codec,
    json_record,
    read_file,
)
from pipeline.dicom_fhir import (
    CONVERTERS,
    DicomMapping,
    Tables,
    conv_datetime,
    conv_human_names,
    conv_patient_identifier,
    stable_id,
    valid_uid,
)
from pipeline.errors import ConfigError
from pipeline.resources import mappings_dir
from pipeline.units import Rejected, Resource

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "dicom"
PD = FIX / "pydicom"
GEN = FIX / "generated"


@pytest.fixture(scope="module")
def mapping() -> DicomMapping:
    return DicomMapping.load()


def read(path: Path, mapping: DicomMapping) -> Instance | Directory | Rejected:
    return read_file(path, mapping.wanted)


# --------------------------------------------------------------------------- reading files


def test_reads_metadata_of_part10_files(mapping):
    r = read(PD / "CT_small.dcm", mapping)
    assert isinstance(r, Instance)
    assert r.record["PatientID"] == "1CT1"
    assert r.record["Modality"] == "CT"
    assert r.record["SeriesNumber"] == 1 and isinstance(r.record["SeriesNumber"], int)
    assert r.record["TimezoneOffsetFromUTC"] == "-0500"
    assert "PixelData" not in r.record
    assert not any(k.startswith("GEMS") for k in r.record), "private tags are read only when a mapping names them"


def test_big_endian_reads_the_same_as_little_endian(mapping):
    little, big = read(PD / "MR_small.dcm", mapping), read(PD / "MR_small_bigendian.dcm", mapping)
    assert isinstance(little, Instance) and isinstance(big, Instance)
    assert big.transfer_syntax == "1.2.840.10008.1.2.2"
    assert big.record == little.record


@pytest.mark.parametrize("name", ["image_dfl.dcm", "JPEG2000.dcm"])
def test_deflated_and_compressed_files_are_read_without_pixels(mapping, name):
    r = read(PD / name, mapping)
    assert isinstance(r, Instance)
    assert valid_uid(r.record["SOPInstanceUID"])


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_dataset_without_preamble_or_meta_is_read(mapping, name):
    r = read(PD / name, mapping)
    assert isinstance(r, Instance)
    assert r.record["StudyInstanceUID"] == "1.2.333.4444.5.6.7.8.9"
    assert r.record["Modality"] == "RTPLAN"


@pytest.mark.parametrize("name, groups", [
    ("chrH31.dcm", {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}),
    ("chrX1.dcm", {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}),
    ("chrFrenMulti.dcm", {"Alphabetic": "Buc^Jérôme"}),
    ("chrRuss.dcm", {"Alphabetic": "Люкceмбypг"}),
])
def test_character_sets_decode(mapping, name, groups):
    r = read(PD / name, mapping)
    assert isinstance(r, Instance)
    assert r.record["PatientName"] == groups


def test_gb18030_decodes(mapping):
    raw = (GEN / "gb18030.dcm").read_bytes()
    assert "王".encode("gb18030") in raw and "王".encode() not in raw  # really GB18030 on disk
    r = read(GEN / "gb18030.dcm", mapping)
    assert r.record["PatientName"] == {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小东"}
    assert r.record["StudyDescription"] == "胸部 CT"


@pytest.mark.parametrize("name, problem", [
    ("MR_truncated.dcm", "pixel data"),
    ("rtplan_truncated.dcm", "last data element"),
])
def test_truncated_files_are_rejected(mapping, name, problem):
    r = read(PD / name, mapping)
    assert isinstance(r, Rejected) and r.reason == "truncated" and problem in r.message
    assert r.source_ref == str(PD / name) and r.payload_ref == str(PD / name)


def test_non_dicom_empty_and_missing_files(mapping, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    junk_after_preamble = tmp_path / "junk.dcm"
    junk_after_preamble.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    assert read(text, mapping).reason == "not-dicom"
    assert read(empty, mapping).reason == "empty-file"
    assert read(tmp_path / "missing.dcm", mapping).reason == "unreadable-file"
    assert isinstance(read(junk_after_preamble, mapping), Rejected)


def _element_ends(path: Path) -> set[int]:
    """Offsets where a top-level data element ends: the only places a cut leaves a whole dataset."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ends = {128 + 4 + 12 + ds.file_meta.FileMetaInformationGroupLength}
    for elem in ds.values():
        if getattr(elem, "length", 0xFFFFFFFF) != 0xFFFFFFFF:
            ends.add(elem.value_tell + elem.length)
    return ends


def test_a_file_cut_anywhere_is_never_taken_for_a_whole_one(mapping, tmp_path):
    source = PD / "MR_small.dcm"
    data = source.read_bytes()
    ends = _element_ends(source)
    cut = tmp_path / "cut.dcm"
    cuts = list(range(0, 1600, 3)) + random.Random(4).sample(range(1600, len(data) - 1), 60)
    for n in cuts:
        cut.write_bytes(data[:n])
        r = read(cut, mapping)
        if isinstance(r, Instance):
            assert n in ends, f"cut at {n} read as a whole dataset"
        else:
            assert isinstance(r, Rejected)
            if n > 1488:  # inside the pixel data
                assert r.reason == "truncated"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\0" * 128 + b"DICM", b"\x08\x00\x05\x00CS"]))
def test_hostile_bytes_never_crash(mapping, tmp_path, body, prefix):
    path = tmp_path / "hostile"
    path.write_bytes(prefix + body)
    r = read(path, mapping)
    assert isinstance(r, (Instance, Directory, Rejected))
    if isinstance(r, Rejected):
        assert r.reason and r.stage in ("read", "parse")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 9829), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_real_file_never_crashes(mapping, tmp_path, flips):
    data = bytearray((PD / "MR_small.dcm").read_bytes())
    for offset, value in flips:
        data[offset] = value
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(data))
    assert isinstance(read(path, mapping), (Instance, Directory, Rejected))


def test_dicomdir_lists_its_files(mapping):
    r = read(PD / "dicomdirtests" / "DICOMDIR", mapping)
    assert isinstance(r, Directory)
    assert len(r.references) == 31 and r.bad_references == 0
    assert all(Path(p).is_file() for p in r.references)


# --------------------------------------------------------------------------- records: files = DICOM JSON


def _fixture_files() -> list[Path]:
    return sorted(p for p in FIX.rglob("*") if p.is_file() and p.suffix in (".dcm", "") and p.name != "DICOMDIR")


@pytest.mark.parametrize("where", ["fixtures", pytest.param("shared", marks=pytest.mark.slow)])
def test_fast_path_equals_pydicom_conversion(mapping, where, request):
    """dataset_record decodes simple values itself; it must give what pydicom gives."""
    root = FIX if where == "fixtures" else request.getfixturevalue("shared_data") / "dicom"
    checked = Counter()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".md", ".py", ".txt")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        codec = dataset_codec(ds)
        for a in mapping.wanted.attrs:
            raw = ds.get_item(a.tag) if a.creator is None else None
            if raw is None or not isinstance(raw.value, bytes):
                continue
            if not (a.vr in ("UI", "CS", "DA", "TM", "IS", "DS") or (codec and a.vr in ("SH", "LO", "PN"))):
                continue
            fast = _raw_value(a.vr, raw.value, codec or "latin-1")
            elem = ds[a.tag]
            assert fast == _element_value(elem.VR, elem.value, a), (path.name, a.key)
            checked[a.vr] += 1
    assert checked["UI"] > 100 and checked["PN"] > 10 and checked["LO"] > 10, checked


def test_dicom_json_gives_the_same_record_as_the_file(mapping):
    """pydicom's own DICOM JSON writer (PS3.18 F) is an independent check of json_record."""
    for path in _fixture_files():
        r = read(path, mapping)
        if not isinstance(r, Instance):
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        as_json = json.loads(json.dumps(ds.to_json_dict(bulk_data_threshold=1 << 20)))
        assert json_record(as_json, mapping.wanted.attrs) == r.record, path.name


def test_json_record_ignores_what_is_not_dicom_json(mapping):
    hostile = {"00100010": {"vr": "PN", "Value": ["not a dict", {"Alphabetic": 7}]},
               "00200011": {"vr": "IS", "Value": ["x", True, None]},
               "0020000D": {"vr": "UI", "Value": [{"a": 1}]},
               "00080060": "CT", "00081032": {"vr": "SQ", "Value": [1, "a", {"00080100": {"vr": "SH"}}]}}
    assert json_record(hostile, mapping.wanted.attrs) == {}
    assert json_record(["not", "an", "object"], mapping.wanted.attrs) == {}


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["00100010", "00100020", "0020000D", "00200011", "00081032", "00100024"]),
                       st.fixed_dictionaries({"vr": st.sampled_from(["PN", "LO", "UI", "IS", "SQ", "XX"]),
                                              "Value": _json}), max_size=6))
def test_json_record_survives_any_json(mapping, obj):
    record = json_record(obj, mapping.wanted.attrs)
    assert isinstance(record, dict)
    mapping.admit(record, "x")  # and so does the mapping's check


def test_private_attribute_is_read_only_when_named(tmp_path):
    wanted = Wanted.of(["PatientID", "GEMS_IDEN_01:(0009,xx04)", "NOT_THERE:(0009,xx04)"])
    r = read_file(PD / "CT_small.dcm", wanted)
    assert r.record["GEMS_IDEN_01:(0009,xx04)"] == "HiSpeed CT/i"
    assert "NOT_THERE:(0009,xx04)" not in r.record
    ds = pydicom.dcmread(PD / "CT_small.dcm", stop_before_pixels=True)
    assert json_record(json.loads(json.dumps(ds.to_json_dict())), wanted.attrs) == r.record


@pytest.mark.parametrize("path", ["NoSuchKeyword", "PatientID/Nope", "CREATOR:(0008,xx10)"])
def test_bad_attribute_paths_are_refused(path):
    with pytest.raises(ValueError):
        Wanted.of([path])


# --------------------------------------------------------------------------- converters


T = Tables(coding_schemes={"SCT": "http://snomed.info/sct"}, gender={"M": "male", "F": "female", "O": "other"},
           issuers={"HOSP_A": "http://hospital-a.example.org/mrn"})


@pytest.mark.parametrize("values, tz, expected", [
    (["20190312", "101500", "-0500"], None, "2019-03-12T10:15:00-05:00"),
    (["20190312", "1015", "+0130"], None, "2019-03-12T10:15:00+01:30"),
    (["20190312", "10", "+0000"], None, "2019-03-12T10:00:00+00:00"),
    (["20190312", "101500.123", "+0000"], None, "2019-03-12T10:15:00.123+00:00"),
    (["20190312", "101500", None], None, "2019-03-12"),  # no offset known: the date only
    (["20190701", "101500", None], "Europe/Paris", "2019-07-01T10:15:00+02:00"),
    (["20190112", "101500", None], "Europe/Paris", "2019-01-12T10:15:00+01:00"),
    (["2019.03.12", "10:15:00", "-0500"], None, "2019-03-12T10:15:00-05:00"),  # ACR-NEMA forms
    (["20191345", "101500", "-0500"], None, None),
    (["20190312", "256100", "-0500"], None, "2019-03-12"),
    (["20190312", "101500", "+2500"], None, "2019-03-12"),
    ([None, "101500", "+0000"], None, None),
])
def test_datetime(values, tz, expected):
    from zoneinfo import ZoneInfo

    t = Tables(timezone=ZoneInfo(tz) if tz else None)
    assert conv_datetime(values, t, None) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=20), st.integers(), st.lists(st.text(max_size=8), max_size=3)),
                min_size=3, max_size=3))
def test_converters_take_any_text(values):
    for spec in CONVERTERS.values():
        spec.fn(values, T, "arg")  # never raises: a bad value gives nothing


def test_person_names():
    names = conv_human_names([{"Alphabetic": "Ullrich^Napoleon^Karl^Mr.^III", "Ideographic": "山田^太郎"}], T, None)
    assert names[0] == {"family": "Ullrich", "given": ["Napoleon", "Karl"], "prefix": ["Mr."], "suffix": ["III"]}
    assert names[1]["extension"][0]["valueCode"] == "IDE" and names[1]["family"] == "山田"
    assert conv_human_names([{"Alphabetic": "^^^^"}], T, None) is None


@pytest.mark.parametrize("values, system, assigner, type_code", [
    (["123", "HOSP_A", None], "http://hospital-a.example.org/mrn", "HOSP_A", None),
    (["123", "1.2.3.4", None], "urn:oid:1.2.3.4", "1.2.3.4", None),
    (["123", "urn:x:y", None], "urn:x:y", "urn:x:y", None),
    (["123", "LOCAL", None], None, "LOCAL", None),  # not a URI: kept as assigner, never invented
    (["123", None, None], None, None, None),
    (["123", "LOCAL", [{"UniversalEntityID": "2.16.840.1.113883.4.1", "UniversalEntityIDType": "ISO",
                         "IdentifierTypeCode": "SS"}]], "urn:oid:2.16.840.1.113883.4.1", "LOCAL", "SS"),
])
def test_patient_identifier_systems(values, system, assigner, type_code):
    ident = conv_patient_identifier(values, T, None)
    assert ident["value"] == "123"
    assert ident.get("system") == system
    assert ident.get("assigner", {}).get("display") == assigner
    assert (ident.get("type", {}).get("coding", [{}])[0].get("code")) == type_code


def test_every_converter_survives_any_value_shape():
    shapes = [None, "", "x", 7, -1, 2.5, ["a", "b"], [], {}, {"Alphabetic": "A^B"}, [{"CodeValue": "1"}], [1, {}]]
    for name, spec in CONVERTERS.items():
        for shape in shapes:
            spec.fn([shape, shape, shape], T, "arg")  # must not raise
        assert spec.doc, f"converter {name} is undocumented"


# --------------------------------------------------------------------------- mapping files


def test_mapping_errors_are_all_reported(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(mappings_dir() / "dicom", folder)
    (folder / "fhir-r4.toml").write_text("""
[ImagingStudy]
description = { from = "StudyDescriptio" }
"bad path!" = { from = "StudyDescription" }
started = { from = "StudyDate", as = "no-such-converter" }
number = { from = ["A", "B", "C", "D"], as = "date" }
[ImagingStudy.serie]
number = { from = "SeriesNumber" }
[Patinet]
name = { from = "PatientName" }
[Patient]
name = { from = "PatientName", frm = "x" }
""")
    with pytest.raises(ConfigError) as err:
        DicomMapping.load(folder / "fhir-r4.toml")
    text = str(err.value)
    for needle in ("StudyDescriptio", "bad path!", "no-such-converter", "takes 1 to 1", "frm", "ImagingStudy.serie", "Patinet"):
        assert needle in text


def test_a_mapping_can_name_private_attributes_and_a_linking_rule(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(mappings_dir() / "dicom", folder)
    text = (folder / "fhir-r4.toml").read_text()
    text = text.replace('patient_id_from = ""', 'patient_id_from = "StudyID"')
    text = text.replace('version = { from = "SoftwareVersions", as = "versions" }',
                        'version = { from = "SoftwareVersions", as = "versions" }\n'
                        '"deviceName[2]" = { from = "GEMS_IDEN_01:(0009,xx04)", as = "device-name", '
                        'arg = "user-friendly-name" }')
    (folder / "fhir-r4.toml").write_text(text)
    custom = DicomMapping.load(folder / "fhir-r4.toml")
    units = custom.map_study(_instances(custom, PD / "CT_small.dcm"))
    device = next(u.resource for u in units if u.resource["resourceType"] == "Device")
    assert device["deviceName"][-1] == {"name": "HiSpeed CT/i", "type": "user-friendly-name"}
    default_units = DicomMapping.load().map_study(_instances(DicomMapping.load(), PD / "CT_small.dcm"))
    assert "HiSpeed CT/i" not in json.dumps([u.resource for u in default_units])
    r = read(PD / "ExplVR_LitEndNoMeta.dcm", custom)
    assert custom.admit(r.record, "f") is None and r.record["PatientID"] == "1234"


@pytest.mark.parametrize("rule", ["patient_id_from=NotAKeyword", "patient_id=", "guess", "whatever=1"])
def test_bad_patient_rules_are_config_errors(rule):
    with pytest.raises(ConfigError):
        DicomMapping.load(patient_rule=rule)


def test_unknown_timezone_is_a_config_error():
    with pytest.raises(ConfigError):
        DicomMapping.load(timezone="Mars/Olympus")


# --------------------------------------------------------------------------- studies


def _instances(mapping: DicomMapping, *paths: Path) -> list[tuple[dict, str]]:
    out = []
    for p in paths:
        r = read(p, mapping)
        assert isinstance(r, Instance)
        assert mapping.admit(r.record, str(p)) is None
        out.append((r.record, str(p)))
    return out


def test_study_resources_are_the_same_in_any_order(mapping):
    folder = PD / "dicomdirtests" / "98892003"
    instances = _instances(mapping, *sorted(p for p in folder.rglob("*") if p.is_file()))
    by_study: dict[str, list] = {}
    for rec, ref in instances:
        by_study.setdefault(rec["StudyInstanceUID"], []).append((rec, ref))
    study = max(by_study.values(), key=len)
    first = [u.resource for u in mapping.map_study(study)]
    shuffled = study[:]
    random.Random(1).shuffle(shuffled)
    assert [u.resource for u in mapping.map_study(shuffled)] == first
    imaging = first[-1]
    assert imaging["id"] == stable_id("ImagingStudy", study[0][0]["StudyInstanceUID"])
    assert imaging["numberOfInstances"] == len(study)
    numbers = [s.get("number", -1) for s in imaging["series"]]
    assert numbers == sorted(numbers)


def test_instances_of_another_patient_in_a_study_are_rejected(mapping):
    (rec, ref), = _instances(mapping, PD / "MR_small.dcm")
    intruder = dict(rec, PatientID="SOMEONE-ELSE", SOPInstanceUID=rec["SOPInstanceUID"] + ".9")
    units = mapping.map_study([(rec, ref), (intruder, "intruder.dcm")])
    rejected = [u for u in units if isinstance(u, Rejected)]
    assert [(r.reason, r.source_ref) for r in rejected] == [("patient-mismatch", "intruder.dcm")]
    assert "SOMEONE-ELSE" not in rejected[0].message
    study = next(u.resource for u in units if isinstance(u, Resource) and u.resource["resourceType"] == "ImagingStudy")
    assert study["numberOfInstances"] == 1


def test_linked_patient_fixture_maps_everything(mapping):
    units = mapping.map_study(_instances(mapping, GEN / "linked-patient.dcm"))
    res = {u.resource["resourceType"]: u.resource for u in units}
    patient, device, study = res["Patient"], res["Device"], res["ImagingStudy"]
    assert patient["identifier"][0]["system"] == "http://hospital.smarthealthit.org"
    assert patient["identifier"][0]["value"] == "cbc83bf2-c38e-4617-bc1d-f99fc86a80f0"
    assert patient["birthDate"] == "1995-01-08" and patient["gender"] == "male"
    assert study["started"] == "2019-03-12T10:15:00-05:00"
    assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT",
                                  "display": "Computed Tomography"}]
    series = study["series"][0]
    assert series["bodySite"]["code"] == "816094009"
    assert series["performer"][0]["actor"]["reference"] == f"Device/{device['id']}"
    assert device["deviceName"] == [{"name": "Scanner 64", "type": "model-name"}, {"name": "CT-ROOM-2", "type": "other"}]


def test_non_acquisition_modalities_stay_out_of_the_study_list(mapping):
    units = mapping.map_study(_instances(mapping, PD / "liver_1frame.dcm"))
    study = next(u.resource for u in units if u.resource["resourceType"] == "ImagingStudy")
    assert study["series"][0]["modality"]["code"] == "SEG"
    assert "modality" not in study  # R4: the study lists acquisition modalities (CID 29) only


def test_enhanced_multiframe_takes_anatomy_from_shared_groups(mapping):
    units = mapping.map_study(_instances(mapping, GEN / "enhanced-mr.dcm"))
    series = next(u.resource for u in units if u.resource["resourceType"] == "ImagingStudy")["series"][0]
    assert series["bodySite"] == {"system": "http://snomed.info/sct", "code": "72696002", "display": "Knee"}
    assert series["laterality"]["code"] == "419161000"


def test_admit_reports_every_missing_attribute(mapping):
    problem = mapping.admit({"PatientID": "X", "StudyInstanceUID": "1.2", "SOPInstanceUID": "01.2"}, "f.dcm")
    assert problem.reason == "missing-required"
    for name in ("SeriesInstanceUID", "SOPInstanceUID", "series.modality", "instance.sopClass"):
        assert name in problem.message


def test_the_twin_tables_can_be_filled(mapping):
    """Every column of imaging_study, imaging_series, device and patient that DICOM can
    fill is filled from the linked-patient fixture; the others are listed in docs/dicom.md."""
    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "twin-v1.json").read_text())
    units = mapping.map_study(_instances(mapping, GEN / "linked-patient.dcm"))
    res = {u.resource["resourceType"]: u.resource for u in units}
    study, patient, device = res["ImagingStudy"], res["Patient"], res["Device"]
    series = study["series"][0]
    ident = patient["identifier"][0]
    filled = {
        "imaging_study": {
            "study_id": study["id"], "study_instance_uid": study["identifier"][0]["value"],
            "patient_id": study["subject"]["reference"], "status": study["status"], "started": study["started"],
            "modalities": study["modality"][0]["code"], "number_of_series": study["numberOfSeries"],
            "number_of_instances": study["numberOfInstances"], "description": study["description"],
            "accession_number": study["identifier"][1]["value"], "referrer_display": study["referrer"]["display"],
            "procedure_system": study["procedureCode"][0]["coding"][0]["system"],
            "procedure_code": study["procedureCode"][0]["coding"][0]["code"],
            "procedure_display": study["procedureCode"][0]["coding"][0]["display"],
        },
        "imaging_series": {
            "study_id": study["id"], "patient_id": study["subject"]["reference"],
            "series_instance_uid": series["uid"], "series_number": series["number"],
            "modality": series["modality"]["code"], "description": series["description"],
            "body_site_code": series["bodySite"]["code"], "body_site_display": series["bodySite"]["display"],
            "number_of_instances": series["numberOfInstances"], "started": series["started"],
            "device_id": series["performer"][0]["actor"]["reference"],
        },
        "device": {
            "device_id": device["id"], "manufacturer": device["manufacturer"],
            "model": device["deviceName"][0]["name"], "serial_number": device["serialNumber"],
            "station_name": device["deviceName"][1]["name"], "software_version": device["version"][0]["value"],
        },
        "patient": {
            "patient_id": patient["id"], "name_family": patient["name"][0]["family"],
            "name_given": patient["name"][0]["given"][0], "birth_date": patient["birthDate"], "sex": patient["gender"],
        },
        "patient_identifier": {
            "patient_id": patient["id"], "system": ident["system"], "value": ident["value"],
            "type_code": ident["type"]["coding"][0]["code"], "assigner": ident["assigner"]["display"],
        },
    }
    not_from_dicom = {
        "imaging_study": {"encounter_id", "referrer_id", "location_id", "started_precision", "started_offset"},
        "imaging_series": {"laterality", "started_precision", "started_offset"},  # laterality: enhanced-mr test
        "device": {"patient_id", "kind", "type_system", "type_code", "type_display", "udi", "status"},
        "patient": None, "patient_identifier": {"use"},
    }
    for table, values in filled.items():
        columns = {c["name"] for c in schema["tables"][table]["columns"]}
        assert set(values) <= columns, f"{table}: {set(values) - columns} not in the schema"
        assert all(v not in (None, "") for v in values.values())
        if not_from_dicom[table] is not None:
            assert columns - set(values) == not_from_dicom[table], table


def test_ids_are_stable():
    assert stable_id("ImagingStudy", "1.2.3") == stable_id("ImagingStudy", "1.2.3")
    assert stable_id("ImagingStudy", "1.2.3") != stable_id("ImagingStudy", "1.2.4")
    assert len(stable_id("x")) == 32
