"""The few Kubernetes API calls the operator makes: get a run, patch its status, create and delete
children, and watch them (Kopf watches the runs).

The official `kubernetes` client reads the configuration (kubeconfig or the in-cluster service
account, TLS, client certificates, a proxy) and keeps the bearer token fresh (rotated service
account tokens, exec plugins); the requests themselves go out through aiohttp on the operator's
event loop, as Kopf's own do. Under load (100 runs, bench/operator_scale.py) the blocking client in
threads was the operator's largest CPU cost: its serialisation layers, urllib3, and the hand-offs
between threads and the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp

from humpback_runtime.spec import GROUP, PLURAL, VERSION

from humpback_operator.backends import BACKENDS
from humpback_operator.names import LABEL_RUN

log = logging.getLogger(__name__)

# apiVersion, kind -> plural: every kind the operator creates, deletes or reads.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    (f"{GROUP}/{VERSION}", "BacktranslationRun"): PLURAL,
    **{(f"{b.group}/{b.version}", b.kind): b.plural for b in (cls() for cls in BACKENDS.values())},
}


# How the operator's own requests introduce themselves (Kopf's say "kopf/…"): in the API server's
# audit log and in its request metrics.
USER_AGENT = "humpback-operator"

# Asks the API server for an object's metadata only (never a Secret's data).
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def adoption_problem(wanted: Mapping[str, Any], existing: Mapping[str, Any]) -> str | None:
    """Why an existing object of the same name is not the one we would create (None: it is): it
    must have our controller ownerReference (same uid) and the same fingerprint annotation."""
    want = wanted["metadata"]
    have = existing.get("metadata") or {}
    our_uids = {r.get("uid") for r in want.get("ownerReferences") or [] if r.get("controller")}
    their = [r for r in have.get("ownerReferences") or [] if r.get("controller")]
    if our_uids and not any(r.get("uid") in our_uids for r in their):
        owner = ", ".join(f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')})" for r in their) or "no owner"
        return f"its controller is {owner}"
    key = "humpback.dev/fingerprint"
    ours = (want.get("annotations") or {}).get(key)
    theirs = (have.get("annotations") or {}).get(key)
    if ours is not None and theirs != ours and wanted["kind"] != "ConfigMap":  # (its data is reconciled in place)
        return f"its fingerprint is {theirs}, expected {ours}"
    return None


class ApiError(RuntimeError):
    def __init__(self, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}")


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    """The path of a namespace's objects of a kind, or of all namespaces' (namespace None)."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/{plural}" if namespace is None else f"{root}/namespaces/{namespace}/{plural}"


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
    path = collection_path(api_version, plural, namespace)
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


# At most this many API requests at once, on connections of their own: store reads
# (store_probe.py, threads) can never hold up creates, deletes and status patches, nor these them.
# When many runs move at once, a call's round trip is mostly the time the busy event loop takes to
# get back to its answer: with 8 at once, calls waited for their turn (bench/operator_scale.py at
# 100 runs: p50 child done -> next child 1.06 s, 0.85 s with 32). More is not better: the watch
# streams share the loop, and at 1,000 runs 32 left Kopf's view of the runs so far behind our own
# writes that reconciles went from 10 to 19 per run; 16 keeps 11.5. (Kopf's own client has no limit.)
API_CONNECTIONS = 16
# (connect, read) seconds of one API call: a request the server never answers must not hold a
# connection for good (with all of them stuck, no run would be reconciled again).
API_TIMEOUT = (5.0, 60.0)
# How long the API server keeps one watch request open (`timeoutSeconds`); the client then asks
# again from where it was. Below the 5 minutes after which load balancers often cut idle streams.
WATCH_SECONDS = 270


class Kube:
    def __init__(self, api_client: Any | None = None, connections: int = API_CONNECTIONS,
                 timeout: tuple[float, float] = API_TIMEOUT):
        if api_client is None:
            api_client = _default_api_client()
        self.api = api_client  # a kubernetes.client.ApiClient: its configuration and user agent
        self.connections = connections
        self.timeout = aiohttp.ClientTimeout(sock_connect=timeout[0], sock_read=timeout[1])
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._turns: asyncio.Semaphore | None = None
        self._options: dict[str, Any] = {}  # what every request of the session adds: proxy, TLS server name
        self._watch_session: aiohttp.ClientSession | None = None
        self._watch_session_loop: asyncio.AbstractEventLoop | None = None

    def _session_here(self) -> aiohttp.ClientSession:
        """The session of the running event loop (made on first use: a session belongs to a loop)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            cfg = self.api.configuration
            connector = aiohttp.TCPConnector(limit=self.connections, ssl=_ssl_context(cfg))
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
            self._session_loop = loop
            self._turns = asyncio.Semaphore(self.connections)
            self._options = {}
            if cfg.proxy and not _bypasses_proxy(cfg):
                self._options["proxy"] = cfg.proxy
            if cfg.tls_server_name:
                self._options["server_hostname"] = cfg.tls_server_name
        return self._session

    def _watch_session_here(self) -> aiohttp.ClientSession:
        """Watch streams' own session: a stream holds its connection for minutes, so it never takes
        one of the API calls' connections (nor waits for one)."""
        self._session_here()  # the options, and the loop check
        if (self._watch_session is None or self._watch_session.closed
                or self._watch_session_loop is not self._session_loop):
            connector = aiohttp.TCPConnector(limit=0, ssl=_ssl_context(self.api.configuration))
            self._watch_session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
                sock_connect=self.timeout.sock_connect, sock_read=WATCH_SECONDS + self.timeout.sock_read))
            self._watch_session_loop = self._session_loop
        return self._watch_session

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None and not session.closed:
                await session.close()

    async def watch(self, path: str, query: list[tuple[str, str]]) -> AsyncIterator[dict]:
        """The events of one watch request (`?watch=true`) as they come, each parsed; the stream ends
        when the server ends it (after WATCH_SECONDS). Raises ApiError as `call` does."""
        query = [*query, ("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(WATCH_SECONDS))]
        url = self.api.configuration.host + path + f"?{urlencode(query)}"
        try:
            headers = self._headers("application/json", "application/json")
            async with self._watch_session_here().get(url, headers=headers, **self._options) as response:
                if response.status >= 400:
                    raise _api_error(response.status, response.reason or "", await response.read())
                pending = b""
                # By chunks, not lines: aiohttp refuses a line longer than its buffer, and an object can be.
                async for chunk in response.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ApiError(0, type(e).__name__, f"watch {path}: {e}") from None

    def _headers(self, content_type: str, accept: str) -> dict[str, str]:
        headers = {**self.api.default_headers, "Content-Type": content_type, "Accept": accept}
        for auth in self.api.configuration.auth_settings().values():  # refreshes an expiring token
            headers[auth["key"]] = auth["value"]
        return headers

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                   query: list[tuple[str, str]] | None = None, accept: str = "application/json",
                   answer: bool = True) -> Any:
        """The request's answer, parsed (None when `answer` is False: a create or delete whose echo of
        the object nobody reads). Raises ApiError for an error status or no answer."""
        session = self._session_here()
        # A call waits for its turn before it serialises its body: calls queued under load hold
        # only the objects their decisions hold anyway.
        async with self._turns:
            url = self.api.configuration.host + path + (f"?{urlencode(query)}" if query else "")
            data = None if body is None else json.dumps(body).encode()
            try:
                async with session.request(method, url, data=data, headers=self._headers(content_type, accept),
                                           **self._options) as response:
                    raw = await response.read()
                    status, reason = response.status, response.reason or ""
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # no answer in time, refused, reset: later
                raise ApiError(0, type(e).__name__, f"{method} {path}: {e}") from None
        if status >= 400:
            raise _api_error(status, reason, raw)
        return json.loads(raw) if raw and answer else None

    async def get_run(self, namespace: str, name: str) -> dict | None:
        try:
            return await self.call("GET", resource_path(f"{GROUP}/{VERSION}", "BacktranslationRun", namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """The labels of a Secret (None: no such Secret), for the tenancy policy. Only its metadata
        is asked for; the operator never reads a Secret's data."""
        try:
            obj = await self.call("GET", resource_path("v1", "Secret", namespace, name), accept=METADATA_ONLY)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return dict((obj or {}).get("metadata", {}).get("labels") or {})

    async def claim_access_modes(self, namespace: str, name: str) -> list[str] | None:
        """The access modes of a PersistentVolumeClaim (None: no such claim)."""
        try:
            obj = await self.call("GET", resource_path("v1", "PersistentVolumeClaim", namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return list(((obj or {}).get("spec") or {}).get("accessModes") or [])

    async def ensure_peering(self, name: str, namespace: str | None) -> bool:
        """Create Kopf's peering object (ClusterKopfPeering; KopfPeering in `namespace`) unless it
        exists; True if created. The CRDs come with the chart; the object cannot (Helm cannot
        create an object of a kind whose CRD the same release installs)."""
        kind, plural = ("KopfPeering", "kopfpeerings") if namespace else ("ClusterKopfPeering", "clusterkopfpeerings")
        path = f"/apis/kopf.dev/v1/namespaces/{namespace}/{plural}" if namespace else f"/apis/kopf.dev/v1/{plural}"
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        try:
            await self.call("POST", path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": meta})
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def patch_run_status(self, namespace: str, name: str, status: dict) -> dict:
        path = resource_path(f"{GROUP}/{VERSION}", "BacktranslationRun", namespace, name, "status")
        return await self.call("PATCH", path, {"status": status}, "application/merge-patch+json")

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create `obj`; False when it exists already as ours (a retry, a restart, the other replica):
        same controller ownerReference and fingerprint. An object of that name that is not ours is
        never adopted: that raises a 409 ApiError saying whose it is."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            await self.call("POST", path, obj, answer=False)
        except ApiError as e:
            if e.status != 409:
                raise
            existing = await self.call("GET", f"{path}/{meta['name']}", accept=METADATA_ONLY)
            problem = adoption_problem(obj, existing or {})
            if problem:
                raise ApiError(409, "Conflict", f"{obj['kind']} {meta['name']} exists and is not this run's: {problem}") from None
            return False
        return True

    async def replace_data(self, obj: Mapping[str, Any]) -> None:
        """Merge-patch `data` (and labels) of an existing object, e.g. the run's spec ConfigMap."""
        meta = obj["metadata"]
        patch = {"metadata": {"labels": meta.get("labels", {}), "annotations": meta.get("annotations", {})},
                 "data": obj.get("data", {})}
        await self.call("PATCH", resource_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]),
                        patch, "application/merge-patch+json")

    async def list_children(self, namespace: str, run: str, kinds: Iterable[tuple[str, str]]) -> list[dict]:
        """The children of `run` of these kinds ((apiVersion, kind) pairs) as the API server has them
        now. Only kinds the operator may list: its RBAC lets it create and delete a server's Secret
        and NetworkPolicy, not list them."""
        selector = [("labelSelector", f"{LABEL_RUN}={run}")]
        out: list[dict] = []
        for api_version, kind in kinds:
            try:
                listed = await self.call("GET", resource_path(api_version, kind, namespace), query=selector)
            except ApiError as e:
                if e.status == 404:  # a kind this cluster does not serve (the training operator's CRD)
                    continue
                raise
            out += [{**item, "apiVersion": api_version, "kind": kind} for item in (listed or {}).get("items") or []]
        return out

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete in the background (dependents go with the garbage collector); False if gone already."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self.call("DELETE", resource_path(api_version, kind, namespace, name), body, answer=False)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True


def _api_error(status: int, reason: str, raw: bytes) -> ApiError:
    message = raw.decode(errors="replace")
    try:
        message = json.loads(message).get("message", message)
    except (ValueError, AttributeError):
        pass
    return ApiError(status, reason, str(message))


def _ssl_context(cfg: Any) -> ssl.SSLContext | bool:
    """TLS as the kubernetes client's own pool would do it: the configured CA, client certificate,
    and hostname check."""
    if not cfg.host.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if not cfg.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif cfg.assert_hostname is False:
        context.check_hostname = False
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, cfg.key_file)
    return context


def _bypasses_proxy(cfg: Any) -> bool:
    from requests.utils import should_bypass_proxies

    return should_bypass_proxies(cfg.host, no_proxy=cfg.no_proxy or "")


def _default_api_client() -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    api = client.ApiClient(configuration)
    api.user_agent = USER_AGENT
    return api
