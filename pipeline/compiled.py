"""Which hot-path modules run compiled, and never a compiled module older than its source.

setup.py may compile some modules with mypyc (the Python source, built beside it as .so
files) and record the SHA-256 of each source in `_compiled.json`. Python's import system
prefers a .so to a .py of the same name, so an edited source would silently lose to the
stale build. `install()` puts a finder in front: when any compiled module's source no
longer matches its recorded hash, or when TWINLINE_PURE_PYTHON is set, every compiled
module is loaded from its .py. All or none: mypyc compiles calls between these modules
to direct C calls, so a compiled module would go on calling the stale build of an edited
one. Nothing changes for modules that were not compiled.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
MANIFEST = PACKAGE / "_compiled.json"
PURE_ENV = "TWINLINE_PURE_PYTHON"


def _built() -> dict[str, str]:
    try:
        data = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _SourceWhenStale(importlib.abc.MetaPathFinder):
    def __init__(self, built: dict[str, str], stale: list[str], pure: bool):
        self.built = built
        self.stale = stale
        self.pure = pure
        self.warned = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.built:
            return None
        source = _source(fullname)
        if not source.exists():
            return None  # nothing to run instead: the normal finders take the .so
        if not self.pure:
            if not self.stale:
                return None  # the build is current: the normal finders take the .so
            if not self.warned:
                self.warned = True
                log.warning("%s changed since the build: running the hot-path modules from source "
                            "(pip install -e . compiles them again)", ", ".join(_source(n).name for n in self.stale))
        loader = importlib.machinery.SourceFileLoader(fullname, str(source))
        return importlib.util.spec_from_file_location(fullname, source, loader=loader)


def _source(fullname: str) -> Path:
    return PACKAGE.joinpath(*fullname.split(".")[1:]).with_suffix(".py")


def _fresh(fullname: str, digest: str) -> bool | None:
    """Whether the module's source is the one it was compiled from; None: no source to read."""
    try:
        return hashlib.sha256(_source(fullname).read_bytes()).hexdigest() == digest
    except OSError:
        return None


def _stale(built: dict[str, str]) -> list[str]:
    """The compiled modules whose source changed since the build (a source that is gone
    does not count: there is nothing to run instead)."""
    return [name for name, digest in built.items() if _fresh(name, digest) is False]


_finder: _SourceWhenStale | None = None


def install() -> None:
    """Called by pipeline/__init__.py before any other submodule is imported."""
    global _finder
    built = _built()
    if not built or _finder is not None:
        return
    _finder = _SourceWhenStale(built, _stale(built), bool(os.environ.get(PURE_ENV)))
    sys.meta_path.insert(0, _finder)


def describe() -> str:
    """How this install runs, without importing anything: for `twin --version` (the first
    thing to ask when an import is slower than bench/RESULTS.md says)."""
    built = _built()
    if not built:
        return "pure Python: no compiled modules in this install"
    if os.environ.get(PURE_ENV):
        return f"pure Python: {PURE_ENV} is set"
    stale = _stale(built)
    if stale:
        return (f"pure Python: {', '.join(_source(n).name for n in stale)} changed since the build "
                "(pip install -e . compiles the hot-path modules again)")
    return f"{len(built)} of {len(built)} hot-path modules compiled"


def status() -> dict[str, str]:
    """Each module setup.py compiled: 'compiled', 'source' (stale, or pure mode asked
    for) or 'not loaded'. For benchmarks, which must say what they measured."""
    out = {}
    for name in sorted(_built()):
        mod = sys.modules.get(name)
        if mod is None:
            out[name] = "not loaded"
        else:
            out[name] = "source" if (getattr(mod, "__file__", "") or "").endswith(".py") else "compiled"
    return out
