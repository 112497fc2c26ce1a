"""Log formatting that keeps patient data out of tracebacks (docs/privacy-logs.md).

Twinline's own messages name locators (file and line, message control id, SOP
Instance UID), never values. Exception texts of libraries are another matter: pyarrow
says "Could not convert '<the value>' with type str", pydicom quotes invalid values, a
KeyError prints its key. A traceback in a log (`log.exception`, `-vv`) would carry that
text into files that are kept, mailed and pasted into tickets. So the formatters here
print a traceback's frames (file, line, function, source line: all code) and each
exception's type, but its message only when the exception is one whose text Twinline
wrote or whose text speaks of code (a missing attribute or module).

`twin` installs these on its log handler; a program that runs the pipeline as a library
(an Airflow task, say) can do the same with `install()`.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from pathlib import Path
from types import TracebackType

from .errors import TwinlineError

# Exceptions whose text is about code, not data: kept in tracebacks.
_TEXT_ABOUT_CODE = (TwinlineError, AttributeError, NameError, ImportError, NotImplementedError, RecursionError,
                    MemoryError)

WITHHELD = "(message withheld: it may quote input values)"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def exception_text(e: BaseException) -> str:
    """`Type: message` when the message is safe to log, else `Type (message withheld ...)`."""
    name = f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins.")
    if isinstance(e, _TEXT_ABOUT_CODE):
        text = str(e)
        return f"{name}: {text}" if text else name
    return f"{name} {WITHHELD}"


def redacted_traceback(e: BaseException) -> str:
    """A traceback like Python's, chained causes included, with messages only where `exception_text` keeps them."""
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    link: str | None = None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append((cur, link))
        if cur.__cause__ is not None:
            cur, link = cur.__cause__, "The above exception was the direct cause of the following exception:"
        elif cur.__context__ is not None and not cur.__suppress_context__:
            cur, link = cur.__context__, "During handling of the above exception, another exception occurred:"
        else:
            cur = None
    parts: list[str] = []
    for exc, link in reversed(chain):
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(exc.__traceback__))
        parts.append(exception_text(exc) + "\n")
        if link:
            parts.append(f"\n{link}\n\n")
    return "".join(parts).rstrip("\n")


class RedactingFormatter(logging.Formatter):
    """A text formatter whose tracebacks carry no exception messages that could quote values."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return redacted_traceback(ei[1]) if ei and ei[1] is not None else ""

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - frames only: code, not data
        return stack_info


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an exception adds its type (and its text where that is safe)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            doc["error"] = e.__class__.__name__
            doc["error_text"] = exception_text(e)
        return json.dumps(doc)


# Libraries whose log messages quote the values they read: pydicom logs every validation
# warning ("Invalid value for VR DA: '<the value>'") as well as warning it.
QUOTING_LOGGERS = ("pydicom",)


class WithholdQuotingLibraries(logging.Filter):
    """Replace the text of records from `QUOTING_LOGGERS` with where they were logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in QUOTING_LOGGERS:
            record.msg = f"{WITHHELD} at {record.filename}:{record.lineno}"
            record.args = None
        return True


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_warn_log = logging.getLogger("py.warnings")


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` that logs where a library warned, not what it said.

    pydicom warns "Invalid value for VR DA: '<the value>'"; Twinline's own warnings
    and those about code (deprecations) keep their text.
    """
    ours = str(Path(filename).resolve()).startswith(_PACKAGE_DIR)
    about_code = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning))
    text = str(message) if ours or about_code else WITHHELD
    _warn_log.warning("%s at %s:%s: %s", category.__name__, Path(filename).name, lineno, text)


def install(level: int = logging.INFO, *, json_lines: bool = False, stream=None) -> logging.Handler:
    """Log to stderr (or `stream`) at `level` through a redacting formatter; returns the handler.

    Python warnings are logged through `show_warning` from then on.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(WithholdQuotingLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    warnings.showwarning = show_warning
    return handler
