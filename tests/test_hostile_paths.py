"""Names from input never lead outside where they should (issue 10).

Walking a folder does not follow a symbolic link out of it; a link inside it is read.
(DICOMDIR references and Bulk manifest names: tests/test_dicom_files.py and
tests/test_fhir_fetch_hostile.py.)
"""

from __future__ import annotations

import shutil

import pytest

from pipeline.connectors import FILE_CONNECTORS
from pipeline.connectors.csv_files import read_csv_logs
from pipeline.connectors.dicom_files import walk as dicom_walk
from pipeline.connectors.hl7v2_files import ReadStats
from pipeline.connectors.hl7v2_files import walk as hl7_walk

from .conftest import FIXTURES

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
