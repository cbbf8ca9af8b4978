"""The operator as a user meets it: `kopf run -m humpback_operator.backtranslationrun` in its own process, against an
emulated Kubernetes API, with stand-ins for the training operator and the Job and Deployment
controllers, and artifacts in a moto S3 server.

Each test creates a BacktranslationRun through the API and watches status, children and Events,
exactly as `kubectl get btr -w` / `kubectl describe btr` would.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from humpback_testing.standins import stage_policy

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("kopf")

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "humpback.dev", "v1alpha1", "backtranslationruns"
NAMESPACE = "default"
KOPF = Path(sys.executable).parent / "kopf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", on_timeout=None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    details = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details}")


class OperatorProcess:
    def __init__(self, env: dict[str, str], log: Path, mode: str = "--standalone", modules: tuple[str, ...] = ()):
        self.port = free_port()
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [str(KOPF), "run", "-m", "humpback_operator.backtranslationrun", *(a for m in modules for a in ("-m", m)),
             mode, "--all-namespaces",
             f"--liveness=http://127.0.0.1:{self.port}/healthz"],
            env=env, cwd=REPO_ROOT, stdout=self._out, stderr=subprocess.STDOUT,
        )
        wait_for(self.healthy, 60, "the operator's liveness endpoint", on_timeout=self.tail)

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture
def start_operator(kube_env, s3_server, tmp_path) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(mode: str = "--standalone", log: str = "operator.log", modules: tuple[str, ...] = (),
              **extra_env: str) -> OperatorProcess:
        env = dict(kube_env, AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],
                   AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"], AWS_DEFAULT_REGION="us-east-1",
                   # The admin allows the probe to read the test buckets at moto's plain-http endpoint.
                   HUMPBACK_PROBE_ALLOWED_STORES=json.dumps([{"bucket": "test-*", "endpoint": s3_server}]),
                   **extra_env)
        op = OperatorProcess(env, tmp_path / log, mode, modules)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


class Cluster:
    """Reads and writes of the test, through the same API the operator uses."""

    def __init__(self, api_client, emulator):
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.emulator = emulator

    def create_run(self, doc: dict) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, doc)

    def run(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.run(name) or {}).get("status") or {}

    def stage(self, name: str, stage: str) -> dict:
        return next((s for s in self.status(name).get("stages") or [] if s["name"] == stage), {})

    def patch_spec(self, name: str, spec_patch: dict) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": spec_patch})

    def delete_run(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    RESOURCES = {"pytorchjobs": "kubeflow.org/v1/pytorchjobs", "jobs": "batch/v1/jobs",
                 "deployments": "apps/v1/deployments", "services": "v1/services", "configmaps": "v1/configmaps"}

    def children(self, run: str, resource: str) -> list[dict]:
        return self.emulator.list(self.RESOURCES[resource], NAMESPACE, label_selector=f"humpback.dev/run={run}")

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.core.list_namespaced_event(NAMESPACE).items
        return [(e.type, e.reason, e.message) for e in items if e.involved_object.name == name]

    def reasons(self, name: str) -> list[str]:
        return [r for _, r, _ in self.events(name)]

    def phase_is(self, name: str, phase: str) -> Callable[[], bool]:
        return lambda: self.status(name).get("phase") == phase


@pytest.fixture
def cluster(kube_api, kube_emulator) -> Cluster:
    return Cluster(kube_api, kube_emulator)


def tiny_run(bucket: str, s3_endpoint: str, name: str = "tiny", **spec) -> dict:
    """The demo's run, on S3, with vLLM servers for the inference stages (as on a GPU cluster)."""
    doc = yaml.safe_load((REPO_ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NAMESPACE}
    doc["spec"]["storage"] = {"uri": f"{bucket}/runs", "s3": {"endpoint": s3_endpoint}}
    for part in ("seed", "corpus"):  # the example's paths are relative to examples/; this file lives elsewhere
        doc["spec"][part]["source"] = str(REPO_ROOT / "examples" / doc["spec"][part]["source"])
    doc["spec"]["inference"]["engine"] = "auto"
    doc["spec"]["retries"] = {"limit": 2, "backoffSeconds": 1}
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def hold_client_job(stage: str):
    """Hold the stage's client Job (its vLLM server still becomes available)."""
    def policy(obj: dict) -> str:
        held = obj["kind"] == "Job" and obj["metadata"]["labels"].get("humpback.dev/stage") == stage
        return "hold" if held else "succeed"
    return policy


def explain(cluster: Cluster, name: str, op: OperatorProcess | None = None) -> Callable[[], str]:
    def text() -> str:
        status = cluster.status(name)
        out = yaml.safe_dump({"status": status}, sort_keys=False)[:4000]
        return out + ("\n--- operator log ---\n" + op.tail() if op else "")
    return text


def test_a_run_goes_through_the_whole_dag_for_two_iterations(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins()
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op))

    status = cluster.status("tiny")
    stages = {s["name"]: s for s in status["stages"]}
    assert set(stages) >= {"prepare-seed", "prepare-corpus", "train-myx", "train-m0", "augment",
                           "curate-1", "train-m1", "curate-2", "train-m2", "evaluate", "report"}
    assert all(s["phase"] == "Succeeded" and s["attempt"] == 1 for s in stages.values())
    assert status["progress"] == f"{len(stages)}/{len(stages)}"
    assert status["observedGeneration"] == 1
    assert cluster.run("tiny")["metadata"]["generation"] == 1  # the controller never wrote the spec
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True" and conditions["Failed"]["status"] == "False"
    assert all(c.get("lastTransitionTime") for c in conditions.values())

    trained = [n.split("-train-")[1].split("-")[0] for n in standins.seen["PyTorchJob"]]
    assert sorted(trained) == ["m0", "m1", "m2", "myx"]
    # train-myx and train-m0 ran side by side: both existed before either finished.
    history = standins.history
    first_done = min(i for i, (k, n, s) in enumerate(history) if k == "PyTorchJob" and s == "succeeded")
    started_before = {n for k, n, s in history[:first_done] if k == "PyTorchJob"}
    assert any("train-myx" in n for n in started_before) and any("train-m0" in n for n in started_before)
    # vLLM servers served augment, curate-k and evaluate (one per model), and are all gone now.
    assert len(standins.seen["Deployment"]) == 1 + 2 + 3
    assert cluster.children("tiny", "deployments") == [] and cluster.children("tiny", "services") == []
    # Events mirror the transitions.
    reasons = cluster.reasons("tiny")
    assert reasons.count("StageSucceeded") == len(stages)
    assert "Accepted" in reasons and "Succeeded" in reasons
    # Children carry the run's labels and an ownerReference to it.
    uid = cluster.run("tiny")["metadata"]["uid"]
    for job in cluster.children("tiny", "jobs"):
        assert job["metadata"]["ownerReferences"][0]["uid"] == uid
        assert job["metadata"]["labels"]["humpback.dev/stage"]


def test_a_failed_attempt_is_retried_as_a_new_child(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins(policy=stage_policy({("train-m0", 1): "fail"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server, retries={"limit": 2, "backoffSeconds": 3}))
    # The backoff is in status (the API server keeps it: it is in the CRD's schema), and it holds.
    retry_at = wait_for(lambda: cluster.stage("tiny", "train-m0").get("nextAttemptTime"), 60, "a scheduled retry",
                        explain(cluster, "tiny", op))
    assert cluster.stage("tiny", "train-m0")["attempt"] == 2
    assert not [n for n in standins.seen["PyTorchJob"] if "-train-m0-" in n and n.endswith("-a2")]
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op))
    a2 = cluster.emulator.get("kubeflow.org/v1/pytorchjobs", [n for n in standins.seen["PyTorchJob"] if "-train-m0-" in n][-1])
    assert a2["metadata"]["creationTimestamp"] >= retry_at
    m0 = [n for n in standins.seen["PyTorchJob"] if "-train-m0-" in n]
    assert [n[-3:] for n in m0] == ["-a1", "-a2"]
    assert cluster.stage("tiny", "train-m0")["attempt"] == 2
    retrying = [m for _, r, m in cluster.events("tiny") if r == "StageRetrying"]
    assert retrying and "train-m0" in retrying[0]


def test_retries_exhausted_fail_the_run(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins(policy=stage_policy({"prepare-seed": "fail"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server, retries={"limit": 1, "backoffSeconds": 0}))
    wait_for(cluster.phase_is("tiny", "Failed"), 60, "phase Failed", explain(cluster, "tiny", op))
    status = cluster.status("tiny")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed"
    assert "prepare-seed" in failed["message"] and "attempt 2 of 2" in failed["message"]
    assert len([n for n in standins.seen["Job"] if "prepare-seed" in n]) == 2
    assert "StageFailed" in cluster.reasons("tiny")
    time.sleep(1)
    assert "PyTorchJob" not in standins.seen  # nothing after the failed stage started


def test_suspend_stops_running_children_and_resume_continues(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins(policy=stage_policy({"train-myx": "hold", "train-m0": "hold"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(lambda: len(cluster.children("tiny", "pytorchjobs")) == 2, 60, "two PyTorchJobs", explain(cluster, "tiny", op))

    cluster.patch_spec("tiny", {"suspend": True})
    wait_for(cluster.phase_is("tiny", "Suspended"), 30, "phase Suspended", explain(cluster, "tiny", op))
    wait_for(lambda: cluster.children("tiny", "pytorchjobs") == [], 30, "PyTorchJobs deleted")
    assert cluster.stage("tiny", "prepare-seed")["phase"] == "Succeeded"  # finished work kept
    assert cluster.stage("tiny", "train-m0")["phase"] == "Pending"
    suspended = next(c for c in cluster.status("tiny")["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "True"
    assert len(cluster.children("tiny", "jobs")) == 2  # prepare-* Jobs are finished, not deleted

    standins.release()
    cluster.patch_spec("tiny", {"suspend": False})
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op))
    assert "Suspended" in cluster.reasons("tiny") and "Resumed" in cluster.reasons("tiny")
    assert cluster.stage("tiny", "prepare-seed")["attempt"] == 1


def test_a_spec_edit_reruns_only_what_changed(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins(policy=hold_client_job("curate-1"))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(lambda: [j for j in cluster.children("tiny", "jobs") if j["metadata"]["labels"]["humpback.dev/stage"] == "curate-1"],
             90, "the curate-1 client Job", explain(cluster, "tiny", op))
    old = cluster.stage("tiny", "curate-1")
    kept = {s["name"]: s for s in cluster.status("tiny")["stages"] if s["phase"] == "Succeeded"}

    # A scoring setting: the threshold no longer re-scores (selection is made from the stored scores).
    cluster.patch_spec("tiny", {"curation": {"maxTokens": 16}})
    wait_for(lambda: cluster.stage("tiny", "curate-1").get("fingerprint") not in (None, old["fingerprint"]),
             30, "curate-1 re-planned", explain(cluster, "tiny", op))
    standins.release()
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op))
    status = cluster.status("tiny")
    assert status["observedGeneration"] == 2
    for name, before in kept.items():
        after = cluster.stage("tiny", name)
        assert (after["phase"], after["fingerprint"], after.get("startTime")) == \
            (before["phase"], before["fingerprint"], before.get("startTime")), name
    curate_jobs = [n for n in standins.seen["Job"] if "-curate-1-" in n]
    assert len(curate_jobs) == 2 and curate_jobs[0] != curate_jobs[1]  # replaced, new settings
    assert len([n for n in standins.seen["PyTorchJob"] if "-train-myx-" in n]) == 1
    cm = cluster.emulator.get("v1/configmaps", "tiny-spec", NAMESPACE)
    assert "maxTokens: 16" in cm["data"]["run.yaml"]  # pods of the new attempt read the new spec


def test_deleting_a_run_removes_its_children(cluster, start_operator, make_standins, s3_bucket, s3_server):
    make_standins(policy=stage_policy({"train-myx": "hold", "train-m0": "hold"}))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(lambda: len(cluster.children("tiny", "pytorchjobs")) == 2, 60, "two PyTorchJobs", explain(cluster, "tiny", op))
    cluster.delete_run("tiny")
    wait_for(lambda: cluster.run("tiny") is None, 30, "the run to be gone (finalizer removed)", explain(cluster, "tiny", op))
    for resource in ("pytorchjobs", "jobs", "configmaps"):
        wait_for(lambda: cluster.children("tiny", resource) == [], 10, f"{resource} deleted")


def test_an_operator_restart_mid_run_continues_without_duplicates(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins(policy=hold_client_job("augment"))
    op = start_operator()
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(lambda: [j for j in cluster.children("tiny", "jobs") if j["metadata"]["labels"]["humpback.dev/stage"] == "augment"],
             90, "the augment client Job", explain(cluster, "tiny", op))
    op.stop(signal.SIGKILL)  # no goodbye
    op2 = start_operator()
    time.sleep(2)
    standins.release()
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op2))
    for kind, names in standins.seen.items():
        assert len(names) == len(set(names)), kind
    stages = cluster.status("tiny")["stages"]
    assert all(s["attempt"] == 1 for s in stages)
    assert len([n for n in standins.seen["Job"] if "-augment-" in n]) == 1
    # No stage announced twice. (An Event still queued in the killed process may be lost:
    # Events are best effort, status is the record.)
    assert len(stages) - 1 <= cluster.reasons("tiny").count("StageStarted") <= len(stages)


def test_two_replicas_hand_over_without_duplicates_when_the_active_one_dies(cluster, kube_api, start_operator,
                                                                            make_standins, s3_bucket, s3_server):
    # The chart's peering CRDs; each replica creates the ClusterKopfPeering it needs at start-up.
    api = kubernetes.client.ApiextensionsV1Api(kube_api)
    for crd in yaml.safe_load_all((REPO_ROOT / "charts/humpback-operator/files/kopf-peering-crds.yaml").read_text()):
        api.create_custom_resource_definition(crd)
    standins = make_standins(policy=hold_client_job("augment"))
    peering = dict(HUMPBACK_PEERING_LIFETIME="10")
    active = start_operator("--peering=humpback", "active.log", HUMPBACK_PEERING_PRIORITY="200", **peering)
    standby = start_operator("--peering=humpback", "standby.log", HUMPBACK_PEERING_PRIORITY="100", **peering)
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(lambda: [j for j in cluster.children("tiny", "jobs") if j["metadata"]["labels"]["humpback.dev/stage"] == "augment"],
             90, "the augment client Job", explain(cluster, "tiny", active))
    # The standby starts paused and stays so while the active one keeps its peering record fresh.
    assert "Resuming operations" not in standby.log.read_text(errors="replace"), standby.tail()
    assert "Created" not in standby.log.read_text(errors="replace")
    active.stop(signal.SIGKILL)  # a lost node: no goodbye, its peering record expires
    standins.release()
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", standby))
    assert "Resuming operations" in standby.log.read_text(errors="replace")  # the standby took over...
    assert "Created" in standby.log.read_text(errors="replace")  # ...and did the rest
    for kind, names in standins.seen.items():
        assert len(names) == len(set(names)), kind
    stages = cluster.status("tiny")["stages"]
    assert all(s["phase"] == "Succeeded" and s["attempt"] == 1 for s in stages)
    assert "CreateFailed" not in cluster.reasons("tiny")


def test_an_invalid_run_is_refused_with_a_condition_and_an_event(cluster, start_operator, make_standins, s3_bucket, s3_server):
    standins = make_standins()
    op = start_operator()
    doc = tiny_run(s3_bucket, s3_server)
    doc["spec"]["storage"] = {"uri": "./runs"}  # valid for the CRD, useless on a cluster
    cluster.create_run(doc)
    wait_for(cluster.phase_is("tiny", "Failed"), 30, "phase Failed", explain(cluster, "tiny", op))
    accepted = next(c for c in cluster.status("tiny")["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "spec.storage.uri" in accepted["message"]
    wait_for(lambda: "InvalidSpec" in cluster.reasons("tiny"), 10, "the InvalidSpec Event")
    assert standins.seen == {} or not any(standins.seen.values())
    assert cluster.children("tiny", "jobs") == []


def test_a_run_referencing_an_unlabelled_secret_is_refused_by_the_policy(cluster, start_operator, make_standins,
                                                                          s3_bucket, s3_server):
    make_standins()
    label = "humpback.dev/usable-by-runs=true"
    op = start_operator(HUMPBACK_POLICY=json.dumps({"secretLabel": label}))
    cluster.core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "prod-db"}, "stringData": {"HF_TOKEN": "x"}})
    cluster.core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "hf", "labels": {"humpback.dev/usable-by-runs": "true"}},
                                                      "stringData": {"HF_TOKEN": "x"}})
    cluster.create_run(tiny_run(s3_bucket, s3_server, name="bad", huggingface={"tokenSecret": "prod-db"}))
    cluster.create_run(tiny_run(s3_bucket, s3_server, name="good", huggingface={"tokenSecret": "hf"}))
    wait_for(cluster.phase_is("bad", "Failed"), 30, "phase Failed", explain(cluster, "bad", op))
    accepted = next(c for c in cluster.status("bad")["conditions"] if c["type"] == "Accepted")
    assert accepted["reason"] == "PolicyViolation"
    assert f"policy.secretLabel: spec.huggingface.tokenSecret: Secret prod-db is not labelled {label}" in accepted["message"]
    assert cluster.children("bad", "jobs") == []
    # The labelled Secret passes: that run starts its first stages.
    wait_for(lambda: cluster.children("good", "jobs"), 30, "the good run's Jobs", explain(cluster, "good", op))


def test_the_operator_serves_prometheus_metrics_when_asked(cluster, start_operator, make_standins, s3_bucket, s3_server):
    make_standins()
    port = free_port()
    op = start_operator(HUMPBACK_METRICS_PORT=str(port))
    cluster.create_run(tiny_run(s3_bucket, s3_server))
    wait_for(cluster.phase_is("tiny", "Succeeded"), 120, "phase Succeeded", explain(cluster, "tiny", op))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values["humpback_reconciles_total"] > 0
    assert values['humpback_children_created_total{kind="PyTorchJob"}'] == 4
    assert values['humpback_runs{phase="Succeeded"}'] == 1
