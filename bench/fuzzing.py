"""The loop every long fuzzer here shares: options, progress, failures kept, exit code.

A fuzzer supplies one execution (`Fuzz.more()` / `Fuzz.failed()` around it) and what to
say at the end; this module decides when to stop (executions or seconds), prints
progress every 100,000 executions, keeps each failing input in $TMPDIR with its
traceback on stderr, stops after five failures and returns 1 when there was any.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

MAX_FAILURES = 5


def options(doc: str) -> argparse.ArgumentParser:
    """The options every fuzzer takes; a fuzzer adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--executions", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long (default: no limit)")
    ap.add_argument("--seed", type=int, default=1)
    return ap


class Fuzz:
    def __init__(self, name: str, suffix: str, args: argparse.Namespace):
        self.name, self.suffix = name, suffix
        self.limit = args.executions
        self.started = time.monotonic()
        self.end = self.started + args.seconds if args.seconds else float("inf")
        self.runs = self.failures = 0

    def more(self) -> bool:
        """Another execution? Counts it, and reports progress now and then."""
        if self.runs and self.runs % 100_000 == 0:
            print(f"{self.runs:,} executions, {time.monotonic() - self.started:.0f} s, {self.failures} failures",
                  flush=True)
        if self.runs >= self.limit or time.monotonic() >= self.end or self.failures >= MAX_FAILURES:
            return False
        self.runs += 1
        return True

    def failed(self, save: Callable[[Path], None]) -> None:
        """Call from the `except` block: keeps the input (`save(path)`) and prints the traceback."""
        self.failures += 1
        out = Path(tempfile.gettempdir()) / f"fuzz-{self.name}-failure-{self.failures}{self.suffix}"
        save(out)
        print(f"FAILURE {self.failures}: input in {out}\n{traceback.format_exc()}", file=sys.stderr)

    def finish(self, seeds: str) -> int:
        seconds = time.monotonic() - self.started
        print(f"{self.runs:,} executions in {seconds:.0f} s ({self.runs / seconds:,.0f}/s) from {seeds}, "
              f"{self.failures} failures")
        return 1 if self.failures else 0
