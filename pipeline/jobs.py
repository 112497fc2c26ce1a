"""`twin run --config job.toml`: a whole scheduled job, incremental, safe to kill, safe to run twice.

A job reads its sources into ONE run (one lock, one commit point, one `runs` row with
counts per source), then runs the gate, then builds the twins, holding the store's
lock throughout so no other job writes in between. Files are read incrementally
through the ledger, servers through their watermarks; a second run with nothing new
writes nothing and says so. A source that cannot be reached does not stop the others:
what the others brought is committed, and the job exits "source unavailable" so the
scheduler retries (the unreachable source's watermark does not move).

The job file's vocabulary is documented in docs/jobs.md and checked here: every
problem (unknown key, wrong type, missing file, unknown kind or format) is reported at
once, each with the path to its key.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .connectors import FILE_CONNECTORS, FILE_OPTIONS, kinds_taking
from .errors import ConfigError, Exit, SourceUnavailable
from .identity import load_identity_config
from .imports import fetch_fhir_into, finish_run, import_files
from .runs import Run
from .store import Store, default_store_path
from .temporal import parse_instant_arg

log = logging.getLogger(__name__)

SERVER_KINDS = ("fhir-server",)


# --------------------------------------------------------------------------- the job file


@dataclass
class SourceSpec:
    name: str
    kind: str
    options: dict[str, Any]


@dataclass
class JobSpec:
    path: Path
    name: str
    store: Path | None
    sources: list[SourceSpec]
    gate: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    identity_config: Path | None = None


class _Check:
    """Collects every problem of a job file, each with the path to its key."""

    def __init__(self, base: Path):
        self.base = base
        self.problems: list[str] = []

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def keys(self, path: str, d: dict[str, Any], allowed: dict[str, Any]) -> None:
        for k in d:
            if k not in allowed:
                self.bad(f"{path}.{k}" if path else k, f"unknown key (known here: {', '.join(sorted(allowed))})")

    def typed(self, path: str, d: dict[str, Any], key: str, types: tuple[type, ...], *, required: bool = False,
              default: Any = None) -> Any:
        if key not in d:
            if required:
                self.bad(f"{path}.{key}" if path else key, "required")
            return default
        v = d[key]
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            names = " or ".join(t.__name__.replace("str", "string").replace("float", "number") for t in types)
            self.bad(f"{path}.{key}" if path else key, f"expected {names}, got {type(v).__name__}")
            return default
        return v

    def file(self, path: str, value: str | None, *, folder_ok: bool = True) -> Path | None:
        if value is None:
            return None
        if "\x00" in value:  # no file has one; the OS would stop the name there, or refuse it later
            self.bad(path, "a path with a NUL byte")
            return None
        # Paths in a job file are the operator's configuration, not input: `../fhir` and
        # absolute paths are meant (the demo job uses them), so only NUL is refused here.
        p = Path(value)
        if not p.is_absolute():
            p = self.base / p
        if not p.exists() or (not folder_ok and p.is_dir()):
            self.bad(path, f"no such file{' or folder' if folder_ok else ''}: {value}")
        return p


_FILE_SOURCE_KEYS = {"name", "kind", "paths", "reprocess", "privacy", *FILE_OPTIONS}
_SERVER_KEYS = {"name", "kind", "base_url", "types", "since", "bulk", "group", "patient", "count", "timeout",
                "retries", "rate_limit", "verify_tls", "allowed_origin", "auth", "privacy"}
_AUTH_KEYS = {"kind", "token_env", "token_file", "username", "password_env", "password_file", "client_id",
              "token_url", "private_key_file", "key_id", "alg", "scope"}


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job file {path} is not valid TOML: {e}") from None
    return parse_job(raw, path)


def parse_job(raw: dict[str, Any], path: Path) -> JobSpec:
    c = _Check(path.parent)
    c.keys("", raw, {"job": 1, "source": 1, "gate": 1, "build": 1, "identity": 1})
    job = c.typed("", raw, "job", (dict,), default={})
    c.keys("job", job, {"name": 1, "store": 1})
    name = c.typed("job", job, "name", (str,), default=path.stem)
    store = c.typed("job", job, "store", (str,))
    store_path = (path.parent / store if store and not Path(store).is_absolute() else Path(store)) if store else None
    sources: list[SourceSpec] = []
    names: set[str] = set()
    raw_sources = c.typed("", raw, "source", (list,), required=True, default=[])
    for i, s in enumerate(raw_sources):
        at = f"source[{i}]"
        if not isinstance(s, dict):
            c.bad(at, "expected a table ([[source]])")
            continue
        sname = c.typed(at, s, "name", (str,), required=True)
        if sname in names:
            c.bad(f"{at}.name", f"{sname!r} names another source too")
        names.add(sname)
        kind = c.typed(at, s, "kind", (str,), required=True)
        known_kinds = sorted(FILE_CONNECTORS) + list(SERVER_KINDS)
        if kind is not None and kind not in known_kinds:
            c.bad(f"{at}.kind", f"unknown kind {kind!r} (one of {', '.join(known_kinds)})")
            continue
        if kind in FILE_CONNECTORS:
            c.keys(at, s, dict.fromkeys(_FILE_SOURCE_KEYS))
            paths = c.typed(at, s, "paths", (list,), required=True, default=[])
            resolved = []
            for j, p in enumerate(paths):
                if not isinstance(p, str):
                    c.bad(f"{at}.paths[{j}]", "expected a string")
                else:
                    resolved.append(c.file(f"{at}.paths[{j}]", p))
            opts = {"paths": resolved, "reprocess": c.typed(at, s, "reprocess", (bool,), default=False),
                    "strict": c.typed(at, s, "strict", (bool,), default=False)}
            for key in (k for k in FILE_OPTIONS if k != "strict"):  # the others are text
                v = c.typed(at, s, key, (str,))
                if v is not None:
                    opts[key] = v
            for key in FILE_CONNECTORS[kind].misplaced({k: v for k, v in opts.items() if k not in ("paths", "reprocess")}):
                c.bad(f"{at}.{key}", f"applies to {kinds_taking(key)} sources, not {kind}")
            _check_format(c, at, kind, opts.get("format"))
        elif kind == "fhir-server":
            c.keys(at, s, dict.fromkeys(_SERVER_KEYS))
            opts = {"base_url": c.typed(at, s, "base_url", (str,), required=True)}
            if opts["base_url"] and not opts["base_url"].startswith(("http://", "https://")):
                c.bad(f"{at}.base_url", "expected an http:// or https:// URL")
            for key, types in (("types", (list,)), ("since", (str,)), ("bulk", (bool,)), ("group", (str,)),
                               ("patient", (str,)), ("count", (int,)), ("timeout", (list,)), ("retries", (int,)),
                               ("rate_limit", (int, float)), ("verify_tls", (bool,)), ("allowed_origin", (str,))):
                v = c.typed(at, s, key, types)
                if v is not None:
                    opts[key] = v
            if "since" in opts:  # checked here, with its path, rather than when the job is half run
                try:
                    parse_instant_arg(opts["since"])
                except ConfigError as e:
                    c.bad(f"{at}.since", str(e))
                    del opts["since"]
            timeout = opts.get("timeout")
            if timeout is not None and not (1 <= len(timeout) <= 2 and all(
                    isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in timeout)):
                c.bad(f"{at}.timeout", "expected [connect, read] seconds, e.g. [10, 120]")
                del opts["timeout"]
            for key in ("retries", "count"):
                if isinstance(opts.get(key), int) and opts[key] < (0 if key == "retries" else 1):
                    c.bad(f"{at}.{key}", f"expected {'0 or more' if key == 'retries' else 'a positive number'}")
            auth = c.typed(at, s, "auth", (dict,), default={})
            c.keys(f"{at}.auth", auth, dict.fromkeys(_AUTH_KEYS))
            if auth.get("kind", "none") not in ("none", "bearer", "basic", "smart"):
                c.bad(f"{at}.auth.kind", "expected none, bearer, basic or smart")
            if "private_key_file" in auth:
                auth = dict(auth, private_key_file=str(c.file(f"{at}.auth.private_key_file", auth["private_key_file"],
                                                              folder_ok=False)))
            opts["auth"] = auth
        else:  # pragma: no cover - unreachable: kinds are checked above
            continue
        privacy = c.typed(at, s, "privacy", (str,), default="none")
        if privacy not in ("none", "pseudonymise", "deid"):
            c.bad(f"{at}.privacy", "expected none, pseudonymise or deid")
        opts["privacy"] = privacy
        if sname and kind:
            sources.append(SourceSpec(sname, kind, opts))
    if not raw_sources:
        c.bad("source", "a job needs at least one [[source]]")
    gate = c.typed("", raw, "gate", (dict,), default={})
    c.keys("gate", gate, {"enabled": 1, "config": 1, "report": 1})
    c.typed("gate", gate, "enabled", (bool,))
    if "config" in gate:
        gate = dict(gate, config=c.file("gate.config", c.typed("gate", gate, "config", (str,)), folder_ok=False))
    if "report" in gate:
        rep = c.typed("gate", gate, "report", (str,))
        gate = dict(gate, report=(path.parent / rep) if rep and not Path(rep).is_absolute() else rep)
    build = c.typed("", raw, "build", (dict,), default={})
    c.keys("build", build, {"enabled": 1, "force": 1})
    c.typed("build", build, "enabled", (bool,))
    c.typed("build", build, "force", (bool,))
    ident = c.typed("", raw, "identity", (dict,), default={})
    c.keys("identity", ident, {"config": 1})
    ident_path = c.file("identity.config", c.typed("identity", ident, "config", (str,)), folder_ok=False)
    if c.problems:
        raise ConfigError(f"the job file {path} has {len(c.problems)} problem(s)", c.problems)
    return JobSpec(path, name, store_path, sources, gate, build, ident_path)


def _check_format(c: _Check, at: str, kind: str, fmt: str | None) -> None:
    """Device-log formats are mapping files: an unknown one is a config error, caught here."""
    if fmt is None or kind != "csv":
        return
    from .devices import load_formats

    names = load_formats()
    if fmt not in names:
        c.bad(f"{at}.format", f"unknown format {fmt!r} (one of {', '.join(sorted(names))})")


# --------------------------------------------------------------------------- running


@dataclass
class JobResult:
    run: Run
    exit_code: Exit
    unavailable: list[str]
    gate_passed: bool | None = None
    build_summary: str | None = None
    report: Path | None = None
    lines: list[str] = field(default_factory=list)


def _hooks(spec: SourceSpec):
    from .privacy import privacy_hooks

    return privacy_hooks(spec.options.get("privacy", "none"), source=spec.name)


def _fetch_options(opts: dict[str, Any]):
    from .auth import AuthConfig
    from .connectors.fhir_server import FetchOptions

    kw: dict[str, Any] = {"base_url": opts["base_url"], "state_dir": Path("."), "auth": AuthConfig(**opts.get("auth", {}))}
    for key in ("types", "bulk", "group", "patient", "count", "rate_limit", "allowed_origin"):
        if key in opts:
            kw[key] = opts[key]
    if "retries" in opts:
        kw["max_retries"] = opts["retries"]
    if "verify_tls" in opts:
        kw["verify_tls"] = opts["verify_tls"]
    if "timeout" in opts:
        kw["timeout"] = tuple(float(x) for x in opts["timeout"])
    if "since" in opts:
        kw["since"] = parse_instant_arg(opts["since"])
    return FetchOptions(**kw)


def run_job(spec: JobSpec, *, store: Store | None = None, force: bool | None = None, engine: Any = None) -> JobResult:
    """Run a job. `engine` (e.g. pipeline.engines.spark.SparkEngine) runs the file imports
    and the build elsewhere; None runs everything in this process."""
    store = store or Store(spec.store or default_store_path())
    importer = engine.import_files if engine is not None else import_files
    unavailable: list[str] = []
    hooks = {src.name: _hooks(src) for src in spec.sources}  # a bad privacy setup stops the job before it reads
    # [identity] config: linked under those rules (a bad file stops the job before it reads, too)
    identity = load_identity_config(spec.identity_config) if spec.identity_config else None
    with store.locked(f"run {spec.name}"):
        run = Run(store, "run", inputs=[str(spec.path)])
        fetches = []
        try:
            for src in spec.sources:
                try:
                    if src.kind in FILE_CONNECTORS:
                        options = {k: v for k, v in src.options.items() if k not in ("paths", "reprocess", "privacy")}
                        importer(store, run, src.kind, src.options["paths"], source=src.name, options=options,
                                 reprocess=src.options.get("reprocess", False), hooks=hooks[src.name])
                    elif src.kind == "fhir-server":
                        fetches.append(fetch_fhir_into(store, run, _fetch_options(src.options), source=src.name,
                                                       hooks=hooks[src.name]))
                except SourceUnavailable as e:
                    log.warning("source %s unavailable: %s", src.name, e)
                    run.notes.append(f"{src.name}: unavailable, retry later ({e})")
                    unavailable.append(src.name)
            nothing_new = run.totals().read == 0 and not unavailable
            if nothing_new:
                run.notes.append("nothing new since the last run: no table changed")
            finish_run(store, run, identity)
        except BaseException:
            store.rollback()
            raise
        for f in fetches:
            f.finished()
            f.close()
        result = JobResult(run, run.exit_code(), unavailable)
        if unavailable:
            result.exit_code = Exit.SOURCE_UNAVAILABLE
        if nothing_new and not _build_pending(store):
            return result
        if spec.gate.get("enabled", True):
            from .gate_runs import run_check

            checker = engine.check if engine is not None else run_check
            check = checker(store, config=spec.gate.get("config"), report_dir=spec.gate.get("report"))
            result.gate_passed = check.passed
            result.report = check.report_html
            result.lines.append(check.summary())
            if not check.passed and result.exit_code != Exit.SOURCE_UNAVAILABLE:
                result.exit_code = Exit.GATE_FAILED
        forced = spec.build.get("force", False) if force is None else force
        if spec.build.get("enabled", True) and (result.gate_passed is not False or forced):
            from .twins import build_twins

            build = engine.build_twins if engine is not None else build_twins
            result.build_summary = build(store, force=forced).summary()
    return result


def _build_pending(store: Store) -> bool:
    """Did data arrive after the last build? (A job killed between its import and its
    build left it so: the next run, with nothing new to read, still finishes the job.)"""
    import pyarrow.compute as pc

    runs = store.read("runs", ["run_id", "command", "units_written"])
    data = runs.filter(pc.and_(pc.is_in(runs.column("command"), pa_array(["import", "fetch", "run", "listen", "retry"])),
                               pc.greater(runs.column("units_written"), 0)))
    builds = runs.filter(pc.equal(runs.column("command"), "build"))
    last_data = max(data.column("run_id").to_pylist(), default=None)
    last_build = max(builds.column("run_id").to_pylist(), default=None)
    return last_data is not None and (last_build is None or last_build < last_data)


def pa_array(values):
    import pyarrow as pa

    return pa.array(values)


