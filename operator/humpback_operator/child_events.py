"""Watches of every run's children, kept in memory, and wake-ups for the run daemons.

The children the reconciler reads are watched (Jobs, PyTorchJobs, TrainJobs where enabled,
Deployments, Services, ConfigMaps: only objects labelled `humpback.dev/run`, the API server
filters), as are the children's Pods and the Warning Events of refused pod creates; what
the reconciler reads of each is kept in an index keyed by (namespace, run), so a daemon reads its
run's children without an API call. A change of a child wakes its run's daemon (through the
`Operator` object, `backtranslationrun.py`), except the watch's echo of the operator's own create.

These are the operator's own watches, not Kopf's (Kopf watches the runs): Kopf's machinery per
event (a worker per object, its batch window, the handler invocation) was about a quarter of the
operator's CPU under load, and it added 0.1 s to every reaction (bench/operator_scale.py). A
namespace's children are watched from the moment its first run is reconciled (`ChildWatches.ready`):
an operator of all namespaces (`kopf run --all-namespaces`) watches each kind across the cluster,
as Kopf did, one of some namespaces watches it in each of them. One list and watch per kind and
scope (lists paged, `LIST_PAGE`), resumed from the last resourceVersion and listed anew after a
410 Gone or a broken stream: a child deleted meanwhile leaves the index then.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from humpback_operator.diagnosis import FAILED_CREATE_EVENTS
from humpback_operator.names import LABEL_RUN
from humpback_operator.backends import get_backend
from humpback_operator.children import WORKLOAD_KINDS, data_digests
from humpback_operator.config import trainjobs_enabled
from humpback_operator.kube import ApiError, Kube, collection_path

log = logging.getLogger(__name__)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the reconciler reads of a child (not the whole object: less memory per child), its
    strings shared (`_compact`)."""
    meta = body.get("metadata", {})
    out = {
        "apiVersion": _compact(body.get("apiVersion")),
        "kind": _compact(body.get("kind")),
        "metadata": {
            "name": meta.get("name"),
            "namespace": _compact(meta.get("namespace")),
            "uid": meta.get("uid"),
            "labels": _compact(meta.get("labels") or {}),
            "annotations": _compact({k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("humpback.dev/")}),
            "deletionTimestamp": meta.get("deletionTimestamp"),
        },
        "status": _compact(body.get("status") or {}),
    }
    spec = body.get("spec") or {}
    if "suspend" in spec or "suspend" in (spec.get("runPolicy") or {}):  # Kueue holds it (diagnosis.is_queued)
        out["spec"] = {"suspend": spec.get("suspend"), "runPolicy": {"suspend": (spec.get("runPolicy") or {}).get("suspend")}}
    if body.get("kind") == "ConfigMap":
        out["dataDigests"] = data_digests(body)
    return out


def _compact(value: Any) -> Any:
    """A copy of `value` whose keys and short strings are interned: the thousands of children an
    operator indexes repeat the same keys, labels, reasons and conditions (each parsed from JSON
    as a string of its own), which were more than half of an index entry's memory."""
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= 64:
        return sys.intern(value)
    return value


def _echo_of_own_create(op: Any, namespace: str, run: str, body: Mapping[str, Any]) -> bool:
    """The watch showing a child the operator has just created, as it created it: the decision
    that created it knew all of that, so it wakes nobody (under load, a reconcile per create that
    changed nothing). A workload's status is news (its controller writes it); a Service's or a
    ConfigMap's is not (the API server's defaults, the load balancer's address)."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp") or (body.get("kind") in WORKLOAD_KINDS and body.get("status")):
        return False
    ours = op.recent.get((namespace, run), {}).get((body.get("kind"), meta.get("name")))
    return ours is not None and ours[1] is not None


# After a watch fails (the API unreachable, the kind not served, no RBAC for it): wait this long,
# doubled each time up to the cap, then list again.
RETRY_SECONDS = (1.0, 60.0)

# Objects per page of a list (client-go's informers ask for 500): a re-list of thousands of children
# is parsed and reduced to index entries a page at a time, never all at once.
LIST_PAGE = 500


@dataclass(frozen=True)
class Watched:
    """One kind the operator watches (in one namespace, or in all: None), and the index it fills."""
    index: str
    api_version: str
    kind: str
    plural: str
    label_selector: str | None = LABEL_RUN
    field_selector: str | None = None

    def path(self, namespace: str | None) -> str:
        return collection_path(self.api_version, self.plural, namespace)

    def query(self) -> list[tuple[str, str]]:
        return [(key, value) for key, value in (("labelSelector", self.label_selector),
                                                 ("fieldSelector", self.field_selector)) if value]

    def key(self, body: Mapping[str, Any]) -> str | None:
        """Which run's entry this object is in (None: kept nowhere)."""
        return ((body.get("metadata") or {}).get("labels") or {}).get(LABEL_RUN)

    def entry(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return snapshot(body)


class WatchedEvents(Watched):
    """Warning Events of refused pod creates (quota, PodSecurity) on a Job or PyTorchJob, which no
    pod shows. Events carry no labels of ours: they are kept by the name of the object they are
    about, and a run's are found by its children's names (`events_of`)."""

    def key(self, body: Mapping[str, Any]) -> str | None:
        if body.get("type") != "Warning" or body.get("reason") not in FAILED_CREATE_EVENTS:
            return None
        return (body.get("involvedObject") or {}).get("name") or None

    def entry(self, body: Mapping[str, Any]) -> dict[str, Any]:
        involved = body.get("involvedObject") or {}
        return {"involvedObject": {"kind": involved.get("kind"), "name": involved.get("name")},
                "type": body.get("type"), "reason": body.get("reason"), "message": body.get("message"),
                "lastTimestamp": body.get("lastTimestamp") or body.get("eventTime")}


def _watched() -> tuple[Watched, ...]:
    """What is watched: the kinds of children (TrainJobs only where Kubeflow Trainer v2 is enabled,
    `config.trainjobs_enabled`, so that an operator without RBAC for them never watches them), the
    children's Pods (their templates carry the run label: why a stage is not moving), and Warning
    Events (`fieldSelector=type=Warning`: the operator never receives its own Normal Events)."""
    training = [get_backend("pytorchjob")] + ([get_backend("trainjob")] if trainjobs_enabled() else [])
    return (
        Watched("humpback_jobs", "batch/v1", "Job", "jobs"),
        Watched("humpback_deployments", "apps/v1", "Deployment", "deployments"),
        Watched("humpback_services", "v1", "Service", "services"),
        Watched("humpback_configmaps", "v1", "ConfigMap", "configmaps"),
        *(Watched(f"humpback_{b.plural}", b.api_version, b.kind, b.plural) for b in training),
        Watched("humpback_pods", "v1", "Pod", "pods"),
        WatchedEvents("humpback_child_events", "v1", "Event", "events", label_selector=None,
                      field_selector="type=Warning"),
    )


class ChildWatches:
    """The indexes, `{index: {(namespace, key): {object name: entry}}}`, and the watches that fill
    them: across the cluster (`clusterwide`), else per namespace. `op` is the `Operator`: its notes
    of recent creates and its wake-ups."""

    def __init__(self, op: Any, kube: Kube):
        self.op = op
        self.kube = kube
        self.watched = _watched()
        self.clusterwide = False  # set at startup: `kopf run --all-namespaces`
        self.indexes: dict[str, dict[tuple[str, str], dict[str, dict]]] = {w.index: {} for w in self.watched}
        self.tasks: dict[str | None, list[asyncio.Task]] = {}  # per scope: a namespace, or None (all)
        self.listed: dict[str | None, list[asyncio.Event]] = {}  # per scope and kind: set once listed

    async def ready(self, namespace: str) -> None:
        """Watch `namespace` (from now on), and wait until every kind in it has been listed: a
        reconcile must never take a child not seen yet for a child not made yet."""
        scope = None if self.clusterwide else namespace
        if scope not in self.tasks:
            self.listed[scope] = [asyncio.Event() for _ in self.watched]
            self.tasks[scope] = [
                asyncio.create_task(self._watch(w, scope, listed), name=f"watch {w.plural} in {scope or 'all namespaces'}")
                for w, listed in zip(self.watched, self.listed[scope], strict=True)]
        for listed in self.listed[scope]:
            await listed.wait()

    def child_kinds(self) -> list[tuple[str, str]]:
        """(apiVersion, kind) of the children in the indexes (not their Pods and Events)."""
        return [(w.api_version, w.kind) for w in self.watched if w.index in INDEX_NAMES]

    async def stop(self) -> None:
        tasks = [task for per_namespace in self.tasks.values() for task in per_namespace]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    async def _watch(self, watched: Watched, scope: str | None, listed: asyncio.Event) -> None:
        """List, then watch from the list's resourceVersion for as long as the server keeps the
        stream, then again from the last one; list anew after a 410 Gone or a failure."""
        retry = RETRY_SECONDS[0]
        while True:
            try:
                version = await self._list(watched, scope)
                listed.set()
                retry = RETRY_SECONDS[0]
                while version is not None:
                    version = await self._follow(watched, scope, version)
            except Exception as e:  # noqa: BLE001 (a watch that ended would leave its index frozen)
                # Not served (no such CRD) or not allowed: nothing of that kind can be ours, so the
                # namespace is ready without it. Anything else (unreachable): the runs wait.
                if isinstance(e, ApiError) and e.status in (403, 404):
                    listed.set()
                # Said once per streak of failures (a kind never served would say it every minute).
                (log.warning if retry == RETRY_SECONDS[0] else log.debug)(
                    "Watching %s in %s failed: %s; listing again in %.0fs", watched.plural, scope or "all namespaces",
                    e if isinstance(e, ApiError) else repr(e), retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_SECONDS[1])

    async def _list(self, watched: Watched, scope: str | None) -> str:
        """List the kind, LIST_PAGE objects at a time; the scope's entries become what the list says.
        Returns its resourceVersion."""
        now: dict[tuple[str, str], dict[str, dict]] = {}
        more = None
        while True:
            query = [*watched.query(), ("limit", str(LIST_PAGE)), *([("continue", more)] if more else [])]
            page = await self.kube.call("GET", watched.path(scope), query=query) or {}
            for item in page.get("items") or []:
                item.update(apiVersion=watched.api_version, kind=watched.kind)  # a list's items come without them
                key = watched.key(item)
                if key is not None:
                    now.setdefault((item["metadata"]["namespace"], key), {})[item["metadata"]["name"]] = watched.entry(item)
            more = (page.get("metadata") or {}).get("continue")
            if not more:
                break
        index = self.indexes[watched.index]
        for where in [where for where in index if scope in (None, where[0]) and where not in now]:
            del index[where]  # deleted while no watch was open (no DELETED event came)
            self._changed(watched, where, None)
        for where, entries in now.items():
            if index.get(where) != entries:
                index[where] = entries
                self._changed(watched, where, None)
        return (page.get("metadata") or {}).get("resourceVersion") or ""

    async def _follow(self, watched: Watched, scope: str | None, version: str) -> str | None:
        """One watch request from `version`: the resourceVersion to go on from when the server ended
        it, None when it must be listed again (410 Gone)."""
        async for event in self.kube.watch(watched.path(scope), [*watched.query(), ("resourceVersion", version)]):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise ApiError(obj.get("code") or 0, obj.get("reason") or "", obj.get("message") or "")
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.apply(watched, kind, obj)
        return version

    def apply(self, watched: Watched, kind: str, body: Mapping[str, Any]) -> None:
        """One watch event: the index takes it, and the run it is about wakes up unless it is the
        echo of the operator's own create."""
        key = watched.key(body)
        if key is None:
            return
        where, name = (body["metadata"]["namespace"], key), body["metadata"]["name"]
        index = self.indexes[watched.index]
        if kind == "DELETED":
            entries = index.get(where) or {}
            if entries.pop(name, None) is None:
                return
            if not entries:
                del index[where]
        else:
            index.setdefault(where, {})[name] = watched.entry(body)
        self._changed(watched, where, None if kind == "DELETED" else body)

    def _changed(self, watched: Watched, where: tuple[str, str], body: Mapping[str, Any] | None) -> None:
        namespace, key = where
        if isinstance(watched, WatchedEvents):
            for (ns, run), wake in list(self.op.wakeups.items()):
                if ns == namespace and key.startswith(run + "-"):
                    wake.set()
        elif body is None or not _echo_of_own_create(self.op, namespace, key, body):
            self.op.wakeup(namespace, key).set()


# The indexes of children (not of their Pods and Events).
INDEX_NAMES = ("humpback_jobs", "humpback_deployments", "humpback_services", "humpback_configmaps",
               "humpback_pytorchjobs", "humpback_trainjobs")


def children_of(indexes: Mapping[str, Any], namespace: str, run: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for index_name in INDEX_NAMES:
        index = indexes.get(index_name)
        if index is not None and (namespace, run) in index:
            out.extend(index[(namespace, run)].values())
    return out


def pods_of(indexes: Mapping[str, Any], namespace: str, run: str) -> list[dict[str, Any]]:
    index = indexes.get("humpback_pods")
    return list(index[(namespace, run)].values()) if index is not None and (namespace, run) in index else []


def events_of(indexes: Mapping[str, Any], namespace: str, names: list[str]) -> list[dict[str, Any]]:
    """The indexed Warning Events about the objects `names` of `namespace`."""
    index = indexes.get("humpback_child_events")
    if index is None:
        return []
    return [event for name in names if (namespace, name) in index for event in index[(namespace, name)].values()]
