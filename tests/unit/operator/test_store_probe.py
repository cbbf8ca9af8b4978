"""The store probe never hands the operator's credentials to a store an admin did not allow, and a
slow store cannot hold up the operator (a capturing HTTP server and a silent socket on loopback)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("boto3")

from humpback_operator import store_probe  # noqa: E402
from humpback_operator.config import AllowedStore, OperatorConfig, parse_allowed_stores  # noqa: E402
from humpback_operator.kube import API_CONNECTIONS, Kube  # noqa: E402
from humpback_operator.store_probe import PROBE_THREADS, StoreProbe  # noqa: E402

LOG = logging.getLogger("test")
OPERATOR_KEY = "AKIAOPERATORPROBE"
OPERATOR_TOKEN = "operator-session-token"
FAKE_MANIFEST = json.dumps({"fingerprint": "x", "outputs": {"count": 99}}).encode()


@pytest.fixture(autouse=True)
def operator_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OPERATOR_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", OPERATOR_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    store_probe._store.cache_clear()


class _Capture(http.server.BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests.append({"path": self.path, "headers": dict(self.headers)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(FAKE_MANIFEST)))
        self.end_headers()
        self.wfile.write(FAKE_MANIFEST)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[str, list[dict]]]:
    """A plain-HTTP server on loopback that records every request and answers a fake manifest."""
    handler = type("Capture", (_Capture,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def run_body(uri: str, endpoint: str | None) -> dict:
    s3 = {"endpoint": endpoint} if endpoint else {}
    return {"metadata": {"namespace": "team-a", "name": "r1"}, "spec": {"storage": {"uri": uri, "s3": s3}}}


def probe(config: OperatorConfig, body: dict, stages=("prepare-seed",), **kwargs) -> dict:
    async def go():
        p = StoreProbe(config, **kwargs)
        try:
            return await p.read(body, list(stages), LOG)
        finally:
            p.close()
    return asyncio.run(go())


def credential_headers(requests: list[dict]) -> list[str]:
    found = []
    for r in requests:
        for name, value in r["headers"].items():
            if name.lower() in ("authorization", "x-amz-security-token") or OPERATOR_KEY in value or OPERATOR_TOKEN in value:
                found.append(f"{name}: {value}")
    return found


def test_a_store_nobody_allowed_gets_no_request_and_its_answer_is_not_believed(capture):
    url, requests = capture
    # Default: no store is allowed. A tenant's run names the capture server as its S3 endpoint.
    assert probe(OperatorConfig(), run_body("s3://tenant-bucket/x", url)) == {"prepare-seed": None}
    assert requests == [] and credential_headers(requests) == []


def test_an_allowed_bucket_at_another_endpoint_is_not_read(capture):
    url, requests = capture
    config = OperatorConfig(probe_allowed_stores=(AllowedStore("ml-*"),))  # on AWS S3 only
    assert probe(config, run_body("s3://ml-runs/x", url)) == {"prepare-seed": None}
    assert requests == []


def test_plain_http_is_read_only_when_the_admin_named_that_endpoint(capture):
    url, requests = capture
    allowed = OperatorConfig(probe_allowed_stores=(AllowedStore("ml-*", url),))
    assert probe(allowed, run_body("s3://other-bucket/x", url)) == {"prepare-seed": None}
    assert requests == []
    # Named explicitly: the operator signs its request (that is what allowing means) and reads.
    # (A generous limit: making a boto3 client on a loaded CI machine can take seconds.)
    assert probe(allowed, run_body("s3://ml-runs/x", url), timeout=60)["prepare-seed"]["outputs"]["count"] == 99
    assert len(requests) == 1 and credential_headers(requests)


def test_allowed_stores_parse_from_the_chart_json_and_refuse_globbed_endpoints():
    stores = parse_allowed_stores('[{"bucket": "ml-*"}, {"bucket": "b", "endpoint": "HTTP://MinIO:9000/"}]')
    assert stores == (AllowedStore("ml-*", ""), AllowedStore("b", "http://minio:9000"))
    assert OperatorConfig.from_env({"HUMPBACK_PROBE_ALLOWED_STORES": '[{"bucket": "b"}]'}).probe_allowed("s3://b/p", None)
    with pytest.raises(ValueError, match="HUMPBACK_PROBE_ALLOWED_STORES: item 0: endpoint"):
        OperatorConfig.from_env({"HUMPBACK_PROBE_ALLOWED_STORES": '[{"bucket": "b", "endpoint": "https://*.evil"}]'})
    with pytest.raises(ValueError, match="HUMPBACK_PROBE_ALLOWED_STORES: expected a JSON list"):
        OperatorConfig.from_env({"HUMPBACK_PROBE_ALLOWED_STORES": "b"})


def test_a_silent_store_times_out_opens_its_circuit_and_leaves_other_threads_free(silent):
    config = OperatorConfig(probe_allowed_stores=(AllowedStore("slow", silent),))
    body = run_body("s3://slow/x", silent)

    async def go():
        # The operator's shared pool, as backtranslationrun.configure sets it up.
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        p = StoreProbe(config, timeout=0.5)
        try:
            # 8 runs probing at once, as in the issue: the shared default pool stays free.
            probes = [asyncio.create_task(p.read(body, ["a", "b"], LOG)) for _ in range(8)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await asyncio.wait_for(asyncio.to_thread(lambda: None), timeout=2)
            noop = time.monotonic() - started
            results = await asyncio.wait_for(asyncio.gather(*probes), timeout=10)
            # The circuit is open now: the next read returns at once, without a connection.
            started = time.monotonic()
            again = await p.read(body, ["a", "b", "c"], LOG)
            return noop, results, again, time.monotonic() - started
        finally:
            p.close()

    noop, results, again, again_s = asyncio.run(go())
    assert noop < 3.0  # (making the probe's boto3 client holds the GIL for a moment)
    assert all(r == {"a": None, "b": None} for r in results)
    assert again == {"a": None, "b": None, "c": None} and again_s < 0.2


def test_progress_is_read_only_from_allowed_stores(capture):
    url, requests = capture

    async def go(config):
        p = StoreProbe(config, timeout=60)
        try:
            return await p.read_progress(run_body("s3://ml-runs/x", url), ["train-m0"], LOG)
        finally:
            p.close()

    # Not allowed: no request, so no credentials sent (progress reads used to ignore the list).
    assert asyncio.run(go(OperatorConfig())) == {}
    assert requests == []
    # Allowed: read like a _SUCCESS.json (the capture server answers anything with the same JSON).
    assert asyncio.run(go(OperatorConfig(probe_allowed_stores=(AllowedStore("ml-*", url),)))) != {}
    assert [r["path"] for r in requests] == ["/ml-runs/x/team-a/r1/train-m0/_PROGRESS.json"]


class _ApiServer(http.server.BaseHTTPRequestHandler):
    """An API server on loopback answering at once or (a path ending in /hang) when released;
    it counts the requests it holds at once."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real API server
    release: threading.Event
    lock: threading.Lock
    held: list[int]  # [now, most]

    def _answer(self) -> None:
        with self.lock:
            self.held[0] += 1
            self.held[1] = max(self.held)
        try:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/hang"):
                self.release.wait(20)
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with self.lock:
                self.held[0] -= 1

    do_GET = do_PATCH = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[tuple[str, type[_ApiServer]]]:
    handler = type("Api", (_ApiServer,), {"release": threading.Event(), "lock": threading.Lock(), "held": [0, 0]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    handler.release.set()
    server.shutdown()
    server.server_close()


def _kube(host: str, **kwargs) -> Kube:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    configuration.host = host
    return Kube(api_client=kubernetes.client.ApiClient(configuration), **kwargs)


def test_api_calls_and_store_reads_are_bounded_apart_and_cannot_starve_each_other(silent, capture, api_server):
    url, _ = capture
    api_url, api = api_server
    config = OperatorConfig(probe_allowed_stores=(AllowedStore("slow", silent), AllowedStore("fast", url)))

    def threads(prefix: str) -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith(prefix))

    async def go():
        kube = _kube(api_url)
        probe_ = StoreProbe(config, timeout=2)
        try:
            # Every API connection held (a slow API server): store reads go on.
            hung = [asyncio.create_task(kube.call("GET", f"/x/{i}/hang")) for i in range(3 * API_CONNECTIONS)]
            for _ in range(100):  # until the server holds as many as it ever will (a loaded machine is slow)
                await asyncio.sleep(0.1)
                if api.held[0] >= API_CONNECTIONS:
                    break
            await asyncio.sleep(0.3)
            held = api.held[1]  # the most at once
            read = await asyncio.wait_for(probe_.read(run_body("s3://fast/x", url), ["a"], LOG), timeout=30)
            api.release.set()
            await asyncio.gather(*hung)
            # Every probe thread stuck on a silent store: API calls go on.
            stuck = [asyncio.create_task(probe_.read(run_body("s3://slow/x", silent), ["a"], LOG))
                     for _ in range(3 * PROBE_THREADS)]
            await asyncio.sleep(0.2)
            probe_threads = threads("store-probe")
            started = time.monotonic()
            answer = await asyncio.wait_for(kube.call("PATCH", "/runs/r1/status", {}), timeout=5)
            api_seconds = time.monotonic() - started
            await asyncio.gather(*stuck)
            return held, read, probe_threads, answer, api_seconds
        finally:
            probe_.close()
            await kube.close()

    held, read, probe_threads, answer, api_seconds = asyncio.run(go())
    assert held == API_CONNECTIONS and read["a"]["outputs"]["count"] == 99
    assert probe_threads == PROBE_THREADS and answer == {"ok": True} and api_seconds < 1.5  # stuck reads: 2 s


def test_an_api_call_the_server_never_answers_times_out_and_frees_its_connection(silent):
    from humpback_operator.kube import ApiError

    async def go():
        kube = _kube(silent, timeout=(1.0, 1.0))
        started = time.monotonic()
        try:
            with pytest.raises(ApiError, match="TimeoutError"):
                await asyncio.wait_for(kube.call("GET", "/apis/humpback.dev/v1alpha1/namespaces/a/backtranslationruns/r"), 20)
        finally:
            await kube.close()
        return time.monotonic() - started

    assert asyncio.run(go()) < 10  # before: no timeout, the call waited for ever