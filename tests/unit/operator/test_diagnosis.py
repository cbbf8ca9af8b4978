"""What a real cluster says about a stuck or failed attempt, read back by `diagnosis.diagnose`: the
statuses and Events below are as kube-scheduler, the kubelet, the Job, Deployment and training
operator controllers and Kueue write them."""

from __future__ import annotations

from humpback_operator.diagnosis import diagnose, is_queued, pod_problem

JOB = {"kind": "Job", "metadata": {"name": "r-prepare-seed-abc-a1"}, "spec": {}, "status": {}}


def pod(**status):
    return {"kind": "Pod", "metadata": {"name": "p"}, "status": status}


def waiting(reason, message=""):
    return pod(phase="Pending", containerStatuses=[{"name": "stage", "state": {"waiting": {"reason": reason, "message": message}}}])


def test_each_way_a_pod_fails_to_start_or_run_is_named():
    unschedulable = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                      "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."}])
    p = pod_problem(unschedulable)
    assert (p.reason, p.pending) == ("Unschedulable", True) and "12 Insufficient nvidia.com/gpu" in p.message
    p = pod_problem(waiting("ErrImagePull", 'failed to pull image "x:nope"'))
    assert (p.reason, p.pending) == ("ImagePullBackOff", True) and "x:nope" in p.message
    p = pod_problem(waiting("CrashLoopBackOff", "back-off 5m0s restarting failed container"))
    assert (p.reason, p.pending) == ("CrashLoopBackOff", False)
    oom = pod(phase="Running", containerStatuses=[{"name": "vllm", "state": {"running": {}},
                                                   "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}])
    assert pod_problem(oom).reason == "OOMKilled"
    evicted = pod(phase="Failed", conditions=[{"type": "DisruptionTarget", "status": "True",
                                               "reason": "PreemptionByScheduler", "message": "preempted"}])
    assert pod_problem(evicted).reason == "Disrupted"
    assert pod_problem(pod(phase="Running", conditions=[{"type": "Ready", "status": "True"}])) is None


def test_a_refused_create_is_read_from_the_childs_events_or_the_deployments_replica_failure():
    event = {"reason": "FailedCreate", "type": "Warning", "message": 'pods "p" is forbidden: violates PodSecurity "restricted:latest"'}
    p = diagnose(JOB, [], [event])
    assert (p.reason, p.pending) == ("FailedCreate", True) and "PodSecurity" in p.message
    deployment = {"kind": "Deployment", "spec": {}, "status": {"conditions": [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "exceeded quota: gpu"}]}}
    assert diagnose(deployment, [], []).message == "exceeded quota: gpu"


def test_kueue_holding_a_workload_is_queued_not_a_problem():
    assert is_queued({"spec": {"suspend": True}})
    assert is_queued({"spec": {"runPolicy": {"suspend": True}}})
    gated = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}])
    p = diagnose({"kind": "Deployment", "spec": {}}, [gated], [])
    assert (p.reason, p.pending) == ("Queued", False)
    assert diagnose(JOB, [], []) is None
