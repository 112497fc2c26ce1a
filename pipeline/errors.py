"""Errors grouped by what the caller should do, and the exit codes schedulers see.

Exit codes are a contract (README, "Exit codes"): a code keeps its meaning forever and
is never reused for another. Record-level problems are not here: they are `Rejected`
values that go to quarantine.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0                 # success, nothing quarantined
    INTERNAL = 1           # a bug: please report it (Python's default for an uncaught error)
    USAGE = 2              # bad command line or configuration: fix it, retrying will not help
    QUARANTINED = 3        # success, but some units went to quarantine: see `twin quarantine list`
    GATE_FAILED = 4        # an error-level quality or bias check failed: see the report
    SOURCE_UNAVAILABLE = 5 # a server or file system did not answer: retry later
    LOCK_HELD = 6          # another run holds the store's lock: try again when it ends
    INTERRUPTED = 130      # stopped by the user (SIGINT); the store is left as before the run


class TwinlineError(Exception):
    """Base class. `exit_code` says what the process should exit with."""

    exit_code: Exit = Exit.INTERNAL


class ConfigError(TwinlineError):
    """Bad configuration or command line. Fatal: fix and re-run.

    `problems` lists every problem found, each with the path to the bad key, so that a
    user fixes them all in one go.
    """

    exit_code = Exit.USAGE

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        super().__init__(message if not self.problems else message + "\n" + "\n".join(f"  - {p}" for p in self.problems))


class SourceUnavailable(TwinlineError):
    """A server or file system did not answer after retries. Retriable: run again later."""

    exit_code = Exit.SOURCE_UNAVAILABLE


class LockHeld(TwinlineError):
    """Another process is writing the store."""

    exit_code = Exit.LOCK_HELD


class GateFailed(TwinlineError):
    """An error-level check failed; twins are not built unless forced."""

    exit_code = Exit.GATE_FAILED


class StoreError(TwinlineError):
    """The store is not usable (wrong schema version, corrupt manifest)."""

    exit_code = Exit.USAGE
