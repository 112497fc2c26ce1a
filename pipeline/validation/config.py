"""The gate's configuration: config/gate.toml, a user's file laid over it, and the reference population.

A configuration mistake is fatal and should be fixed in one go, so loading collects
every problem (unknown keys with a suggestion, wrong types, values out of range, a bad
reference file line) with its key path or file:line, and raises one ConfigError.
"""

from __future__ import annotations

import csv
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..resources import config_dir
from .checks import KINDS

SEVERITIES = ("error", "warn")

# --------------------------------------------------------------------------- the value types


@dataclass(frozen=True)
class CheckConfig:
    enabled: bool = True
    severity: str = "error"
    threshold: float = 0.0
    quarantine: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dimension:
    """A demographic attribute of a patient: a column of the patient table, or age bands from birth_date."""

    name: str
    column: str
    unknown: frozenset[str] = frozenset()
    bands: tuple[int, ...] = ()

    @property
    def band_labels(self) -> tuple[str, ...]:
        b = self.bands
        return tuple(f"{lo}-{hi - 1}" for lo, hi in zip(b, b[1:], strict=False)) + ((f"{b[-1]}+",) if b else ())


@dataclass(frozen=True)
class Measure:
    name: str
    table: str
    codes: frozenset[str] | None = None
    require: str | None = None


@dataclass(frozen=True)
class ReferenceGroup:
    dimension: str
    group: str
    codes: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class BiasConfig:
    reference_path: str
    reference: tuple[ReferenceGroup, ...]
    min_group_size: int
    suppress_below: int
    ratio_low: float
    ratio_high: float
    dimensions: Mapping[str, Dimension]
    measures: Mapping[str, Measure]
    coverage_dimensions: tuple[str, ...]
    device_mix: tuple[tuple[str, str], ...]

    def reference_for(self, dimension: str) -> list[ReferenceGroup]:
        return [g for g in self.reference if g.dimension == dimension]


@dataclass(frozen=True)
class SexCode:
    sex: str
    table: str
    system: str
    code: str | None
    prefix: str | None
    display: str


@dataclass(frozen=True)
class GateConfig:
    checks: Mapping[str, CheckConfig]
    overrides: Mapping[str, Mapping[str, CheckConfig]]
    code_lists: Mapping[str, frozenset[str]]
    references_extra: tuple[tuple[str, str, str, str], ...]
    references_exclude: frozenset[str]
    loinc: Mapping[str, Mapping[str, tuple[float, float]]]  # code -> unit -> (low, high)
    loinc_display: Mapping[str, str]
    sex_specific: tuple[SexCode, ...]
    bias: BiasConfig
    source: str
    examples: int = 5  # [report] examples: locators of failing rows shown per check

    def check(self, kind: str, table: str | None = None, column: str | None = None) -> CheckConfig:
        """The settings for `kind`, with the most specific override (table.column, then table) applied."""
        over = self.overrides.get(kind, {})
        if table and column and f"{table}.{column}" in over:
            return over[f"{table}.{column}"]
        if table and table in over:
            return over[table]
        return self.checks[kind]


# --------------------------------------------------------------------------- a small spec language


class _Spec:
    def check(self, value: Any, path: str, problems: list[str]) -> None:
        raise NotImplementedError


class _Num(_Spec):
    def __init__(self, lo: float | None = None, hi: float | None = None, integer: bool = False):
        self.lo, self.hi, self.integer = lo, hi, integer

    def check(self, value, path, problems):
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            problems.append(f"{path}: expected {'an integer' if self.integer else 'a number'}, got {_tname(value)}")
        elif (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            problems.append(f"{path}: {value} is outside [{self.lo}, {self.hi if self.hi is not None else '...'}]")


class _Bool(_Spec):
    def check(self, value, path, problems):
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_tname(value)}")


class _Str(_Spec):
    def __init__(self, choices: tuple[str, ...] | None = None):
        self.choices = choices

    def check(self, value, path, problems):
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_tname(value)}")
        elif self.choices is not None and value not in self.choices:
            problems.append(f"{path}: {value!r} is not one of {', '.join(self.choices)}")


class _List(_Spec):
    def __init__(self, item: _Spec, length: int | None = None):
        self.item, self.length = item, length

    def check(self, value, path, problems):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_tname(value)}")
            return
        if self.length is not None and len(value) != self.length:
            problems.append(f"{path}: expected {self.length} items, got {len(value)}")
            return
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]", problems)


class _Table(_Spec):
    def __init__(self, fields: dict[str, _Spec], required: tuple[str, ...] = ()):
        self.fields, self.required = fields, required

    def check(self, value, path, problems):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table, got {_tname(value)}")
            return
        for k, v in value.items():
            p = f"{path}.{k}" if path else k
            if k in self.fields:
                self.fields[k].check(v, p, problems)
            else:
                problems.append(f"{p}: unknown key{_suggest(k, self.fields)}")
        for k in self.required:
            if k not in value:
                problems.append(f"{path + '.' if path else ''}{k}: missing")


class _MapOf(_Spec):
    def __init__(self, value: _Spec, keys: tuple[str, ...] | None = None):
        self.value, self.keys = value, keys

    def check(self, value, path, problems):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table, got {_tname(value)}")
            return
        for k, v in value.items():
            p = f"{path}.{_quote(k)}"
            if self.keys is not None and k not in self.keys:
                problems.append(f"{p}: unknown key{_suggest(k, self.keys)}")
                continue
            self.value.check(v, p, problems)


def _tname(v: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(v), type(v).__name__)


def _quote(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


_SHARE = _Num(0.0, 1.0)
_RATIO = _Num(0.0)
_COMMON = {"enabled": _Bool(), "severity": _Str(SEVERITIES), "threshold": _SHARE}
_PARAMS: dict[str, dict[str, _Spec]] = {
    "future-date": {"tolerance_hours": _Num(0)},
    "before-death": {"grace_days": _Num(0)},
    "start-before-end": {"extra_pairs": _List(_List(_Str(), length=3))},
    "freshness": {"basis": _Str(("ingested", "event")), "threshold": _Num(0)},
}


def _check_spec(kind: str) -> _Table:
    fields = dict(_COMMON)
    if KINDS[kind].row_level:
        fields["quarantine"] = _Bool()
    fields.update(_PARAMS.get(kind, {}))
    override = _Table({k: v for k, v in fields.items() if k in ("enabled", "severity", "threshold", "quarantine")})
    return _Table({**fields, "overrides": _MapOf(override)})


_SEX_CODE = _Table({"table": _Str(), "system": _Str(), "code": _Str(), "prefix": _Str(), "display": _Str()},
                   required=("table", "system"))
_SPEC = _Table({
    "checks": _Table({k: _check_spec(k) for k in KINDS}),
    "report": _Table({"examples": _Num(0, integer=True)}),
    "code_lists": _MapOf(_List(_Str())),
    "references": _Table({"extra": _List(_List(_Str(), length=4)), "exclude": _List(_Str())}),
    "loinc": _MapOf(_Table({"display": _Str(), "units": _MapOf(_List(_Num(), length=2))})),
    "sex_specific": _Table({"female": _List(_SEX_CODE), "male": _List(_SEX_CODE)}),
    "bias": _Table({
        "reference": _Str(),
        "min_group_size": _Num(1, integer=True),
        "suppress_below": _Num(0, integer=True),
        "ratio_low": _RATIO,
        "ratio_high": _RATIO,
        "coverage_dimensions": _List(_Str()),
        "device_mix": _List(_Table({"measure": _Str(), "dimension": _Str()}, required=("measure", "dimension"))),
        "dimensions": _MapOf(_Table({"column": _Str(), "unknown": _List(_Str()), "bands": _List(_Num(0, integer=True))},
                                    required=("column",))),
        "measures": _MapOf(_Table({"table": _Str(), "codes": _List(_Str()), "require": _Str()}, required=("table",))),
    }),
})


# --------------------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"gate configuration not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"gate configuration {path} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_gate_config(path: str | Path | None = None) -> GateConfig:
    """Load config/gate.toml, and lay the file at `path` over it when given.

    Raises ConfigError listing every problem (key path and what is wrong).
    """
    default_path = config_dir() / "gate.toml"
    raw = _read_toml(default_path)
    ref_base = default_path.parent
    source = str(default_path)
    if path is not None:
        user_path = Path(path)
        user = _read_toml(user_path)
        if "reference" in user.get("bias", {}):
            ref_base = user_path.parent
        raw = _merge(raw, user)
        source = f"{default_path} + {user_path}"
    problems: list[str] = []
    _SPEC.check(raw, "", problems)
    if problems:
        raise ConfigError(f"the gate configuration ({source}) has {len(problems)} problem(s):", problems)
    config = _build(raw, ref_base, source, problems)
    if problems:
        raise ConfigError(f"the gate configuration ({source}) has {len(problems)} problem(s):", problems)
    return config


def _build(raw: dict[str, Any], ref_base: Path, source: str, problems: list[str]) -> GateConfig:
    checks: dict[str, CheckConfig] = {}
    overrides: dict[str, dict[str, CheckConfig]] = {}
    for kind in KINDS:
        c = raw.get("checks", {}).get(kind)
        if c is None:
            problems.append(f"checks.{kind}: missing (every check needs severity and threshold)")
            continue
        for key in ("severity", "threshold"):
            if key not in c:
                problems.append(f"checks.{kind}.{key}: missing")
        base = CheckConfig(
            enabled=c.get("enabled", True), severity=c.get("severity", "error"),
            threshold=float(c.get("threshold", 0.0)), quarantine=c.get("quarantine", False),
            params={k: v for k, v in c.items() if k not in ("enabled", "severity", "threshold", "quarantine", "overrides")},
        )
        checks[kind] = base
        overrides[kind] = {
            where: CheckConfig(
                enabled=o.get("enabled", base.enabled), severity=o.get("severity", base.severity),
                threshold=float(o.get("threshold", base.threshold)), quarantine=o.get("quarantine", base.quarantine),
                params=base.params)
            for where, o in c.get("overrides", {}).items()
        }

    loinc: dict[str, dict[str, tuple[float, float]]] = {}
    for code, rule in raw.get("loinc", {}).items():
        units = {}
        for unit, (lo, hi) in rule.get("units", {}).items():
            if lo > hi:
                problems.append(f'loinc."{code}".units."{unit}": low {lo} is above high {hi}')
            units[unit] = (float(lo), float(hi))
        if not units:
            problems.append(f'loinc."{code}".units: list at least one unit')
        loinc[code] = units

    sex_codes = []
    for sex in ("female", "male"):
        for i, e in enumerate(raw.get("sex_specific", {}).get(sex, [])):
            if ("code" in e) == ("prefix" in e):
                problems.append(f"sex_specific.{sex}[{i}]: give exactly one of code and prefix")
            sex_codes.append(SexCode(sex, e["table"], e["system"], e.get("code"), e.get("prefix"), e.get("display", "")))

    refs = raw.get("references", {})
    bias = _build_bias(raw.get("bias", {}), ref_base, problems)
    return GateConfig(
        checks=checks, overrides=overrides,
        code_lists={k: frozenset(v) for k, v in raw.get("code_lists", {}).items()},
        references_extra=tuple(tuple(x) for x in refs.get("extra", [])),
        references_exclude=frozenset(refs.get("exclude", [])),
        loinc=loinc, loinc_display={c: r.get("display", "") for c, r in raw.get("loinc", {}).items()},
        sex_specific=tuple(sex_codes), bias=bias, source=source,
        examples=raw.get("report", {}).get("examples", 5),
    )


def _build_bias(b: dict[str, Any], ref_base: Path, problems: list[str]) -> BiasConfig:
    for key in ("reference", "min_group_size", "suppress_below", "ratio_low", "ratio_high"):
        if key not in b:
            problems.append(f"bias.{key}: missing")
    dims = {}
    for name, d in b.get("dimensions", {}).items():
        bands = tuple(d.get("bands", ()))
        if list(bands) != sorted(set(bands)):
            problems.append(f"bias.dimensions.{name}.bands: lower bounds must increase")
        dims[name] = Dimension(name, d["column"], frozenset(d.get("unknown", ())), bands)
    measures = {n: Measure(n, m["table"], frozenset(m["codes"]) if "codes" in m else None, m.get("require"))
                for n, m in b.get("measures", {}).items()}
    for i, dim in enumerate(b.get("coverage_dimensions", [])):
        if dim not in dims:
            problems.append(f"bias.coverage_dimensions[{i}]: {dim!r} is not in bias.dimensions")
    pairs = []
    for i, p in enumerate(b.get("device_mix", [])):
        if p["measure"] not in measures:
            problems.append(f"bias.device_mix[{i}].measure: {p['measure']!r} is not in bias.measures")
        if p["dimension"] not in dims:
            problems.append(f"bias.device_mix[{i}].dimension: {p['dimension']!r} is not in bias.dimensions")
        pairs.append((p["measure"], p["dimension"]))
    if b.get("ratio_low", 0.8) > b.get("ratio_high", 1.25):
        problems.append("bias.ratio_low: must not be above bias.ratio_high")
    ref_path = ref_base / b.get("reference", "reference-population.csv")
    reference = read_reference(ref_path, dims, problems)
    return BiasConfig(
        reference_path=str(ref_path), reference=reference,
        min_group_size=b.get("min_group_size", 30), suppress_below=b.get("suppress_below", 11),
        ratio_low=float(b.get("ratio_low", 0.8)), ratio_high=float(b.get("ratio_high", 1.25)),
        dimensions=dims, measures=measures,
        coverage_dimensions=tuple(b.get("coverage_dimensions", ())), device_mix=tuple(pairs),
    )


def read_reference(path: Path, dims: Mapping[str, Dimension], problems: list[str]) -> tuple[ReferenceGroup, ...]:
    """Read a reference population CSV (dimension, group, codes, count; '#' lines are comments)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        problems.append(f"bias.reference: cannot read {path} ({e.strerror})")
        return ()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not lines or [h.strip() for h in lines[0][1].split(",")] != ["dimension", "group", "codes", "count"]:
        problems.append(f"{path}: the first non-comment line must be the header dimension,group,codes,count")
        return ()
    groups, seen = [], set()
    for (n, _), row in zip(lines[1:], csv.reader(line for _, line in lines[1:]), strict=True):
        where = f"{path.name}:{n}"
        if len(row) != 4:
            problems.append(f"{where}: expected 4 fields, got {len(row)}")
            continue
        dim, group, codes, count = (x.strip() for x in row)
        if dim not in dims:
            problems.append(f"{where}: dimension {dim!r} is not in bias.dimensions{_suggest(dim, dims)}")
            continue
        if not count.isdigit():
            problems.append(f"{where}: count must be a whole number")
            continue
        if (dim, group) in seen:
            problems.append(f"{where}: group {group!r} appears twice")
        seen.add((dim, group))
        labels = dims[dim].band_labels
        if labels and group not in labels:
            problems.append(f"{where}: age band {group!r} does not match the bands in bias.dimensions.{dim} ({', '.join(labels)})")
        groups.append(ReferenceGroup(dim, group, tuple(codes.split()), int(count)))
    return tuple(groups)


__all__ = ["BiasConfig", "CheckConfig", "Dimension", "GateConfig", "Measure", "ReferenceGroup", "SexCode",
           "load_gate_config", "read_reference"]
