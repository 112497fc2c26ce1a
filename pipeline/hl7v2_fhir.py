"""HL7 v2 messages -> FHIR R4 resources: `map_message`, the one entry point.

What to make of a message is declared in mappings/hl7v2/ (compiled by hl7v2_maps, with
the data type conversions of hl7v2_datatypes); this module parses the message once,
checks what must hold before mapping (control id, version, message type, required
segments), computes the resource ids, runs the compiled rules for each anchor segment,
and decides: every resource, or one `Rejected` carrying the raw message and every
problem found (positions and field names, never values).

Resource ids are deterministic (a hash of what identifies the thing in the message, per
map), so the same message always gives the same ids, a re-sent message changes nothing
downstream, and a later message about the same patient, visit or order updates it.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from .hl7v2 import DEFAULT_DELIMITERS as STANDARD
from .hl7v2 import DEFAULT_LIMITS, HL7ParseError, Limits, Message, Path, parse_message
from .hl7v2_datatypes import dtm_offset
from .hl7v2_maps import Mappings, ResourceMap, default_mappings
from .units import Rejected, Resource

# Rejected reasons -> ACK code (HL7 v2.5 section 2.9.2: MSH-9/-11/-12 validation failures are
# AR; content errors are AE).
_AR_REASONS = frozenset((
    "no-msh", "bad-msh", "bad-encoding-characters", "unsupported-charset", "bad-charset",
    "unsupported-version", "unsupported-message-type", "multiple-messages", "message-too-large",
    "line-too-long",
))


class MappedMessage:
    """The outcome of mapping one message: its resources, or why it was refused, and the ACK code.

    A plain class (one per message), as hl7v2_framing.RawMessage is; treat it as immutable."""

    __slots__ = ("control_id", "message_type", "resources", "rejected", "ack_code")

    def __init__(self, control_id: str | None, message_type: str | None, resources: list[Resource],
                 rejected: Rejected | None, ack_code: str) -> None:
        self.control_id = control_id
        self.message_type = message_type
        self.resources = resources
        self.rejected = rejected
        self.ack_code = ack_code  # "AA" | "AE" | "AR"


# ======================================================================================
# Running a map on a message


_SENTINEL = object()


class Run:
    """State of mapping one message: the message, the problems found, lookups cached."""

    __slots__ = ("msg", "maps", "vocab", "strict", "errors", "invalid", "names", "_msh_offset", "_anchor",
                 "_rmap", "_loc_cache", "by_pos", "loc", "text", "comps", "subs")

    def __init__(self, msg: Message, maps: Mappings, strict: bool):
        self.msg = msg
        self.maps = maps
        self.vocab = maps.vocab
        self.strict = strict
        self.errors: list[tuple[str, str, str]] = []    # (reason, locator, text): always refuse
        self.invalid: list[tuple[str, str]] = []        # (locator, text): refuse in strict mode
        self.loc: Path | None = None                     # the field being converted
        self.names = msg.names
        self._msh_offset: Any = _SENTINEL
        self._anchor = 0
        self._rmap: ResourceMap | None = None
        self._loc_cache: dict[str, int | None] = {}
        self.by_pos: dict[int, list[tuple[str, str]]] = {}
        self.text = msg.text               # unescape a leaf
        self.comps = msg.components        # split a repetition into components
        self.subs = msg.subcomponents      # split a component into subcomponents

    def leaves(self, raw: str, pad: int = 0) -> list[str]:
        """Components of a repetition, unescaped and stripped, padded with '' to at least `pad` items."""
        msg = self.msg
        es = msg.delims.escape
        comps = msg.components(raw)
        out = [msg.text(x).strip() for x in comps] if es and es in raw else [x.strip() for x in comps]
        if len(out) < pad:
            out.extend([""] * (pad - len(out)))
        return out

    def note_invalid(self, text: str) -> None:
        """A part of a value did not convert and was left out (strict mode refuses the message)."""
        self.invalid.append((self.locator(self.loc) if self.loc else "?", text))

    # -- segment resolution -------------------------------------------------------------
    def set_anchor(self, rmap: ResourceMap, pos: int) -> None:
        self._rmap, self._anchor = rmap, pos
        self._loc_cache = {}

    def locate(self, name: str) -> int | None:
        """Position of the segment `name` as seen from the current anchor.

        The anchor itself; a child segment: the first one after the anchor, before the
        next segment that ends the anchor's group; any other segment: the nearest one
        before the anchor (its parent group: the OBR of an OBX, the PID of everything).
        """
        a = self._anchor
        if name == self.names[a]:
            return a
        cache = self._loc_cache
        if name in cache:
            return cache[name]
        names = self.names
        rmap = self._rmap
        assert rmap is not None
        found: int | None = None
        if name == "MSH":
            found = 0
        elif name in rmap.children:
            boundary = rmap.boundary
            for i in range(a + 1, len(names)):
                n = names[i]
                if n == name:
                    found = i
                    break
                if n in boundary:
                    break
        else:  # the nearest before: a binary search in that segment's positions, no scan
            positions = self.msg.index().get(name)
            if positions:
                k = bisect_left(positions, a)
                found = positions[k - 1] if k else None
        cache[name] = found
        return found

    def children_positions(self, name: str) -> list[int]:
        names, a = self.names, self._anchor
        rmap = self._rmap
        assert rmap is not None
        out = []
        for i in range(a + 1, len(names)):
            n = names[i]
            if n == name:
                out.append(i)
            elif n in rmap.boundary:
                break
        return out

    def locator(self, p: Path) -> str:
        pos = self.locate(p.segment)
        field_ = p.text.split("-", 1)[1] if "-" in p.text else str(p.field)
        if pos is None:
            return p.text
        return f"{self.msg.locator(pos)}-{field_}"

    # -- reading --------------------------------------------------------------------------
    def leaf(self, p: Path) -> str | None:
        pos = self.locate(p.segment)
        if pos is None:
            return None
        return self.msg.value(self.msg.segments[pos], p.field, p.repetition or 1, p.component, p.subcomponent)

    def valued(self, p: Path) -> bool:
        pos = self.locate(p.segment)
        if pos is None:
            return False
        seg = self.msg.segments[pos]
        if p.component is None and p.repetition is None:
            return p.field < len(seg) and bool(seg[p.field]) and seg[p.field] != '""'
        v = self.leaf(p)
        return v is not None and v != '""'

    def raw_element(self, p: Path) -> str | None:
        """The whole text of an element, all its parts, unescaped and joined with fixed separators
        (^ between components, & between subcomponents): what ids hash, the same whatever the
        message's delimiters."""
        pos = self.locate(p.segment)
        if pos is None:
            return None
        msg = self.msg
        reps = msg.repetitions(msg.segments[pos], p.field)
        r = p.repetition or 1
        if r > len(reps):
            return None
        text = reps[r - 1]
        d = msg.delims
        if d is STANDARD and "\\" not in text:   # already canonical, but for the parts asked for
            if p.component is None:
                return text.rstrip("^&") or None
            if p.subcomponent is None:
                comps = text.split("^")
                return (comps[p.component - 1].rstrip("&") or None) if p.component <= len(comps) else None
        comps = msg.components(text)
        if p.component is not None:
            if p.component > len(comps):
                return None
            comps = comps[p.component - 1:p.component]
            if p.subcomponent is not None:
                subs = msg.subcomponents(comps[0])
                if p.subcomponent > len(subs):
                    return None
                comps = subs[p.subcomponent - 1:p.subcomponent]
        text = "^".join("&".join(msg.text(s) for s in msg.subcomponents(c)) for c in comps).rstrip("^&")
        return text or None

    def field_reps(self, p: Path) -> list[str]:
        pos = self.locate(p.segment)
        if pos is None:
            return []
        reps = self.msg.repetitions(self.msg.segments[pos], p.field)
        if p.repetition:
            return reps[p.repetition - 1:p.repetition] if p.repetition <= len(reps) else []
        return [r for r in reps if r and r != '""']

    # -- time zone of date-times without one ----------------------------------------------
    def default_offset(self, local: datetime) -> str:
        off = self._msh_offset
        if off is _SENTINEL:
            off = self._msh_offset = dtm_offset(self.msg.msh_field(7))
        if off is not None:
            return off
        delta = self.vocab.timezone.utcoffset(local) or timedelta(0)
        minutes = int(delta.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        minutes = abs(minutes)
        return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


# ======================================================================================
# The entry point


def _resource_id(run: Run, rmap: ResourceMap, pos: int) -> str:
    for n, alt in enumerate(rmap.ids):
        parts = [rmap.type, str(n)]
        ok = True
        for part in alt:
            if part.token == "#position":
                parts.append(str(pos))
                continue
            assert part.path is not None
            v = run.raw_element(part.path)
            if v is None or v == '""':
                if part.optional:
                    parts.append("")
                    continue
                ok = False
                break
            parts.append(v)
        if ok:
            return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=16).hexdigest()
    return hashlib.blake2b(f"{rmap.type}\x1f{pos}\x1f{run.msg.control_id}".encode(), digest_size=16).hexdigest()


@lru_cache(maxsize=1)
def known_segments() -> frozenset[str]:
    """Segment ids HL7 v2.3 to v2.8.2 define, from hl7apy's structure tables (loaded on first use)."""
    from hl7apy import load_library
    from hl7apy.exceptions import UnsupportedVersion

    names: set[str] = set()
    for v in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"):
        try:
            names.update(load_library(v).SEGMENTS)
        except UnsupportedVersion:  # hl7apy 1.3 has no 2.7.1 / 2.8.1 tables: their segments are in 2.8.2's
            continue
    return frozenset(names)


def _safe_ref(text: str | None) -> str | None:
    """A control id as a locator: printable, at most 64 characters."""
    if not text:
        return None
    clean = "".join(ch if ch.isprintable() else "?" for ch in text.strip())[:64]
    return clean or None


_VERSION_SHAPE = re.compile(r"\d{1,2}(?:\.\d{1,3}){0,3}\Z")
_TYPE_SHAPE = re.compile(r"[A-Z0-9]{3}\^[A-Z0-9]{0,3}\Z")


def _shown(text: str, shape: re.Pattern, what: str) -> str:
    """A header value quoted in a refusal only when it has the shape of one: a field shifted by a
    broken message can hold anything, patient data included."""
    if not text:
        return "(empty)"
    return text if shape.match(text) else f"(not {what})"


def _reject(stage: str, reason: str, message: str, source_ref: str, raw: bytes, control_id: str | None,
            message_type: str | None, ack: str | None = None) -> MappedMessage:
    rej = Rejected(stage=stage, reason=reason, message=message, source_ref=source_ref, payload=raw)
    code = ack or ("AR" if reason in _AR_REASONS else "AE")
    return MappedMessage(control_id, message_type, [], rej, code)


def map_message(raw: bytes, source_ref: str, *, strict: bool = False, mappings: Mappings | None = None,
                limits: Limits = DEFAULT_LIMITS) -> MappedMessage:
    """Map one HL7 v2 message to FHIR R4 resources, or refuse it whole with a reason.

    `strict` also refuses a message for any value that does not convert (a bad date, a
    code outside its table, a repeated value where FHIR has room for one). Without it,
    such a value is left out and marked with the data-absent-reason extension (or
    Observation.dataAbsentReason), and the rest of the message is kept.
    """
    maps = mappings or default_mappings()
    try:
        msg = parse_message(raw, limits)
    except HL7ParseError as e:
        return _reject("parse", e.reason, str(e), source_ref, raw, None, None)
    control_id = _safe_ref(msg.control_id)
    mtype = msg.message_type
    if mtype is not None and not _TYPE_SHAPE.match(mtype):
        mtype = None
    if not msg.control_id:
        return _reject("parse", "missing-field", "MSH-10 (message control id) is empty", source_ref, raw, None, mtype)
    version = msg.version
    if version not in maps.versions:
        if version in maps.versions_if_known:
            unknown = sorted({n for n in msg.names if n not in known_segments() and not n.startswith("Z")})
            if unknown:
                return _reject("map", "unsupported-version", f"version {version} message uses segments HL7 v2.3-2.8 "
                               f"do not define ({', '.join(unknown)}): not mapped", source_ref, raw, control_id, mtype)
        else:
            shown = _shown(version, _VERSION_SHAPE, "a version number")
            return _reject("map", "unsupported-version", f"MSH-12 version {shown} is not supported "
                           f"(mapped: {', '.join(sorted(maps.versions))})", source_ref, raw, control_id, mtype)
    mmap = maps.messages.get(mtype or "")
    if mmap is None:
        shown = mtype or ("(empty)" if not msg.message_code else "(not a message type)")
        return _reject("map", "unsupported-message-type", f"message type {shown} (MSH-9) is not mapped "
                       f"(mapped: {', '.join(sorted(maps.messages))})", source_ref, raw, control_id, mtype)
    idx = msg.index()
    missing = [s for s in mmap.requires if s not in idx]
    if missing:
        return _reject("map", "missing-segment", f"{mtype} without {', '.join(missing)} segment", source_ref, raw,
                       control_id, mtype)
    run = Run(msg, maps, strict)
    # ids first, so that references can point at any resource of the message
    plan: list[tuple[ResourceMap, int, str]] = []
    seen: set[tuple[str, str]] = set()
    for rmap, when in zip(mmap.resources, mmap.when, strict=True):
        for pos in idx.get(rmap.anchor, ()):
            run.set_anchor(rmap, pos)
            if when and not all(run.valued(p) for p in when):
                continue
            rid = _resource_id(run, rmap, pos)
            if (rmap.type, rid) in seen:
                if rmap.shared:  # the same device again: one resource, referenced from both places
                    run.by_pos.setdefault(pos, []).append((rmap.type, rid))
                    continue
                # two segments that identify the same way: keep both apart
                rid = hashlib.blake2b(f"{rid}\x1f{pos}".encode(), digest_size=16).hexdigest()
            seen.add((rmap.type, rid))
            plan.append((rmap, pos, rid))
            run.by_pos.setdefault(pos, []).append((rmap.type, rid))
    out: list[Resource] = []
    prefix = f"{source_ref} [{control_id}]"
    for rmap, pos, rid in plan:
        run.set_anchor(rmap, pos)
        res: dict[str, Any] = {"resourceType": rmap.type, "id": rid}
        seg = msg.segments[pos]
        nfields = len(seg)
        for f, apply in rmap.program:
            if f and (f >= nfields or not seg[f]):
                continue  # the only field it reads is empty: nothing to do (the common case)
            apply(run, res)
        out.append(Resource(resource=res, source_ref=f"{prefix} {msg.locator(pos)}", raw=raw,
                            create_only=rmap.name in mmap.create_only))
    if run.errors:
        reason = run.errors[0][0]
        text = "; ".join(f"{loc}: {why}" for _, loc, why in run.errors[:20])
        return _reject("map", reason, text, source_ref, raw, control_id, mtype)
    if strict and run.invalid:
        text = "; ".join(f"{loc}: {why}" for loc, why in run.invalid[:20])
        return _reject("map", "bad-value", text, source_ref, raw, control_id, mtype)
    return MappedMessage(control_id, mtype, out, None, "AA")


__all__ = ["MappedMessage", "Mappings", "default_mappings", "known_segments", "map_message"]
