"""HL7 v2 (ER7, the pipe-and-hat syntax): parsing one message, a terser-like accessor, ACKs.

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

Cutting files and streams into messages is `hl7v2_framing`'s job.

Locators and error texts name positions (line, byte, segment, field), never values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

BOM = b"\xef\xbb\xbf"
MLLP_START = 0x0B
ENVELOPE = frozenset(("FHS", "BHS", "BTS", "FTS"))
HEADERS = frozenset(("MSH", "FHS", "BHS"))  # segments whose 4th character declares the field separator

_SEG_ID = re.compile(rb"[A-Z][A-Z0-9]{2}")
_SEG_ID_STR = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_TERM = re.compile(rb"\r\n|\r|\n")


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
        # repetition, then component, then subcomponent: written out, not a loop over
        # three tuples (the commonest call on the hot path: once per value a rule reads)
        t = _pick(text, d.repetition, rep or 1)
        if t is not None:
            t = _pick(t, d.component, comp or 1)
        if t is not None:
            t = _pick(t, d.subcomponent, sub or 1)
        if not t:
            return None
        if d.escape and d.escape in t:
            t = unescape(t, d, self.codec)
        return t or None

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


def _pick(text: str, sep: str, i: int) -> str | None:
    """Part i (from 1) of text cut on sep; None when there is no such part."""
    if sep and sep in text:
        parts = text.split(sep)
        return parts[i - 1] if i <= len(parts) else None
    return text if i == 1 else None


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


_TRIGGER = re.compile(r"[A-Z0-9]{3}")


def build_ack(raw_msh: tuple[Delimiters, list[bytes]] | None, code: str, *, reason: str | None = None,
              text: str | None = None, location: str | None = None, now: datetime | None = None,
              control_id: str | None = None) -> bytes:
    """An original-mode ACK (MSH with sender and receiver swapped, MSA, ERR for AE/AR).

    `raw_msh` is `read_msh()` of the message acknowledged (None when it had no usable
    MSH: the ACK then carries standard delimiters and an empty MSA-2). The ACK keeps the
    message's delimiters, so its MSH-3 to MSH-6 are copied byte for byte, and its character
    set: the fields are written back in the bytes they came in (not re-encoded, which turned
    a Latin-1 or UTF-8 facility name into mojibake the sender cannot match), and MSH-18 is
    echoed so that those bytes are declared. `text` must not hold patient data: it names
    the reason and positions only.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"ack code must be AA, AE or AR, not {code!r}")
    when = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S+0000")
    if raw_msh is None:
        d, f = DEFAULT_DELIMITERS, list[bytes]()
    else:
        d, f = raw_msh
    fs = d.field

    def fld(n: int) -> str:
        return f[n].decode("latin-1") if n < len(f) else ""

    version = fld(12) or "2.5"
    number = version.split(d.component)[0].strip() if d.component else version.strip()  # VID: 2.4^CAN
    trigger = ""
    if len(f) > 9 and d.component:
        parts = fld(9).split(d.component)
        trigger = parts[1] if len(parts) > 1 else ""
        if not _TRIGGER.fullmatch(trigger):  # echo an event code (table 0003), never whatever MSH-9.2 held
            trigger = ""
    processing = fld(11) or "P"
    typ = d.component.join(["ACK", trigger, "ACK"]) if d.component else "ACK"
    msh = fs.join(["MSH", d.encoding_characters, fld(5), fld(6), fld(3), fld(4), when, "", typ,
                   control_id or _new_control_id(), processing, version])
    if fld(18):
        msh += fs * 6 + fld(18)
    msa = fs.join(["MSA", code, fld(10)])
    segs = [msh, msa]
    if code != "AA":
        err_code, err_text = ERROR_CODES.get(reason or "", ("207", "Application internal error"))
        user = _ack_escape(f"{reason or 'error'}: {text}" if text else (reason or "error"), d)
        loc = location or ""
        major = number.split(".")[:2]
        old = major < ["2", "5"] if all(p.isdigit() for p in major) else False
        c, s = d.component, d.subcomponent or d.component
        if old:  # ERR-1 (ELD): segment^sequence^field^code&text&table
            loc_parts = _location_parts(loc)
            eld = c.join(loc_parts + [s.join([err_code, err_text, "HL70357"])])
            segs.append(fs.join(["ERR", eld]))
        else:   # ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 user message
            erl = c.join(_location_parts(loc)) if loc else ""
            segs.append(fs.join(["ERR", "", erl, c.join([err_code, err_text, "HL70357"]), "E", "", "", "", user]))
    return ("\r".join(segs) + "\r").encode("latin-1", "replace")  # fields were read as latin-1: same bytes


def _location_parts(loc: str) -> list[str]:
    """'OBX[2]-11' -> ['OBX', '2', '11']."""
    m = re.match(r"([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+))?", loc or "")
    if not m:
        return ["", "", ""]
    return [m[1], m[2] or "1", m[3] or ""]


__all__ = [
    "BOM", "DEFAULT_DELIMITERS", "DEFAULT_LIMITS", "ERROR_CODES", "Delimiters", "HL7ParseError", "Limits", "Message",
    "Path", "build_ack", "charset_codec", "compile_path", "decode_text", "delimiters_from", "parse_message",
    "read_msh", "unescape",
]
