"""End to end: the operator creates the children, and a stand-in kubelet really runs each child's
container command on this machine, with the environment the operator wrote (the spec from the
ConfigMap, S3 credentials from a Secret), against a moto S3 server.

This proves that the commands and environment in the operator's Jobs and PyTorchJobs work: the
tiny demo run goes from `prepare-seed` to `report` on CPU, and the artifacts land in S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_operator import cluster, explain, start_operator, tiny_run, wait_for  # noqa: F401  (fixtures too)

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("torch", reason="the model stages need the train extra")

# About a minute on an idle 2-core machine; allow for a loaded one.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO_ROOT / ".cache" / "tiny-llama"
SECRET = "humpback-e2e-secret-7f3c9a1d"


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    subprocess.run([str(Path(sys.executable).parent / "humpback"), "tiny-model", str(TINY_MODEL)],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    return TINY_MODEL


def test_the_tiny_run_really_runs_from_the_operators_children(cluster, start_operator, make_standins, kube_api,
                                                                s3_bucket, s3_server, s3_client, tiny_model, tmp_path):
    # Credentials reach pods only through the Secret the spec names.
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_secret("default", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "humpback-s3"},
        # moto takes any key; a distinctive one lets the test look for leaks below.
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIAHUMPBACKE2E", "AWS_SECRET_ACCESS_KEY": SECRET},
    })
    doc = tiny_run(s3_bucket, s3_server, name="tiny-e2e")
    doc["spec"]["storage"]["s3"]["credentialsSecret"] = "humpback-s3"
    doc["spec"]["storage"]["s3"]["region"] = "us-east-1"
    doc["spec"]["baseModel"] = str(tiny_model)
    doc["spec"]["inference"]["engine"] = "transformers"  # in-process: no vLLM server on this machine
    doc["spec"]["resources"] = {
        "training": {"gpusPerNode": 0, "nodeSelector": {}},
        "inference": {"gpusPerReplica": 0, "nodeSelector": {}},
    }
    doc["spec"]["retries"] = {"limit": 0, "backoffSeconds": 0}
    # What this proves is the pods' commands and environment, not the method (test_full_run runs the
    # demo whole): one curation iteration, fewer documents, steps and prompts keep it to every kind of
    # child (Jobs, PyTorchJobs, the multi-model evaluate Job) at a third of the demo's cost.
    doc["spec"]["curation"]["iterations"] = 1
    doc["spec"]["corpus"]["maxDocuments"] = 60
    for role in ("backward", "seed", "forward"):
        doc["spec"]["training"][role] = {**doc["spec"]["training"][role], "steps": 10, "checkpointEvery": 5}
    prompts_file = tmp_path / "eval.jsonl"
    prompts_file.write_text("".join(f'{{"id": "q{i}", "instruction": "Name a colour, number {i}."}}\n' for i in range(8)))
    doc["spec"]["evaluation"]["sets"] = [{"name": "colours", "source": str(prompts_file)}]

    # The kubelet's own environment has no AWS credentials: pods get them from the Secret.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    standins = make_standins(kubelet=True, env=base_env, concurrency=2, env_overrides={
        "HOME": str(tmp_path / "home"), "HUMPBACK_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
    })
    op = start_operator()
    cluster.create_run(doc)
    wait_for(lambda: cluster.status("tiny-e2e").get("phase") in ("Succeeded", "Failed"), 840, "the run to finish",
             explain(cluster, "tiny-e2e", op))

    status = cluster.status("tiny-e2e")
    if status["phase"] != "Succeeded":
        logs = "\n".join(f"--- {name} ---\n" + Path(path).read_text(errors="replace")[-3000:]
                         for name, path in standins.logs.items() if standins.exit_codes.get(name))
        pytest.fail(f"run failed: {status.get('message')}\n{logs}")
    assert all(code == 0 for code in standins.exit_codes.values())
    assert {k for k in standins.seen} >= {"Job", "PyTorchJob"}

    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/default/tiny-e2e/")
            for o in page.get("Contents", [])}
    for stage in ("prepare-seed", "prepare-corpus", "train-myx", "train-m0", "augment", "curate-1",
                  "train-m1", "evaluate", "report"):
        assert f"runs/default/tiny-e2e/{stage}/_SUCCESS.json" in keys, stage
    assert "runs/default/tiny-e2e/report/index.html" in keys
    assert any(k.startswith("runs/default/tiny-e2e/train-m1/model/") and k.endswith(".safetensors") for k in keys)

    # No credential in the spec, status, Events, children or the operator's log: only references.
    run = cluster.run("tiny-e2e")
    children = [o for resource in ("jobs", "pytorchjobs", "configmaps") for o in cluster.children("tiny-e2e", resource)]
    for where, text in [("run", str(run)), ("events", str(cluster.events("tiny-e2e"))),
                        ("children", str(children)), ("operator log", op.log.read_text(errors="replace"))]:
        assert SECRET not in text, f"the secret leaked into the {where}"
    assert "secretKeyRef" in str(children)
