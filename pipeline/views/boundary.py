"""lowBoundary() / highBoundary(): the range a value of limited precision stands for.

FHIRPath (continuous build, "lowBoundary") defines them for decimals, dates, dateTimes,
times and, in SQL-on-FHIR, Periods. `1.0` stands for [0.95, 1.05]; `1970-06` for
[1970-06-01, 1970-06-30]; a dateTime without a zone spans every zone, so its low
boundary takes +14:00 and its high boundary -12:00.

Decimals arrive as Python floats (orjson), so the precision is that of their shortest
spelling: `1.50` in the JSON is read as `1.5`. Results are floats and ISO strings, like
every other value the views produce.
"""

from __future__ import annotations

import calendar
import re
from decimal import Decimal, InvalidOperation
from typing import Any

_DATETIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?)?)?)?"
    r"(Z|[+\-]\d{2}:\d{2})?$"
)
_TIME = re.compile(r"(\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?$")


def low(v: Any, t: str | None, precision: int | None = None) -> Any:
    return _boundary(v, t, precision, high=False)


def high(v: Any, t: str | None, precision: int | None = None) -> Any:
    return _boundary(v, t, precision, high=True)


def _boundary(v: Any, t: str | None, precision: int | None, high: bool) -> Any:
    kind = type(v)
    if kind is int or kind is float:
        return v if t in ("integer", "positiveInt", "unsignedInt") else _decimal(v, precision, high)
    if kind is str:
        if t == "time" or (t is None and _TIME.match(v)):
            return _time(v, high)
        if t == "date" or (t is None and "T" not in v):
            return _date(v, high)
        return _datetime(v, high)
    if kind is dict:
        if "start" in v or "end" in v:  # a Period
            edge = v.get("end" if high else "start")
            return _datetime(edge, high) if type(edge) is str else None
        q = v.get("value")
        if type(q) in (int, float):  # a Quantity: the same unit, the value's boundary
            return {**v, "value": _decimal(q, precision, high)}
    return None


def _decimal(v: float, precision: int | None, high: bool) -> float | None:
    try:
        d = Decimal(repr(v)) if type(v) is float else Decimal(v)
    except InvalidOperation:  # pragma: no cover - JSON has no inf / nan
        return None
    exp = d.as_tuple().exponent
    if not isinstance(exp, int):  # pragma: no cover
        return None
    half = Decimal(5).scaleb(exp - 1)
    b = d + half if high else d - half
    if precision is not None:
        b = b.quantize(Decimal(1).scaleb(-precision), rounding="ROUND_FLOOR" if not high else "ROUND_CEILING")
    return float(b)


def _fraction(frac: str | None, high: bool) -> str:
    frac = frac or ""
    return (frac + ("9" if high else "0") * 3)[:max(3, len(frac))]


def _date(v: str, high: bool) -> str | None:
    m = _DATETIME.match(v)
    if m is None or m.group(4) is not None:
        return _datetime(v, high) if m else None
    y, mo, d = m.group(1), m.group(2), m.group(3)
    mo = mo or ("12" if high else "01")
    if d is None:
        d = f"{calendar.monthrange(int(y), int(mo))[1]:02d}" if high else "01"
    return f"{y}-{mo}-{d}"


def _datetime(v: str, high: bool) -> str | None:
    m = _DATETIME.match(v)
    if m is None:
        return None
    y, mo, d, hh, mm, ss, frac, tz = m.groups()
    try:
        mo = mo or ("12" if high else "01")
        if d is None:
            d = f"{calendar.monthrange(int(y), int(mo))[1]:02d}" if high else "01"
    except (ValueError, calendar.IllegalMonthError):
        return None
    hh = hh or ("23" if high else "00")
    mm = mm or ("59" if high else "00")
    ss = ss or ("59" if high else "00")
    tz = tz or ("-12:00" if high else "+14:00")
    return f"{y}-{mo}-{d}T{hh}:{mm}:{ss}.{_fraction(frac, high)}{tz}"


def _time(v: str, high: bool) -> str | None:
    m = _TIME.match(v)
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()
    mm = mm or ("59" if high else "00")
    ss = ss or ("59" if high else "00")
    return f"{hh}:{mm}:{ss}.{_fraction(frac, high)}"
