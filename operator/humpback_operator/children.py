"""Pure builders of a run's Kubernetes children: spec + plan + stage -> manifest dicts.

No I/O and no API calls: the reconciler decides when to create what, and `humpback render`
prints the same objects for review:

    humpback render examples/llama2-7b-paper.yaml

Per stage (see operator/README.md): a `Job` for cpu stages and in-process inference, a training
object of the configured backend (PyTorchJob) for train stages, and for inference stages served
by the operator one vLLM `Deployment` + `Service` per model plus a client `Job`. Every runtime
container runs `humpback stage STAGE --spec env:HUMPBACK_RUN_SPEC` with the spec from the
ConfigMap `<run>-spec`; credentials are only ever Secret references.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from humpback_operator.backends import BACKENDS, conditions_outcome, get_backend
from humpback_operator.config import OperatorConfig
from humpback_operator.names import (
    ANNOTATION_FINGERPRINT,
    ANNOTATION_FINGERPRINT_VERSION,
    LABEL_COMPONENT,
    LABEL_MODEL,
    LABEL_RUN,
    LABEL_STAGE,
    child_labels,
    model_short,
    object_meta,
    pod_labels,
    server_name,
    spec_configmap_name,
    stage_child_name,
)
from humpback_runtime.layout import stage_prefix
from humpback_runtime.plan import Plan, Stage, build_plan
from humpback_runtime.pod_contract import (
    API_KEY_SECRET_KEY,
    ENDPOINT_ENV,
    ENDPOINTS_ENV,
    JUDGE_API_KEY_ENV,
    MLFLOW_CREDENTIAL_ENVS,
    MODEL_DIR,
    REWRITE_API_KEY_ENV,
    SERVED_MODEL_ENV,
    WORK_DIR_ENV,
    server_api_key_env,
    STAGE_METRICS_PORT_ENV,
    WANDB_API_KEY_ENV,
)
from humpback_runtime.errors import EXIT_INPUTS_MISSING, EXIT_INVALID
from humpback_runtime.spec import (
    BacktranslationRun,
    CheckpointVolume,
    InferenceResources,
    PodResources,
    TrainingResources,
    duration_seconds,
    dump_run,
)

ENV_RUN_SPEC = "HUMPBACK_RUN_SPEC"
SPEC_KEY = "run.yaml"

CACHE_DIR = "/cache"  # HUMPBACK_CACHE: models downloaded from S3 for in-process engines
CHECKPOINT_DIR = "/checkpoints"  # HUMPBACK_WORK_DIR of a training pod with a checkpoint volume
IN_PROCESS_ENGINES = ("transformers", "vllm")
VLLM_API_KEY_ENV = "VLLM_API_KEY"
ANNOTATION_GENERATED_KEY = "humpback.dev/generated-key"  # on a Secret: the operator fills this key at creation
# The children that run a stage's pods (a vLLM server's Deployment, a Job, a training kind): made
# after what they refer to, and their controller writes their status.
WORKLOAD_KINDS = ("Deployment", "Job", *(backend.kind for backend in BACKENDS.values()))
HF_TOKEN_ENV = "HF_TOKEN"  # also the key in spec.huggingface.tokenSecret and spec.publish.hub.tokenSecret
S3_COMPATIBLE_REGION = "us-east-1"  # signing region of an S3-compatible endpoint that names none

POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# vLLM loads a 7B model from S3 in minutes, but a cold node first pulls a large image: allow
# 30 minutes (period 10 s x 180) before the kubelet gives up on the startup probe.
STARTUP_PROBE = {"periodSeconds": 10, "failureThreshold": 180}
READINESS_PROBE = {"periodSeconds": 10, "failureThreshold": 3}
# Lenient: a server busy with a full batch may answer /health slowly, and a restart loses the KV cache.
LIVENESS_PROBE = {"periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5}
SERVER_PROGRESS_DEADLINE_S = 3600

# Requests and limits when the spec leaves them out: sized from the GPUs a pod asks for, so that a
# GPU pod is never BestEffort (evicted first, refused by memory quotas). An 8-GPU A100 node has
# 96-256 cores and 1-2 TiB of memory; 8 cores and 96Gi per GPU fit either.
CPU_PER_GPU = 8
MEMORY_GI_PER_GPU = 96
CPU_ONLY = ("2", "8Gi")
# /dev/shm (memory-backed, so it counts against the memory limit): NCCL, DeepSpeed's and vLLM's workers.
SHM_GI_PER_GPU = 16
# Ephemeral storage (request, limit, and the /cache volume's sizeLimit) by what a pod keeps on disk.
EPHEMERAL_TRAINING = "200Gi"  # the base model and local checkpoints: a 7B ZeRO-2 checkpoint is ~100 GB
EPHEMERAL_GPU = "50Gi"  # an in-process engine's model download; training's base model beside a checkpoint volume
EPHEMERAL_SERVER = "20Gi"  # vLLM streams the weights from S3; compile caches and logs only
EPHEMERAL_CPU = "10Gi"
EPHEMERAL_PUBLISH = "50Gi"  # the publish Job holds one model's upload folder: a 7B bf16 model is ~14 GB

# Job podFailurePolicy: a disrupted pod (drain, preemption, spot loss: the DisruptionTarget
# condition) does not count against backoffLimit, the Job makes a new pod; a pod that exits with
# the runtime's bad-input codes fails the Job at once (reason PodFailurePolicy), and the operator
# does not retry such a stage (reconcile.py): the same input fails the same way.
PERMANENT_EXIT_CODES = (EXIT_INVALID, EXIT_INPUTS_MISSING)


def owner_reference(body: Mapping) -> dict:
    """A controller ownerReference to the live run `body`: its children go when it goes."""
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def training_backend(run: BacktranslationRun, config: OperatorConfig) -> str:
    """The run's own `spec.trainingBackend`, else the operator's default."""
    return run.spec.training_backend or config.training_backend


def cluster_problems(run: BacktranslationRun, config: OperatorConfig | None = None) -> list[str]:
    """What makes a valid spec unrunnable on a cluster, one "field.path: message" each.

    Local paths in sources and baseModel are not problems: users may bake data into their images.
    """
    problems = []
    if config is not None and training_backend(run, config) == "trainjob" and not config.trainjobs:
        problems.append("spec.trainingBackend: trainjob (Kubeflow Trainer v2) is not enabled on this cluster "
                        "(the chart's rbac.trainJobs)")
    uri = run.spec.storage.uri
    if not uri.startswith("s3://"):
        problems.append(f"spec.storage.uri: a cluster run needs s3:// storage (pods share nothing else), got {uri}")
    mlflow = run.spec.tracking.mlflow
    if mlflow is not None and not mlflow.remote:
        problems.append(f"spec.tracking.mlflow.trackingUri: a cluster run needs an MLflow server (http(s)://, "
                        f"databricks); the file store {mlflow.tracking_uri} would stay in a pod and be lost")
    return problems


def shared_claims(run: BacktranslationRun) -> list[str]:
    """Existing claims the run's training pods mount on more than one node (a `checkpointVolume`'s
    `claimName` with `nodes` > 1): each must be ReadWriteMany, which only the claim itself says."""
    res = run.spec.resources.training
    volume = res.checkpoint_volume
    return [volume.claim_name] if volume is not None and volume.claim_name and res.nodes > 1 else []


def claim_problems(run: BacktranslationRun, access_modes: Mapping[str, list[str] | None]) -> list[str]:
    """`shared_claims` whose access modes (read by the caller; None: no such claim) do not let
    several nodes mount them. On a cluster, the pods of the second node would wait for good
    (Multi-Attach error) while the first trains. A claim not there yet is no problem here: the
    pods wait for it, Unschedulable, and the stage says so."""
    problems = []
    for name in shared_claims(run):
        modes = access_modes.get(name)
        if modes is not None and "ReadWriteMany" not in modes:
            problems.append(f"spec.resources.training.checkpointVolume.claimName: PersistentVolumeClaim {name} is "
                            f"{', '.join(modes) or 'without access modes'}, but the pods of nodes: "
                            f"{run.spec.resources.training.nodes} mount it on as many nodes: it must be ReadWriteMany")
    return problems


def build_spec_configmap(run: BacktranslationRun, owner: dict | None) -> dict:
    """ConfigMap `<run>-spec` with the run's spec (defaults filled in) under key run.yaml.

    metadata is reduced to name and namespace: the live object's labels and annotations (Kopf's
    among them) change without changing what a stage does. The fingerprint annotation is a hash
    of the content, so a stale ConfigMap is easy to tell.
    """
    text = spec_yaml(run)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(spec_configmap_name(run.name), run.namespace, child_labels(run, None, "spec"),
                                {ANNOTATION_FINGERPRINT: content_digest(text)}, owner),
        "data": {SPEC_KEY: text},
    }


def spec_yaml(run: BacktranslationRun) -> str:
    """What the spec ConfigMap holds under SPEC_KEY."""
    data = dump_run(run)
    data["metadata"] = {"name": run.name, "namespace": run.namespace}
    # Top-level entries dumped one by one read the same as the whole (block style): runs started
    # from one file share their spec's YAML, and dumping it was the costly part of starting a run.
    return "".join(_yaml_entry(json.dumps({key: value})) for key, value in data.items())


def content_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_digests(configmap: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap's data as a digest per key: what the operator's index keeps of it
    (`child_events.snapshot`: a run's spec is ~8 KB, ~8 MB at 1,000 runs), and what the
    reconciler compares with the data it wants."""
    if "dataDigests" in configmap:
        return configmap["dataDigests"]
    return {key: content_digest(value) for key, value in (configmap.get("data") or {}).items()}


@functools.lru_cache(maxsize=256)
def _yaml_entry(entry_json: str) -> str:
    """A one-key mapping as YAML, from its JSON (dump_run's dict is plain JSON); libyaml if present."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(json.loads(entry_json), Dumper=dumper, sort_keys=False, allow_unicode=True)


def served_models(run: BacktranslationRun, stage: Stage) -> list[str]:
    """Training stages whose models the operator must serve with vLLM while `stage` runs."""
    inference = run.spec.inference
    if stage.kind != "inference" or inference.engine in IN_PROCESS_ENGINES or inference.endpoint:
        return []
    if stage.family == "evaluate":
        return list(stage.deps)  # every model M0..Mk, each on its own server
    return [stage.serves] if stage.serves else []  # None: rewrite with an external endpoint


def _runs_in_process(run: BacktranslationRun, stage: Stage) -> bool:
    """An inference stage whose engine loads the model in the Job's own pod (needs GPUs there)."""
    external_rewrite = stage.family == "rewrite" and stage.serves is None
    return stage.kind == "inference" and run.spec.inference.engine in IN_PROCESS_ENGINES and not external_rewrite


@dataclass(frozen=True)
class StageChildren:
    # For each served model, in creation order: its API key Secret, NetworkPolicy, Deployment, Service
    # (all four named alike).
    servers: list[dict]
    primary: dict  # the Job or training object whose conditions decide the attempt


def build_stage_children(run: BacktranslationRun, plan: Plan, stage: Stage, attempt: int,
                         config: OperatorConfig, owner: dict | None = None) -> StageChildren:
    """The children of one attempt of `stage`. Only the primary's name and attempt label depend on the attempt: the
    servers of a stage are shared by its attempts."""
    if stage.name not in plan:
        raise ValueError(f"stage {stage.name!r} is not in the plan of run {run.name}")
    resources = run.spec.resources
    models = served_models(run, stage)
    servers: list[dict] = []
    for model in models:
        servers += _server(run, stage, model, config, owner)

    if stage.kind == "train":
        primary = _training(run, stage, attempt, config, owner)
    elif models:  # a client of the servers: CPU only, the GPUs are the servers'
        primary = _job(run, stage, attempt, config, owner, "client", resources.cpu, gpus=0,
                       deadline=resources.inference.timeout,
                       extra_env=_endpoint_env(run, stage, models, config) + _server_key_env(run, stage, models))
    elif _runs_in_process(run, stage):
        primary = _job(run, stage, attempt, config, owner, "job", resources.inference,
                       gpus=resources.inference.gpus_per_replica, deadline=resources.inference.timeout)
    elif stage.kind == "inference":  # a client of the user's endpoint or of an external rewriter
        primary = _job(run, stage, attempt, config, owner, "client", resources.cpu, gpus=0,
                       deadline=resources.inference.timeout)
    else:
        primary = _job(run, stage, attempt, config, owner, "job", resources.cpu, gpus=0, deadline=resources.cpu.timeout,
                       ephemeral=EPHEMERAL_PUBLISH if stage.family == "publish" else None)
    return StageChildren(servers=servers, primary=primary)


def stage_primary_ref(run: BacktranslationRun, stage: Stage, attempt: int, config: OperatorConfig) -> dict[str, str]:
    """apiVersion, kind and name of the primary that `build_stage_children` makes, without building
    it: a decision looks up every running stage's child, and only starting one needs it built."""
    name = stage_child_name(run.name, stage, attempt)
    if stage.kind == "train":
        backend = get_backend(training_backend(run, config))
        return {"apiVersion": backend.api_version, "kind": backend.kind, "name": name}
    return {"apiVersion": "batch/v1", "kind": "Job", "name": name}


def render_run(run: BacktranslationRun, config: OperatorConfig) -> list[dict]:
    """Every object of the run at attempt 1, in plan order, without ownerReferences (the run has no
    uid before it is applied)."""
    plan = build_plan(run)
    objects = [build_spec_configmap(run, None)]
    for stage in plan.stages:
        children = build_stage_children(run, plan, stage, 1, config)
        objects += [*children.servers, children.primary]
    return objects


def render_yaml(run: BacktranslationRun, config: OperatorConfig) -> str:
    """`render_run` as the multi-document YAML that `humpback render` prints."""
    out = [
        f"# Kubernetes objects of BacktranslationRun {run.namespace}/{run.name}, as the humpback operator",
        "# creates them (rendered only: nothing is applied). The operator adds an ownerReference to the run",
        "# to each one; a retried stage gets a new Job / PyTorchJob named ...-a2, ...-a3; vLLM servers",
        "# exist only while their stage runs.",
    ]
    for obj in render_run(run, config):
        stage = obj["metadata"]["labels"].get(LABEL_STAGE, "run")
        out += ["---", f"# {stage}: {obj['kind']} {obj['metadata']['name']}", to_yaml(obj).rstrip("\n")]
    return "\n".join(out) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the spec in the ConfigMap), no anchors or aliases."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def to_yaml(obj: object) -> str:
    # Wide lines: a folded JSON value (HUMPBACK_ENDPOINTS) is valid YAML but hard to read.
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=4096)


# --- reading children's status --------------------------------------------------------------


def job_outcome(job: Mapping) -> tuple[str | None, str]:
    """("Succeeded" | "Failed" | None while running, "reason: message") of a batch/v1 Job.

    FailureTarget (Kubernetes 1.31+) is set as soon as the Job is bound to fail, before its pods
    are gone and Failed is added: the attempt is over either way.
    """
    return conditions_outcome(job, succeeded=("Complete",), failed=("Failed", "FailureTarget"))


def server_state(deployment: Mapping) -> tuple[str, str]:
    """("Available" | "Progressing" | "Failed", message) of a vLLM Deployment. One available
    replica is enough for the client to start."""
    status = deployment.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    available = conditions.get("Available", {})
    if available.get("status") == "True" or (status.get("availableReplicas") or 0) >= 1:
        return "Available", available.get("message") or f"{status.get('availableReplicas', 0)} replica(s) available"
    progressing = conditions.get("Progressing", {})
    message = ": ".join(p for p in (progressing.get("reason"), progressing.get("message")) if p)
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return "Failed", message
    return "Progressing", message or "waiting for the vLLM server to become available"


# --- pods -----------------------------------------------------------------------------------


def _stage_args(stage: Stage) -> list[str]:
    return ["stage", stage.name, "--spec", f"env:{ENV_RUN_SPEC}"]


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref: dict = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _s3_env(run: BacktranslationRun) -> list[dict]:
    """S3 access for boto3 and the Run:ai streamer: Secret references, region, endpoint."""
    s3 = run.spec.storage.s3
    env = []
    if s3.credentials_secret:
        env += [_secret_env(key, s3.credentials_secret, key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        env.append(_secret_env("AWS_SESSION_TOKEN", s3.credentials_secret, "AWS_SESSION_TOKEN", optional=True))
    # An S3-compatible store (MinIO, Ceph, R2, GCS's XML API) still needs a signing region, and
    # has no instance metadata to ask: without AWS_EC2_METADATA_DISABLED the SDKs first wait on
    # 169.254.169.254 for credentials and region. Its checksum headers (boto3 >= 1.36 sends CRC32
    # on every upload) are refused by GCS and older MinIO: only when an operation requires them.
    region = s3.region or (S3_COMPATIBLE_REGION if s3.endpoint else None)
    if region:
        env += [{"name": "AWS_REGION", "value": region}, {"name": "AWS_DEFAULT_REGION", "value": region}]
    if s3.endpoint:
        env += [{"name": "AWS_ENDPOINT_URL", "value": s3.endpoint},
                {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
                {"name": "AWS_REQUEST_CHECKSUM_CALCULATION", "value": "when_required"},
                {"name": "AWS_RESPONSE_CHECKSUM_VALIDATION", "value": "when_required"}]
    return env


def _runtime_env(run: BacktranslationRun, stage: Stage) -> list[dict]:
    spec = run.spec
    env = [
        {"name": ENV_RUN_SPEC, "valueFrom": {"configMapKeyRef": {"name": spec_configmap_name(run.name), "key": SPEC_KEY}}},
        {"name": "HOME", "value": "/tmp"},  # caches of HF, torch and Triton; the image's HOME may not be ours
        {"name": "HUMPBACK_CACHE", "value": CACHE_DIR},
        *_s3_env(run),
    ]
    hub = spec.publish.hub
    if stage.family == "publish" and hub and hub.token_secret:  # the write token: the publish pod only
        env.append(_secret_env(HF_TOKEN_ENV, hub.token_secret, HF_TOKEN_ENV))
    elif spec.huggingface.token_secret:  # gated models and datasets on the hub
        env.append(_secret_env(HF_TOKEN_ENV, spec.huggingface.token_secret, HF_TOKEN_ENV))
    judge = spec.evaluation.judge
    if stage.family == "evaluate" and judge and judge.api_key_secret:
        env.append(_secret_env(JUDGE_API_KEY_ENV, judge.api_key_secret, API_KEY_SECRET_KEY))
    rewrite = spec.curation.rewrite
    if stage.family == "rewrite" and rewrite.api_key_secret:
        env.append(_secret_env(REWRITE_API_KEY_ENV, rewrite.api_key_secret, API_KEY_SECRET_KEY))
    return env + _tracking_env(run)


def _tracking_env(run: BacktranslationRun) -> list[dict]:
    """Every stage logs to the run's trackers: their credentials by Secret reference, named as the
    trackers' own clients read them."""
    mlflow, wandb = run.spec.tracking.mlflow, run.spec.tracking.wandb
    env = []
    if mlflow is not None and mlflow.credentials_secret:  # user/password or token: each key optional
        env += [_secret_env(key, mlflow.credentials_secret, key, optional=True) for key in MLFLOW_CREDENTIAL_ENVS]
    if wandb is not None and wandb.credentials_secret:
        env.append(_secret_env(WANDB_API_KEY_ENV, wandb.credentials_secret, WANDB_API_KEY_ENV))
    return env


def _resources(res: PodResources, gpus: int, ephemeral: str) -> dict:
    """Requests = limits for cpu, memory and ephemeral storage (Guaranteed QoS for a pod's only
    container: evicted last), defaults from the GPUs asked for; GPUs as a limit."""
    cpu, memory = (str(CPU_PER_GPU * gpus), f"{MEMORY_GI_PER_GPU * gpus}Gi") if gpus > 0 else CPU_ONLY
    amounts = {"cpu": res.cpu or cpu, "memory": res.memory or memory,
               "ephemeral-storage": res.ephemeral_storage or ephemeral}
    limits = dict(amounts)
    if gpus > 0:
        limits["nvidia.com/gpu"] = gpus  # extended resources: the limit is also the request
    return {"requests": amounts, "limits": limits}


def resource_defaults_table() -> str:
    """The requests (= limits) of a pod whose `spec.resources.<kind>` leaves cpu, memory and
    ephemeralStorage out, and its volumes' size limits, as a Markdown table computed by the same
    functions that build the pods (the chart README and docs/quickstart.md carry it; a test keeps
    them equal)."""
    def row(pod: str, source: str, res: PodResources, gpus: int, ephemeral: str, cache: bool, note: str = "") -> str:
        amounts = _resources(res, gpus, ephemeral)["requests"]
        shm = next((v["emptyDir"]["sizeLimit"] for v in _volumes(gpus, None)[0] if v["name"] == "dshm"), "none")
        if gpus > 0:  # per GPU, and what the default number of GPUs makes
            per = _resources(res, 1, ephemeral)["requests"]
            cpu, memory = f"{per['cpu']} per GPU ({amounts['cpu']})", f"{per['memory']} per GPU ({amounts['memory']})"
            shm = f"{_volumes(1, None)[0][0]['emptyDir']['sizeLimit']} per GPU ({shm})"
        else:
            cpu, memory = amounts["cpu"], amounts["memory"]
        storage = amounts["ephemeral-storage"] + note + ("" if cache else " (no /cache volume)")
        return f"| {pod} | {source} | {cpu} | {memory} | {storage} | {shm} |"

    training, inference = TrainingResources(), InferenceResources()
    return "\n".join([
        "| Pod | GPUs (default) | cpu | memory | ephemeral-storage, also the /cache sizeLimit | /dev/shm sizeLimit |",
        "|---|---|---|---|---|---|",
        row("training (PyTorchJob)", f"`training.gpusPerNode` ({training.gpus_per_node})", training,
            training.gpus_per_node, EPHEMERAL_TRAINING, True, f"; {EPHEMERAL_GPU} with a `checkpointVolume`"),
        row("vLLM server", f"`inference.gpusPerReplica` ({inference.gpus_per_replica})", inference,
            inference.gpus_per_replica, EPHEMERAL_SERVER, False),
        row("in-process inference Job", f"`inference.gpusPerReplica` ({inference.gpus_per_replica})", inference,
            inference.gpus_per_replica, EPHEMERAL_GPU, True),
        row("CPU Jobs: prepare, report, inference clients", "none", PodResources(), 0, EPHEMERAL_CPU, True),
        row("publish Job (one model's upload folder)", "none", PodResources(), 0, EPHEMERAL_PUBLISH, True),
    ]) + "\n"


def _volumes(gpus: int, cache_size: str | None) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): a scratch cache for downloaded models and checkpoints, and for GPU
    pods /dev/shm in memory for NCCL and vLLM workers (the runtime's 64 MiB default is far too
    small). Both with a sizeLimit: an unbounded emptyDir can fill the node's disk or memory."""
    volumes, mounts = [], []
    if cache_size:
        volumes.append({"name": "cache", "emptyDir": {"sizeLimit": cache_size}})
        mounts.append({"name": "cache", "mountPath": CACHE_DIR})
    if gpus > 0:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GI_PER_GPU * gpus}Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _container(name: str, image: str, env: list[dict], resources: dict, mounts: list[dict], *,
               command: list[str] | None = None, args: list[str] | None = None) -> dict:
    container: dict = {"name": name, "image": image}
    if command:
        container["command"] = command
    if args:
        container["args"] = args
    container["env"] = env
    if resources:
        container["resources"] = resources
    if mounts:
        container["volumeMounts"] = mounts
    container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
    return container


def _with_metrics_port(container: dict, config: OperatorConfig) -> dict:
    """A stage container serves its Prometheus metrics on the port the operator declares (the
    chart's metrics.stagePods), named `metrics` for the PodMonitor; without one it serves none."""
    if config.stage_metrics_port:
        container["env"] = [*container["env"], {"name": STAGE_METRICS_PORT_ENV, "value": str(config.stage_metrics_port)}]
        container["ports"] = [{"name": "metrics", "containerPort": config.stage_metrics_port, "protocol": "TCP"}]
    return container


def pod_service_account(run: BacktranslationRun, config: OperatorConfig) -> str | None:
    """The run's own service account, else the operator's default (None: the namespace's default)."""
    return run.spec.pod_template.service_account_name or config.service_account


def _pod_template(run: BacktranslationRun, labels: dict, res: PodResources, config: OperatorConfig,
                  containers: list[dict], volumes: list[dict], *, restart_policy: str | None = None) -> dict:
    extra = run.spec.pod_template
    own_env = [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in extra.env]
    for container in containers:  # the run's own variables replace the operator's of the same name
        names = {e["name"] for e in own_env}
        container["env"] = [e for e in container["env"] if e["name"] not in names] + copy.deepcopy(own_env)
        if extra.env_from:
            container["envFrom"] = [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in extra.env_from]
    spec: dict = {}
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    service_account = pod_service_account(run, config)
    if service_account:
        spec["serviceAccountName"] = service_account
    # Stages and vLLM never call the Kubernetes API, so the namespace's default account gets no
    # token. A named account is there for its cloud identity (IRSA, EKS Pod Identity, Workload
    # Identity), which needs the token.
    spec["automountServiceAccountToken"] = service_account is not None
    if extra.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s.name} for s in extra.image_pull_secrets]
    spec["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    if res.affinity:
        spec["affinity"] = copy.deepcopy(res.affinity)
    if res.topology_spread_constraints:
        spec["topologySpreadConstraints"] = copy.deepcopy(res.topology_spread_constraints)
    spec["containers"] = containers
    if volumes:
        spec["volumes"] = volumes
    metadata: dict = {"labels": {**extra.labels, **pod_labels(labels)}}
    if extra.annotations:
        metadata["annotations"] = dict(extra.annotations)
    return {"metadata": metadata, "spec": spec}


def _fingerprint(stage: Stage) -> dict[str, str]:
    version = {ANNOTATION_FINGERPRINT_VERSION: stage.fingerprint_version} if stage.fingerprint_version else {}
    return {ANNOTATION_FINGERPRINT: stage.fingerprint, **version}


# --- children by kind -----------------------------------------------------------------------


def _training(run: BacktranslationRun, stage: Stage, attempt: int, config: OperatorConfig,
              owner: dict | None) -> dict:
    res = run.spec.resources.training
    procs = res.gpus_per_node or 1
    # torchrun takes nnodes, node rank and the master's address from the PET_* variables that the
    # training operator injects; only the processes per node are ours to say.
    command = ["torchrun", f"--nproc-per-node={procs}", "-m", "humpback_runtime", *_stage_args(stage)]
    labels = child_labels(run, stage.name, "train", attempt=str(attempt))
    checkpoints = res.checkpoint_volume
    resources = _resources(res, res.gpus_per_node, EPHEMERAL_GPU if checkpoints else EPHEMERAL_TRAINING)
    volumes, mounts = _volumes(res.gpus_per_node, resources["limits"]["ephemeral-storage"])
    env = _runtime_env(run, stage)
    if checkpoints:
        volumes.append(_checkpoint_volume(run, stage, checkpoints))
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_DIR})
        env.append({"name": WORK_DIR_ENV, "value": CHECKPOINT_DIR})
    container = _with_metrics_port(_container("trainer", res.image or config.runtime_image, env,
                                              resources, mounts, command=command), config)
    template = _pod_template(run, labels, res, config, [container], volumes)
    return get_backend(training_backend(run, config)).build(
        name=stage_child_name(run.name, stage, attempt), namespace=run.namespace, labels=labels,
        annotations=_fingerprint(stage), owner=owner, pod_template=template, nodes=res.nodes, procs_per_node=procs,
        active_deadline_seconds=duration_seconds(res.timeout),
    )


def _checkpoint_volume(run: BacktranslationRun, stage: Stage, volume: CheckpointVolume) -> dict:
    """The pod volume of `spec.resources.training.checkpointVolume`: the existing claim, or a generic
    ephemeral volume (Kubernetes makes a claim `<pod>-checkpoints` per pod, owned by the pod, and
    deletes it with the pod)."""
    if volume.claim_name:
        return {"name": "checkpoints", "persistentVolumeClaim": {"claimName": volume.claim_name}}
    claim: dict = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class_name:
        claim["storageClassName"] = volume.storage_class_name
    labels = {LABEL_RUN: run.name, LABEL_STAGE: stage.name}
    return {"name": "checkpoints", "ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": labels}, "spec": claim}}}


def _job(run: BacktranslationRun, stage: Stage, attempt: int, config: OperatorConfig, owner: dict | None,
         component: str, res: PodResources, *, gpus: int, deadline: str, extra_env: list[dict] | None = None,
         ephemeral: str | None = None) -> dict:
    """A batch/v1 Job running the stage once. backoffLimit 0: a failure ends the attempt, and the
    operator's retry is a new Job (its pods and logs stay beside the failed one's); a disruption
    is no failure (podFailurePolicy); `deadline` bounds the attempt (activeDeadlineSeconds)."""
    labels = child_labels(run, stage.name, component, attempt=str(attempt))
    resources = _resources(res, gpus, ephemeral or (EPHEMERAL_GPU if gpus > 0 else EPHEMERAL_CPU))
    volumes, mounts = _volumes(gpus, resources["limits"]["ephemeral-storage"])
    command = ["humpback", *_stage_args(stage)]
    container = _with_metrics_port(
        _container("stage", res.image or config.runtime_image, [*_runtime_env(run, stage), *(extra_env or [])],
                   resources, mounts, command=command), config)
    template = _pod_template(run, labels, res, config, [container], volumes, restart_policy="Never")
    spec: dict = {"backoffLimit": 0}
    seconds = duration_seconds(deadline)
    if seconds:
        spec["activeDeadlineSeconds"] = seconds
    spec["podFailurePolicy"] = {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In",
                                              "values": list(PERMANENT_EXIT_CODES)}},
    ]}
    spec["template"] = template
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(stage_child_name(run.name, stage, attempt), run.namespace, labels,
                                _fingerprint(stage), owner),
        "spec": spec,
    }


def stage_uri(run: BacktranslationRun, stage: str) -> str:
    """Where `stage` writes its outputs: <storage uri>/<namespace>/<run>/<stage>."""
    return f"{run.spec.storage.uri.rstrip('/')}/{stage_prefix(run.namespace, run.name, stage)}"


def model_uri(run: BacktranslationRun, train_stage: str) -> str:
    """Where `train_stage` leaves its model."""
    return f"{stage_uri(run, train_stage)}/{MODEL_DIR}"


def server_url(run: BacktranslationRun, stage: Stage, train_stage: str, config: OperatorConfig) -> str:
    """The OpenAI-compatible API root of the server of `train_stage` for `stage`."""
    return f"http://{server_name(run.name, stage, train_stage)}.{run.namespace}.svc:{config.vllm_port}/v1"


def _endpoint_env(run: BacktranslationRun, stage: Stage, models: list[str], config: OperatorConfig) -> list[dict]:
    if stage.family == "evaluate":
        urls = {model: server_url(run, stage, model, config) for model in models}
        return [{"name": ENDPOINTS_ENV, "value": json.dumps(urls)}]
    (model,) = models
    return [{"name": ENDPOINT_ENV, "value": server_url(run, stage, model, config)},
            {"name": SERVED_MODEL_ENV, "value": model}]


def _server_key_env(run: BacktranslationRun, stage: Stage, models: list[str]) -> list[dict]:
    return [_secret_env(server_api_key_env(model), server_name(run.name, stage, model), API_KEY_SECRET_KEY)
            for model in models]


def _server(run: BacktranslationRun, stage: Stage, train_stage: str, config: OperatorConfig,
            owner: dict | None) -> list[dict]:
    """The vLLM Deployment serving `train_stage`'s model from S3 as `train_stage`, and its Service."""
    res = run.spec.resources.inference
    name = server_name(run.name, stage, train_stage)
    labels = child_labels(run, stage.name, "server", model=model_short(train_stage))
    selector = {key: labels[key] for key in (LABEL_RUN, LABEL_STAGE, LABEL_COMPONENT, LABEL_MODEL)}
    args = [
        "--model", model_uri(run, train_stage),
        "--load-format", "runai_streamer",  # streams safetensors from S3 straight to the GPUs
        "--served-model-name", train_stage,
        "--tensor-parallel-size", str(max(res.gpus_per_replica, 1)),
        "--host", "0.0.0.0",
        "--port", str(config.vllm_port),
        # Expanded by the kubelet from the env below: the key is in the Secret, not in the spec.
        "--api-key", f"$({VLLM_API_KEY_ENV})",
        *run.spec.inference.vllm.serve_args(),  # batch size, memory, context, prefix caching
        *res.extra_args,
    ]
    env = [*_s3_env(run), {"name": "HOME", "value": "/tmp"},
           _secret_env(VLLM_API_KEY_ENV, name, API_KEY_SECRET_KEY)]
    if run.spec.storage.s3.endpoint:
        # The Run:ai streamer's own endpoint variable, and path-style addressing, which S3-compatible
        # stores (MinIO, Ceph) need; the runtime's boto3 client uses path style there too.
        env += [{"name": "RUNAI_STREAMER_S3_ENDPOINT", "value": run.spec.storage.s3.endpoint},
                {"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"}]
    resources = _resources(res, res.gpus_per_replica, EPHEMERAL_SERVER)
    volumes, mounts = _volumes(res.gpus_per_replica, None)
    container = _container("vllm", res.image or config.vllm_image, env, resources, mounts, args=args)
    container["ports"] = [{"name": "http", "containerPort": config.vllm_port, "protocol": "TCP"}]
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container["startupProbe"] = {**copy.deepcopy(health), **STARTUP_PROBE}
    container["readinessProbe"] = {**copy.deepcopy(health), **READINESS_PROBE}
    container["livenessProbe"] = {**copy.deepcopy(health), **LIVENESS_PROBE}
    template = _pod_template(run, labels, res, config, [container], volumes)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(name, run.namespace, labels, _fingerprint(stage), owner),
        "spec": {
            "replicas": res.replicas,
            "selector": {"matchLabels": selector},
            # Recreate: never two generations of GPU pods at once (there may be no GPUs for both).
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": SERVER_PROGRESS_DEADLINE_S,
            "template": template,
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(name, run.namespace, labels, _fingerprint(stage), owner),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(selector),
            "ports": [{"name": "http", "port": config.vllm_port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    key = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(name, run.namespace, labels, {**_fingerprint(stage), ANNOTATION_GENERATED_KEY: API_KEY_SECRET_KEY},
                                owner),
        "type": "Opaque",
        # No data here: the operator writes a random key into it when it creates it (kube layer).
    }
    clients = {LABEL_RUN: run.name, LABEL_STAGE: stage.name, LABEL_COMPONENT: "client"}
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(name, run.namespace, labels, _fingerprint(stage), owner),
        "spec": {
            # Only this stage's client pods reach the server, and only its API port. (The kubelet's
            # probes come from the node, which network policies do not filter.)
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": clients}}],
                         "ports": [{"protocol": "TCP", "port": config.vllm_port}]}],
        },
    }
    return [key, policy, deployment, service]
