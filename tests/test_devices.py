"""Device CSV logs: mapping files, format detection, each vendor format, the output contract.

Runs on fixtures/devices only (MIT devicely files and generated logs).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.connectors.csv_files import read_csv_logs
from pipeline.devices import (
    _FILE_KEYS,
    _SOURCE_KINDS,
    CLOCKS,
    LOCAL_CODES,
    LOINC,
    detect,
    load_format,
    load_formats,
    local_to_utc,
    output_schema,
    parse_window,
)
from pipeline.errors import ConfigError
from pipeline.schema import load_schema
from tests import test_devices_support as support
from tests.test_devices_support import DEVICELY, FIX, REPO, data_lines, run, shipped

custom_mappings = support.custom_mappings  # a fixture

SHIPPED = {"empatica-e4", "everion", "faros", "physionet-2012", "shimmer", "spacelabs-abpm", "twinline-vitals"}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --------------------------------------------------------------------------- mapping files


def loinc_check_digit_ok(code: str) -> bool:
    """LOINC's mod-10 check digit (LOINC Users' Guide, appendix: calculating the check digit)."""
    number, check = code.split("-")
    digits = number[::-1]
    odd = int(digits[0::2]) if digits[0::2] else 0
    total = sum(int(c) for c in str(odd * 2)) + sum(int(c) for c in digits[1::2])
    return (10 - total % 10) % 10 == int(check)


def test_shipped_mappings_load_and_use_valid_loinc_codes():
    formats = load_formats()
    assert set(formats) >= SHIPPED
    for fmt in formats.values():
        for kind in fmt.kinds:
            for s in kind.signals:
                assert s.code, (fmt.name, s.name)
                if s.system == LOINC:
                    assert re.fullmatch(r"\d{1,6}-\d", s.code) and loinc_check_digit_ok(s.code), (fmt.name, s.code)
                else:
                    assert s.system == LOCAL_CODES, (fmt.name, s.name, s.system)
                assert s.coded or s.unit, (fmt.name, s.name)


def test_loinc_check_digit_helper_is_right():
    assert loinc_check_digit_ok("8867-4") and loinc_check_digit_ok("8480-6") and loinc_check_digit_ok("59408-5")
    assert not loinc_check_digit_ok("8867-5")


def test_readme_documents_the_vocabulary_and_every_local_code():
    readme = (REPO / "mappings" / "devices" / "README.md").read_text()
    keys = set(_FILE_KEYS) | set(_SOURCE_KINDS) | set(CLOCKS) | {
        "name", "title", "spec", "ignore", "kind", "match", "skip", "signals", "column", "key", "code", "system",
        "display", "unit", "unit_display", "scale", "offset", "missing", "limits", "plausible", "part", "codes",
        "value_system", "constant", "fallback", "manufacturer", "model", "id", "field", "pattern", "format", "start",
        "rate", "date", "hour", "minute", "second", "precision", "part_separator", "ignore_keys", "value"}
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"README.md does not document: {missing}"
    local = {s.code for f in load_formats().values() for k in f.kinds for s in k.signals if s.system == LOCAL_CODES}
    assert not sorted(c for c in local if f"`{c}`" not in readme)
    assert "does not" in readme.lower()


def test_a_bad_mapping_reports_every_problem_with_its_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('''
name = "bad"
timezone = "Mars/Olympus"
colour = "red"
[[files]]
kind = "x"
match = "(["
time = { clock = "rate", start = { line = 1 } }
[files.signals.hr]
column = "hr"
code = "8867-4"
limits = [10, 1]
''')
    with pytest.raises(ConfigError) as e:
        load_format(bad)
    text = str(e.value)
    for expected in ("colour: unknown key", "files[0].timezone", "files[0].match", "files[0].time.rate",
                     "files[0].signals.hr.unit", "files[0].signals.hr.limits"):
        assert expected in text, text


def test_window_option_parses():
    assert parse_window("1min") == 60_000_000 and parse_window("30s") == 30_000_000 and parse_window("1h") == 3.6e9
    assert parse_window(None) is None and parse_window("raw") is None
    with pytest.raises(ConfigError):
        parse_window("1 fortnight")


# --------------------------------------------------------------------------- detection

EXPECTED_KINDS = {
    "empatica/ACC.csv": "empatica-e4/ACC", "empatica/BVP.csv": "empatica-e4/BVP", "empatica/EDA.csv": "empatica-e4/EDA",
    "empatica/HR.csv": "empatica-e4/HR", "empatica/IBI.csv": "empatica-e4/IBI", "empatica/TEMP.csv": "empatica-e4/TEMP",
    "empatica/tags.csv": "empatica-e4/tags", "faros/ACC.csv": "faros/ACC", "faros/HRV.csv": "faros/HRV",
    "faros/Marker.csv": "faros/Marker", "shimmer/read_test_data.csv": "shimmer/calibrated",
    "spacelabs/spacelabs.abp": "spacelabs-abpm/readings",
    "everion/CsvData_signals_EV-EC39-7079-57A8.csv": "everion/signals",
    "everion/CsvData_features_EV-EC39-7079-57A8.csv": "everion/features",
    "everion/CsvData_sensor_data_EV-EC39-7079-57A8.csv": "everion/sensor_data",
}


def head(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8", "replace").splitlines()[:8]


@pytest.mark.parametrize("rel", sorted(EXPECTED_KINDS))
def test_each_fixture_is_recognised_by_its_signature(rel):
    path = DEVICELY / rel
    kind = detect(path, head(path), load_formats(), None)
    assert not isinstance(kind, str), kind
    assert f"{kind.format}/{kind.kind}" == EXPECTED_KINDS[rel]


def test_generated_fixtures_are_recognised():
    for path, expected in ((FIX / "linked" / "vitals.csv", "twinline-vitals"), (FIX / "physionet" / "140001.txt",
                                                                                   "physionet-2012")):
        kind = detect(path, head(path), load_formats(), None)
        assert not isinstance(kind, str) and kind.format == expected


def test_an_unknown_file_is_a_usage_error_listing_the_formats(tmp_path):
    f = tmp_path / "mystery.csv"
    f.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ConfigError) as e:
        list(read_csv_logs([str(f)]))
    assert "mystery.csv" in str(e.value) and "twinline-vitals" in str(e.value) and "--format" in str(e.value)


def test_a_name_that_fits_but_lines_that_do_not_say_so(tmp_path):
    f = tmp_path / "HR.csv"
    f.write_text("heart rate\n72\n")
    msg = detect(f, head(f), load_formats(), None)
    assert isinstance(msg, str) and "empatica-e4/HR" in msg and "first lines" in msg


def test_two_matching_formats_are_ambiguous_and_listed(custom_mappings):
    d = custom_mappings({"copy.toml": shipped("twinline-vitals.toml").replace('name = "twinline-vitals"',
                                                                              'name = "vitals-copy"')},
                        keep_shipped=True)
    path = FIX / "linked" / "vitals.csv"
    msg = detect(path, head(path), load_formats(d), None)
    assert isinstance(msg, str) and "twinline-vitals/vitals" in msg and "vitals-copy/vitals" in msg
    with pytest.raises(ConfigError):
        list(read_csv_logs([str(path)]))
    assert run([path], format="vitals-copy").observations  # --format settles it


def test_find_logs_plans_a_folder_before_reading_and_accept_skips_sidecars():
    from pipeline.connectors.csv_files import accept, find_logs
    plan = dict(find_logs([DEVICELY / "faros", FIX / "linked"]))
    assert plan == {DEVICELY / "faros" / "ACC.csv": "faros/ACC", DEVICELY / "faros" / "HRV.csv": "faros/HRV",
                    DEVICELY / "faros" / "Marker.csv": "faros/Marker", FIX / "linked" / "vitals.csv": "twinline-vitals/vitals"}
    assert not accept(DEVICELY / "faros" / "meta.json") and not accept(DEVICELY / "empatica" / "info.txt")
    assert accept(DEVICELY / "faros" / "ACC.csv")


def test_missing_paths_and_unknown_formats_are_usage_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        list(read_csv_logs([str(tmp_path / "nope.csv")]))
    with pytest.raises(ConfigError, match="unknown device format"):
        list(read_csv_logs([str(FIX / "linked")], format="nope"))


# --------------------------------------------------------------------------- the output contract


def test_observation_rows_have_exactly_the_schema_columns_and_types():
    out = run([FIX / "linked" / "vitals.csv"])
    table = load_schema().table("observation")
    rows = out.observations[0]
    assert rows.data.schema.names == list(table.own_columns) + ["unit_key", "row_index"]
    for f in rows.data.schema:
        if f.name in table.by_name:  # columns of runs of one value are dictionary-encoded, of the same values
            typ = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            assert typ == table.by_name[f.name].arrow, f.name
    assert pa.types.is_dictionary(rows.data.schema.field("code").type)
    assert rows.data.schema.field("effective_start").type == pa.timestamp("us", tz="UTC")
    assert rows.data.schema.field("row_index").type == pa.int32()
    d = rows.data.to_pydict()
    assert set(d["is_component"]) == {False} and set(d["status"]) == {"final"}
    assert set(d["value_type"]) == {"Quantity"}
    assert d["row_index"] == list(range(rows.data.num_rows))
    sha = hashlib.sha256((FIX / "linked" / "vitals.csv").read_bytes()).hexdigest()
    assert set(d["unit_key"]) == {f"csv:{sha}:0"}
    assert d["panel_code"] == d["code"]
    for name in ("observation_id", "is_component", "status"):
        assert rows.data.column(name).null_count == 0


def test_category_is_device_unless_the_mapping_says_otherwise():
    out = run([DEVICELY / "empatica"])
    assert set(out.obs.column("category_code").to_pylist()) == {"device"}


def test_ids_are_deterministic_and_unique_per_sample():
    a = run([DEVICELY / "empatica", DEVICELY / "everion"])
    b = run([DEVICELY / "empatica", DEVICELY / "everion"])
    ids = a.obs.column("observation_id").to_pylist()
    assert ids == b.obs.column("observation_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert [r.content_hash for r in a.observations] == [r.content_hash for r in b.observations]


@pytest.mark.parametrize("chunk_rows", [1_000_000, 3])
def test_samples_sharing_a_time_get_their_own_ids(tmp_path, chunk_rows):
    """Some devices write two values at one time (PhysioNet urine twice in a minute, Shimmer
    repeated milliseconds); they shared an observation id. The first sample at a time keeps
    the documented id, the next get `~<count>`: within a chunk in any order, and across a
    chunk boundary that cuts a run of equal times; the same again on re-import."""
    f = tmp_path / "vitals.csv"
    times = ["00", "00", "01", "01", "02", "01"]  # with chunk_rows=3: "01" cut by the boundary, then out of order
    f.write_text("time,patient_id,device_id,hr\n" + "".join(
        f"2024-03-05T08:00:{t}Z,p1,m1,{80 + i}\n" for i, t in enumerate(times)))
    runs = [run([f], format="twinline-vitals", chunk_rows=chunk_rows) for _ in range(2)]
    assert len(runs[0].observations) == (2 if chunk_rows == 3 else 1)
    ids = runs[0].obs.sort_by("value_number").column("observation_id").to_pylist()
    assert ids == runs[1].obs.sort_by("value_number").column("observation_id").to_pylist()
    assert len(set(ids)) == 6
    assert all(re.fullmatch(r"[0-9a-f]{15}-[0-9a-f]{16}", i) for i in (ids[0], ids[2], ids[4]))
    assert ids[1] == f"{ids[0]}~{1:016x}" and ids[3] == f"{ids[2]}~{1:016x}" and ids[5] == f"{ids[2]}~{2:016x}"


def test_devices_and_patient_identifiers_are_reported_once():
    out = run([FIX / "linked" / "vitals.csv"])
    assert len(out.devices) == 1 and len(out.identifiers) == 1
    dev = out.devices[0].data.to_pylist()[0]
    assert dev["kind"] == "monitor" and dev["serial_number"] == "bedside-monitor-7"
    assert dev["device_id"] == out.obs.column("device_id")[0].as_py() and dev["unit_key"] == f"device:{dev['device_id']}"
    ident = out.identifiers[0].data.to_pylist()[0]
    assert (ident["system"], ident["value"]) == ("http://hospital.smarthealthit.org",
                                                 "cbc83bf2-c38e-4617-bc1d-f99fc86a80f0")
    assert ident["patient_id"] == out.obs.column("patient_id")[0].as_py()
    # a patient record too, so the observations' patient references resolve; one unit per patient, not per file
    assert [p.data.column("patient_id")[0].as_py() for p in out.patients] == [ident["patient_id"]]
    assert ident["unit_key"] == out.patients[0].data.column("unit_key")[0].as_py() == f"patient:{ident['patient_id']}"
    assert all(r.units == 0 for r in out.devices + out.identifiers + out.patients)
    assert out.devices[0].data.schema == output_schema("device")


def test_the_linked_log_names_the_fhir_fixture_patient():
    # fixtures/fhir/bundles/patient-1.json carries this MRN (see fixtures/devices/README.md)
    out = run([FIX / "linked" / "vitals.csv"])
    assert out.lines == 60 and not out.rejected
    hr = out.code("8867-4")
    flagged = hr.filter(pc.is_valid(hr.column("quality_flag")))
    assert flagged.column("value_number").to_pylist() == [241.0]
    assert flagged.column("quality_flag").to_pylist() == ["implausible"]
    assert out.code("59408-5").num_rows == 59  # one blank SpO2: missing, not a row
    assert out.code("8480-6").num_rows == 4


def test_command_line_ids_win_over_the_files():
    out = run([DEVICELY / "empatica"], patient_id="p-7", device_id="A01234")
    assert set(out.obs.column("patient_id").to_pylist()) == {"p-7"}
    assert len(set(out.obs.column("device_id").to_pylist())) == 1
    assert [d.data.column("serial_number")[0].as_py() for d in out.devices] == ["A01234"]
    # one patient_identifier row per (file, patient): 7 sensor files of one session
    assert {(i.data.column("system")[0].as_py(), i.data.column("value")[0].as_py()) for i in out.identifiers} == {
        ("https://twinline.dev/ids/empatica-e4-participant", "p-7")}
    assert len(out.identifiers) == 7


def test_a_device_column_with_several_values_makes_no_device_nothing_refers_to(tmp_path):
    # a blank id falls back to the file's own device; without blanks no row uses that device
    f = tmp_path / "two-beds.csv"
    f.write_text("time,patient_id,device_id,hr\n2024-03-05T08:00:00Z,p1,bed-1,80\n2024-03-05T08:01:00Z,p1,bed-2,81\n")
    out = run([f])
    devices = pa.concat_tables([d.data for d in out.devices])
    assert sorted(devices.column("serial_number").to_pylist()) == ["bed-1", "bed-2"]
    assert set(devices.column("device_id").to_pylist()) == set(out.obs.column("device_id").to_pylist())
    f.write_text("time,patient_id,device_id,hr\n2024-03-05T08:00:00Z,p1,bed-1,80\n2024-03-05T08:01:00Z,p1,,81\n")
    devices = pa.concat_tables([d.data for d in run([f]).devices])
    assert set(devices.column("serial_number").to_pylist()) == {"bed-1", None}


# --------------------------------------------------------------------------- vendors


def test_empatica_sample_rate_clock_and_conversions():
    out = run([DEVICELY / "empatica"])
    assert out.lines == sum(data_lines(DEVICELY / "empatica" / f, n) for f, n in (
        ("ACC.csv", 2), ("BVP.csv", 2), ("EDA.csv", 2), ("HR.csv", 2), ("TEMP.csv", 2), ("IBI.csv", 1), ("tags.csv", 0)))
    hr = out.code("8867-4").sort_by("effective_start")
    assert hr.num_rows == 28
    assert hr.column("effective_start")[0].as_py() == utc(2019, 3, 1, 15, 15, 11)
    assert hr.column("effective_start")[1].as_py() == utc(2019, 3, 1, 15, 15, 12)
    assert hr.column("value_number")[0].as_py() == 88.0 and hr.column("value_unit")[0].as_py() == "/min"
    acc = out.code("acc-x").sort_by("effective_start")
    assert acc.column("value_number")[0].as_py() == -1 / 64
    assert acc.column("effective_start")[1].as_py() - acc.column("effective_start")[0].as_py() == timedelta(
        microseconds=31250)  # 32 Hz
    ibi = out.code("inter-beat-interval").sort_by("effective_start")
    assert ibi.column("effective_start")[0].as_py() == utc(2019, 3, 1, 15, 15, 1) + timedelta(seconds=145.631666)
    assert ibi.column("value_number")[0].as_py() == pytest.approx(625.09)
    assert out.code("event-marker").num_rows == 4
    assert len(set(out.obs.column("device_id").to_pylist())) == 1  # one session folder: one device
    assert len(out.devices) == 1


def test_faros_times_come_from_the_sidecar():
    out = run([DEVICELY / "faros"])
    assert out.lines == sum(data_lines(DEVICELY / "faros" / f, 1) for f in ("ACC.csv", "HRV.csv", "Marker.csv"))
    acc = out.code("acc-x").sort_by("effective_start")
    assert acc.column("effective_start")[0].as_py() == utc(2018, 10, 12, 16, 54, 12)
    assert acc.column("effective_start")[1].as_py() == utc(2018, 10, 12, 16, 54, 12, 40000)  # 25 Hz
    assert acc.column("value_number")[0].as_py() == pytest.approx(0.3085)  # mg -> g
    assert out.code("event-marker").num_rows == 1  # 0 means no press
    rr = out.code("inter-beat-interval")
    assert 0 < rr.num_rows < 390 and pc.min(rr.column("value_number")).as_py() > 0


def test_spacelabs_time_of_day_rolls_over_midnight_and_failed_readings_are_not_values():
    path = DEVICELY / "spacelabs" / "spacelabs.abp"
    out = run([path])
    assert out.lines == 15 and not out.rejected  # 51 preamble lines and the XML footer are not units
    sys_ = out.code("8480-6").sort_by("effective_start")
    assert sys_.num_rows == 12  # 3 readings carry the error code EB
    assert sys_.column("effective_start")[0].as_py() == utc(1999, 1, 1, 17, 5)
    assert sys_.column("effective_start")[-1].as_py() == utc(1999, 1, 2, 0, 1)
    assert set(out.obs.column("patient_id").to_pylist()) == {"000002"}
    assert set(out.obs.column("effective_start_precision").to_pylist()) == {"minute"}
    assert out.identifiers[0].data.column("value")[0].as_py() == "000002"


def test_shimmer_sep_line_units_row_and_device_from_the_header():
    path = DEVICELY / "shimmer" / "read_test_data.csv"
    out = run([path])
    assert out.lines == data_lines(path, 3) == 90
    assert out.obs.num_rows == 90 * 7
    assert out.devices[0].data.column("serial_number")[0].as_py() == "40AC"
    acc = out.code("acc-x").sort_by("effective_start")
    assert acc.column("value_unit_display")[0].as_py() == "m/(s^2)"  # from the units row
    assert acc.column("effective_start")[0].as_py() == utc(2020, 7, 28, 10, 56, 50, 34000)
    assert acc.column("effective_start_precision")[0].as_py() == "millisecond"


def test_everion_long_layout_with_tags_parts_and_sequence_numbers():
    out = run([DEVICELY / "everion"])
    assert not out.rejected
    signals = DEVICELY / "everion" / "CsvData_signals_EV-EC39-7079-57A8.csv"
    features = DEVICELY / "everion" / "CsvData_features_EV-EC39-7079-57A8.csv"
    assert out.lines == data_lines(signals, 1) + data_lines(features, 1)  # sensor_data: declared skip
    hr = out.code("8867-4").sort_by("effective_start")
    assert hr.column("value_number")[0].as_py() == 65.0  # "65.0;85.0": value;quality
    ibi = out.code("inter-beat-interval")
    assert ibi.num_rows == 347 and len(set(ibi.column("observation_id").to_pylist())) == 347
    assert out.devices[0].data.column("serial_number")[0].as_py() == "EV-EC39-7079-57A8"


def test_physionet_descriptors_codes_and_elapsed_time():
    path = FIX / "physionet" / "140001.txt"
    out = run([path])
    assert out.lines == data_lines(path, 1) and not out.rejected
    assert set(out.obs.column("patient_id").to_pylist()) == {"140001"}
    sex = out.code("46098-0").to_pylist()[0]
    assert (sex["value_type"], sex["value_code"], sex["value_code_system"]) == (
        "CodeableConcept", "male", "http://hl7.org/fhir/administrative-gender")
    assert sex["value_number"] is None and sex["value_unit"] is None
    assert sex["effective_start"] == utc(2000, 1, 1)
    assert out.code("icu-type").column("value_display").to_pylist() == ["Medical ICU"]
    assert out.code("8302-2").num_rows == 0  # Height -1: missing
    assert set(out.code("3150-0").column("value_number").to_pylist()) == {50.0}  # FiO2 0.5 -> 50 %
    assert out.code("30525-0").column("value_number").to_pylist() == [67.0]
    assert set(out.code("2160-0").column("category_code").to_pylist()) == {"laboratory"}
    hr = out.code("8867-4").sort_by("effective_start")
    assert hr.column("effective_start_precision")[0].as_py() == "minute"
    assert hr.column("effective_start")[-1].as_py() >= utc(2000, 1, 2, 21)  # 45:xx after admission
    assert out.identifiers[0].data.column("system")[0].as_py() == "https://physionet.org/content/challenge-2012/RecordID"


# --------------------------------------------------------------------------- chunks and windows


def test_chunks_split_the_units_and_keep_the_same_rows():
    path = FIX / "linked" / "vitals.csv"
    whole = run([path])
    parts = run([path], chunk_rows=7)
    assert len(parts.observations) == 9
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [r.data.column("unit_key")[0].as_py() for r in parts.observations] == [f"csv:{sha}:{i}" for i in range(9)]
    assert [r.units for r in parts.observations] == [7] * 8 + [4]
    assert sorted(parts.obs.column("observation_id").to_pylist()) == sorted(whole.obs.column("observation_id").to_pylist())
    assert parts.observations[0].source_ref.endswith("vitals.csv:2-8")
    assert len({r.content_hash for r in parts.observations}) == 9


@pytest.mark.parametrize("chunk_rows", [1_000_000, 7])
def test_downsampling_gives_window_statistics_whatever_the_chunks(chunk_rows):
    path = FIX / "linked" / "vitals.csv"
    raw = run([path]).code("8867-4").sort_by("effective_start")
    out = run([path], downsample="15min", chunk_rows=chunk_rows)
    assert out.lines == 60
    hr = out.code("8867-4").sort_by("effective_start")
    values = np.array(raw.column("value_number").to_pylist())
    assert hr.column("sample_count").to_pylist() == [15, 15, 15, 15]
    assert hr.column("value_number").to_pylist() == pytest.approx([values[i:i + 15].mean() for i in range(0, 60, 15)])
    assert hr.column("value_min").to_pylist() == [values[i:i + 15].min() for i in range(0, 60, 15)]
    assert hr.column("value_max").to_pylist() == [values[i:i + 15].max() for i in range(0, 60, 15)]
    assert hr.column("effective_start")[1].as_py() == utc(2024, 3, 5, 8, 15)
    assert hr.column("effective_end")[1].as_py() == utc(2024, 3, 5, 8, 30)
    assert hr.column("quality_flag").to_pylist() == [None, "implausible", None, None]  # the 241 at 08:20
    ids = out.obs.column("observation_id").to_pylist()
    assert len(set(ids)) == len(ids) and not set(ids) & set(raw.column("observation_id").to_pylist())


def test_raw_overrides_a_window_the_mapping_sets(custom_mappings):
    custom_mappings({"v.toml": shipped("twinline-vitals.toml").replace('timezone = "UTC"',
                                                                       'timezone = "UTC"\ndownsample = "30min"')})
    path = FIX / "linked" / "vitals.csv"
    assert run([path]).code("8867-4").num_rows == 2
    assert run([path], downsample="raw").code("8867-4").num_rows == 60


# --------------------------------------------------------------------------- time zones and ids


def test_times_without_offset_are_read_in_the_mapping_time_zone(custom_mappings, tmp_path):
    custom_mappings({"v.toml": shipped("twinline-vitals.toml").replace('timezone = "UTC"',
                                                                       'timezone = "Europe/Berlin"')})
    f = tmp_path / "berlin.csv"
    f.write_text("time,patient_id,hr\n2024-07-01T10:00:00,p1,70\n2024-07-01T10:00:00+05:30,p1,71\n"
                 "2024-03-31T02:30:00,p1,72\n")
    out = run([f])
    rows = out.obs.sort_by("value_number").to_pylist()
    assert rows[0]["effective_start"] == utc(2024, 7, 1, 8) and rows[0]["effective_start_offset"] is None
    assert rows[1]["effective_start"] == utc(2024, 7, 1, 4, 30) and rows[1]["effective_start_offset"] == "+05:30"
    assert out.reasons() == ["bad-timestamp"]  # 02:30 does not exist in Berlin that night


def test_local_to_utc_reads_the_repeated_autumn_hour_as_the_earlier_one():
    naive = np.array([int((datetime(2024, 10, 27, 2, 30) - datetime(1970, 1, 1)).total_seconds() * 1e6)])
    us, gap = local_to_utc(naive, "Europe/Berlin")
    assert not gap[0] and us[0] == int(utc(2024, 10, 27, 0, 30).timestamp() * 1e6)
