"""Shared fixtures: an in-process S3 server (moto) on loopback, and a fresh bucket per test.

Tests that need S3 skip, never fail, where moto or boto3 is not installed.
"""

from __future__ import annotations

import uuid

import pytest

# Dummy credentials so boto3 never looks further (instance metadata, the user's ~/.aws).
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/humpback-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/humpback-tests/aws-credentials",
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def aws_env():
    """Dummy AWS credentials and region in os.environ for the session, restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_UNSET:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def s3_server(aws_env):
    """Endpoint URL of a moto S3 server running in this process on 127.0.0.1 (a free port)."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A plain boto3 client for the moto server, to set up and inspect buckets behind the code's back."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client):
    """A new, empty bucket on the moto server, as "s3://<bucket>"."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def demo_base_model():
    """The demo's base model, .cache/tiny-llama (what `make demo` builds), so that `humpback validate
    examples/tiny-cpu.yaml` finds the local baseModel it names. Built once; kept like make demo's."""
    pytest.importorskip("transformers", reason="building the tiny model needs the train extra")
    from pathlib import Path

    from humpback_runtime.tiny_model import build_tiny_model

    root = Path(__file__).resolve().parents[1]
    return build_tiny_model(root / ".cache" / "tiny-llama", text_files=[
        root / "examples" / "data" / "oasst1_sample.jsonl", root / "examples" / "data" / "c4_sample.jsonl"])


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium for the browser tests (`scripts/browser_env.sh` installs Debian's
    `chromium`; `make test` runs it). Skips, with the reason, where there is none."""
    pytest.importorskip("humpback_testing", reason="the test-support package is not installed (make install)")
    from humpback_testing.browser import find_chromium

    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on PATH (and HUMPBACK_CHROMIUM unset): `bash scripts/browser_env.sh` installs "
                    "Debian's chromium where apt-get may run as root; elsewhere install chromium yourself")
    return path


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when asked: `-m slow` (or an -m expression naming it) or HUMPBACK_SLOW_TESTS=1.
    They check what faster tests already cover, against heavier real parts; `make test` stays short."""
    import os

    if "slow" in (config.getoption("-m") or "") or os.environ.get("HUMPBACK_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or HUMPBACK_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
