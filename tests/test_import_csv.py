"""`twin import csv` as a user runs it: what the run summary says about device data."""

from __future__ import annotations

import pyarrow.compute as pc

from pipeline.cli import main as twin
from pipeline.store import Store
from tests.conftest import FIXTURES

E4 = str(FIXTURES / "devices" / "devicely" / "empatica")  # the E4 export does not name the wearer


def test_rows_of_no_patient_are_kept_and_the_summary_says_so(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert twin(["import", "csv", E4, "--store", store]) == 0
    out = capsys.readouterr().out
    obs = Store(store).read("observation")
    assert obs.num_rows > 0 and obs.column("twin_id").null_count == obs.num_rows
    assert f"rows name no patient (observation {obs.num_rows:,})" in out and "--patient-id" in out


def test_with_a_patient_id_the_rows_belong_to_a_twin_and_no_note(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert twin(["import", "csv", E4, "--patient-id", "wearer-1", "--store", store]) == 0
    assert "name no patient" not in capsys.readouterr().out
    obs = Store(store).read("observation")
    assert obs.column("twin_id").null_count == 0 and pc.count_distinct(obs.column("twin_id")).as_py() == 1


def test_two_patients_samples_at_the_same_time_have_different_ids(tmp_path):
    # PhysioNet records name no device and start at 00:00: the ids must still differ by patient
    src = (FIXTURES / "devices" / "physionet" / "140001.txt").read_text()
    (tmp_path / "140001.txt").write_text(src)
    (tmp_path / "140002.txt").write_text(src.replace("RecordID,140001", "RecordID,140002"))
    store = str(tmp_path / "s")
    assert twin(["import", "csv", str(tmp_path), "--format", "physionet-2012", "--store", store]) == 0
    obs = Store(store).read("observation", ["observation_id", "row_index", "patient_id"])
    assert pc.count_distinct(obs.column("patient_id")).as_py() == 2
    keys = pc.binary_join_element_wise(obs.column("observation_id"), pc.cast(obs.column("row_index"), "string"), "#")
    assert pc.count_distinct(keys).as_py() == obs.num_rows
