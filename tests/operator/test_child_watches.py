"""The operator's own watches of the children (`child_events.ChildWatches`) against the emulated API:
list, then watch; a gap in the watch heals by listing again; a kind the cluster does not serve
does not hold up the runs."""

from __future__ import annotations

import asyncio
import time

import kubernetes

from humpback_operator import child_events
from humpback_operator.backtranslationrun import Operator
from humpback_operator.config import OperatorConfig
from humpback_operator.kube import Kube
from humpback_operator.names import LABEL_RUN

NAMESPACE = "default"


def configmap(name: str, run: str | None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "data": {},
            "metadata": {"name": name, "labels": {LABEL_RUN: run} if run else {}}}


def indexed(op: Operator, run: str) -> set[str]:
    return set(op.watches.indexes["humpback_configmaps"].get((NAMESPACE, run), {}))


async def until(what, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.02)


def test_children_are_listed_then_watched_and_a_watch_gap_heals_by_listing_again(kube_emulator, kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_config_map(NAMESPACE, configmap("r-a", "r"))
    core.create_namespaced_config_map(NAMESPACE, configmap("not-ours", None))

    async def scenario() -> None:
        op = Operator(kube=Kube(kube_api), config=OperatorConfig())
        wake = op.wakeup(NAMESPACE, "r")
        try:
            await asyncio.wait_for(op.watches.ready(NAMESPACE), 10)
            assert indexed(op, "r") == {"r-a"}  # listed before anyone reads the index; the unlabelled one never
            wake.clear()
            await asyncio.to_thread(core.create_namespaced_config_map, NAMESPACE, configmap("r-b", "r"))
            await until(lambda: indexed(op, "r") == {"r-a", "r-b"})
            assert wake.is_set()

            # A gap: the watch sends nothing while r-a goes and r-c comes, then ends with 410 Gone.
            kube_emulator.call(lambda handler: handler.hold_watches())
            await asyncio.to_thread(core.delete_namespaced_config_map, "r-a", NAMESPACE)
            await asyncio.to_thread(core.create_namespaced_config_map, NAMESPACE, configmap("r-c", "r"))
            await asyncio.sleep(0.3)
            assert indexed(op, "r") == {"r-a", "r-b"}
            wake.clear()
            kube_emulator.call(lambda handler: handler.expire_watches())
            await until(lambda: indexed(op, "r") == {"r-b", "r-c"})  # listed again: no DELETED event needed
            assert wake.is_set()
            # And watched again from there.
            await asyncio.to_thread(core.delete_namespaced_config_map, "r-b", NAMESPACE)
            await until(lambda: indexed(op, "r") == {"r-c"})
        finally:
            await op.watches.stop()
            await op.kube.close()

    asyncio.run(scenario())


def test_a_list_comes_a_page_at_a_time(kube_emulator, kube_api, monkeypatch):
    monkeypatch.setattr(child_events, "LIST_PAGE", 2)
    core = kubernetes.client.CoreV1Api(kube_api)
    for name in ("r-a", "r-b", "r-c", "r-d", "r-e"):
        core.create_namespaced_config_map(NAMESPACE, configmap(name, "r"))
    mark = kube_emulator.request_count()

    async def scenario() -> None:
        op = Operator(kube=Kube(kube_api), config=OperatorConfig())
        try:
            await asyncio.wait_for(op.watches.ready(NAMESPACE), 10)
            assert indexed(op, "r") == {"r-a", "r-b", "r-c", "r-d", "r-e"}
        finally:
            await op.watches.stop()
            await op.kube.close()

    asyncio.run(scenario())
    lists = [r.params for r in kube_emulator.requests_since(mark) if r.verb == "list" and r.resource == "configmaps"]
    assert [p.get("limit") for p in lists] == ["2"] * 3 and [bool(p.get("continue")) for p in lists] == [False, True, True]


def test_a_kind_the_cluster_does_not_serve_does_not_hold_up_the_runs(kube_emulator, kube_api, monkeypatch):
    # TrainJobs enabled, but Kubeflow Trainer v2 is not installed here: 404 for their list.
    monkeypatch.setenv("HUMPBACK_TRAINJOBS", "true")

    async def scenario() -> None:
        op = Operator(kube=Kube(kube_api), config=OperatorConfig())
        assert "humpback_trainjobs" in op.watches.indexes
        try:
            await asyncio.wait_for(op.watches.ready(NAMESPACE), 10)
        finally:
            await op.watches.stop()
            await op.kube.close()

    asyncio.run(scenario())


def test_an_operator_of_all_namespaces_watches_each_kind_once_across_the_cluster(kube_emulator, kube_api):
    # As Kopf's watches did: one stream per kind, not one per namespace with runs.
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_config_map("kube-system", configmap("r-a", "r"))
    mark = kube_emulator.request_count()

    async def scenario() -> None:
        op = Operator(kube=Kube(kube_api), config=OperatorConfig())
        op.watches.clusterwide = True
        try:
            await asyncio.wait_for(op.watches.ready(NAMESPACE), 10)
            await asyncio.wait_for(op.watches.ready("kube-system"), 1)  # the same watches: ready already
            assert set(op.watches.indexes["humpback_configmaps"]) == {("kube-system", "r")}
            await asyncio.to_thread(core.create_namespaced_config_map, NAMESPACE, configmap("r-b", "r"))
            await until(lambda: indexed(op, "r") == {"r-b"})
            assert op.wakeup(NAMESPACE, "r").is_set() and not op.wakeup("kube-system", "other").is_set()
            # A 410 Gone lists again across the cluster: the entries of every namespace are what it says.
            kube_emulator.call(lambda handler: handler.hold_watches())
            await asyncio.to_thread(core.delete_namespaced_config_map, "r-a", "kube-system")
            kube_emulator.call(lambda handler: handler.expire_watches())
            await until(lambda: set(op.watches.indexes["humpback_configmaps"]) == {(NAMESPACE, "r")})
        finally:
            await op.watches.stop()
            await op.kube.close()

    asyncio.run(scenario())
    reads = [r for r in kube_emulator.requests_since(mark) if r.verb in ("list", "watch") and r.resource == "configmaps"]
    assert reads and all(r.namespace is None for r in reads)
