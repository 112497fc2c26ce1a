"""Code lists the twin build uses, read from mappings/codes/ (each file names its source)."""

from __future__ import annotations

import csv
import functools

from .resources import mappings_dir


@functools.cache
def twin_observations() -> dict[str, tuple[str, str]]:
    """LOINC code -> (short name, kind: vital or lab)."""
    path = mappings_dir() / "codes" / "twin_observations.csv"
    with open(path, encoding="utf-8") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return {r["code"]: (r["name"], r["kind"]) for r in rows}


VITAL_SIGNS = {c: n for c, (n, k) in twin_observations().items() if k == "vital"}
KEY_LABS = {c: n for c, (n, k) in twin_observations().items() if k == "lab"}
