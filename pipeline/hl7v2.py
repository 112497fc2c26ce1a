"""HL7 v2 (ER7, the pipe-and-hat syntax): framing, parsing, a terser-like accessor, ACKs.

Why hand-written: on these machines hl7apy parses 50-90 messages/s and python-hl7 about
2,500/s (NOTES.md), while the twin needs thousands per second for parse + map on one
core. A message here is a list of segments, each a list of raw field strings; components,
repetitions and escapes are only split and decoded when a mapping asks for them, which is
what keeps the hot path near the speed of a plain `str.split`.

What the syntax allows and we accept (HL7 v2.5 chapter 2, "Message construction rules"):

- Segment terminators CR, LF or CRLF, mixed; a UTF-8 BOM; blank lines between messages.
- The delimiters declared in MSH-1 and MSH-2 (never assumed): field, component,
  repetition, escape, subcomponent and, from v2.7, truncation. Fewer than four encoding
  characters are accepted (the missing ones simply do not split).
- Escapes \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\, \\Xhh..\\ (bytes in the message charset), \\.br\\ and
  \\.sp\\ (line breaks); \\H\\ and \\N\\ (highlighting) are dropped; charset escapes
  (\\C..\\, \\M..\\), other formatting commands and local \\Z..\\ escapes are kept as written.
- The character set of MSH-18 (table 0211). Without it, or with ASCII, text is read as
  UTF-8, else Latin-1 (what senders that declare ASCII actually send).
- Files with one or many messages, batch and file envelopes (FHS/BHS/BTS/FTS), and MLLP
  dumps (0x0B message 0x1C 0x0D). Everything that is not a usable message comes out as
  a `FramingProblem` with a stable reason code, so that nothing read is lost.

Locators and error texts name positions (line, byte, segment, field), never values.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import BinaryIO

BOM = b"\xef\xbb\xbf"
MLLP_START = 0x0B
MLLP_END = 0x1C
ENVELOPE = frozenset(("FHS", "BHS", "BTS", "FTS"))
HEADERS = frozenset(("MSH", "FHS", "BHS"))  # segments whose 4th character declares the field separator

_SEG_ID = re.compile(rb"[A-Z][A-Z0-9]{2}")
_SEG_ID_STR = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_TERM = re.compile(rb"\r\n|\r|\n")
_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """Defensive size limits: generous for real data (base64 PDFs in OBX-5), fatal for hostile input."""

    max_line_bytes: int = 16 << 20       # one segment
    max_message_bytes: int = 32 << 20    # one message (or one MLLP frame)
    max_file_bytes: int = 4 << 30        # one file
    max_payload_bytes: int = 1 << 20     # raw bytes kept in a Rejected; beyond, a pointer (payload_ref)


DEFAULT_LIMITS = Limits()


class HL7ParseError(ValueError):
    """A message that cannot be parsed. `reason` is a stable code, the text names no values."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------
# Character sets (HL7 table 0211, MSH-18)

# None: the default reading (UTF-8, else Latin-1). Names not listed are refused.
_CHARSETS: dict[str, str | None] = {
    "": None,
    "ASCII": None,
    "ISO IR6": None,
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}


def charset_codec(name: str) -> str | None:
    """Python codec for an MSH-18 value; None for the default reading; HL7ParseError if unsupported."""
    key = name.strip().upper()
    if key in _CHARSETS:
        return _CHARSETS[key]
    raise HL7ParseError("unsupported-charset", "MSH-18 names a character set this reader does not support "
                        "(supported: ASCII, UNICODE UTF-8, 8859/1-9, 8859/15, ISO IR87, ISO IR159, "
                        "GB 18030-2000, KS X 1001, BIG-5)")


def decode_text(raw: bytes, codec: str | None) -> str:
    if codec is None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as e:
        raise HL7ParseError("bad-charset", f"bytes at offset {e.start} are not valid in the character set "
                            "declared in MSH-18") from None
    except LookupError:  # pragma: no cover - the table above only names codecs Python has
        raise HL7ParseError("unsupported-charset", "MSH-18 names a character set Python cannot decode") from None


# --------------------------------------------------------------------------------------
# Delimiters and escapes


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_DELIMITERS = Delimiters()


@lru_cache(maxsize=64)
def delimiters_from(field: str, encoding: str) -> Delimiters:
    """Delimiters declared by MSH-1 and MSH-2. HL7ParseError when they are unusable."""
    if len(field) != 1 or field.isalnum() or field in "\r\n \t":
        raise HL7ParseError("bad-encoding-characters", "MSH-1 (field separator) is not a single punctuation character")
    if not 1 <= len(encoding) <= 5:
        raise HL7ParseError("bad-encoding-characters", "MSH-2 must hold 1 to 5 encoding characters")
    chars = field + encoding
    if len(set(chars)) != len(chars) or any(c.isalnum() or c in "\r\n \t" for c in encoding):
        raise HL7ParseError("bad-encoding-characters", "MSH-1/MSH-2 repeat a delimiter or use a letter, digit or space")
    e = encoding + "\0" * (5 - len(encoding))
    pick = lambda c: "" if c == "\0" else c  # noqa: E731
    d = Delimiters(field, pick(e[0]), pick(e[1]), pick(e[2]), pick(e[3]), pick(e[4]))
    return DEFAULT_DELIMITERS if d == DEFAULT_DELIMITERS else d  # one object: `is` tells standard messages


_FORMATTING_DROPPED = {"H", "N"}


def unescape(text: str, d: Delimiters, codec: str | None = None) -> str:
    """Decode HL7 escape sequences (HL7 v2.5 section 2.7). Malformed ones are kept as written."""
    esc = d.escape
    if not esc or esc not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find(esc, i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        k = text.find(esc, j + 1)
        if k < 0:  # no closing escape: keep literally
            out.append(text[j:])
            break
        body = text[j + 1:k]
        rep = _escape_value(body, d, codec)
        if rep is None:
            out.append(text[j:k + 1])
        else:
            out.append(rep)
        i = k + 1
    return "".join(out)


def _escape_value(body: str, d: Delimiters, codec: str | None) -> str | None:
    if len(body) == 1:
        c = body
        if c == "F":
            return d.field
        if c == "S":
            return d.component
        if c == "T":
            return d.subcomponent
        if c == "R":
            return d.repetition
        if c == "E":
            return d.escape
        if c == "P":
            return d.truncation or None
        if c in _FORMATTING_DROPPED:
            return ""
        return None
    if not body:
        return None
    head = body[0]
    if head == "X":
        hexs = body[1:]
        if not hexs or len(hexs) % 2:
            return None
        try:
            data = bytes.fromhex(hexs)
        except ValueError:
            return None
        try:
            return decode_text(data, codec)
        except HL7ParseError:
            return data.decode("latin-1")
    if head == ".":
        cmd = body[1:].strip().lower()
        if cmd == "br":
            return "\n"
        if cmd.startswith("sp"):
            count = cmd[2:].strip().lstrip("+")
            return "\n" * (int(count) if count.isdigit() and int(count) < 100 else 1)
        return None
    return None  # \C..\ \M..\ \Z..\ and others: kept as written


# --------------------------------------------------------------------------------------
# Accessor paths: SEG[occ]-field[rep].component.subcomponent


@dataclass(frozen=True, slots=True)
class Path:
    """A compiled accessor path. Occurrence and repetition are 1-based; None means 'not given'."""

    segment: str
    occurrence: int
    field: int
    repetition: int | None     # None: first (get) or all (get_all); 0: all ('[*]')
    component: int | None
    subcomponent: int | None
    text: str

    def __str__(self) -> str:
        return self.text


_PATH = re.compile(
    r"(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<occ>\d+)\])?-(?P<field>\d+)(?:\[(?P<rep>\d+|\*)\])?"
    r"(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?\Z"
)


@lru_cache(maxsize=4096)
def compile_path(text: str) -> Path:
    """Parse `PID-3[2].4.1`, `OBX-5`, `OBX[2]-3.1`, `PID-3[*].1`. ValueError for anything else."""
    m = _PATH.match(text.strip())
    if not m:
        raise ValueError(f"not an HL7 v2 accessor path: {text!r} (expected e.g. PID-3[2].4.1)")
    rep = m["rep"]
    path = Path(
        segment=m["seg"],
        occurrence=int(m["occ"] or 1),
        field=int(m["field"]),
        repetition=None if rep is None else (0 if rep == "*" else int(rep)),
        component=None if m["comp"] is None else int(m["comp"]),
        subcomponent=None if m["sub"] is None else int(m["sub"]),
        text=text.strip(),
    )
    if path.occurrence < 1 or path.field < 1 or 0 in (path.component, path.subcomponent) \
            or (path.repetition is not None and rep != "*" and path.repetition < 1):
        raise ValueError(f"accessor positions are 1-based: {text!r}")
    return path


# --------------------------------------------------------------------------------------
# Messages


class Message:
    """One parsed message: segments as lists of raw (still escaped) field strings.

    `segments[i][0]` is the segment name and `segments[i][n]` is field n, for MSH too
    (MSH-1, the field separator, is stored at index 1 so that numbering matches the
    standard). Values are split and unescaped only when asked for.
    """

    __slots__ = ("segments", "names", "delims", "codec", "_index")

    def __init__(self, segments: list[list[str]], delims: Delimiters, codec: str | None):
        self.segments = segments
        self.names = [s[0] for s in segments]
        self.delims = delims
        self.codec = codec
        self._index: dict[str, list[int]] | None = None

    # -- segments -------------------------------------------------------------------
    def index(self) -> dict[str, list[int]]:
        idx = self._index
        if idx is None:
            idx = {}
            for i, name in enumerate(self.names):
                idx.setdefault(name, []).append(i)
            self._index = idx
        return idx

    def positions(self, name: str) -> list[int]:
        return self.index().get(name, [])

    def segment(self, name: str, occurrence: int = 1) -> list[str] | None:
        pos = self.index().get(name)
        if not pos or occurrence > len(pos):
            return None
        return self.segments[pos[occurrence - 1]]

    def occurrence_of(self, position: int) -> int:
        """1-based occurrence number of the segment at `position` among segments of its name."""
        return self.index()[self.names[position]].index(position) + 1

    def locator(self, position: int, field: int | None = None) -> str:
        name = self.names[position]
        occ = self.occurrence_of(position)
        seg = name if occ == 1 else f"{name}[{occ}]"
        return seg if field is None else f"{seg}-{field}"

    # -- header fields ----------------------------------------------------------------
    @property
    def msh(self) -> list[str]:
        return self.segments[0]

    def msh_field(self, n: int) -> str:
        """MSH-n, first repetition, component 1, unescaped ('' when absent)."""
        return self.value(self.segments[0], n, 1, 1, None) or ""

    @property
    def control_id(self) -> str | None:
        return self.msh_field(10) or None

    @property
    def version(self) -> str:
        return self.msh_field(12).strip()

    @property
    def message_code(self) -> str:
        return self.msh_field(9).strip()

    @property
    def trigger_event(self) -> str:
        return (self.value(self.segments[0], 9, 1, 2, None) or "").strip()

    @property
    def message_type(self) -> str | None:
        code = self.message_code
        if not code:
            return None
        return f"{code}^{self.trigger_event}"

    # -- values -----------------------------------------------------------------------
    def field(self, seg: list[str], n: int) -> str:
        """Raw text of field n of a segment ('' when absent)."""
        return seg[n] if n < len(seg) else ""

    def repetitions(self, seg: list[str], n: int) -> list[str]:
        """Raw repetitions of field n (no empty list for a present field; [] when absent/empty)."""
        if n >= len(seg):
            return []
        text = seg[n]
        if not text:
            return []
        if n <= 2 and seg[0] in HEADERS:
            return [text]
        rs = self.delims.repetition
        return text.split(rs) if rs and rs in text else [text]

    def components(self, rep: str) -> list[str]:
        """Raw components of one repetition."""
        cs = self.delims.component
        return rep.split(cs) if cs and cs in rep else [rep]

    def subcomponents(self, comp: str) -> list[str]:
        ss = self.delims.subcomponent
        return comp.split(ss) if ss and ss in comp else [comp]

    def text(self, raw: str) -> str:
        """Unescape a leaf value."""
        es = self.delims.escape
        if es and es in raw:
            return unescape(raw, self.delims, self.codec)
        return raw

    def value(self, seg: list[str], n: int, rep: int | None, comp: int | None, sub: int | None) -> str | None:
        """One leaf value, unescaped; None when absent or empty.

        A path without a component gives component 1 (terser semantics); without a
        subcomponent, subcomponent 1.
        """
        if n >= len(seg):
            return None
        text = seg[n]
        if not text:
            return None
        if n <= 2 and seg[0] in HEADERS:
            return text if (rep or 1) == 1 and (comp or 1) == 1 else None
        d = self.delims
        if d.repetition in text and d.repetition:
            reps = text.split(d.repetition)
            r = rep or 1
            if r > len(reps):
                return None
            text = reps[r - 1]
        elif (rep or 1) != 1:
            return None
        if d.component and d.component in text:
            comps = text.split(d.component)
            c = comp or 1
            if c > len(comps):
                return None
            text = comps[c - 1]
        elif (comp or 1) != 1:
            return None
        if d.subcomponent and d.subcomponent in text:
            subs = text.split(d.subcomponent)
            s = sub or 1
            if s > len(subs):
                return None
            text = subs[s - 1]
        elif (sub or 1) != 1:
            return None
        if not text:
            return None
        if d.escape and d.escape in text:
            text = unescape(text, d, self.codec)
        return text or None

    def get(self, path: str | Path) -> str | None:
        """Terser-like read: `msg.get("PID-3[2].4.1")`, `msg.get("OBX[2]-5")`. Unescaped; None if empty."""
        p = compile_path(path) if isinstance(path, str) else path
        seg = self.segment(p.segment, p.occurrence)
        if seg is None:
            return None
        return self.value(seg, p.field, p.repetition or 1, p.component, p.subcomponent)

    def get_all(self, path: str | Path) -> list[str]:
        """Every repetition of a path (`PID-3.1` gives the id of each PID-3 repetition); empty ones skipped."""
        p = compile_path(path) if isinstance(path, str) else path
        seg = self.segment(p.segment, p.occurrence)
        if seg is None:
            return []
        if p.repetition:
            v = self.value(seg, p.field, p.repetition, p.component, p.subcomponent)
            return [] if v is None else [v]
        out = []
        for i in range(1, len(self.repetitions(seg, p.field)) + 1):
            v = self.value(seg, p.field, i, p.component, p.subcomponent)
            if v is not None:
                out.append(v)
        return out

    def to_er7(self, terminator: str = "\r") -> str:
        """The message as ER7 text again (segments joined with CR): what hl7apy and python-hl7 expect."""
        d = self.delims
        lines = []
        for seg in self.segments:
            if seg[0] in HEADERS:
                lines.append(seg[0] + d.field + d.field.join(seg[2:]))
            else:
                lines.append(d.field.join(seg))
        return terminator.join(lines)


def _strip_frame(raw: bytes) -> bytes:
    """Drop a BOM, MLLP framing bytes and surrounding whitespace around one message."""
    start, end = 0, len(raw)
    while start < end:
        if raw.startswith(BOM, start):
            start += 3
        elif raw[start] in b"\x0b\r\n \t":
            start += 1
        else:
            break
    while end > start and raw[end - 1] in b"\x1c\r\n \t\x00":
        end -= 1
    return raw[start:end]


def read_msh(raw: bytes) -> tuple[Delimiters, list[bytes]]:
    """Delimiters and raw MSH fields (bytes, MSH-n at index n) of a message, without decoding it."""
    data = _strip_frame(raw)
    if not data.startswith(b"MSH"):
        raise HL7ParseError("no-msh", "the message does not start with an MSH segment")
    if len(data) < 8:
        raise HL7ParseError("bad-msh", "the MSH segment is too short to declare its delimiters")
    fs = data[3:4]
    m = _TERM.search(data)
    line = data[:m.start()] if m else data
    parts = line.split(fs)
    if len(parts) < 2:
        raise HL7ParseError("bad-msh", "the MSH segment is too short to declare its delimiters")
    try:
        delims = delimiters_from(fs.decode("latin-1"), parts[1].decode("latin-1"))
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HL7ParseError("bad-encoding-characters", "MSH-2 is not text") from None
    fields = [b"MSH", fs] + parts[1:]
    return delims, fields


def parse_message(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one message (bytes as read: BOM, MLLP bytes and any line ends accepted).

    Raises HL7ParseError with a stable reason: no-msh, bad-msh, bad-encoding-characters,
    unsupported-charset, bad-charset, bad-segment, multiple-messages, message-too-large,
    line-too-long.
    """
    if len(raw) > limits.max_message_bytes:
        raise HL7ParseError("message-too-large", f"the message is larger than {limits.max_message_bytes} bytes")
    data = _strip_frame(raw)
    delims, msh = read_msh(data)
    codec = None
    if len(msh) > 18 and msh[18]:
        first = msh[18].split(delims.repetition.encode("latin-1"))[0] if delims.repetition else msh[18]
        first = first.split(delims.component.encode("latin-1"))[0] if delims.component else first
        codec = charset_codec(first.decode("latin-1"))
    text = decode_text(data, codec)
    fs = delims.field
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    segments: list[list[str]] = []
    for lineno, line in enumerate(text.split("\r"), 1):
        if line[:1] == "\ufeff":
            line = line[1:]
        if not line or line.isspace():
            continue
        if len(line) > limits.max_line_bytes:
            raise HL7ParseError("line-too-long", f"segment {lineno} is longer than {limits.max_line_bytes} bytes")
        name = line[:3]
        if not _SEG_ID_STR.match(name) or (len(line) > 3 and line[3] != fs):
            raise HL7ParseError("bad-segment", f"line {lineno} of the message is not a segment "
                                "(three capitals and the field separator): a raw line break inside a field?")
        fields = line.split(fs)
        if name == "MSH":
            if segments:
                raise HL7ParseError("multiple-messages", f"a second MSH at line {lineno}: one unit holds "
                                    "more than one message (read files with read_hl7v2)")
            fields.insert(1, fs)
        elif name in ENVELOPE:
            raise HL7ParseError("bad-segment", f"batch envelope segment {name} at line {lineno} inside a message")
        segments.append(fields)
    return Message(segments, delims, codec)


# --------------------------------------------------------------------------------------
# Framing: files and streams into messages


@dataclass(frozen=True, slots=True)
class RawMessage:
    """The bytes of one message found in a stream, with where it was found."""

    data: bytes
    index: int            # 1-based message number in the stream
    line: int | None      # first line (None in MLLP dumps, which have frames, not lines)
    offset: int           # byte offset of its first byte
    end: int              # byte offset after its last byte


@dataclass(frozen=True, slots=True)
class FramingProblem:
    """Bytes that are not a usable message, and why (reason codes in docs/hl7v2.md).

    `index` is set when the bytes were a message (too large, cut, bad line), so that
    counts of messages read stay right.
    """

    reason: str
    message: str
    data: bytes | None
    line: int | None
    offset: int
    end: int
    index: int | None = None


Framed = RawMessage | FramingProblem


def _segment_name(line: bytes, fs: bytes) -> tuple[str | None, bool]:
    """(segment name or None, is a header segment)."""
    if len(line) < 3 or not _SEG_ID.match(line):
        return None, False
    name = line[:3].decode("ascii")
    if name in HEADERS or name in ("BTS", "FTS"):
        if len(line) == 3 or not (chr(line[3]).isalnum() or line[3] in b" \t"):
            return name, name in HEADERS or name in ENVELOPE
        return None, False
    if len(line) == 3 or line[3:4] == fs:
        return name, False
    return None, False


class _Framer:
    """Groups lines into messages and envelope checks. Push lines in, take units out."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.out: list[Framed] = []
        self.count = 0
        # current message
        self.cur: list[bytes] | None = None
        self.cur_line: int | None = 0
        self.cur_off = 0
        self.cur_end = 0
        self.cur_size = 0
        self.cur_problem: tuple[str, str] | None = None
        self.fs = b"|"
        self.pending: list[tuple[int | None, int, int, bytes | None]] = []  # non-segment lines after the last segment
        # text outside messages
        self.orphan: list[bytes] = []
        self.orphan_start: tuple[int | None, int] | None = None
        self.orphan_end = 0
        self.orphan_size = 0
        self.orphan_segments = False
        self.orphan_long = False
        # envelopes
        self.in_file = False
        self.file_line: int | None = None
        self.batches = 0
        self.in_batch = False
        self.batch_explicit = False
        self.batch_line: int | None = None
        self.batch_messages = 0
        self.warnings: list[str] = []

    # -- helpers -----------------------------------------------------------------------
    def _where(self, line: int | None, offset: int) -> str:
        return f"line {line}" if line is not None else f"byte {offset}"

    def _add_orphan(self, lineno: int | None, off: int, end: int, data: bytes | None, is_segment: bool) -> None:
        if self.orphan_start is None:
            self.orphan_start = (lineno, off)
        self.orphan_end = end
        if data is None:
            self.orphan_long = True
            return
        self.orphan_segments |= is_segment
        if self.orphan_size + len(data) < self.limits.max_payload_bytes:
            self.orphan.append(data)
        self.orphan_size += len(data) + 1

    def _flush_orphans(self) -> None:
        if self.orphan_start is None:
            return
        line, off = self.orphan_start
        data = b"\r".join(self.orphan) if self.orphan_size <= self.limits.max_payload_bytes else None
        where = self._where(line, off)
        if self.orphan_long:
            reason, text = "line-too-long", f"a line from {where} on is longer than {self.limits.max_line_bytes} bytes"
        elif self.orphan_segments:
            reason, text = "no-msh", f"segments from {where} on belong to no message (no MSH before them)"
        else:
            reason, text = "not-hl7", f"text from {where} on is not HL7 v2 (no segment)"
        self.out.append(FramingProblem(reason, text, data, line, off, self.orphan_end))
        self.orphan, self.orphan_start, self.orphan_size = [], None, 0
        self.orphan_segments = self.orphan_long = False

    def _flush_message(self) -> None:
        if self.cur is None:
            return
        pending = self.pending
        self.pending = []
        cur, self.cur = self.cur, None
        if self.cur_problem is not None:
            reason, text = self.cur_problem
            data = b"\r".join(cur) if self.cur_size <= self.limits.max_payload_bytes else None
            self.out.append(FramingProblem(reason, text, data, self.cur_line, self.cur_off, self.cur_end, self.count))
        else:
            self.out.append(RawMessage(b"\r".join(cur) + b"\r", self.count, self.cur_line, self.cur_off, self.cur_end))
        for lineno, off, end, data in pending:
            self._add_orphan(lineno, off, end, data, False)

    def _envelope_problem(self, reason: str, text: str, data: bytes, lineno: int | None, off: int, end: int) -> None:
        self.out.append(FramingProblem(reason, text, data[: self.limits.max_payload_bytes], lineno, off, end))

    def _count(self, data: bytes, fs: bytes) -> int | None:
        parts = data.split(fs)
        if len(parts) < 2:
            return None
        first = parts[1].split(b"^")[0].strip()
        return int(first) if first.isdigit() else None

    # -- input -------------------------------------------------------------------------
    def line(self, lineno: int | None, off: int, end: int, data: bytes | None) -> None:
        """One line (without terminator); data None for a line over the size limit."""
        if data is None:
            if self.cur is not None and not self.pending:
                self.cur_problem = self.cur_problem or ("line-too-long", f"a segment of the message is longer than "
                                                        f"{self.limits.max_line_bytes} bytes")
                self.cur_size = self.limits.max_message_bytes + 1
                self.cur_end = end
            else:
                self._add_orphan(lineno, off, end, None, False)
            return
        if data.startswith(BOM):
            data = data[3:]
        if not data.strip():
            return
        name, header = _segment_name(data, self.fs)
        if name is None:
            if self.cur is not None:
                self.pending.append((lineno, off, end, data))
            else:
                self._add_orphan(lineno, off, end, data, False)
            return
        if header:
            self._flush_message()
            self._flush_orphans()
            if name == "MSH":
                self._start_message(lineno, off, end, data)
            else:
                self._envelope(name, lineno, off, end, data)
            return
        if self.cur is None:
            self._add_orphan(lineno, off, end, data, True)
            return
        if self.pending:
            first = self.pending[0][0]
            self.cur_problem = self.cur_problem or (
                "bad-segment", f"{self._where(first, self.pending[0][1])} inside the message is not a segment "
                "(three capitals and the field separator): a raw line break inside a field?")
            for _, _, _, p in self.pending:
                self._append(p)
            self.pending = []
        self._append(data)
        self.cur_end = end

    def _append(self, data: bytes | None) -> None:
        if data is None:
            return
        self.cur_size += len(data) + 1
        if self.cur_size > self.limits.max_message_bytes:
            if self.cur_problem is None:
                self.cur_problem = ("message-too-large", f"the message is larger than {self.limits.max_message_bytes} bytes")
            if self.cur:
                self.cur.clear()
            return
        assert self.cur is not None
        self.cur.append(data)

    def _start_message(self, lineno: int | None, off: int, end: int, data: bytes) -> None:
        self.count += 1
        if not self.in_batch:  # messages outside BHS/BTS form an implicit batch (BHS is optional in practice)
            self.in_batch, self.batch_explicit, self.batch_line, self.batch_messages = True, False, lineno, 0
            self.batches += 1
        self.batch_messages += 1
        self.fs = data[3:4] if len(data) > 3 else b"|"
        self.cur = []
        self.cur_line, self.cur_off, self.cur_end = lineno, off, end
        self.cur_size = 0
        self.cur_problem = None
        self._append(data)

    def _envelope(self, name: str, lineno: int | None, off: int, end: int, data: bytes) -> None:
        """Check FHS/BHS/BTS/FTS (HL7 v2.5 section 2.10.3).

        Missing headers and trailers are tolerated, as python-hl7 and most engines do:
        messages outside a batch form an implicit one, a file without FHS starts at its
        first byte. What is refused: a header in the wrong place, a batch opened inside
        an open batch, and counts in BTS-1/FTS-1 that do not match what was read.
        """
        where = self._where(lineno, off)
        fs = data[3:4] if len(data) > 3 else b"|"
        if name in ("FHS", "BHS"):
            self.fs = fs
        if name == "FHS":
            if self.in_file or self.count or self.batches:
                self._envelope_problem("batch-structure", f"FHS at {where} is not at the start of the file", data,
                                       lineno, off, end)
            self.in_file, self.file_line, self.batches, self.in_batch = True, lineno, 0, False
        elif name == "BHS":
            if self.in_batch and self.batch_explicit:
                self._envelope_problem("batch-structure", f"BHS at {where} opens a batch while the batch opened at "
                                       f"{self._where(self.batch_line, 0)} is not closed by BTS", data, lineno, off, end)
            elif self.in_batch:
                self.warnings.append(f"messages before the BHS at {where} are outside any batch")
            self.in_batch, self.batch_explicit, self.batch_line, self.batch_messages = True, True, lineno, 0
            self.batches += 1
        elif name == "BTS":
            if not self.in_batch:
                self._envelope_problem("batch-structure", f"BTS at {where} closes no batch (no BHS or message "
                                       "before it)", data, lineno, off, end)
            else:
                declared = self._count(data, fs)
                if declared is not None and declared != self.batch_messages:
                    self._envelope_problem("batch-count-mismatch", f"BTS-1 at {where} counts {declared} messages, the "
                                           f"batch holds {self.batch_messages}: messages may have been lost upstream",
                                           data, lineno, off, end)
            self.in_batch = False
        else:  # FTS
            if self.in_batch and self.batch_explicit:
                self.warnings.append(f"FTS at {where} closes the file while a batch is open (BTS missing)")
            self.in_batch = False
            declared = self._count(data, fs)
            if declared is not None and declared != self.batches:
                self._envelope_problem("batch-count-mismatch", f"FTS-1 at {where} counts {declared} batches, the "
                                       f"file holds {self.batches}", data, lineno, off, end)
            self.in_file = False
            self.batches = 0

    def finish(self) -> None:
        self._flush_message()
        self._flush_orphans()
        if self.in_batch and self.batch_explicit:
            self.warnings.append(f"the batch opened at {self._where(self.batch_line, 0)} has no BTS")
        if self.in_file:
            self.warnings.append(f"the file opened at {self._where(self.file_line, 0)} has no FTS")

    def take(self) -> list[Framed]:
        out, self.out = self.out, []
        return out


def _iter_lines(stream: BinaryIO, limits: Limits, lineno: int = 1, base: int = 0
                ) -> Iterator[tuple[int, int, int, bytes | None]]:
    """(line number, offset, end offset, bytes or None if too long) for each line of a stream."""
    buf = b""
    max_line = limits.max_line_bytes
    skipping = False
    skip_start = 0
    while True:
        chunk = stream.read(_BLOCK)
        eof = not chunk
        buf = buf + chunk if buf else chunk
        pos = 0
        n = len(buf)
        while True:
            m = _TERM.search(buf, pos)
            if m is None:
                break
            s, e = m.span()
            if e == n and buf[s] == 13 and not eof:  # a CR at the end of the block may be half of CRLF
                break
            if skipping:
                yield lineno, skip_start, base + s, None
                skipping = False
            elif s - pos > max_line:
                yield lineno, base + pos, base + s, None
            else:
                yield lineno, base + pos, base + s, buf[pos:s]
            lineno += 1
            pos = e
        buf = buf[pos:]
        base += pos
        if eof:
            if skipping:
                yield lineno, skip_start, base + len(buf), None
            elif buf:
                yield lineno, base, base + len(buf), buf
            return
        if len(buf) > max_line:
            if not skipping:
                skipping, skip_start = True, base
            base += len(buf)
            buf = b""


class MLLPDecoder:
    """Cuts an MLLP byte stream (0x0B message 0x1C 0x0D) into frames. Push bytes in, take events out.

    Events are (kind, data, offset): `frame` (the bytes between 0x0B and 0x1C),
    `junk` (non-blank bytes outside frames), `too-large` (a frame over the limit: data is
    its first bytes) and, from `close()`, `truncated` (a frame the stream cut before 0x1C).
    A 0x1C without the 0x0D after it still ends a frame; a 0x0B inside an open frame cuts
    the open one (`truncated`) and starts a new one.
    """

    def __init__(self, max_frame: int = DEFAULT_LIMITS.max_message_bytes, max_junk: int = 1 << 16):
        self.max_frame = max_frame
        self.max_junk = max_junk
        self.buf = bytearray()
        self.in_frame = False
        self.frame_start = 0
        self.offset = 0          # stream offset of buf[0]
        self.oversize = False
        self.junk = bytearray()
        self.junk_start = 0

    def _junk(self, data: bytes | bytearray, at: int) -> None:
        if not data.strip(b"\r\n \t\x00"):
            return
        if not self.junk:
            self.junk_start = at
        if len(self.junk) < self.max_junk:
            self.junk += data[: self.max_junk - len(self.junk)]

    def _flush_junk(self, events: list) -> None:
        if self.junk:
            events.append(("junk", bytes(self.junk), self.junk_start))
            self.junk = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes, int]]:
        events: list[tuple[str, bytes, int]] = []
        buf = self.buf
        scan_from = len(buf)
        buf += data
        pos = 0
        while True:
            if not self.in_frame:
                i = buf.find(b"\x0b", pos)
                if i < 0:
                    self._junk(buf[pos:], self.offset + pos)
                    pos = len(buf)
                    break
                self._junk(buf[pos:i], self.offset + pos)
                self._flush_junk(events)
                self.in_frame, self.frame_start, self.oversize = True, self.offset + i, False
                pos = i + 1
                scan_from = pos
                continue
            j = buf.find(b"\x1c", max(pos, scan_from))
            k = buf.find(b"\x0b", max(pos, scan_from))
            if k >= 0 and (j < 0 or k < j):  # a new start inside an open frame
                events.append(("truncated", bytes(buf[pos:k][: self.max_frame]), self.frame_start))
                self.in_frame = False
                pos = k
                continue
            if j < 0:
                if len(buf) - pos > self.max_frame:
                    if not self.oversize:
                        events.append(("too-large", bytes(buf[pos:pos + (1 << 16)]), self.frame_start))
                        self.oversize = True
                    pos = len(buf)
                scan_from = len(buf)
                break
            if self.oversize or j - pos > self.max_frame:
                if not self.oversize:
                    events.append(("too-large", bytes(buf[pos:pos + (1 << 16)]), self.frame_start))
            else:
                events.append(("frame", bytes(buf[pos:j]), self.frame_start))
            self.in_frame = False
            pos = j + 1
            if pos < len(buf) and buf[pos] == 0x0D:
                pos += 1
            scan_from = pos
        del buf[:pos]
        self.offset += pos
        return events

    def close(self) -> list[tuple[str, bytes, int]]:
        events: list[tuple[str, bytes, int]] = []
        if self.in_frame:
            if not self.oversize:
                events.append(("truncated", bytes(self.buf[: self.max_frame]), self.frame_start))
            self.in_frame = False
        else:
            self._junk(self.buf, self.offset)
        self._flush_junk(events)
        self.buf = bytearray()
        return events


def _first_meaningful_byte(head: bytes) -> int | None:
    i = 3 if head.startswith(BOM) else 0
    while i < len(head) and head[i] in b"\r\n \t":
        i += 1
    return head[i] if i < len(head) else None


def frame_stream(stream: BinaryIO, limits: Limits = DEFAULT_LIMITS, warnings: list[str] | None = None
                 ) -> Iterator[Framed]:
    """Cut a byte stream (a file) into messages and framing problems, in order, streaming.

    MLLP dumps (first byte 0x0B) are cut on their frames; anything else on segment
    lines: a message runs from its MSH to the next MSH, envelope segment or the end.
    Memory stays bounded by the largest message, not the size of the stream.
    """
    head = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
    if not head:
        head = stream.read(64)
        rest = stream
        stream = _Prefixed(head, rest)  # type: ignore[assignment]
    if _first_meaningful_byte(head) == MLLP_START:
        yield from _frame_mllp(stream, limits, warnings)
        return
    framer = _Framer(limits)
    for lineno, off, end, data in _iter_lines(stream, limits):
        framer.line(lineno, off, end, data)
        if framer.out:
            yield from framer.take()
    framer.finish()
    yield from framer.take()
    if warnings is not None:
        warnings.extend(framer.warnings)


class _Prefixed:
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            if n < 0:
                return out + self.rest.read()
            return out
        return self.rest.read(n)


def _frame_mllp(stream: BinaryIO, limits: Limits, warnings: list[str] | None) -> Iterator[Framed]:
    decoder = MLLPDecoder(limits.max_message_bytes)
    count = 0

    def handle(events: list[tuple[str, bytes, int]]) -> Iterator[Framed]:
        nonlocal count
        for kind, data, off in events:
            end = off + len(data) + 1
            if kind == "junk":
                yield FramingProblem("junk-between-frames", f"bytes at byte {off} lie outside any MLLP frame",
                                     data, None, off, end)
                continue
            count += 1
            if kind == "truncated":
                yield FramingProblem("truncated-frame", f"the MLLP frame at byte {off} is cut before its end "
                                     "(0x1C): the message is incomplete", data[: limits.max_payload_bytes], None,
                                     off, end, count)
            elif kind == "too-large":
                yield FramingProblem("message-too-large", f"the MLLP frame at byte {off} is larger than "
                                     f"{limits.max_message_bytes} bytes", None, None, off, end, count)
            else:
                framer = _Framer(limits)
                framer.count = count - 1
                base = off + 1
                for s, e in _line_spans(data):
                    framer.line(None, base + s, base + e, data[s:e])
                framer.finish()
                units = framer.take()
                if warnings is not None:
                    warnings.extend(framer.warnings)
                count = framer.count
                yield from units

    while True:
        chunk = stream.read(_BLOCK)
        if not chunk:
            break
        yield from handle(decoder.feed(chunk))
    yield from handle(decoder.close())


def _line_spans(data: bytes) -> Iterator[tuple[int, int]]:
    pos = 0
    for m in _TERM.finditer(data):
        yield pos, m.start()
        pos = m.end()
    if pos < len(data):
        yield pos, len(data)


def frame_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> list[Framed]:
    """`frame_stream` over bytes in memory (tests, MLLP frames holding a batch)."""
    return list(frame_stream(io.BufferedReader(io.BytesIO(data)), limits))


# --------------------------------------------------------------------------------------
# Acknowledgements (HL7 v2.5 section 2.9, original mode)

# HL7 table 0357 (message error condition codes) for our reason codes.
ERROR_CODES: dict[str, tuple[str, str]] = {
    "missing-segment": ("100", "Segment sequence error"),
    "missing-field": ("101", "Required field missing"),
    "bad-value": ("102", "Data type error"),
    "unknown-code": ("103", "Table value not found"),
    "unsupported-message-type": ("200", "Unsupported message type"),
    "unsupported-event": ("201", "Unsupported event code"),
    "unsupported-processing-id": ("202", "Unsupported processing id"),
    "unsupported-version": ("203", "Unsupported version id"),
    "duplicate": ("205", "Duplicate key identifier"),
    "internal-error": ("207", "Application internal error"),
}


def _ack_escape(text: str, d: Delimiters) -> str:
    out = text
    if d.escape:
        out = out.replace(d.escape, f"{d.escape}E{d.escape}")
    for ch, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R")):
        if ch:
            out = out.replace(ch, f"{d.escape}{code}{d.escape}" if d.escape else " ")
    return out.replace("\r", " ").replace("\n", " ")


def _new_control_id() -> str:
    return "ACK" + os.urandom(8).hex()


def build_ack(raw_msh: tuple[Delimiters, list[bytes]] | None, code: str, *, reason: str | None = None,
              text: str | None = None, location: str | None = None, now: datetime | None = None,
              control_id: str | None = None) -> bytes:
    """An original-mode ACK (MSH with sender and receiver swapped, MSA, ERR for AE/AR).

    `raw_msh` is `read_msh()` of the message acknowledged (None when it had no usable
    MSH: the ACK then carries standard delimiters and an empty MSA-2). The ACK keeps the
    message's delimiters, so its MSH-3 to MSH-6 are copied byte for byte. `text` must not
    hold patient data: it names the reason and positions only.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"ack code must be AA, AE or AR, not {code!r}")
    when = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S+0000")
    if raw_msh is None:
        d, f = DEFAULT_DELIMITERS, []
    else:
        d, f = raw_msh
    fs = d.field

    def fld(n: int) -> str:
        return f[n].decode("latin-1") if n < len(f) else ""

    version = fld(12) or "2.5"
    trigger = ""
    if len(f) > 9 and d.component:
        parts = fld(9).split(d.component)
        trigger = parts[1] if len(parts) > 1 else ""
    processing = fld(11) or "P"
    typ = d.component.join(["ACK", trigger, "ACK"]) if d.component else "ACK"
    msh = fs.join(["MSH", d.encoding_characters, fld(5), fld(6), fld(3), fld(4), when, "", typ,
                   control_id or _new_control_id(), processing, version])
    msa = fs.join(["MSA", code, fld(10)])
    segs = [msh, msa]
    if code != "AA":
        err_code, err_text = ERROR_CODES.get(reason or "", ("207", "Application internal error"))
        user = _ack_escape(f"{reason or 'error'}: {text}" if text else (reason or "error"), d)
        loc = location or ""
        major = version.split(".")[:2]
        old = major < ["2", "5"] if all(p.isdigit() for p in major) else False
        c, s = d.component, d.subcomponent or d.component
        if old:  # ERR-1 (ELD): segment^sequence^field^code&text&table
            loc_parts = _location_parts(loc)
            eld = c.join(loc_parts + [s.join([err_code, err_text, "HL70357"])])
            segs.append(fs.join(["ERR", eld]))
        else:   # ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 user message
            erl = c.join(_location_parts(loc)) if loc else ""
            segs.append(fs.join(["ERR", "", erl, c.join([err_code, err_text, "HL70357"]), "E", "", "", "", user]))
    return ("\r".join(segs) + "\r").encode("utf-8")


def _location_parts(loc: str) -> list[str]:
    """'OBX[2]-11' -> ['OBX', '2', '11']."""
    m = re.match(r"([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+))?", loc or "")
    if not m:
        return ["", "", ""]
    return [m[1], m[2] or "1", m[3] or ""]


__all__ = [
    "BOM", "DEFAULT_DELIMITERS", "DEFAULT_LIMITS", "Delimiters", "ERROR_CODES", "Framed", "FramingProblem",
    "HL7ParseError", "Limits", "MLLPDecoder", "Message", "Path", "RawMessage", "build_ack", "charset_codec",
    "compile_path", "decode_text", "delimiters_from", "frame_bytes", "frame_stream", "parse_message",
    "read_msh", "unescape",
]
