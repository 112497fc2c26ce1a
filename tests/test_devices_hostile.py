"""Hostile device logs: every bad line becomes a Rejected with its file and line, nothing crashes,
nothing is lost (data lines = units + rejected), and no value leaks into a message."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.connectors.csv_files import MAX_LINE, read_csv_logs
from pipeline.errors import ConfigError
from tests.test_devices_support import DEVICELY, FIX, Outcome, line_no, run

HEADER = "time,patient_id,device_id,hr,spo2"
GOOD = "2024-01-01T00:00:{:02d}Z,p1,d1,{},97"
REASONS = {"ragged-row", "not-text", "line-too-long", "bad-timestamp", "not-a-number", "unknown-parameter",
           "unknown-code", "value-out-of-limits"}


def vitals(tmp_path: Path, *lines: str | bytes, name: str = "log.csv") -> Path:
    f = tmp_path / name
    body = [line.encode() if isinstance(line, str) else line for line in (HEADER, *lines)]
    f.write_bytes(b"\n".join(body) + b"\n")
    return f


def by_line(out: Outcome) -> dict[int, str]:
    return {line_no(r): r.reason for r in out.rejected}


def test_ragged_lines_are_rejected_with_their_line_and_bytes(tmp_path):
    f = vitals(tmp_path, GOOD.format(0, 70), "2024-01-01T00:00:01Z,p1,d1", GOOD.format(2, 71),
               "2024-01-01T00:00:03Z,p1,d1,72,97,extra", GOOD.format(4, 73))
    out = run([f])
    assert by_line(out) == {3: "ragged-row", 5: "ragged-row"}
    assert out.rejected[0].payload == b"2024-01-01T00:00:01Z,p1,d1"
    assert out.rejected[0].source_ref == f"{f}:3" and out.rejected[0].stage == "map"
    assert out.lines == 5 and out.code("8867-4").column("value_number").to_pylist() == [70, 71, 73]


def test_binary_junk_is_cut_out_and_the_lines_after_keep_their_numbers(tmp_path):
    junk = b"\xff\xfe\x00\x81garbage,\xc3\x28"
    f = vitals(tmp_path, GOOD.format(0, 70), junk, b"2024-01-01T00:00:02Z,p1,d1,\xff\xff,97", GOOD.format(3, 71))
    out = run([f])
    assert by_line(out) == {3: "not-text", 4: "not-text"}
    assert out.rejected[0].payload == junk
    assert out.lines == 4 and out.code("8867-4").num_rows == 2


def test_a_huge_field_is_rejected_and_reading_goes_on(tmp_path):
    f = vitals(tmp_path, GOOD.format(0, 70), "2024-01-01T00:00:01Z,p1,d1," + "9" * (2 * MAX_LINE) + ",97",
               GOOD.format(2, 71))
    out = run([f])
    assert by_line(out) == {3: "line-too-long"}
    assert len(out.rejected[0].payload) <= 64 * 1024
    assert out.code("8867-4").column("value_number").to_pylist() == [70, 71]


def test_impossible_timestamps_and_values(tmp_path):
    f = vitals(tmp_path,
               "2024-13-45T99:00:00Z,p1,d1,70,97",  # 2: no such date
               ",p1,d1,70,97",  # 3: no time
               "1800-01-01T00:00:00Z,p1,d1,70,97",  # 4: out of range
               "2024-01-01T00:00:04Z,p1,d1,fast,97",  # 5: not a number
               "2024-01-01T00:00:05Z,p1,d1,999,97",  # 6: beyond physical limits
               "2024-01-01T00:00:06Z,p1,d1,241,97",  # 7: implausible: kept
               "yesterday,p1,d1,999,x")  # 8: three problems at once
    out = run([f])
    assert by_line(out) == {2: "bad-timestamp", 3: "bad-timestamp", 4: "bad-timestamp", 5: "not-a-number",
                            6: "value-out-of-limits", 8: "bad-timestamp"}
    last = out.rejected[-1].message
    assert "time" in last and "hr" in last and "spo2" in last
    assert out.lines == 7
    kept = out.code("8867-4")
    assert kept.column("value_number").to_pylist() == [241] and kept.column("quality_flag").to_pylist() == ["implausible"]
    assert out.code("59408-5").num_rows == 1  # a rejected line gives none of its values


def test_messages_name_fields_not_values(tmp_path):
    f = vitals(tmp_path, "2024-01-01T00:00:00Z,p1,d1,SECRET-VALUE,97", "2024-01-01T00:00:01Z,p1,d1,31337,97",
               "SECRET-TIME,p1,d1,70,97", "2024-01-01T00:00:03Z,p1,SECRET-DEVICE")
    out = run([f])
    assert len(out.rejected) == 4
    for r in out.rejected:
        assert "SECRET" not in r.message and "31337" not in r.message and "p1" not in r.message


def test_blank_lines_crlf_bom_and_quotes(tmp_path):
    f = tmp_path / "log.csv"
    f.write_bytes(b'\xef\xbb\xbftime,patient_id,device_id,hr,spo2\r\n'
                  b'2024-01-01T00:00:00Z,"p1",d1,70,97\r\n'
                  b'\r\n'
                  b',,,,\r\n'
                  b'"2024-01-01T00:00:03Z","p,1",d1,"71",97\r\n'
                  b'2024-01-01T00:00:04Z,p1,d1,bad,97\r\n')
    out = run([f])
    assert by_line(out) == {6: "not-a-number"}  # blank lines are not units, but they are counted in line numbers
    assert out.lines == 3
    assert sorted(set(out.obs.column("patient_id").to_pylist())) == ["p,1", "p1"]


def test_long_layout_unknown_parameters_and_codes(tmp_path):
    f = tmp_path / "140002.txt"
    f.write_text("Time,Parameter,Value\n00:00,RecordID,140002\n00:00,Gender,7\n00:05,HR,80\n00:06,Mystery,3\n"
                 "00:07,HR,-1\n25:61,HR,80\n00:09,HR,\n")
    out = run([f])
    assert by_line(out) == {3: "unknown-code", 5: "unknown-parameter", 7: "bad-timestamp"}
    assert out.lines == 7 and out.code("8867-4").num_rows == 1  # -1 and blank are missing


def test_a_bad_preamble_rejects_the_file_once(tmp_path):
    d = tmp_path / "session"
    d.mkdir()
    (d / "HR.csv").write_text("1551453311.000000\n1.000000\n88\n")
    (d / "TEMP.csv").write_text("1551453301.000000\n0\n23.5\n")  # a rate of 0 Hz
    out = run([d])
    assert out.code("8867-4").num_rows == 1
    assert [(r.stage, r.reason) for r in out.rejected] == [("read", "bad-preamble")]
    assert "sample rate" in out.rejected[0].message


def test_junk_files_are_unknown_without_format_and_rejected_with_it(tmp_path):
    f = tmp_path / "junk.csv"
    f.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ConfigError):
        list(read_csv_logs([str(f)]))
    out = run([f], format="twinline-vitals")
    assert [(r.stage, r.reason) for r in out.rejected] == [("read", "missing-column")]


def test_spacelabs_with_a_broken_reading(tmp_path):
    src = (DEVICELY / "spacelabs" / "spacelabs.abp").read_bytes()
    f = tmp_path / "x.abp"
    f.write_bytes(src.replace(b"17,31,154,116", b"25,31,154,116").replace(b"17,34,149,119", b"17,34,149"))
    out = run([f])
    assert by_line(out) == {60: "bad-timestamp", 61: "ragged-row"}
    assert out.lines == 15


def test_truncated_and_empty_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "tags.csv").write_bytes(b"")
    assert run([tmp_path / "empty"]).units == []
    f = vitals(tmp_path, "2024-01-01T00:00:00Z,p1,d1,7", name="cut.csv")
    f.write_bytes(f.read_bytes().rstrip(b"\n"))  # no newline at the end, a field cut short
    out = run([f])
    assert by_line(out) == {2: "ragged-row"}


# --------------------------------------------------------------------------- property: never crash, never lose

FIELD = st.one_of(st.integers(-100_000, 100_000).map(str), st.sampled_from(["", "NaN", "-1", "1e309", "0x10", " 7 "]),
                  st.text(alphabet=st.characters(blacklist_characters='\n\r"', blacklist_categories=("Cs",)),
                          max_size=12))
TIME = st.one_of(st.integers(0, 59).map(lambda s: f"2024-01-01T00:00:{s:02d}Z"), st.text(max_size=8).filter(
    lambda t: "\n" not in t and "\r" not in t and '"' not in t))
LINE = st.one_of(
    st.tuples(TIME, FIELD, FIELD, FIELD, FIELD).map(lambda t: ",".join(t)),
    st.lists(FIELD, max_size=8).map(",".join),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b and b'"' not in b),
)


def blank(line: str | bytes) -> bool:
    raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark at a line's start is nothing, anywhere
    return raw == b"" or raw == b"," * (HEADER.count(","))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, max_size=25))
def test_any_lines_reconcile_and_never_crash(tmp_path_factory, lines):
    d = tmp_path_factory.mktemp("fuzz")
    f = vitals(d, *lines)
    out = run([f], format="twinline-vitals", chunk_rows=4)
    expected = sum(not blank(line) for line in lines)
    assert out.lines == expected, (out.reasons(), lines)
    assert set(out.reasons()) <= REASONS
    for r in out.rejected:
        assert 2 <= line_no(r) <= len(lines) + 1 and r.source_ref.startswith(str(f))
    values = out.obs.column("value_number") if out.observations else None
    if values is not None and len(values):
        assert pc.all(pc.is_finite(values)).as_py()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000))
def test_random_bytes_as_a_spacelabs_body_never_crash(tmp_path_factory, body):
    d = tmp_path_factory.mktemp("abp")
    f = d / "x.abp"
    preamble = (DEVICELY / "spacelabs" / "spacelabs.abp").read_bytes().split(b"\r\n")[:51]
    f.write_bytes(b"\r\n".join(preamble) + b"\r\n" + body)
    out = run([f])
    assert set(out.reasons()) <= REASONS
    assert all(r.stage == "map" for r in out.rejected)


def test_a_byte_order_mark_mid_file_is_nothing_wherever_the_line_is(tmp_path):
    # pyarrow drops one at the start of the body; files pasted together have one mid-file
    bom = b"\xef\xbb\xbf"
    for lines in ([bom, GOOD.format(1, 70)], [GOOD.format(1, 70), bom], [GOOD.format(1, 70), bom + GOOD.format(2, 71).encode()],
                  [bom + GOOD.format(1, 70).encode(), bom + b"x"]):
        out = run([vitals(tmp_path, *lines)], format="twinline-vitals")
        assert out.lines == sum(not blank(line) for line in lines), lines
    assert by_line(out) == {3: "ragged-row"} and len(out.obs) == 2  # heart rate and SpO2 of the one good line


def test_quarantined_lines_keep_the_file_and_line_of_the_linked_fixture_after_edits(tmp_path):
    lines = (FIX / "linked" / "vitals.csv").read_text().splitlines()
    lines[10] = lines[10].replace(",bedside-monitor-7,", ",bedside-monitor-7,x")
    f = tmp_path / "edited.csv"
    f.write_text("\n".join(lines) + "\n")
    out = run([f])
    assert by_line(out) == {11: "not-a-number"} and out.lines == 60


def test_a_file_over_the_size_limit_is_one_rejection_and_not_read(tmp_path, monkeypatch):
    import pipeline.connectors.csv_files as csv_files

    f = vitals(tmp_path, *(GOOD.format(i, 70 + i) for i in range(20)))
    monkeypatch.setattr(csv_files, "MAX_FILE", f.stat().st_size - 1)
    out = run([f])
    assert [(r.reason, r.source_ref) for r in out.rejected] == [("file-too-large", str(f))]
    assert not out.observations


def test_a_device_or_pipe_named_as_a_log_is_refused_before_reading(tmp_path):
    import os

    fifo = tmp_path / "feed.csv"
    os.mkfifo(fifo)  # reading it would block for ever
    with pytest.raises(ConfigError) as e:
        list(read_csv_logs([str(fifo)]))
    assert "not a regular file" in str(e.value.problems)
