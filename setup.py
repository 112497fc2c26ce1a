"""Build hook: compile the hot-path modules with Cython, when this machine can.

The modules stay plain Python and run as they are without this step. Compiled unchanged
by Cython (no type declarations, no .pyx), the per-message work of an HL7 v2 or FHIR
import (parse, map, views, rows) runs about 1.4x faster: it is millions of small dict
and string operations, and compiled code skips the interpreter's dispatch on each.
The same practice as pydantic v1, PyYAML and aiohttp: an optional accelerator built from
the pure-Python source, with the source as the fallback.

- No C compiler, or TWINLINE_PURE_PYTHON=1 at install time: the install goes on in pure
  Python and says so.
- The build writes pipeline/_compiled.json, the SHA-256 of each compiled module's source.
  pipeline/__init__.py loads a compiled module only while its source is unchanged, so an
  edit to a .py file takes effect at once, without a rebuild (docs/development.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules an HL7 v2 or FHIR import spends its time in (bench/RESULTS.md, "HL7 v2 end
# to end"). Others gain little: their time is in Arrow, Delta or orjson already.
ACCELERATED = [
    "pipeline.hl7v2", "pipeline.hl7v2_framing", "pipeline.hl7v2_fhir", "pipeline.hl7v2_maps",
    "pipeline.hl7v2_datatypes", "pipeline.temporal", "pipeline.ingest", "pipeline.views.columns",
    "pipeline.views.compiler", "pipeline.views.view",
]
MANIFEST = "_compiled.json"


def _source(name: str) -> Path:
    return Path(*name.split(".")).with_suffix(".py")


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install, and records what it compiled from."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no headers, a compiler error: pure Python still works
            _say(f"twinline: compiling the accelerated modules failed ({type(e).__name__}: {e}); "
                 "installing pure Python (correct, about 1.4x slower on HL7 v2 and FHIR imports)")
            for ext in self.extensions:  # none half-built: a build without its manifest would never be checked
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            return
        built = {ext.name: hashlib.sha256(_source(ext.name).read_bytes()).hexdigest() for ext in self.extensions}
        package_dir = Path(self.get_ext_fullpath("pipeline.x")).parent
        package_dir.mkdir(parents=True, exist_ok=True)
        (package_dir / MANIFEST).write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _extensions() -> list:
    if os.environ.get("TWINLINE_PURE_PYTHON"):
        _say("twinline: TWINLINE_PURE_PYTHON is set; installing pure Python")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _say("twinline: Cython is not available; installing pure Python")
        return []
    try:
        return cythonize(
            [str(_source(m)) for m in ACCELERATED],
            build_dir="build/cython",  # the generated C stays out of the source tree
            # Plain Python semantics: annotations are documentation, not C types (a `dict`
            # annotation would otherwise refuse a dict subclass), and functions keep their
            # introspection (signatures, __name__, pickling by reference).
            compiler_directives={"language_level": 3, "annotation_typing": False, "binding": True},
            nthreads=os.cpu_count() or 1,
            quiet=True,
        )
    except Exception as e:  # Cython cannot translate a module: the source still runs
        _say(f"twinline: Cython could not translate the accelerated modules ({e}); installing pure Python")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
