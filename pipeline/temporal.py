"""FHIR dates and times, kept honest.

FHIR allows `2020`, `2020-05`, `2020-05-17`, and date-times with or without an offset.
The twin stores each as a UTC instant (the start of the period the precision allows),
the precision, and the offset as written, so that nothing is invented and nothing is
lost (ARCHITECTURE.md, "Column names are snake_case...").
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from .errors import ConfigError

PRECISIONS = ("year", "month", "day", "minute", "second", "millisecond")


class BadTemporal(ValueError):
    """The text is not a FHIR date, dateTime or instant."""


def parse_fhir_datetime(text: Any) -> tuple[datetime, str, str | None]:
    """Return (UTC instant, precision, offset as written or None).

    A value without an offset (a date, or a dateTime the source wrote without one) is
    read as UTC and its offset is None: the source did not say, and we do not guess.
    Raises BadTemporal for anything else; the message never quotes the value.
    """
    if not isinstance(text, str):
        raise BadTemporal(f"expected a date or dateTime string, got {type(text).__name__}")
    return _parse(text)


@lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[datetime, str, str | None]:
    """Cached: a message repeats its times (every OBX of an ORU its OBX-14, the OBR its
    OBR-7), and the result is immutable. Refusals are not cached (they raise)."""
    n = len(text)
    try:
        if n == 4:
            return datetime(int(text), 1, 1, tzinfo=UTC), "year", None
        if n == 7 and text[4] == "-":
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC), "month", None
        if n == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC), "day", None
        if n < 16 or text[10] != "T":
            raise BadTemporal("not a FHIR date or dateTime")
        dt = datetime.fromisoformat(text)
    except BadTemporal:
        raise
    except (ValueError, OverflowError):
        raise BadTemporal("not a FHIR date or dateTime") from None
    if dt.year < 1:
        raise BadTemporal("year out of range")
    body = text[11:]
    if body[-1] == "Z" or "+" in body or "-" in body:
        off = dt.utcoffset() or timedelta(0)
        offset = _format_offset(off)
        dt = dt.astimezone(UTC)
    else:
        offset = None
        dt = dt.replace(tzinfo=UTC)
    if dt.microsecond:
        precision = "millisecond"
    elif len(body) >= 8 and body[5] == ":":
        precision = "second"
    else:
        precision = "minute"
    return dt, precision, offset


def _format_offset(off: timedelta) -> str:
    minutes = int(off.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_instant_arg(text: str) -> datetime:
    """A time given on the command line or in a config (`--as-of`, `--since`).

    Accepts a date or a dateTime; without an offset it is UTC. A bad value is the user's
    to fix (ConfigError, exit 2): a ValueError surfaced as an "internal error, please
    report it" with exit 1, which a scheduler reads as a bug rather than a bad option.
    """
    try:
        return parse_fhir_datetime(text)[0]
    except BadTemporal:
        raise ConfigError(f"not a date or date-time: {text!r} (use e.g. 2024-05-01 or 2024-05-01T12:00:00Z)") from None


__all__ = ["BadTemporal", "PRECISIONS", "parse_fhir_datetime", "parse_instant_arg", "utc_now"]
