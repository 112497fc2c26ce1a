"""Which twin a row belongs to.

A row names a patient record of its source (`patient_id`); the twin id is a keyed hash
of that record, so it is stable across runs and machines and reveals no identifier.
Cross-source linking (issue 7) replaces the record by the anchor of its linked group.
"""

from __future__ import annotations

from collections.abc import Iterable

from .keys import keyed_hash


def record_key(source: str, patient_id: str) -> str:
    return f"{source}|Patient/{patient_id}"


def twin_id_for_record(source: str, patient_id: str) -> str:
    return keyed_hash("twin", record_key(source, patient_id))


class TwinIds:
    """Maps (source, patient_id) to twin ids, caching the hashes of one run."""

    def __init__(self, links: dict[str, str] | None = None):
        self._cache: dict[tuple[str, str], str] = {}
        self._links = links or {}

    def __call__(self, source: str, patient_id: str | None) -> str | None:
        if patient_id is None:
            return None
        k = (source, patient_id)
        tid = self._cache.get(k)
        if tid is None:
            tid = self._links.get(record_key(source, patient_id)) or twin_id_for_record(source, patient_id)
            self._cache[k] = tid
        return tid

    def many(self, source: str, patient_ids: Iterable[str | None]) -> list[str | None]:
        return [self(source, p) for p in patient_ids]
