"""Stand-ins for the controllers a real cluster runs and the emulator has not: the Kubeflow training
operator (PyTorchJob), the Job controller and the Deployment controller. They work through the
HTTP API like the real ones, polling from a background thread, and write the status the real
controllers write, so that the humpback operator sees what it would see on a cluster.

    with StandIns(kubeconfig, policy=stage_policy({"train-m0": "fail"})) as standins:
        ...                                           # the operator creates children
        wait_until(lambda: "Job" in standins.seen)
        assert standins.seen["PyTorchJob"] == ["run-train-m0-abc123-a1", ...]

What happens to a child is its outcome, from `policy(obj)` when the stand-in first sees it:

    "succeed"      runs, then Succeeded (PyTorchJob) / Complete (Job) / Available (Deployment)
    "fail"         runs, then Failed; a Deployment misses its progress deadline
    "hold"         runs (a Deployment: progressing, not available) until `release(name, outcome)`
    "never-ready"  never runs (pods pending); a Deployment misses its progress deadline
    "run"          kubelet mode: runs the container's command on this machine; its exit code
                   decides Succeeded/Complete (0) or Failed (anything else)

What a real cluster does to pods (each makes a Pod through the API, owned by the child, so the
emulator's admission applies: a PodSecurity level or a ResourceQuota that refuses it becomes a
FailedCreate Event on a Job, FailedCreatePod on a PyTorchJob, and a ReplicaFailure condition on a
Deployment, retried until the pod is admitted):

    "pending"      the pod stays Pending: PodScheduled False, Unschedulable, the scheduler's message
    "image-pull"   the pod's container waits in ImagePullBackOff
    "oom"          the container is OOMKilled; the Job / PyTorchJob fails
    "evict"        the pod is evicted (DisruptionTarget); a Job whose podFailurePolicy ignores
                   that makes a new pod, which succeeds; otherwise (PyTorchJob) the child fails
    "queued"       Kueue holds it: a Job is suspended (spec.suspend), a PyTorchJob too
                   (runPolicy.suspend, condition Suspended), a Deployment's pods wait behind a
                   scheduling gate while its progress deadline passes; `release(name, outcome)`
                   admits it

Deadlines as the real controllers keep them: a Job (`spec.activeDeadlineSeconds`) or PyTorchJob
(`spec.runPolicy.activeDeadlineSeconds`) still running that long after its `status.startTime` fails
(Job: reason DeadlineExceeded; PyTorchJob: "active longer than specified deadline"). Suspending
either resets its startTime (the Job controller and the training operator both document that), so
time spent queued never counts.

`StandIns(..., kubelet=True)` makes "run" the default outcome of Jobs and PyTorchJobs: the stand-in
kubelet (kubelet.py) runs them in `workdir` (default: the current directory); each child's output
goes to `log_dir/<kind>-<name>.log` (`standins.logs[name]`). Deployments (vLLM servers) are
never run, only marked available.

A cluster with the training operator serves its CRD: pass `PYTORCHJOB_CRD` to the emulator.

What they saw: `seen` (kind → names in the order first seen), `history` ((kind, name, state) in
order: created, running, succeeded, failed, progressing, available, never-ready, blocked,
deleted), `states()` (name → last state), `exit_codes`, `logs`, `errors` (should stay empty).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import kubernetes

from humpback_testing.kubelet import Kubelet, kill

Policy = Callable[[dict[str, Any]], str]
POD_OUTCOMES = ("pending", "image-pull", "oom", "evict", "queued")
OUTCOMES = ("succeed", "fail", "hold", "never-ready", "run", *POD_OUTCOMES)
UNSCHEDULABLE = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu. preemption: 0/12 nodes are available: " \
    "12 No preemption victims found for incoming pod."
KINDS: dict[str, tuple[str, str, str]] = {  # kind: (group, version, plural)
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "Job": ("batch", "v1", "jobs"),
    "Deployment": ("apps", "v1", "deployments"),
}
STAGE_LABEL = "humpback.dev/stage"
ATTEMPT_LABEL = "humpback.dev/attempt"
# Their User-Agent, so that request counts can leave the stand-ins' polling out
# (`Emulator.request_counts(exclude_user_agent=STANDINS_USER_AGENT)`).
STANDINS_USER_AGENT = "humpback-standins/0"

# The Kubeflow training operator's PyTorchJob, reduced to what the API server needs to serve it.
PYTORCHJOB_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "pytorchjobs.kubeflow.org"},
    "spec": {
        "group": "kubeflow.org",
        "names": {"kind": "PyTorchJob", "listKind": "PyTorchJobList", "plural": "pytorchjobs",
                  "singular": "pytorchjob"},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            "additionalPrinterColumns": [
                {"name": "State", "type": "string", "jsonPath": ".status.conditions[-1:].type"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
        }],
    },
}


def attempt_of(obj: Mapping[str, Any]) -> int | None:
    """The attempt of a child: its `humpback.dev/attempt` label, else its name's `-a<N>` suffix."""
    meta = obj.get("metadata") or {}
    label = (meta.get("labels") or {}).get(ATTEMPT_LABEL)
    if label is not None and str(label).isdigit():
        return int(label)
    match = re.search(r"-a(\d+)$", meta.get("name", ""))
    return int(match.group(1)) if match else None


def stage_policy(outcomes: Mapping[str | tuple[str, int], str], default: str = "succeed") -> Policy:
    """A policy by the `humpback.dev/stage` label: {"train-m0": "fail"} fails every attempt,
    {("train-m0", 1): "fail"} only the first; anything else gets `default`."""
    for outcome in [*outcomes.values(), default]:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")

    def policy(obj: dict[str, Any]) -> str:
        stage = ((obj.get("metadata") or {}).get("labels") or {}).get(STAGE_LABEL, "")
        return outcomes.get((stage, attempt_of(obj) or 0), outcomes.get(stage, default))

    return policy


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, message: str = "") -> Any:
    """Poll `condition()` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met in {timeout} s: {condition}")
        time.sleep(interval)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _set_condition(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str) -> list[dict[str, Any]]:
    """Conditions as the controllers keep them: one per type; lastTransitionTime moves on a change."""
    now, result, found = _now(), [], False
    for condition in conditions:
        if condition.get("type") == type_:
            found = True
            changed = condition.get("status") != status
            condition = {**condition, "status": status, "reason": reason, "message": message, "lastUpdateTime": now,
                         "lastTransitionTime": now if changed else condition.get("lastTransitionTime", now)}
        result.append(condition)
    if not found:
        result.append({"type": type_, "status": status, "reason": reason, "message": message,
                       "lastUpdateTime": now, "lastTransitionTime": now})
    return result


@dataclasses.dataclass(eq=False)
class _Child:
    kind: str
    namespace: str
    name: str
    uid: str
    outcome: str
    step: int = 0  # what was written: 0 nothing, 1 created/started, 2 running, 3 final
    next_at: float = 0.0
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    blocked: str = ""  # why the container cannot start yet (a missing ConfigMap, Secret or key)
    pod: str = ""  # the name of its Pod in the API (pod outcomes)


class StandIns:
    """The three stand-in controllers in one background thread; `stop()` joins it and ends the
    children's processes. Thread-safe to read: `seen`, `history`, `exit_codes`, `logs`, `errors`."""

    def __init__(
        self,
        kubeconfig: Path | str,
        *,
        policy: Policy | None = None,
        kubelet: bool = False,
        namespace: str | None = None,
        delay: float = 0.0,
        interval: float = 0.05,
        workdir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        env_overrides: Mapping[str, str] | None = None,
        log_dir: Path | str | None = None,
        concurrency: int = 2,
        entrypoint: tuple[str, ...] = ("humpback",),
        kinds: tuple[str, ...] = tuple(KINDS),
    ) -> None:
        self.kubelet = kubelet
        self.policy: Policy = policy or (lambda obj: "run" if kubelet and obj.get("kind") != "Deployment" else "succeed")
        self.namespace, self.delay, self.interval = namespace, delay, interval
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="humpback-standins-"))
        self.concurrency, self.kinds = concurrency, kinds
        self.seen: dict[str, list[str]] = {}  # kind: names in the order first seen
        self.history: list[tuple[str, str, str]] = []  # (kind, name, state) in order
        self.exit_codes: dict[str, int] = {}
        self.logs: dict[str, Path] = {}
        self.errors: list[str] = []
        self._children: dict[tuple[str, str, str, str], _Child] = {}
        self._releases: dict[str | None, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self._api.user_agent = STANDINS_USER_AGENT
        self._objects = kubernetes.client.CustomObjectsApi(self._api)
        self._core = kubernetes.client.CoreV1Api(self._api)
        self._kubelet = Kubelet(kubernetes.client.CoreV1Api(self._api), workdir=Path(workdir or os.getcwd()),
                                env=os.environ if env is None else env, env_overrides=env_overrides or {},
                                log_dir=self.log_dir, entrypoint=entrypoint)

    # --- control -------------------------------------------------------------------------------

    def __enter__(self) -> StandIns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StandIns:
        self._thread = threading.Thread(target=self._loop, name="standins", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        for child in list(self._children.values()):
            kill(child.process)
        self._api.close()

    def release(self, name: str | None = None, outcome: str | None = None) -> None:
        """End the hold of child `name` (once), or with no name of every child: those held now and
        those the policy would hold later. They go on to `outcome` (default: "run" in kubelet mode,
        else "succeed")."""
        outcome = outcome or ("run" if self.kubelet else "succeed")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            self._releases[name] = outcome

    def states(self, kind: str | None = None) -> dict[str, str]:
        """The last state each child reached, by name (created, running, succeeded, failed, …)."""
        with self._lock:
            return {name: state for k, name, state in self.history if kind in (None, k)}

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for kind in self.kinds:
                try:
                    self._reconcile(kind)
                except Exception as exc:  # noqa: BLE001 -- a stand-in never dies of one bad object
                    if not self._stop.is_set():
                        self._error(f"{kind}: {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def _reconcile(self, kind: str) -> None:
        group, version, plural = KINDS[kind]
        if self.namespace:
            items = self._objects.list_namespaced_custom_object(group, version, self.namespace, plural)["items"]
        else:
            items = self._objects.list_cluster_custom_object(group, version, plural)["items"]
        present = set()
        for obj in items:
            meta = obj["metadata"]
            key = (kind, meta["namespace"], meta["name"], meta["uid"])
            present.add(key)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._first_sight(kind, obj)
            if child.step < 3 and time.monotonic() >= child.next_at:
                self._advance(child, obj)
            elif kind == "Deployment" and child.step >= 1:
                self._observe_generation(child, obj)
        for key in [key for key in self._children if key[0] == kind and key not in present]:
            child = self._children.pop(key)
            kill(child.process)
            self._record(child, "deleted")

    def _first_sight(self, kind: str, obj: dict[str, Any]) -> _Child:
        meta = obj["metadata"]
        outcome = self.policy(obj)
        if outcome not in OUTCOMES:
            raise ValueError(f"policy returned {outcome!r} for {kind} {meta['name']}; expected one of {OUTCOMES}")
        if outcome == "run" and kind == "Deployment":
            outcome = "succeed"
        child = _Child(kind, meta["namespace"], meta["name"], meta["uid"], outcome)
        if _is_final(kind, obj.get("status") or {}):
            child.step = 3  # finished before this stand-in started (e.g. a restarted test fixture)
        with self._lock:
            self.seen.setdefault(kind, []).append(child.name)
        return child

    def _advance(self, child: _Child, obj: dict[str, Any]) -> None:
        admitted = False
        with self._lock:
            for key in (child.name, None):
                if child.outcome in ("hold", "queued") and key in self._releases:
                    released = self._releases[key] if key is None else self._releases.pop(key)
                    admitted = admitted or child.outcome == "queued"
                    child.outcome = released
        if admitted:
            self._admit(child, obj)
        if self._past_deadline(child, obj):
            return self._write(child, obj, "deadline-exceeded")
        if child.outcome in POD_OUTCOMES:
            return self._advance_pod(child, obj)
        if child.kind == "Deployment":
            return self._advance_deployment(child, obj)
        if child.step == 0:
            self._write(child, obj, "created")
            return self._schedule(child)
        if child.outcome == "never-ready":
            return
        waiting = child.outcome == "run" and child.process is None and child.exit_code is None
        if waiting and (self._running() >= self.concurrency or not self._start(child, obj)):
            return  # waits for a free slot (a pending pod) or for its ConfigMaps and Secrets
        if child.step == 1:
            self._write(child, obj, "running")
            return self._schedule(child)
        if child.outcome == "hold":
            return
        if child.outcome == "run" and child.exit_code is None:
            if child.process is None or child.process.poll() is None:
                return
            child.exit_code = child.process.returncode
            child.process = None
            with self._lock:
                self.exit_codes[child.name] = child.exit_code
        succeeded = child.outcome == "succeed" or (child.outcome == "run" and child.exit_code == 0)
        self._write(child, obj, "succeeded" if succeeded else "failed")

    def _past_deadline(self, child: _Child, obj: dict[str, Any]) -> bool:
        """A started Job or PyTorchJob active longer than its activeDeadlineSeconds (from startTime)."""
        spec = obj.get("spec") or {}
        deadline = (spec if child.kind == "Job" else spec.get("runPolicy") or {}).get("activeDeadlineSeconds")
        started = (obj.get("status") or {}).get("startTime")
        if child.kind == "Deployment" or child.step >= 3 or not deadline or not started:
            return False
        begun = datetime.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        return (datetime.datetime.now(datetime.UTC) - begun).total_seconds() > float(deadline)

    def _schedule(self, child: _Child) -> None:
        child.step += 1
        child.next_at = time.monotonic() + self.delay

    # --- statuses as the real controllers write them ----------------------------------------------

    def _write(self, child: _Child, obj: dict[str, Any], state: str) -> None:
        status = dict(obj.get("status") or {})
        conditions = list(status.get("conditions") or [])
        now, ref = _now(), f"{child.namespace}/{child.name}"
        if child.kind == "PyTorchJob":  # kubeflow/training-operator v1
            replicas = {"Master": {}}
            if state == "created":
                conditions = _set_condition(conditions, "Created", "True", "PyTorchJobCreated", f"PyTorchJob {ref} is created.")
            elif state == "running":
                status["startTime"] = now
                replicas = {"Master": {"active": 1}}
                conditions = _set_condition(conditions, "Running", "True", "PyTorchJobRunning", f"PyTorchJob {ref} is running.")
            elif state == "succeeded":
                replicas = {"Master": {"succeeded": 1}}
                status["completionTime"] = now
                conditions = _set_condition(conditions, "Running", "False", "PyTorchJobSucceeded", f"PyTorchJob {ref} successfully completed.")
                conditions = _set_condition(conditions, "Succeeded", "True", "PyTorchJobSucceeded", f"PyTorchJob {ref} successfully completed.")
            elif state == "deadline-exceeded":  # the training operator's PastActiveDeadline
                message = f"PyTorchJob {ref} has failed because it was active longer than specified deadline"
                conditions = _set_condition(conditions, "Running", "False", "PyTorchJobFailed", message)
                conditions = _set_condition(conditions, "Failed", "True", "PyTorchJobFailed", message)
            else:
                replicas = {"Master": {"failed": 1}}
                message = f"PyTorchJob {ref} has failed because 1 Master replica(s) failed."
                conditions = _set_condition(conditions, "Running", "False", "PyTorchJobFailed", message)
                conditions = _set_condition(conditions, "Failed", "True", "PyTorchJobFailed", message)
            status["replicaStatuses"] = replicas
        else:  # the Job controller (Kubernetes 1.31+: SuccessCriteriaMet/FailureTarget come first)
            status.setdefault("startTime", now)
            status.update(active=1, ready=0, terminating=0, uncountedTerminatedPods={})
            if state == "running":
                status["ready"] = 1
            elif state == "succeeded":
                status.update(active=0, ready=0, succeeded=1, completionTime=now)
                message = "Reached expected number of succeeded pods"
                conditions = _set_condition(conditions, "SuccessCriteriaMet", "True", "CompletionsReached", message)
                conditions = _set_condition(conditions, "Complete", "True", "CompletionsReached", message)
            elif state == "failed":
                status.update(active=0, ready=0, failed=1)
                message = "Job has reached the specified backoff limit"
                conditions = _set_condition(conditions, "FailureTarget", "True", "BackoffLimitExceeded", message)
                conditions = _set_condition(conditions, "Failed", "True", "BackoffLimitExceeded", message)
            elif state == "deadline-exceeded":
                status.update(active=0, ready=0, failed=1)
                message = "Job was active longer than specified deadline"
                conditions = _set_condition(conditions, "FailureTarget", "True", "DeadlineExceeded", message)
                conditions = _set_condition(conditions, "Failed", "True", "DeadlineExceeded", message)
        if conditions:
            status["conditions"] = [{k: v for k, v in c.items() if not (child.kind == "Job" and k == "lastUpdateTime")}
                                    for c in conditions]  # Job conditions carry lastProbeTime, not lastUpdateTime
        if child.kind == "Job":
            for condition in status.get("conditions", []):
                condition.setdefault("lastProbeTime", condition["lastTransitionTime"])
        self._patch_status(child, status, obj)
        if state in ("succeeded", "failed", "deadline-exceeded"):
            child.step = 3
        self._record(child, state)

    def _advance_deployment(self, child: _Child, obj: dict[str, Any]) -> None:
        spec, meta = obj.get("spec") or {}, obj["metadata"]
        replicas = int(spec.get("replicas", 1))
        status = dict(obj.get("status") or {})
        conditions = list(status.get("conditions") or [])
        name = f'ReplicaSet "{child.name}-{meta["uid"][:10]}"'
        if child.step == 0:
            conditions = _set_condition(conditions, "Progressing", "True", "ReplicaSetUpdated", f"{name} is progressing.")
            conditions = _set_condition(conditions, "Available", "False", "MinimumReplicasUnavailable",
                                        "Deployment does not have minimum availability.")
            status.update(observedGeneration=meta.get("generation", 1), replicas=replicas, updatedReplicas=replicas,
                          unavailableReplicas=replicas, conditions=conditions)
            self._patch_status(child, status, obj)
            self._record(child, "progressing")
            return self._schedule(child)
        if child.outcome == "hold":
            return
        if child.outcome in ("succeed", "run"):  # a server is never run here, only made available
            conditions = _set_condition(conditions, "Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            conditions = _set_condition(conditions, "Progressing", "True", "NewReplicaSetAvailable", f"{name} has successfully progressed.")
            status.update(readyReplicas=replicas, availableReplicas=replicas, unavailableReplicas=None, conditions=conditions)
            state = "available"
        else:  # fail, never-ready
            conditions = _set_condition(conditions, "Progressing", "False", "ProgressDeadlineExceeded", f"{name} has timed out progressing.")
            status["conditions"] = conditions
            state = "never-ready"
        self._patch_status(child, status, obj)
        child.step = 3
        self._record(child, state)

    # --- pods that fail to be created, scheduled, pulled or kept --------------------------------------

    def _advance_pod(self, child: _Child, obj: dict[str, Any]) -> None:
        if child.outcome == "queued":
            return self._queue(child, obj)
        if child.step == 0:
            if child.kind == "Deployment":
                self._advance_deployment(child, obj)  # progressing, not available
            else:
                self._write(child, obj, "created")
            child.step = 1
        if not child.pod and not self._make_pod(child, obj):
            return  # refused: a FailedCreate Event; tried again on the next poll
        outcome = child.outcome
        if outcome == "pending":
            self._pod_status(child, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}]})
            return self._settle(child, "unschedulable")
        if outcome == "image-pull":
            self._pod_status(child, {"phase": "Pending", "containerStatuses": [{"name": self._container(obj), "ready": False,
                                     "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {
                                     "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{self._image(obj)}"'}}}]})
            return self._settle(child, "image-pull-backoff")
        if outcome == "oom":
            self._pod_status(child, {"phase": "Failed", "containerStatuses": [{"name": self._container(obj), "ready": False,
                                     "restartCount": 0, "image": "x", "imageID": "", "state": {"terminated": {
                                     "reason": "OOMKilled", "exitCode": 137}}}]})
            self._record(child, "oom-killed")
            return self._write(child, obj, "failed") if child.kind != "Deployment" else self._settle(child, "oom-killed")
        if outcome == "evict":
            self._pod_status(child, {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True",
                                     "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]})
            self._record(child, "evicted")
            rules = ((obj.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
            ignored = any(r.get("action") == "Ignore" and any(c.get("type") == "DisruptionTarget"
                          for c in r.get("onPodConditions") or []) for r in rules)
            if child.kind == "Job" and ignored:  # not counted: a new pod, which runs to the end
                child.pod, child.outcome = "", "succeed"
                return self._write(child, obj, "running")
            return self._write(child, obj, "failed") if child.kind != "Deployment" else self._settle(child, "evicted")

    def _settle(self, child: _Child, state: str) -> None:
        child.step = 3  # stays like this until deleted
        self._record(child, state)

    def _queue(self, child: _Child, obj: dict[str, Any]) -> None:
        """Kueue holding a workload until `release`: suspended, or (a Deployment) gated pods."""
        if child.step:
            return
        if child.kind == "Deployment":
            self._advance_deployment(child, obj)  # progressing (step 1)
            if self._make_pod(child, obj):
                self._pod_status(child, {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                     "message": "Scheduling is blocked due to non-empty scheduling gates"}]})
            latest = self._objects.get_namespaced_custom_object(*KINDS["Deployment"][:2], child.namespace, "deployments", child.name)
            status = dict(latest.get("status") or {})
            status["conditions"] = _set_condition(list(status.get("conditions") or []), "Progressing", "False",
                                                  "ProgressDeadlineExceeded", "the Deployment has timed out progressing.")
            self._patch_status(child, status, latest)
        else:
            child.step = 1
            self._suspend(child, True)
            status = {k: v for k, v in (obj.get("status") or {}).items() if k != "startTime"}  # reset on suspend
            if child.kind == "PyTorchJob":
                status["conditions"] = _set_condition(list(status.get("conditions") or []), "Suspended", "True",
                                                      "PyTorchJobSuspended", f"PyTorchJob {child.name} is suspended.")
            self._patch_status(child, status, obj)
        self._record(child, "queued")

    def _admit(self, child: _Child, obj: dict[str, Any]) -> None:
        """Kueue admits a queued workload: unsuspended, or its pods' gates gone (a fresh start)."""
        if child.kind == "Deployment":
            if child.pod:
                self._core.delete_namespaced_pod(child.pod, child.namespace)
            child.pod = ""
        else:
            self._suspend(child, False)
            if child.kind == "PyTorchJob":
                status = dict(obj.get("status") or {})
                status["conditions"] = _set_condition(list(status.get("conditions") or []), "Suspended", "False",
                                                      "PyTorchJobResumed", f"PyTorchJob {child.name} is resumed.")
                self._patch_status(child, status, obj)
        child.step = 0
        self._record(child, "admitted")

    def _suspend(self, child: _Child, suspend: bool) -> None:
        group, version, plural = KINDS[child.kind]
        patch = {"spec": {"suspend": suspend}} if child.kind == "Job" else {"spec": {"runPolicy": {"suspend": suspend}}}
        self._objects.patch_namespaced_custom_object(group, version, child.namespace, plural, child.name, patch,
                                                     _content_type="application/merge-patch+json")

    def _template(self, obj: dict[str, Any]) -> dict[str, Any]:
        spec = obj["spec"]
        return spec["pytorchReplicaSpecs"]["Master"]["template"] if "pytorchReplicaSpecs" in spec else spec["template"]

    def _container(self, obj: dict[str, Any]) -> str:
        return self._template(obj)["spec"]["containers"][0]["name"]

    def _image(self, obj: dict[str, Any]) -> str:
        return self._template(obj)["spec"]["containers"][0].get("image", "")

    def _make_pod(self, child: _Child, obj: dict[str, Any]) -> bool:
        """Create the child's pod through the API as its controller would; False (and the
        controller's Warning) when admission refuses it."""
        template = self._template(obj)
        name = f"{child.name}-master-0" if child.kind == "PyTorchJob" else f"{child.name}-{secrets.token_hex(3)[:5]}"
        api_version = f"{KINDS[child.kind][0]}/{KINDS[child.kind][1]}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": child.namespace,
                            "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                            "ownerReferences": [{"apiVersion": api_version, "kind": child.kind, "name": child.name,
                                                 "uid": child.uid, "controller": True, "blockOwnerDeletion": True}]},
               "spec": template["spec"]}
        try:
            self._core.create_namespaced_pod(child.namespace, pod)
        except kubernetes.client.ApiException as exc:
            if exc.status != 403:
                raise
            message = "Error creating: " + (_message(exc.body) or str(exc.reason))
            if child.kind == "Deployment":  # the ReplicaSet's FailedCreate, copied into the Deployment's conditions
                latest = self._objects.get_namespaced_custom_object("apps", "v1", child.namespace, "deployments", child.name)
                status = dict(latest.get("status") or {})
                status["conditions"] = _set_condition(list(status.get("conditions") or []), "ReplicaFailure", "True",
                                                      "FailedCreate", message)
                self._patch_status(child, status, latest)
            elif child.blocked != message:
                self._core.create_namespaced_event(child.namespace, {
                    "metadata": {"generateName": f"{child.name}.", "namespace": child.namespace},
                    "involvedObject": {"apiVersion": api_version, "kind": child.kind, "name": child.name,
                                       "namespace": child.namespace, "uid": child.uid},
                    "type": "Warning", "reason": "FailedCreate" if child.kind == "Job" else "FailedCreatePod",
                    "message": message, "count": 1, "firstTimestamp": _now(), "lastTimestamp": _now(),
                    "source": {"component": "job-controller" if child.kind == "Job" else "pytorchjob-controller"}})
            if child.blocked != message:
                self._record(child, "failed-create")
            child.blocked = message
            return False
        child.pod, child.blocked = name, ""
        return True

    def _pod_status(self, child: _Child, status: dict[str, Any]) -> None:
        self._core.patch_namespaced_pod_status(child.pod, child.namespace, {"status": status})

    def _observe_generation(self, child: _Child, obj: dict[str, Any]) -> None:
        generation = obj["metadata"].get("generation", 1)
        if (obj.get("status") or {}).get("observedGeneration") != generation:
            self._patch_status(child, {**(obj.get("status") or {}), "observedGeneration": generation}, obj)

    def _patch_status(self, child: _Child, status: dict[str, Any], obj: dict[str, Any]) -> None:
        """Replace the status (as the controllers' status updates do) with a merge patch that also
        deletes what the new status leaves out."""
        group, version, plural = KINDS[child.kind]
        try:
            self._objects.patch_namespaced_custom_object_status(
                group, version, child.namespace, plural, child.name, {"status": _replacing(obj.get("status") or {}, status)},
                _content_type="application/merge-patch+json")
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: the next poll forgets it
                raise

    # --- the kubelet (kubelet.py runs the containers) ----------------------------------------------

    def _running(self) -> int:
        return sum(1 for child in self._children.values() if child.process is not None)

    def _start(self, child: _Child, obj: dict[str, Any]) -> bool:
        """Start the child's container here; False while it cannot."""
        try:
            child.process, log_path = self._kubelet.start(child.kind, child.namespace, child.name, child.uid, obj)
        except LookupError as exc:  # the kubelet's CreateContainerConfigError: the pod waits (and retries)
            if not child.blocked:
                self._error(f"{child.kind} {child.name}: {exc}")
                self._record(child, "blocked")
            child.blocked = str(exc)
            return False
        child.blocked = ""
        with self._lock:
            self.logs[child.name] = log_path
        return True

    def _record(self, child: _Child, state: str) -> None:
        with self._lock:
            self.history.append((child.kind, child.name, state))

    def _error(self, message: str) -> None:
        with self._lock:
            if message not in self.errors:
                self.errors.append(message)

def _replacing(old: Any, new: Any) -> Any:
    """A JSON merge patch that turns `old` into `new` (keys that `new` lacks become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {key: _replacing(old.get(key), value) for key, value in new.items() if value is not None}
    patch.update({key: None for key in old if new.get(key) is None})
    return patch


def _message(body: Any) -> str:
    try:
        import json

        return json.loads(body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return ""


def _is_final(kind: str, status: Mapping[str, Any]) -> bool:
    final = {"PyTorchJob": ("Succeeded", "Failed"), "Job": ("Complete", "Failed"), "Deployment": ()}[kind]
    return any(c.get("type") in final and c.get("status") == "True" for c in status.get("conditions") or [])



__all__ = ["ATTEMPT_LABEL", "KINDS", "OUTCOMES", "PYTORCHJOB_CRD", "STAGE_LABEL", "STANDINS_USER_AGENT", "Policy", "StandIns",
           "attempt_of", "stage_policy", "wait_until"]
