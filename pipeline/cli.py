"""The `twin` command: a thin layer over the library.

Each command parses its arguments, calls one library function, prints a summary, and
turns library errors into a clean message and a documented exit code (README, "Exit
codes"). No logic lives here that a scheduler or a test could not reach through the
library.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, compiled
from .connectors import FILE_CONNECTORS, FILE_OPTIONS
from .errors import ConfigError, Exit, TwinlineError
from .store import Store, default_store_path

log = logging.getLogger("twinline")


# --------------------------------------------------------------------------- output


def _fmt(n: int) -> str:
    return f"{n:,}"


def print_run_summary(run, out=None) -> None:
    """The summary every writing command ends with: read, written per table, quarantined."""
    out = out or sys.stdout
    t = run.totals()
    print(f"run {run.run_id} ({run.command}): {run.status()}", file=out)
    for source, c in sorted(run.counts.items()):
        parts = [f"written {_fmt(c.written)}", f"unchanged {_fmt(c.unchanged)}"]
        if c.ignored:
            kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(c.ignored_types.items(), key=lambda kv: -kv[1]))
            parts.append(f"ignored {_fmt(c.ignored)} (no view: {kinds})" if kinds else f"ignored {_fmt(c.ignored)}")
        parts.append(f"quarantined {_fmt(c.quarantined)}")
        if c.deleted:
            parts.append(f"of which deletions {_fmt(c.deleted)}")
        ok = "" if c.reconciles() else "  (DOES NOT RECONCILE: please report)"
        print(f"  {source}: read {_fmt(c.read)} units = " + " + ".join(parts) + ok, file=out)
    tables = {k: v for k, v in sorted(run.rows.items()) if k != "quarantine" and any(v.values())}
    if tables:
        print("  rows written: " + ", ".join(f"{k} {_fmt(v.get('written', 0))}" for k, v in tables.items()), file=out)
    if t.quarantined:
        print(f"  {_fmt(t.quarantined)} unit(s) quarantined: `twin quarantine list` shows them", file=out)
    for note in run.notes:
        print(f"  note: {note}", file=out)


def _setup_logging(args: argparse.Namespace) -> None:
    from .logs import install

    level = logging.DEBUG if args.verbose >= 2 else logging.INFO if args.verbose == 1 else logging.WARNING
    # tracebacks and warnings without the exception texts that could quote values (docs/privacy-logs.md)
    install(level, json_lines=getattr(args, "log_format", "text") == "json")
    # Libraries that log chattily at INFO (Great Expectations announces its temporary
    # folders) speak only at -vv.
    for name in ("great_expectations", "py4j", "urllib3"):
        lib = logging.getLogger(name)
        lib.setLevel(logging.DEBUG if args.verbose >= 2 else logging.WARNING)
        lib.handlers[:] = []
        lib.propagate = True


def _progress_bar(label: str):
    """A byte-based progress bar on stderr, only when a person is watching."""
    if not sys.stderr.isatty() or os.environ.get("TWIN_NO_PROGRESS"):
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False)

    def update(state) -> None:
        bar.total = state.total_bytes
        bar.n = state.done_bytes
        bar.set_postfix_str(f"{state.units:,} units", refresh=False)
        bar.refresh()

    return update, bar.close


# --------------------------------------------------------------------------- commands


def _store(args: argparse.Namespace) -> Store:
    return Store(Path(args.store) if args.store else default_store_path())


def _privacy(args: argparse.Namespace, source: str):
    """The privacy hooks the --pseudonymise / --deid flags ask for (docs/privacy.md)."""
    from .privacy import privacy_hooks

    profile = "deid" if args.deid else "pseudonymise" if args.pseudonymise else None
    if args.deid_dates and profile != "deid":
        raise ConfigError("--deid-dates goes with --deid")
    return privacy_hooks(profile, source=source, dates=args.deid_dates)


def cmd_import(args: argparse.Namespace) -> int:
    from .imports import run_import

    options: dict[str, Any] = {}
    for key in FILE_OPTIONS:
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if args.engine == "spark":  # docs/spark.md
        from .engines.spark import spark_import

        run = spark_import(_store(args), args.kind, args.paths, master=args.master, source=args.source,
                           options=options, reprocess=args.reprocess, hooks=_privacy(args, args.source or args.kind))
        print_run_summary(run)
        return int(run.exit_code())
    update, close = _progress_bar(f"import {args.kind}")
    try:
        run = run_import(_store(args), args.kind, args.paths, source=args.source, options=options,
                         reprocess=args.reprocess, progress=update, hooks=_privacy(args, args.source or args.kind))
    finally:
        close()
    print_run_summary(run)
    return int(run.exit_code())


def _fetch_progress():
    """X-Progress and download counts on one status line, when a person is watching."""
    if not sys.stderr.isatty() or os.environ.get("TWIN_NO_PROGRESS"):
        return None

    def show(p) -> None:
        done = f" {p.done:,}" + (f"/{p.total:,}" if p.total else "") if p.done is not None else ""
        sys.stderr.write(f"\r\x1b[K{p.phase}: {p.detail}{done}")
        sys.stderr.flush()

    return show


def cmd_fetch_fhir(args: argparse.Namespace) -> int:
    from .auth import AuthConfig
    from .connectors.fhir_server import FetchOptions
    from .imports import run_fetch_fhir
    from .temporal import parse_instant_arg

    auth = AuthConfig(kind=args.auth, token_env=args.token_env, token_file=args.token_file, username=args.username,
                      password_env=args.password_env, password_file=args.password_file, client_id=args.client_id,
                      token_url=args.token_url, private_key_file=args.private_key, key_id=args.key_id,
                      alg=args.alg, scope=args.scope)
    connect, _, read = args.timeout.partition(",")
    try:
        timeout = (float(connect), float(read or connect))
    except ValueError:
        raise ConfigError("--timeout takes seconds: CONNECT[,READ], e.g. 10,120") from None
    opts = FetchOptions(
        base_url=args.base_url, types=args.types.split(",") if args.types else None,
        since=parse_instant_arg(args.since) if args.since else None, bulk=args.bulk, group=args.group,
        patient=args.patient, count=args.count, auth=auth, state_dir=Path("."), timeout=timeout,
        max_retries=args.retries, rate_limit=args.rate_limit, verify_tls=not args.no_verify_tls,
        progress=_fetch_progress(), allowed_origin=args.allowed_origin)
    run = run_fetch_fhir(_store(args), opts, source=args.source, hooks=_privacy(args, args.source))
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    print_run_summary(run)
    return int(run.exit_code())


def cmd_run(args: argparse.Namespace) -> int:
    from .jobs import load_job, run_job

    spec = load_job(args.config)
    store = Store(Path(args.store)) if args.store else None
    engine = None
    if args.engine == "spark":  # file imports, the gate and the build on Spark; server fetches in this process
        from .engines.spark import SparkEngine

        engine = SparkEngine(args.master)
    result = run_job(spec, store=store, force=True if args.force else None, engine=engine)
    print_run_summary(result.run)
    for line in result.lines:
        print(line)
    if result.build_summary:
        print(result.build_summary)
    elif result.gate_passed is False:
        print("twins not built: the gate failed (see the report; --force builds anyway)")
    return int(result.exit_code)


def cmd_listen_mllp(args: argparse.Namespace) -> int:
    from .connectors.mllp import ServerStats, tls_context
    from .listen import listen_mllp

    ctx = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        ctx = tls_context(args.tls_cert, args.tls_key, args.tls_ca, args.require_client_cert)
    stats = ServerStats()
    result = listen_mllp(_store(args), args.host, args.port, source=args.source, ssl_context=ctx,
                         batch_max=args.batch_max, batch_wait_ms=args.batch_wait_ms, drain_every=args.drain_every,
                         strict=args.strict, stats=stats, privacy=_privacy(args, args.source))
    print(f"listened on {args.host}:{args.port}: {result.drained_messages:,} message(s) stored in "
          f"{result.drains:,} drain(s); {result.waits_for_lock:,} wait(s) for the store's lock")
    return int(Exit.OK)


def cmd_check(args: argparse.Namespace) -> int:
    from .gate_runs import run_check

    spark = None
    if args.engine == "spark":  # docs/spark.md
        from .engines.spark import spark_session

        spark = spark_session(args.master)
    outcome = run_check(_store(args), config=args.config, report_dir=args.report, spark=spark)
    print(outcome.summary())
    return int(Exit.OK if outcome.passed else Exit.GATE_FAILED)


def cmd_fetch_dicomweb(args: argparse.Namespace) -> int:
    from .imports import run_fetch_dicomweb
    from .temporal import parse_instant_arg

    headers = {}
    for h in args.header or []:
        name, sep, value = h.partition(":")
        if not sep:
            raise ConfigError(f"--header takes NAME:VALUE, got {name!r}")
        headers[name.strip()] = value.strip()
    if args.auth_header_env:
        value = os.environ.get(args.auth_header_env)
        if not value:
            raise ConfigError(f"--auth-header-env: the environment variable {args.auth_header_env} is not set")
        headers["Authorization"] = value
    since = parse_instant_arg(args.since).date() if args.since else None
    run = run_fetch_dicomweb(_store(args), args.base_url, source=args.source, since=since, headers=headers or None,
                             options={"patient_rule": args.patient_rule, "timezone": args.timezone,
                                      "retries": args.retries}, hooks=_privacy(args, args.source))
    print_run_summary(run)
    return int(run.exit_code())


def cmd_build(args: argparse.Namespace) -> int:
    from .temporal import parse_instant_arg
    from .twins import build_twins

    as_of = parse_instant_arg(args.as_of) if args.as_of else None
    if args.engine == "spark":  # docs/spark.md
        from .engines.build import spark_build
        from .engines.spark import spark_session

        result = spark_build(_store(args), spark_session(args.master), as_of=as_of, force=args.force)
    else:
        result = build_twins(_store(args), as_of=as_of, force=args.force)
    print(result.summary())
    return int(Exit.OK)


def cmd_link_report(args: argparse.Namespace) -> int:
    from .identity import link_report, load_identity_config

    print(link_report(_store(args), load_identity_config(args.config)))
    return int(Exit.OK)


def cmd_show(args: argparse.Namespace) -> int:
    from .twins import show_twin

    print(show_twin(_store(args), args.patient))
    return int(Exit.OK)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_twins, parse_window
    from .twins import find_twin

    if args.all == bool(args.patient):
        raise ConfigError("`twin export` takes one PATIENT or --all")
    store = _store(args)
    twins = None if args.all else [find_twin(store, args.patient)]
    result = export_twins(store, args.out, twins, validate=args.validate, stream_window=parse_window(args.stream_window))
    print(result.summary())
    return int(result.exit_code())


def cmd_maintain(args: argparse.Namespace) -> int:
    from .maintenance import maintain

    print(maintain(_store(args), vacuum_days=args.vacuum_days).summary())
    return int(Exit.OK)


def _days(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError("a number of days, 0 or more")
    return v


def cmd_status(args: argparse.Namespace) -> int:
    from .status import store_status

    print(store_status(_store(args), limit=args.limit))
    return int(Exit.OK)


def cmd_quarantine(args: argparse.Namespace) -> int:
    from . import quarantine

    store = _store(args)
    if args.action == "list":
        print(quarantine.list_entries(store, limit=args.limit, reason=args.reason, include_resolved=args.all))
    elif args.action == "show":
        if not args.id:
            raise ConfigError("`twin quarantine show` needs the entry id (from `twin quarantine list`)")
        print(quarantine.show_entry(store, args.id, payload=args.payload))
    elif args.action == "retry":
        run = quarantine.retry(store, ids=[args.id] if args.id else None, reason=args.reason, source=args.source)
        print_run_summary(run)
        return int(run.exit_code())
    return int(Exit.OK)


def cmd_views_test(args: argparse.Namespace) -> int:
    from .views.conformance import main as run_folder

    return run_folder(args.dir)


# --------------------------------------------------------------------------- parser


def _common_options(*, top: bool) -> argparse.ArgumentParser:
    """--store, -v and --log-format, accepted before the command and after it.

    The command's copy has no defaults (SUPPRESS): argparse copies a subcommand's
    defaults over the values already parsed, so `twin --store DIR import ...` would
    otherwise silently write to ./twinstore.
    """
    def default(value):
        return value if top else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", default=default(None),
                        help="the twin store (default: $TWIN_STORE or ./twinstore)")
    common.add_argument("-v", "--verbose", action="count", default=default(0), help="more log output (-vv: debug)")
    common.add_argument("--log-format", choices=["text", "json"], default=default("text"),
                        help="log lines on stderr as text (default) or JSON lines")
    return common


def build_parser() -> argparse.ArgumentParser:
    top, common = _common_options(top=True), _common_options(top=False)
    privacy = argparse.ArgumentParser(add_help=False)
    pv = privacy.add_mutually_exclusive_group()
    pv.add_argument("--pseudonymise", action="store_true",
                    help="replace identifiers and ids by keyed hashes (key: $TWIN_KEY or $TWIN_KEY_FILE)")
    pv.add_argument("--deid", action="store_true",
                    help="de-identify: pseudonymise, then keep only mappings/deid/'s allow-lists (Safe Harbor, PS3.15)")
    privacy.add_argument("--deid-dates", choices=["year", "shift"],
                         help="with --deid: dates to the year, or shifted per patient (default: config/privacy.toml)")
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--engine", choices=["single", "spark"], default="single",
                        help="where the work runs: this process (default) or Apache Spark (docs/spark.md)")
    engine.add_argument("--master", default="local[2]", metavar="URL",
                        help="with --engine spark: local[N] or a cluster URL (default local[2])")

    p = argparse.ArgumentParser(prog="twin", description="Twinline: patient digital twins from hospital data.",
                                parents=[top])
    p.add_argument("--version", action="version", version=f"twinline {__version__} ({compiled.describe()})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", parents=[common, engine, privacy], help="import files and folders",
                         description="Import files and folders of one kind into the store, as one run.")
    imp.add_argument("kind", choices=sorted(FILE_CONNECTORS), help="what the files hold")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (folders are walked)")
    imp.add_argument("--source", help="source name recorded on every row (default: the kind)")
    imp.add_argument("--format", metavar="NAME",
                     help="csv: the mapping (mappings/devices/NAME.toml); default: recognised from each file")
    # these win over what a file says (mappings/devices/README.md): say so, a user relies on it
    imp.add_argument("--patient-id", metavar="ID", help="csv: the patient of every row (wins over ids in the files)")
    imp.add_argument("--patient-system", metavar="URI",
                     help="csv: the namespace of --patient-id (or of the files' patient ids), e.g. the hospital's MRN system")
    imp.add_argument("--device-id", metavar="ID", help="csv: the device of every row (wins over ids in the files)")
    imp.add_argument("--downsample", metavar="WINDOW",
                     help="csv: 1-minute mean/min/max per signal (e.g. 1min, 30s; 'raw' keeps every sample)")
    imp.add_argument("--patient-rule", metavar="RULE",
                     help="dicom: link files without PatientID: patient_id_from=<Keyword> or patient_id=<id>")
    imp.add_argument("--timezone", metavar="ZONE", help="dicom: IANA zone of the files' local times")
    imp.add_argument("--strict", action="store_true",
                     help="hl7v2: reject a message when a value does not convert (default: leave it out, marked)")
    imp.add_argument("--reprocess", action="store_true",
                     help="read files again even if the ledger says they were imported unchanged")
    imp.set_defaults(func=cmd_import)

    fetch = sub.add_parser("fetch", parents=[common], help="pull from a server",
                           description="Pull from a server, incrementally: the watermark of the last run is used "
                                       "when --since is not given.")
    fsub = fetch.add_subparsers(dest="fetch_kind", required=True, metavar="KIND")
    ff = fsub.add_parser("fhir", parents=[common, privacy], help="FHIR REST search or Bulk Data $export",
                         description="FHIR search (following next links) or Bulk Data $export (--bulk).")
    ff.add_argument("base_url", metavar="BASE_URL")
    ff.add_argument("--types", help="resource types, comma separated (default: those the views map)")
    ff.add_argument("--since", metavar="T", help="only resources changed after T (default: the last watermark)")
    ff.add_argument("--bulk", action="store_true", help="use Bulk Data $export instead of search")
    ff.add_argument("--group", metavar="ID", help="with --bulk: export Group/ID")
    ff.add_argument("--patient", metavar="IDS", help="with --bulk: Patient/$export; '*' for all, or ids, comma separated")
    ff.add_argument("--count", type=int, default=1000, help="search page size (_count, default 1000)")
    ff.add_argument("--source", default="fhir", help="source name recorded on every row (default: fhir)")
    ff.add_argument("--auth", choices=["none", "bearer", "basic", "smart"], default="none")
    ff.add_argument("--token-env", metavar="VAR", help="bearer: environment variable holding the token")
    ff.add_argument("--token-file", metavar="FILE", help="bearer: file holding the token")
    ff.add_argument("--username", help="basic: user name")
    ff.add_argument("--password-env", metavar="VAR", help="basic: environment variable holding the password")
    ff.add_argument("--password-file", metavar="FILE", help="basic: file holding the password")
    ff.add_argument("--client-id", help="smart: client id registered with the server")
    ff.add_argument("--token-url", help="smart: token endpoint (default: from .well-known/smart-configuration)")
    ff.add_argument("--private-key", metavar="PEM", help="smart: private key file (RSA for RS384, EC P-384 for ES384)")
    ff.add_argument("--key-id", help="smart: kid of the key")
    ff.add_argument("--alg", choices=["RS384", "ES384"], default="RS384")
    ff.add_argument("--scope", default="system/*.read")
    ff.add_argument("--timeout", default="10,120", metavar="CONNECT,READ", help="seconds (default 10,120)")
    ff.add_argument("--retries", type=int, default=5, help="retries on 429, 5xx and dropped connections (default 5)")
    ff.add_argument("--rate-limit", type=float, metavar="PER_S", help="at most this many requests per second")
    ff.add_argument("--allowed-origin", metavar="URL", help="one more origin bulk files may come from (object storage)")
    ff.add_argument("--no-verify-tls", action="store_true", help="do not verify the server's certificate (testing only)")
    ff.set_defaults(func=cmd_fetch_fhir)
    fd = fsub.add_parser("dicomweb", parents=[common, privacy], help="DICOMweb: QIDO-RS search, WADO-RS metadata",
                         description="Study, series and instance metadata from a PACS over DICOMweb (never pixel "
                                     "data), incrementally by Study Date.")
    fd.add_argument("base_url", metavar="BASE_URL")
    fd.add_argument("--since", metavar="DATE", help="studies on or after DATE (default: the last watermark)")
    fd.add_argument("--source", default="dicom", help="source name recorded on every row (default: dicom, so that "
                                                      "studies fetched and files imported are the same units)")
    fd.add_argument("--header", action="append", metavar="NAME:VALUE", help="an extra request header (not secret)")
    fd.add_argument("--auth-header-env", metavar="VAR", help="environment variable holding the Authorization header")
    fd.add_argument("--patient-rule", metavar="RULE", help="link studies without PatientID (see twin import dicom)")
    fd.add_argument("--timezone", metavar="ZONE", help="IANA zone of the studies' local times")
    fd.add_argument("--retries", type=int, default=4, help="retries on 5xx, 429 and dropped connections (default 4)")
    fd.set_defaults(func=cmd_fetch_dicomweb)

    r = sub.add_parser("run", parents=[common, engine], help="run a whole job (sources, gate, build) from a config file",
                       description="Run a scheduled job: read every source incrementally into one run, check the "
                                   "gate, build the twins. Exit codes: README, 'Exit codes'.")
    r.add_argument("--config", required=True, metavar="JOB.toml", help="the job file (docs/jobs.md)")
    r.add_argument("--force", action="store_true", help="build even if the gate fails (recorded in runs)")
    r.set_defaults(func=cmd_run)

    li = sub.add_parser("listen", parents=[common], help="receive messages live")
    lsub = li.add_subparsers(dest="listen_kind", required=True, metavar="KIND")
    lm = lsub.add_parser("mllp", parents=[common, privacy], help="HL7 v2 over MLLP",
                         description="An MLLP server: each message is acknowledged (AA/AE/AR) once it is durably "
                                     "spooled, and moved into the store whenever the store's lock is free. "
                                     "Stops on SIGTERM/SIGINT after storing what it acknowledged.")
    lm.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    lm.add_argument("--port", type=int, required=True)
    lm.add_argument("--source", default="hl7v2", help="source name recorded on every row (default: hl7v2)")
    lm.add_argument("--tls-cert", metavar="PEM", help="serve MLLP over TLS with this certificate ...")
    lm.add_argument("--tls-key", metavar="PEM", help="... and this private key")
    lm.add_argument("--tls-ca", metavar="PEM", help="CA bundle to verify client certificates")
    lm.add_argument("--require-client-cert", action="store_true", help="refuse clients without a certificate")
    lm.add_argument("--batch-max", type=int, default=100, help="messages per spool write (default 100)")
    lm.add_argument("--batch-wait-ms", type=float, default=20, help="wait for more messages (default 20 ms)")
    lm.add_argument("--drain-every", type=float, default=2.0, help="seconds between moves into the store (default 2)")
    lm.add_argument("--strict", action="store_true", help="reject a message when a value does not convert")
    lm.set_defaults(func=cmd_listen_mllp)

    ch = sub.add_parser("check", parents=[common, engine], help="the quality and bias gate",
                        description="Check data quality and bias over the stored tables; write an HTML + JSON "
                                    "report; exit 4 when an error-level check fails (docs/gate.md).")
    ch.add_argument("--report", metavar="DIR", help="where to write report.html and report.json "
                                                     "(default: the store's _twin/reports/<run id>)")
    ch.add_argument("--config", metavar="FILE", help="gate thresholds (default: config/gate.toml)")
    ch.set_defaults(func=cmd_check)

    b = sub.add_parser("build", parents=[common, engine], help="assemble the twins", description="Assemble one twin per patient.")
    b.add_argument("--as-of", metavar="T", help="the state as known at T (a date or date-time)")
    b.add_argument("--force", action="store_true", help="build even though the last gate failed (recorded in runs)")
    b.set_defaults(func=cmd_build)

    lr = sub.add_parser("link-report", parents=[common], help="persons, links by rule, conflicts to review",
                        description="How patient records were linked into persons: counts per rule, records "
                                    "linked across sources, and conflicts for review (record keys only).")
    lr.add_argument("--config", metavar="FILE", help="identity config (default: config/identity.toml)")
    lr.set_defaults(func=cmd_link_report)

    s = sub.add_parser("show", parents=[common], help="print one twin", description="Print a readable summary of one twin.")
    s.add_argument("patient", metavar="PATIENT", help="a twin id, or a source patient id")
    s.set_defaults(func=cmd_show)

    ex = sub.add_parser("export", parents=[common], help="write twins as FHIR R4 Bundles",
                        description="Write one FHIR R4 Bundle (type collection) per twin into DIR, named by twin id, "
                                    "with index.ndjson (entries and external references per twin); see docs/export.md.")
    ex.add_argument("patient", nargs="?", metavar="PATIENT", help="a twin id, or a source patient id")
    ex.add_argument("--all", action="store_true", help="every twin of the last build")
    ex.add_argument("--format", choices=["fhir"], default="fhir", help="output format (fhir: R4 Bundles)")
    ex.add_argument("--out", metavar="DIR", default="export", help="output folder (default ./export)")
    ex.add_argument("--validate", action="store_true",
                    help="validate every resource with fhir.resources R4B (2-4x slower); invalid ones are rejected")
    ex.add_argument("--stream-window", default="1h", metavar="DURATION",
                    help="device streams: one Observation per device, signal and window (default 1h; 15min, 1d, ...)")
    ex.set_defaults(func=cmd_export)

    mt = sub.add_parser("maintain", parents=[common], help="merge small files; delete old versions' files",
                        description="Merge every table's small files now (runs also do it as they commit), and "
                                    "with --vacuum-days delete the files no version of the last N days reads "
                                    "(twin build --as-of cannot go further back afterwards).")
    mt.add_argument("--vacuum-days", type=_days, metavar="N",
                    help="delete files of versions older than N days (default: delete nothing)")
    mt.set_defaults(func=cmd_maintain)

    st = sub.add_parser("status", parents=[common], help="recent runs, watermarks, store size")
    st.add_argument("--limit", type=int, default=10, help="how many runs (default 10)")
    st.set_defaults(func=cmd_status)

    q = sub.add_parser("quarantine", parents=[common], help="inspect and retry quarantined units",
                       description="List or show units that could not be used; retry them after a mapping is "
                                   "fixed (an entry leaves quarantine only when its unit is stored).")
    q.add_argument("action", choices=["list", "show", "retry"])
    q.add_argument("id", nargs="?", help="entry id, or its first characters (show; retry: only this one)")
    q.add_argument("--source", help="retry: only entries of this source")
    q.add_argument("--limit", type=int, default=50, help="entries to list (default 50)")
    q.add_argument("--reason", help="only entries with this reason code")
    q.add_argument("--all", action="store_true", help="include resolved entries")
    q.add_argument("--payload", action="store_true", help="print the raw payload too (it may hold patient data)")
    q.set_defaults(func=cmd_quarantine)

    v = sub.add_parser("views", parents=[common], help="SQL-on-FHIR view tools")
    vsub = v.add_subparsers(dest="views_command", required=True, metavar="ACTION")
    vt = vsub.add_parser("test", parents=[common], help="run a folder of SQL-on-FHIR v2 tests",
                         description="Run a folder of tests in the official SQL-on-FHIR v2 format; "
                                     "ends with `N passed, M failed`.")
    vt.add_argument("dir", metavar="DIR")
    vt.set_defaults(func=cmd_views_test)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TwinlineError as e:
        print(f"twin: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("twin: interrupted; the store is left as it was before this run", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the last line of defence: a clean message, no data
        # Library exceptions can quote values (pyarrow does): only the type and place are
        # printed unless -vv asks for the traceback, which goes to the log.
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
        log.debug("internal error", exc_info=True)
        print(f"twin: internal error ({type(e).__name__} at {where}); the store is left as it was before this run. "
              "Please report it (run with -vv for the traceback).", file=sys.stderr)
        return int(Exit.INTERNAL)


class _QuietWhenClosed:
    """stdout that stops writing, instead of raising, once its reader has gone (`twin quarantine list | head`).

    Python turns the closed pipe into a BrokenPipeError, which main() reported as an
    internal error that left "the store as it was before this run", usually after the
    run had committed. Restoring SIGPIPE's default instead would also kill `twin listen`
    when an MLLP peer hangs up. The run finishes and exits with its own code.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> None:
        # what is still buffered can go nowhere: point the descriptor at /dev/null so later flushes succeed
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def console_main() -> None:
    """The `twin` executable: run, flush, and leave without interpreter finalisation.

    Every run has committed (or rolled back) and fsynced its manifest before main()
    returns, so nothing is left to do at exit; skipping finalisation avoids a rare abort
    in native library threads torn down at interpreter shutdown ("terminate called
    without an active exception", seen after kill -9 recovery), which a scheduler would
    otherwise read as a crash.
    """
    sys.stdout = _QuietWhenClosed(sys.stdout)
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    finally:
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
