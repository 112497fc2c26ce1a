"""Names from input that become file paths: kept inside their folder, or refused.

Wherever a name read from input (a DICOMDIR's Referenced File ID, a source name that
names a spool or download folder, a name in an archive or manifest) is turned into a
path, it goes through here, so that `..`, an absolute path, a NUL byte or a symbolic
link pointing elsewhere can never make Twinline read or write outside the folder it
was given (docs/privacy-logs.md, "Hostile input limits").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class UnsafePath(ValueError):
    """A name that would leave its folder. `reason` is a stable code; the text names no value."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def contained(root: str | os.PathLike[str], *parts: str) -> str:
    """`root` joined with `parts`, each one path component, provided the result stays inside root.

    Refused (UnsafePath): an empty part, a NUL byte, a path separator or drive inside a
    part, `.` or `..`, and a result whose real path (symbolic links followed, as far as
    they exist) lies outside the real path of root.
    """
    base = os.fspath(root)
    if not parts:
        raise UnsafePath("empty-name", "no name given")
    for p in parts:
        if not isinstance(p, str) or not p:
            raise UnsafePath("empty-name", "an empty name")
        if "\x00" in p:
            raise UnsafePath("nul-byte", "a name with a NUL byte")
        if os.path.isabs(p) or (os.path.splitdrive(p)[0]):
            raise UnsafePath("absolute-path", "an absolute path where a name inside the folder was expected")
        if "/" in p or "\\" in p:
            raise UnsafePath("path-separator", "a name with a path separator where one component was expected")
        if p in (".", ".."):
            raise UnsafePath("parent-reference", "a name that refers to the folder itself or its parent")
    target = os.path.join(base, *parts)
    real_root = os.path.realpath(base)
    real = os.path.realpath(target)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafePath("outside-root", "a name that leads outside its folder through a symbolic link")
    return target


def safe_name(name: str, fallback: str = "source") -> str:
    """One harmless path component made from any string (a source name naming a spool folder).

    Characters other than letters, digits, `-`, `_` and `.` become `_`; a name that is
    empty, `.`, `..` or starts with a dot (hidden, or a parent reference) is prefixed with `_`.
    """
    out = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    if not out:
        return fallback
    return "_" + out if out.startswith(".") else out


def inside(root: str | os.PathLike[str], child: str | os.PathLike[str]) -> bool:
    """Does a file found below `root` really lie there? A symbolic link in an export folder
    can point anywhere (/etc, another patient's export): walking a folder never follows
    one out of it. Logged with the link's path, a locator. Files named directly are read."""
    try:
        ok = Path(child).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a loop of links
        ok = False
    if not ok:
        log.warning("%s: a symbolic link to a file outside %s, not read", child, root)
    return ok


__all__ = ["UnsafePath", "contained", "inside", "safe_name"]
