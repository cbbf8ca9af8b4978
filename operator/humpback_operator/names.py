"""Deterministic names and labels of a run's children.

Names are a pure function of run, stage fingerprint and attempt, so the operator can find its
children again after a restart and a second create is a 409, never a duplicate:

    <run>-<stage>-<fingerprint[:6]>-a<attempt>   the stage's Job, PyTorchJob or TrainJob
    <run>-<stage>-<fingerprint[:6]>-<model>      a vLLM Deployment and its Service (model: myx, m0, m1, ...)
    <run>-spec                                   the ConfigMap with the run's spec

Every name is at most 63 characters (Service names must be DNS-1035 labels, and Job names end up
in pod labels); a longer one is cut and ends with a hash of the full name, so it stays unique.
"""

from __future__ import annotations

import hashlib

from humpback_runtime.plan import Stage
from humpback_runtime.spec import BacktranslationRun

LABEL_RUN = "humpback.dev/run"
LABEL_STAGE = "humpback.dev/stage"
LABEL_COMPONENT = "humpback.dev/component"  # job, train, server, client (spec: the run's ConfigMap)
LABEL_ATTEMPT = "humpback.dev/attempt"
LABEL_MODEL = "humpback.dev/model"
ANNOTATION_FINGERPRINT = "humpback.dev/fingerprint"
# What computed that fingerprint (humpback_runtime.plan.fingerprint_version): kept by an attempt across upgrades.
ANNOTATION_FINGERPRINT_VERSION = "humpback.dev/fingerprint-version"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"  # Kueue's WorkloadPriorityClass of the workload
KUEUE_LABELS = (QUEUE_LABEL, PRIORITY_CLASS_LABEL)
MANAGED_BY = {"app.kubernetes.io/managed-by": "humpback-operator"}

MAX_NAME = 63
HASH_CHARS = 8
# Run names are DNS-1123 labels and may start with a digit; Service names may not.
DIGIT_PREFIX = "btr-"


def dns_name(*parts: str) -> str:
    """'-'.join(parts) as a DNS-1035 label of at most 63 characters (when parts are DNS-1123 labels).

    A name starting with a digit gets the prefix "btr-". A name longer than 63 characters is cut
    and ends with '-' and 8 hex characters of the SHA-256 of the full name.
    """
    name = "-".join(parts)
    if name[:1].isdigit():
        name = DIGIT_PREFIX + name
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    head = name[: MAX_NAME - HASH_CHARS - 1].rstrip("-")
    return f"{head}-{digest}"


def spec_configmap_name(run_name: str) -> str:
    return dns_name(run_name, "spec")


def stage_child_name(run_name: str, stage: Stage, attempt: int) -> str:
    """The Job / PyTorchJob of one attempt of a stage: a retry is a new object beside the failed one."""
    return dns_name(run_name, stage.name, stage.fingerprint[:6], f"a{attempt}")


def model_short(train_stage: str) -> str:
    """"train-myx" -> "myx", "train-m0" -> "m0"."""
    return train_stage.removeprefix("train-")


def server_name(run_name: str, stage: Stage, train_stage: str) -> str:
    """The vLLM Deployment and Service serving `train_stage`'s model to `stage`."""
    return dns_name(run_name, stage.name, stage.fingerprint[:6], model_short(train_stage))


def child_labels(run: BacktranslationRun, stage: str | None, component: str, **extra: str) -> dict[str, str]:
    """Labels of a child: run, stage (None for run-wide children), component, managed-by, plus
    `humpback.dev/<key>` for each extra (attempt, model). Of the run's own labels only Kueue's queue
    name and priority class are copied: other labels of the parent may mean something else on a Job
    or a Deployment."""
    labels = {LABEL_RUN: run.name}
    if stage is not None:
        labels[LABEL_STAGE] = stage
    labels[LABEL_COMPONENT] = component
    labels.update({f"humpback.dev/{key}": str(value) for key, value in extra.items()})
    labels.update(MANAGED_BY)
    for key in KUEUE_LABELS:
        if key in run.metadata.labels:
            labels[key] = run.metadata.labels[key]
    return labels


def object_meta(name: str, namespace: str, labels: dict[str, str], annotations: dict[str, str],
                owner: dict | None) -> dict:
    """metadata of a child; `owner` (an ownerReference to the run) is None before the run exists."""
    meta = {"name": name, "namespace": namespace, "labels": dict(labels), "annotations": dict(annotations)}
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    return meta


def pod_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels for a child's pod template: the child's, without Kueue's labels, which belong on
    the top-level object only (Kueue admits the Job/Deployment; a queue label on its pods could
    make Kueue's pod integration gate each pod on its own)."""
    return {k: v for k, v in labels.items() if k not in KUEUE_LABELS}
