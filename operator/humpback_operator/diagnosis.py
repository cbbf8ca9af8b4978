"""Why an attempt is not moving, or why it failed: read from its pods, its Events and its own status.

Pure (no API calls): `reconcile.decide` asks `diagnose()` about the child of a running attempt and
its pods (the operator indexes Pods and Warning Events of its children: `child_events.py`) and
puts the answer into the stage's status, the run's message and an Event.

What a real cluster says, and where:

- Unschedulable: the pod's PodScheduled condition (reason Unschedulable, the scheduler's message
  "0/12 nodes are available: 12 Insufficient nvidia.com/gpu.").
- ImagePullBackOff / ErrImagePull / CreateContainerConfigError / CrashLoopBackOff: a container's
  `state.waiting.reason` and message.
- OOMKilled: a container's `state.terminated.reason` (or `lastState`, after a restart).
- FailedCreate: a Warning Event on the Job (the Job controller: quota, PodSecurity admission),
  `FailedCreatePod` on a PyTorchJob (the training operator), and on a Deployment the
  ReplicaFailure condition the Deployment controller copies from its ReplicaSet.
- Disrupted: the pod condition DisruptionTarget (eviction, preemption, node drain or loss).
- InputsDamaged: a container terminated with the runtime's exit code 6, or with a termination
  message starting "InputsDamaged:" (what a training pod says: torchrun exits 1 whatever the
  worker's code): an input differs from its producer's manifest, which the pod withdrew; the
  producer must run again, then the stage.
- Queued: Kueue holds a workload by suspending its Job (spec.suspend) or PyTorchJob
  (runPolicy.suspend, condition Suspended), or by a scheduling gate on its pods; that is waiting
  in line, not a problem, and does not count against pendingTimeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from humpback_runtime.errors import EXIT_INPUTS_DAMAGED, InputsDamaged

INPUTS_DAMAGED = InputsDamaged.__name__

# What keeps a pod from starting: counted against the stage kind's pendingTimeout.
PENDING_REASONS = ("Unschedulable", "FailedCreate", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                   "CreateContainerConfigError", "CreateContainerError")
WAITING_REASONS = (*PENDING_REASONS[2:], "CrashLoopBackOff")
FAILED_CREATE_EVENTS = ("FailedCreate", "FailedCreatePod")


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, as in the stage status: Unschedulable, OOMKilled, Disrupted, Queued, ...
    message: str
    pending: bool = False  # the pods cannot start: counts against pendingTimeout

    def text(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def is_queued(child: Mapping[str, Any], pods: Iterable[Mapping[str, Any]] = ()) -> bool:
    """Held by a queue (Kueue): a suspended Job or PyTorchJob, or pods behind a scheduling gate."""
    spec = child.get("spec") or {}
    if spec.get("suspend") is True or (spec.get("runPolicy") or {}).get("suspend") is True:
        return True
    if _conditions(child).get("Suspended", {}).get("status") == "True":
        return True
    return any(_conditions(p).get("PodScheduled", {}).get("reason") == "SchedulingGated" for p in pods)


def pod_problem(pod: Mapping[str, Any]) -> Problem | None:
    """The first thing wrong with one pod, if any."""
    name = pod.get("metadata", {}).get("name", "")
    conditions = _conditions(pod)
    disruption = conditions.get("DisruptionTarget")
    if disruption and disruption.get("status") == "True":
        return Problem("Disrupted", f"pod {name}: {disruption.get('reason', '')}: {disruption.get('message', '')}".rstrip(": "))
    status = pod.get("status") or {}
    for c in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        for state_key in ("state", "lastState"):
            terminated = (c.get(state_key) or {}).get("terminated") or {}
            said = terminated.get("message") or ""
            if terminated.get("exitCode") == EXIT_INPUTS_DAMAGED or said.startswith(f"{INPUTS_DAMAGED}:"):
                said = said.removeprefix(f"{INPUTS_DAMAGED}:").strip()
                return Problem(INPUTS_DAMAGED, f"pod {name}: " + (said or "an input differs from its producer's "
                               "manifest, which was withdrawn"))
            if terminated.get("reason") == "OOMKilled":
                return Problem("OOMKilled", f"container {c.get('name')} of pod {name} ran out of memory "
                               f"(exit code {terminated.get('exitCode', 137)}): raise the stage's memory")
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_REASONS:
            reason = "ImagePullBackOff" if waiting["reason"] == "ErrImagePull" else waiting["reason"]
            return Problem(reason, f"pod {name}: {waiting.get('message') or waiting['reason']}",
                           pending=reason in PENDING_REASONS)
    scheduled = conditions.get("PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return Problem("Unschedulable", f"pod {name}: {scheduled.get('message', '')}".rstrip(": "), pending=True)
    return None


def diagnose(child: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
             events: Iterable[Mapping[str, Any]]) -> Problem | None:
    """What is wrong with a running attempt (its child, the child's pods, Warning Events on the
    child), most telling first: a disruption or OOM kill over a pending pod; None if nothing is."""
    pods = list(pods)
    problems = [p for p in (pod_problem(pod) for pod in pods) if p is not None]
    for wanted in ("InputsDamaged", "Disrupted", "OOMKilled", "CrashLoopBackOff"):
        for problem in problems:
            if problem.reason == wanted:
                return problem
    if is_queued(child, pods):
        return Problem("Queued", "suspended or gated by the queue (Kueue) until admitted")
    replica_failure = _conditions(child).get("ReplicaFailure")  # a Deployment's ReplicaSet could not create pods
    if replica_failure and replica_failure.get("status") == "True":
        return Problem("FailedCreate", replica_failure.get("message", ""), pending=True)
    failed_create = [e for e in events if e.get("reason") in FAILED_CREATE_EVENTS]
    if failed_create and not pods:
        latest = max(failed_create, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return Problem("FailedCreate", latest.get("message") or latest.get("note") or "", pending=True)
    return problems[0] if problems else None


def pod_is_disrupted(pods: Iterable[Mapping[str, Any]]) -> bool:
    return any((pod_problem(p) or Problem("", "")).reason == "Disrupted" for p in pods)
