"""Careful DICOM metadata reading: Part 10 files and the DICOM JSON model, to one record shape.

A *record* is a plain dict holding only the attributes a mapping asks for, keyed by their
DICOM keyword (`PatientID`), or `CREATOR:(gggg,xxee)` for a private attribute:

- text values are `str`, IS values `int`, DS values `float`;
- a person name is a dict of its non-empty component groups (`Alphabetic`, `Ideographic`,
  `Phonetic`), as in the DICOM JSON model (PS3.18 F.2.2);
- a sequence is a list of records; a multi-valued attribute a list;
- an empty or absent attribute is simply not there; binary values are never kept.

Files (`read_file`) and DICOMweb answers (`json_record`) both become records, so one
mapping serves both. Only metadata is read: pixel data is never loaded. A file is read
without pydicom's `force` unless it truly looks like a dataset without the Part 10 header,
and a file cut short is detected, not silently returned as a shorter dataset (pydicom stops
quietly at the end of a file, even inside a data element).

Why pydicom's value conversion and not our own: character sets (ISO 2022 escapes, GB18030)
are hard, and pydicom gets them right. Its cost is per converted attribute, so only the
attributes a mapping names are converted (NOTES.md: conversion is the cost).
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from .paths import UnsafePath, contained
from .units import Rejected

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (PS3.4 Annex F)
DEFLATED = "1.2.840.10008.1.2.1.99"
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# Value representations whose values are numbers in the DICOM JSON model (PS3.18 F.2.3).
_NUMBER_VRS = frozenset({"IS", "DS", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TEXT_VRS = frozenset({"SH", "LO", "PN"})  # character set dependent, backslash-separated values
_SIMPLE_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT UV".split())  # 4-byte length (PS3.5 7.1.2)
_PRIVATE = re.compile(r"(?P<creator>[^:]{1,64}):\((?P<group>[0-9A-Fa-f]{4}),xx(?P<elem>[0-9A-Fa-f]{2})\)")
_FILE_ID = re.compile(r"[A-Za-z0-9_]{1,16}")  # a component of a Referenced File ID (PS3.10 8.5, CS)
_MAX_FRAGMENTS = 1 << 20


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True, slots=True)
class Attr:
    """One attribute to read: a public keyword or a private `CREATOR:(gggg,xxee)`, and for
    a sequence the attributes to read in its items."""

    key: str
    tag: int  # public: the tag; private: group << 16 | the element's low byte
    creator: str | None = None
    children: tuple[Attr, ...] = ()
    vr: str = ""  # from the data dictionary (public attributes only)

    @property
    def json_key(self) -> str:
        return f"{self.tag:08X}"


@dataclass(frozen=True)
class Wanted:
    """The attributes a mapping needs, compiled once into a tree."""

    attrs: tuple[Attr, ...]

    @classmethod
    def of(cls, paths: Iterable[str]) -> Wanted:
        """Compile attribute paths (`A`, `A/B/C` through sequences); ValueError names a bad one."""
        tree: dict[str, dict] = {}
        for path in paths:
            node = tree
            for part in path.split("/"):
                node = node.setdefault(part.strip(), {})
        return cls(_compile(tree, top=True))


def _compile(tree: dict[str, dict], top: bool) -> tuple[Attr, ...]:
    out = []
    for name, sub in tree.items():
        children = _compile(sub, top=False)
        m = _PRIVATE.fullmatch(name)
        if m:
            group = int(m["group"], 16)
            if not top or group % 2 == 0:
                raise ValueError(f"{name}: a private attribute needs an odd group and must be at the top level")
            out.append(Attr(name, group << 16 | int(m["elem"], 16), m["creator"], children))
            continue
        tag = tag_for_keyword(name)
        if tag is None:
            raise ValueError(f"{name}: not a DICOM keyword (PS3.6) nor a private CREATOR:(gggg,xxee)")
        out.append(Attr(name, tag, None, children, dictionary_VR(tag)))
    return tuple(out)


# --------------------------------------------------------------------------- records from pydicom


def dataset_record(ds: Any, attrs: tuple[Attr, ...], codec: str | None = None) -> dict[str, Any]:
    """The record of a pydicom Dataset (or a sequence item).

    Fast path: values that no character set applies to (PS3.5 6.1.2.3: UI, CS, DA, TM,
    IS, DS ...), and SH, LO and PN values when the dataset's character set is a single
    byte-transparent one (`codec`: default, Latin-1, UTF-8), are decoded here from the raw
    bytes; pydicom's per-element conversion, the cost of reading (NOTES.md), handles the
    rest (ISO 2022 escapes, GB18030, sequences). tests/test_dicom.py checks both agree.
    """
    rec: dict[str, Any] = {}
    for a in attrs:
        tag = a.tag if a.creator is None else _private_tag(ds, a)
        if tag is None:
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            raise _TooLarge  # deferred by read_file: larger than Limits.max_element_bytes
        if (isinstance(raw, RawDataElement) and isinstance(raw.value, bytes) and raw.VR in (None, a.vr, "UN")
                and (a.vr in _ASCII_VRS or (codec is not None and a.vr in _TEXT_VRS))):
            value = _raw_value(a.vr, raw.value, codec or "latin-1")
        else:
            elem = ds[tag]
            value = _element_value(elem.VR, elem.value, a)
        if value is not None:
            rec[a.key] = value
    return rec


def dataset_codec(ds: Any) -> str | None:
    """The Python codec of a dataset's Specific Character Set (0008,0005) when decoding its
    bytes directly gives what pydicom gives; None for ISO 2022 code extensions and others."""
    elem = ds.get_item(0x00080005)
    if elem is None:
        return "latin-1"  # pydicom's default repertoire decoding
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    return _SIMPLE_CHARSETS.get(value.strip(" \x00"))


def _raw_value(vr: str, raw: bytes, codec: str) -> Any:
    text = raw.decode(codec, errors="replace")
    out = []
    for part in text.split("\\"):
        if vr == "PN":
            value: Any = _name_groups(zip(PN_GROUPS, part.split("=")[:3], strict=False))
        else:
            part = part.strip(" \x00")
            value = (_number(vr, part) if vr in ("IS", "DS") else part) if part else None
        if value is not None:
            out.append(value)
    return out[0] if len(out) == 1 else (out or None)


def _private_tag(ds: Any, a: Attr) -> int | None:
    group = a.tag >> 16
    for block in range(0x10, 0x100):
        creator_tag = (group << 16) | block
        if creator_tag in ds:
            value = ds[creator_tag].value
            if isinstance(value, bytes):
                value = value.decode("latin-1", "replace")
            if isinstance(value, str) and value.strip() == a.creator:
                return (group << 16) | (block << 8) | (a.tag & 0xFF)
    return None


def _element_value(vr: str, value: Any, a: Attr) -> Any:
    if value is None:
        return None
    if vr == "SQ":
        if not a.children:
            return None
        items = [dataset_record(item, a.children) for item in value]
        return [i for i in items if i] or None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None  # binary, or a private value of unknown VR: never mapped
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = [v for v in (_scalar(vr, v) for v in values) if v is not None]
    return out[0] if len(out) == 1 else (out or None)


def _scalar(vr: str, v: Any) -> Any:
    if isinstance(v, PersonName):
        return _name_groups(zip(PN_GROUPS, (v.alphabetic, v.ideographic, v.phonetic), strict=True))
    if vr == "IS" or vr == "DS":
        return _number(vr, v)
    if isinstance(v, str):
        v = v.strip(" \x00")
        return v or None
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _name_groups(groups: Iterable[tuple[str, Any]]) -> dict[str, str] | None:
    """A person name's non-empty component groups; `^^^^` (all components empty) is no name."""
    out = {g: s.strip() for g, s in groups if isinstance(s, str) and s.strip(" ^")}
    return out or None


def _number(vr: str, v: Any) -> int | float | None:
    try:
        if vr == "IS":
            f = float(v)
            return int(f) if f.is_integer() else None
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------- records from DICOM JSON


def json_record(obj: Any, attrs: tuple[Attr, ...]) -> dict[str, Any]:
    """The record of one DICOM JSON dataset (PS3.18 Annex F), as a DICOMweb server sends it.

    Anything not of the shape the standard describes is ignored, never trusted.
    """
    rec: dict[str, Any] = {}
    if not isinstance(obj, dict):
        return rec
    for a in attrs:
        key = a.json_key if a.creator is None else _json_private_key(obj, a)
        el = obj.get(key) if key else None
        if not isinstance(el, dict):
            continue
        values = el.get("Value")
        vr = el.get("vr")
        if not isinstance(values, list) or not values or not isinstance(vr, str):
            continue
        if vr == "SQ":
            if a.children:
                items = [json_record(item, a.children) for item in values]
                if any(items):
                    rec[a.key] = [i for i in items if i]
            continue
        out = [v for v in (_json_scalar(vr, v) for v in values) if v is not None]
        if out:
            rec[a.key] = out[0] if len(out) == 1 else out
    return rec


def _json_private_key(obj: dict, a: Attr) -> str | None:
    group = a.tag >> 16
    for block in range(0x10, 0x100):
        el = obj.get(f"{group:04X}{block:04X}")
        if isinstance(el, dict):
            values = el.get("Value")
            if isinstance(values, list) and values and isinstance(values[0], str) and values[0].strip() == a.creator:
                return f"{group:04X}{block:02X}{a.tag & 0xFF:02X}"
    return None


def _json_scalar(vr: str, v: Any) -> Any:
    if vr == "PN":
        if not isinstance(v, dict):
            return None
        return _name_groups((g, v.get(g)) for g in PN_GROUPS)
    if vr in ("IS", "DS"):
        return _number(vr, v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None
    if vr in _NUMBER_VRS:
        return _scalar(vr, v)
    if isinstance(v, str):
        v = v.strip(" \x00")
        return v or None
    return None


# --------------------------------------------------------------------------- files


@dataclass(frozen=True, slots=True)
class Instance:
    """The record of one DICOM file that holds an instance."""

    record: dict[str, Any]
    transfer_syntax: str | None


@dataclass(frozen=True, slots=True)
class Directory:
    """A DICOMDIR (PS3.10 8.6): a directory of other files, not an instance."""

    references: tuple[str, ...]
    bad_references: int


@dataclass(frozen=True)
class Limits:
    """Defensive limits on one file's metadata: generous for real files, fatal for hostile ones.

    Pixel data is never read (it can be gigabytes). Other values larger than
    `max_element_bytes` (private blobs, waveforms, encapsulated documents) are skipped,
    not loaded; one that the mapping reads is a reason to reject the file. A deflated
    dataset (PS3.5 A.5) is inflated whole by pydicom, so its inflated size is measured
    first, in bounded steps, like a gzip file's (fhir_files.Limits).
    """

    max_element_bytes: int = 4 << 20        # one value the mapping may read
    max_inflated_bytes: int = 1 << 30       # a deflated dataset, inflated
    max_inflate_ratio: int = 200            # inflated / deflated, past the first 64 MiB
    inflate_ratio_floor: int = 64 << 20


DEFAULT_LIMITS = Limits()


class _TooLarge(Exception):
    pass


def read_file(path: str | Path, wanted: Wanted, limits: Limits = DEFAULT_LIMITS) -> Instance | Directory | Rejected:
    """Read the metadata of one file, or say why it cannot be used. Never raises for bad input.

    The message of a Rejected names the file and the problem, never a value from it.
    """
    ref = os.fspath(path)
    try:
        f = open(ref, "rb")  # noqa: SIM115 - closed in finally
    except OSError as e:
        return Rejected("read", "unreadable-file", f"cannot open the file ({e.strerror})", ref, payload_ref=ref)
    try:
        size = _size(f)
        head = f.read(132)
        if not head:
            return _reject("empty-file", "the file is empty", ref)
        if len(head) == 132 and head[128:132] == b"DICM":
            force = False
        elif _plausible_dataset_start(head):
            force = True  # a dataset without the Part 10 header (PS3.10 7.1): read it as such
        else:
            return _reject("not-dicom", "not a DICOM file: no 'DICM' after the 128-byte preamble, and the first "
                           "bytes are not the start of a dataset", ref)
        bomb = _deflate_bomb(f, 0 if force else 132, limits)
        if bomb:
            return _reject("deflate-bomb", bomb, ref)
        f.seek(0)
        with warnings.catch_warnings(), _lenient_reading():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=force, defer_size=limits.max_element_bytes)
                if len(ds) == 0:
                    return _reject("no-dataset", "the file holds no data element after its header: it is cut "
                                   "short or not an instance", ref)
                meta = _Meta(ds)
                problem = _truncation(ds, meta, f, size)
                if problem:
                    return _reject("truncated", f"the file is cut short ({problem}): copy it again from its source", ref)
                if meta.sop_class == DICOMDIR_SOP_CLASS:
                    return _directory(ds, ref)
                return Instance(dataset_record(ds, wanted.attrs, dataset_codec(ds)), meta.transfer_syntax)
            except _TooLarge:
                return _reject("element-too-large", f"a data element the mapping reads is larger than "
                               f"{limits.max_element_bytes} bytes: not a real value (raise max_element_bytes if it is)",
                               ref)
            except Exception as e:  # noqa: BLE001 - hostile input: any failure is a reason, not a crash
                return _failure(e, ref)
    except OSError as e:
        return Rejected("read", "unreadable-file", f"reading the file failed ({e.strerror})", ref, payload_ref=ref)
    finally:
        f.close()


def _reject(reason: str, message: str, ref: str) -> Rejected:
    return Rejected("parse", reason, message, ref, payload_ref=ref)


def _failure(e: Exception, ref: str) -> Rejected:
    """Name the failure by its kind. pydicom's own message may quote values: it is not used."""
    kind = type(e).__name__
    if isinstance(e, (EOFError, struct.error)) or (isinstance(e, zlib.error) and "truncated" in str(e)):
        return _reject("truncated", f"the file ends inside a data element ({kind}): copy it again from its source", ref)
    if isinstance(e, zlib.error):
        return _reject("bad-deflate", "the deflated dataset does not decompress: the file is damaged", ref)
    if isinstance(e, NotImplementedError) or (isinstance(e, (KeyError, ValueError)) and "VR" in str(e)):
        return _reject("unknown-vr", f"a data element has a value representation that cannot be read ({kind})", ref)
    if isinstance(e, InvalidDicomError):
        return _reject("bad-dicom", "the file meta information is not valid DICOM (PS3.10 7.1)", ref)
    if isinstance(e, RecursionError):
        return _reject("bad-dicom", "sequences nested too deeply to be a real dataset", ref)
    return _reject("bad-dicom", f"the dataset cannot be parsed ({kind})", ref)


def _deflate_bomb(f: Any, start: int, limits: Limits) -> str | None:
    """Why a deflated dataset must not be inflated, or None (also when the file is not deflated).

    The File Meta Information (group 0002, explicit VR little endian, PS3.10 7.1) is
    walked from `start` to find the transfer syntax and where the dataset begins; a
    deflated dataset is then inflated in 1 MiB steps and only counted.
    """
    want = 4096
    while True:
        f.seek(start)
        head = f.read(want)
        i, ts, cut = _meta_walk(head)
        if not cut or len(head) < want or want >= 1 << 20:
            break
        want *= 16  # a long meta group: read more of it
    if ts != DEFLATED:
        return None
    f.seek(start + i)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = deflated = 0
    step = 1 << 20
    try:
        while chunk := f.read(step):
            deflated += len(chunk)
            data = chunk
            while data:
                inflated += len(inflater.decompress(data, step))
                data = inflater.unconsumed_tail
                if inflated > limits.max_inflated_bytes or (
                        inflated > limits.inflate_ratio_floor and inflated > limits.max_inflate_ratio * deflated):
                    return (f"the deflated dataset expands past {limits.max_inflated_bytes} bytes or "
                            f"{limits.max_inflate_ratio}x its size: a decompression bomb, not read")
            if inflater.eof:
                break
    except zlib.error:
        return None  # damaged: pydicom's reading says so (bad-deflate, truncated)
    return None


def _meta_walk(head: bytes) -> tuple[int, str | None, bool]:
    """(where group 0002 ends, its transfer syntax, whether `head` ended inside the group)."""
    i, ts = 0, None
    while i + 8 <= len(head) and head[i:i + 2] == b"\x02\x00":
        elem = struct.unpack_from("<H", head, i + 2)[0]
        if head[i + 4:i + 6] in _LONG_LENGTH_VRS:
            if i + 12 > len(head):
                return i, ts, True
            length, i = struct.unpack_from("<I", head, i + 8)[0], i + 12
        else:
            length, i = struct.unpack_from("<H", head, i + 6)[0], i + 8
        if i + length > len(head):
            return i, ts, True
        if elem == 0x0010:
            ts = head[i:i + length].decode("latin-1").strip(" \x00")
        i += length
    return i, ts, len(head) - i < 8 and bool(head)


_LONG_LENGTH_VRS = frozenset((b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"))


def _size(f: Any) -> int:
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    return size


def _plausible_dataset_start(head: bytes) -> bool:
    """Does the file start like a dataset written without preamble and meta header?

    Accepted: a first element of group 0x0008 in explicit VR (little or big endian) or
    implicit VR little endian with a sane length, or of group 0x0002 (a meta header
    without preamble, always explicit VR little endian). Anything else is not DICOM.
    """
    if len(head) < 8:
        return False
    group_le, = struct.unpack_from("<H", head)
    group_be, = struct.unpack_from(">H", head)
    vr = head[4:6]
    if group_le == 0x0002:
        return vr in _EXPLICIT_VRS
    if group_le == 0x0008:
        if vr in _EXPLICIT_VRS:
            return True
        length, = struct.unpack_from("<I", head, 4)
        return length % 2 == 0 and length < 0x10000
    return group_be == 0x0008 and vr in _EXPLICIT_VRS


class _lenient_reading:
    """Read values as they are (no validation warnings quoting them); restore the setting after."""

    def __enter__(self) -> None:
        self.saved = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

    def __exit__(self, *exc: object) -> None:
        pydicom_config.settings.reading_validation_mode = self.saved


class _Meta:
    """The three File Meta Information values reading needs (PS3.10 7.1), taken from the raw
    elements: looking them up by keyword through pydicom costs as much as a whole record."""

    __slots__ = ("group_length", "transfer_syntax", "sop_class")

    def __init__(self, ds: Any):
        meta = getattr(ds, "file_meta", None)
        get = meta.get_item if meta is not None else (lambda tag: None)
        length = _raw(get(0x00020000))
        if isinstance(length, bytes):  # UL, and the meta header is always little endian
            length = struct.unpack("<I", length)[0] if len(length) == 4 else None
        self.group_length = length if isinstance(length, int) else None
        self.transfer_syntax = _uid_text(_raw(get(0x00020010)))
        self.sop_class = _uid_text(_raw(get(0x00020002)))


def _raw(elem: Any) -> Any:
    return None if elem is None else elem.value


def _uid_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    return value.strip(" \x00") or None


def _truncation(ds: Any, meta: _Meta, f: Any, size: int) -> str | None:
    """Why the dataset just read is incomplete, or None when it is whole.

    pydicom ends a dataset quietly at the end of the file, even inside an element. But a
    read can only come up short at the end of the file, so only the last element can be
    cut: it must end exactly at the end of the file (a defined length), or the file must
    end with the delimiter of its sequence (an undefined length). Reading stopped earlier
    at the pixel data, whose declared length is then checked against what is left.
    """
    if meta.group_length is not None and 128 + 4 + 12 + meta.group_length > size:
        return "the file meta information is incomplete"
    if meta.transfer_syntax == DEFLATED:
        return None  # pydicom inflated the rest of the file at once; zlib notices a cut
    pos = f.tell()
    if pos > size:
        return "a data element extends past the end"
    if pos < size:
        return None if _pixel_data_complete(f, size, ds) else "the pixel data is shorter than declared"
    last = next(reversed(ds.values()), None)  # raw elements, in file order
    value_tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if value_tell is None or length is None:
        return None
    if length != 0xFFFFFFFF:
        return None if value_tell + length == size else "the last data element is incomplete"
    f.seek(size - 8)
    tail = f.read(8)
    if tail in (b"\xfe\xff\xdd\xe0\0\0\0\0", b"\xff\xfe\xe0\xdd\0\0\0\0"):
        return None
    return "a sequence is not closed"


def _pixel_data_complete(f: Any, size: int, ds: Any) -> bool:
    """Reading stopped at the pixel data: is all of it there? Checked by seeking, never loaded."""
    implicit, little = ds.original_encoding
    if implicit is None:
        return True
    endian = "<" if little else ">"
    head = f.read(8)
    if len(head) < 8:
        return False
    if implicit:
        length, = struct.unpack_from(endian + "I", head, 4)
    elif head[4:6] in _LONG_VRS:
        ext = f.read(4)
        if len(ext) < 4:
            return False
        length, = struct.unpack(endian + "I", ext)
    else:
        length, = struct.unpack_from(endian + "H", head, 6)
    if length != 0xFFFFFFFF:
        return f.tell() + length <= size
    for _ in range(_MAX_FRAGMENTS):  # encapsulated: items up to the sequence delimiter (PS3.5 A.4)
        item = f.read(8)
        if len(item) < 8:
            return False
        group, elem, length = struct.unpack(endian + "HHI", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return True
        if (group, elem) != (0xFFFE, 0xE000) or f.tell() + length > size:
            return False
        f.seek(length, 1)
    return False


def _directory(ds: Any, path: str) -> Directory:
    """The files a DICOMDIR lists, relative to its folder. A Referenced File ID that could
    leave that folder (`..`, separators, a symbolic link pointing elsewhere) is counted
    as bad, never followed."""
    folder = os.path.dirname(path)
    refs: list[str] = []
    bad = 0
    seen: set[str] = set()
    for item in ds.get("DirectoryRecordSequence", None) or ():
        file_id = item.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = [str(p).strip() for p in (file_id if isinstance(file_id, (MultiValue, list)) else [file_id])]
        if not parts or not all(_FILE_ID.fullmatch(p) for p in parts):
            bad += 1
            continue
        try:
            target = contained(folder or ".", *parts)
        except UnsafePath:
            bad += 1
            continue
        if not folder:
            target = os.path.join(*parts)
        if target not in seen:
            seen.add(target)
            refs.append(target)
    return Directory(tuple(refs), bad)


__all__ = ["Attr", "Directory", "Instance", "Wanted", "dataset_record", "json_record", "read_file"]
