"""The DICOM reader's size limits: deflate bombs, oversized values, and the files they must not hurt."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pipeline.connectors.dicom_files import read_dicom
from pipeline.dicom import Instance, Limits, read_file
from pipeline.dicom_fhir import DicomMapping
from pipeline.units import Rejected
from tests.conftest import FIXTURES

SOP_UID = "2.25.1234567890"


@pytest.fixture(scope="module")
def wanted():
    return DicomMapping.load().wanted


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(value: str) -> bytes:
    b = value.encode()
    return b + b" " * (len(b) % 2)


def _uid(value: str) -> bytes:
    b = value.encode()
    return b + b"\0" * (len(b) % 2)


def write_deflated(path: Path, zeros: int) -> None:
    """A Part 10 file whose deflated dataset holds a private OB value of `zeros` zero bytes.

    Written in a stream, so that the test holds only the compressed bytes.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = SOP_UID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    dataset = (_element(0x0008, 0x0016, b"UI", _uid(SecondaryCaptureImageStorage))
               + _element(0x0008, 0x0018, b"UI", _uid(SOP_UID))
               + _element(0x0010, 0x0020, b"LO", _text("BOMB-1"))
               + _element(0x0020, 0x000D, b"UI", _uid("2.25.1"))
               + _element(0x0009, 0x0010, b"LO", _text("TWINLINE BOMB"))
               + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, zeros))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(head.getvalue())
        f.write(deflater.compress(dataset))
        block = b"\0" * (1 << 20)
        left = zeros
        while left:
            n = min(left, len(block))
            f.write(deflater.compress(block[:n]))
            left -= n
        f.write(deflater.flush())


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path, wanted):
    bomb = tmp_path / "bomb.dcm"
    write_deflated(bomb, 96 << 20)          # 96 MiB of zeros in ~100 KB: past the floor, ratio ~1000
    assert bomb.stat().st_size < 1 << 20
    started = time.perf_counter()
    r = read_file(bomb, wanted)
    assert isinstance(r, Rejected) and r.reason == "deflate-bomb", r
    assert "decompression bomb" in r.message and time.perf_counter() - started < 10


def test_a_small_deflated_file_is_read_and_the_absolute_limit_holds(tmp_path, wanted):
    small = tmp_path / "small.dcm"
    write_deflated(small, 1 << 20)           # 1 MiB inflated: under the floor, whatever the ratio
    r = read_file(small, wanted)
    assert isinstance(r, Instance), r
    tight = Limits(max_inflated_bytes=512 << 10)
    r = read_file(small, wanted, tight)
    assert isinstance(r, Rejected) and r.reason == "deflate-bomb"


def test_the_deflated_fixture_still_reads(wanted):
    r = read_file(FIXTURES / "dicom" / "pydicom" / "image_dfl.dcm", wanted)
    assert isinstance(r, Instance)


def test_values_past_the_element_limit_are_skipped_unless_the_mapping_reads_them(tmp_path, wanted):
    ds = pydicom.dcmread(FIXTURES / "dicom" / "generated" / "linked-patient.dcm")
    private = ds.private_block(0x0009, "TWINLINE BLOB", create=True)
    private.add_new(0x00, "OB", b"\0" * 8192)
    ds.save_as(tmp_path / "blob.dcm")
    tight = Limits(max_element_bytes=4096)
    r = read_file(tmp_path / "blob.dcm", wanted, tight)
    assert isinstance(r, Instance), r       # a large value nobody reads is skipped, not loaded
    assert r.record == read_file(tmp_path / "blob.dcm", wanted).record
    ds.StudyDescription = "x" * 6000         # a value the mapping reads
    ds.save_as(tmp_path / "long.dcm")
    r = read_file(tmp_path / "long.dcm", wanted, tight)
    assert isinstance(r, Rejected) and r.reason == "element-too-large"
    assert "x" * 20 not in r.message


def test_a_bomb_among_good_files_is_one_quarantine_entry(tmp_path):
    write_deflated(tmp_path / "bomb.dcm", 96 << 20)
    (tmp_path / "good.dcm").write_bytes((FIXTURES / "dicom" / "generated" / "linked-patient.dcm").read_bytes())
    reader = read_dicom([str(tmp_path)])
    units = list(reader)
    assert reader.counts.reconciles()
    assert [u.reason for u in units if isinstance(u, Rejected)] == ["deflate-bomb"]
