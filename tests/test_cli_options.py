"""The options every command shares: where the store is and how loud the log is, wherever they are written."""

from __future__ import annotations

import logging

import pytest

from pipeline.cli import build_parser
from pipeline.cli import main as twin
from tests.conftest import FIXTURES

PATIENTS = str(FIXTURES / "fhir" / "bulk" / "Patient.000.ndjson")


@pytest.mark.parametrize("args", [
    ["--store", "{s}", "import", "fhir", PATIENTS],
    ["import", "fhir", PATIENTS, "--store", "{s}"],
    ["import", "--store", "{s}", "fhir", PATIENTS],
])
def test_store_before_or_after_the_command_is_the_store_written(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # a store written to ./twinstore would show here
    monkeypatch.delenv("TWIN_STORE", raising=False)
    assert twin([a.format(s=tmp_path / "chosen") for a in args]) == 0
    assert (tmp_path / "chosen").is_dir() and not (tmp_path / "twinstore").exists()
    assert twin(["status", "--store", str(tmp_path / "chosen")]) == 0


def test_without_store_twin_store_then_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWIN_STORE", str(tmp_path / "from-env"))
    assert twin(["import", "fhir", PATIENTS]) == 0
    assert (tmp_path / "from-env").is_dir() and not (tmp_path / "twinstore").exists()
    monkeypatch.delenv("TWIN_STORE")
    assert twin(["import", "fhir", PATIENTS]) == 0
    assert (tmp_path / "twinstore").is_dir()


def test_verbosity_and_log_format_before_the_command_are_kept():
    args = build_parser().parse_args(["-vv", "--log-format", "json", "status"])
    assert args.verbose == 2 and args.log_format == "json" and args.store is None
    args = build_parser().parse_args(["status", "-v"])
    assert args.verbose == 1 and args.log_format == "text"
    args = build_parser().parse_args(["--store", "a", "status"])
    assert args.store == "a"


def test_verbose_before_the_command_logs_at_debug(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert twin(["-vv", "--store", str(tmp_path / "s"), "status"]) in (0, 2)
    assert logging.getLogger().level == logging.DEBUG


@pytest.mark.parametrize(("kind", "flag", "value"), [
    ("fhir", "--patient-id", "p1"), ("hl7v2", "--patient-system", "urn:x"), ("fhir", "--format", "faros"),
    ("hl7v2", "--timezone", "UTC"),
    ("csv", "--strict", None), ("dicom", "--downsample", "1min"), ("csv", "--patient-rule", "patient_id=x"),
])
def test_an_option_of_another_kind_is_refused_not_ignored(tmp_path, capsys, kind, flag, value):
    args = ["import", kind, str(FIXTURES), flag, *([value] if value else []), "--store", str(tmp_path / "s")]
    assert twin(args) == 2
    err = capsys.readouterr().err
    assert f"do not apply to {kind} imports" in err and flag in err
    assert not (tmp_path / "s").exists()  # refused before anything is written


@pytest.mark.parametrize("args", [["fetch", "dicomweb", "http://127.0.0.1:9/dicom-web", "--since", "last week"],
                                  ["fetch", "fhir", "http://127.0.0.1:9/fhir", "--since", "2024-13-45"],
                                  ["build", "--as-of", "yesterday"]])
def test_a_bad_date_option_is_a_usage_error_not_an_internal_error(tmp_path, capsys, args):
    assert twin([*args, "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "not a date or date-time" in err and "internal error" not in err


def test_a_reader_that_goes_away_is_not_an_internal_error(tmp_path):
    # `twin quarantine list | head`: the pipe closes early; the command still ends with its own code
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "status", "--store", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "internal error" not in err and "Traceback" not in err


def test_import_help_says_the_command_line_ids_win_over_the_files():
    # they override ids found in the files (test_devices: command-line ids win); "when the
    # files do not say" had a user expect the file's ids to be kept
    text = " ".join(next(a for a in build_parser()._subparsers._group_actions[0].choices["import"]._actions
                         if "--patient-id" in a.option_strings).help.split())
    assert "wins over" in text
