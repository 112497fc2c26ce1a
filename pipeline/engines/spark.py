"""The pipeline on Apache Spark: `--engine spark --master local[N]|URL`.

The same pure functions as the single process run on executors over partitions of the
input (pipeline.engines.tasks, inside `mapInArrow`); the driver writes the same Delta
tables through the same `Store`, under the same lock, and commits once at the end
(pipeline.engines.collect says why the driver writes). Twin builds run per patient
bucket (pipeline.engines.build). docs/spark.md has the how-to, docs/scaling.md the
costs measured here and the model for a cluster.

Nothing here asks Spark for packages (no `spark.jars.packages`, no Maven): Delta
tables are written with the deltalake package, which needs no JVM.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from ..errors import ConfigError
from ..identity import TwinIds, stored_links
from ..imports import _ledger, check_paths, connector_for, finish_run, import_files
from ..ingest import Ingest, ViewSet
from ..keys import key_fingerprint
from ..runs import Run
from ..store import Store
from ..temporal import utc_now
from .collect import Collector
from .parts import Part, auto_part_bytes, plan_parts, with_line_numbers
from .tasks import ImportContext, guarded, iter_parts, map_part, scan_part, wait_staged

if TYPE_CHECKING:
    from ..privacy import PrivacyHooks

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[2]"
# The master URLs Spark 4 accepts (SparkContext.createTaskScheduler; Mesos is gone), and
# any other URL with a scheme, for cluster managers that plug in.
_MASTER = re.compile(r"local(\[(\d+|\*)(\s*,\s*\d+)?\])?|local-cluster\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]"
                     r"|yarn|[a-z][a-z0-9+.-]*://\S+")
DEFAULT_FLUSH_ROWS = 200_000


# --------------------------------------------------------------------------- session


def spark_session(master: str = DEFAULT_MASTER, conf: dict[str, str] | None = None):
    """A SparkSession for Twinline (reused if one is running). ConfigError when PySpark or Java is missing.

    Workers run this interpreter and import this checkout of the pipeline (PYTHONPATH),
    so driver and executors run the same code; on a cluster, install the same Twinline
    version on every node instead.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("--engine spark needs PySpark: pip install 'twinline[spark]' (and Java 17 or 21)") from None
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise ConfigError("--engine spark needs Java (17 or 21) on PATH or JAVA_HOME: apt-get install openjdk-17-jre-headless")
    if not _MASTER.fullmatch(master):
        # Spark would start a JVM only to refuse it, with a page of Java stack trace on stderr
        raise ConfigError(f"--master {master!r} is not a Spark master: local, local[N], local[*] or a cluster URL "
                          "(spark://HOST:PORT, yarn, k8s://URL)")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    home = str(Path(__file__).resolve().parent.parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if home not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([home, *[p for p in paths if p]])
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    builder = (SparkSession.builder.master(master).appName("twinline")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.python.worker.reuse", "true")
               .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_log4j_config()}"))
    if master.startswith("local"):
        # everything stays on the loopback interface (Spark would pick the first network interface)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for k, v in (conf or {}).items():
        if k == "spark.jars.packages":
            raise ConfigError("spark.jars.packages is not supported: Twinline needs no Spark package")
        builder = builder.config(k, v)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - the JVM did not start: say so plainly
        raise ConfigError(f"Spark did not start ({type(e).__name__}): check Java and --master {master}") from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


_LOG4J = """\
# Twinline's Spark logging: errors only, on stderr (the summary on stdout stays clean for schedulers)
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = stderr
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
"""


def _log4j_config() -> str:
    path = Path(tempfile.gettempdir()) / "twinline-spark-log4j2.properties"
    if not path.exists() or path.read_text() != _LOG4J:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_LOG4J)
        os.replace(tmp, path)
    return str(path)


def run_tasks(spark, items: list[dict[str, Any]], fn: Callable[[Part], dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """Run `fn` on every item, one Spark partition per item; results in item order.

    Items travel as JSON text through `mapInArrow`; results come back the same way
    (small tallies: the data itself is staged in files).
    """
    if not items:
        return []
    sc = spark.sparkContext
    rdd = sc.parallelize([(orjson.dumps(i).decode(),) for i in items], len(items))
    df = spark.createDataFrame(rdd, "item string")

    def apply(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for part in iter_parts(batches):
            started = time.perf_counter()
            out = guarded(f"{what} of partition {part.index}", fn, part)
            out["seconds"] = time.perf_counter() - started
            out["worker"] = os.getpid()
            yield pa.RecordBatch.from_pydict({"result": [orjson.dumps(out).decode()]})

    rows = df.mapInArrow(apply, "result string").collect()
    results = [orjson.loads(r.result) for r in rows]
    return sorted(results, key=lambda r: r["part"])


# --------------------------------------------------------------------------- import


def spark_import(store: Store, kind: str, paths: Iterable[str | Path], *, spark=None, master: str = DEFAULT_MASTER,
                 source: str | None = None, options: dict[str, Any] | None = None, reprocess: bool = False,
                 flush_rows: int = DEFAULT_FLUSH_ROWS, part_bytes: int | None = None, command: str = "import",
                 hooks: PrivacyHooks | None = None) -> Run:
    """`twin import --engine spark`: import files of one kind as one run, mapped on Spark."""
    connector_for(kind, options)
    checked = check_paths(paths)
    spark = spark or spark_session(master)
    with store.locked(command):
        run = Run(store, command, inputs=[str(p) for p in checked])
        try:
            spark_import_files(spark, store, run, kind, checked, source=source, options=options, reprocess=reprocess,
                               flush_rows=flush_rows, part_bytes=part_bytes, hooks=hooks)
            finish_run(store, run)
        except BaseException:
            store.rollback()
            raise
    return run


def spark_import_files(spark, store: Store, run: Run, kind: str, paths: list[Path], *, source: str | None = None,
                       options: dict[str, Any] | None = None, reprocess: bool = False,
                       flush_rows: int = DEFAULT_FLUSH_ROWS, part_bytes: int | None = None,
                       hooks: PrivacyHooks | None = None) -> None:
    """Feed files of one kind into `run` on Spark (the caller holds the lock and commits).

    The same contract as pipeline.imports.import_files, so a job can use either.
    """
    connector = connector_for(kind)
    source = source or kind
    options = options or {}
    if connector.read_all is not None or connector.read_file is None or hooks is not None:
        # the mapping needs every file at once (DICOM series): nothing to partition; a
        # privacy profile runs where the key is known to be (docs/spark.md)
        why = "with a privacy profile" if hooks is not None else f"{kind} is read as a whole input"
        run.notes.append(f"{source}: {why}, on the driver")
        import_files(store, run, kind, paths, source=source, options=options, reprocess=reprocess, hooks=hooks)
        return
    files = list(connector.files(paths))
    todo, stats = _files_to_read(store, source, files, reprocess)
    parts = plan_parts(connector, todo, part_bytes or auto_part_bytes(todo, spark.sparkContext.defaultParallelism))
    clock = time.perf_counter()
    parts, sha, ordered = _scan(spark, parts, kind, options)
    log.info("spark import: %d parts scanned in %.2f s", len(parts), time.perf_counter() - clock)
    clock = time.perf_counter()
    ingest = Ingest(store, run, source, connector.kind, ViewSet(store.schema), flush_rows=flush_rows,
                    twin_ids=TwinIds(stored_links(store)))
    stage = store.tmp_dir() / f"spark-{run.run_id}"
    stage.mkdir(parents=True, exist_ok=True)
    ctx = ImportContext(kind=kind, source=source, source_kind=connector.kind, run_id=run.run_id, now=utc_now(),
                        stage_dir=str(stage), identifiers=ordered,
                        stored_identifiers=list(ingest._stored_identifiers()) if store.exists("resource_identifier") else [],
                        links=ingest.twin_ids._links, key_check=key_fingerprint(), options=options)
    collector = Collector(ingest)
    _map_and_write(spark, parts, ctx, collector)
    collector.finish({(t, s, v): i for t, s, v, i in ordered})
    shutil.rmtree(stage, ignore_errors=True)
    log.info("spark import: %d parts mapped and written in %.2f s", len(parts), time.perf_counter() - clock)
    ledger_rows = [{"source": source, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": sha[str(path)], "run_id": run.run_id, "processed_at": utc_now(),
                    "units_read": collector.units_by_path.get(str(path), 0)}
                   for path, st in zip(todo, stats, strict=True) if st is not None and sha.get(str(path))]
    skipped = len(files) - len(todo)
    if skipped:
        run.notes.append(f"{source}: {skipped} file(s) unchanged since they were last imported, skipped "
                         "(--reprocess reads them again)")
    if ledger_rows:
        schema = store.schema.table("ledger").arrow_schema
        store.merge_by_key("ledger", pa.Table.from_pylist(ledger_rows, schema=schema))


def _files_to_read(store: Store, source: str, files: list[Path], reprocess: bool) -> tuple[list[Path], list[Any]]:
    """The files the ledger does not know unchanged (size and mtime), with their stat."""
    seen = {} if reprocess else _ledger(store, source)
    todo, stats = [], []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            st = None
        known = seen.get(str(path.resolve()))
        if st is not None and known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            continue
        todo.append(path)
        stats.append(st)
    return todo, stats


def _scan(spark, parts: list[Part], kind: str, options: dict[str, Any]
          ) -> tuple[list[Part], dict[str, str], list[tuple[str, str, str, str]]]:
    """The scan job: parts with their line numbers, file hashes, and the identifier index in input order."""
    scans = run_tasks(spark, [p.to_json() for p in parts], lambda p: scan_part(p, kind, options), "scan")
    by_piece = {(s["part"], j): info for s in scans for j, info in enumerate(s["pieces"])}
    sha = {pc.path: by_piece[(part.index, j)]["sha256"] for part in parts for j, pc in enumerate(part.pieces)
           if by_piece[(part.index, j)].get("sha256")}
    ordered = [(rtype, system, value, rid) for s in scans
               for _j, _seq, rtype, system, value, rid in sorted(s["identifiers"], key=lambda x: (x[0], x[1]))]
    return with_line_numbers(parts, by_piece), sha, ordered


def _map_and_write(spark, parts: list[Part], ctx: ImportContext, collector: Collector) -> None:
    """The mapping job; the driver writes part i as soon as it is staged, while later parts are mapped."""
    bc = spark.sparkContext.broadcast(ctx)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="twinline-spark") as pool:
            job = pool.submit(run_tasks, spark, [p.to_json() for p in parts],
                              lambda p: map_part(p, bc.value), "mapping")
            try:
                for part in parts:
                    collector.add(wait_staged(ctx.stage_dir, part.index, job), [pc.path for pc in part.pieces])
                job.result()
            except BaseException:
                spark.sparkContext.cancelAllJobs()
                raise
    finally:
        bc.unpersist()


class SparkEngine:
    """What a job runner calls to run a job's file imports, gate and build on Spark.

    The same signatures as pipeline.imports.import_files, pipeline.gate_runs.run_check
    and pipeline.twins.build_twins,
    so that `run_job` can take either; the session starts on first use.
    """

    def __init__(self, master: str = DEFAULT_MASTER):
        self.master = master
        self._spark = None

    @property
    def spark(self):
        if self._spark is None:
            self._spark = spark_session(self.master)
        return self._spark

    def import_files(self, store: Store, run: Run, kind: str, paths: list[Path], **kw: Any) -> None:
        kw.pop("progress", None)
        spark_import_files(self.spark, store, run, kind, paths, **kw)

    def check(self, store: Store, **kw: Any):
        from ..gate_runs import run_check

        return run_check(store, spark=self.spark, **kw)

    def build_twins(self, store: Store, **kw: Any):
        from .build import spark_build

        return spark_build(store, self.spark, **kw)
