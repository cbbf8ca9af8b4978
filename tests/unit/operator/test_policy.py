"""The tenancy policy: a run that breaks it is refused with Accepted=False naming the rule, and
creates nothing (images, service accounts, Secrets by label)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from humpback_operator.config import OperatorConfig
from humpback_operator.policy import needs_secret_labels, referenced_secrets, violations
from humpback_operator.reconcile import decide, run_from_body

ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
LABEL = "humpback.dev/usable-by-runs=true"
POLICY = OperatorConfig(allowed_images=("registry.corp/ml/",), allowed_service_accounts=("runner-*",),
                        secret_label=LABEL, service_account="humpback-default")


def body(**spec) -> dict:
    doc = yaml.safe_load((ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs"}
    doc["spec"].update(spec)
    return doc


def accepted(d) -> dict:
    return next(c for c in d.status["conditions"] if c["type"] == "Accepted")


@pytest.mark.parametrize("spec, rule", [
    ({"resources": {"cpu": {"image": "docker.io/evil/miner:1"}}}, "policy.allowedImages: spec.resources.cpu.image"),
    ({"resources": {"training": {"image": "registry.corp/mlx/t:1"}}}, "policy.allowedImages: spec.resources.training.image"),
    ({"podTemplate": {"serviceAccountName": "cluster-admin-sa"}}, "policy.allowedServiceAccounts"),
    ({"storage": {"uri": "s3://b/r", "s3": {"credentialsSecret": "prod-db"}}},
     "policy.secretLabel: spec.storage.s3.credentialsSecret: Secret prod-db is not labelled"),
    ({"huggingface": {"tokenSecret": "missing"}}, "policy.secretLabel: spec.huggingface.tokenSecret: Secret missing does not exist"),
    ({"publish": {"hub": {"repoPrefix": "me/demo", "tokenSecret": "prod-db"}}},
     "policy.secretLabel: spec.publish.hub.tokenSecret: Secret prod-db is not labelled"),
    ({"podTemplate": {"envFrom": [{"secretRef": {"name": "prod-db"}}]}}, "spec.podTemplate.envFrom[0].secretRef"),
    ({"tracking": {"mlflow": {"trackingUri": "https://mlflow.corp", "credentialsSecret": "prod-db"}}},
     "policy.secretLabel: spec.tracking.mlflow.credentialsSecret: Secret prod-db is not labelled"),
    ({"tracking": {"wandb": {"project": "p", "credentialsSecret": "missing"}}},
     "policy.secretLabel: spec.tracking.wandb.credentialsSecret: Secret missing does not exist"),
])
def test_a_run_breaking_the_policy_is_refused_naming_the_rule_and_creates_nothing(spec, rule):
    labels = {"prod-db": {"app": "db"}, "missing": None}
    d = decide(body(**spec), [], {}, T0, POLICY, secret_labels=labels)
    assert not d.create and not d.needs_store
    cond = accepted(d)
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation")
    assert rule in cond["message"] and cond["message"].startswith("refused by the operator's policy")
    assert [e.reason for e in d.events] == ["PolicyViolation"]
    # Without the policy (any account allowed) the same run is accepted: it asks for the store first.
    assert decide(body(**spec), [], {}, T0, OperatorConfig(allowed_service_accounts=("*",)), secret_labels={}).needs_store


def test_a_run_within_the_policy_runs():
    spec = {"resources": {"cpu": {"image": "registry.corp/ml/humpback:2"}},
            "podTemplate": {"serviceAccountName": "runner-irsa", "imagePullSecrets": [{"name": "pull"}]},
            "storage": {"uri": "s3://b/r", "s3": {"credentialsSecret": "s3"}}}
    run = run_from_body(body(**spec))
    assert needs_secret_labels(run, POLICY) == ["s3", "pull"]
    ok = {"s3": {"humpback.dev/usable-by-runs": "true"}, "pull": {"humpback.dev/usable-by-runs": "true"}}
    assert violations(run, POLICY, ok) == []
    store = {s: None for s in decide(body(**spec), [], {}, T0, POLICY, secret_labels=ok).needs_store}
    d = decide(body(**spec), [], store, T0, POLICY, secret_labels=ok)
    assert accepted(d)["status"] == "True" and d.create


def test_default_images_and_the_operators_service_account_are_always_allowed():
    config = OperatorConfig(allowed_images=("nowhere/",), service_account="humpback-default")
    run = run_from_body(body(resources={"cpu": {"image": config.runtime_image}},
                             podTemplate={"serviceAccountName": "humpback-default"}))
    assert violations(run, config) == []
    # By default a run may not name a service account of its own (its token would be mounted).
    assert violations(run_from_body(body(podTemplate={"serviceAccountName": "x"})), OperatorConfig())


def test_every_secret_reference_is_listed():
    run = run_from_body(body(
        storage={"uri": "s3://b/r", "s3": {"credentialsSecret": "a"}}, huggingface={"tokenSecret": "b"},
        publish={"hub": {"repoPrefix": "me/demo", "tokenSecret": "g"}},
        evaluation={"enabled": True, "judge": {"endpoint": "https://j/v1", "model": "j", "apiKeySecret": "c"}},
        podTemplate={"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "d", "key": "k"}}},
                             {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
                     "envFrom": [{"secretRef": {"name": "e"}}], "imagePullSecrets": [{"name": "f"}]}))
    assert [name for _, name in referenced_secrets(run)] == ["a", "b", "g", "c", "d", "e", "f"]


def test_the_policy_is_read_from_the_environment_and_a_bad_one_names_the_variable():
    policy = {"allowedImages": ["r/"], "allowedServiceAccounts": ["*"], "secretLabel": LABEL}
    config = OperatorConfig.from_env({"HUMPBACK_POLICY": json.dumps(policy)})
    assert (config.allowed_images, config.allowed_service_accounts, config.secret_label) == (("r/",), ("*",), LABEL)
    for bad, says in (({"secretLabel": "novalue"}, "secretLabel: expected KEY=VALUE"),
                      ({"allowedImage": []}, "expected a JSON object with keys"),
                      ({"allowedImages": "r/"}, "allowedImages: expected a list")):
        with pytest.raises(ValueError, match=f"HUMPBACK_POLICY: .*{says}"):
            OperatorConfig.from_env({"HUMPBACK_POLICY": json.dumps(bad)})
