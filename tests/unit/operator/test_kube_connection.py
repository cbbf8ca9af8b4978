"""How the operator's API calls reach the API server (kube.py, aiohttp on the event loop): over TLS
checked against the configured CA, with the bearer token the kubernetes client's configuration
gives (refreshed when it expires, as a rotated service account token), and errors as ApiError."""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from humpback_operator.kube import ApiError, Kube


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (an IP SAN, as an in-cluster API server's) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict]

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": json.loads(body) if body else None})
        if self.path.endswith("/missing"):
            status, answer = 404, {"kind": "Status", "message": 'runs "missing" not found', "reason": "NotFound"}
        else:
            status, answer = 200, {"ok": True}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[str, Path, list[dict]]]:
    cert, key = _self_signed(tmp_path, "apiserver")
    handler = type("Recorder", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert, handler.seen
    server.shutdown()
    server.server_close()


def _configuration(host: str, ca: Path | None, token: str = "first") -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    configuration.host = host
    configuration.ssl_ca_cert = str(ca) if ca else None
    configuration.api_key = {"BearerToken": token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return configuration


def _call(kube: Kube, *args, **kwargs):
    async def go():
        try:
            return await kube.call(*args, **kwargs)
        finally:
            await kube.close()
    return asyncio.run(go())


def test_calls_go_over_tls_checked_against_the_configured_ca_with_the_bearer_token(tls_server):
    url, ca, seen = tls_server
    configuration = _configuration(url, ca)
    tokens = iter(["rotated-1", "rotated-2"])
    # As the client's in-cluster loader does: a hook that reads the token file again when it expires.
    configuration.refresh_api_key_hook = lambda c: c.api_key.update(BearerToken=next(tokens))
    kube = Kube(api_client=kubernetes.client.ApiClient(configuration))
    assert _call(kube, "PATCH", "/apis/humpback.dev/v1alpha1/namespaces/a/backtranslationruns/r/status",
                 {"status": {"phase": "Running"}}, "application/merge-patch+json") == {"ok": True}
    assert _call(kube, "GET", "/api/v1/namespaces/a/secrets/s", query=[("labelSelector", "a=b")]) == {"ok": True}
    first, second = seen
    assert first["headers"]["authorization"] == "Bearer rotated-1"
    assert second["headers"]["authorization"] == "Bearer rotated-2"
    assert first["headers"]["content-type"] == "application/merge-patch+json"
    assert first["body"] == {"status": {"phase": "Running"}}
    assert second["path"] == "/api/v1/namespaces/a/secrets/s?labelSelector=a%3Db"
    assert first["headers"]["user-agent"].startswith("OpenAPI-Generator")  # the client's own user agent


def test_a_server_whose_certificate_the_ca_does_not_sign_gets_no_request(tls_server, tmp_path):
    url, _ca, seen = tls_server
    other_ca, _ = _self_signed(tmp_path, "other")
    kube = Kube(api_client=kubernetes.client.ApiClient(_configuration(url, other_ca)))
    with pytest.raises(ApiError, match="ClientConnectorCertificateError"):
        _call(kube, "GET", "/api/v1/namespaces/a/configmaps/c")
    assert seen == []


def test_an_error_status_is_an_api_error_with_the_servers_message(tls_server):
    url, ca, _seen = tls_server
    kube = Kube(api_client=kubernetes.client.ApiClient(_configuration(url, ca)))
    with pytest.raises(ApiError) as error:
        _call(kube, "GET", "/apis/humpback.dev/v1alpha1/namespaces/a/backtranslationruns/missing")
    assert error.value.status == 404 and str(error.value) == '404 Not Found: runs "missing" not found'
