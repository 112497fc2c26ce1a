"""The small values that travel between stages.

Connectors yield these; mapping turns HL7 v2 and DICOM units into `Resource`s; the
ingest stage turns resources into table rows. Nothing else is shared between stages,
which is what lets a stage run on its own (in tests, on another machine, on Spark).

A record-level problem is a `Rejected` value, not an exception: the stage that finds
it yields it and goes on, and the run stores it in the quarantine table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Stages a unit passes through; a Rejected names the one that refused it.
STAGES = ("read", "parse", "map", "view", "schema", "store", "gate", "export")

# unit_key prefix of device-stream rows (columnar CSV chunks): how the twin build and the
# export tell a stream of samples from observations that came as FHIR resources.
STREAM_UNIT_PREFIX = "csv:"


@dataclass(frozen=True, slots=True)
class Resource:
    """One FHIR R4 resource (a plain dict, as parsed from JSON) and where it came from.

    `source_ref` is a locator a person can follow back to the original: `file:line`,
    `file#entry[3]`, `MSH-10 control id/segment`, `SOP Instance UID`. It never holds
    patient data. `full_urls` maps the fullUrl of every entry of the Bundle the resource
    came in to `Type/id`, so that `urn:uuid:` references inside a transaction resolve.
    `raw` is the exact text it was read from, kept only to put into quarantine if a
    later stage refuses it.
    """

    resource: dict[str, Any]
    source_ref: str
    full_urls: Mapping[str, str] | None = None
    raw: bytes | None = None
    # made only when the store has no such resource yet, never replacing one: the Patient an
    # HL7 result message carries (a lab's thin PID must not wipe what ADT said; hl7v2 README)
    create_only: bool = False


@dataclass(frozen=True, slots=True)
class Deletion:
    """A source says a resource no longer exists (Bulk Data `deleted`, a DELETE entry)."""

    resource_type: str
    resource_id: str
    source_ref: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A unit that cannot be used, and why. It goes to quarantine; the batch goes on.

    `reason` is a stable code (`invalid-json`, `no-id`, ...), `message` says what is
    wrong in words and names the way out, without quoting patient data.
    """

    stage: str
    reason: str
    message: str
    source_ref: str
    payload: bytes | None = None
    payload_ref: str | None = None
    target_table: str | None = None


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows already in the shape of one twin table, for sources that skip FHIR.

    Device streams are the one such source (ARCHITECTURE.md: millions of samples go
    straight to the observation table in columnar form). `data` is a pyarrow Table
    holding the table's own columns plus `unit_key` and `row_index`; the ingest stage
    adds the other provenance columns. `units` counts the source units (CSV lines)
    the rows stand for, so that read = written + quarantined can be checked.
    """

    table: str
    data: Any  # pyarrow.Table; typed loosely so that importing units stays cheap
    source_ref: str
    units: int
    content_hash: str


@dataclass(slots=True)
class Counts:
    """Per-source tallies of one run. read = written + unchanged + ignored + quarantined."""

    read: int = 0
    written: int = 0
    unchanged: int = 0
    quarantined: int = 0
    ignored: int = 0
    deleted: int = 0
    ignored_types: dict[str, int] = field(default_factory=dict)

    def reconciles(self) -> bool:
        return self.read == self.written + self.unchanged + self.ignored + self.quarantined


Unit = Resource | Deletion | Rejected | Rows
