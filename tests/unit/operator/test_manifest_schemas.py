"""Every manifest the builders emit is valid against the real API schemas, offline.

- PyTorchJob and TrainJob: the openAPIV3Schema of their CRDs (tests/data/schemas, see SOURCES.md
  there), turned into JSON Schema with unknown fields forbidden, as `kubectl apply
  --validate=strict` would: a misspelt field fails here instead of being pruned on the cluster.
- Core kinds (ConfigMap, Job, Deployment, Service): `kubernetes_validate` (strict) with the newest
  Kubernetes version whose schemas it ships.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from humpback_operator.backends import get_backend
from humpback_operator.children import build_stage_children, render_run
from humpback_operator.config import OperatorConfig

from humpback_runtime.plan import build_plan
from humpback_runtime.spec import load_run, parse_run

kubernetes_validate = pytest.importorskip("kubernetes_validate")
from kubernetes_validate.utils import latest_version

REPO = Path(__file__).resolve().parents[3]
SCHEMAS = REPO / "tests" / "data" / "schemas"
CONFIG = OperatorConfig()


def openapi_to_json_schema(node, *, strict: bool = True):
    """An OpenAPI v3 (Kubernetes structural) schema as JSON Schema: int-or-string becomes
    integer|string, nullable adds null, x-kubernetes-* keys go, and objects with declared
    properties reject unknown ones (unless they preserve unknown fields)."""
    if isinstance(node, list):
        return [openapi_to_json_schema(n, strict=strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: openapi_to_json_schema(s, strict=strict) for name, s in value.items()}
        else:
            out[key] = openapi_to_json_schema(value, strict=strict)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (strict and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def load_crd(filename: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large
    return yaml.load((SCHEMAS / filename).read_text(), Loader=loader)


@cache
def crd_validator(filename: str, version: str) -> jsonschema.Validator:
    crd = load_crd(filename)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = openapi_to_json_schema(served["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def validate_crd_object(obj: dict) -> None:
    files = {"PyTorchJob": "kubeflow.org_pytorchjobs.yaml", "TrainJob": "trainer.kubeflow.org_trainjobs.v2.3.0.yaml"}
    group, version = obj["apiVersion"].split("/")
    crd = load_crd(files[obj["kind"]])
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == obj["kind"]
    errors = sorted(crd_validator(files[obj["kind"]], version).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise AssertionError("\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10]))


K8S_VERSION = latest_version()


def validate_core_object(obj: dict) -> None:
    kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)


def make_run(**spec):
    base = {"baseModel": "org/model", "seed": {"source": "s3://d/seed.jsonl"}, "corpus": {"source": "s3://d/c/"},
            "storage": {"uri": "s3://bucket/runs", "s3": {"credentialsSecret": "s3", "region": "eu-west-1",
                                                          "endpoint": "http://minio:9000"}},
            "evaluation": {"enabled": True, "judge": {"endpoint": "http://j/v1", "model": "j", "apiKeySecret": "jk"}}}
    base.update(spec)
    return parse_run({"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
                      "metadata": {"name": "demo", "namespace": "team-a",
                                   "labels": {"kueue.x-k8s.io/queue-name": "gpus"}}, "spec": base})


OWNER = {"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "name": "demo",
         "uid": "0b5e7c1e-1111-2222-3333-444455556666", "controller": True, "blockOwnerDeletion": True}


def all_objects(run, config=CONFIG, owner=OWNER):
    """render_run's objects plus, per stage, a second attempt with an owner reference."""
    objects = render_run(run, config)
    plan = build_plan(run)
    for stage in plan.stages:
        built = build_stage_children(run, plan, stage, 2, config, owner)
        objects += [*built.servers, built.primary]
    return objects


RUNS = {
    "llama2-7b-paper": lambda: load_run(REPO / "examples" / "llama2-7b-paper.yaml"),
    "tiny-cpu": lambda: load_run(REPO / "examples" / "tiny-cpu.yaml"),
    "multi-node": lambda: make_run(resources={
        "training": {"nodes": 4, "gpusPerNode": 8, "cpu": "90", "memory": "1000Gi",
                     "tolerations": [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule",
                                      "tolerationSeconds": 60}]},
        "inference": {"replicas": 2, "gpusPerReplica": 4, "cpu": "16", "memory": "200Gi", "extraArgs": ["--dtype", "bfloat16"]},
        "cpu": {"cpu": "500m", "memory": "2Gi", "nodeSelector": {"pool": "cpu"}}}),
    "rewrite-in-process": lambda: make_run(inference={"engine": "vllm"}, curation={
        "iterations": 1, "rewrite": {"enabled": True, "endpoint": "http://x/v1", "model": "m", "apiKeySecret": "rk"}}),
    "credentials": lambda: make_run(huggingface={"tokenSecret": "hf"},
                                    publish={"hub": {"repoPrefix": "me/demo", "tokenSecret": "hf-write"}}, podTemplate={
        "serviceAccountName": "irsa-runner", "imagePullSecrets": [{"name": "registry"}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "0"},
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key", "optional": True}}}],
        "envFrom": [{"configMapRef": {"name": "proxy"}}, {"prefix": "X_", "secretRef": {"name": "extra"}}],
        "annotations": {"eks.amazonaws.com/skip-containers": "none"}, "labels": {"team": "a"}},
        storage={"uri": "s3://b/r", "s3": {"endpoint": "https://storage.googleapis.com", "region": "auto",
                                          "credentialsSecret": "gcs-hmac"}}),
}
SERVICE_ACCOUNT = OperatorConfig(service_account="humpback-runner")


@pytest.mark.parametrize("run_name", RUNS)
def test_every_pytorchjob_validates_against_the_kubeflow_crd(run_name):
    jobs = [o for o in all_objects(RUNS[run_name](), SERVICE_ACCOUNT) if o["kind"] == "PyTorchJob"]
    assert jobs
    for job in jobs:
        validate_crd_object(job)


def test_the_multi_node_variant_really_has_workers():
    jobs = [o for o in render_run(RUNS["multi-node"](), CONFIG) if o["kind"] == "PyTorchJob"]
    assert all(j["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3 for j in jobs)


@pytest.mark.parametrize("run_name", RUNS)
def test_every_core_object_validates_with_kubernetes_validate(run_name):
    objects = [o for o in all_objects(RUNS[run_name](), SERVICE_ACCOUNT) if "/" not in o["apiVersion"]
               or o["apiVersion"] in ("apps/v1", "batch/v1", "networking.k8s.io/v1")]
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Job"}
    for obj in objects:
        validate_core_object(obj)


@pytest.mark.parametrize("run_name", ["llama2-7b-paper", "multi-node", "credentials"])
def test_trainjobs_validate_against_the_trainer_v2_3_crd(run_name):
    config = OperatorConfig(training_backend="trainjob", service_account="humpback-runner")
    jobs = [o for o in all_objects(RUNS[run_name](), config) if o["kind"] == "TrainJob"]
    assert len(jobs) == 2 * len([s for s in build_plan(RUNS[run_name]()).stages if s.kind == "train"])
    for job in jobs:
        validate_crd_object(job)


def test_all_kinds_are_covered():
    kinds = {o["kind"] for name in RUNS for o in all_objects(RUNS[name]())}
    assert kinds == {"ConfigMap", "Job", "PyTorchJob", "Deployment", "Service", "Secret", "NetworkPolicy"}


def test_names_env_and_volumes_are_unique():
    for name, make in RUNS.items():
        objects = render_run(make(), CONFIG)
        keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
        assert len(keys) == len(set(keys)), name
        for obj in objects:
            text = yaml.safe_dump(obj)
            for spec in _pod_specs(obj):
                volumes = [v["name"] for v in spec.get("volumes", [])]
                assert len(volumes) == len(set(volumes)), text
                for container in spec["containers"]:
                    env = [e["name"] for e in container.get("env", [])]
                    assert len(env) == len(set(env)), text
                    mounts = {m["name"] for m in container.get("volumeMounts", [])}
                    assert mounts <= set(volumes), text


def _pod_specs(obj):
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] in ("Job", "Deployment"):
        return [obj["spec"]["template"]["spec"]]
    return []


# --- the checks can fail ---------------------------------------------------------------------


def _pytorchjob():
    return next(o for o in render_run(RUNS["llama2-7b-paper"](), CONFIG) if o["kind"] == "PyTorchJob")


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type", "unknown container field", "missing required"])
def test_a_broken_pytorchjob_fails_validation(breakage):
    job = _pytorchjob()
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    if breakage == "misspelt field":
        job["spec"]["runPolicy"]["backofLimit"] = 0
    elif breakage == "wrong type":
        master["replicas"] = "one"
    elif breakage == "unknown container field":
        master["template"]["spec"]["containers"][0]["gpus"] = 8
    else:
        del job["spec"]["pytorchReplicaSpecs"]
    with pytest.raises(AssertionError):
        validate_crd_object(job)


def test_a_broken_trainjob_fails_validation():
    job = get_backend("trainjob").build(name="x", namespace="ns", labels={}, annotations={}, owner=None,
                                        pod_template={"metadata": {}, "spec": {"containers": [
                                            {"name": "t", "image": "i", "command": ["c"]}]}},
                                        nodes=1, procs_per_node=1)
    validate_crd_object(job)  # valid as built
    del job["spec"]["runtimeRef"]
    with pytest.raises(AssertionError):
        validate_crd_object(job)
    # What the backend built before Trainer v2.1 is refused by the v2.3.0 CRD.
    old = get_backend("trainjob").build(name="x", namespace="ns", labels={}, annotations={}, owner=None,
                                        pod_template={"metadata": {}, "spec": {"containers": [
                                            {"name": "t", "image": "i", "command": ["c"]}]}},
                                        nodes=1, procs_per_node=1)
    old["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": "node"}]}]
    old["spec"]["labels"] = {"a": "b"}
    with pytest.raises(AssertionError):
        validate_crd_object(old)


@pytest.mark.parametrize("kind", ["Deployment", "Service", "Job", "ConfigMap"])
def test_a_broken_core_object_fails_kubernetes_validate(kind):
    obj = next(o for o in render_run(RUNS["llama2-7b-paper"](), CONFIG) if o["kind"] == kind)
    obj.setdefault("spec", {})["notAField"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core_object(obj)


def test_kubernetes_validate_uses_a_recent_kubernetes():
    major, minor = (int(p) for p in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 30)
