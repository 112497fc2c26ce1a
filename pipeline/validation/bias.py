"""Bias: who is in the data, who is missing what, and who was measured with which device.

All four checks group patients (the people of the patient table, people.py) by the
dimensions of the config: sex, age band at `now`, race, ethnicity.

- representation: each group's share against the reference population (config
  [bias] reference). A group is judged when it has, or should have, at least
  min_group_size patients (an absent group that should have 100 patients is the worst
  case, not a small one). It is flagged when the representation ratio (share in the
  data / share in the reference) is outside [ratio_low, ratio_high]. The check also
  reports the total variation distance (half the sum of absolute share differences)
  and fails when it exceeds the threshold.
- unknown-demographics: the share of patients whose value is missing or a null flavour.
- coverage-gap: for each measure (SpO2, HbA1c, imaging, device data), the share of each
  group's patients who have none, against the share over all patients: flagged when
  the missing-rate ratio is outside [ratio_low, ratio_high] and the rates differ by at
  least the threshold (a ratio alone would flag 2% against 1%).
- device-mix: for a measure, each group's share of rows by device model against the
  overall shares, with the same rule (pulse oximeters read SpO2 high on dark skin, so a
  group measured mostly by one model is a bias to know about).

Counts between 1 and suppress_below - 1 are suppressed in the details (and so in the
reports), with the shares and ratios that would reveal them; when only one count of a
dimension is suppressed, the next smallest is suppressed too so it cannot be recovered
by subtraction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .checks import Finding
from .config import BiasConfig, Dimension, GateConfig, Measure
from .layout import TableLayout
from .people import People, person_keys

UNKNOWN = "(unknown)"
UNLISTED = "(not in reference)"
NO_DEVICE = "(no device)"


def suppress(counts: Mapping[str, int], below: int) -> dict[str, int | None]:
    """Counts 1..below-1 become None; a lone suppressed count takes the next smallest with it."""
    out: dict[str, int | None] = {k: (None if 0 < v < below else v) for k, v in counts.items()}
    hidden = [k for k, v in out.items() if v is None]
    if len(hidden) == 1:
        shown = sorted((v, k) for k, v in out.items() if v)
        if shown:
            out[shown[0][1]] = None
    return out


def group_labels(persons: People, dim: Dimension, reference: BiasConfig, now: datetime) -> np.ndarray:
    """The group of each person along `dim`: UNKNOWN, UNLISTED, or a reference group label
    (or, for a dimension the reference file does not cover, the value itself)."""
    n = len(persons)
    labels = np.full(n, UNKNOWN, dtype=object)
    if dim.bands:
        age = persons.age_years(now)
        known = ~np.isnan(age)
        edges = np.asarray(dim.bands, dtype=float)
        pos = np.searchsorted(edges, age[known], side="right") - 1
        names = np.array(dim.band_labels + (UNLISTED,), dtype=object)
        labels[known] = names[np.where(pos < 0, len(edges), pos)]
        return labels
    values = persons.attrs.get(dim.column)
    if values is None:
        return labels
    raw = np.asarray(values.to_pylist(), dtype=object)
    groups = reference.reference_for(dim.name)
    by_code = {c: g.group for g in groups for c in g.codes}
    for i, v in enumerate(raw):
        if v is not None and v not in dim.unknown:
            # without a reference for this dimension, the values themselves are the groups
            labels[i] = by_code.get(v, UNLISTED) if groups else str(v)
    return labels


def _share(x: int, n: int) -> float | None:
    return round(x / n, 4) if n else None


def representation(dim: Dimension, labels: np.ndarray, config: GateConfig) -> Finding:
    b = config.bias
    ref = [g for g in b.reference_for(dim.name) if g.codes or dim.bands]
    total_ref = sum(g.count for g in ref)
    counts = Counter(labels.tolist())
    n = sum(counts[g.group] for g in ref)
    shown = suppress({g.group: counts[g.group] for g in ref}, b.suppress_below)
    groups, judged, flagged, tvd = [], 0, 0, 0.0
    for g in ref:
        q = g.count / total_ref if total_ref else 0.0
        c = counts[g.group]
        p = c / n if n else 0.0
        tvd += abs(p - q) / 2
        ratio = p / q if q else None
        is_judged = n > 0 and (c >= b.min_group_size or q * n >= b.min_group_size)
        is_flagged = bool(is_judged and ratio is not None and not (b.ratio_low <= ratio <= b.ratio_high))
        judged += is_judged
        flagged += is_flagged
        hide = shown[g.group] is None
        groups.append({"group": g.group, "count": shown[g.group], "share": None if hide else _share(c, n),
                       "reference_share": round(q, 4), "ratio": None if hide or ratio is None else round(ratio, 3),
                       "judged": is_judged, "flagged": is_flagged})
    cc = config.check("representation", "patient", dim.name)
    details = {"dimension": dim.name, "patients_compared": n, "groups": groups,
               "unknown": suppress({"n": counts[UNKNOWN]}, b.suppress_below)["n"],
               "not_in_reference": suppress({"n": counts[UNLISTED]}, b.suppress_below)["n"],
               "total_variation_distance": round(tvd, 4), "observed_unit": "total variation distance",
               "reference": b.reference_path, "ratio_bounds": [b.ratio_low, b.ratio_high]}
    if n < b.min_group_size or judged == 0:
        return Finding("representation", "patient", dim.name, 0, 0, details=details,
                       summary=f"not judged: fewer than {b.min_group_size} patients in any group")
    names = [g["group"] for g in groups if g["flagged"]]
    verdict = flagged == 0 and tvd <= cc.threshold
    summary = (f"{flagged} of {judged} judged groups outside the ratio bounds {b.ratio_low}-{b.ratio_high}"
               + (f" ({', '.join(names)})" if names else "")
               + f"; total variation distance {tvd:.3f} (allowed up to {cc.threshold:g})")
    return Finding("representation", "patient", dim.name, flagged, judged, observed=round(tvd, 4),
                   details=details, verdict=verdict, summary=summary)


def unknown_demographics(dim: Dimension, labels: np.ndarray, config: GateConfig) -> Finding:
    unknown = int((labels == UNKNOWN).sum())
    return Finding("unknown-demographics", "patient", dim.name, unknown, len(labels),
                   details={"dimension": dim.name, "column": dim.column,
                            "unknown": suppress({"n": unknown}, config.bias.suppress_below)["n"]})


def _measure_rows(data: pa.Table, m: Measure) -> pa.Array | None:
    mask = None
    if m.codes is not None:
        if "code" not in data.column_names:
            return None
        mask = pc.is_in(data.column("code"), value_set=pa.array(sorted(m.codes)))
    if m.require is not None:
        if m.require not in data.column_names:
            return None
        req = pc.is_valid(data.column(m.require))
        mask = req if mask is None else pc.and_(mask, req)
    if mask is None:
        return pa.array(np.arange(data.num_rows))
    return pc.indices_nonzero(pc.fill_null(mask, False))


def _gap_rule(rate_g: float, rate: float, b: BiasConfig, min_gap: float) -> tuple[float | None, bool]:
    ratio = rate_g / rate if rate else (1.0 if rate_g == 0 else None)
    outside = ratio is None or not (b.ratio_low <= ratio <= b.ratio_high)
    return ratio, bool(outside and abs(rate_g - rate) >= min_gap)


def coverage_gap(measure: Measure, dim: Dimension, labels: np.ndarray, covered: np.ndarray | None,
                 config: GateConfig) -> Finding:
    b = config.bias
    column = f"{measure.name}/{dim.name}"
    cc = config.check("coverage-gap", measure.table, column)
    if covered is None:
        return Finding("coverage-gap", measure.table, column, 0, 0,
                       details={"note": f"table {measure.table} was not given"}, summary="not judged: no data")
    known = labels != UNKNOWN
    n = int(known.sum())
    missing = int((~covered & known).sum())
    rate = missing / n if n else 0.0
    groups, judged, flagged, worst = [], 0, 0, 0.0
    more: list[str] = []
    less: list[str] = []
    sizes = Counter(labels[known].tolist())
    shown = suppress(dict(sizes), b.suppress_below)
    for g, size in sorted(sizes.items()):
        in_g = labels == g
        miss_g = int((~covered & in_g).sum())
        rate_g = miss_g / size
        is_judged = size >= b.min_group_size
        ratio, is_flagged = _gap_rule(rate_g, rate, b, cc.threshold) if is_judged else (None, False)
        judged += is_judged
        flagged += is_flagged
        if is_flagged:
            (more if rate_g > rate else less).append(g)
        if is_judged:
            worst = max(worst, abs(rate_g - rate))
        hide = shown[g] is None
        groups.append({"group": g, "patients": shown[g], "missing_rate": None if hide else round(rate_g, 4),
                       "ratio": None if hide or ratio is None else round(ratio, 3), "judged": is_judged,
                       "flagged": is_flagged})
    details = {"measure": measure.name, "dimension": dim.name, "patients": n, "overall_missing_rate": round(rate, 4),
               "groups": groups, "observed_unit": "largest absolute gap in missing rate",
               "ratio_bounds": [b.ratio_low, b.ratio_high]}
    if judged == 0:
        return Finding("coverage-gap", measure.table, column, 0, 0, details=details,
                       summary=f"not judged: no group has {b.min_group_size} patients")
    summary = (f"{measure.name} missing for {rate:.1%} of patients overall; {flagged} of {judged} groups by "
               f"{dim.name} differ beyond the ratio bounds and by at least {cc.threshold:.0%}"
               + (f"; missing more often: {', '.join(more)}" if more else "")
               + (f"; less often: {', '.join(less)}" if less else ""))
    return Finding("coverage-gap", measure.table, column, flagged, judged, observed=round(worst, 4),
                   details=details, verdict=flagged == 0, summary=summary)


def device_mix(measure: Measure, dim: Dimension, labels: np.ndarray, rows_group: np.ndarray,
               rows_person: np.ndarray, rows_device: np.ndarray, config: GateConfig) -> Finding:
    b = config.bias
    column = f"{measure.name}/{dim.name}"
    cc = config.check("device-mix", measure.table, column)
    known = rows_group != UNKNOWN
    overall = Counter(rows_device[known].tolist())
    n_rows = int(known.sum())
    groups, judged, flagged, worst = [], 0, 0, 0.0
    for g in sorted(set(rows_group[known].tolist())):
        in_g = rows_group == g
        patients = len(set(rows_person[in_g].tolist()))
        by_model = Counter(rows_device[in_g].tolist())
        size = int(in_g.sum())
        is_judged = patients >= b.min_group_size
        models = []
        g_flagged = False
        for model in sorted(overall):
            s, s_all = by_model[model] / size, overall[model] / n_rows
            ratio, is_flagged = _gap_rule(s, s_all, b, cc.threshold) if is_judged else (None, False)
            g_flagged |= is_flagged
            if is_judged:
                worst = max(worst, abs(s - s_all))
            models.append({"device": model, "rows": by_model[model], "share": round(s, 4),
                           "overall_share": round(s_all, 4), "ratio": None if ratio is None else round(ratio, 3),
                           "flagged": is_flagged})
        shown = suppress({m["device"]: m["rows"] for m in models}, b.suppress_below)
        for m in models:
            if shown[m["device"]] is None:
                m.update(rows=None, share=None, ratio=None)
        judged += is_judged
        flagged += g_flagged
        groups.append({"group": g, "patients": suppress({"n": patients}, b.suppress_below)["n"],
                       "judged": is_judged, "flagged": g_flagged, "devices": models})
    details = {"measure": measure.name, "dimension": dim.name, "rows": n_rows, "groups": groups,
               "observed_unit": "largest absolute gap in a device's share", "ratio_bounds": [b.ratio_low, b.ratio_high]}
    if judged == 0:
        return Finding("device-mix", measure.table, column, 0, 0, details=details,
                       summary=f"not judged: no group has {b.min_group_size} measured patients")
    names = [g["group"] for g in groups if g["flagged"]]
    summary = (f"{flagged} of {judged} groups by {dim.name} are measured with a device mix that differs from "
               f"the overall mix beyond the ratio bounds and by at least {cc.threshold:.0%}"
               + (f" ({', '.join(names)})" if names else ""))
    return Finding("device-mix", measure.table, column, flagged, judged, observed=round(worst, 4),
                   details=details, verdict=flagged == 0, summary=summary)


def _device_labels(device_ids: pa.Array, device: pa.Table | None) -> np.ndarray:
    ids = np.asarray(device_ids.to_pylist(), dtype=object)
    if device is None or "device_id" not in device.column_names:
        return np.where(ids == None, NO_DEVICE, ids)  # noqa: E711 (numpy elementwise)
    parts = [device.column(c) for c in ("manufacturer", "model") if c in device.column_names]
    # nulls filled first: pyarrow's null_handling="skip" returns a wrong-length result for all-null inputs
    names = (pc.utf8_trim_whitespace(pc.binary_join_element_wise(*(pc.fill_null(p, "") for p in parts), " "))
             if parts else device.column("device_id"))
    names = pc.coalesce(pc.if_else(pc.equal(pc.utf8_length(names), 0), None, names), device.column("device_id"))
    idx = pc.index_in(device_ids, value_set=device.column("device_id"))
    labels = np.asarray(pc.take(names, idx).to_pylist(), dtype=object)
    return np.where(labels == None, np.where(ids == None, NO_DEVICE, ids), labels)  # noqa: E711


def bias_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout], persons: People,
                config: GateConfig, now: datetime) -> list[Finding]:
    b = config.bias
    if len(persons) == 0:
        return []
    labels = {name: group_labels(persons, dim, b, now) for name, dim in b.dimensions.items()}
    findings = []
    for name, dim in b.dimensions.items():
        if config.check("representation", "patient", name).enabled and b.reference_for(name):
            findings.append(representation(dim, labels[name], config))
        if config.check("unknown-demographics", "patient", name).enabled:
            findings.append(unknown_demographics(dim, labels[name], config))
    rows_cache: dict[str, Any] = {}
    for m in b.measures.values():
        data, layout = tables.get(m.table), layouts.get(m.table)
        covered = None
        if data is not None and layout is not None:
            rows = _measure_rows(data, m)
            keys = person_keys(data, layout)
            if rows is not None and keys is not None:
                row_keys = pc.take(keys, rows)
                person = persons.index_of(row_keys)
                rows_cache[m.name] = (data, rows, person)
                covered = np.zeros(len(persons), dtype=bool)
                covered[person.drop_null().to_numpy()] = True
        for dim_name in b.coverage_dimensions:
            if config.check("coverage-gap", m.table, f"{m.name}/{dim_name}").enabled:
                findings.append(coverage_gap(m, b.dimensions[dim_name], labels[dim_name], covered, config))
    for m_name, dim_name in b.device_mix:
        m = b.measures[m_name]
        if not config.check("device-mix", m.table, f"{m_name}/{dim_name}").enabled or m_name not in rows_cache:
            continue
        data, rows, person = rows_cache[m_name]
        if "device_id" not in data.column_names:
            continue
        person_np = np.asarray(pc.fill_null(person, -1).to_numpy(zero_copy_only=False))
        linked = person_np >= 0
        rows_group = np.where(linked, labels[dim_name][np.where(linked, person_np, 0)], UNKNOWN)
        devices = _device_labels(pc.take(data.column("device_id"), rows), tables.get("device"))
        findings.append(device_mix(m, b.dimensions[dim_name], labels[dim_name], rows_group, person_np, devices, config))
    return findings


__all__ = ["NO_DEVICE", "UNKNOWN", "UNLISTED", "bias_checks", "group_labels", "suppress"]
