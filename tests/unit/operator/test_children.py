"""The pure builders of a run's children, `humpback render`, and reading children's outcomes.

Golden files: `render_yaml` of each example is compared with tests/unit/operator/golden/<example>.yaml.
After an intended change, regenerate them and review the diff:

    HUMPBACK_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/operator/test_children.py -k golden
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from humpback_operator import children as ch
from humpback_operator.backends import PyTorchJobBackend, TrainJobBackend, get_backend
from humpback_operator.children import (
    build_spec_configmap,
    build_stage_children,
    cluster_problems,
    job_outcome,
    owner_reference,
    render_run,
    render_yaml,
    served_models,
    server_state,
    stage_primary_ref,
)
from humpback_operator.config import (
    DEFAULT_RUNTIME_IMAGE,
    DEFAULT_VLLM_IMAGE,
    OperatorConfig,
)
from humpback_operator.names import (
    ANNOTATION_FINGERPRINT,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_MODEL,
    LABEL_STAGE,
    PRIORITY_CLASS_LABEL,
    QUEUE_LABEL,
)

from humpback_runtime.plan import build_plan
from humpback_runtime.spec import SpecError, load_run, parse_run

REPO = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = ["llama2-7b-paper", "tiny-cpu"]
CONFIG = OperatorConfig()


def make_run(**spec_overrides):
    """A small valid cluster run; keyword arguments replace top-level spec fields."""
    spec = {
        "baseModel": "org/model",
        "seed": {"source": "s3://data/seed.jsonl"},
        "corpus": {"source": "s3://data/corpus/"},
        "storage": {"uri": "s3://bucket/runs/", "s3": {"credentialsSecret": "s3-creds"}},
    }
    spec.update(spec_overrides)
    labels = spec.pop("labels", {})
    return parse_run({"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
                      "metadata": {"name": "demo", "namespace": "team-a", "labels": labels}, "spec": spec})


def stage_children(run, stage_name, attempt=1, config=CONFIG, owner=None):
    plan = build_plan(run)
    return build_stage_children(run, plan, plan[stage_name], attempt, config, owner)


def pod_templates(obj):
    """Every pod template of a child, whatever its kind."""
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] in ("Job", "Deployment"):
        return [obj["spec"]["template"]]
    return []


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def container_of(obj):
    (template, *_) = pod_templates(obj)
    return template["spec"]["containers"][0]


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES)
def test_render_of_the_examples_matches_the_golden_files(example):
    text = render_yaml(load_run(REPO / "examples" / f"{example}.yaml"), CONFIG)
    golden = GOLDEN / f"{example}.yaml"
    if os.environ.get("HUMPBACK_UPDATE_GOLDEN") == "1":
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"missing {golden}: run with HUMPBACK_UPDATE_GOLDEN=1 to create it"
    assert text == golden.read_text(encoding="utf-8"), (
        f"render of examples/{example}.yaml differs from {golden.name}; if intended, regenerate with "
        "HUMPBACK_UPDATE_GOLDEN=1 and review the diff")


def test_render_yaml_parses_back_to_the_rendered_objects():
    run = load_run(REPO / "examples" / "llama2-7b-paper.yaml")
    docs = [d for d in yaml.safe_load_all(render_yaml(run, CONFIG)) if d is not None]
    assert docs == render_run(run, CONFIG)


def test_render_lists_the_configmap_first_then_each_stage_in_plan_order():
    run = make_run()
    objects = render_run(run, CONFIG)
    assert objects[0]["kind"] == "ConfigMap"
    stages = [o["metadata"]["labels"]["humpback.dev/stage"] for o in objects[1:]]
    assert list(dict.fromkeys(stages)) == build_plan(run).names()
    assert all("ownerReferences" not in o["metadata"] for o in objects)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes, workers", [(1, None), (2, 1), (4, 3)])
def test_pytorchjob_has_one_master_and_nodes_minus_one_workers(nodes, workers):
    run = make_run(resources={"training": {"nodes": nodes, "gpusPerNode": 8}})
    job = stage_children(run, "train-m0").primary
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert specs["Master"]["replicas"] == 1
    if workers is None:
        assert "Worker" not in specs
    else:
        assert specs["Worker"]["replicas"] == workers
    for spec in specs.values():
        assert spec["restartPolicy"] == "Never"
        assert spec["template"]["spec"]["containers"][0]["name"] == "pytorch"
    # No backoffLimit (training-operator v1.8/v1.9.0-3 delete every pod when it is exceeded), pods kept, 72h deadline.
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "activeDeadlineSeconds": 72 * 3600}


def test_training_runs_torchrun_with_the_gpus_per_node_as_processes():
    run = make_run(resources={"training": {"gpusPerNode": 4}})
    job = stage_children(run, "train-myx").primary
    container = container_of(job)
    assert container["command"] == ["torchrun", "--nproc-per-node=4", "-m", "humpback_runtime", "stage", "train-myx",
                                    "--spec", "env:HUMPBACK_RUN_SPEC"]
    assert job["spec"]["nprocPerNode"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_training_without_gpus_runs_one_process_and_requests_no_gpu():
    run = make_run(resources={"training": {"gpusPerNode": 0, "cpu": "4", "memory": "16Gi"}})
    container = container_of(stage_children(run, "train-m0").primary)
    assert "--nproc-per-node=1" in container["command"]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "200Gi"},
                                      "limits": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "200Gi"}}


def test_training_pods_get_node_selector_tolerations_shm_and_image_from_the_spec():
    run = make_run(resources={"training": {
        "image": "registry.example/rt:1", "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
    job = stage_children(run, "train-m0").primary
    pod = pod_templates(job)[0]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["image"] == "registry.example/rt:1"


def test_training_defaults_to_the_a100_selector_and_the_operator_image():
    job = stage_children(make_run(), "train-m0").primary
    pod = pod_templates(job)[0]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["containers"][0]["image"] == DEFAULT_RUNTIME_IMAGE


# --- jobs -----------------------------------------------------------------------------------


def test_cpu_stages_are_jobs_running_the_stage_command():
    run = make_run(resources={"cpu": {"cpu": "2", "memory": "8Gi", "image": "img:cpu"}})
    job = stage_children(run, "prepare-corpus").primary
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["command"] == ["humpback", "stage", "prepare-corpus", "--spec", "env:HUMPBACK_RUN_SPEC"]
    assert container["image"] == "img:cpu"
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "10Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in pod
    assert job["metadata"]["labels"][LABEL_COMPONENT] == "job"


def test_every_runtime_container_reads_the_spec_from_the_configmap_and_has_home_and_cache():
    for obj in render_run(make_run(), CONFIG):
        for template in pod_templates(obj):
            container = template["spec"]["containers"][0]
            if container["name"] == "vllm":
                continue
            env = env_of(container)
            assert env["HUMPBACK_RUN_SPEC"]["valueFrom"] == {
                "configMapKeyRef": {"name": "demo-spec", "key": "run.yaml"}}
            assert env["HOME"]["value"] == "/tmp"
            assert env["HUMPBACK_CACHE"]["value"] == "/cache"
            assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]


def test_every_pod_runs_as_non_root_without_privileges():
    config = OperatorConfig(service_account="humpback-runner")
    for obj in render_run(make_run(), config):
        for template in pod_templates(obj):
            pod = template["spec"]
            assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                              "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
            assert pod["serviceAccountName"] == "humpback-runner"
            for container in pod["containers"]:
                assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}


def test_pods_use_the_namespace_default_service_account_when_none_is_configured():
    for obj in render_run(make_run(), CONFIG):
        for template in pod_templates(obj):
            assert "serviceAccountName" not in template["spec"]


# --- credentials ----------------------------------------------------------------------------


def test_s3_credentials_region_and_endpoint_reach_pods_as_references_and_values():
    run = make_run(storage={"uri": "s3://bucket/runs", "s3": {
        "credentialsSecret": "s3-creds", "region": "eu-west-1", "endpoint": "http://minio.storage:9000"}})
    for obj in render_run(run, CONFIG):
        for template in pod_templates(obj):
            env = env_of(template["spec"]["containers"][0])
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key}}}
            assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
            assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
            assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"


def test_without_a_credentials_secret_pods_get_no_aws_keys():
    run = make_run(storage={"uri": "s3://bucket/runs"})  # IRSA or node roles
    for obj in render_run(run, CONFIG):
        for template in pod_templates(obj):
            env = env_of(template["spec"]["containers"][0])
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} & set(env)


def test_api_keys_are_secret_references_and_no_value_looks_like_a_secret():
    run = make_run(
        evaluation={"enabled": True, "judge": {"endpoint": "https://judge.example/v1", "model": "j",
                                               "apiKeySecret": "judge-key"}},
        curation={"iterations": 1, "rewrite": {"enabled": True, "endpoint": "https://llm.example/v1",
                                               "model": "big", "apiKeySecret": "rewrite-key"}},
    )
    objects = render_run(run, CONFIG)
    evaluate = next(o for o in objects if o["metadata"]["name"].startswith("demo-evaluate") and o["kind"] == "Job")
    rewrite = next(o for o in objects if o["metadata"]["name"].startswith("demo-rewrite-") and o["kind"] == "Job")
    assert env_of(container_of(evaluate))["HUMPBACK_JUDGE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "judge-key", "key": "apiKey"}}
    assert env_of(container_of(rewrite))["HUMPBACK_REWRITE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "rewrite-key", "key": "apiKey"}}
    # Only the stage that needs a key gets it.
    augment = next(o for o in objects if o["kind"] == "Job" and "-augment-" in o["metadata"]["name"])
    assert not {"HUMPBACK_JUDGE_API_KEY", "HUMPBACK_REWRITE_API_KEY"} & set(env_of(container_of(augment)))
    # Every credential-like variable is a reference, never a literal value.
    for obj in objects:
        for template in pod_templates(obj):
            for e in template["spec"]["containers"][0]["env"]:
                if any(word in e["name"] for word in ("KEY", "SECRET", "TOKEN")):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


def test_a_hugging_face_token_reaches_every_runtime_pod_by_reference():
    run = make_run(baseModel="meta-llama/Llama-2-7b-hf", huggingface={"tokenSecret": "hf-token"})
    objects = render_run(run, CONFIG)
    runtime = [o for o in objects if o["kind"] in ("Job", "PyTorchJob")]
    assert runtime
    for obj in runtime:
        for template in pod_templates(obj):
            assert env_of(template["spec"]["containers"][0])["HF_TOKEN"]["valueFrom"] == {
                "secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert all("HF_TOKEN" not in env_of(container_of(o)) for o in render_run(make_run(), CONFIG)
               if o["kind"] in ("Job", "PyTorchJob"))


def test_tracker_credentials_reach_every_runtime_pod_by_reference_under_the_trackers_names():
    run = make_run(tracking={"mlflow": {"trackingUri": "https://mlflow.corp", "credentialsSecret": "mlflow-creds"},
                             "wandb": {"project": "humpback", "credentialsSecret": "wandb-key"}})
    runtime = [o for o in render_run(run, CONFIG) if o["kind"] in ("Job", "PyTorchJob")]
    assert {o["kind"] for o in runtime} == {"Job", "PyTorchJob"}  # every stage logs its counts
    for obj in runtime:
        for template in pod_templates(obj):
            env = env_of(template["spec"]["containers"][0])
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
                # user and password, or a token: each key of the Secret may be absent
                assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {
                    "name": "mlflow-creds", "key": key, "optional": True}}}
            assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
                "name": "wandb-key", "key": "WANDB_API_KEY"}}}
    # Without the Secrets (credentials from elsewhere, or no trackers) no such variable is set.
    for run in (make_run(), make_run(tracking={"mlflow": {"trackingUri": "https://mlflow.corp"},
                                               "wandb": {"project": "humpback"}})):
        for obj in render_run(run, CONFIG):
            if obj["kind"] in ("Job", "PyTorchJob"):
                assert not {"MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"} & set(env_of(container_of(obj)))


def test_an_mlflow_file_store_is_a_cluster_problem_naming_the_field():
    assert cluster_problems(make_run(tracking={"mlflow": {"trackingUri": "https://mlflow.corp"}})) == []
    (problem,) = cluster_problems(make_run(tracking={"mlflow": {"trackingUri": "file:./mlruns"}}))
    assert problem.startswith("spec.tracking.mlflow.trackingUri: a cluster run needs an MLflow server")


def test_the_publish_job_gets_the_write_token_by_reference_and_no_other_pod_does():
    run = make_run(huggingface={"tokenSecret": "hf-read"},
                   publish={"hub": {"repoPrefix": "me/demo", "tokenSecret": "hf-write"}})
    objects = render_run(run, CONFIG)
    publish = [o for o in objects if o["metadata"]["labels"].get(LABEL_STAGE) == "publish"]
    assert [o["kind"] for o in publish] == ["Job"]
    container = container_of(publish[0])
    assert container["command"][-4:] == ["stage", "publish", "--spec", "env:HUMPBACK_RUN_SPEC"]
    names = [e["name"] for e in container["env"]]
    assert names.count("HF_TOKEN") == 1  # the write token replaces the read token there
    # Room for one model's upload folder on the /cache volume (a 7B model is ~14 GB).
    assert container["resources"]["limits"]["ephemeral-storage"] == "50Gi"
    assert {"name": "HUMPBACK_CACHE", "value": "/cache"} in container["env"]
    assert env_of(container)["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "hf-write", "key": "HF_TOKEN"}}}
    for obj in objects:
        if obj["kind"] in ("Job", "PyTorchJob") and obj is not publish[0]:
            for template in pod_templates(obj):
                assert env_of(template["spec"]["containers"][0])["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] \
                    == "hf-read"
    # Without a publish token the publish pod pushes with nothing but the read token (or none).
    bare = make_run(publish={"hub": {"repoPrefix": "me/demo", "dryRun": True}})
    job = next(o for o in render_run(bare, CONFIG) if o["metadata"]["labels"].get(LABEL_STAGE) == "publish")
    assert "HF_TOKEN" not in env_of(container_of(job))


def test_the_pod_template_reaches_every_pod_and_a_named_service_account_gets_its_token():
    run = make_run(podTemplate={
        "serviceAccountName": "irsa-runner", "imagePullSecrets": [{"name": "registry"}],
        "env": [{"name": "HF_ENDPOINT", "value": "https://hf-mirror.internal"}, {"name": "HOME", "value": "/work"}],
        "envFrom": [{"secretRef": {"name": "wandb"}}],
        "annotations": {"sidecar.istio.io/inject": "false"}, "labels": {"team": "nlp"}})
    kinds = set()
    for obj in render_run(run, CONFIG):
        for template in pod_templates(obj):
            kinds.add(obj["kind"])
            pod = template["spec"]
            assert pod["serviceAccountName"] == "irsa-runner"
            assert pod["automountServiceAccountToken"] is True  # IRSA / Pod Identity need the token
            assert pod["imagePullSecrets"] == [{"name": "registry"}]
            assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
            assert template["metadata"]["labels"]["team"] == "nlp"
            assert template["metadata"]["labels"]["humpback.dev/run"] == "demo"
            for container in pod["containers"]:
                env = env_of(container)
                assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.internal"
                assert env["HOME"]["value"] == "/work"  # the run's value replaces the operator's
                assert [e["name"] for e in container["env"]].count("HOME") == 1
                assert container["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    assert kinds == {"Job", "PyTorchJob", "Deployment"}


def test_without_a_named_service_account_no_token_is_mounted():
    for config, named in ((CONFIG, False), (OperatorConfig(service_account="runner"), True)):
        for obj in render_run(make_run(), config):
            for template in pod_templates(obj):
                assert template["spec"]["automountServiceAccountToken"] is named


def test_the_run_cannot_set_the_operators_variables_or_labels():
    for pod_template, field in (({"env": [{"name": "HUMPBACK_RUN_SPEC", "value": "x"}]}, "spec.podTemplate.env[0].name"),
                                ({"labels": {"humpback.dev/run": "other"}}, "spec.podTemplate.labels"),
                                ({"envFrom": [{}]}, "spec.podTemplate.envFrom[0]")):
        with pytest.raises(SpecError, match=re.escape(field)):
            make_run(podTemplate=pod_template)


def test_an_s3_compatible_store_gets_a_region_no_instance_metadata_and_no_default_checksums():
    run = make_run(storage={"uri": "s3://bucket/runs", "s3": {"endpoint": "https://storage.googleapis.com",
                                                               "credentialsSecret": "gcs-hmac"}})
    for obj in render_run(run, CONFIG):
        for template in pod_templates(obj):
            env = env_of(template["spec"]["containers"][0])
            assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
            assert env["AWS_EC2_METADATA_DISABLED"]["value"] == "true"
            assert env["AWS_REQUEST_CHECKSUM_CALCULATION"]["value"] == "when_required"
    # On AWS itself: the instance metadata service is how IRSA-less nodes get credentials and region.
    for obj in render_run(make_run(storage={"uri": "s3://bucket/runs"}), CONFIG):
        for template in pod_templates(obj):
            assert not {"AWS_EC2_METADATA_DISABLED", "AWS_REGION"} & set(env_of(template["spec"]["containers"][0]))


# --- inference and vLLM servers -------------------------------------------------------------


def test_augment_gets_a_vllm_server_and_a_client_job_pointing_at_it():
    run = make_run(resources={"inference": {"replicas": 3, "gpusPerReplica": 2, "extraArgs": ["--max-model-len", "4096"],
                                            "cpu": "8", "memory": "64Gi"}})
    built = stage_children(run, "augment")
    key, policy, deployment, service = built.servers
    assert [o["kind"] for o in built.servers] == ["Secret", "NetworkPolicy", "Deployment", "Service"]
    assert len({o["metadata"]["name"] for o in built.servers}) == 1
    assert deployment["metadata"]["name"] == service["metadata"]["name"]
    assert deployment["metadata"]["name"].endswith("-myx")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "Recreate"} and spec["progressDeadlineSeconds"] == 3600
    vllm = spec["template"]["spec"]["containers"][0]
    assert vllm["name"] == "vllm" and vllm["image"] == DEFAULT_VLLM_IMAGE
    assert vllm["args"] == [
        "--model", "s3://bucket/runs/team-a/demo/train-myx/model", "--load-format", "runai_streamer",
        "--served-model-name", "train-myx", "--tensor-parallel-size", "2", "--host", "0.0.0.0", "--port", "8000",
        "--api-key", "$(VLLM_API_KEY)", "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9",
        "--enable-prefix-caching", "--max-model-len", "4096"]
    assert vllm["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "20Gi", "nvidia.com/gpu": 2}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert vllm["startupProbe"]["periodSeconds"] * vllm["startupProbe"]["failureThreshold"] >= 1800
    assert {"name": "dshm", "mountPath": "/dev/shm"} in vllm["volumeMounts"]
    assert env_of(vllm)["HOME"]["value"] == "/tmp"
    # The Service selects exactly the server's pods, on the named port.
    pod_labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"][LABEL_MODEL] == "myx"
    assert service["spec"]["selector"][LABEL_COMPONENT] == "server"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    # The client Job: CPU only, told where the server is.
    client = built.primary
    assert client["kind"] == "Job" and client["metadata"]["labels"][LABEL_COMPONENT] == "client"
    env = env_of(container_of(client))
    assert env["HUMPBACK_ENDPOINT"]["value"] == f"http://{service['metadata']['name']}.team-a.svc:8000/v1"
    assert env["HUMPBACK_SERVED_MODEL"]["value"] == "train-myx"
    pod = client["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in json.dumps(pod)
    # The server requires a key that only this stage's client gets, from a Secret the operator fills.
    name = key["metadata"]["name"]
    assert key["type"] == "Opaque" and "data" not in key and "stringData" not in key
    assert key["metadata"]["annotations"]["humpback.dev/generated-key"] == "apiKey"
    assert env_of(vllm)["VLLM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": name, "key": "apiKey"}}
    assert env["HUMPBACK_SERVER_API_KEY_MYX"]["valueFrom"] == {"secretKeyRef": {"name": name, "key": "apiKey"}}
    # Only that client's pods reach the server's port.
    assert policy["spec"]["podSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= client["spec"]["template"]["metadata"]["labels"].items()
    assert peer["podSelector"]["matchLabels"][LABEL_COMPONENT] == "client"
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}] and policy["spec"]["policyTypes"] == ["Ingress"]
    other_stage = stage_children(run, "curate-1")
    assert not peer["podSelector"]["matchLabels"].items() <= other_stage.primary["spec"]["template"]["metadata"]["labels"].items()


def test_the_spec_vllm_block_sizes_the_server():
    run = make_run(inference={"vllm": {"maxNumSeqs": 512, "gpuMemoryUtilization": 0.85, "maxModelLen": 8192,
                                       "enablePrefixCaching": False, "extraArgs": ["--enable-chunked-prefill"]}})
    server = next(o for o in stage_children(run, "augment").servers if o["kind"] == "Deployment")
    args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--api-key") + 2:] == [
        "--max-num-seqs", "512", "--gpu-memory-utilization", "0.85", "--max-model-len", "8192",
        "--no-enable-prefix-caching", "--enable-chunked-prefill"]


def test_vllm_servers_get_the_inference_node_selection():
    run = make_run(resources={"inference": {"nodeSelector": {"pool": "l40s"},
                                            "tolerations": [{"key": "gpu", "operator": "Exists"}]}})
    deployment = stage_children(run, "curate-1").servers[2]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "l40s"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_vllm_with_a_custom_s3_endpoint_gets_the_streamer_endpoint_and_path_style():
    run = make_run(storage={"uri": "s3://bucket/runs", "s3": {"endpoint": "http://minio:9000"}})
    env = env_of(container_of(stage_children(run, "augment").servers[2]))
    assert env["AWS_ENDPOINT_URL"]["value"] == env["RUNAI_STREAMER_S3_ENDPOINT"]["value"] == "http://minio:9000"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"]["value"] == "0"


def test_evaluate_gets_one_server_per_model_and_a_json_map_of_endpoints():
    run = make_run(evaluation={"enabled": True}, curation={"iterations": 2})
    built = stage_children(run, "evaluate")
    deployments = [o for o in built.servers if o["kind"] == "Deployment"]
    services = [o for o in built.servers if o["kind"] == "Service"]
    assert [o["kind"] for o in built.servers] == ["Secret", "NetworkPolicy", "Deployment", "Service"] * 3
    assert [d["metadata"]["labels"][LABEL_MODEL] for d in deployments] == ["m0", "m1", "m2"]
    endpoints = json.loads(env_of(container_of(built.primary))["HUMPBACK_ENDPOINTS"]["value"])
    assert endpoints == {f"train-m{k}": f"http://{services[k]['metadata']['name']}.team-a.svc:8000/v1"
                         for k in range(3)}
    assert "HUMPBACK_ENDPOINT" not in env_of(container_of(built.primary))


@pytest.mark.parametrize("stage", ["augment", "curate-1", "evaluate"])
def test_served_models_of_inference_stages(stage):
    run = make_run(evaluation={"enabled": True}, curation={"iterations": 1})
    plan = build_plan(run)
    expected = {"augment": ["train-myx"], "curate-1": ["train-m0"], "evaluate": ["train-m0", "train-m1"]}[stage]
    assert served_models(run, plan[stage]) == expected


@pytest.mark.parametrize("stage", ["prepare-seed", "train-m0", "report"])
def test_non_inference_stages_serve_no_model(stage):
    run = make_run()
    assert served_models(run, build_plan(run)[stage]) == []


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_in_process_engines_get_no_servers_and_a_gpu_job(engine):
    run = make_run(inference={"engine": engine},
                   resources={"inference": {"gpusPerReplica": 2, "image": "img:inproc", "nodeSelector": {"pool": "a"}}})
    built = stage_children(run, "curate-1")
    assert built.servers == []
    job = built.primary
    assert job["kind"] == "Job" and job["metadata"]["labels"][LABEL_COMPONENT] == "job"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["containers"][0]["image"] == "img:inproc"
    assert pod["nodeSelector"] == {"pool": "a"}
    assert "HUMPBACK_ENDPOINT" not in env_of(pod["containers"][0])


def test_a_user_endpoint_means_no_operator_servers_and_a_cpu_client():
    run = make_run(inference={"engine": "vllm-server", "endpoint": "http://my-vllm:8000/v1"})
    built = stage_children(run, "augment")
    assert built.servers == []
    pod = built.primary["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(pod)
    assert built.primary["metadata"]["labels"][LABEL_COMPONENT] == "client"


def test_external_rewrite_gets_no_server_and_the_api_key_reference():
    run = make_run(curation={"iterations": 1, "rewrite": {"enabled": True, "endpoint": "https://llm.example/v1",
                                                          "model": "big", "apiKeySecret": "rewrite-key"}})
    built = stage_children(run, "rewrite")  # one stage for all iterations
    assert built.servers == []
    env = env_of(container_of(built.primary))
    assert env["HUMPBACK_REWRITE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "rewrite-key", "key": "apiKey"}
    assert "HUMPBACK_ENDPOINT" not in env
    assert "nvidia.com/gpu" not in json.dumps(built.primary)


def test_self_rewrite_serves_the_previous_model():
    run = make_run(curation={"iterations": 1, "rewrite": {"enabled": True}})
    built = stage_children(run, "rewrite-1")
    assert [o["metadata"]["labels"][LABEL_MODEL] for o in built.servers] == ["m0"] * 4


# --- names, labels, owners ------------------------------------------------------------------


def test_a_new_attempt_changes_only_the_primary_name():
    run = make_run()
    first, second = stage_children(run, "augment", 1), stage_children(run, "augment", 2)
    assert first.servers == second.servers
    assert first.primary["metadata"]["name"].endswith("-a1")
    assert second.primary["metadata"]["name"] == first.primary["metadata"]["name"][:-1] + "2"
    assert second.primary["metadata"]["labels"][LABEL_ATTEMPT] == "2"
    renamed = copy.deepcopy(first.primary)
    for obj in (renamed, second.primary):
        obj["metadata"]["name"] = "x"
        obj["metadata"]["labels"][LABEL_ATTEMPT] = "x"
        obj["spec"]["template"]["metadata"]["labels"][LABEL_ATTEMPT] = "x"
    assert renamed == second.primary


def test_every_child_carries_the_owner_reference_and_the_stage_fingerprint():
    body = {"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
            "metadata": {"name": "demo", "namespace": "team-a", "uid": "1234-abcd"}}
    owner = owner_reference(body)
    assert owner == {"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "name": "demo",
                     "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}
    run = make_run(evaluation={"enabled": True})
    plan = build_plan(run)
    assert build_spec_configmap(run, owner)["metadata"]["ownerReferences"] == [owner]
    for stage in plan.stages:
        built = build_stage_children(run, plan, stage, 1, CONFIG, owner)
        for obj in [*built.servers, built.primary]:
            assert obj["metadata"]["ownerReferences"] == [owner]
            assert obj["metadata"]["namespace"] == "team-a"
            assert obj["metadata"]["annotations"][ANNOTATION_FINGERPRINT] == stage.fingerprint


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_the_primary_ref_names_the_child_that_would_be_built(example, backend):
    # Decisions look children up by this ref and build them only to start them: a ref that differs
    # from the built child would start a second one, or never see the first one finish.
    run = load_run(REPO / "examples" / f"{example}.yaml")
    config = OperatorConfig(training_backend=backend, trainjobs=True)
    plan = build_plan(run)
    kinds = set()
    for stage in plan.stages:
        for attempt in (1, 3):
            primary = build_stage_children(run, plan, stage, attempt, config).primary
            ref = stage_primary_ref(run, stage, attempt, config)
            assert ref == {"apiVersion": primary["apiVersion"], "kind": primary["kind"], "name": primary["metadata"]["name"]}
            kinds.add(ref["kind"])
    assert kinds == {"Job", "TrainJob" if backend == "trainjob" else "PyTorchJob"}


def test_the_kueue_queue_label_goes_on_top_level_children_only():
    run = make_run(labels={QUEUE_LABEL: "gpus", "team": "nlp"})
    for obj in render_run(run, CONFIG):
        assert obj["metadata"]["labels"][QUEUE_LABEL] == "gpus"
        assert "team" not in obj["metadata"]["labels"]
        for template in pod_templates(obj):
            assert QUEUE_LABEL not in template["metadata"]["labels"]


def test_pod_templates_carry_the_child_labels():
    for obj in render_run(make_run(), CONFIG):
        for template in pod_templates(obj):
            assert template["metadata"]["labels"].items() <= obj["metadata"]["labels"].items()
            assert template["metadata"]["labels"].keys() >= {"humpback.dev/run", "humpback.dev/stage",
                                                              "humpback.dev/component"}


# --- the spec ConfigMap and cluster problems ------------------------------------------------


def test_spec_configmap_holds_the_run_with_defaults_and_reduced_metadata():
    run = make_run(labels={"team": "nlp"})
    cm = build_spec_configmap(run, None)
    assert cm["metadata"]["name"] == "demo-spec"
    data = yaml.safe_load(cm["data"]["run.yaml"])
    assert data["metadata"] == {"name": "demo", "namespace": "team-a"}
    again = parse_run(data)
    assert again.spec == run.spec
    assert build_plan(again).names() == build_plan(run).names()
    assert [s.fingerprint for s in build_plan(again).stages] == [s.fingerprint for s in build_plan(run).stages]


def test_spec_configmap_fingerprint_changes_with_the_spec():
    a = build_spec_configmap(make_run(), None)
    b = build_spec_configmap(make_run(retries={"limit": 1}), None)
    assert a["metadata"]["annotations"][ANNOTATION_FINGERPRINT] != b["metadata"]["annotations"][ANNOTATION_FINGERPRINT]


def test_local_storage_is_a_cluster_problem_and_s3_is_not():
    assert cluster_problems(make_run()) == []
    local = make_run(storage={"uri": "./runs"})
    assert cluster_problems(local) == [
        "spec.storage.uri: a cluster run needs s3:// storage (pods share nothing else), got ./runs"]


def test_local_sources_and_base_model_are_not_cluster_problems():
    run = make_run(baseModel="/models/llama", seed={"source": "/data/seed.jsonl"}, corpus={"source": "data/c.jsonl"})
    assert cluster_problems(run) == []


# --- outcomes -------------------------------------------------------------------------------


def cond(type_, status, reason="", message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_job_outcome_reads_every_condition_not_only_the_last():
    failed_first = {"status": {"conditions": [cond("Failed", "True", "BackoffLimitExceeded", "pod failed"),
                                              cond("Suspended", "False")]}}
    assert job_outcome(failed_first) == ("Failed", "BackoffLimitExceeded: pod failed")
    complete = {"status": {"conditions": [cond("SuccessCriteriaMet", "True"), cond("Complete", "True"),
                                          cond("Failed", "False")]}}
    assert job_outcome(complete)[0] == "Succeeded"


def test_job_outcome_counts_failure_target_and_ignores_false_conditions():
    assert job_outcome({"status": {"conditions": [cond("FailureTarget", "True", "PodFailed")]}})[0] == "Failed"
    assert job_outcome({"status": {"conditions": [cond("Failed", "False"), cond("Complete", "False")]}}) == (None, "")
    assert job_outcome({}) == (None, "")
    assert job_outcome({"status": {}}) == (None, "")


def test_pytorchjob_outcome_reads_every_condition():
    backend = get_backend("pytorchjob")
    running = {"status": {"conditions": [cond("Created", "True"), cond("Running", "True")]}}
    assert backend.outcome(running) == (None, "")
    failed = {"status": {"conditions": [cond("Created", "True"), cond("Failed", "True", "PyTorchJobFailed", "exit 1"),
                                        cond("Running", "False")]}}
    assert backend.outcome(failed) == ("Failed", "PyTorchJobFailed: exit 1")
    succeeded = {"status": {"conditions": [cond("Running", "False"), cond("Succeeded", "True", "PyTorchJobSucceeded")]}}
    assert backend.outcome(succeeded) == ("Succeeded", "PyTorchJobSucceeded")
    assert backend.outcome({"status": {"conditions": [cond("Succeeded", "False")]}}) == (None, "")


def test_trainjob_outcome_reads_complete_and_failed():
    backend = get_backend("trainjob")
    assert backend.outcome({"status": {"conditions": [cond("Failed", "True", "JobFailed"), cond("Created", "True")]}})[0] == "Failed"
    assert backend.outcome({"status": {"conditions": [cond("Complete", "True")]}})[0] == "Succeeded"
    assert backend.outcome({"status": {"conditions": [cond("Complete", "False")]}})[0] is None


def test_server_state_from_conditions_and_available_replicas():
    assert server_state({"status": {"conditions": [cond("Available", "True", message="ready")]}}) == ("Available", "ready")
    assert server_state({"status": {"availableReplicas": 1, "conditions": [cond("Available", "False")]}})[0] == "Available"
    deadline = {"status": {"conditions": [cond("Progressing", "False", "ProgressDeadlineExceeded", "too slow"),
                                          cond("Available", "False")]}}
    assert server_state(deadline) == ("Failed", "ProgressDeadlineExceeded: too slow")
    assert server_state({"status": {"conditions": [cond("Progressing", "True", "ReplicaSetUpdated")]}})[0] == "Progressing"
    assert server_state({})[0] == "Progressing"


# --- backends and config --------------------------------------------------------------------


def test_backends_name_their_api():
    assert (PyTorchJobBackend().api_version, PyTorchJobBackend.plural) == ("kubeflow.org/v1", "pytorchjobs")
    assert (TrainJobBackend().api_version, TrainJobBackend.kind) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    with pytest.raises(ValueError, match="unknown training backend"):
        get_backend("mpijob")


def test_trainjob_backend_carries_command_resources_and_node_selection():
    run = make_run(resources={"training": {"nodes": 2, "gpusPerNode": 8}})
    job = stage_children(run, "train-m0", config=OperatorConfig(training_backend="trainjob")).primary
    trainer = job["spec"]["trainer"]
    assert job["kind"] == "TrainJob" and job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["command"][:2] == ["torchrun", "--nproc-per-node=8"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert "podSpecOverrides" not in job["spec"] and "labels" not in job["spec"]  # gone in Trainer v2.1/v2.2
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "humpback.dev/operator"
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    pod = replicated["template"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}} in pod["spec"]["volumes"]


def test_trainjob_keeps_our_pod_template_security_context_and_labels():
    run = make_run(podTemplate={"serviceAccountName": "irsa", "imagePullSecrets": [{"name": "reg"}],
                                "labels": {"team": "nlp"}, "annotations": {"a": "b"}})
    pytorch = stage_children(run, "train-m0").primary["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    job = stage_children(run, "train-m0", config=OperatorConfig(training_backend="trainjob")).primary
    template = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
    pod = template["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    # The same pod metadata, security contexts, volumes and identity as the PyTorchJob's pods.
    assert pod["metadata"] == pytorch["metadata"]
    assert pod["metadata"]["labels"]["humpback.dev/stage"] == "train-m0" and pod["metadata"]["labels"]["team"] == "nlp"
    for key in ("securityContext", "serviceAccountName", "imagePullSecrets", "volumes", "nodeSelector"):
        assert pod["spec"][key] == pytorch["spec"][key], key
    (container,) = pod["spec"]["containers"]
    ours = pytorch["spec"]["containers"][0]
    assert container == {"name": "node", "securityContext": ours["securityContext"], "volumeMounts": ours["volumeMounts"]}
    assert job["spec"]["trainer"]["env"] == ours["env"]
    assert template["metadata"]["labels"]["humpback.dev/run"] == "demo"  # the JobSet


def test_a_run_chooses_its_training_backend_where_the_cluster_enables_it():
    run = make_run(trainingBackend="trainjob")
    assert stage_children(run, "train-m0", config=OperatorConfig(trainjobs=True)).primary["kind"] == "TrainJob"
    assert stage_children(make_run(trainingBackend="pytorchjob"), "train-m0",
                          config=OperatorConfig(training_backend="trainjob")).primary["kind"] == "PyTorchJob"
    assert cluster_problems(run, OperatorConfig()) == [
        "spec.trainingBackend: trainjob (Kubeflow Trainer v2) is not enabled on this cluster (the chart's rbac.trainJobs)"]
    assert cluster_problems(run, OperatorConfig.from_env({"HUMPBACK_TRAINJOBS": "true"})) == []


def test_render_with_the_trainjob_backend_shows_trainjobs(tmp_path):
    env = {**os.environ, "HUMPBACK_TRAINING_BACKEND": "trainjob"}
    out = subprocess.run([sys.executable, "-m", "humpback_runtime", "render", str(REPO / "examples" / "llama2-7b-paper.yaml")],
                         env=env, capture_output=True, text=True, check=True).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(out) if d]
    assert "TrainJob" in kinds and "PyTorchJob" not in kinds


def test_config_from_env_reads_the_settings_and_names_the_variable_on_errors():
    config = OperatorConfig.from_env({"HUMPBACK_RUNTIME_IMAGE": "r:1", "HUMPBACK_VLLM_IMAGE": "v:1",
                                      "HUMPBACK_SERVICE_ACCOUNT": "runner", "HUMPBACK_TRAINING_BACKEND": ""})
    assert config == OperatorConfig(runtime_image="r:1", vllm_image="v:1", service_account="runner")
    assert OperatorConfig.from_env({}) == OperatorConfig()
    with pytest.raises(ValueError, match="^HUMPBACK_TRAINING_BACKEND: expected one of pytorchjob, trainjob, got 'mpi'"):
        OperatorConfig.from_env({"HUMPBACK_TRAINING_BACKEND": "mpi"})
    trainjob = OperatorConfig.from_env({"HUMPBACK_TRAINING_BACKEND": "trainjob"})
    assert trainjob.training_backend == "trainjob" and trainjob.trainjobs
    with pytest.raises(ValueError, match="^HUMPBACK_SERVICE_ACCOUNT:"):
        OperatorConfig.from_env({"HUMPBACK_SERVICE_ACCOUNT": "Not_A_Name"})
    with pytest.raises(ValueError, match="^HUMPBACK_VLLM_IMAGE:"):
        OperatorConfig.from_env({"HUMPBACK_VLLM_IMAGE": "two words"})


def test_config_rejects_an_invalid_port():
    with pytest.raises(ValueError, match="vllm_port"):
        OperatorConfig(vllm_port=70000)


# --- contracts and boundaries ---------------------------------------------------------------


def test_model_uri_matches_the_runtime_layout():
    from humpback_runtime.context import RunContext
    from humpback_runtime.inference.models import model_prefix

    run = make_run()
    ctx = RunContext.create(run)
    assert ch.model_uri(run, "train-m1") == f"s3://bucket/runs/{model_prefix(ctx, 'train-m1')}"


BUILDER_MODULES = ["config", "names", "children", "backends"]
ALLOWED_IMPORTS = {"humpback_runtime.spec", "humpback_runtime.plan", "humpback_runtime.pod_contract",
                   "humpback_runtime.errors", "humpback_runtime.layout", "yaml"}


@pytest.mark.parametrize("module", BUILDER_MODULES)
def test_builders_import_only_the_light_runtime_modules_yaml_and_the_standard_library(module):
    path = REPO / "operator" / "humpback_operator" / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    own = {f"humpback_operator.{m}" for m in BUILDER_MODULES}
    foreign = {m for m in imported - ALLOWED_IMPORTS - own - {"__future__"}
               if m.split(".")[0] not in sys.stdlib_module_names}
    assert foreign == set(), f"{module}.py imports {sorted(foreign)}"


# --- humpback render --------------------------------------------------------------------------


def test_humpback_render_prints_every_kind_as_a_yaml_stream():
    humpback = Path(sys.executable).parent / "humpback"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUMPBACK_")}
    result = subprocess.run([str(humpback), "render", "examples/llama2-7b-paper.yaml"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert {"ConfigMap", "PyTorchJob", "Deployment", "Service", "Job"} <= {d["kind"] for d in docs}
    assert result.stdout.startswith("# ")
    for doc in docs:
        assert f"# {doc['metadata']['labels'].get('humpback.dev/stage', 'run')}: {doc['kind']} {doc['metadata']['name']}\n" in result.stdout
    assert "warning" not in result.stderr  # the example is a valid cluster run


def test_humpback_render_warns_about_cluster_problems_but_still_renders(tmp_path):
    humpback = Path(sys.executable).parent / "humpback"
    out = tmp_path / "objects.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUMPBACK_")}
    env["HUMPBACK_RUNTIME_IMAGE"] = "registry.example/humpback-runtime:dev"
    result = subprocess.run([str(humpback), "render", "examples/tiny-cpu.yaml", "-o", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "warning: spec.storage.uri: a cluster run needs s3:// storage" in result.stderr
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d is not None]
    assert len(docs) == len(render_run(load_run(REPO / "examples" / "tiny-cpu.yaml"), CONFIG))
    assert "registry.example/humpback-runtime:dev" in out.read_text()


# --- resources a scheduler and a quota can work with; deadlines; disruptions (issue 11) ---------


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_pod_of_the_examples_has_requests_limits_size_limits_and_a_deadline(example):
    for obj in render_run(load_run(REPO / "examples" / f"{example}.yaml"), CONFIG):
        for template in pod_templates(obj):
            pod = template["spec"]
            for container in pod["containers"]:
                for part in ("requests", "limits"):
                    amounts = container["resources"][part]
                    assert {"cpu", "memory", "ephemeral-storage"} <= set(amounts), (obj["metadata"]["name"], part)
            for volume in pod.get("volumes", []):
                assert volume["emptyDir"].get("sizeLimit"), (obj["metadata"]["name"], volume["name"])
        if obj["kind"] == "Job":
            assert obj["spec"]["activeDeadlineSeconds"] > 0
            assert obj["spec"]["podFailurePolicy"]["rules"][0] == {
                "action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        if obj["kind"] == "PyTorchJob":
            assert obj["spec"]["runPolicy"]["activeDeadlineSeconds"] == 72 * 3600


def test_gpu_pods_get_cpu_and_memory_from_the_gpus_they_ask_for():
    run = make_run(resources={"training": {"gpusPerNode": 4}, "inference": {"gpusPerReplica": 2}})
    (trainer,) = pod_templates(stage_children(run, "train-m0").primary)[0]["spec"]["containers"]
    assert trainer["resources"]["requests"] == {"cpu": "32", "memory": "384Gi", "ephemeral-storage": "200Gi"}
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 4
    server = next(o for o in stage_children(run, "augment").servers if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert server["containers"][0]["resources"]["requests"]["memory"] == "192Gi"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in server["volumes"]


def test_deadlines_come_from_the_stage_kind_and_zero_means_none():
    run = make_run(resources={"cpu": {"timeout": "1h30m"}, "inference": {"timeout": "0s"}, "training": {"timeout": "2h"}})
    assert stage_children(run, "prepare-seed").primary["spec"]["activeDeadlineSeconds"] == 5400
    assert "activeDeadlineSeconds" not in stage_children(run, "augment").primary["spec"]  # a client: inference's
    assert stage_children(run, "train-m0").primary["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    with pytest.raises(SpecError, match="timeout"):
        make_run(resources={"cpu": {"timeout": "3 days"}})


def test_jobs_fail_fast_on_the_runtimes_bad_input_exit_codes():
    rules = stage_children(make_run(), "prepare-seed").primary["spec"]["podFailurePolicy"]["rules"]
    assert rules[1] == {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2, 4]}}


def test_priority_class_affinity_and_topology_spread_are_passed_through():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"humpback.dev/run": "demo"}}}]
    run = make_run(resources={"training": {"priorityClassName": "gpu-high", "affinity": affinity,
                                           "topologySpreadConstraints": spread}})
    pod = pod_templates(stage_children(run, "train-m0").primary)[0]["spec"]
    assert (pod["priorityClassName"], pod["affinity"], pod["topologySpreadConstraints"]) == ("gpu-high", affinity, spread)
    assert "priorityClassName" not in stage_children(run, "prepare-seed").primary["spec"]["template"]["spec"]


def test_kueue_priority_class_label_is_passed_on_beside_the_queue_name():
    run = make_run(labels={QUEUE_LABEL: "gpus", PRIORITY_CLASS_LABEL: "research"})
    for obj in render_run(run, CONFIG)[1:]:
        assert obj["metadata"]["labels"][PRIORITY_CLASS_LABEL] == "research"
        for template in pod_templates(obj):
            assert PRIORITY_CLASS_LABEL not in template["metadata"]["labels"]


def test_a_checkpoint_volume_per_pod_or_an_existing_claim_holds_the_training_pods_checkpoints():
    run = make_run(resources={"training": {"nodes": 2, "checkpointVolume": {"size": "500Gi", "storageClassName": "fast"}}})
    job = stage_children(run, "train-m0").primary
    for template in pod_templates(job):  # the master's and the worker's: a claim each
        pod = template["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "checkpoints"]
        assert volume["ephemeral"]["volumeClaimTemplate"]["spec"] == {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "fast", "resources": {"requests": {"storage": "500Gi"}}}
        assert volume["ephemeral"]["volumeClaimTemplate"]["metadata"]["labels"]["humpback.dev/stage"] == "train-m0"
        (trainer,) = pod["containers"]
        assert {"name": "checkpoints", "mountPath": "/checkpoints"} in trainer["volumeMounts"]
        assert env_of(trainer)["HUMPBACK_WORK_DIR"]["value"] == "/checkpoints"
        # The checkpoints no longer need the pod's ephemeral storage: the base model's share is left.
        assert trainer["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    claim = make_run(resources={"training": {"checkpointVolume": {"claimName": "ckpt"}}})
    pod = pod_templates(stage_children(claim, "train-m0").primary)[0]["spec"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}} in pod["volumes"]
    # Without one, checkpoints stay in ephemeral storage, sized for them; other stages never get one.
    (trainer,) = pod_templates(stage_children(make_run(), "train-m0").primary)[0]["spec"]["containers"]
    assert "HUMPBACK_WORK_DIR" not in env_of(trainer) and trainer["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    assert "HUMPBACK_WORK_DIR" not in env_of(container_of(stage_children(run, "prepare-seed").primary))


@pytest.mark.parametrize("volume, error", [
    ({}, "exactly one of claimName"),
    ({"claimName": "a", "size": "1Ti"}, "exactly one of claimName"),
    ({"claimName": "a", "storageClassName": "fast"}, "storageClassName goes with size"),
    ({"size": "lots"}, "checkpointVolume.size"),
    ({"claimName": "Not_A_Name"}, "checkpointVolume.claimName"),
])
def test_a_bad_checkpoint_volume_is_refused_naming_the_field(volume, error):
    with pytest.raises(SpecError, match=error) as e:
        make_run(resources={"training": {"checkpointVolume": volume}})
    assert "resources.training.checkpointVolume" in str(e.value)


def test_the_docs_list_the_resource_defaults_the_code_computes():
    table = ch.resource_defaults_table()
    for doc in ("charts/humpback-operator/README.md", "docs/quickstart.md"):
        assert table in (REPO / doc).read_text(), f"{doc}: paste children.resource_defaults_table() again"
    # The table is what the builders give a pod of the default spec.
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    run = make_run()
    (trainer,) = pod_templates(stage_children(run, "train-m0").primary)[0]["spec"]["containers"]
    assert f"({trainer['resources']['requests']['cpu']})" in rows["training (PyTorchJob)"][2]
    assert f"({trainer['resources']['requests']['memory']})" in rows["training (PyTorchJob)"][3]
    assert rows["training (PyTorchJob)"][4].startswith(trainer["resources"]["requests"]["ephemeral-storage"])
    server = next(o for o in stage_children(run, "augment").servers if o["kind"] == "Deployment")
    assert rows["vLLM server"][4].startswith(container_of(server)["resources"]["requests"]["ephemeral-storage"])
    job = container_of(stage_children(run, "prepare-seed").primary)["resources"]["requests"]
    assert rows["CPU Jobs: prepare, report, inference clients"][2:5] == [job["cpu"], job["memory"], job["ephemeral-storage"]]
