"""The training backend seam: which custom resource runs a training stage, and how to read its outcome.

children.py builds one pod template (image, torchrun command, env, resources, volumes, node
selection, security context); a backend wraps it into its kind and reads completion back.

- `PyTorchJobBackend`: Kubeflow training operator v1, `kubeflow.org/v1` `PyTorchJob`. The default,
  as training-operator v1 is what most clusters run.
- `TrainJobBackend`: Kubeflow Trainer v2.2+, `trainer.kubeflow.org/v1alpha1` `TrainJob` against the
  `torch-distributed` ClusterTrainingRuntime, our pod template carried by `runtimePatches`.

The operator's default is `HUMPBACK_TRAINING_BACKEND` (the chart's `training.backend`); a run may
choose its own with `spec.trainingBackend`. `backend_of(kind)` reads any child back.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Protocol

from humpback_operator.names import object_meta, pod_labels


class TrainingBackend(Protocol):
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str: ...

    def build(self, *, name: str, namespace: str, labels: dict, annotations: dict, owner: dict | None,
              pod_template: dict, nodes: int, procs_per_node: int, active_deadline_seconds: int | None = None) -> dict:
        """The training object: `nodes` pods of `pod_template` (its first container trains), each
        running `procs_per_node` processes, failed after `active_deadline_seconds` (None: never)."""
        ...

    def outcome(self, obj: Mapping) -> tuple[str | None, str]:
        """("Succeeded" | "Failed" | None while running, message) from the object's conditions."""
        ...


def conditions_outcome(obj: Mapping, succeeded: Iterable[str], failed: Iterable[str]) -> tuple[str | None, str]:
    """Outcome from status.conditions: any condition of a `failed` type with status "True" means
    Failed, else any of a `succeeded` type means Succeeded. Every condition counts, never only the
    last: controllers append conditions, and the terminal one need not come last."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    true = [c for c in conditions if c.get("status") == "True"]
    for phase, types in (("Failed", set(failed)), ("Succeeded", set(succeeded))):
        for c in true:
            if c.get("type") in types:
                text = ": ".join(p for p in (c.get("reason"), c.get("message")) if p)
                return phase, text or c["type"]
    return None, ""


class _Backend:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def _object(self, name: str, namespace: str, labels: dict, annotations: dict, owner: dict | None,
                spec: dict) -> dict:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": object_meta(name, namespace, labels, annotations, owner),
            "spec": spec,
        }


class PyTorchJobBackend(_Backend):
    group, version, plural, kind = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
    CONTAINER = "pytorch"  # the training operator finds the trainer container (and its port) by this name

    def build(self, *, name: str, namespace: str, labels: dict, annotations: dict, owner: dict | None,
              pod_template: dict, nodes: int, procs_per_node: int, active_deadline_seconds: int | None = None) -> dict:
        def replicas(n: int) -> dict:
            template = copy.deepcopy(pod_template)
            template["spec"]["containers"][0]["name"] = self.CONTAINER
            # Never: a failed pod fails the PyTorchJob at once, and the operator
            # retries the stage as a new PyTorchJob that resumes from the last checkpoint in the
            # store, with its own pods and logs. ExitCode (restart in place on retryable exit codes)
            # would be the alternative, but it hides failures inside one attempt.
            return {"replicas": n, "restartPolicy": "Never", "template": template}

        specs = {"Master": replicas(1)}
        if nodes > 1:
            specs["Worker"] = replicas(nodes - 1)
        # cleanPodPolicy None keeps the pods of a finished attempt for `kubectl logs`; the run's
        # deletion removes them with the PyTorchJob. No backoffLimit: on training-operator v1.8 and
        # v1.9.0-v1.9.3, exceeding it (backoffLimit 0: any failed pod) deletes every pod BEFORE the
        # Failed condition is set, and DeletePodsAndServices honours cleanPodPolicy only for a
        # finished job (common/job.go ReconcileJobs; kubeflow/trainer#3419, fixed in v1.9.4). Without
        # it, a failed pod under restartPolicy Never fails the job in UpdateJobStatus ("failed
        # because 1 Master replica(s) failed") and the cleanup that follows keeps the pods.
        # activeDeadlineSeconds still takes the first path on those versions: a timed-out
        # attempt's pods go (they were stopped anyway).
        run_policy: dict = {"cleanPodPolicy": "None"}
        if active_deadline_seconds:
            run_policy["activeDeadlineSeconds"] = active_deadline_seconds
        spec = {
            # torchrun also reads it as PET_NPROC_PER_NODE; the CRD types it as a string.
            "nprocPerNode": str(procs_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": specs,
        }
        return self._object(name, namespace, labels, annotations, owner, spec)

    def outcome(self, obj: Mapping) -> tuple[str | None, str]:
        return conditions_outcome(obj, succeeded=("Succeeded",), failed=("Failed",))


class TrainJobBackend(_Backend):
    """Kubeflow Trainer v2.2+ (validated against the v2.3.0 CRD): a TrainJob on the
    `torch-distributed` ClusterTrainingRuntime, with our pod template carried by `runtimePatches`
    (labels, annotations, pod and container security contexts, volumes and their mounts, node
    selection, service account, image pull secrets). What runtimePatches cannot carry comes from
    the runtime: automountServiceAccountToken and envFrom (docs/security.md)."""

    group, version, plural, kind = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
    RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for torchrun
    TARGET_JOB = "node"  # the runtime's replicated Job and its trainer container are both named node
    MANAGER = "humpback.dev/operator"  # our entry in runtimePatches (keyed by manager)

    def build(self, *, name: str, namespace: str, labels: dict, annotations: dict, owner: dict | None,
              pod_template: dict, nodes: int, procs_per_node: int, active_deadline_seconds: int | None = None) -> dict:
        pod = copy.deepcopy(pod_template["spec"])
        meta = copy.deepcopy(pod_template.get("metadata") or {})
        container = pod["containers"][0]
        trainer = {
            "image": container["image"],
            "command": container["command"],
            "env": container.get("env", []),
            "numNodes": nodes,
            "numProcPerNode": procs_per_node,
        }
        if container.get("resources"):
            trainer["resourcesPerNode"] = container["resources"]
        patched = {"name": self.TARGET_JOB}
        for key in ("securityContext", "volumeMounts"):
            if container.get(key):
                patched[key] = container[key]
        pod_patch: dict = {"containers": [patched]}
        for key in ("securityContext", "serviceAccountName", "imagePullSecrets", "nodeSelector", "tolerations", "volumes"):
            if pod.get(key):
                pod_patch[key] = pod[key]
        spec = {
            "runtimeRef": {"name": self.RUNTIME},
            "trainer": trainer,
            "runtimePatches": [{
                "manager": self.MANAGER,
                "trainingRuntimeSpec": {"template": {
                    "metadata": {"labels": pod_labels(labels)},  # the JobSet
                    "spec": {"replicatedJobs": [{
                        "name": self.TARGET_JOB,
                        "template": {
                            "metadata": {"labels": pod_labels(labels)},  # its Jobs
                            "spec": {"template": {"metadata": meta, "spec": pod_patch}},  # their pods
                        },
                    }]},
                }},
            }],
        }
        return self._object(name, namespace, labels, annotations, owner, spec)

    def outcome(self, obj: Mapping) -> tuple[str | None, str]:
        return conditions_outcome(obj, succeeded=("Complete",), failed=("Failed",))


BACKENDS: dict[str, type[_Backend]] = {"pytorchjob": PyTorchJobBackend, "trainjob": TrainJobBackend}


def backend_of_kind(kind: str) -> TrainingBackend | None:
    """The backend whose objects are of `kind` (None: not a training kind)."""
    return next((cls() for cls in BACKENDS.values() if cls.kind == kind), None)


def get_backend(name: str) -> TrainingBackend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown training backend {name!r}: expected one of {', '.join(BACKENDS)}") from None
