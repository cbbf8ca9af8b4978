"""The kustomize bases in manifests/: every kustomization builds and its objects are valid
Kubernetes; RBAC and the operator Deployment are what the Helm chart renders (default values, and
a one-namespace watch for overlays/single-namespace); the sample runs pass `humpback validate` and
the CRD's schema. No cluster needed; kubectl and helm come from `bash scripts/kube_tools.sh` (the
tests that need them skip without them).

    .venv/bin/pytest tests/deploy -q
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from humpback_runtime.spec import KIND, load_run

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(ROOT)) for p in MANIFESTS.rglob("kustomization.yaml"))
EXPECTED = {"manifests/crd", "manifests/rbac", "manifests/operator", "manifests/default",
            "manifests/overlays/single-namespace", "manifests/samples"}
SAMPLES = sorted((MANIFESTS / "samples").glob("*.*.yaml"))
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# The plain manifests run one standalone replica (peering and its CRDs come with the chart only).
PLAIN = ("--set", "replicaCount=1")
ONE_NAMESPACE = (*PLAIN, "--set", "watch.allNamespaces=false", "--set", "watch.namespaces={ml-experiments}")


def _crd_test_helpers():
    """tests/unit/runtime/test_crd.py, for its offline stand-in of the API server's schema checks
    (crd_errors, prune, openapi_schema); imported, not copied, under a name of its own."""
    name = "humpback_tests_unit_runtime_test_crd"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "unit" / "runtime" / "test_crd.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_crd = _crd_test_helpers()


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def without_labels(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without metadata labels and annotations (the chart adds Helm's)."""
    metadata = {k: v for k, v in obj["metadata"].items() if k not in ("labels", "annotations")}
    return {**obj, "metadata": metadata}


def of_kinds(objs: list[dict[str, Any]], kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    return sorted((without_labels(o) for o in objs if o["kind"] in kinds), key=key)


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == kind]
    return found


def resources_of(rules: list[dict[str, Any]]) -> set[str]:
    return {r for rule in rules for r in rule["resources"]}


def rule_comments(text: str) -> list[str]:
    """The comment lines inside the rules: lists of a YAML text, in order."""
    comments, inside = [], False
    for line in text.splitlines():
        if line.startswith("---"):
            inside = False
        elif line.startswith("rules:"):
            inside = True
        elif inside and line and not line.startswith((" ", "-", "#")):
            inside = False
        elif inside and line.strip().startswith("#"):
            comments.append(line.strip())
    return comments


# --- every kustomization builds valid objects -----------------------------------------------


def test_the_expected_kustomizations_exist():
    assert EXPECTED <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomization_builds_valid_objects(kustomize, k8s_validate, directory):
    objs = kustomize(directory)
    assert objs
    for obj in objs:
        if obj["kind"] == KIND:
            assert _crd.crd_errors(obj) == [], obj["metadata"]["name"]  # not a core kind: the CRD's schema
        else:
            k8s_validate(obj)


def test_default_composes_namespace_crd_rbac_and_operator(kustomize):
    objs = kustomize("manifests/default")
    kinds = {key(o) for o in objs}
    assert ("Namespace", "", "humpback-system") in kinds
    assert ("Deployment", "humpback-system", "humpback-operator") in kinds
    assert ("ServiceAccount", "humpback-system", "humpback-operator") in kinds
    crd = one(objs, "CustomResourceDefinition")
    assert crd == yaml.safe_load((MANIFESTS / "crd" / "humpback.dev_backtranslationruns.yaml").read_text())
    parts = {key(o) for d in ("manifests/crd", "manifests/rbac", "manifests/operator") for o in kustomize(d)}
    assert kinds == parts | {("Namespace", "", "humpback-system")}
    namespaced = [o for o in objs if o["kind"] in ("ServiceAccount", "Deployment")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"humpback-system"}


# --- the same objects as the chart ----------------------------------------------------------


def test_rbac_is_what_the_chart_renders_by_default(kustomize, render):
    """Same kinds, names, rules (in order), role references and subjects; labels aside."""
    assert of_kinds(kustomize("manifests/rbac"), RBAC_KINDS) == of_kinds(render(*PLAIN), RBAC_KINDS)


def test_rbac_rules_carry_the_charts_comments(helm_run):
    rendered = helm_run("template", "humpback-operator", "charts/humpback-operator", "-n", "humpback-system",
                        *PLAIN, "--show-only", "templates/rbac.yaml")
    assert rendered.returncode == 0, rendered.stderr
    chart = rule_comments(rendered.stdout)
    manifests = rule_comments((MANIFESTS / "rbac" / "role.yaml").read_text()) + rule_comments(
        (MANIFESTS / "rbac" / "cluster_role.yaml").read_text()
    )
    assert chart and chart == manifests


def test_operator_deployment_is_what_the_chart_renders_by_default(kustomize, render):
    (manifest,) = of_kinds(kustomize("manifests/operator"), ("Deployment",))
    (chart,) = of_kinds(render(*PLAIN), ("Deployment",))
    assert manifest == chart


def test_single_namespace_overlay_is_what_the_chart_renders_for_one_namespace(kustomize, render):
    overlay = kustomize("manifests/overlays/single-namespace")
    kinds = (*RBAC_KINDS, "Deployment")
    assert of_kinds(overlay, kinds) == of_kinds(render(*ONE_NAMESPACE), kinds)


def test_single_namespace_overlay_has_no_cluster_wide_rights_on_runs(kustomize):
    objs = kustomize("manifests/overlays/single-namespace")
    cluster_roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRole"}
    for binding in (o for o in objs if o["kind"] == "ClusterRoleBinding"):
        role = cluster_roles[binding["roleRef"]["name"]]
        assert resources_of(role["rules"]) == {"customresourcedefinitions"}, binding["metadata"]["name"]
    roles = [o for o in objs if o["kind"] == "Role"]
    assert [r["metadata"]["namespace"] for r in roles] == ["ml-experiments"]
    assert {"backtranslationruns", "jobs", "pytorchjobs", "deployments"} <= resources_of(roles[0]["rules"])
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == "ml-experiments"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "humpback-operator", "namespace": "humpback-system"}]
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["--namespace=ml-experiments"]
    assert "--all-namespaces" not in c["command"] + c["args"]


# --- samples --------------------------------------------------------------------------------


def humpback_command() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "humpback"
    return [str(venv)] if os.access(venv, os.X_OK) else [sys.executable, "-m", "humpback_runtime"]


def sample(variant: str) -> Path:
    return MANIFESTS / "samples" / f"backtranslationrun.{variant}.yaml"


def test_samples_are_named_kind_variant_and_all_listed():
    assert {p.name for p in SAMPLES} >= {f"backtranslationrun.{v}.yaml" for v in ("paper-7b", "tiny", "rewrite")}
    for path in SAMPLES:
        doc = yaml.safe_load(path.read_text())
        assert path.name.split(".")[0] == doc["kind"].lower(), path.name
    kustomization = yaml.safe_load((MANIFESTS / "samples" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in SAMPLES]


def test_samples_pass_humpback_validate():
    result = subprocess.run([*humpback_command(), "validate", *map(str, SAMPLES)],
                            check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": OK") == len(SAMPLES)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_validates_against_the_crd_and_loses_nothing_to_pruning(path):
    doc = yaml.safe_load(path.read_text())
    assert _crd.crd_errors(doc) == []
    assert _crd.prune(doc, _crd.openapi_schema(), root=True) == doc


def test_paper_sample_is_the_papers_setting():
    assert load_run(sample("paper-7b")).spec == load_run(ROOT / "examples" / "llama2-7b-paper.yaml").spec


def test_tiny_sample_runs_on_cpu_from_a_minio_bucket():
    run = load_run(sample("tiny"))
    spec = run.spec
    assert spec.inference.engine == "transformers"
    assert spec.resources.training.gpus_per_node == 0 and spec.resources.training.node_selector == {}
    assert spec.resources.inference.gpus_per_replica == 0 and spec.resources.inference.node_selector == {}
    assert spec.storage.s3.endpoint and spec.storage.s3.credentials_secret
    bucket = spec.storage.uri.split("/")[2]
    for uri in (spec.storage.uri, spec.base_model, spec.seed.source, spec.corpus.source):
        assert uri.startswith(f"s3://{bucket}/"), uri  # a CPU runtime image reaches nothing else
    tiny = load_run(ROOT / "examples" / "tiny-cpu.yaml").spec
    assert spec.training == tiny.training and spec.curation == tiny.curation


def test_rewrite_sample_rewrites_with_its_own_model():
    rewrite = load_run(sample("rewrite")).spec.curation.rewrite
    assert rewrite.enabled and rewrite.endpoint is None
