"""The operator's modules (`backtranslationrun`, `child_events`) without a cluster: what they
remember lives on the `Operator` object, never at module level; a child's watch event wakes its
run. `tests/operator/` runs them under `kopf run` against an emulated API."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

import kopf
import pytest

from humpback_operator import child_events
from humpback_operator.backtranslationrun import Operator
from humpback_operator.config import OperatorConfig
from humpback_operator.names import LABEL_RUN

PACKAGE = Path(__file__).resolve().parents[3] / "operator" / "humpback_operator"
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque"}


def make_operator() -> Operator:
    return Operator(kube=object(), config=OperatorConfig())  # no API calls in these tests


@pytest.mark.parametrize("module", ["backtranslationrun", "child_events"])
def test_the_handler_modules_keep_no_state_at_module_level(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    globals_ = [n.names for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert globals_ == [], f"{module}.py rebinds module globals {globals_}: keep state on the Operator"
    state = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if all(n.isupper() or n.lstrip("_").isupper() for n in names):
            continue  # a constant (e.g. a label selector), not state
        called = getattr(value, "func", None)
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            getattr(called, "id", getattr(called, "attr", None)) in MUTABLE_CALLS)
        singleton = isinstance(node, ast.AnnAssign) and isinstance(value, ast.Constant) and value.value is None
        if mutable or singleton:
            state.extend(names)
    assert state == [], f"{module}.py keeps {state} at module level: keep it on the Operator"


def test_operators_share_nothing_and_forget_all_of_a_deleted_run():
    op, other = make_operator(), make_operator()
    assert op.wakeup("ml", "a") is op.wakeup("ml", "a")
    assert op.wakeup("ml", "a") is not other.wakeup("ml", "a")
    for run in ("a", "b"):
        op.note("ml", run, "Job", f"{run}-job", {"kind": "Job"})
        op.own_versions[("ml", run)] = "7"
        op.phases[("ml", run)] = "Running"
        op.wakeup("ml", run)
    op.forget("ml", "a")
    for per_run in (op.recent, op.own_versions, op.phases, op.wakeups):
        assert ("ml", "a") not in per_run and ("ml", "b") in per_run


def watched(op: Operator, index: str) -> child_events.Watched:
    return next(w for w in op.watches.watched if w.index == index)


def test_a_childs_watch_event_fills_the_index_and_wakes_its_runs_daemon():
    op = make_operator()
    body = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": "r-train-m0-abc123-a1", "namespace": "ml", "labels": {LABEL_RUN: "r"}},
            "status": {"conditions": [{"type": "Running", "status": "True"}]}}
    op.watches.apply(watched(op, "humpback_pytorchjobs"), "MODIFIED", body)
    assert op.wakeup("ml", "r").is_set()
    assert not op.wakeup("ml", "other").is_set()
    assert [c["metadata"]["name"] for c in child_events.children_of(op.watches.indexes, "ml", "r")] == ["r-train-m0-abc123-a1"]
    # Its deletion takes it out and wakes the run too (Kopf's indexes woke nobody for a deletion).
    op.wakeup("ml", "r").clear()
    op.watches.apply(watched(op, "humpback_pytorchjobs"), "DELETED", body)
    assert op.wakeup("ml", "r").is_set() and child_events.children_of(op.watches.indexes, "ml", "r") == []
    # An object without the run label (the server filters; a label taken off) is kept nowhere.
    op.watches.apply(watched(op, "humpback_jobs"), "ADDED", {"metadata": {"name": "x", "namespace": "ml", "labels": {}}})
    assert op.watches.indexes["humpback_jobs"] == {}


def test_a_refused_pod_create_event_is_kept_by_its_objects_name_and_wakes_that_run():
    op = make_operator()
    op.wakeup("ml", "r"), op.wakeup("ml", "other")
    event = {"metadata": {"name": "r-prepare-seed-abc123-a1.17", "namespace": "ml"}, "type": "Warning",
             "reason": "FailedCreate", "message": "exceeded quota",
             "involvedObject": {"kind": "Job", "name": "r-prepare-seed-abc123-a1"}}
    events = watched(op, "humpback_child_events")
    op.watches.apply(events, "ADDED", event)
    assert op.wakeup("ml", "r").is_set() and not op.wakeup("ml", "other").is_set()
    assert [e["message"] for e in child_events.events_of(op.watches.indexes, "ml", ["r-prepare-seed-abc123-a1"])] == ["exceeded quota"]
    op.watches.apply(events, "ADDED", {**event, "metadata": {"name": "n2", "namespace": "ml"}, "reason": "BackOff"})  # not a refused create
    assert len(op.watches.indexes["humpback_child_events"][("ml", "r-prepare-seed-abc123-a1")]) == 1


def test_the_watch_echo_of_our_own_create_wakes_nobody_and_its_status_does():
    # Under load every create came back as a wake-up and a reconcile that changed nothing.
    op = make_operator()
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "r-prepare-seed-abc123-a1", "namespace": "ml", "labels": {LABEL_RUN: "r"}}}
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "r-augment-abc123-myx", "namespace": "ml", "labels": {LABEL_RUN: "r"}}}

    def index(body: dict, index_name: str = "humpback_jobs") -> bool:
        op.wakeup("ml", "r").clear()
        op.watches.apply(watched(op, index_name), "MODIFIED", body)
        return op.wakeup("ml", "r").is_set()

    assert index(job)  # not created by this operator (another replica, before a restart): news
    assert index(service, "humpback_services")
    op.note("ml", "r", "Job", job["metadata"]["name"], job)
    op.note("ml", "r", "Service", service["metadata"]["name"], service)
    assert not index({**job, "metadata": {**job["metadata"], "uid": "u1"}, "status": {}})
    assert index({**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}})
    assert index({**job, "metadata": {**job["metadata"], "deletionTimestamp": "2026-11-29T00:00:00Z"}})
    # A Service's status is the API server's default (no controller reports progress in it): its
    # echo wakes nobody either (six reconciles per run for nothing under load), its deletion does.
    assert not index({**service, "status": {"loadBalancer": {}}}, "humpback_services")
    assert index({**service, "metadata": {**service["metadata"], "deletionTimestamp": "2026-11-29T00:00:00Z"}},
                 "humpback_services")


def test_the_echo_of_a_status_patch_whose_answer_is_on_its_way_wakes_nobody(monkeypatch):
    # Under load the watch showed our own status patch before its answer came back, when the
    # patch's resourceVersion was not known yet: a reconcile for nothing, ~1.5 per run at 100 runs.
    from humpback_operator import backtranslationrun
    from humpback_operator.reconcile import Decision

    monkeypatch.setattr(kopf, "event", lambda body, **kwargs: None)
    op = make_operator()
    status = {"phase": "Running", "stages": [{"name": "prepare-seed", "phase": "Running"}]}
    body = {"metadata": {"name": "r", "namespace": "ml", "resourceVersion": "1", "generation": 3},
            "status": {"phase": "Pending", "observedGeneration": 3}}
    woke: dict[str, bool] = {}

    async def run_event(name: str, event: dict) -> None:
        op.wakeup("ml", "r").clear()
        await backtranslationrun.run_changed(namespace="ml", name="r", body=event, memo=kopf.Memo(operator=op))
        woke[name] = op.wakeup("ml", "r").is_set()

    class Kube:
        async def patch_run_status(self, namespace, name, patch):
            echo = {"metadata": {**body["metadata"], "resourceVersion": "2"}, "status": {**body["status"], **patch}}
            await run_event("echo", echo)  # the watch is faster than the answer
            await run_event("edited", {**echo, "metadata": {**echo["metadata"], "generation": 4}})
            await run_event("other", {**echo, "status": {**echo["status"], "phase": "Failed"}})
            return {"metadata": {"resourceVersion": "2"}, "status": echo["status"]}

    op.kube = Kube()
    asyncio.run(backtranslationrun.apply(op, body, Decision(status=status), logging.getLogger("test")))
    assert woke == {"echo": False, "edited": True, "other": True}
    assert op.patching == {} and op.own_versions[("ml", "r")] == "2"
    asyncio.run(run_event("late echo", {"metadata": {**body["metadata"], "resourceVersion": "2"}, "status": status}))
    assert not woke["late echo"]


def test_a_decisions_creates_go_out_together_what_workloads_refer_to_first(monkeypatch):
    # One after the other, each create waited its turn behind every other run's API calls.
    from humpback_operator.backtranslationrun import apply
    from humpback_operator.kube import ApiError
    from humpback_operator.reconcile import Decision

    calls: list[str] = []
    events: list[dict] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kwargs: events.append(kwargs))

    class Kube:
        def __init__(self) -> None:
            self.in_flight: set[str] = set()
            self.together = asyncio.Event()

        async def create(self, obj):
            kind = obj["kind"]
            calls.append(kind)
            self.in_flight.add(kind)
            if self.in_flight >= {"Secret", "Service", "NetworkPolicy"}:
                self.together.set()
            if kind in ("Secret", "Service", "NetworkPolicy"):
                await self.together.wait()  # returns only once the three are under way
            if kind == "NetworkPolicy":
                raise ApiError(403, "Forbidden", "networkpolicies is forbidden")
            return True

        async def patch_run_status(self, namespace, name, status):
            return {"metadata": {"resourceVersion": "2"}, "status": status}

    def obj(kind: str, name: str) -> dict:
        return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": "ml"}}

    op = Operator(kube=Kube(), config=OperatorConfig())
    body = {"metadata": {"name": "r", "namespace": "ml", "resourceVersion": "1"}, "status": {}}
    decision = Decision(create=[obj("Secret", "s"), obj("NetworkPolicy", "s"), obj("Deployment", "s"), obj("Service", "s")],
                        status={"phase": "Running"})
    asyncio.run(asyncio.wait_for(apply(op, body, decision, logging.getLogger("test")), 5))
    assert sorted(calls[:3]) == ["NetworkPolicy", "Secret", "Service"] and calls[3:] == ["Deployment"]
    remembered = op.recent[("ml", "r")]
    assert set(remembered) == {("Secret", "s"), ("Service", "s"), ("Deployment", "s")}  # not the refused one
    assert op.patched[("ml", "r")][2].startswith('{"phase": "Running", "message": "could not create NetworkPolicy s')
    assert [e["reason"] for e in events] == ["CreateFailed"]


def test_every_index_the_reconciler_reads_is_filled_by_a_watch(monkeypatch):
    monkeypatch.setenv("HUMPBACK_TRAINJOBS", "true")
    filled = {w.index for w in child_events._watched()}
    assert {*child_events.INDEX_NAMES, "humpback_pods", "humpback_child_events"} == filled
    monkeypatch.delenv("HUMPBACK_TRAINJOBS")  # an operator without RBAC for TrainJobs never watches them
    assert "humpback_trainjobs" not in {w.index for w in child_events._watched()}


def test_a_reconcile_reads_kopfs_body_or_its_own_last_patch_or_asks_the_api():
    from humpback_operator.backtranslationrun import _current_body

    op = make_operator()
    live = kopf.Body({"metadata": {"name": "r", "namespace": "ml", "resourceVersion": "5"},
                      "spec": {"a": 1}, "status": {"phase": "Pending"}})
    assert _current_body(op, live, "ml", "r") == dict(live)  # no patch of ours yet: Kopf's body
    # Our patch (decided on version 5) made version 6; Kopf still shows 5: its body, our status.
    op.remember_patch("ml", "r", "5", {"metadata": {"name": "r", "resourceVersion": "6"}, "status": {"phase": "Running"}})
    body = _current_body(op, live, "ml", "r")
    assert body == {"metadata": {"name": "r", "namespace": "ml", "resourceVersion": "6"},
                    "spec": {"a": 1}, "status": {"phase": "Running"}}
    assert live["status"] == {"phase": "Pending"} and live["metadata"]["resourceVersion"] == "5"  # Kopf's is untouched
    # Someone else changed the run meanwhile (version 7, not ours): ask the API.
    assert _current_body(op, kopf.Body({**live, "metadata": {**live["metadata"], "resourceVersion": "7"}}), "ml", "r") is None
    # Kopf caught up with our version: its body, and the kept status is dropped.
    caught_up = kopf.Body({**live, "metadata": {**live["metadata"], "resourceVersion": "6"}, "status": {"phase": "Running"}})
    assert _current_body(op, caught_up, "ml", "r") == dict(caught_up) and ("ml", "r") not in op.patched


def _run_body() -> kopf.Body:
    return kopf.Body({
        "apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "u1", "resourceVersion": "7", "generation": 2,
                     "labels": {"team": "nlp"},
                     "annotations": {"humpback.dev/last-handled-configuration": "{}", "humpback.dev/run_deleted": "{}",
                                     "kubectl.kubernetes.io/last-applied-configuration": "{}", "note": "kept"}},
        "spec": {"baseModel": "org/model", "retries": {"limit": 2}},
        "status": {"phase": "Running", "stages": [{"name": "prepare-seed", "phase": "Running"}]},
    })


def test_a_runs_essence_and_its_clearing_are_kopfs_without_the_copies():
    # The diff base decides whether a spec changed: it must stay exactly Kopf's, only cheaper to build.
    from humpback_operator.backtranslationrun import RunEssenceStorage, RunProgressStorage

    body = _run_body()
    ours = RunProgressStorage(prefix="humpback.dev").clear(essence=RunEssenceStorage(prefix="humpback.dev").build(body=body))
    kopfs = kopf.AnnotationsProgressStorage(prefix="humpback.dev").clear(
        essence=kopf.AnnotationsDiffBaseStorage(prefix="humpback.dev").build(body=body))
    assert ours == kopfs and "status" not in ours and ours["metadata"]["annotations"] == {"note": "kept"}
    # Clearing changes nothing it was given (an essence parsed from the annotation is cleared too).
    given = {"spec": {"a": 1}, "metadata": {"annotations": {"humpback.dev/x": "1", "note": "kept"}}}
    cleared = RunProgressStorage(prefix="humpback.dev").clear(essence=given)
    assert given == {"spec": {"a": 1}, "metadata": {"annotations": {"humpback.dev/x": "1", "note": "kept"}}}
    assert cleared == {"spec": {"a": 1}, "metadata": {"annotations": {"note": "kept"}}}


def test_index_entries_share_their_strings_and_not_the_objects_they_were_made_from():
    import json

    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "r-s-a1", "namespace": "ml", "uid": "u1", "labels": {LABEL_RUN: "r", "other": "x"},
                        "annotations": {"humpback.dev/fingerprint": "f1", "kubectl.kubernetes.io/x": "dropped"}},
           "spec": {"template": {}},
           "status": {"conditions": [{"type": "Complete", "status": "True", "reason": "Done"}], "succeeded": 1}}
    # Two children parsed from JSON, as the watch gives them: equal strings, distinct objects.
    a, b = (child_events.snapshot(json.loads(json.dumps(job))) for _ in range(2))
    assert a == b == {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "r-s-a1", "namespace": "ml", "uid": "u1", "labels": {LABEL_RUN: "r", "other": "x"},
                     "annotations": {"humpback.dev/fingerprint": "f1"}, "deletionTimestamp": None},
        "status": {"conditions": [{"type": "Complete", "status": "True", "reason": "Done"}], "succeeded": 1}}
    assert a["status"]["conditions"][0]["reason"] is b["status"]["conditions"][0]["reason"]
    assert next(iter(a["metadata"]["labels"])) is next(iter(b["metadata"]["labels"]))
    # A copy: what the body becomes later does not change the index entry.
    body = json.loads(json.dumps(job))
    entry = child_events.snapshot(body)
    body["status"]["conditions"][0]["status"] = "False"
    body["metadata"]["labels"]["other"] = "y"
    assert entry["status"]["conditions"][0]["status"] == "True" and entry["metadata"]["labels"]["other"] == "x"


def test_a_recent_create_is_remembered_as_its_index_entry():
    op = make_operator()
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "ml", "labels": {LABEL_RUN: "r"}},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    op.note("ml", "r", "Job", "j", job)
    (kept,) = [obj for _when, obj in op.recent[("ml", "r")].values()]
    assert kept == child_events.snapshot(job) and "spec" not in kept


def test_the_runs_gauge_counts_phases_as_they_change_and_forgets_deleted_runs():
    from humpback_operator import metrics

    def gauge() -> dict[str, float]:
        return {phase: metrics.RUNS.labels(phase)._value.get() for phase in ("Pending", "Running", "Succeeded")}

    op = make_operator()
    assert gauge() == {"Pending": 0, "Running": 0, "Succeeded": 0}
    op.set_phase("ml", "a", "Running")
    op.set_phase("ml", "b", "Running")
    op.set_phase("ml", "a", "Running")  # unchanged: counted once
    assert gauge() == {"Pending": 0, "Running": 2, "Succeeded": 0}
    op.set_phase("ml", "a", "Succeeded")
    assert gauge() == {"Pending": 0, "Running": 1, "Succeeded": 1}
    op.forget("ml", "b")
    assert gauge() == {"Pending": 0, "Running": 0, "Succeeded": 1} and ("ml", "b") not in op.phases


def test_a_finished_servers_objects_are_deleted_at_once_and_before_the_next_child_is_created():
    # The next stage's child waited for four delete round trips, one after the other.
    from humpback_operator.backtranslationrun import apply
    from humpback_operator.reconcile import Decision, Delete

    calls: list[str] = []

    class Kube:
        def __init__(self) -> None:
            self.waiting = 0
            self.all_in = asyncio.Event()

        async def delete(self, api_version, kind, namespace, name):
            calls.append(f"delete {kind}")
            self.waiting += 1
            if self.waiting == 4:
                self.all_in.set()
            await self.all_in.wait()  # returns only once all four deletes are under way
            return True

        async def create(self, obj):
            calls.append(f"create {obj['kind']}")
            return True

    op = Operator(kube=Kube(), config=OperatorConfig())
    body = {"metadata": {"name": "r", "namespace": "ml", "resourceVersion": "1"}, "status": {}}
    server = [Delete("apps/v1", "Deployment", "s"), Delete("v1", "Service", "s"), Delete("v1", "Secret", "s"),
              Delete("networking.k8s.io/v1", "NetworkPolicy", "s"), Delete("apps/v1", "Deployment", "s")]
    decision = Decision(create=[{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "ml"}}],
                        delete=server)
    asyncio.run(asyncio.wait_for(apply(op, body, decision, logging.getLogger("test")), 5))
    assert sorted(calls[:4]) == ["delete Deployment", "delete NetworkPolicy", "delete Secret", "delete Service"]
    assert calls[4:] == ["create Job"]  # the Deployment listed twice is deleted once


def test_a_store_the_probe_may_not_read_costs_no_second_decision(monkeypatch):
    # A stage about to start asked for its _SUCCESS.json, and decide() ran again after a read that,
    # for a store outside storeProbe.allowedStores, never happens: two decisions for one.
    import yaml

    from humpback_operator import backtranslationrun
    from humpback_operator.store_probe import StoreProbe

    decisions: list[object] = []
    real_decide = backtranslationrun.decide
    monkeypatch.setattr(backtranslationrun, "decide", lambda *a, **kw: decisions.append(a) or real_decide(*a, **kw))

    async def never(*_args, **_kwargs):
        raise AssertionError("the probe read a store it may not read")

    monkeypatch.setattr(StoreProbe, "read", never)
    monkeypatch.setattr(kopf, "event", lambda body, **kwargs: None)
    created: list[str] = []

    class Kube:
        async def create(self, obj):
            created.append(obj["metadata"]["name"])
            return True

        async def patch_run_status(self, namespace, name, status):
            return {"metadata": {"resourceVersion": "2"}, "status": status}

    doc = yaml.safe_load((PACKAGE.parents[1] / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"] = {"name": "r", "namespace": "ml", "uid": "u1", "generation": 1, "resourceVersion": "1"}
    doc["spec"]["storage"] = {"uri": "s3://b/runs", "s3": {"endpoint": "http://127.0.0.1:9"}}  # not an allowed store
    op = Operator(kube=Kube(), config=OperatorConfig())
    warnings: list[str] = []
    logger = logging.getLogger("test-store-unread")
    monkeypatch.setattr(logger, "warning", lambda message, *args: warnings.append(message % args))
    asyncio.run(backtranslationrun.reconcile_once(op, "ml", "r", kopf.Body(doc), logger))
    assert len(decisions) == 1
    assert any(name.startswith("r-prepare-seed-") for name in created)  # the first stages start all the same
    assert [w for w in warnings if w.startswith("Not reading the store")]  # and the admin is told why, once
    asyncio.run(backtranslationrun.reconcile_once(op, "ml", "r", kopf.Body(doc), logger))
    assert len([w for w in warnings if w.startswith("Not reading the store")]) == 1


def test_the_operator_freezes_what_startup_made_and_collects_cycles_less_often():
    # With Python's defaults, collecting cycles was a fifth of the operator's CPU at 1,000 runs.
    import gc

    from humpback_operator.backtranslationrun import GC_THRESHOLDS, tune_garbage_collector

    before = gc.get_threshold()
    made_at_startup = object.__new__(type("MadeAtStartup", (), {}))  # a tracked object, alive now
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS and GC_THRESHOLDS[0] > before[0]
        assert not any(o is made_at_startup for o in gc.get_objects())  # frozen: no collection scans it
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert any(o is made_at_startup for o in gc.get_objects())
