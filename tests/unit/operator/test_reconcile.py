"""The operator's decisions (`reconcile.decide`), driven through whole runs by a tiny in-memory
cluster: what a real API server plus the training operator, Job and Deployment controllers would
do, reduced to "objects by name" and a policy that finishes them."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from humpback_operator import children
from humpback_operator.config import OperatorConfig
from humpback_operator.reconcile import decide, run_and_plan
from humpback_runtime.plan import build_plan
from humpback_runtime.spec import parse_run

ROOT = Path(__file__).resolve().parents[3]
CONFIG = OperatorConfig()
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def tiny_body(**spec_updates) -> dict:
    doc = yaml.safe_load((ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs"}
    doc["spec"]["inference"]["engine"] = "auto"  # vLLM servers for inference stages
    for path, value in spec_updates.items():
        node = doc["spec"]
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


def conditions_true(obj: dict, *types: str) -> None:
    obj["status"] = {"conditions": [{"type": t, "status": "True", "reason": t, "message": f"{t.lower()} here"}
                                    for t in types]}


class Cluster:
    """Objects by (kind, name); `policy(obj) -> 'succeed' | 'fail' | 'hold'` finishes primaries."""

    def __init__(self, body: dict, policy=lambda obj: "succeed"):
        self.body = body
        self.objects: dict[tuple[str, str], dict] = {}
        self.policy = policy
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.pods: list[dict] = []  # of the children, as the operator's Pod index has them
        self.warnings: list[dict] = []  # Warning Events on the children
        self.now = T0

    def children(self) -> list[dict]:
        return [copy.deepcopy(o) for o in self.objects.values()]

    def step(self, store: dict | None = None, advance: float = 1.0):
        """One reconcile: decide (reading the store when asked), apply, let controllers act."""
        self.now += timedelta(seconds=advance)
        store = dict(store or {})
        before = copy.deepcopy(self.body)
        d = decide(self.body, self.children(), store, self.now, CONFIG, self.pods, self.warnings)
        if d.needs_store:
            store.update({s: None for s in d.needs_store if s not in store})
            d = decide(self.body, self.children(), store, self.now, CONFIG, self.pods, self.warnings)
        assert not d.needs_store
        assert self.body == before  # the operator hands decide() Kopf's live body, uncopied
        for obj in d.update:
            self.objects[(obj["kind"], obj["metadata"]["name"])]["data"] = obj["data"]
        for ref in d.delete:
            self.objects.pop((ref.kind, ref.name), None)
            self.deleted.append(ref.name)
        for obj in d.create:
            key = (obj["kind"], obj["metadata"]["name"])
            assert key not in self.objects, f"created {key} twice"
            self.objects[key] = copy.deepcopy(obj)
            self.created.append(obj["metadata"]["name"])
        self.body["status"] = d.status
        self.events += [(e.type, e.reason, e.message) for e in d.events]
        self.controllers()
        return d

    def controllers(self):
        for obj in self.objects.values():
            if obj.get("status"):
                continue
            kind = obj["kind"]
            if kind == "Deployment":
                obj["status"] = {"availableReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}
                continue
            if kind not in ("Job", "PyTorchJob"):
                continue
            verdict = self.policy(obj)
            if verdict == "hold":
                continue
            ok = "Complete" if kind == "Job" else "Succeeded"
            conditions_true(obj, "Created", ok) if verdict == "succeed" else conditions_true(obj, "Failed")

    def run_until(self, done, steps: int = 200, **kw):
        for _ in range(steps):
            self.step(**kw)
            if done(self):
                return
        raise AssertionError(f"not done after {steps} steps: {self.body['status'].get('message')}")

    def stage(self, name: str) -> dict:
        return next(s for s in self.body["status"]["stages"] if s["name"] == name)

    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.events]


def phase_is(phase):
    return lambda c: c.body.get("status", {}).get("phase") == phase


def test_a_run_goes_through_the_whole_dag_for_two_iterations():
    cluster = Cluster(tiny_body())
    first = cluster.step()
    kinds = sorted((o["kind"], o["metadata"]["labels"]["humpback.dev/stage"]) for o in first.create if o["kind"] != "ConfigMap")
    assert kinds == [("Job", "prepare-corpus"), ("Job", "prepare-seed")]
    assert first.create[0]["kind"] == "ConfigMap"  # pods read the spec from it
    cluster.run_until(phase_is("Succeeded"))

    status = cluster.body["status"]
    plan = build_plan(parse_run({k: v for k, v in cluster.body.items() if k != "status"}))
    assert [s["name"] for s in status["stages"]] == plan.names()
    assert all(s["phase"] == "Succeeded" for s in status["stages"])
    assert status["progress"] == f"{len(plan.stages)}/{len(plan.stages)}"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Accepted": "True", "Running": "False", "Complete": "True", "Failed": "False", "Suspended": "False"}
    # Both iterations ran, each curate-k scored by M(k-1).
    assert any(n.startswith("tiny-cpu-curate-1-") and n.endswith("-m0") for n in cluster.created)
    assert any(n.startswith("tiny-cpu-curate-2-") and n.endswith("-m1") for n in cluster.created)
    # Every vLLM server is gone once its stage ended; Jobs and PyTorchJobs stay for their logs.
    assert not [k for k in cluster.objects if k[0] in ("Deployment", "Service")]
    assert cluster.reasons().count("StageSucceeded") == len(plan.stages)
    assert cluster.reasons()[-1] == "Succeeded"


def test_train_myx_and_train_m0_start_together():
    cluster = Cluster(tiny_body())
    started: list[list[str]] = []
    for _ in range(10):
        d = cluster.step()
        started.append(sorted(o["metadata"]["labels"]["humpback.dev/stage"] for o in d.create if o["kind"] == "PyTorchJob"))
    assert ["train-m0", "train-myx"] in started


def test_inference_stage_waits_for_its_server_before_the_client_job():
    cluster = Cluster(tiny_body(), policy=lambda o: "succeed")
    cluster.controllers = lambda: None  # nothing becomes ready by itself
    cluster.step()
    for obj in cluster.objects.values():
        if obj["kind"] == "Job":
            conditions_true(obj, "Complete")
    for _ in range(3):
        cluster.step()
        for obj in cluster.objects.values():
            if obj["kind"] == "PyTorchJob":
                conditions_true(obj, "Succeeded")
    kinds = {k for k in cluster.objects if "augment" in k[1]}
    assert {k[0] for k in kinds} == {"Secret", "NetworkPolicy", "Deployment", "Service"}, kinds
    assert "waiting for vLLM server" in cluster.stage("augment")["message"]
    deployment = next(o for (k, _), o in cluster.objects.items() if k == "Deployment")
    deployment["status"] = {"availableReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}
    d = cluster.step()
    client = [o for o in d.create if o["kind"] == "Job"]
    assert len(client) == 1 and client[0]["metadata"]["labels"]["humpback.dev/stage"] == "augment"
    env = {e["name"]: e.get("value") for e in client[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HUMPBACK_SERVED_MODEL"] == "train-myx"
    assert env["HUMPBACK_ENDPOINT"].startswith("http://")


def test_a_failed_attempt_is_retried_as_a_new_child_after_the_backoff():
    failures = {"train-m0": 1}

    def policy(obj):
        stage = obj["metadata"]["labels"]["humpback.dev/stage"]
        if failures.get(stage, 0) > 0:
            failures[stage] -= 1
            return "fail"
        return "succeed"

    body = tiny_body(**{"retries": {"limit": 2, "backoffSeconds": 30}})
    cluster = Cluster(body, policy)
    cluster.run_until(lambda c: c.body["status"]["stages"] and c.stage("train-m0").get("nextAttemptTime"))
    st = cluster.stage("train-m0")
    assert st["attempt"] == 2 and st["phase"] == "Running"
    assert "attempt 1 failed" in st["message"]
    assert "StageRetrying" in cluster.reasons()
    # Not before the backoff: no second child yet.
    d = cluster.step(advance=5)
    assert not [o for o in d.create if o["metadata"]["name"].endswith("-a2")]
    cluster.step(advance=30)
    assert any(n.startswith("tiny-cpu-train-m0-") and n.endswith("-a2") for n in cluster.created)
    cluster.run_until(phase_is("Succeeded"))
    assert cluster.stage("train-m0")["attempt"] == 2


def test_retries_exhausted_fail_the_run_with_reason_and_message():
    body = tiny_body(**{"retries": {"limit": 1, "backoffSeconds": 0}})
    cluster = Cluster(body, policy=lambda o: "fail" if o["metadata"]["labels"]["humpback.dev/stage"] == "prepare-seed" else "succeed")
    cluster.run_until(phase_is("Failed"))
    st = cluster.stage("prepare-seed")
    assert st["phase"] == "Failed" and st["attempt"] == 2
    assert "attempt 2 of 2 failed" in st["message"]
    failed = next(c for c in cluster.body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed" and "prepare-seed" in failed["message"]
    assert "StageFailed" in cluster.reasons() and "Failed" in cluster.reasons()
    # Nothing downstream started.
    assert not [n for n in cluster.created if "train" in n]
    # Raising the retry limit (a spec edit that changes no fingerprint) lets the stage go on.
    cluster.body["spec"]["retries"]["limit"] = 2
    cluster.body["metadata"]["generation"] = 2
    cluster.policy = lambda o: "succeed"
    cluster.run_until(phase_is("Succeeded"))
    assert cluster.stage("prepare-seed")["attempt"] == 3


def test_stages_already_done_in_the_store_are_skipped_without_a_child():
    body = tiny_body()
    plan = build_plan(parse_run(body))
    store = {"prepare-seed": {"fingerprint": plan["prepare-seed"].fingerprint, "outputs": {"count": 64}},
             "prepare-corpus": {"fingerprint": "something-else"}}
    cluster = Cluster(body)
    d = cluster.step(store=store)
    created = [o["metadata"]["labels"]["humpback.dev/stage"] for o in d.create if o["kind"] != "ConfigMap"]
    # A stale manifest (other settings) does not count; what needs only prepare-seed starts at once.
    assert sorted(created) == ["prepare-corpus", "train-m0", "train-myx"]
    assert cluster.stage("prepare-seed")["phase"] == "Skipped"
    assert "StageSkipped" in cluster.reasons()


def test_suspend_deletes_running_children_keeps_finished_work_and_resume_continues():
    cluster = Cluster(tiny_body(), policy=lambda o: "hold" if "train" in o["metadata"]["name"] else "succeed")
    cluster.run_until(lambda c: any(k[0] == "PyTorchJob" for k in c.objects))
    running = [k for k in cluster.objects if k[0] == "PyTorchJob"]
    cluster.body["spec"]["suspend"] = True
    cluster.step()
    assert not [k for k in cluster.objects if k[0] == "PyTorchJob"]
    assert cluster.body["status"]["phase"] == "Suspended"
    assert cluster.stage("prepare-seed")["phase"] == "Succeeded"  # finished work kept
    assert cluster.stage("train-m0")["phase"] == "Pending"
    assert "Suspended" in cluster.reasons()
    d = cluster.step()
    assert not d.create  # stays suspended

    cluster.body["spec"]["suspend"] = False
    cluster.policy = lambda o: "succeed"
    d = cluster.step()
    assert sorted((o["kind"], o["metadata"]["name"]) for o in d.create) == sorted(running)  # same attempt, same names
    assert "Resumed" in cluster.reasons()
    cluster.run_until(phase_is("Succeeded"))


def test_a_spec_edit_reruns_only_changed_stages_and_replaces_their_running_children():
    hold = {"curate-1"}
    cluster = Cluster(tiny_body(), policy=lambda o: "hold" if o["metadata"]["labels"]["humpback.dev/stage"] in hold else "succeed")
    cluster.run_until(lambda c: c.body["status"]["stages"] and c.stage("curate-1").get("child", {}).get("kind") == "Job")
    old_curate = [k for k in cluster.objects if "curate-1" in k[1]]
    before = {s["name"]: dict(s) for s in cluster.body["status"]["stages"]}

    cluster.body["spec"]["curation"]["maxTokens"] = 99  # a scoring setting (a threshold only re-selects)
    cluster.body["metadata"]["generation"] = 2
    d = cluster.step()
    deleted = {(r.kind, r.name) for r in d.delete}
    assert set(old_curate) <= deleted  # the running Job and its server are replaced
    after = {s["name"]: s for s in cluster.body["status"]["stages"]}
    for name in ("prepare-seed", "prepare-corpus", "train-myx", "train-m0", "augment"):
        assert after[name] == before[name], name  # untouched
    assert after["curate-1"]["fingerprint"] != before["curate-1"]["fingerprint"]
    assert "StageReplanned" in cluster.reasons()
    assert cluster.body["status"]["observedGeneration"] == 2
    assert any(o["kind"] == "ConfigMap" for o in d.update)  # pods of the new attempt read the new spec
    hold.clear()
    cluster.run_until(phase_is("Succeeded"))
    assert len([n for n in cluster.created if n.startswith("tiny-cpu-train-myx")]) == 1


def test_restart_decides_the_same_and_creates_nothing_twice():
    cluster = Cluster(tiny_body(), policy=lambda o: "hold" if "augment" in o["metadata"]["name"] else "succeed")
    cluster.run_until(lambda c: any(k[0] == "Job" and "augment" in k[1] for k in c.objects))
    # A new operator process sees the same status and children: nothing to create or delete.
    d = decide(cluster.body, cluster.children(), {}, cluster.now, CONFIG)
    assert not d.create and not d.delete and not d.needs_store
    assert d.status["stages"] == cluster.body["status"]["stages"]


@pytest.mark.parametrize("field, value, expected", [
    ("storage", {"uri": "./runs"}, "spec.storage.uri"),  # pods on different nodes share no local path
    ("corpus.minChars", 5000, "minChars"),  # above maxChars: only the runtime's validators catch it
])
def test_an_invalid_run_is_refused_with_a_condition_and_one_event(field, value, expected):
    cluster = Cluster(tiny_body(**{field: value}))
    d = cluster.step()
    assert not d.create
    status = cluster.body["status"]
    assert status["phase"] == "Failed"
    accepted = next(c for c in status["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert expected in accepted["message"]
    cluster.step()
    assert cluster.reasons().count("InvalidSpec") == 1  # not repeated while nothing changes


def test_completion_reads_every_condition_not_only_the_last():
    cluster = Cluster(tiny_body(), policy=lambda o: "hold")
    cluster.step()
    job = next(o for (k, n), o in cluster.objects.items() if k == "Job" and "prepare-seed" in n)
    job["status"] = {"conditions": [
        {"type": "FailureTarget", "status": "True"},
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "exit 1"},
        {"type": "Suspended", "status": "False"},  # last, and says nothing about the outcome
    ]}
    cluster.step()
    assert "attempt 1 failed" in cluster.stage("prepare-seed")["message"]


@pytest.mark.parametrize("unchanged_step", [1, 5])
def test_a_second_decide_with_nothing_new_changes_nothing(unchanged_step):
    cluster = Cluster(tiny_body(), policy=lambda o: "hold")
    for _ in range(unchanged_step):
        cluster.step()
    status = copy.deepcopy(cluster.body["status"])
    d = decide(cluster.body, cluster.children(), {}, cluster.now + timedelta(seconds=1), CONFIG)
    assert not d.create and not d.delete and not d.events
    assert d.status == status


def test_a_finished_run_is_left_alone_until_its_spec_changes(monkeypatch):
    cluster = Cluster(tiny_body())
    cluster.run_until(phase_is("Succeeded"))
    finished = copy.deepcopy(cluster.body["status"])
    # A newer operator whose stage code changed what stages write: every fingerprint differs.
    from humpback_runtime import plan as plan_module
    monkeypatch.setitem(plan_module.STAGE_CODE_VERSIONS, "train", 99)
    d = decide(cluster.body, cluster.children(), {}, cluster.now, CONFIG)
    assert not d.create and not d.delete and not d.events and d.status == finished
    # An edit (a new generation) re-plans with the new fingerprints.
    cluster.body["metadata"]["generation"] = 2
    d = cluster.step()
    assert cluster.body["status"]["phase"] == "Running"
    assert {o["metadata"]["labels"]["humpback.dev/stage"] for o in d.create if o["kind"] == "PyTorchJob"} == {"train-myx", "train-m0"}


def test_a_server_that_misses_its_progress_deadline_fails_the_attempt_and_is_rebuilt():
    cluster = Cluster(tiny_body(**{"retries": {"limit": 1, "backoffSeconds": 0}}))
    cluster.run_until(lambda c: any(k[0] == "Deployment" for k in c.objects))
    deployment = next(o for (k, _), o in cluster.objects.items() if k == "Deployment")
    name = deployment["metadata"]["name"]
    # The instant Deployment controller of this fake already marked it available; make it stuck.
    deployment["status"] = {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                            "message": "ReplicaSet has timed out progressing."}]}
    # The state of the attempt that failed, as the fake cluster runs on after this step.
    d = decide(cluster.body, cluster.children(), {}, cluster.now, CONFIG)
    assert any(r.name == name for r in d.delete)  # rebuilt for the next attempt
    assert "StageRetrying" in [e.reason for e in d.events]
    augment = next(s for s in d.status["stages"] if s["name"] == "augment")
    assert augment["attempt"] == 2 and "ProgressDeadlineExceeded" in augment["message"]
    assert not [o for o in d.create if o["kind"] == "Job"]  # no client Job against a dead server


# --- a cluster that says no: stuck pods, deadlines, disruptions, upgrades (issue 11) -------------


def pod_of(child: dict, **status) -> dict:
    """A pod of `child` (its template's labels) with the given status."""
    spec = child["spec"]
    template = spec["template"] if "template" in spec else spec["pytorchReplicaSpecs"]["Master"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": child["metadata"]["name"] + "-x1",
            "labels": dict(template["metadata"]["labels"])}, "status": status}


UNSCHEDULABLE = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."}]}


def started(cluster: Cluster, stage: str) -> dict:
    cluster.run_until(lambda c: any(k[0] in ("Job", "PyTorchJob") and o["metadata"]["labels"].get("humpback.dev/stage") == stage
                                    for k, o in c.objects.items()))
    return next(o for k, o in cluster.objects.items() if k[0] in ("Job", "PyTorchJob")
                and o["metadata"]["labels"].get("humpback.dev/stage") == stage)


def test_an_unschedulable_pod_is_surfaced_and_a_cpu_stage_fails_after_its_pending_timeout():
    cluster = Cluster(tiny_body(**{"resources.cpu.pendingTimeout": "10m"}), policy=lambda obj: "hold")
    job = started(cluster, "prepare-seed")
    cluster.pods.append(pod_of(job, **UNSCHEDULABLE))
    cluster.step()
    stage = cluster.stage("prepare-seed")
    assert stage["reason"] == "Unschedulable" and "12 Insufficient nvidia.com/gpu" in stage["message"]
    assert "12 Insufficient nvidia.com/gpu" in cluster.body["status"]["message"]
    assert ("Warning", "Unschedulable") in [(t, r) for t, r, _ in cluster.events]
    cluster.step(advance=300)
    assert cluster.reasons().count("Unschedulable") == 1  # one Event per change, not per reconcile
    assert cluster.stage("prepare-seed")["phase"] == "Running"
    cluster.step(advance=301)
    stage = cluster.stage("prepare-seed")
    assert stage["reason"] == "PendingTimeout" and stage["attempt"] == 2
    assert "pendingTimeout 10m" in stage["message"] and job["metadata"]["name"] in cluster.deleted


def test_training_waits_for_gpus_without_a_pending_timeout_but_queued_time_is_no_problem():
    cluster = Cluster(tiny_body(), policy=lambda obj: "hold" if obj["kind"] == "PyTorchJob" else "succeed")
    train = started(cluster, "train-m0")
    cluster.pods.append(pod_of(train, **UNSCHEDULABLE))
    cluster.step(advance=7 * 24 * 3600)
    assert cluster.stage("train-m0")["phase"] == "Running" and cluster.stage("train-m0")["reason"] == "Unschedulable"
    train["spec"]["runPolicy"]["suspend"] = True  # Kueue holds it
    cluster.pods.clear()
    cluster.step()
    stage = cluster.stage("train-m0")
    assert stage["reason"] == "Queued" and "pendingSince" not in stage


def test_an_oom_killed_pod_is_named_in_the_failure():
    cluster = Cluster(tiny_body(), policy=lambda obj: "hold")
    job = started(cluster, "prepare-seed")
    cluster.pods.append(pod_of(job, phase="Failed", containerStatuses=[
        {"name": "stage", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]))
    conditions_true(job, "Failed")
    cluster.step()
    stage = cluster.stage("prepare-seed")
    assert stage["reason"] == "OOMKilled" and "ran out of memory" in stage["message"] and stage["attempt"] == 2


def test_failed_create_events_of_a_job_are_surfaced():
    cluster = Cluster(tiny_body(), policy=lambda obj: "hold")
    job = started(cluster, "prepare-seed")
    cluster.warnings.append({"kind": "Event", "type": "Warning", "reason": "FailedCreate",
                             "involvedObject": {"kind": "Job", "name": job["metadata"]["name"]},
                             "message": 'Error creating: pods "x" is forbidden: exceeded quota: gpu, requested: memory=8Gi'})
    cluster.step()
    stage = cluster.stage("prepare-seed")
    assert stage["reason"] == "FailedCreate" and "exceeded quota" in stage["message"] and "pendingSince" in stage


def test_a_job_failed_by_its_pod_failure_policy_is_not_retried():
    cluster = Cluster(tiny_body(), policy=lambda obj: "hold")
    job = started(cluster, "prepare-seed")
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                     "message": "Container stage for pod ml/x failed with exit code 2 matching FailJob rule at index 1"}]}
    cluster.step()
    stage = cluster.stage("prepare-seed")
    assert (stage["phase"], stage["reason"], stage["attempt"]) == ("Failed", "InvalidInput", 1)
    assert cluster.body["status"]["phase"] == "Failed"


def test_a_disrupted_training_attempt_is_recreated_at_once_without_counting():
    cluster = Cluster(tiny_body(**{"retries.limit": 0}), policy=lambda obj: "hold" if obj["kind"] == "PyTorchJob" else "succeed")
    train = started(cluster, "train-m0")
    cluster.pods.append(pod_of(train, phase="Failed", conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]))
    conditions_true(train, "Failed")
    cluster.step()
    stage = cluster.stage("train-m0")
    assert (stage["phase"], stage["attempt"], stage["disruptions"]) == ("Running", 2, 1)
    assert "nextAttemptTime" not in stage and "StageDisrupted" in cluster.reasons()
    cluster.step()
    assert any(n.startswith("tiny-cpu-train-m0-") and n.endswith("-a2") for n in cluster.created)
    # A real failure after it is the last one (retries.limit 0): the disruption did not use it up.
    second = next(o for k, o in cluster.objects.items() if k[1].endswith("-a2") and k[0] == "PyTorchJob")
    conditions_true(second, "Failed")
    cluster.step()
    assert cluster.stage("train-m0")["phase"] == "Failed"


def test_an_operator_upgrade_that_changes_a_fingerprint_keeps_the_running_child(monkeypatch):
    from humpback_runtime import plan as plan_module

    cluster = Cluster(tiny_body(), policy=lambda obj: "hold")
    job = started(cluster, "prepare-seed")
    cluster.step()
    monkeypatch.setitem(plan_module.STAGE_CODE_VERSIONS, "prepare-seed", "upgraded")
    cluster.step()
    assert job["metadata"]["name"] not in cluster.deleted
    assert cluster.stage("prepare-seed")["phase"] == "Running"
    # A spec edit still replaces it.
    cluster.body["metadata"]["generation"] = 2
    cluster.body["spec"]["seed"]["maxExamples"] = 7
    cluster.step()
    assert job["metadata"]["name"] in cluster.deleted


def test_a_running_attempt_keeps_its_fingerprint_version_across_an_upgrade_and_new_attempts_use_the_new_one(monkeypatch):
    from humpback_runtime import plan as plan_module

    cluster = Cluster(tiny_body(**{"retries": {"limit": 1, "backoffSeconds": 0}}), policy=lambda obj: "hold")
    seed, corpus = started(cluster, "prepare-seed"), started(cluster, "prepare-corpus")
    old_version = plan_module.fingerprint_version("prepare-seed")
    assert old_version == f"alg{plan_module.FINGERPRINT_ALGORITHM}-code{plan_module.STAGE_CODE_VERSIONS['prepare-seed']}"
    for child, name in ((seed, "prepare-seed"), (corpus, "prepare-corpus")):
        assert child["metadata"]["annotations"]["humpback.dev/fingerprint-version"] == cluster.stage(name)["fingerprintVersion"]
    old_fingerprints = {n: cluster.stage(n)["fingerprint"] for n in ("prepare-seed", "prepare-corpus")}

    # The new operator: both stages' code changed, so their fingerprints and versions did.
    monkeypatch.setitem(plan_module.STAGE_CODE_VERSIONS, "prepare-seed", 99)
    monkeypatch.setitem(plan_module.STAGE_CODE_VERSIONS, "prepare-corpus", 99)
    new_version = plan_module.fingerprint_version("prepare-seed")
    assert new_version != old_version
    cluster.step()
    for name in ("prepare-seed", "prepare-corpus"):
        stage = cluster.stage(name)
        assert (stage["phase"], stage["fingerprint"]) == ("Running", old_fingerprints[name])
        assert stage["fingerprintVersion"] == cluster.objects[("Job", stage["child"]["name"])]["metadata"]["annotations"][
            "humpback.dev/fingerprint-version"] != new_version
    assert not cluster.deleted

    # The running attempts end: prepare-seed succeeds (with the version it started with), prepare-corpus fails.
    conditions_true(seed, "Complete")
    conditions_true(corpus, "Failed")
    cluster.step()
    assert cluster.stage("prepare-seed")["phase"] == "Succeeded"
    assert cluster.stage("prepare-seed")["fingerprintVersion"] != new_version
    assert cluster.stage("prepare-corpus")["attempt"] == 2  # a retry, which...
    for _ in range(3):
        cluster.step()
    # ...like the stage that finished, starts a new attempt with the new fingerprint and version.
    for name, old in ((seed, "prepare-seed"), (corpus, "prepare-corpus")):
        stage = cluster.stage(old)
        assert stage["phase"] == "Running" and stage["fingerprint"] != old_fingerprints[old]
        assert stage["fingerprintVersion"] == new_version == "alg1-code99"
        child = cluster.objects[("Job", stage["child"]["name"])]
        assert child["metadata"]["annotations"] == {"humpback.dev/fingerprint": stage["fingerprint"],
                                                    "humpback.dev/fingerprint-version": new_version}
        assert child["metadata"]["name"].endswith("-a1") and name["metadata"]["name"] not in cluster.deleted
    assert any(r == "StageReplanned" and "version alg1-code99" in m for _, r, m in cluster.events)


def test_a_server_past_its_progress_deadline_while_kueue_gates_its_pods_is_not_failed():
    cluster = Cluster(tiny_body(), policy=lambda obj: "succeed")
    cluster.run_until(lambda c: any(k[0] == "Deployment" for k in c.objects))
    name, server = next((k[1], o) for k, o in cluster.objects.items() if k[0] == "Deployment")
    server["status"] = {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}
    gated = pod_of(server, phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}])
    cluster.pods.append(gated)
    cluster.step()
    assert name not in cluster.deleted
    stage_name = server["metadata"]["labels"]["humpback.dev/stage"]
    assert cluster.stage(stage_name)["reason"] == "Queued"
    cluster.pods.clear()  # admitted, and then it really missed its deadline
    cluster.step()
    assert name in cluster.deleted


def test_a_pod_that_found_an_input_damaged_sends_its_producer_back_without_counting_a_retry():
    """The pod withdrew prepare-corpus's manifest (a truncated shard) and said so in its termination
    message: the operator looks both producers up again (the intact train-myx is skipped), runs
    prepare-corpus again, then augment, none of it counted against retries.limit."""
    held = {"augment": True}

    def policy(obj):
        return "hold" if obj["metadata"]["labels"]["humpback.dev/stage"] == "augment" and held["augment"] else "succeed"

    body = tiny_body(**{"retries.limit": 0})
    cluster = Cluster(body, policy=policy)
    job = started(cluster, "augment")
    plan = build_plan(parse_run({k: v for k, v in body.items() if k != "status"}))
    intact = {"train-myx": {"fingerprint": plan["train-myx"].fingerprint}}
    said = ("InputsDamaged: stage augment cannot read the outputs of prepare-corpus: s3://bucket/runs/ml/tiny-cpu/"
            "prepare-corpus/part-00000.jsonl: 1200 bytes, the manifest says 1400")
    cluster.pods.append(pod_of(job, phase="Failed", containerStatuses=[
        {"name": "stage", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": said}}}]))
    conditions_true(job, "Failed")
    held["augment"] = False
    cluster.step(store=intact)
    stage = cluster.stage("augment")
    assert (stage["phase"], stage["reason"], stage["attempt"], stage["inputRechecks"]) == ("Pending", "InputsDamaged", 2, 1)
    assert "1200 bytes, the manifest says 1400" in stage["message"]
    assert cluster.stage("prepare-corpus")["phase"] == "Pending"
    assert ("Warning", "InputsDamaged") in [(t, r) for t, r, _ in cluster.events]

    cluster.run_until(phase_is("Succeeded"), store=intact)
    corpus_jobs = sorted(n for n in cluster.created if n.startswith("tiny-cpu-prepare-corpus-"))
    assert len(corpus_jobs) == 2  # ran again, as attempt 2 of its own (a new Job)
    assert cluster.stage("prepare-corpus")["attempt"] == 2
    assert cluster.stage("train-myx")["phase"] == "Skipped"  # its manifest was intact
    assert cluster.stage("augment")["phase"] == "Succeeded" and cluster.stage("augment")["attempt"] == 2


def test_an_input_damaged_again_and_again_fails_the_stage():
    cluster = Cluster(tiny_body(**{"retries.limit": 0}),
                      policy=lambda obj: "hold" if obj["kind"] == "PyTorchJob" else "succeed")
    started(cluster, "train-myx")

    def attempt_child(n):
        return next((o for k, o in cluster.objects.items() if k[0] == "PyTorchJob"
                     and o["metadata"]["labels"]["humpback.dev/attempt"] == str(n)), None)

    for attempt in (1, 2, 3):
        cluster.run_until(lambda c: attempt_child(attempt) is not None)
        child = attempt_child(attempt)
        cluster.pods.append(pod_of(child, phase="Failed", containerStatuses=[
            {"name": "pytorch", "state": {"terminated": {"exitCode": 6, "reason": "Error"}}}]))
        conditions_true(child, "Failed")
        cluster.step()
        if attempt < 3:
            assert cluster.stage("train-myx")["reason"] == "InputsDamaged"
    stage = cluster.stage("train-myx")
    assert stage["phase"] == "Failed" and stage["inputRechecks"] == 2 and stage["attempt"] == 3


def test_a_failure_waits_a_moment_for_its_pods_to_tell_why():
    """The Job's Failed condition and its pod's OOMKilled status come by different watches: a
    failure with no known cause is decided only once the pods had FAILURE_SETTLE_SECONDS to say."""
    from humpback_operator.reconcile import FAILURE_SETTLE_SECONDS

    def failed_now(cluster, job):
        job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit",
                                         "lastTransitionTime": cluster.now.strftime("%Y-%m-%dT%H:%M:%SZ")}]}

    cluster = Cluster(tiny_body(), policy=lambda obj: "hold")
    job = started(cluster, "prepare-seed")
    failed_now(cluster, job)
    d = cluster.step(advance=0)
    assert cluster.stage("prepare-seed")["attempt"] == 1 and 0 < d.requeue_after <= FAILURE_SETTLE_SECONDS + 0.1
    cluster.pods.append(pod_of(job, phase="Failed", containerStatuses=[
        {"name": "stage", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]))
    cluster.step(advance=1)
    stage = cluster.stage("prepare-seed")
    assert stage["reason"] == "OOMKilled" and stage["attempt"] == 2

    # No pod ever tells: after the wait the failure is decided without a cause.
    other = Cluster(tiny_body(), policy=lambda obj: "hold")
    job = started(other, "prepare-seed")
    failed_now(other, job)
    other.step(advance=0)
    assert other.stage("prepare-seed")["attempt"] == 1
    other.step(advance=FAILURE_SETTLE_SECONDS + 1)
    assert other.stage("prepare-seed")["attempt"] == 2 and "reason" not in other.stage("prepare-seed")


def test_the_spec_configmap_is_compared_by_digest_and_an_edited_one_is_put_back():
    # The index kept each run's spec ConfigMap whole (~8 KB of YAML per run), and the reconciler a
    # built copy of its own per run: ~19 MB of the operator's memory at 1,000 runs.
    from humpback_operator import child_events
    from humpback_operator.children import SPEC_KEY, content_digest

    body = tiny_body()
    cluster = Cluster(body, policy=lambda obj: "hold")
    cluster.step()
    name = f"{body['metadata']['name']}-spec"
    created = cluster.objects[("ConfigMap", name)]
    kept = child_events.snapshot(created)
    assert "data" not in kept and kept["dataDigests"] == {SPEC_KEY: content_digest(created["data"][SPEC_KEY])}

    def configmap_writes(children: list[dict]) -> list[dict]:
        d = decide(body, children, {}, cluster.now, CONFIG)
        return [o for o in d.create + d.update if o["kind"] == "ConfigMap"]

    others = [o for o in cluster.children() if o["kind"] != "ConfigMap"]
    assert configmap_writes(others + [kept]) == []  # as the index keeps it: unchanged, nothing to write
    edited = copy.deepcopy(created)
    edited["data"][SPEC_KEY] = edited["data"][SPEC_KEY].replace("seed", "SEED")  # kubectl edit
    [put_back] = configmap_writes(others + [child_events.snapshot(edited)])
    assert put_back["data"] == created["data"]
    assert [o["metadata"]["name"] for o in configmap_writes(others)] == [name]  # gone: made again


def test_a_claim_shared_by_training_pods_on_several_nodes_must_be_read_write_many():
    # On a cluster the second node's pods would wait for good (Multi-Attach error) while the first trains.
    body = tiny_body(**{"resources.training.nodes": 2, "resources.training.checkpointVolume": {"claimName": "ckpt"}})

    def accepted(modes) -> dict:
        d = decide(body, [], {}, T0, CONFIG, claim_modes=modes)
        return next(c for c in d.status["conditions"] if c["type"] == "Accepted")

    refused = accepted({"ckpt": ["ReadWriteOnce"]})
    assert refused["status"] == "False" and refused["reason"] == "InvalidSpec"
    assert "spec.resources.training.checkpointVolume.claimName: PersistentVolumeClaim ckpt is ReadWriteOnce" in refused["message"]
    assert "ReadWriteMany" in refused["message"]
    assert accepted({"ckpt": ["ReadWriteOnce", "ReadWriteMany"]})["status"] == "True"
    assert accepted({"ckpt": None})["status"] == "True"  # not there yet: the pods wait for it, Unschedulable
    # One node: the claim's modes are never asked for (any mode serves the pods of one node).
    one_node = tiny_body(**{"resources.training.checkpointVolume": {"claimName": "ckpt"}})
    assert children.shared_claims(run_and_plan(one_node)[0]) == []
    assert children.shared_claims(run_and_plan(body)[0]) == ["ckpt"]
