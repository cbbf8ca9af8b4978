"""The user's path with a real kubectl: install the CRD, apply the examples, list and read them
back, change a run's status, delete them, against the emulated API server.

Everything below runs as a user types it, `kubectl apply -f` included, with kubectl's default
strict validation: the emulator serves the part of /openapi/v3 that tells kubectl the server
validates fields itself (the PATCH operations' `fieldValidation` parameter), and then rejects
unknown fields when kubectl asks with fieldValidation=Strict, as kube-apiserver does.

What kubectl cannot do against the emulator (not needed here): `kubectl explain` (no OpenAPI
schemas are served), `kubectl logs`/`exec` (no pods run), `--server-side` apply (approximated as
a merge without field managers), CEL validation rules of the CRD (only the OpenAPI schema is
checked), and `kubectl apply -f manifests/crd/` on the directory: kubectl would also read
kustomization.yaml as a manifest, on a real cluster too, so the CRD is applied by file or with -k.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from humpback_testing.kube import Emulator, write_kubeconfig
from humpback_testing.kube import kube_env as make_kube_env
from humpback_testing.standins import PYTORCHJOB_CRD

REPO_ROOT = Path(__file__).resolve().parents[2]

EXAMPLES = ("tiny-cpu", "llama2-7b-paper")
CRD_FILE = "manifests/crd/humpback.dev_backtranslationruns.yaml"


@pytest.fixture
def run_kubectl(kubectl, kube_env):
    """kubectl in the repository root with the emulator's kubeconfig; fails the test on an error
    unless `check=False`."""

    def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(kubectl), *args], cwd=REPO_ROOT, env=env or kube_env, capture_output=True,
                                text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run


def spec_of(example: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "examples" / f"{example}.yaml").read_text())["spec"]


def test_examples_apply_list_read_back_and_delete(run_kubectl, kube_emulator):
    for example in EXAMPLES:
        assert f"backtranslationrun.humpback.dev/{example} created" in run_kubectl("apply", "-n", "default", "-f", f"examples/{example}.yaml").stdout
    assert "unchanged" in run_kubectl("apply", "-n", "default", "-f", "examples/tiny-cpu.yaml").stdout

    listing = run_kubectl("get", "btr")
    assert listing.stderr == ""  # e.g. no "short name could also match" warning
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "MESSAGE", "STAGE", "PROGRESS", "AGE"]  # Stage Progress: inside the running stage
    assert sorted(row.split()[0] for row in rows) == sorted(EXAMPLES)

    for example in EXAMPLES:
        # -o json: kubectl's YAML writes 1e-05 for 1.0e-5, which PyYAML (YAML 1.1) reads as a string.
        stored = json.loads(run_kubectl("get", "btr", example, "-o", "json").stdout)
        assert stored["spec"] == spec_of(example)
        assert f"name: {example}" in run_kubectl("get", "btr", example, "-o", "yaml").stdout
        assert stored["metadata"]["namespace"] == "default" and stored["metadata"]["uid"]
        assert "kubectl.kubernetes.io/last-applied-configuration" in stored["metadata"]["annotations"]
    # In key order (by name), as an API server lists them, not in the order they were applied.
    assert run_kubectl("get", "backtranslationruns.humpback.dev", "-o", "name").stdout.split() == [
        "backtranslationrun.humpback.dev/llama2-7b-paper", "backtranslationrun.humpback.dev/tiny-cpu"]

    for example in EXAMPLES:
        assert f'"{example}" deleted' in run_kubectl("delete", "-n", "default", "-f", f"examples/{example}.yaml").stdout
    assert "No resources found" in run_kubectl("get", "btr").stderr
    assert kube_emulator.list("humpback.dev/v1alpha1/backtranslationruns") == []


def test_a_changed_file_is_applied_as_a_patch(run_kubectl, kube_emulator, tmp_path):
    run_kubectl("apply", "-n", "default", "-f", "examples/tiny-cpu.yaml")
    doc = yaml.safe_load((REPO_ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["spec"]["curation"]["iterations"] = 3
    del doc["spec"]["evaluation"]
    changed = tmp_path / "tiny-cpu.yaml"
    changed.write_text(yaml.safe_dump(doc))
    assert "configured" in run_kubectl("apply", "-n", "default", "-f", str(changed)).stdout
    stored = kube_emulator.get("humpback.dev/v1alpha1/backtranslationruns", "tiny-cpu")
    assert stored["spec"]["curation"]["iterations"] == 3 and "evaluation" not in stored["spec"]
    assert stored["metadata"]["generation"] == 2


def test_a_typo_in_a_run_is_refused_by_kubectl_apply(run_kubectl, tmp_path):
    doc = yaml.safe_load((REPO_ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["spec"]["curation"]["iteratons"] = 3
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(doc))
    result = run_kubectl("apply", "-n", "default", "-f", str(typo), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.curation.iteratons"' in result.stderr


def test_status_written_through_the_subresource_shows_in_get_and_wait(run_kubectl):
    run_kubectl("apply", "-n", "default", "-f", "examples/tiny-cpu.yaml")
    run_kubectl("patch", "btr", "tiny-cpu", "--subresource=status", "--type=merge",
                "-p", '{"status": {"phase": "Running", "stage": "train-m0", "progress": "2/10", '
                '"message": "train-m0: attempt 1: Unschedulable: pod p: 0/12 nodes are available"}}')
    run_kubectl("wait", "btr/tiny-cpu", "--for=jsonpath={.status.phase}=Running", "--timeout=10s")
    row = run_kubectl("get", "btr", "tiny-cpu", "--no-headers").stdout.split()
    assert row[:5] == ["tiny-cpu", "Running", "train-m0", "2/10", "train-m0:"]
    assert "Unschedulable: pod p: 0/12 nodes are available" in " ".join(row)  # the Message column
    # The main resource ignores status changes, as on a cluster.
    run_kubectl("patch", "btr", "tiny-cpu", "--type=merge", "-p", '{"status": {"phase": "Failed"}}')
    assert run_kubectl("get", "btr", "tiny-cpu", "-o", "jsonpath={.status.phase}").stdout == "Running"


def test_the_crd_installs_from_its_file_and_with_kustomize(kubectl, tmp_path):
    with Emulator(crds=[PYTORCHJOB_CRD]) as kube:
        home = tmp_path / "home"
        home.mkdir()
        env = make_kube_env(write_kubeconfig(tmp_path / "kubeconfig", kube.url), HOME=str(home))

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            result = subprocess.run([str(kubectl), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
            return result

        assert "the server doesn't have a resource type" in subprocess.run(
            [str(kubectl), "get", "btr"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False).stderr
        assert "backtranslationruns.humpback.dev created" in run("apply", "-f", CRD_FILE).stdout
        assert "backtranslationruns.humpback.dev unchanged" in run("apply", "-k", "manifests/crd").stdout
        run("wait", "--for=condition=Established", "crd/backtranslationruns.humpback.dev", "--timeout=10s")
        assert "backtranslationruns.humpback.dev" in run("get", "crd").stdout
        run("apply", "-n", "default", "-f", "examples/tiny-cpu.yaml")  # kubectl rediscovers the new kind
        assert run("get", "btr", "-o", "name").stdout.split() == ["backtranslationrun.humpback.dev/tiny-cpu"]
        run("delete", "-f", CRD_FILE)
        assert kube.list("apiextensions.k8s.io/v1/customresourcedefinitions") == [
            kube.get("apiextensions.k8s.io/v1/customresourcedefinitions", "pytorchjobs.kubeflow.org", None)]


def test_kubectl_reads_the_children_kinds(run_kubectl, kube_api):
    kubernetes = pytest.importorskip("kubernetes")
    kubernetes.client.BatchV1Api(kube_api).create_namespaced_job("default", {
        "metadata": {"name": "tiny-cpu-prepare-seed-abcdef-a1", "labels": {"humpback.dev/run": "tiny-cpu"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "x"}]}}}})
    assert run_kubectl("get", "jobs", "-l", "humpback.dev/run=tiny-cpu", "-o", "name").stdout.split() == [
        "job.batch/tiny-cpu-prepare-seed-abcdef-a1"]
    assert run_kubectl("get", "pytorchjobs,deployments,services", "-o", "name").stdout == ""
    assert Path(REPO_ROOT / "examples").is_dir()


def test_kubectl_get_shows_the_running_stage_progress(run_kubectl):
    run_kubectl("apply", "-n", "default", "-f", "examples/tiny-cpu.yaml")
    run_kubectl("patch", "btr", "tiny-cpu", "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
        "phase": "Running", "stage": "curate-1", "progress": "5/11",
        "stageProgress": "curate-1 120/400 records (30%), ETA 1m08s",
        "stages": [{"name": "curate-1", "phase": "Running", "attempt": 1,
                    "progress": {"done": 120, "total": 400, "unit": "records", "etaSeconds": 68.0,
                                 "summary": "120/400 records (30%), ETA 1m08s"}}]}}))
    header, row = run_kubectl("get", "btr", "tiny-cpu").stdout.splitlines()
    assert header.split()[:7] == ["NAME", "PHASE", "STAGE", "PROGRESS", "MESSAGE", "STAGE", "PROGRESS"]
    assert "curate-1 120/400 records (30%), ETA 1m08s" in row
    # The stage's own copy survives the CRD's schema (unknown fields would be pruned).
    done = run_kubectl("get", "btr", "tiny-cpu", "-o", "jsonpath={.status.stages[0].progress.done}").stdout
    assert done == "120"
