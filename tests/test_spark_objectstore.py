"""Twin tables on S3-compatible storage: published to a real local S3 server (moto), read back.

The server is moto in server mode on 127.0.0.1; deltalake talks to it over HTTP with
the same storage options a user gives for MinIO or AWS. The deltalake calls run in a
child process that leaves with os._exit, as `twin` does: the Rust object-store runtime
can abort at interpreter shutdown after S3 I/O, which would fail the test run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import requests

from pipeline.imports import run_import
from pipeline.store import Store
from tests.conftest import FIXTURES, REPO

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from collections import Counter
from deltalake import DeltaTable
from pipeline.store import Store
from pipeline.engines.objectstore import publish
store, url, opts = Store(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
out = {"first": publish(store, url, opts), "second": publish(store, url, opts), "same": {}}
for name in store.manifest()["tables"]:
    local = store.delta(name).to_pyarrow_table().to_pylist()
    remote = DeltaTable(f"{url}/{name}", storage_options=opts).to_pyarrow_table().to_pylist()
    key = lambda rows: Counter(json.dumps(r, sort_keys=True, default=str) for r in rows)
    out["same"][name] = key(local) == key(remote) and len(local) > 0
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"""


@pytest.fixture
def s3_server():
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("the S3 test needs a local S3 server: pip install 'moto[server]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.server
def test_publish_to_s3_is_complete_and_incremental(tmp_path, s3_server):
    store = Store(tmp_path / "store")
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles"])
    assert requests.put(f"{s3_server}/twins", timeout=10).status_code == 200  # create the bucket
    opts = {"AWS_ENDPOINT_URL": s3_server, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(store.root), "s3://twins/store", json.dumps(opts)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    tables = set(store.manifest()["tables"])
    assert set(res["first"]) == tables and all(v.startswith("version") for v in res["first"].values())
    assert res["second"] == dict.fromkeys(tables, "unchanged")
    assert res["same"] == dict.fromkeys(tables, True)


def test_publish_refuses_other_urls(tmp_path):
    from pipeline.engines.objectstore import publish
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        publish(Store(tmp_path), "/some/where")
