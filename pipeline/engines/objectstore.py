"""Twin tables on S3-compatible object storage, through deltalake's storage options.

`publish` copies every table of a store, at the version its manifest commits, to
`s3://bucket/prefix/<table>` as a Delta table that Spark, Databricks, Trino, DuckDB or
pandas read directly. Publishing is idempotent and incremental: each remote commit
records the local version it holds, and a table whose committed version was already
published is left alone. A reader on object storage therefore only ever sees complete
runs, whatever a local run is doing at the time.

Credentials and the endpoint come from the standard variables deltalake (the Rust
`object_store` crate) reads, or from explicit options: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL (for MinIO, Ceph,
R2, moto...) and AWS_ALLOW_HTTP=true for a plain-http endpoint. delta-rs 1.x commits to
S3 with conditional writes (If-None-Match), which AWS S3 supports since 2024; for a
server without them, AWS_S3_ALLOW_UNSAFE_RENAME=true is safe only with one writer per
table, which `publish` is (it runs under the store's lock). See docs/scaling.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake

from ..errors import ConfigError, SourceUnavailable
from ..store import Store

OPTION_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL",
                "AWS_ALLOW_HTTP", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_VIRTUAL_HOSTED_STYLE_REQUEST")
_MARK = "twinline.local_version"


def storage_options(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """deltalake storage options from the environment, then `overrides` (never logged: they hold secrets)."""
    opts = {k: os.environ[k] for k in OPTION_NAMES if os.environ.get(k)}
    opts.update(overrides or {})
    return opts


def _remote_version(uri: str, opts: dict[str, str]) -> int | None:
    """The local version the remote table holds (from its last commit's metadata), None if none."""
    try:
        dt = DeltaTable(uri, storage_options=opts)
    except Exception:  # noqa: BLE001 - deltalake raises TableNotFoundError and others alike
        return None
    for entry in dt.history(1):
        mark = entry.get(_MARK) or (entry.get("userMetadata") or {}).get(_MARK) if isinstance(entry, dict) else None
        if mark is not None:
            return int(mark)
    return None


def publish(store: Store, url: str, options: Mapping[str, str] | None = None) -> dict[str, str]:
    """Copy the committed tables of `store` to `url` (s3://bucket/prefix). Returns table -> what happened."""
    if not url.startswith(("s3://", "s3a://")):
        raise ConfigError(f"publish needs an s3:// URL, got {url.split('://', 1)[0]}://...")
    opts = storage_options(options)
    base = url.rstrip("/")
    done: dict[str, str] = {}
    with store.locked("publish"):
        for name, version in sorted(store.manifest()["tables"].items()):
            uri = f"{base}/{name}"
            try:
                if _remote_version(uri, opts) == int(version):
                    done[name] = "unchanged"
                    continue
                data = store.delta(name).to_pyarrow_table()  # type: ignore[union-attr]
                write_deltalake(uri, data, mode="overwrite", schema_mode="overwrite", storage_options=opts,
                                writer_properties=WriterProperties(compression="ZSTD"),
                                commit_properties=CommitProperties(custom_metadata={_MARK: str(version)}))
            except OSError as e:
                raise SourceUnavailable(f"object storage at {base} did not answer ({type(e).__name__}); retry later") from None
            done[name] = f"version {version}"
    return done
