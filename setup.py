"""Build hook: compile the hot-path modules with mypyc, when this machine can.

The modules stay plain Python and run as they are without this step. mypyc (the
compiler of mypy, the same as black and mypy itself ship compiled with) turns the
type-annotated source into C: classes become C structs, calls between the compiled
modules direct C calls, annotated locals native values. The per-message work of an
HL7 v2 or FHIR import (parse, map, views, rows) is millions of small attribute, dict and
string operations, and runs in about half the instructions (bench/RESULTS.md).

- Annotations are enforced in the compiled modules: a value of the wrong type raises
  TypeError there. The modules type-check clean under mypy (tests/test_compiled.py),
  and the suite runs against the compiled build.
- No C compiler, no mypy, or TWINLINE_PURE_PYTHON=1 at install time: the install goes on
  in pure Python and says so.
- The build writes pipeline/_compiled.json, the SHA-256 of each compiled module's source.
  pipeline/compiled.py loads the compiled modules only while every one of those sources
  is unchanged (compiled modules call each other directly, so they run together or not
  at all): an edit to one takes effect at once, without a rebuild (docs/development.md).
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
    "pipeline.views.compiler", "pipeline.views.view", "pipeline.references",
]
# mypyc puts the compiled code of all of them in one shared library, here inside the
# package (pipeline/_accelerated__mypyc*.so); each module is a small stub that loads it.
GROUP = "pipeline._accelerated"
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
                 "installing pure Python (correct, about 1.6x slower on HL7 v2 and FHIR imports)")
            for ext in self.extensions:  # none half-built: a build without its manifest would never be checked
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            return
        built = {name: hashlib.sha256(_source(name).read_bytes()).hexdigest() for name in ACCELERATED}
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
        from mypyc.build import mypycify
    except ImportError:
        _say("twinline: mypyc (mypy) is not available; installing pure Python")
        return []
    try:
        # Type errors in the modules they import (mypy analyses those too) are not theirs to
        # report: the build stands on the compiled modules' own types.
        return mypycify(["--follow-imports=silent", *(str(_source(m)) for m in ACCELERATED)],
                        opt_level="3", debug_level="1",
                        group_name=GROUP, target_dir="build/mypyc")
    except (Exception, SystemExit) as e:  # a type error, or mypyc cannot translate a module: the source still runs
        _say(f"twinline: mypyc could not compile the accelerated modules ({e!r}); installing pure Python")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
