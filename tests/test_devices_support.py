"""Helpers shared by the device-log tests (no tests here)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.arrays import plain
from pipeline.connectors.csv_files import read_csv_logs
from pipeline.units import Rejected, Rows

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "fixtures" / "devices"
DEVICELY = FIX / "devicely"


@dataclass
class Outcome:
    """Everything read_csv_logs yielded, sorted by table."""

    units: list[Rows | Rejected]
    observations: list[Rows] = field(default_factory=list)
    devices: list[Rows] = field(default_factory=list)
    identifiers: list[Rows] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    patients: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for u in self.units:
            if isinstance(u, Rejected):
                self.rejected.append(u)
            elif u.table == "observation":
                self.observations.append(u)
            elif u.table == "device":
                self.devices.append(u)
            elif u.table == "patient":
                self.patients.append(u)
            else:
                assert u.table == "patient_identifier", u.table
                self.identifiers.append(u)

    @property
    def obs(self) -> pa.Table:
        tables = [plain(r.data) for r in self.observations]  # chunks encode different columns as dictionaries
        return pa.concat_tables(tables) if tables else pa.table({})

    @property
    def lines(self) -> int:
        """Lines accounted for: units of the observation rows plus rejected lines."""
        return sum(r.units for r in self.observations) + len(self.rejected)

    def reasons(self) -> list[str]:
        return [r.reason for r in self.rejected]

    def code(self, code: str) -> pa.Table:
        t = self.obs
        return t.filter(pc.equal(t.column("code"), code))


def run(paths: list[Path | str], **kw) -> Outcome:
    return Outcome(list(read_csv_logs([str(p) for p in paths], **kw)))


def data_lines(path: Path, non_data: int) -> int:
    """Lines of a file minus its preamble/header/footer lines."""
    return len(path.read_bytes().splitlines()) - non_data


def line_no(rejected: Rejected) -> int:
    m = re.search(r":(\d+)$", rejected.source_ref)
    assert m, rejected.source_ref
    return int(m.group(1))


@pytest.fixture
def custom_mappings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A TWIN_HOME whose mappings/devices holds the given TOML files (schemas: the repository's)."""

    def make(files: dict[str, str], keep_shipped: bool = False) -> Path:
        home = tmp_path / "home"
        (home / "mappings" / "devices").mkdir(parents=True)
        (home / "schemas").symlink_to(REPO / "schemas")
        if keep_shipped:
            for p in (REPO / "mappings" / "devices").glob("*.toml"):
                shutil.copy(p, home / "mappings" / "devices" / p.name)
        for name, text in files.items():
            (home / "mappings" / "devices" / name).write_text(text)
        monkeypatch.setenv("TWIN_HOME", str(home))
        return home / "mappings" / "devices"

    return make


def shipped(name: str) -> str:
    return (REPO / "mappings" / "devices" / name).read_text()
