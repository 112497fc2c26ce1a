"""Device logs on the real public samples in ../shared/data/device_csv (skipped without them)."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from pipeline.devices import detect, load_formats
from tests.test_devices_support import data_lines, run

pytestmark = pytest.mark.slow

# Lines of each kind of file that are not data: preamble, header, units row, footer.
NON_DATA = {"empatica-e4/IBI": 1, "empatica-e4/tags": 0, "faros/ACC": 1, "faros/HRV": 1, "faros/Marker": 1,
            "shimmer/calibrated": 3, "spacelabs-abpm/readings": 52, "everion/signals": 1, "everion/features": 1,
            "physionet-2012/record": 1}


def test_every_shared_device_file_is_recognised_and_its_lines_reconcile(shared_data):
    root = shared_data / "device_csv"
    formats = load_formats()
    expected = 0
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(fmt.ignore and any(i.search(f.as_posix()) for i in fmt.ignore) for fmt in formats.values()):
            continue
        kind = detect(f, f.read_bytes().decode("utf-8", "replace").splitlines()[:8], formats, None)
        assert not isinstance(kind, str), f"{f}: {kind}"
        if kind.skip:
            continue
        expected += data_lines(f, NON_DATA.get(f"{kind.format}/{kind.kind}", 2))
    out = run([root])
    assert out.lines == expected
    assert not [r for r in out.rejected if r.stage == "read"]


def test_physionet_set_a_maps_every_parameter(shared_data):
    folder = shared_data / "device_csv" / "physionet-challenge-2012" / "set-a"
    out = run([folder])
    assert not out.rejected, out.rejected[:3]
    files = sorted(folder.glob("*.txt"))
    assert out.lines == sum(data_lines(f, 1) for f in files)
    assert sorted(set(out.obs.column("patient_id").to_pylist())) == sorted(f.stem for f in files)
    sexes = out.code("46098-0").column("value_code").to_pylist()
    assert len(sexes) == 20 and set(sexes) == {"female", "male"}
    assert out.code("icu-type").num_rows == 20
    invasive = out.code("76215-3")
    assert invasive.num_rows > 0 and set(invasive.column("value_unit").to_pylist()) == {"mm[Hg]"}
    weights = out.code("29463-7")
    assert pc.min(weights.column("value_number")).as_py() > 0  # -1 is missing, never a weight
    assert {r.data.column("system")[0].as_py() for r in out.identifiers} == {
        "https://physionet.org/content/challenge-2012/RecordID"}


def test_everion_skips_what_it_does_not_map_and_maps_the_rest(shared_data):
    out = run([shared_data / "device_csv" / "devicely" / "tests" / "Everion_test_data"])
    assert not out.rejected
    assert {"8867-4", "59408-5", "9279-1", "inter-beat-interval"} <= set(out.obs.column("code").to_pylist())
