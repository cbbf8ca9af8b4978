"""A Kubernetes API server for tests: KMock's ``KubernetesEmulator`` with the fixes that kopf, the
``kubernetes`` client and kubectl need, served on 127.0.0.1 from a background thread.

    with Emulator(crds=[Path("my-crd.yaml"), OTHER_CRD]) as kube:   # the CRDs to serve: files or dicts
        path = write_kubeconfig(tmp_path / "kubeconfig", kube.url)
        subprocess.run(["kubectl", "--kubeconfig", path, "get", "widgets"])
        mark = kube.request_count()
        ...
        print(kube.request_counts(since=mark))      # Counter({"PATCH widgets/status": 7, ...})

What it emulates, on top of KMock (https://github.com/nolar/kmock): objects with server-set
metadata (uid, resourceVersion, creationTimestamp, generation), create/get/list/watch/patch
(JSON merge, JSON patch, strategic merge, apply)/replace/delete, the ``status`` subresource,
finalizers, label and field selectors, watch resumption from a resourceVersion, Tables for
``kubectl get``, and CRDs created through the API (they start being served).

It says no where kube-apiserver does: CRD schemas and their CEL rules, built-in kinds checked
strictly, namespaces that must exist, PodSecurity and ResourceQuota admission of pods; it
garbage-collects by ownerReferences, and expires watches (410 Gone) on demand. What it does not:
authentication, defaulting, and any controller (Jobs, Deployments, custom resources never
progress by themselves: tests bring stand-in controllers).

It names nothing of any project: the tests pass in the CRDs it serves. Where and why it differs
from KMock 0.8: README.md next to this file.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import dataclasses
import datetime
import functools
import json
import os
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import orjson
from kmock._internal import rendering as kmock_rendering
import yaml

from humpback_testing.kube import admission

# The built-in resources served: (apiVersion, plural, kind, namespaced, shortNames, subresources).
BUILTIN_RESOURCES: tuple[tuple[str, str, str, bool, tuple[str, ...], tuple[str, ...]], ...] = (
    ("v1", "namespaces", "Namespace", False, ("ns",), ("status",)),
    ("v1", "configmaps", "ConfigMap", True, ("cm",), ()),
    ("v1", "secrets", "Secret", True, (), ()),
    ("v1", "services", "Service", True, ("svc",), ("status",)),
    ("v1", "events", "Event", True, ("ev",), ()),
    ("v1", "pods", "Pod", True, ("po",), ("status",)),
    ("apps/v1", "deployments", "Deployment", True, ("deploy",), ("status",)),
    ("batch/v1", "jobs", "Job", True, (), ("status",)),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", True, ("netpol",), ()),
    ("v1", "resourcequotas", "ResourceQuota", True, ("quota",), ("status",)),
    ("v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), ("status",)),
    ("events.k8s.io/v1", "events", "Event", True, ("ev",), ()),
    ("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition", False,
     ("crd", "crds"), ("status",)),
)
# Built-in kinds checked against their schemas (strict) on create and update: what the operator
# and the stand-ins send. Others (Events, Namespaces, ...) are stored as sent.
VALIDATED_BUILTINS = {"ConfigMap", "Service", "Pod", "Deployment", "Job", "ResourceQuota"}
# Kinds without metadata.generation in a real cluster (their content is not a "spec").
_NO_GENERATION = {"ConfigMap", "Secret", "Event", "Namespace"}
_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

# Strategic merge patch: the merge keys of the lists that built-in kinds merge by key.
_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name", "conditions": "type",
    "hostAliases": "ip", "ownerReferences": "uid", "topologySpreadConstraints": "topologyKey",
}
_SET_LISTS = {"finalizers"}  # primitive lists with patchStrategy "merge"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """A Status the way kube-apiserver phrases it: clients test `reason` (NotFound, AlreadyExists)."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"code": code})


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """What the server knows of a resource: enough for discovery, storage rules and Tables."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    printer_columns: tuple[dict[str, Any], ...] = ()
    schema: dict[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @functools.cached_property
    def ref(self) -> kmock.resource:  # compared for every watcher of every change: built once
        return kmock.resource(self.group, self.version, self.plural)

    @functools.cached_property
    def validator(self) -> Any:
        """The CRD's schema as a draft-4 JSON Schema validator (its CEL rules apart: `admission.cel_errors`)."""
        return admission.schema_validator(_to_jsonschema({k: v for k, v in (self.schema or {}).items() if k != "x-kubernetes-validations"}))

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def has_generation(self) -> bool:
        return self.kind not in _NO_GENERATION

    def qualified(self) -> str:  # as in messages: `jobs.batch "x" not found`
        return f"{self.plural}.{self.group}" if self.group else self.plural


@dataclasses.dataclass(frozen=True)
class Route:
    """An object endpoint: /api(s)/…/[namespaces/NS/]PLURAL[/NAME[/SUBRESOURCE]]."""

    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One served request, for counting: `verb` is the Kubernetes verb (get, list, watch, …)."""

    verb: str
    method: str
    path: str
    resource: str  # plural[/subresource], "" for discovery and other paths
    namespace: str | None
    name: str | None
    user_agent: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)  # the query (labelSelector, watch, ...)

    @property
    def key(self) -> str:
        return f"{self.verb.upper()} {self.resource}" if self.resource else f"{self.method} {self.path}"


@dataclasses.dataclass(eq=False)
class _Watcher:
    route: Route
    labels: list[tuple[str, str, tuple[str, ...]]]
    fields: list[tuple[str, str, str]]
    queue: asyncio.Queue[Any]


_STOP = object()


class KubeEmulator(kmock.KubernetesEmulator):
    """KMock's emulator with Kubernetes' own storage rules; one instance per event loop.

    All object requests go to `_serve_object` (a KMock fallback reaction, so reactions that a test
    adds with KMock's DSL, e.g. ``kube.handler['post', kmock.resource('batch/v1/jobs')] << 500``,
    still take precedence). KMock serves discovery; `_serve_version` fixes the core group.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._rv = 0
        # The last changes, for watches that resume from a resourceVersion (older ones: 410 Gone).
        self._log: collections.deque[tuple[int, ResourceType, str, dict | None, dict]] = collections.deque(maxlen=10_000)
        self._watchers: set[_Watcher] = set()  # type: ignore[type-arg]
        self._closing = False
        self._floor_rv = -1  # watches resuming from this or before get 410 Gone (`expire_watches`)
        self._held: list[Any] | None = None  # events not sent while watches are held (`hold_watches`)
        self._written: tuple[Any, bytes | None] = (None, None)  # the last object written, its JSON once made
        self._payload_order: tuple[tuple[int, ...], list[Any]] = ((), [])
        self._dependents: dict[str, set[tuple[Any, str | None, str]]] = {}  # owner uid -> keys (garbage collection)
        self._idle_bus: kmock.Bus[Any] = kmock.Bus()
        for api_version, plural, kind, namespaced, short, sub in BUILTIN_RESOURCES:
            group, _, version = api_version.rpartition("/")
            self.add_type(ResourceType(group, version, plural, kind, namespaced, singular=kind.lower(),
                                       short_names=short, subresources=sub))
        # One reaction for every object endpoint, above KMock's own fallbacks (sub-priority 1 of -inf):
        # KMock's stateful handlers only merge dicts and do not know metadata, subresources or PUT.
        self._object_endpoints = (self.fallback ** 1)[lambda request: self._route(request) is not None] << self._serve_object
        # kubectl's --validate=strict (the default) reads /openapi/v3 to learn that the server
        # validates fields itself (the fieldValidation parameter); without it kubectl refuses to apply.
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback[re.compile(r"/openapi/v3/.+")] << self._serve_openapi_group_version

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """KMock's RawHandler._handle, less two costs: KubernetesEmulator's own storing (done in
        _serve_object), and the test "is the request in the reaction's view", which KMock answers
        by scanning every past request (quadratic: 30 ms a request after a few thousand)."""
        for payload in self._ordered_payloads():
            if payload._disabled.is_set():
                continue
            if payload is self._object_endpoints:
                if self._route(request) is None:
                    continue
                return await self._serve_objects(request)
            if self._sees(payload._source, request):
                try:
                    return await payload(request)
                except kmock.ReactionMismatchError:  # either mismatch or depletion
                    payload._disabled.set()
                except NotImplementedError:  # matched, but non-actionable (nothing to respond with)
                    pass
        raise NotImplementedError("Undefined server behaviour: no reaction matching the request is defined.")

    def _ordered_payloads(self) -> list[Any]:
        """The reactions by KMock's priority, sorted again only when they change (computing the
        priorities walks the DSL tree: it was a third of the emulator's time under load)."""
        key = tuple(map(id, self._payloads))
        if self._payload_order[0] != key:
            ordered = sorted(self._payloads, key=lambda payload: tuple(-p for p in _padded(payload.priorities, self._payloads)))
            self._payload_order = (key, ordered)
        return self._payload_order[1]

    def _sees(self, view: Any, request: kmock.Request) -> bool:
        while True:
            if view is self:
                return True
            if type(view) is kmock.Priority:
                view = view._source
            elif type(view) is kmock.Filter:
                if not view.criteria(request):
                    return False
                view = view._source
            else:  # slices, groups, exclusions depend on the history: KMock's own answer
                return request in view

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if _kmock_misparses(raw_request.path):
            request = await self._unparsed_request(raw_request)
            try:
                return await kmock.Response(payload=self._serve_object)(request)
            except Exception as exc:
                return await self._render_error(exc)
        try:
            if self._route_alone(raw_request.path):
                return await self._serve_unparsed(raw_request)
            return await super().__call__(raw_request)
        finally:
            # KMock keeps every request for assertions (kmock pins 0.8): without aiohttp's request and
            # with one shared idle stream bus, a served request costs ~1 KB, not ~6 KB.
            for request in reversed(self._requests[-32:]):  # the latest, unless others came meanwhile
                if request._raw_request is raw_request:
                    object.__setattr__(request, "_raw_request", None)
                    object.__setattr__(request, "_stream_bus", self._idle_bus)
                    break

    def _route_alone(self, path: str) -> bool:
        """Whether a request to `path` can only reach the object endpoints: no test reaction is
        defined (nothing comes before them) and the path is an object's."""
        first = next((p for p in self._ordered_payloads() if not p._disabled.is_set()), None)
        return first is self._object_endpoints and self._route_path(path) is not None

    async def _serve_objects(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """The object endpoints' reaction, what nearly every request reaches, served as KMock would
        serve it without its generic criteria and rendering of a callable (each inspects the
        function's signature: a fifth of the emulator's CPU under load)."""
        self._object_endpoints._requests.append(request)
        response: kmock.Response = await self._serve_object(request)
        return await response(request)

    async def _unparsed_request(self, raw_request: aiohttp.web.BaseRequest) -> kmock.Request:
        """The request as KMock keeps it for assertions (method, URL, query, headers, body and its
        JSON), without KMock's parsing into Kubernetes terms (resource, action, ...), which only a
        test's reactions read; added to the request log."""
        body = await raw_request.read()
        data = None
        if body and "json" in raw_request.headers.get("Content-Type", "json"):
            try:
                data = orjson.loads(body)
            except ValueError:
                data = None
        request = kmock.Request(id=len(self._requests), method=raw_request.method, url=raw_request.url,
                                params=dict(raw_request.query), headers=dict(raw_request.headers),
                                body=body, data=data, raw_request=raw_request)
        self._requests.append(request)
        return request

    async def _serve_unparsed(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """KMock's RawHandler.__call__ for a request only the object endpoints can take
        (`_route_alone`), without KMock's parsing of it (~18 % of the emulator's CPU under load)."""
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            if self.limit is not None and len(self._requests) >= self.limit:
                raise kmock.KMockError("Too many requests have been served so far.")
            request = await self._unparsed_request(raw_request)
            try:
                return await self._serve_objects(request)
            except kmock_rendering.StreamingError as e:  # as KMock: the stream's headers went out already
                raw_response = e.args[0]
                if e.__cause__ is None:
                    raise
                raise e.__cause__ from None
        except Exception as e:  # as KMock: errors go to the client, and to the test's context
            if not self._errors:
                raise
            self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    # KMock writes the core group's groupVersion as "/v1"; clients split it on "/" and want "v1".
    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        payload = await super()._serve_version(request)
        assert isinstance(payload, dict)
        if payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        for entry in payload.get("resources", []):
            rtype = self._types.get((request.resource.group, request.resource.version, entry["name"].split("/")[0]))
            if rtype is not None and "/" in entry["name"]:  # KMock copies the resource's names to subresources
                entry.update(verbs=["get", "patch", "update"], shortNames=[], categories=[])
        return payload

    # --- the resource registry ------------------------------------------------------------------

    def add_type(self, rtype: ResourceType) -> None:
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self.resources[rtype.ref] = kmock.ResourceInfo(
            kind=rtype.kind, singular=rtype.singular or rtype.kind.lower(), namespaced=rtype.namespaced,
            verbs=set(_VERBS), shortnames=set(rtype.short_names), categories=set(rtype.categories),
            subresources=set(rtype.subresources))

    def remove_type(self, group: str, version: str, plural: str) -> None:
        rtype = self._types.pop((group, version, plural), None)
        if rtype is not None:
            del self.resources[rtype.ref]
            for key in [key for key in self.objects if key[0] == rtype.ref]:
                del self.objects[key]

    def _crd_types(self, crd: Mapping[str, Any]) -> list[ResourceType]:
        spec, names = crd.get("spec", {}), crd.get("spec", {}).get("names", {})
        return [
            ResourceType(spec["group"], version["name"], names["plural"], names["kind"],
                         spec.get("scope", "Namespaced") == "Namespaced",
                         singular=names.get("singular", names["kind"].lower()),
                         short_names=tuple(names.get("shortNames", ())), categories=tuple(names.get("categories", ())),
                         subresources=tuple(version.get("subresources", {})),
                         printer_columns=tuple(version.get("additionalPrinterColumns", ())),
                         schema=(version.get("schema") or {}).get("openAPIV3Schema"))
            for version in spec.get("versions", []) if version.get("served", True)
        ]

    def _crd_changed(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        """A CRD created, changed or deleted through the API starts/stops serving its resources."""
        for rtype in self._crd_types(old or {}) if old else []:
            if new is None or all(rtype.version != t.version for t in self._crd_types(new)):
                self.remove_type(rtype.group, rtype.version, rtype.plural)
        for rtype in self._crd_types(new) if new else []:
            self.add_type(rtype)

    # --- routing ---------------------------------------------------------------------------------

    def _route(self, request: kmock.Request) -> Route | None:
        return self._route_path(request.url.path)

    def _route_path(self, path: str) -> Route | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        rtype = self._types.get((group, version, rest[0]))
        if rtype is None or len(rest) > 3 or (rtype.namespaced is False and namespace is not None):
            return None
        return Route(rtype, namespace, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)

    async def _serve_object(self, request: kmock.Request) -> kmock.Response:
        route = self._route(request)
        assert route is not None
        method, params = request.method.upper(), request.params
        if route.subresource not in (None, "status"):
            raise _api_error(404, "NotFound", f"the server could not find the requested resource ({route.subresource})")
        if route.subresource == "status" and not route.rtype.has_status:
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and _truthy(params.get("watch")):
            # KMock would send application/octet-stream; client-go picks its stream decoder by this.
            return kmock.Response(status=200, headers={"Content-Type": "application/json"}, payload=self._watch(route, params))
        if method == "GET" and route.name is None:
            items, more = self._page(self._select(route, params), params)  # kubectl asks for pages of 500
            if _wants_table(request):
                return kmock.Response(status=200, payload=self._table(route.rtype, items, more))
            return kmock.Response(status=200, payload=self._list(route.rtype, items, more))
        if method == "GET":
            obj = self._get(route)
            return kmock.Response(status=200, payload=self._table(route.rtype, [obj]) if _wants_table(request) else obj)
        if method == "POST" and route.name is None:
            return self._answer(201, self._create(route, _body(request), params))
        if method == "PATCH" and route.name is not None:
            return self._answer(200, self._patch(route, request, params))
        if method == "PUT" and route.name is not None:
            body = _body(request)
            if not isinstance(body, dict):
                raise _api_error(400, "BadRequest", "the body of a PUT must be an object")
            return self._answer(200, self._update(route, lambda old: body, body, params))
        if method == "DELETE" and route.name is not None:
            return kmock.Response(status=200, payload=self._delete(route, params))
        if method == "DELETE":
            deleted = [self._delete(dataclasses.replace(route, namespace=o["metadata"].get("namespace"), name=o["metadata"]["name"]))
                       for o in self._select(route, params)]
            return kmock.Response(status=200, payload=self._list(route.rtype, deleted))
        raise _api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _answer(self, status: int, obj: Any) -> kmock.Response:
        """The answer to a write: the object as its watch event had it serialised, if it is that one."""
        if obj is self._written[0]:
            return kmock.Response(status=status, headers={"Content-Type": "application/json"}, payload=self._written_json())
        return kmock.Response(status=status, payload=obj)

    # --- storage ---------------------------------------------------------------------------------

    def _key(self, route: Route) -> tuple[kmock.resource, str | None, str]:
        return (route.rtype.ref, route.namespace if route.rtype.namespaced else None, route.name or "")

    def _current(self, route: Route) -> dict[str, Any] | None:
        key = self._key(route)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def _get(self, route: Route) -> dict[str, Any]:
        obj = self._current(route)
        if obj is None:
            raise _api_error(404, "NotFound", f'{route.rtype.qualified()} "{route.name}" not found',
                             name=route.name, group=route.rtype.group, kind=route.rtype.plural)
        return obj

    def _store(self, route: Route, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """Write one version (None deletes), bump resourceVersion, and tell the watchers."""
        key = self._key(route)
        self._rv += 1
        if new is None:
            assert old is not None
            gone = {**old, "metadata": {**old["metadata"], "resourceVersion": str(self._rv)}}
            self.objects[key].delete()
            self._emit(route.rtype, "DELETED", old, gone)
            self._collect_garbage(old["metadata"].get("uid", ""))
        else:
            for ref in new["metadata"].get("ownerReferences") or ():
                self._dependents.setdefault(ref.get("uid", ""), set()).add(key)
            new["metadata"]["resourceVersion"] = str(self._rv)
            if key in self.objects:
                self.objects[key].history.append(new)
                del self.objects[key].history[:-20]  # keep the memory bounded on long runs
            else:
                self.objects[key] = new
            self._emit(route.rtype, "ADDED" if old is None else "MODIFIED", old, new)
        if route.rtype.plural == "customresourcedefinitions" and route.rtype.group == "apiextensions.k8s.io":
            self._crd_changed(old, new)

    def _create(self, route: Route, body: Any, params: Mapping[str, str] = {}) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _api_error(400, "BadRequest", "the body of a create must be an object")
        obj = _with_own_metadata(body)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        if not meta.get("name"):
            raise _api_error(422, "Invalid", f"{route.rtype.kind}.{route.rtype.group} is invalid: metadata.name: Required value")
        if route.rtype.namespaced:
            namespace = route.namespace or meta.get("namespace")
            if not namespace:
                raise _api_error(400, "BadRequest", "the namespace of the object is not set")
            if meta.get("namespace", namespace) != namespace:
                raise _api_error(400, "BadRequest", "the namespace of the object does not match the namespace of the URL")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        route = dataclasses.replace(route, namespace=meta.get("namespace"), name=meta["name"])
        namespaces = self._types[("", "v1", "namespaces")]
        if route.rtype.namespaced and self._current(Route(namespaces, None, route.namespace, None)) is None:
            raise _api_error(404, "NotFound", f'namespaces "{route.namespace}" not found', name=route.namespace, kind="namespaces")
        if self._current(route) is not None:
            raise _api_error(409, "AlreadyExists", f'{route.rtype.qualified()} "{route.name}" already exists',
                             name=route.name, group=route.rtype.group, kind=route.rtype.plural)
        obj["apiVersion"], obj["kind"] = route.rtype.api_version, route.rtype.kind
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "managedFields"):
            meta.pop(server_owned, None)
        meta["uid"] = str(uuid.uuid4())  # KMock stores what it gets; clients need uid for ownerReferences
        meta["creationTimestamp"] = _now()  # KMock sets none; kubectl's AGE and kopf's bookkeeping read it
        if route.rtype.has_generation:
            meta["generation"] = 1  # the operator's observedGeneration compares with this
        if route.rtype.has_status:
            obj.pop("status", None)  # with a status subresource, only /status writes the status
        obj = self._admit(route, obj, params)
        if route.rtype.kind == "Pod":  # admission of pods: PodSecurity of the namespace, ResourceQuotas
            self._admit_pod(route, obj)
        if "dryRun" in params:
            return obj
        self._store(route, None, obj)  # sets resourceVersion: kopf resumes watches from it
        return obj

    def _patch(self, route: Route, request: kmock.Request, params: Mapping[str, str]) -> dict[str, Any]:
        content_type = _header(request, "Content-Type").split(";")[0].strip()
        body = _body(request)
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):  # as kube-apiserver: a JSON patch is a list of operations
                raise _api_error(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")

            def apply(old: dict[str, Any]) -> dict[str, Any]:
                try:
                    return jsonpatch.apply_patch(old, body, in_place=False)
                except jsonpatch.JsonPatchTestFailed as exc:  # kopf's optimistic concurrency on finalizers
                    raise _api_error(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise _api_error(422, "Invalid", str(exc)) from None
        elif content_type == "application/merge-patch+json":
            apply = lambda old: _merge_patch(old, body)  # noqa: E731
        elif content_type == "application/strategic-merge-patch+json":
            if route.rtype.group not in ("", "apps", "batch", "events.k8s.io"):  # as the real server for CRs
                raise _api_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                 "accepted media types include: application/json-patch+json, application/merge-patch+json, "
                                 "application/apply-patch+yaml")
            apply = lambda old: _strategic_merge_patch(old, body)  # noqa: E731
        elif content_type in ("application/apply-patch+yaml", "application/apply-patch+json"):
            # Server-side apply, approximated: create when absent, else a strategic/merge patch (no field managers).
            if self._current(route) is None:
                return self._create(dataclasses.replace(route, name=None), body, params)
            apply = lambda old: _strategic_merge_patch(old, body)  # noqa: E731
        else:
            raise _api_error(415, "UnsupportedMediaType", f"unsupported patch type: {content_type!r}")
        if not isinstance(body, (dict, list)):
            raise _api_error(400, "BadRequest", "the body of a patch must be JSON")
        return self._update(route, apply, body if isinstance(body, dict) else {}, params)

    def _update(self, route: Route, change: Callable[[dict[str, Any]], dict[str, Any]], body: Mapping[str, Any],
                params: Mapping[str, str] = {}) -> dict[str, Any]:
        old = self._get(route)
        expected_rv = (body.get("metadata") or {}).get("resourceVersion")
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:  # optimistic concurrency
            raise _api_error(409, "Conflict", f'Operation cannot be fulfilled on {route.rtype.qualified()} "{route.name}": '
                             "the object has been modified; please apply your changes to the latest version and try again")
        changed = change(old)  # the patch functions build a new object; `old` stays as it was
        if not isinstance(changed, dict):
            raise _api_error(422, "Invalid", "the patched object is not an object")
        if route.subresource == "status":
            # /status changes the status and nothing else. Stored versions are never changed in
            # place (watch events send them as they are), so the new one may share the old one's parts.
            new = {**old, "metadata": dict(old["metadata"])}
            if "status" in changed:
                new["status"] = changed["status"]
            else:
                new.pop("status", None)
        else:
            new = _with_own_metadata(changed)  # its metadata may be the old version's
            status = new.pop("status", None)  # what the client sent (written below without a status subresource)
            if route.rtype.has_status and "status" in old:
                new["status"] = old["status"]  # the main resource never changes the status
            elif not route.rtype.has_status and status is not None:
                new["status"] = status  # without a status subresource, the main resource writes it
            # Server-owned metadata stays as it was, whatever the client sent.
            meta = new["metadata"]
            for field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                          "name", "namespace", "resourceVersion"):
                meta.pop(field, None)
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        new_meta = new["metadata"]
        if new_meta.get("deletionTimestamp") and set(new_meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ()):
            raise _api_error(422, "Invalid", "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted")
        new = self._admit(route, new, params, old)
        if new == old:
            return old  # a no-op writes nothing: no new resourceVersion, no watch event
        if route.rtype.has_generation and _spec_of(new) != _spec_of(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1  # only spec changes bump it
        if "dryRun" in params:
            return new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._store(route, old, new)
            self._store(route, new, None)  # the last finalizer is gone: the object goes
            return new
        self._store(route, old, new)
        return new

    def _delete(self, route: Route, params: Mapping[str, str] = {}) -> dict[str, Any]:
        old = self._get(route)
        if "dryRun" in params:
            return old
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old  # already being deleted: waits for its finalizers
            new = {**old, "metadata": {**old["metadata"], "deletionTimestamp": _now(), "deletionGracePeriodSeconds": 0}}
            self._store(route, old, new)
            return new
        self._store(route, old, None)
        return old

    def _admit(self, route: Route, obj: dict[str, Any], params: Mapping[str, str],
               old: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A custom resource as the API server stores it: unknown fields pruned (an error with
        fieldValidation=Strict, which kubectl sends), then checked against the CRD's schema. `old`,
        for an update: the stored version, whose parts this write did not change (the same objects,
        shared) were pruned when they were stored."""
        if route.rtype.kind == "Secret" and "stringData" in obj:  # the API server folds stringData into data
            obj["data"] = {**(obj.get("data") or {}), **{k: base64.b64encode(str(v).encode()).decode()
                                                          for k, v in (obj.pop("stringData") or {}).items()}}
        if route.rtype.kind == "CustomResourceDefinition":  # accepted and established at once (`kubectl wait`)
            obj["status"] = _crd_status(obj)
        schema = route.rtype.schema
        if not schema:
            if route.rtype.kind in VALIDATED_BUILTINS and route.rtype.group in ("", "apps", "batch"):
                self._refuse_invalid(route, obj, admission.builtin_errors(obj))
            return obj
        unknown: list[str] = []
        stored = {id(part): part for key, part in (old or {}).items() if key != "metadata"}
        pruned = _prune(obj, schema, "", unknown, root=True, stored=stored)
        name = f'{route.rtype.kind}.{route.rtype.group} "{obj["metadata"].get("name")}"'
        if unknown and params.get("fieldValidation") == "Strict":
            raise _api_error(400, "BadRequest", f"{route.rtype.kind} in version \"{route.rtype.version}\" cannot be handled as a "
                             f"{route.rtype.kind}: strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown))
        try:
            import jsonschema  # noqa: F401
        except ImportError:  # the dev extra has it; without it the emulator only prunes
            return pruned
        body = {k: v for k, v in pruned.items() if k != "metadata"}
        errors = admission.schema_errors(route.rtype.validator, body)
        if errors:
            raise _api_error(422, "Invalid", f"{name} is invalid: " + "; ".join(errors), name=obj["metadata"].get("name"),
                             group=route.rtype.group, kind=route.rtype.kind)
        self._refuse_invalid(route, pruned, admission.cel_errors(schema, pruned))
        return pruned

    def _refuse_invalid(self, route: Route, obj: Mapping[str, Any], errors: list[str]) -> None:
        if errors:
            name = obj["metadata"].get("name")
            raise _api_error(422, "Invalid", f'{route.rtype.kind}{"." + route.rtype.group if route.rtype.group else ""} '
                             f'"{name}" is invalid: ' + "; ".join(errors), name=name, group=route.rtype.group, kind=route.rtype.kind)

    def _admit_pod(self, route: Route, pod: Mapping[str, Any]) -> None:
        """A pod as PodSecurity admission and the ResourceQuota admission plugin see it: 403
        Forbidden, with the API server's wording, when the namespace's `enforce` level or a quota
        refuses it (a Job's or ReplicaSet's controller turns that into a FailedCreate Event)."""
        namespace = self._current(Route(self._types[("", "v1", "namespaces")], None, route.namespace, None)) or {}
        level = (namespace.get("metadata", {}).get("labels") or {}).get("pod-security.kubernetes.io/enforce")
        if level in ("baseline", "restricted"):
            problems = admission.pod_security_problems(pod, level)
            if problems:
                raise _api_error(403, "Forbidden", f'pods "{pod["metadata"]["name"]}" is forbidden: violates PodSecurity '
                                 f'"{level}:latest": ' + ", ".join(problems))
        quotas = self._select(Route(self._types[("", "v1", "resourcequotas")], route.namespace, None, None), {})
        if quotas:
            pods = [p for p in self._select(Route(route.rtype, route.namespace, None, None), {})
                    if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            for quota in quotas:
                exceeded = admission.quota_exceeded(quota, pods, pod)
                if exceeded:
                    raise _api_error(403, "Forbidden", f'pods "{pod["metadata"]["name"]}" is forbidden: exceeded quota: '
                                     f'{quota["metadata"]["name"]}, {exceeded}')

    def _collect_garbage(self, owner_uid: str) -> None:
        """The garbage collector, in the background propagation mode: the dependents of a deleted
        object (its uid in their ownerReferences) are deleted after it, and theirs after them."""
        for ref, namespace, name in sorted(self._dependents.pop(owner_uid, ()), key=str):
            rtype = next((t for t in self._types.values() if t.ref == ref), None)
            if rtype is None:
                continue
            route = Route(rtype, namespace, name, None)
            current = self._current(route)
            if current is not None and owner_uid in {r.get("uid") for r in current["metadata"].get("ownerReferences") or ()}:
                self._delete(route)

    def hold_watches(self) -> None:
        """Stop sending watch events (a watch gap: a network partition, an API server restart);
        `expire_watches` ends the gap."""
        self._held = []

    def expire_watches(self) -> None:
        """410 Gone for every open watch, and for any watch resuming from before now: clients
        re-list. Events held back by `hold_watches` are never sent."""
        self._held = None
        self._floor_rv = self._rv  # resuming from here or before: 410; a list now gets a newer version
        self._rv += 1
        gone = {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                                            "reason": "Expired", "message": "too old resource version"}}
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(gone)
            watcher.queue.put_nowait(_STOP)

    async def _serve_openapi_root(self) -> dict[str, Any]:
        versions = {(t.group, t.version) for t in self._types.values()}
        return {"paths": {
            (f"apis/{g}/{v}" if g else f"api/{v}"): {"serverRelativeURL": f"/openapi/v3/{'apis/' + g if g else 'api'}/{v}?hash={self._rv}"}
            for g, v in sorted(versions)}}

    async def _serve_openapi_group_version(self, request: kmock.Request) -> dict[str, Any]:
        """Just enough OpenAPI v3 for kubectl: each kind's PATCH takes the fieldValidation parameter."""
        parts = request.url.path.split("/")[3:]  # ['api', 'v1'] or ['apis', group, version]
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        paths = {}
        for t in self._types.values():
            if (t.group, t.version) != (group, version):
                continue
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            path = f"{prefix}/namespaces/{{namespace}}/{t.plural}/{{name}}" if t.namespaced else f"{prefix}/{t.plural}/{{name}}"
            paths[path] = {"patch": {
                "operationId": f"patch{t.kind}",
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": t.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}],
                "responses": {"200": {"description": "OK"}},
            }}
        if not paths:
            raise _api_error(404, "NotFound", "the server could not find the requested resource")
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.35.0"}, "paths": paths,
                "components": {"schemas": {}}}

    # --- reading ---------------------------------------------------------------------------------

    def _select(self, route: Route, params: Mapping[str, str]) -> list[dict[str, Any]]:
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        result = []
        for (ref, namespace, name), obj in self.objects.items():
            if ref != route.rtype.ref or obj.deleted:
                continue
            if route.namespace is not None and namespace != route.namespace:
                continue
            if route.name is not None and name != route.name:
                continue
            raw = obj.raw
            if match_labels(labels, raw) and match_fields(fields, raw):
                result.append(raw)
        return result

    def _page(self, items: list[dict[str, Any]], params: Mapping[str, str]) -> tuple[list[dict[str, Any]], dict]:
        """`limit` and `continue` as the API server pages a list: in key order (namespace/name), at
        most `limit` items, then a token for the rest and how many remain. Unlike a real server the
        next page shows the objects as they are now, not as of the first page. A token from before
        `expire_watches` is 410 Gone, as one the server has compacted away."""
        if not params.get("limit") and not params.get("continue"):
            return items, {}
        start, since = "", self._rv
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"]))
                start, since = str(token["start"]), int(token["rv"])
            except (ValueError, KeyError, TypeError):
                raise _api_error(400, "BadRequest", "continue key is not valid") from None
            if since <= self._floor_rv:
                raise _api_error(410, "Expired", "The provided continue parameter is too old to display a consistent "
                                 "list result. You can start a new list without the continue parameter.")
        keyed = sorted((f"{o['metadata'].get('namespace') or ''}/{o['metadata']['name']}", o) for o in items)
        rest = [(key, obj) for key, obj in keyed if key > start]
        limit = int(params.get("limit") or 0)
        # Every page names the first page's resourceVersion: a watch from there misses nothing.
        if limit <= 0 or len(rest) <= limit:
            return [obj for _, obj in rest], {"resourceVersion": str(since)}
        page = rest[:limit]
        token = base64.urlsafe_b64encode(json.dumps({"rv": since, "start": page[-1][0]}).encode()).decode()
        return [obj for _, obj in page], {"resourceVersion": str(since), "continue": token,
                                          "remainingItemCount": len(rest) - limit}

    def _list(self, rtype: ResourceType, items: list[dict[str, Any]], more: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",  # KMock sends no kind; typed clients decode lists by it
            # KMock sends "...": watches resume from resourceVersion; `more`: a page's continue token
            "metadata": {"resourceVersion": str(self._rv), **(more or {})},
            "items": items,
        }

    def _table(self, rtype: ResourceType, items: list[dict[str, Any]], more: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The server-side printing of `kubectl get`: Name, the CRD's printer columns (or Age)."""
        columns = list(rtype.printer_columns) or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": {"resourceVersion": str(self._rv), **(more or {})},
            "columnDefinitions": [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}] + [
                {"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                 "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in columns],
            "rows": [
                {"cells": [obj["metadata"]["name"]] + [_cell(obj, c) for c in columns],
                 "object": {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]}}
                for obj in items
            ],
        }

    # --- watching --------------------------------------------------------------------------------

    def _emit(self, rtype: ResourceType, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        self._log.append((self._rv, rtype, kind, old, new))
        self._written = (new, None)
        if self._held is not None:
            return
        for watcher in self._watchers:
            event = self._event_for(watcher, rtype, kind, old, new)
            if event is not None:  # as json.dumps(event) writes it
                line = b'{"type": "' + event["type"].encode() + b'", "object": ' + self._written_json() + b"}\n"
                watcher.queue.put_nowait(line)

    def _written_json(self) -> bytes:
        """The last object written, serialised once: for every watcher's event and for the answer
        to the write (`_answer`); not at all when neither wants it (a garbage-collected Secret)."""
        obj, text = self._written
        if text is None:
            # orjson, not json: 6 % less of the emulator's CPU in bench/operator_scale.py at 100 runs.
            # OPT_NON_STR_KEYS: objects loaded from YAML may have them, as json.dumps accepts.
            text = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
            self._written = (obj, text)
        return text

    def _event_for(self, watcher: _Watcher, rtype: ResourceType, kind: str, old: dict | None, new: dict) -> dict | None:
        """The event this watcher gets for a change, if any: an object that moves into (out of) its
        selection is ADDED (DELETED) for it, as in a real API server."""
        route, meta = watcher.route, new["metadata"]
        if rtype.ref != route.rtype.ref or (route.namespace is not None and meta.get("namespace") != route.namespace):
            return None
        selected = lambda obj: obj is not None and match_labels(watcher.labels, obj) and match_fields(watcher.fields, obj)  # noqa: E731
        if kind == "MODIFIED" and selected(old) != selected(new):
            kind = "ADDED" if selected(new) else "DELETED"
        elif not selected(new):
            return None
        return {"type": kind, "object": new}

    async def _watch(self, route: Route, params: Mapping[str, str]):  # -> AsyncIterator[kmock.Payload]
        watcher = _Watcher(route, parse_label_selector(params.get("labelSelector", "")),
                           parse_field_selector(params.get("fieldSelector", "")), asyncio.Queue())
        if route.name is not None:  # the old /plural/NAME?watch=true form: the same as a field selector
            watcher.route = dataclasses.replace(route, name=None)
            watcher.fields.append(("metadata.name", "=", route.name))
        since = params.get("resourceVersion", "")
        initial: list[dict[str, Any]] = []
        if since in ("", "0") or _truthy(params.get("sendInitialEvents")):
            initial = [{"type": "ADDED", "object": obj} for obj in self._select(route, params)]
            if _truthy(params.get("sendInitialEvents")):
                initial.append({"type": "BOOKMARK", "object": {
                    "apiVersion": route.rtype.api_version, "kind": route.rtype.kind,
                    "metadata": {"resourceVersion": str(self._rv), "annotations": {"k8s.io/initial-events-end": "true"}}}})
        else:
            since_rv = int(since) if since.isdigit() else 0
            if since_rv <= self._floor_rv or (self._log and self._log[0][0] > since_rv + 1 and len(self._log) == self._log.maxlen):
                initial = [{"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                                                         "reason": "Expired", "message": f"too old resource version: {since}"}}]
            else:
                for rv, rtype, kind, old, new in self._log:
                    event = self._event_for(watcher, rtype, kind, old, new) if rv > since_rv else None
                    if event is not None:
                        initial.append(event)
        self._watchers.add(watcher)
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            yield b""  # send the headers now: clients wait for them before they read events
            for event in initial:
                yield event
            if initial and initial[0]["type"] == "ERROR":
                return
            while not self._closing:
                try:
                    remaining = None if deadline is None else max(0.0, deadline - loop.time())
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    return
                if event is _STOP:
                    return
                yield event
        finally:
            self._watchers.discard(watcher)

    def close_watches(self) -> None:
        """End every watch stream, so that the HTTP server stops without waiting for them."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(_STOP)


# --- helpers: bodies, patches, selectors, tables ---------------------------------------------------


def _kmock_misparses(path: str) -> bool:
    """KMock 0.8 fails to parse a path that ends in a bare `namespaces` (/api/v1/namespaces): it
    reads "namespaces" as the prefix of a namespace and finds no name after it (a ValueError)."""
    parts = path.strip("/").split("/")
    rest = parts[2:] if parts[0] == "api" else parts[3:] if parts[0] == "apis" else []
    return rest == ["namespaces"]


def _padded(priorities: tuple[float, ...], payloads: list[Any]) -> tuple[float, ...]:
    """KMock's ordering of reactions: priorities padded with zeroes to the longest one."""
    width = max(len(payload.priorities) for payload in payloads)
    return priorities + (0,) * (width - len(priorities))


def _header(request: kmock.Request, name: str) -> str:
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def _truthy(value: str | None) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (the Python client sends "True")."""
    return (value or "").lower() in ("1", "t", "true")


def _wants_table(request: kmock.Request) -> bool:
    return "as=Table" in _header(request, "Accept")


def _body(request: kmock.Request) -> Any:
    """The request body as JSON or YAML (apply patches are YAML); KMock parses JSON only."""
    if request.data is not None:
        return request.data
    if not request.body:
        return None
    try:
        return yaml.safe_load(request.body)
    except yaml.YAMLError as exc:
        raise _api_error(400, "BadRequest", f"the body of the request cannot be decoded: {exc}") from None


def _crd_status(crd: Mapping[str, Any]) -> dict[str, Any]:
    spec, since = crd.get("spec") or {}, crd["metadata"].get("creationTimestamp")
    return {
        "acceptedNames": spec.get("names") or {},
        "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found",
             "lastTransitionTime": since},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": since},
        ],
    }


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in ("metadata", "status", "apiVersion", "kind")}


def _with_own_metadata(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` with its top level and metadata copied, the only parts a write changes: the rest is
    stored as sent (a request's own body) or shared with the old version (stored versions are never
    changed in place)."""
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _api_error(400, "BadRequest", "the metadata of the object must be an object")
    return {**obj, "metadata": dict(meta)}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null deletes, anything else replaces. A new object:
    `target` is not changed; parts of it and of `patch` (a request's own body) are shared."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge patch for the lists that kubectl apply and the clients touch.

    Lists in `_MERGE_KEYS` merge item by item on their key (`$patch: delete` removes an item),
    `ports` merge on containerPort or port, `finalizers` merge as a set; other lists are replaced.
    The directives `$patch: replace|delete`, `$retainKeys` and `$deleteFromPrimitiveList/…` are
    honoured; `$setElementOrder/…` is ignored (order is not checked).
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [item for item in result.get(field) or [] if item not in value]
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = _strategic_merge_patch(result.get(key), value)
        elif isinstance(value, list):
            result[key] = _strategic_merge_list(key, result.get(key) or [], value)
        else:
            result[key] = value
    if "$retainKeys" in patch:
        result = {k: v for k, v in result.items() if k in patch["$retainKeys"]}
    return result


def _strategic_merge_list(field: str, target: list[Any], patch: list[Any]) -> list[Any]:
    items = [item for item in patch + target if isinstance(item, dict)]
    merge_key = _MERGE_KEYS.get(field)
    if field == "ports":
        merge_key = "containerPort" if any("containerPort" in item for item in items) else "port"
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [item for item in patch if not (isinstance(item, dict) and "$patch" in item)]
    if merge_key is None:
        if field in _SET_LISTS:
            return list(target) + [item for item in patch if item not in target]
        return copy.deepcopy(patch)
    result = list(target)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            result.append(copy.deepcopy(item))
            continue
        index = next((i for i, old in enumerate(result) if isinstance(old, dict) and old.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_strategic_merge_patch({}, item))
        else:
            result[index] = _strategic_merge_patch(result[index], item)
    return result


def _prune(obj: Any, schema: Mapping[str, Any], path: str, unknown: list[str], *, root: bool = False,
           stored: Mapping[int, Any] | None = None) -> Any:
    """Structural pruning: fields the schema does not declare are dropped (and listed in `unknown`).
    `stored`: top-level parts (by id) of the stored version, pruned already: kept as they are."""
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return obj
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        result = {}
        for key, value in obj.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                result[key] = value  # ObjectMeta is the API server's own business
                continue
            if stored and stored.get(id(value)) is value:
                result[key] = value  # unchanged by this write (a status patch leaves the spec)
                continue
            sub = props.get(key) if props else extra if isinstance(extra, dict) else None
            if sub is None and not (extra is True):
                unknown.append(f"{path}{key}")
                continue
            result[key] = _prune(value, sub or {}, f"{path}{key}.", unknown)
        return result
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [_prune(item, schema["items"], path, unknown) for item in obj]
    return obj


def _to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 structural schema → draft-4 JSON Schema (`nullable`, int-or-string made explicit)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _to_jsonschema(value)
        elif key != "nullable" and not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_label_selector(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """`a=b,c!=d,e in (f,g),h notin (i),j,!k` → [(key, op, values)] with op in =, !=, in, notin, exists, !exists."""
    result: list[tuple[str, str, tuple[str, ...]]] = []
    for part in _split_selector(text):
        if " notin " in part or " in " in part:
            key, op, values = part.partition(" notin ") if " notin " in part else part.partition(" in ")
            result.append((key.strip(), op.strip(), tuple(v.strip() for v in values.strip().strip("()").split(","))))
        elif "!=" in part:
            key, _, value = part.partition("!=")
            result.append((key.strip(), "!=", (value.strip(),)))
        elif "=" in part:
            key, _, value = part.replace("==", "=").partition("=")
            result.append((key.strip(), "=", (value.strip(),)))
        elif part.startswith("!"):
            result.append((part[1:].strip(), "!exists", ()))
        else:
            result.append((part, "exists", ()))
    return result


def match_labels(selector: list[tuple[str, str, tuple[str, ...]]], obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in selector:
        present, value = key in labels, labels.get(key)
        if op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = not present or value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = not present or value not in values
        else:
            ok = present == (op == "exists")
        if not ok:
            return False
    return True


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    result = []
    for part in _split_selector(text):
        op = "!=" if "!=" in part else "="
        key, _, value = part.replace("==", "=").partition(op)
        result.append((key.strip(), op, value.strip()))
    return result


def match_fields(selector: list[tuple[str, str, str]], obj: Mapping[str, Any]) -> bool:
    for path, op, value in selector:
        actual = _jsonpath(obj, "." + path)
        actual = "" if actual is None else str(actual).lower() if isinstance(actual, bool) else str(actual)
        if (actual == value) != (op == "="):
            return False
    return True


def _jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath that printer columns use: .a.b, .a[0], .a[-1:]."""
    for part in path.strip().lstrip(".").split("."):
        name, _, index = part.partition("[")
        if name:
            obj = obj.get(name) if isinstance(obj, dict) else None
        if index and isinstance(obj, list):
            index = index.rstrip("]")
            if index.endswith(":"):
                obj = obj[int(index[:-1]):][:1] or [None]
                obj = obj[0]
            else:
                obj = obj[int(index)] if -len(obj) <= int(index) < len(obj) else None
        elif index:
            obj = None
        if obj is None:
            return None
    return obj


def _cell(obj: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
    value = _jsonpath(obj, column["jsonPath"])
    if column.get("type") == "date" and isinstance(value, str):
        try:
            then = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        except ValueError:
            return value
        seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
        return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"
    return value


# --- running it ----------------------------------------------------------------------------------


def load_crds(path: Path) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions in a YAML file (several documents allowed)."""
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc and doc.get("kind") == "CustomResourceDefinition"]


class Emulator:
    """A `KubeEmulator` on 127.0.0.1 (a free port), served from its own thread and event loop.

    The thread makes it usable from sync tests, from the `kubernetes` client and from
    subprocesses (kopf, kubectl) alike. `stop()` ends the watch streams and joins the thread.
    """

    def __init__(self, crds: Iterable[Mapping[str, Any] | Path] = (),
                 namespaces: Iterable[str] = ("default", "kube-system")) -> None:
        self._crds = [crd for item in crds for crd in (load_crds(item) if isinstance(item, Path) else [dict(item)])]
        self._namespaces = list(namespaces)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.handler: KubeEmulator | None = None
        self.url = ""

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Emulator:
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.url:
            self.stop()
            raise RuntimeError(f"The Kubernetes emulator did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 -- reported by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handler = KubeEmulator()
        async with handler:
            for name in self._namespaces:
                handler._create(Route(handler._types[("", "v1", "namespaces")], None, None, None),
                                {"metadata": {"name": name}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
            for crd in self._crds:
                handler._create(Route(handler._types[("apiextensions.k8s.io", "v1", "customresourcedefinitions")], None, None, None), crd)
            # KMock's Server also patches aiohttp's resolver globally; aiohttp's own server is enough here.
            runner = aiohttp.web.ServerRunner(aiohttp.web.Server(handler), shutdown_timeout=1.0)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.handler, self.url = handler, f"http://{host}:{port}"
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                handler.close_watches()
                await asyncio.sleep(0.05)  # let the streams finish their last writes
                await runner.cleanup()

    # --- sync access for tests --------------------------------------------------------------------

    def call(self, fn: Callable[[KubeEmulator], Any]) -> Any:
        """Run `fn(handler)` in the emulator's loop (the only thread that touches its state)."""
        assert self._loop is not None and self.handler is not None

        async def run() -> Any:
            return fn(self.handler)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def get(self, resource: str, name: str, namespace: str | None = "default") -> dict[str, Any] | None:
        """The stored object (a copy), or None: resource like "batch/v1/jobs" or "v1/configmaps"."""
        def read(handler: KubeEmulator) -> dict[str, Any] | None:
            ref = kmock.resource(resource)
            rtype = handler._types.get((ref.group or "", ref.version or "", ref.plural or ""))
            if rtype is None:
                raise KeyError(f"unknown resource {resource!r}")
            obj = handler._current(Route(rtype, namespace if rtype.namespaced else None, name, None))
            return copy.deepcopy(obj)
        return self.call(read)

    def list(self, resource: str, namespace: str | None = None, label_selector: str = "") -> list[dict[str, Any]]:
        def read(handler: KubeEmulator) -> list[dict[str, Any]]:
            ref = kmock.resource(resource)
            rtype = handler._types[(ref.group or "", ref.version or "", ref.plural or "")]
            route = Route(rtype, namespace, None, None)
            return copy.deepcopy(handler._select(route, {"labelSelector": label_selector}))
        return self.call(read)

    @property
    def resource_version(self) -> int:
        return self.call(lambda handler: handler._rv)

    # --- request counting (KMock records every request it serves) ---------------------------------

    def request_count(self) -> int:
        """How many requests were served so far; use it as a mark for `requests_since`."""
        return self.call(lambda handler: sum(1 for _ in handler))  # KMock's root view iterates its requests

    def requests_since(self, mark: int = 0) -> list[RequestRecord]:
        def read(handler: KubeEmulator) -> list[RequestRecord]:
            return [_record(handler, request) for request in list(handler)[mark:]]
        return self.call(read)

    def request_counts(self, since: int = 0, *, user_agent: str | None = None,
                       exclude_user_agent: str | None = None) -> collections.Counter[str]:
        """Requests by "VERB resource[/subresource]" (e.g. "PATCH widgets/status"), optionally only
        those whose User-Agent contains `user_agent` (kopf's is "kopf/…"), and without those whose
        User-Agent contains `exclude_user_agent` (e.g. the stand-in controllers' polling)."""
        return collections.Counter(
            record.key for record in self.requests_since(since)
            if (user_agent is None or user_agent in record.user_agent)
            and (exclude_user_agent is None or exclude_user_agent not in record.user_agent))


def _record(handler: KubeEmulator, request: kmock.Request) -> RequestRecord:
    route = handler._route(request)
    method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
    if route is None:
        verb, resource = method.lower(), ""
    else:
        resource = route.rtype.plural + (f"/{route.subresource}" if route.subresource else "")
        watch = _truthy(request.params.get("watch"))
        verb = ("watch" if watch else "get" if route.name else "list") if method == "GET" else {
            "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if route.name else "deletecollection"}.get(method, method.lower())
    return RequestRecord(verb, method, request.url.path, resource, route.namespace if route else None,
                         route.name if route else None, _header(request, "User-Agent"), dict(request.params))


def write_kubeconfig(path: Path | str, url: str, namespace: str = "default") -> Path:
    """A kubeconfig for the emulator: plain http, no credentials (the emulator checks none)."""
    path = Path(path)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}],
        "current-context": "emulator",
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def kube_env(kubeconfig: Path | str, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for subprocesses (kopf, kubectl) that talk to the emulator and nothing else."""
    env = dict(os.environ if base is None else base)
    env["KUBECONFIG"] = str(kubeconfig)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


__all__ = [
    "BUILTIN_RESOURCES",
    "Emulator",
    "KubeEmulator",
    "RequestRecord",
    "ResourceType",
    "kube_env",
    "load_crds",
    "match_labels",
    "parse_label_selector",
    "write_kubeconfig",
]
