"""An S3-compatible store (here: GCS through its XML API, docs/security.md "Storage credentials")
works with exactly the environment the operator gives a run's pods: a moto server stands in for
https://storage.googleapis.com through the endpoint override, and a capturing server shows which
headers an upload carries."""

from __future__ import annotations

import http.server
import threading

import pytest

pytest.importorskip("boto3")

from humpback_operator.children import render_run  # noqa: E402
from humpback_operator.config import OperatorConfig  # noqa: E402

from humpback_runtime.spec import parse_run  # noqa: E402
from humpback_runtime.storage import open_store  # noqa: E402

GCS = "https://storage.googleapis.com"


def pod_env(bucket_uri: str) -> dict[str, str]:
    """The literal environment of a stage pod of a run whose store is GCS (HMAC keys in a Secret)."""
    run = parse_run({"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
                     "metadata": {"name": "gcs", "namespace": "team-a"},
                     "spec": {"baseModel": "org/m", "seed": {"source": "s3://d/s.jsonl"}, "corpus": {"source": "s3://d/c/"},
                              "storage": {"uri": bucket_uri, "s3": {"endpoint": GCS, "credentialsSecret": "gcs-hmac"}}}})
    job = next(o for o in render_run(run, OperatorConfig()) if o["kind"] == "Job")
    return {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
            if "value" in e and e["name"].startswith("AWS_")}


def test_a_gcs_store_is_read_and_written_with_the_pods_environment(monkeypatch, s3_server, s3_bucket):
    env = pod_env(s3_bucket)
    assert env["AWS_ENDPOINT_URL"] == GCS
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = open_store(s3_bucket, endpoint_url=s3_server, region=env["AWS_REGION"])  # the override: moto for GCS
    store.write_json("team-a/gcs/prepare-seed/_SUCCESS.json", {"fingerprint": "f"})
    assert store.read_json("team-a/gcs/prepare-seed/_SUCCESS.json") == {"fingerprint": "f"}


class _Capture(http.server.BaseHTTPRequestHandler):
    headers_seen: list[dict] = []

    def do_PUT(self) -> None:  # noqa: N802
        type(self).headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def upload_headers(monkeypatch, env: dict[str, str]) -> dict:
    handler = type("Capture", (_Capture,), {"headers_seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with monkeypatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            store = open_store("s3://bucket", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
                               region="us-east-1", max_attempts=1)
            store.write_bytes("k", b"data")
    finally:
        server.shutdown()
        server.server_close()
    (headers,) = handler.headers_seen
    return headers


def test_uploads_to_an_s3_compatible_store_carry_no_default_checksum_headers(monkeypatch, aws_env):
    # Without the pods' setting, boto3 adds CRC32 checksum headers that GCS's XML API refuses...
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    assert any(h.startswith("x-amz-checksum-") for h in upload_headers(monkeypatch, {}))
    # ...with the environment the operator gives the pods, it does not.
    headers = upload_headers(monkeypatch, pod_env("s3://bucket"))
    assert not any(h.startswith("x-amz-checksum-") or h == "x-amz-sdk-checksum-algorithm" for h in headers)
