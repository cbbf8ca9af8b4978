"""Kopf indexes of every run's children, and wake-ups for the run daemons.

Each kind of child the operator creates is watched (only objects labelled `humpback.dev/run`) and
kept in an in-memory index keyed by (namespace, run), so a daemon reads its run's children without
an API call. Any change of a child wakes its run's daemon (through the `Operator` object in
Kopf's memo, `backtranslationrun.py`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import kopf

from humpback_operator.diagnosis import FAILED_CREATE_EVENTS
from humpback_operator.names import LABEL_RUN
from humpback_operator.backends import get_backend
from humpback_operator.children import WORKLOAD_KINDS, data_digests
from humpback_operator.config import trainjobs_enabled

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


def _index(body: Mapping[str, Any], namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo) -> dict:
    run = labels[LABEL_RUN]
    if not _echo_of_own_create(memo.operator, namespace or "", run, body):
        memo.operator.wakeup(namespace or "", run).set()
    return {(namespace, run): snapshot(body)}


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


_RUN_LABEL = {LABEL_RUN: kopf.PRESENT}

# One index per kind: Kopf passes each to handlers as a keyword argument of the same name.


@kopf.index("batch", "v1", "jobs", labels=_RUN_LABEL)
async def humpback_jobs(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


@kopf.index("apps", "v1", "deployments", labels=_RUN_LABEL)
async def humpback_deployments(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


@kopf.index("", "v1", "services", labels=_RUN_LABEL)
async def humpback_services(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


@kopf.index("", "v1", "configmaps", labels=_RUN_LABEL)
async def humpback_configmaps(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


# The training kinds: PyTorchJobs always; TrainJobs only where Kubeflow Trainer v2 is enabled
# (config.trainjobs_enabled: HUMPBACK_TRAINJOBS or HUMPBACK_TRAINING_BACKEND=trainjob), so that
# an operator without RBAC for them never watches them.
_pytorchjob = get_backend("pytorchjob")


@kopf.index(_pytorchjob.group, _pytorchjob.version, _pytorchjob.plural, labels=_RUN_LABEL)
async def humpback_pytorchjobs(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


async def humpback_trainjobs(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


if trainjobs_enabled():
    _trainjob = get_backend("trainjob")
    kopf.index(_trainjob.group, _trainjob.version, _trainjob.plural, labels=_RUN_LABEL)(humpback_trainjobs)
# The pods of the children (their templates carry the run label): why a stage is not moving.
@kopf.index("", "v1", "pods", labels=_RUN_LABEL)
async def humpback_pods(body, namespace, labels, memo, **_):
    return _index(body, namespace, labels, memo)


def _refused_create(body: Mapping[str, Any], **_: Any) -> bool:
    return body.get("type") == "Warning" and body.get("reason") in FAILED_CREATE_EVENTS


# Warning Events of refused pod creates (quota, PodSecurity) on a Job or PyTorchJob, which no pod
# shows: keyed by (namespace, name of the object they are about). Events carry no labels of ours,
# so the run whose child it is is found by name (child names start with the run's name).
@kopf.index("", "v1", "events", when=_refused_create)
async def humpback_child_events(body, namespace, memo, **_):
    involved = body.get("involvedObject") or {}
    name = involved.get("name", "")
    for (ns, run), wake in list(memo.operator.wakeups.items()):
        if ns == namespace and name.startswith(run + "-"):
            wake.set()
    return {(namespace, name): {"involvedObject": {"kind": involved.get("kind"), "name": name},
                                "type": body.get("type"), "reason": body.get("reason"), "message": body.get("message"),
                                "lastTimestamp": body.get("lastTimestamp") or body.get("eventTime")}}


def filter_on_the_server(settings: kopf.OperatorSettings) -> None:
    """The API server sends only what the indexes keep: children (labelled with their run) and
    Warning Events. Kopf filters `labels=` and `when=` itself, after it has received, parsed and
    remembered each object; on a shared cluster that is every Pod and Event of every namespace
    watched (and an operator's own Normal Events, most Events under load, came back to it)."""
    kinds = [("batch", "v1", "jobs"), ("apps", "v1", "deployments"), ("v1", "services"), ("v1", "configmaps"),
             ("v1", "pods"), (_pytorchjob.group, _pytorchjob.version, _pytorchjob.plural)]
    if trainjobs_enabled():
        kinds.append((_trainjob.group, _trainjob.version, _trainjob.plural))
    for kind in kinds:
        settings.watching.label_selectors[kind] = LABEL_RUN
    settings.watching.field_selectors["v1", "events"] = "type=Warning"


# A deleted child leaves its index without a call to the index function, so without a wake-up:
# the reconciler looks again within seconds whenever it waits for a deletion (reconcile.py).


INDEX_NAMES = ("humpback_jobs", "humpback_deployments", "humpback_services", "humpback_configmaps",
               "humpback_pytorchjobs", "humpback_trainjobs")


def children_of(indexes: Mapping[str, Any], namespace: str, run: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for index_name in INDEX_NAMES:
        index = indexes.get(index_name)
        if index is not None and (namespace, run) in index:
            out.extend(index[(namespace, run)])
    return out


def pods_of(indexes: Mapping[str, Any], namespace: str, run: str) -> list[dict[str, Any]]:
    index = indexes.get("humpback_pods")
    return list(index[(namespace, run)]) if index is not None and (namespace, run) in index else []


def events_of(indexes: Mapping[str, Any], namespace: str, names: list[str]) -> list[dict[str, Any]]:
    """The indexed Warning Events about the objects `names` of `namespace`."""
    index = indexes.get("humpback_child_events")
    if index is None:
        return []
    return [event for name in names if (namespace, name) in index for event in index[(namespace, name)]]
