"""HL7 v2 syntax: delimiters, escapes, character sets, accessor paths, framing, limits, fuzzing."""

from __future__ import annotations

import contextlib
import io
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import hl7v2, hl7v2_framing
from pipeline.hl7v2 import (
    DEFAULT_DELIMITERS,
    HL7ParseError,
    Limits,
    compile_path,
    delimiters_from,
    parse_message,
    unescape,
)
from pipeline.hl7v2_fhir import map_message
from pipeline.hl7v2_framing import FramingProblem, MLLPDecoder, RawMessage, frame_bytes, frame_stream

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7v2"


def read(name: str) -> bytes:
    return (FIX / name).read_bytes()


def kinds(units) -> list:
    return [u.index if isinstance(u, RawMessage) else u.reason for u in units]


# -- delimiters and accessor paths ----------------------------------------------------------


def test_accessor_reads_fields_components_subcomponents_and_repetitions():
    # python-hl7's own example of every level of the syntax
    msg = parse_message(read("python-hl7/rep_sample_hl7.hl7"))
    assert msg.get("MSH-1") == "|"
    assert msg.get("MSH-2") == "^~\\&"
    assert msg.get("MSH-9.2") == "R01"
    assert msg.get("PID-1") == "Field1"
    assert msg.get("PID-2") == "Component1"            # no component given: the first one
    assert msg.get("PID-2.2") == "Component2"
    assert msg.get("PID-3.2") == "Sub-Component1"       # no subcomponent given: the first one
    assert msg.get("PID-3.2.2") == "Sub-Component2"
    assert msg.get("PID-3.3") == "Component3"
    assert msg.get("PID-4[2]") == "Repeat2"
    assert msg.get_all("PID-4") == ["Repeat1", "Repeat2"]
    assert msg.get("PID-4[3]") is None and msg.get("PID-9") is None and msg.get("OBX-1") is None
    assert msg.message_type == "ORU^R01" and msg.version == "2.4" and msg.control_id == "CNTRL-3456"


def test_declared_delimiters_are_used_not_assumed():
    msg = parse_message(read("syntax-custom-delimiters.hl7"))
    assert msg.delims == delimiters_from("#", "$@/%")
    assert msg.get("MSH-1") == "#" and msg.get("MSH-2") == "$@/%"
    assert msg.message_type == "ADT^A28"
    assert msg.get("PID-3[2].1") == "ALT-9"
    assert msg.get("PID-3[1].4.2") == "http://hospital.smarthealthit.org"
    assert msg.get("PID-5.1") == "Quill$feather"        # /S/ is the component separator, escaped
    # a Z-segment is kept and addressable like any other
    assert msg.get("ZPI-2[1].1") == "favourite#colour"
    assert msg.get("ZPI-2[1].2") == "blue"
    assert msg.get("ZPI-2[2]") == "green"
    assert msg.get("ZPI-3") == "/ not an escape"


def test_z_segment_in_the_middle_of_a_message_is_kept():
    msg = parse_message(read("twin-oru-r01.hl7"))
    assert "ZLB" in msg.names
    assert msg.get("ZLB-2.2") == "R7"
    assert msg.names.index("ZLB") == msg.positions("OBX")[2] - 1


@pytest.mark.parametrize("fs, enc", [("|", "^^\\&"), ("|", ""), ("|", "^~\\&#!"), ("A", "^~\\&"), ("|", "^~|&"),
                                     ("\r", "^~\\&"), ("|", "^ \\&")])
def test_unusable_encoding_characters_are_refused(fs, enc):
    with pytest.raises(HL7ParseError) as e:
        delimiters_from(fs, enc)
    assert e.value.reason == "bad-encoding-characters"


def test_fewer_encoding_characters_still_parse():
    # HAPI's messages.txt declares '^~}' (no subcomponent separator): accepted, & is then plain text
    msg = parse_message(b"MSH|^~}|A|B|C|D|2020||ADT^A28|1|P|2.4\rPID|1||X&Y^^^H}I\r")
    assert msg.get("PID-3.1") == "X&Y"
    assert msg.delims.subcomponent == "" and msg.delims.escape == "}"


@pytest.mark.parametrize("bad", ["PID3", "pid-3", "PID-0", "PID-3.0", "PI-3", "PID-3[x]", "PID-3.1.2.3"])
def test_bad_accessor_paths_are_refused(bad):
    with pytest.raises(ValueError):
        compile_path(bad)


def test_accessor_path_parts():
    p = compile_path("OBX[2]-5[3].4.1")
    assert (p.segment, p.occurrence, p.field, p.repetition, p.component, p.subcomponent) == ("OBX", 2, 5, 3, 4, 1)
    assert compile_path("PID-3[*].1").repetition == 0


# -- escapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("a\\F\\b", "a|b"), ("a\\S\\b", "a^b"), ("a\\T\\b", "a&b"), ("a\\R\\b", "a~b"), ("a\\E\\b", "a\\b"),
    ("line\\.br\\next", "line\nnext"), ("\\.sp\\x", "\nx"), ("\\H\\bold\\N\\", "bold"),
    ("\\X41\\\\X42\\", "AB"), ("caf\\XC3A9\\", "caf\u00e9"), ("\\X0D0A\\", "\r\n"),
    ("\\C2842\\kanji\\C2B42\\", "\\C2842\\kanji\\C2B42\\"),       # charset escapes kept as written
    ("\\M2442\\x", "\\M2442\\x"), ("\\Zlocal\\", "\\Zlocal\\"), ("\\.in+4\\x", "\\.in+4\\x"),
    ("no end \\F", "no end \\F"), ("\\X4\\", "\\X4\\"), ("\\XZZ\\", "\\XZZ\\"), ("plain", "plain"),
])
def test_escape_sequences(text, expected):
    assert unescape(text, DEFAULT_DELIMITERS) == expected


def test_escapes_follow_the_declared_escape_character():
    d = delimiters_from("#", "$@/%")
    assert unescape("a/F/b/S/c/T/d/R/e/E/f", d) == "a#b$c%d@e/f"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=60))
def test_escaping_round_trips(text):
    assert unescape(hl7v2._ack_escape(text, DEFAULT_DELIMITERS), DEFAULT_DELIMITERS) == text


# -- character sets ------------------------------------------------------------------------


def test_latin1_declared_in_msh18():
    msg = parse_message(read("syntax-latin1.hl7"))
    assert msg.codec == "latin-1"
    assert msg.get("PID-5.1") == "M\u00fcller"


def test_undeclared_charset_is_utf8_else_latin1():
    base = "MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rPID|1||X||M\u00fcller\r"
    assert parse_message(base.encode("utf-8")).get("PID-5") == "M\u00fcller"
    assert parse_message(base.encode("latin-1")).get("PID-5") == "M\u00fcller"


def test_declared_charset_that_the_bytes_do_not_match_is_refused():
    raw = "MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5||||||UNICODE UTF-8\rPID|1||X||M\u00fcller\r".encode("latin-1")
    with pytest.raises(HL7ParseError) as e:
        parse_message(raw)
    assert e.value.reason == "bad-charset"
    assert "M\u00fcller" not in str(e.value)


def test_unknown_charset_is_refused():
    with pytest.raises(HL7ParseError) as e:
        parse_message(b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5||||||EBCDIC\rPID|1\r")
    assert e.value.reason == "unsupported-charset"


# -- messages that cannot be parsed --------------------------------------------------------


@pytest.mark.parametrize("raw, reason", [
    (b"PID|1||X\r", "no-msh"),
    (b"MSH|", "bad-msh"),
    (b"MSH|^^\\&|A\r", "bad-encoding-characters"),
    (b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rthis is not a segment\rPID|1\r", "bad-segment"),
    (b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rPID;1\r", "bad-segment"),
    (b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rMSH|^~\\&|A|B|C|D|2020||ADT^A28|2|P|2.5\r", "multiple-messages"),
    (b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rBHS|^~\\&\r", "bad-segment"),
])
def test_unparseable_messages_have_a_reason(raw, reason):
    with pytest.raises(HL7ParseError) as e:
        parse_message(raw)
    assert e.value.reason == reason


def test_message_limits():
    raw = b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rPID|1||" + b"X" * 500 + b"\r"
    with pytest.raises(HL7ParseError) as e:
        parse_message(raw, Limits(max_line_bytes=100))
    assert e.value.reason == "line-too-long"
    with pytest.raises(HL7ParseError) as e:
        parse_message(raw, Limits(max_message_bytes=100))
    assert e.value.reason == "message-too-large"


# -- framing -----------------------------------------------------------------------------------


def test_bom_and_mixed_terminators():
    units = frame_bytes(read("syntax-bom-mixed-terminators.hl7"))
    assert kinds(units) == [1, 2]
    first, second = units
    assert first.line == 1 and second.line == 6  # the A01 has 4 lines, then a blank line
    assert parse_message(first.data).message_type == "ADT^A01"
    assert parse_message(second.data).get("PV1-45") == "20240309163000+0100"


def test_batch_file_with_correct_envelope():
    units = frame_bytes(read("syntax-batch.hl7"))
    assert kinds(units) == [1, 2]
    assert [parse_message(u.data).message_type for u in units] == ["ORU^R01", "ADT^A01"]


@pytest.mark.parametrize("name, expected", [
    ("sample_batch.hl7", [1]),
    ("sample_batch1.hl7", [1, 2]),
    ("sample_file1.hl7", [1, 2, 3]),
    ("sample_file2.hl7", [1, 2]),          # FHS/FTS without BHS/BTS: an implicit batch
    ("sample_msh.hl7", [1]),
    ("sample_bad_batch.hl7", ["no-msh", "batch-count-mismatch"]),
    ("sample_bad_batch1.hl7", [1, "batch-structure", "no-msh", "batch-count-mismatch"]),
    ("sample_bad_file.hl7", ["no-msh", "batch-count-mismatch"]),
    ("sample_bad_file1.hl7", [1, "batch-structure", "no-msh", "batch-count-mismatch", "batch-count-mismatch"]),
    ("sample_bad_file2.hl7", [1, "batch-structure", "no-msh", "batch-structure", "batch-count-mismatch"]),
    ("sample_bad_file3.hl7", ["no-msh", "batch-count-mismatch"]),
])
def test_python_hl7_batch_and_bad_samples(name, expected):
    units = frame_bytes(read(f"python-hl7/{name}"))
    assert kinds(units) == expected
    for u in units:
        if isinstance(u, FramingProblem):
            assert u.line is not None and u.data  # where, and the bytes to quarantine


def test_mllp_dump_frames_junk_and_a_cut_frame():
    units = frame_bytes(read("syntax-mllp-dump.mllp"))
    assert kinds(units) == [1, "junk-between-frames", 2, "truncated-frame"]
    assert parse_message(units[0].data).message_type == "ADT^A01"
    assert parse_message(units[2].data).message_type == "VXU^V04"
    cut = units[3]
    assert cut.index == 3 and cut.data.startswith(b"MSH|") and cut.line is None


def test_text_that_is_not_hl7_and_segments_without_msh():
    data = b"/* a comment */\rMSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rPID|1\r\r// trailing\r"
    units = frame_bytes(data)
    assert kinds(units) == ["not-hl7", 1, "not-hl7"]
    assert units[1].data == b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rPID|1\r"
    assert kinds(frame_bytes(b"PID|1\rOBX|1\r")) == ["no-msh"]
    assert kinds(frame_bytes(b"")) == []


def test_a_raw_line_break_inside_a_message_refuses_it():
    data = b"MSH|^~\\&|A|B|C|D|2020||ORU^R01|1|P|2.5\rPID|1\rI|||bogus\rOBR|1\r"
    (unit,) = frame_bytes(data)
    assert unit.reason == "bad-segment" and unit.index == 1 and "line 3" in unit.message


def test_framing_limits():
    long_line = b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\rPID|1||" + b"X" * 5000 + b"\rPV1|1\r"
    (unit,) = frame_bytes(long_line, Limits(max_line_bytes=1000))
    assert unit.reason == "line-too-long" and unit.index == 1
    big = b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|1|P|2.5\r" + b"NTE|1||xxxxxxxxxx\r" * 200
    units = frame_bytes(big + b"MSH|^~\\&|A|B|C|D|2020||ADT^A28|2|P|2.5\rPID|1\r", Limits(max_message_bytes=1000))
    assert kinds(units) == ["message-too-large", 2]


def test_stream_framing_does_not_depend_on_block_boundaries(monkeypatch):
    data = read("syntax-bom-mixed-terminators.hl7") + read("syntax-batch.hl7") + read("python-hl7/sample_file1.hl7")
    whole = frame_bytes(data)
    monkeypatch.setattr(hl7v2_framing, "_BLOCK", 7)
    pieces = list(frame_stream(io.BytesIO(data)))
    assert [(type(u), getattr(u, "data", None), u.line) for u in pieces] == \
        [(type(u), getattr(u, "data", None), u.line) for u in whole]
    mllp = read("syntax-mllp-dump.mllp")
    assert kinds(frame_stream(io.BytesIO(mllp))) == kinds(frame_bytes(mllp))


# the shapes a plain message has, often, and each shape that must leave it to the line framer
_LINE_IDS = [b"PID", b"OBX", b"ZPD", b"Z01"] * 4 + [b"pid", b"P1D", b"1AB", b"AB", b"MSH", b"MSHX", b"FHS", b"BHS",
                                                   b"BTS", b"FTS", b"", b"   "]
_BODIES = [b"", b"|1|a^b~c\\d&e", b"^x", b"x", b" |y", b"|\xc3\xa9"]
_ENDS = [b"\r"] * 8 + [b"\n", b"\r\n", b"\r\r", b""]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fs=st.sampled_from([b"|", b"|", b"#", b"^", b"A", b" ", b"\xc0"]), bom=st.booleans(),
       lines=st.lists(st.tuples(st.sampled_from(_LINE_IDS), st.sampled_from(_BODIES), st.sampled_from(_ENDS)),
                      max_size=6),
       tail=st.sampled_from([b"\r", b"", b"\r\r", b"\n"]))
def test_the_fast_path_for_one_plain_message_per_frame_frames_as_the_line_framer_does(monkeypatch, fs, bom, lines,
                                                                                    tail):
    """Frames are mostly one message, CR-terminated: is_one_message recognises them and skips
    the line framer. For any frame, what comes out must be what the line framer makes, and
    is_one_message must say what the ONE_MESSAGE regex (its specification) says."""
    body = (hl7v2.BOM if bom else b"") + b"MSH" + fs + b"^~\\&" + fs + b"A" + fs + b"2.5"
    for seg, rest, end in lines:
        body += end + seg + rest.replace(b"|", fs)
    frame = body + tail
    mllp = b"\x0b" + frame + b"\x1c\rjunk\x0b" + frame + b"\x1c\r"

    fast = _framed(mllp)
    with monkeypatch.context() as m:
        _line_framer_only(m)
        assert _framed(mllp) == fast
    one = hl7v2_framing.is_one_message(frame)
    assert one == bool(hl7v2_framing.ONE_MESSAGE.fullmatch(frame))
    assert one == bool(hl7v2_framing.ONE_MESSAGE.fullmatch(body + tail))
    if one:
        assert [u[0] for u in fast] == ["RawMessage", "FramingProblem", "RawMessage"]


def test_the_fast_path_frames_every_second_line_as_the_line_framer_does(monkeypatch):
    """Every shape of one line after the MSH, each terminator and ending, each separator."""
    frames = [b"MSH" + fs + b"^~\\&" + fs + b"A" + end + seg + rest.replace(b"|", fs) + tail
              for fs in (b"|", b"#", b"A", b" ", b"\xc0") for seg in dict.fromkeys(_LINE_IDS) for rest in _BODIES
              for end in dict.fromkeys(_ENDS) for tail in (b"\r", b"", b"\r\r", b"\n")]
    mllp = b"".join(b"\x0b" + f + b"\x1c\r" for f in frames)
    fast = _framed(mllp)
    ones = [hl7v2_framing.is_one_message(f) for f in frames]
    assert ones == [bool(hl7v2_framing.ONE_MESSAGE.fullmatch(f)) for f in frames]
    assert sum(ones) > 100  # the fast path ran
    asked = _line_framer_only(monkeypatch)
    assert _framed(mllp) == fast
    assert len(asked) == len(frames)


def _line_framer_only(monkeypatch) -> list[bytes]:
    """Send every frame through the line framer; the frames asked about are listed, which
    shows that the compiled module saw the stand-in."""
    asked: list[bytes] = []

    def never(data: bytes) -> bool:
        asked.append(data)
        return False

    monkeypatch.setattr(hl7v2_framing, "_one_message", never)
    return asked


def _framed(data: bytes) -> list[tuple]:
    return [(type(u).__name__, *(getattr(u, f) for f in ("data", "index", "line", "offset", "end")),
             getattr(u, "reason", None), getattr(u, "message", None)) for u in frame_bytes(data)]


def test_the_fast_path_takes_the_common_frames():
    assert hl7v2_framing.is_one_message(read("twin-oru-r01.hl7").replace(b"\n", b"\r"))
    for frame in (b"MSH|^~\\&|A\rPID|1\r\r", b"MSH|^~\\&|A\nPID|1\n", b"MSH|^~\\&|A\rMSH|^~\\&|B\r",
                  b"MSH|^~\\&|A\rPID|1\rI|||x\r", b"\xef\xbb\xbfMSH|^~\\&|A\r", b"BHS|^~\\&\rMSH|^~\\&|A\r"):
        assert not hl7v2_framing.is_one_message(frame), frame
        assert not hl7v2_framing.ONE_MESSAGE.fullmatch(frame), frame


def test_stream_memory_follows_the_message_not_the_file(monkeypatch):
    monkeypatch.setattr(hl7v2_framing, "_BLOCK", 1 << 16)
    one = read("twin-oru-r01.hl7")
    data = one * 4000  # ~5 MB
    tracemalloc.start()
    count = 0
    for unit in frame_stream(io.BytesIO(data)):
        count += isinstance(unit, RawMessage)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 4000
    assert peak < 1 << 20, f"peak {peak} bytes for a {len(data)}-byte stream"


def test_mllp_decoder_byte_by_byte_equals_whole():
    data = b"junk\x0bMSH|A\r\x1c\r\x0bMSH|B\r\x1c\x0bMSH|C\r\x0bMSH|D\r\x1c\r\x0bMSH|E"
    whole = MLLPDecoder()
    expected = whole.feed(data) + whole.close()
    dec = MLLPDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    got += dec.close()
    assert [(k, d) for k, d, _ in got] == [(k, d) for k, d, _ in expected] == [
        ("junk", b"junk"), ("frame", b"MSH|A\r"), ("frame", b"MSH|B\r"), ("truncated", b"MSH|C\r"),
        ("frame", b"MSH|D\r"), ("truncated", b"MSH|E")]


def test_mllp_decoder_end_split_from_its_cr():
    """0x1C and its 0x0D in two reads: the CR is no junk."""
    dec = MLLPDecoder()
    events = dec.feed(b"\x0bMSH|A\x1c") + dec.feed(b"\r\x0bMSH|B\x1c\r") + dec.close()
    assert [(k, d) for k, d, _ in events] == [("frame", b"MSH|A"), ("frame", b"MSH|B")]
    dec = MLLPDecoder()  # junk split over reads is one junk event, blanks and all
    events = dec.feed(b"ab ") + dec.feed(b"\r\n") + dec.feed(b" cd\x0bMSH|C\x1c\r") + dec.close()
    assert [(k, d) for k, d, _ in events] == [("junk", b"ab \r\n cd"), ("frame", b"MSH|C")]


def test_mllp_decoder_oversized_frame():
    dec = MLLPDecoder(max_frame=10)
    events = dec.feed(b"\x0b" + b"M" * 50 + b"\x1c\r\x0bMSH|ok\x1c\r")
    assert [k for k, _, _ in events] == ["too-large", "frame"]


# -- hostile input ----------------------------------------------------------------------------

_SEEDS = [read("twin-oru-r01.hl7"), read("python-hl7/sample_file1.hl7"), read("syntax-mllp-dump.mllp")]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.sampled_from([b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\x0b", b"\x1c", b"MSH|",
                                      b"\\X", b"\xff\xfe", b"BHS|^~\\&", b"\x00", b"\\.br\\"]))
        if op == "insert":
            data[pos:pos] = chunk
        elif op == "delete":
            del data[pos:pos + len(chunk)]
        else:
            data[pos:pos + len(chunk)] = chunk
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=400), mutated()))
def test_framing_and_parsing_never_crash(data):
    units = frame_bytes(data)
    for u in units:
        assert isinstance(u, RawMessage | FramingProblem)
        if isinstance(u, RawMessage):
            try:
                msg = parse_message(u.data)
            except HL7ParseError as e:
                assert e.reason
            else:
                for seg in msg.segments:
                    for n in range(1, min(len(seg), 8)):
                        msg.get(f"{seg[0]}-{n}")
                        msg.get_all(f"{seg[0]}-{n}.1")
    with contextlib.suppress(HL7ParseError):
        parse_message(data)
    for strict in (False, True):  # mapping never raises either, and refusals say why
        out = map_message(data, "fuzz", strict=strict)
        assert out.ack_code in ("AA", "AE", "AR") and (out.rejected is None or out.rejected.reason)
