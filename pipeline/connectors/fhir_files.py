"""FHIR R4 from files: NDJSON (Bulk Data output, also gzip), Bundles of every type, single resources.

A unit is one resource: an NDJSON line, a Bundle entry (a Bundle on an NDJSON line or in a
JSON array is read like a Bundle file), or a file holding one resource.
Everything that cannot become a `Resource` becomes a `Rejected` with the file, the
line or entry, and a reason; the file goes on. The connector knows nothing of tables.

Ids: a resource keeps its own id. A Bundle entry without one (transaction POSTs) gets
a deterministic id from its fullUrl (`urn:uuid:X` -> `X`) or its conditional request,
so the same file always yields the same ids; `urn:uuid:` references inside the Bundle
are resolved later through `Resource.full_urls`.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..fhir import RESOURCE_TYPES, valid_id
from ..paths import inside
from ..units import Deletion, Rejected, Resource, Unit

log = logging.getLogger(__name__)

NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")


@dataclass(frozen=True)
class Limits:
    """Defensive limits on input size. Generous for real data, fatal for hostile data."""

    max_line_bytes: int = 64 << 20          # one NDJSON line
    max_document_bytes: int = 1 << 30       # one JSON document (a Bundle is parsed whole)
    max_payload_bytes: int = 1 << 20        # raw bytes kept in quarantine; larger: a pointer
    max_gzip_ratio: int = 200               # decompressed / compressed, past the first 64 MiB
    gzip_ratio_floor: int = 64 << 20


DEFAULT_LIMITS = Limits()


def is_fhir_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NDJSON_SUFFIXES) or name.endswith(JSON_SUFFIXES)


def walk(paths: Iterable[str | Path], accept=is_fhir_file) -> Iterator[Path]:
    """Files named directly, and files `accept` takes in folders (recursively, sorted, no
    hidden ones, none outside the folder)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                rel = child.relative_to(p).parts
                if child.is_file() and not any(part.startswith(".") for part in rel) and accept(child) \
                        and inside(p, child):
                    yield child
        else:
            yield p


class _HashingReader(io.RawIOBase):
    """Reads a file while hashing it, so the ledger's sha256 costs no second pass."""

    def __init__(self, raw: io.BufferedReader):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self.raw.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.count += n
        return n or 0


class FhirFile:
    """The units of one file. Iterate once; afterwards `sha256`, `size` and `units` are set."""

    def __init__(self, path: Path, limits: Limits = DEFAULT_LIMITS):
        self.path = path
        self.limits = limits
        self.sha256: str | None = None
        self.size = 0
        self.units = 0
        self.ref = str(path)

    def __iter__(self) -> Iterator[Unit]:
        try:
            raw = open(self.path, "rb")  # noqa: SIM115 - closed in finally
        except OSError as e:
            self.units += 1
            yield Rejected("read", "unreadable-file", f"cannot open the file ({e.strerror})", self.ref)
            return
        hashing = _HashingReader(raw)
        try:
            gz = self.path.name.lower().endswith(".gz")
            stream: Any = gzip.GzipFile(fileobj=io.BufferedReader(hashing, 1 << 20)) if gz else io.BufferedReader(hashing, 1 << 20)
            name = self.path.name.lower().removesuffix(".gz")
            if name.endswith((".ndjson", ".jsonl")):
                yield from self._ndjson(stream, hashing, gz)
            elif name.endswith(".json"):
                yield from self._document(stream)
            else:
                yield from self._sniff(stream, hashing, gz)
            # finish hashing bytes not consumed by the parser (trailing data)
            while hashing.read(1 << 20):
                pass
        finally:
            raw.close()
            self.sha256 = hashing.sha.hexdigest()
            self.size = hashing.count

    # ---------------------------------------------------------------- NDJSON

    def _ndjson(self, stream, hashing: _HashingReader, gz: bool) -> Iterator[Unit]:
        lim = self.limits
        line_no = 0
        first = True
        decompressed = 0

        def bomb(n: int) -> bool:  # n bytes inflated so far
            return gz and n > lim.gzip_ratio_floor and n > lim.max_gzip_ratio * max(hashing.count, 1)

        while True:
            try:
                line = stream.readline(lim.max_line_bytes + 1)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
                self.units += 1
                reason = "truncated-gzip" if isinstance(e, EOFError) else "bad-gzip"
                yield Rejected("read", reason, f"the compressed stream is {'cut short' if reason == 'truncated-gzip' else 'corrupt'} "
                               f"after line {line_no}: the rest of the file cannot be read; fetch it again",
                               f"{self.ref}:{line_no + 1}", payload_ref=f"{self.ref}:{line_no + 1}-")
                return
            if not line:
                break
            line_no += 1
            decompressed += len(line)
            skipped: int | None = 0
            if len(line) > lim.max_line_bytes:
                # a bomb is often one endless line: the ratio is checked while it is skipped too
                skipped = _skip_line(stream, lim.max_line_bytes, lambda n, base=decompressed: bomb(base + n))
            if skipped is None or bomb(decompressed + skipped):
                self.units += 1
                yield Rejected("read", "gzip-bomb", f"the file expands more than {lim.max_gzip_ratio}x: "
                               "refused as a decompression bomb", f"{self.ref}:{line_no}", payload_ref=f"{self.ref}:{line_no}-")
                return
            if len(line) > lim.max_line_bytes:
                decompressed += skipped
                self.units += 1
                yield Rejected("read", "line-too-long", f"line longer than {lim.max_line_bytes} bytes "
                               f"({len(line) + skipped}+ bytes): raise max_line_bytes if it is genuine",
                               f"{self.ref}:{line_no}", payload_ref=f"{self.ref}:{line_no}")
                continue
            if first:
                first = False
                if line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
            if not line.strip():
                continue
            if line_no == 1 and _is_bulk_log(line):
                return  # a Bulk Data export log (log.ndjson): events, not resources
            yield from self._line(line.rstrip(b"\r\n"), f"{self.ref}:{line_no}")
        if self.units == 0:
            self.units += 1
            yield Rejected("read", "empty-file", "the file holds no resources", self.ref)

    # ---------------------------------------------------------------- JSON documents

    def _document(self, stream) -> Iterator[Unit]:
        lim = self.limits
        try:
            data = stream.read(lim.max_document_bytes + 1)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
            self.units += 1
            yield Rejected("read", "bad-gzip", "the compressed file is cut short or corrupt: fetch it again", self.ref,
                           payload_ref=self.ref)
            return
        if len(data) > lim.max_document_bytes:
            self.units += 1
            yield Rejected("read", "file-too-large", f"a JSON document larger than {lim.max_document_bytes} bytes: "
                           "split it or export NDJSON", self.ref, payload_ref=self.ref)
            return
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if not data.strip():
            self.units += 1
            yield Rejected("read", "empty-file", "the file is empty", self.ref)
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            self.units += 1
            yield Rejected("parse", "invalid-json", f"not valid JSON ({_json_error(e)})", self.ref,
                           **self._payload(data))
            return
        yield from self._from_document(doc, data)

    def _from_document(self, doc: Any, data: bytes) -> Iterator[Unit]:
        if isinstance(doc, list):  # a JSON array of resources, as some tools write
            for i, item in enumerate(doc):
                if isinstance(item, dict) and item.get("resourceType") == "Bundle":
                    yield from self._bundle(item, f"{self.ref}#[{i}]")
                    continue
                self.units += 1
                yield self._resource(item, f"{self.ref}#[{i}]", None, lambda item=item: orjson.dumps(item))
            return
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            yield from self._bundle(doc)
            return
        self.units += 1
        yield self._resource(doc, self.ref, None, lambda: data)

    def _bundle(self, bundle: dict[str, Any], where: str | None = None) -> Iterator[Unit]:
        """The entries of a Bundle; `where` locates the Bundle when it is not the whole file."""
        where = where or self.ref
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            self.units += 1
            yield Rejected("parse", "bad-bundle", "Bundle.entry is not a list", where, **self._payload(orjson.dumps(bundle)))
            return
        if not entries:
            self.units += 1
            yield Rejected("read", "empty-file", "the Bundle has no entries", where)
            return
        # first pass: ids and the fullUrl -> Type/id map, so references resolve whatever the entry order
        full_urls: dict[str, str] = {}
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                res = entry["resource"]
                rid = res.get("id") if valid_id(res.get("id")) else _derived_id(entry)
                rtype = res.get("resourceType")
                if rid and isinstance(rtype, str):
                    if "id" not in res:
                        res["id"] = rid
                    full = entry.get("fullUrl")
                    if isinstance(full, str):
                        full_urls[full] = f"{rtype}/{rid}"
        for i, entry in enumerate(entries):
            ref = f"{where}#entry[{i}]"
            outcome = _search_outcome(entry)
            if outcome == "note":  # a saved searchset's warning, as `twin fetch fhir` treats it: not data
                log.info("%s: a search outcome that only warns, skipped", ref)
                continue
            self.units += 1
            if outcome == "error":
                yield Rejected("read", "search-outcome", "the server reported an error inside the search results: "
                               "the results may be incomplete; the OperationOutcome is the payload", ref,
                               **self._payload(orjson.dumps(entry)))
                continue
            if not isinstance(entry, dict):
                yield Rejected("parse", "bad-entry", "a Bundle entry is not a JSON object", ref, **self._payload(orjson.dumps(entry)))
                continue
            request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
            method = str(request.get("method", "")).upper()
            if method == "DELETE":
                yield _deletion(request.get("url"), ref, entry)
                continue
            res = entry.get("resource")
            if res is None:
                yield Rejected("parse", "no-resource", f"the entry carries no resource (request {method or 'none'})", ref,
                               **self._payload(orjson.dumps(entry)))
                continue
            yield self._resource(res, ref, full_urls, lambda entry=entry: orjson.dumps(entry))

    def _sniff(self, stream, hashing: _HashingReader, gz: bool) -> Iterator[Unit]:
        """A file named without a FHIR suffix: NDJSON if its first line is a whole object, else one document."""
        head = stream.peek(1 << 16) if hasattr(stream, "peek") else b""
        first_line = head.split(b"\n", 1)[0]
        try:
            obj = orjson.loads(first_line)
            ndjson = isinstance(obj, dict) and (b"\n" in head.strip())
        except orjson.JSONDecodeError:
            ndjson = False
        if ndjson:
            yield from self._ndjson(stream, hashing, gz)
        else:
            yield from self._document(stream)

    # ---------------------------------------------------------------- one resource

    def _line(self, line: bytes, ref: str) -> Iterator[Unit]:
        """The units of one NDJSON line: one resource, or the entries of a Bundle.

        NDJSON of Bundles, one per line, is how bulk loaders take transactions; no view maps
        a Bundle (nor does it need an id), so its entries are the units, as in a Bundle file.
        """
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            self.units += 1
            yield Rejected("parse", "invalid-json", f"not valid JSON ({_json_error(e)})", ref, **self._payload(line))
            return
        if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
            yield from self._bundle(obj, ref)
            return
        self.units += 1
        yield self._resource(obj, ref, None, lambda: line, raw=line)

    def _resource(self, obj: Any, ref: str, full_urls, payload, raw: bytes | None = None) -> Unit:
        if not isinstance(obj, dict):
            return Rejected("parse", "not-a-resource", f"expected a JSON object, found a {type(obj).__name__}", ref,
                            **self._payload(payload()))
        rtype = obj.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            return Rejected("parse", "no-resource-type", "the object has no resourceType", ref, **self._payload(payload()))
        if rtype not in RESOURCE_TYPES:
            # The value itself is not quoted: a field that is not a type name can hold anything, a
            # patient's name included. A near miss names the type it was probably meant to be.
            near = difflib.get_close_matches(rtype, RESOURCE_TYPES, n=1, cutoff=0.8) if len(rtype) <= 64 else []
            hint = f" (did you mean {near[0]}?)" if near else ""
            return Rejected("parse", "unknown-resource-type", f"resourceType is not a FHIR R4 resource type{hint}", ref,
                            **self._payload(payload()))
        rid = obj.get("id")
        if rid is None:
            return Rejected("parse", "no-id", f"the {rtype} has no id (and nothing to derive one from)", ref,
                            **self._payload(payload()))
        if not valid_id(rid):
            return Rejected("parse", "bad-id", f"the {rtype} id is not a FHIR id (1-64 of A-Z a-z 0-9 - .)", ref,
                            **self._payload(payload()))
        return Resource(obj, ref, full_urls, raw)

    def _payload(self, data: bytes) -> dict[str, Any]:
        if len(data) <= self.limits.max_payload_bytes:
            return {"payload": data}
        return {"payload_ref": self.ref}


def replay(payload: bytes, source_ref: str, limits: Limits = DEFAULT_LIMITS) -> Iterator[Unit]:
    """The units of a quarantined payload, read again (for `twin quarantine retry`).

    A payload is an NDJSON line, a Bundle entry, or a whole document; each is read
    with the same checks as a file, under its original locator.
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        yield Rejected("parse", "invalid-json", f"not valid JSON ({_json_error(e)})", source_ref, payload=payload)
        return
    f = FhirFile(Path(source_ref), limits)
    f.ref = source_ref
    if isinstance(obj, dict) and "resourceType" not in obj and isinstance(obj.get("resource"), dict):
        entry_ref = source_ref
        f.ref = source_ref.split("#entry[", 1)[0]
        for unit in f._bundle({"resourceType": "Bundle", "type": "collection", "entry": [obj]}):
            yield _relocate(unit, entry_ref)
        return
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
        yield from f._bundle(obj)
        return
    yield f._resource(obj, source_ref, None, lambda: payload, raw=payload)


def _relocate(unit: Unit, ref: str) -> Unit:
    if isinstance(unit, Resource):
        return Resource(unit.resource, ref, unit.full_urls, unit.raw)
    if isinstance(unit, Rejected):
        return Rejected(unit.stage, unit.reason, unit.message, ref, unit.payload, unit.payload_ref, unit.target_table)
    if isinstance(unit, Deletion):
        return Deletion(unit.resource_type, unit.resource_id, ref)
    return unit


def read_fhir(paths: Iterable[str | Path], limits: Limits = DEFAULT_LIMITS) -> Iterator[Unit]:
    """Every unit of every FHIR file under `paths` (convenience for tests and tools)."""
    for path in walk(paths):
        yield from FhirFile(path, limits)


# ---------------------------------------------------------------------- helpers


def _skip_line(stream, chunk: int, stop: Callable[[int], bool] | None = None) -> int | None:
    """Read past the rest of a line; its length, or None as soon as `stop(bytes skipped)` says
    to give up (a gzip bomb: without it, one endless line is inflated to its end)."""
    skipped = 0
    while True:
        part = stream.readline(chunk)
        skipped += len(part)
        if not part or part.endswith(b"\n"):
            return skipped
        if stop is not None and stop(skipped):
            return None


def _is_bulk_log(line: bytes) -> bool:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "resourceType" not in obj and "exportId" in obj and "eventId" in obj


def _search_outcome(entry: Any) -> str | None:
    """"error" or "note" for the OperationOutcome a server puts in a searchset (search.mode
    `outcome`), None for any other entry. It has no id and maps to no table: an error means
    the saved results may be incomplete, a warning is no data at all."""
    if not isinstance(entry, dict) or not isinstance(entry.get("search"), dict) or entry["search"].get("mode") != "outcome":
        return None
    res = entry.get("resource")
    if not isinstance(res, dict) or res.get("resourceType") != "OperationOutcome":
        return None
    issues = res.get("issue") if isinstance(res.get("issue"), list) else []
    severities = {i.get("severity") for i in issues if isinstance(i, dict)}
    return "error" if severities & {"error", "fatal"} else "note"


def _json_error(e: orjson.JSONDecodeError) -> str:
    # orjson's message names the position, never the content
    return str(e).split(":", 1)[0][:120]


def _derived_id(entry: dict[str, Any]) -> str | None:
    full = entry.get("fullUrl")
    if isinstance(full, str):
        if full.startswith(("urn:uuid:", "urn:oid:")):
            tail = full.split(":", 2)[2]
            if valid_id(tail):
                return tail
        else:
            tail = full.rstrip("/").rsplit("/", 1)[-1]
            if valid_id(tail) and "/" in full:
                return tail
    request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
    cond = request.get("ifNoneExist") or (request.get("url") if "?" in str(request.get("url", "")) else None)
    if isinstance(cond, str) and cond:
        return "c-" + hashlib.sha256(cond.encode()).hexdigest()[:40]
    return None


def _deletion(url: Any, ref: str, entry: dict[str, Any]) -> Unit:
    if isinstance(url, str):
        parts = url.split("?", 1)[0].strip("/").split("/")
        if len(parts) >= 2 and parts[-2] in RESOURCE_TYPES and valid_id(parts[-1]) and "?" not in url:
            return Deletion(parts[-2], parts[-1], ref)
    return Rejected("parse", "bad-delete", "a DELETE entry whose url is not Type/id (conditional deletes are not applied)",
                    ref, payload=orjson.dumps(entry))
