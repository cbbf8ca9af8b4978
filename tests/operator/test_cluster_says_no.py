"""The operator on a cluster that says no (issue 11): pods that cannot be scheduled, pulled, admitted
or kept, deadlines, disruptions, Kueue, watch gaps and operator upgrades, each met through the
stricter emulator and stand-ins (`humpback_testing.kube`, `humpback_testing.standins`) with the operator in
its own process (test_operator.py's fixtures)."""

from __future__ import annotations

import time
import urllib.request

import kubernetes
import yaml

from humpback_operator.kube import USER_AGENT
from humpback_testing.standins import stage_policy
from test_operator import NAMESPACE, REPO_ROOT, cluster, explain, free_port, start_operator, tiny_run, wait_for  # noqa: F401  (fixtures)


def stage_of(cluster, run: str, stage: str):
    return lambda: cluster.stage(run, stage)


def children_named(cluster, run: str, resource: str, part: str) -> list[dict]:
    return [o for o in cluster.children(run, resource) if part in o["metadata"]["name"]]


def test_an_unschedulable_pod_is_surfaced_and_the_pending_timeout_fails_the_attempt(
        cluster, start_operator, make_standins, s3_bucket, s3_server):
    make_standins(policy=stage_policy({("prepare-seed", 1): "pending"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server, resources={"cpu": {"pendingTimeout": "4s"}},
                                retries={"limit": 2, "backoffSeconds": 0}))
    wait_for(lambda: cluster.stage("tiny", "prepare-seed").get("reason") == "Unschedulable", 60,
             "the reason in the stage status", explain(cluster, "tiny", op))
    assert "12 Insufficient nvidia.com/gpu" in cluster.stage("tiny", "prepare-seed")["message"]
    assert "12 Insufficient nvidia.com/gpu" in cluster.status("tiny")["message"]  # the Message column
    # (Events follow the status patch)
    wait_for(lambda: any(r == "Unschedulable" and "Insufficient nvidia.com/gpu" in m for _, r, m in cluster.events("tiny")),
             10, "the Unschedulable Event")
    wait_for(lambda: children_named(cluster, "tiny", "jobs", "prepare-seed") and
             any(j["metadata"]["name"].endswith("-a2") for j in children_named(cluster, "tiny", "jobs", "prepare-seed")),
             60, "attempt 2 after the pending timeout", explain(cluster, "tiny", op))
    assert not any(j["metadata"]["name"].endswith("-a1") for j in children_named(cluster, "tiny", "jobs", "prepare-seed"))
    assert any(r == "StageRetrying" and "pendingTimeout 4s" in m for _, r, m in cluster.events("tiny"))


def test_pods_refused_by_a_quota_are_surfaced_as_failed_create(
        cluster, start_operator, make_standins, s3_bucket, s3_server):
    cluster.core.create_namespaced_resource_quota(NAMESPACE, {
        "metadata": {"name": "tight"}, "spec": {"hard": {"requests.memory": "1Gi"}}})
    make_standins(policy=stage_policy({"prepare-seed": "pending"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(lambda: cluster.stage("tiny", "prepare-seed").get("reason") == "FailedCreate", 60,
             "FailedCreate in the stage status", explain(cluster, "tiny", op))
    stage = cluster.stage("tiny", "prepare-seed")
    assert "exceeded quota: tight" in stage["message"] and stage.get("pendingSince")
    # The operator asked the API server for Warning Events only, and for labelled children only.
    reads = [r for r in cluster.emulator.requests_since(0)
             if r.verb in ("list", "watch") and r.user_agent.startswith(("kopf", USER_AGENT))]
    selectors = {(r.resource, r.params.get("labelSelector"), r.params.get("fieldSelector")) for r in reads
                 if r.resource in ("events", "pods", "jobs")}
    assert selectors == {("events", None, "type=Warning"), ("pods", "humpback.dev/run", None), ("jobs", "humpback.dev/run", None)}


def test_a_checkpoint_claim_shared_across_nodes_that_is_not_read_write_many_refuses_the_run(
        cluster, start_operator, make_standins, s3_bucket, s3_server):
    cluster.core.create_namespaced_persistent_volume_claim(NAMESPACE, {
        "metadata": {"name": "ckpt"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    standins = make_standins()
    op = start_operator()
    doc = tiny_run(s3_bucket, s3_server)
    doc["spec"].setdefault("resources", {}).setdefault("training", {}).update(nodes=2, checkpointVolume={"claimName": "ckpt"})
    cluster.create_run(doc)
    wait_for(cluster.phase_is("tiny", "Failed"), 30, "phase Failed", explain(cluster, "tiny", op))
    accepted = next(c for c in cluster.status("tiny")["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "PersistentVolumeClaim ckpt is ReadWriteOnce" in accepted["message"] and "ReadWriteMany" in accepted["message"]
    assert not any(standins.seen.values()) and cluster.children("tiny", "jobs") == []


def test_oom_killed_and_image_pull_backoff_are_named(cluster, start_operator, make_standins, s3_bucket, s3_server):
    make_standins(policy=stage_policy({("prepare-seed", 1): "oom", "prepare-corpus": "image-pull"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server, retries={"limit": 2, "backoffSeconds": 30}))
    wait_for(lambda: cluster.stage("tiny", "prepare-seed").get("attempt") == 2, 60, "a retry", explain(cluster, "tiny", op))
    assert "OOMKilled" in cluster.stage("tiny", "prepare-seed")["message"]
    assert cluster.stage("tiny", "prepare-seed")["reason"] == "OOMKilled"
    wait_for(lambda: cluster.stage("tiny", "prepare-corpus").get("reason") == "ImagePullBackOff", 60,
             "ImagePullBackOff", explain(cluster, "tiny", op))
    assert "Back-off pulling image" in cluster.stage("tiny", "prepare-corpus")["message"]


def test_disruptions_are_not_failures(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins(policy=stage_policy({("prepare-seed", 1): "evict", ("train-m0", 1): "evict"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server, retries={"limit": 0, "backoffSeconds": 0}))
    # The Job ignores its evicted pod (podFailurePolicy) and finishes in attempt 1; the PyTorchJob
    # fails, and the operator starts attempt 2 at once without using up the retry limit of 0.
    wait_for(lambda: cluster.stage("tiny", "train-m0").get("disruptions") == 1, 90, "a disrupted training attempt",
             explain(cluster, "tiny", op))
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op))
    assert cluster.stage("tiny", "prepare-seed")["attempt"] == 1
    assert [n[-3:] for n in standins.seen["PyTorchJob"] if "-train-m0-" in n] == ["-a1", "-a2"]
    assert "StageDisrupted" in cluster.reasons("tiny")


def test_kueue_suspended_then_admitted_deployment_and_pytorchjob(cluster, start_operator, make_standins, s3_bucket, s3_server):
    def policy(obj):
        kind, stage = obj["kind"], obj["metadata"]["labels"].get("humpback.dev/stage")
        return "queued" if (kind, stage) in (("PyTorchJob", "train-m0"), ("Deployment", "augment")) else "succeed"

    standins = make_standins(policy=policy)
    op = start_operator()
    run = tiny_run(s3_bucket, s3_server)
    run["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus", "kueue.x-k8s.io/priority-class": "research"}
    cluster.create_run(run)
    wait_for(lambda: cluster.stage("tiny", "train-m0").get("reason") == "Queued", 60, "train-m0 queued",
             explain(cluster, "tiny", op))
    train = children_named(cluster, "tiny", "pytorchjobs", "train-m0")[0]
    assert train["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research"
    standins.release(train["metadata"]["name"], "succeed")
    wait_for(lambda: cluster.stage("tiny", "augment").get("reason") == "Queued", 90, "augment's server queued",
             explain(cluster, "tiny", op))
    # Its progress deadline passed while Kueue held it: not a failure.
    assert cluster.stage("tiny", "augment")["attempt"] == 1 and "StageRetrying" not in cluster.reasons("tiny")
    server = children_named(cluster, "tiny", "deployments", "augment")[0]["metadata"]["name"]
    standins.release(server, "succeed")
    wait_for(lambda: cluster.stage("tiny", "augment").get("phase") == "Succeeded", 90, "augment done",
             explain(cluster, "tiny", op))
    assert cluster.stage("tiny", "augment")["attempt"] == 1 and cluster.stage("tiny", "train-m0")["attempt"] == 1


def test_time_suspended_by_kueue_counts_against_no_deadline_of_a_job_or_pytorchjob(
        cluster, start_operator, make_standins, s3_bucket, s3_server):
    # prepare-corpus (a Job) and train-m0 (a PyTorchJob) wait in Kueue's queue longer than their
    # pendingTimeout and timeout (activeDeadlineSeconds); the stand-ins enforce the deadline from
    # startTime, which a suspension resets, as the Job controller and the training operator do.
    standins = make_standins(policy=stage_policy({("prepare-corpus", 1): "queued", ("train-m0", 1): "queued"}))
    op = start_operator()
    limits = {"timeout": "4s", "pendingTimeout": "3s"}
    run = tiny_run(s3_bucket, s3_server, resources={"cpu": limits, "training": limits},
                   retries={"limit": 1, "backoffSeconds": 0})
    run["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team"}
    cluster.create_run(run)
    for stage in ("prepare-corpus", "train-m0"):
        wait_for(lambda: cluster.stage("tiny", stage).get("reason") == "Queued", 60, f"{stage} queued",
                 explain(cluster, "tiny", op))
    time.sleep(6)
    for stage in ("prepare-corpus", "train-m0"):
        st = cluster.stage("tiny", stage)
        assert (st["phase"], st["attempt"], st["reason"]) == ("Running", 1, "Queued") and "pendingSince" not in st
    assert not {"StageRetrying", "PendingTimeout"} & set(cluster.reasons("tiny"))
    job = children_named(cluster, "tiny", "jobs", "prepare-corpus")[0]
    train = children_named(cluster, "tiny", "pytorchjobs", "train-m0")[0]
    assert job["spec"]["activeDeadlineSeconds"] == 4 and train["spec"]["runPolicy"]["activeDeadlineSeconds"] == 4

    # Admitted, the Job's pod cannot be scheduled and the PyTorchJob runs on: each deadline counts
    # from admission, not from creation (which is long past both).
    admitted = time.monotonic()
    standins.release(job["metadata"]["name"], "pending")
    standins.release(train["metadata"]["name"], "hold")
    waited = {}
    for stage, what in (("prepare-corpus", "pendingTimeout 3s"), ("train-m0", "longer than specified deadline")):
        wait_for(lambda: cluster.stage("tiny", stage).get("attempt") == 2, 60, f"{stage} past its deadline",
                 explain(cluster, "tiny", op))
        waited[stage] = time.monotonic() - admitted
        wait_for(lambda: any(r == "StageRetrying" and stage in m and what in m for _, r, m in cluster.events("tiny")),
                 10, f"{stage}'s retry for {what!r}", lambda: str(cluster.events("tiny")))
    # (the API's timestamps have whole seconds: a deadline may end up to a second early)
    assert waited["prepare-corpus"] >= 2 and waited["train-m0"] >= 3, waited


def test_a_child_deleted_during_a_watch_gap_is_noticed(cluster, start_operator, make_standins, s3_bucket, s3_server, kube_api):
    standins = make_standins(policy=stage_policy({("prepare-seed", 1): "hold"}))
    op = start_operator(HUMPBACK_SAFETY_NET_SECONDS="2")
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    job = wait_for(lambda: children_named(cluster, "tiny", "jobs", "prepare-seed"), 60, "the Job", explain(cluster, "tiny", op))[0]
    # The stand-ins poll: they must have seen this Job before it goes, or the new one is their first.
    wait_for(lambda: job["metadata"]["name"] in standins.seen.get("Job", ()), 30, "the stand-ins saw the Job",
             lambda: f"{standins.seen} {standins.errors}")
    cluster.emulator.call(lambda handler: handler.hold_watches())
    kubernetes.client.BatchV1Api(kube_api).delete_namespaced_job(job["metadata"]["name"], NAMESPACE)
    cluster.emulator.call(lambda handler: handler.expire_watches())
    # The Job is gone from the API; the operator lists it from there and creates it again.
    wait_for(lambda: [j for j in children_named(cluster, "tiny", "jobs", "prepare-seed")
                      if j["metadata"]["uid"] != job["metadata"]["uid"]], 60, "the Job created again",
             explain(cluster, "tiny", op))
    wait_for(lambda: len([n for n in standins.seen["Job"] if n == job["metadata"]["name"]]) == 2, 30,
             "the stand-ins saw the new Job", lambda: f"{standins.seen} {standins.errors}")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_a_finished_runs_daemon_stops_and_a_spec_edit_brings_it_back(
        cluster, start_operator, make_standins, s3_bucket, s3_server):
    def policy(obj):  # the run "bad" fails its first stage every time
        labels = obj["metadata"]["labels"]
        return "fail" if (labels.get("humpback.dev/run"), labels.get("humpback.dev/stage")) == ("bad", "prepare-seed") else "succeed"

    make_standins(policy=policy)
    port = free_port()
    # A live daemon reconciles at least every second here (the safety net's period caps its sleep).
    op = start_operator(HUMPBACK_METRICS_PORT=str(port), HUMPBACK_SAFETY_NET_SECONDS="1")
    cluster.create_run(tiny_run(s3_bucket, s3_server, name="good"))
    cluster.create_run(tiny_run(s3_bucket, s3_server, name="bad", retries={"limit": 0, "backoffSeconds": 0}))
    wait_for(lambda: scrape(port).get("humpback_run_daemons") == 2, 30, "two daemons", explain(cluster, "bad", op))
    wait_for(cluster.phase_is("bad", "Failed"), 60, "run bad Failed", explain(cluster, "bad", op))
    wait_for(cluster.phase_is("good", "Succeeded"), 120, "run good Succeeded", explain(cluster, "good", op))
    wait_for(lambda: scrape(port).get("humpback_run_daemons") == 0, 30, "no daemon for finished runs", op.tail)
    reconciles = scrape(port)["humpback_reconciles_total"]
    time.sleep(3)
    assert scrape(port)["humpback_reconciles_total"] == reconciles  # nothing wakes for a finished run

    # An edit brings the daemon back: one more retry for the failed run starts attempt 2.
    cluster.patch_spec("bad", {"retries": {"limit": 1, "backoffSeconds": 0}})
    wait_for(lambda: any(j["metadata"]["name"].endswith("-a2") for j in children_named(cluster, "bad", "jobs", "prepare-seed")),
             30, "attempt 2 after the edit", explain(cluster, "bad", op))
    assert scrape(port)["humpback_reconciles_total"] > reconciles
    wait_for(lambda: cluster.status("bad").get("observedGeneration") == 2 and cluster.status("bad")["phase"] == "Failed",
             60, "run bad Failed again", explain(cluster, "bad", op))
    wait_for(lambda: scrape(port).get("humpback_run_daemons") == 0, 30, "its daemon gone again", op.tail)
    # And a succeeded run's: an edit that changes what a stage does runs that stage again.
    cluster.patch_spec("good", {"seed": {"maxExamples": 48}})
    wait_for(lambda: scrape(port).get("humpback_run_daemons") == 1, 30, "the good run's daemon back", op.tail)
    wait_for(lambda: cluster.status("good").get("observedGeneration") == 2 and cluster.status("good")["phase"] == "Succeeded",
             120, "run good Succeeded again", explain(cluster, "good", op))
    assert cluster.stage("good", "prepare-seed")["phase"] == "Succeeded"
    wait_for(lambda: scrape(port).get("humpback_run_daemons") == 0, 30, "no daemon once it is done", op.tail)
    assert "is cancelled" not in op.log.read_text()  # each daemon left when told, none had to be cancelled
    # The emulator has no RBAC: what the operator asked of it (the safety net's lists included:
    # once a second here) must be what its rules allow on a cluster that has.
    assert requests_its_rbac_forbids(cluster) == []


RBAC = (REPO_ROOT / "manifests" / "rbac" / "role.yaml", REPO_ROOT / "manifests" / "rbac" / "cluster_role.yaml")


def requests_its_rbac_forbids(cluster) -> list[str]:
    """The operator's requests (Kopf's and its own) that its RBAC rules (the kustomize manifests,
    which tests/deploy checks against the chart) do not allow."""
    rules = [rule for path in RBAC for doc in yaml.safe_load_all(path.read_text())
             if doc["kind"] in ("ClusterRole", "Role") for rule in doc["rules"]]
    forbidden = set()
    for r in cluster.emulator.requests_since(0):
        if not r.user_agent.startswith(("kopf", USER_AGENT)) or not r.resource:  # discovery is for everyone
            continue
        parts = r.path.split("/")
        group = "" if parts[1] == "api" else parts[2]
        if not any(group in rule["apiGroups"] and r.resource in rule["resources"] and r.verb in rule["verbs"]
                   for rule in rules):
            forbidden.add(f"{r.verb} {group or 'core'}/{r.resource}")
    return sorted(forbidden)


UPGRADE = '''
"""A newer operator: the train stage's code version changed, so its fingerprint did."""
from humpback_runtime import plan

plan.STAGE_CODE_VERSIONS["train"] += 1
'''


def test_an_upgrade_that_changes_a_fingerprint_keeps_the_running_child(
        cluster, start_operator, make_standins, s3_bucket, s3_server, tmp_path, kube_env):
    from humpback_runtime import plan

    standins = make_standins(policy=stage_policy({("train-m0", 1): "hold", ("train-myx", 1): "hold"}))
    old = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server, retries={"limit": 1, "backoffSeconds": 0}))
    wait_for(lambda: all(cluster.stage("tiny", s).get("child", {}).get("kind") == "PyTorchJob"
                         for s in ("train-m0", "train-myx")), 60, "both training stages running", explain(cluster, "tiny", old))
    trains = {s: children_named(cluster, "tiny", "pytorchjobs", s)[0] for s in ("train-m0", "train-myx")}
    old_version = plan.fingerprint_version("train")
    new_version = old_version.replace(f"-code{plan.STAGE_CODE_VERSIONS['train']}-",
                                      f"-code{plan.STAGE_CODE_VERSIONS['train'] + 1}-")
    assert new_version != old_version
    old.stop()
    (tmp_path / "upgrade_shim.py").write_text(UPGRADE)
    new = start_operator(modules=("upgrade_shim",), PYTHONPATH=str(tmp_path))
    time.sleep(5)  # the new operator has reconciled the run by now (a daemon starts at once)
    for name, train in trains.items():
        survivors = [o for o in children_named(cluster, "tiny", "pytorchjobs", name) if not o["metadata"].get("deletionTimestamp")]
        assert [o["metadata"]["uid"] for o in survivors] == [train["metadata"]["uid"]], new.tail()
        stage = cluster.stage("tiny", name)
        # The running attempt keeps the fingerprint and the fingerprint version it started with.
        assert stage["phase"] == "Running" and stage["fingerprint"] == train["metadata"]["annotations"]["humpback.dev/fingerprint"]
        assert stage["fingerprintVersion"] == train["metadata"]["annotations"]["humpback.dev/fingerprint-version"] == old_version

    # One attempt succeeds, the other fails: the next attempt of each uses the new operator's version.
    standins.release(trains["train-m0"]["metadata"]["name"], "succeed")
    standins.release(trains["train-myx"]["metadata"]["name"], "fail")
    for name, train in trains.items():
        fresh = wait_for(lambda: [o for o in children_named(cluster, "tiny", "pytorchjobs", name)
                                  if o["metadata"]["uid"] != train["metadata"]["uid"]], 60,
                         f"a new attempt of {name}", explain(cluster, "tiny", new))[0]
        assert fresh["metadata"]["annotations"]["humpback.dev/fingerprint-version"] == new_version
        assert fresh["metadata"]["annotations"]["humpback.dev/fingerprint"] != train["metadata"]["annotations"]["humpback.dev/fingerprint"]
        wait_for(lambda: cluster.stage("tiny", name).get("child", {}).get("name") == fresh["metadata"]["name"], 30,
                 f"{name}'s new attempt in status", explain(cluster, "tiny", new))
        assert cluster.stage("tiny", name)["fingerprintVersion"] == new_version
    # The finished attempt's PyTorchJob stays for its logs.
    assert all(children_named(cluster, "tiny", "pytorchjobs", t["metadata"]["name"]) for t in trains.values())
