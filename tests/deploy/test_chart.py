"""The humpback-operator Helm chart: lints strictly, renders valid Kubernetes objects with its
default values and with ci/ci-values.yaml, carries the generated CRD unchanged, documents every
value, and its schema refuses bad values. No cluster needed; helm comes from
`bash scripts/kube_tools.sh` (the tests that need it skip without it).

    .venv/bin/pytest tests/deploy -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "humpback-operator"
CRD = ROOT / "manifests" / "crd" / "humpback.dev_backtranslationruns.yaml"
CI_VALUES = "charts/humpback-operator/ci/ci-values.yaml"
VALUE_SETS = {"default": (), "ci": ("-f", CI_VALUES)}
COMMAND = ["kopf", "run", "-m", "humpback_operator.backtranslationrun", "--standalone", "--liveness=http://0.0.0.0:8080/healthz"]
PEERING_COMMAND = ["kopf", "run", "-m", "humpback_operator.backtranslationrun", "--peering=humpback-operator",
                   "--liveness=http://0.0.0.0:8080/healthz"]
NOT_CORE = {"ServiceMonitor", "PodMonitor"}  # monitoring.coreos.com: no schema in kubernetes-validate


def load_table_script():
    """scripts/chart_values_table.py (scripts/ is no package), imported once."""
    name = "humpback_scripts_chart_values_table"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "chart_values_table.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def chart_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objs).get("env", [])}


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


# --- lint and render ------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_SETS)
def test_chart_lints_strictly(helm_run, values):
    result = helm_run("lint", "--strict", "charts/humpback-operator", *VALUE_SETS[values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_SETS)
def test_every_rendered_object_is_valid_kubernetes(render, k8s_validate, values):
    objs = render(*VALUE_SETS[values])
    assert {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= {
        o["kind"] for o in objs
    }
    for obj in objs:
        if obj["kind"] not in NOT_CORE:
            k8s_validate(obj)


def test_ci_values_exercise_the_optional_objects(render):
    objs = render(*VALUE_SETS["ci"])
    kinds = {o["kind"] for o in objs}
    assert {"Role", "RoleBinding", "Service", "ServiceMonitor", "ConfigMap", "NetworkPolicy"} <= kinds
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = one(objs, "Service")
    assert service["spec"]["selector"] == monitor["spec"]["selector"]["matchLabels"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in container(objs)["ports"]
    assert env(objs)["HUMPBACK_METRICS_PORT"] == "9102"


def test_pod_monitor_scrapes_stage_pods_and_vllm_with_run_labels(render):
    objs = render(*VALUE_SETS["ci"])
    monitor = one(objs, "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchExpressions": [{"key": "humpback.dev/run", "operator": "Exists"}]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-experiments", "team-b"]}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "http"]
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_humpback_dev_run"], "targetLabel": "run"} in relabel
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # The operator is told the port, and declares it on every stage pod it builds.
    assert env(objs)["HUMPBACK_STAGE_METRICS_PORT"] == "9401"


def test_dashboards_ship_as_a_configmap_for_the_grafana_sidecar(render):
    import json

    objs = render(*VALUE_SETS["ci"])
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboards"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "true"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "humpback"}
    shipped = sorted(p.name for p in (ROOT / "charts/humpback-operator/dashboards").glob("*.json"))
    assert sorted(cm["data"]) == shipped and shipped
    for name, text in cm["data"].items():
        assert json.loads(text)["uid"], name
    default = render()
    assert not any(o["kind"] in ("PodMonitor",) or o["metadata"]["name"].endswith("-dashboards") for o in default)


def test_extra_objects_are_rendered_with_tpl(render):
    objs = render(*VALUE_SETS["ci"])
    config = one(objs, "ConfigMap", "humpback-ci-extra")
    assert config["metadata"]["namespace"] == "humpback-system"
    assert config["data"] == {"release": "humpback-operator"}
    policy = one(objs, "NetworkPolicy", "humpback-operator-hbop-ingress")
    assert policy["spec"]["podSelector"]["matchLabels"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]


# --- the CRD --------------------------------------------------------------------------------


def test_crd_copy_in_the_chart_is_the_generated_crd():
    copy = CHART / "files" / "crd.yaml"
    assert copy.read_bytes() == CRD.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {CRD.relative_to(ROOT)}; refresh it: "
        "humpback crd -o charts/humpback-operator/files/crd.yaml"
    )


def test_rendered_crd_is_the_generated_crd_with_keep_prune_false_and_labels(render):
    rendered = one(render(), "CustomResourceDefinition", "backtranslationruns.humpback.dev")
    generated = yaml.safe_load(CRD.read_text())
    metadata = rendered["metadata"]
    # Argo CD must never prune it either: that would delete every run.
    assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep",
                                           "argocd.argoproj.io/sync-options": "Prune=false"}
    labels = metadata.pop("labels")
    assert labels["app.kubernetes.io/name"] == "humpback-operator"
    assert labels["helm.sh/chart"] == f"humpback-operator-{chart_yaml()['version']}"
    assert rendered == generated


def test_crd_is_a_template_not_in_crds_dir(render):
    assert not (CHART / "crds").exists(), "Helm never upgrades crds/; the CRD is a template behind crds.enabled"
    assert not of_kind(render("--set", "crds.enabled=false"), "CustomResourceDefinition")
    without = one(render(*VALUE_SETS["ci"]), "CustomResourceDefinition", "backtranslationruns.humpback.dev")
    assert without["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}  # crds.argocdPruneFalse: false


# --- the operator Deployment ----------------------------------------------------------------


def test_default_deployment_runs_two_peering_replicas_watching_all_namespaces(render):
    objs = render()
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    c = container(objs)
    assert c["command"] == PEERING_COMMAND
    assert c["args"] == ["--all-namespaces"]
    version = chart_yaml()["appVersion"]
    # One version across the operator, runtime and vLLM images: the chart's appVersion.
    assert c["image"] == f"ghcr.io/humpback-dev/humpback-operator:{version}"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert env(objs) == {
        "HUMPBACK_RUNTIME_IMAGE": f"ghcr.io/humpback-dev/humpback-runtime:{version}",
        "HUMPBACK_VLLM_IMAGE": f"ghcr.io/humpback-dev/humpback-vllm:{version}",
        "HUMPBACK_TRAINING_BACKEND": "pytorchjob",
        "HUMPBACK_PEERING_LIFETIME": "60",
    }
    # A voluntary disruption leaves one replica; the peering CRDs come with the chart.
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert {o["metadata"]["name"] for o in of_kind(objs, "CustomResourceDefinition")} == {
        "backtranslationruns.humpback.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    cluster = one(objs, "ClusterRole", "humpback-operator-cluster")
    assert ("kopf.dev", "clusterkopfpeerings", "create") in granted(cluster["rules"])
    assert "envFrom" not in c
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "300Mi"}}


def test_image_tags_follow_app_version_and_can_be_overridden(render):
    objs = render("--set", "runtime.image=r.example/rt:9", "--set", "vllm.image=r.example/v:9")
    assert env(objs)["HUMPBACK_RUNTIME_IMAGE"] == "r.example/rt:9" and env(objs)["HUMPBACK_VLLM_IMAGE"] == "r.example/v:9"


def test_operator_network_policy_admits_only_metrics_from_the_monitoring_namespace(render):
    (default,) = of_kind(render(), "NetworkPolicy")
    assert default["spec"]["policyTypes"] == ["Ingress"] and default["spec"]["ingress"] == []  # nothing
    objs = render(*VALUE_SETS["ci"])
    policy = one(objs, "NetworkPolicy", "humpback-operator-hbop")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9102}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
    assert policy["spec"]["podSelector"]["matchLabels"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_operator_pod_is_restricted(render):
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["emptyDir"] is not None


def test_ci_values_reach_the_deployment(render):
    objs = render(*VALUE_SETS["ci"])
    pod = one(objs, "Deployment")["spec"]["template"]
    c = container(objs)
    assert c["image"] == "registry.example.com/ml/humpback-operator:0.1.0-ci"
    assert c["args"] == ["--namespace=ml-experiments", "--namespace=team-b"]
    assert c["command"] == COMMAND[:-1] + ["--liveness=http://127.0.0.1:8080/healthz"]  # health.bindAddress
    assert one(objs, "Deployment")["spec"]["replicas"] == 1 and not of_kind(objs, "PodDisruptionBudget")
    assert c["envFrom"] == [{"secretRef": {"name": "humpback-operator-s3"}}]
    assert env(objs) | {"POD_NAME": None} == {
        "HUMPBACK_RUNTIME_IMAGE": "registry.example.com/ml/humpback-runtime:0.1.0-ci",
        "HUMPBACK_VLLM_IMAGE": "registry.example.com/ml/humpback-vllm:0.1.0-ci",
        "HUMPBACK_SERVICE_ACCOUNT": "humpback-runs",
        "HUMPBACK_METRICS_PORT": "9102",
        "HUMPBACK_STAGE_METRICS_PORT": "9401",
        "HUMPBACK_METRICS_ADDRESS": "0.0.0.0",
        "HUMPBACK_TRAINING_BACKEND": "trainjob",
        "HUMPBACK_TRAINJOBS": "true",
        "HUMPBACK_PROBE_ALLOWED_STORES": json.dumps([{"bucket": "ml-runs-*"},
                                                     {"bucket": "scratch", "endpoint": "http://minio.minio.svc:9000"}],
                                                    separators=(",", ":")),
        "HUMPBACK_POLICY": json.dumps({"allowedImages": ["registry.example.com/ml/"], "allowedServiceAccounts": ["runner-*"],
                                       "secretLabel": "humpback.dev/usable-by-runs=true"}, separators=(",", ":")),
        "POD_NAME": None,
    }
    assert pod["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert pod["metadata"]["labels"]["example.com/cost-center"] == "research"
    assert pod["spec"]["serviceAccountName"] == "humpback-ci"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-example-com"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["spec"]["affinity"]
    assert one(objs, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


# --- RBAC -----------------------------------------------------------------------------------

RUN_RESOURCES = {"backtranslationruns", "pytorchjobs", "trainjobs", "jobs", "deployments", "services", "configmaps", "events"}


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_SETS)
def test_rbac_never_lists_secrets_nor_grants_wildcards_or_escalation(render, values):
    for role in of_kind(render(*VALUE_SETS[values]), "ClusterRole") + of_kind(render(*VALUE_SETS[values]), "Role"):
        for group, resource, verb in granted(role["rules"]):
            assert "*" not in (group, resource, verb), role["metadata"]["name"]
            assert resource not in ("pods/exec", "roles", "rolebindings", "clusterroles"), resource
            # Secrets: the servers' keys are created and deleted, others' metadata read one by one
            # (policy.secretLabel, 409 ownership); never listed or watched.
            assert resource != "secrets" or verb in ("get", "create", "delete"), verb
            assert verb not in ("escalate", "bind", "impersonate"), verb


def test_users_get_aggregated_roles_for_runs(render):
    objs = render()
    edit = one(objs, "ClusterRole", "humpback-operator-edit")
    view = one(objs, "ClusterRole", "humpback-operator-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("humpback.dev", "backtranslationruns", "create") in granted(edit["rules"])
    assert {v for _, _, v in granted(view["rules"])} == {"get", "list", "watch"}
    assert not of_kind(render(*VALUE_SETS["ci"]), "ClusterRole") or all(
        not r["metadata"]["name"].endswith(("-edit", "-view")) for r in of_kind(render(*VALUE_SETS["ci"]), "ClusterRole"))


def test_default_rbac_is_cluster_wide_with_the_documented_rules(render):
    objs = render()
    runs = one(objs, "ClusterRole", "humpback-operator")
    cluster = one(objs, "ClusterRole", "humpback-operator-cluster")
    assert granted(runs["rules"]) == granted(yaml.safe_load(EXPECTED_RUN_RULES)) | PEERING
    assert granted(cluster["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")
    } | {("", "namespaces", v) for v in ("get", "list", "watch")} | {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "create", "patch")}
    for name in ("humpback-operator", "humpback-operator-cluster"):
        binding = one(objs, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "humpback-operator", "namespace": "humpback-system"}]
    assert not of_kind(objs, "Role") and not of_kind(objs, "RoleBinding")


EXPECTED_RUN_RULES = """
- {apiGroups: [humpback.dev], resources: [backtranslationruns], verbs: [get, list, watch, patch]}
- {apiGroups: [humpback.dev], resources: [backtranslationruns/status], verbs: [get, patch]}
- {apiGroups: [humpback.dev], resources: [backtranslationruns/finalizers], verbs: [update]}
- {apiGroups: [kubeflow.org], resources: [pytorchjobs], verbs: [get, list, watch, create, delete]}
- {apiGroups: [batch], resources: [jobs], verbs: [get, list, watch, create, delete]}
- {apiGroups: [apps], resources: [deployments], verbs: [get, list, watch, create, delete]}
- {apiGroups: [""], resources: [services], verbs: [get, list, watch, create, delete]}
- {apiGroups: [""], resources: [configmaps], verbs: [get, list, watch, create, patch, delete]}
- {apiGroups: ["", events.k8s.io], resources: [events], verbs: [create, patch]}
- {apiGroups: [""], resources: [secrets], verbs: [get, create, delete]}
- {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [get, create, delete]}
- {apiGroups: [""], resources: [persistentvolumeclaims], verbs: [get]}
- {apiGroups: [""], resources: [pods], verbs: [get, list, watch]}
- {apiGroups: [""], resources: [events], verbs: [list, watch]}
"""
PEERING = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "create", "patch")}


def test_namespaced_watch_gets_roles_in_each_namespace_and_no_cluster_wide_run_rights(render):
    objs = render(*VALUE_SETS["ci"])
    roles = of_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-experiments", "team-b"]
    trainjobs = {("trainer.kubeflow.org", "trainjobs", v) for v in ("get", "list", "watch", "create", "delete")}
    for role in roles:
        assert granted(role["rules"]) == granted(yaml.safe_load(EXPECTED_RUN_RULES)) | trainjobs
    bindings = of_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-experiments", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "humpback-ci", "namespace": "humpback-system"}]
    (cluster_role,) = of_kind(objs, "ClusterRole")
    assert {r for _, r, _ in granted(cluster_role["rules"])} == {"customresourcedefinitions"}
    (cluster_binding,) = of_kind(objs, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_trainjobs_only_with_the_value(render):
    def resources(objs):
        return {r for role in of_kind(objs, "ClusterRole") for _, r, _ in granted(role["rules"])}

    assert "trainjobs" not in resources(render())
    assert "trainjobs" in resources(render("--set", "rbac.trainJobs=true"))


def test_rbac_and_service_account_can_be_left_out(render):
    objs = render("--set", "rbac.create=false", "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"} & {o["kind"] for o in objs}
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# --- values: schema, documentation, refusals ------------------------------------------------


def test_values_schema_is_draft7_and_accepts_the_shipped_values():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for path in (CHART / "values.yaml", ROOT / CI_VALUES):
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], path.name


def test_values_schema_covers_every_value():
    """additionalProperties: false wherever the chart owns the keys, and every key of values.yaml declared."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: Any, node: dict[str, Any], path: str) -> None:
        if not isinstance(values, dict) or "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{path or '(root)'}: unknown keys must be refused"
        for key, value in values.items():
            assert key in node["properties"], f"{path}{key} is not in values.schema.json"
            walk(value, node["properties"][key], f"{path}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")


BAD_VALUES = {
    "allNamespaces not a boolean": ("--set-json", 'watch.allNamespaces="yes"'),
    "misspelt key": ("--set", "wacth.allNamespaces=false"),
    "unknown pull policy": ("--set", "image.pullPolicy=Sometimes"),
    "namespace not a DNS label": ("--set", "watch.allNamespaces=false", "--set", "watch.namespaces={Team_B}"),
    "namespaced watch without namespaces": ("--set", "watch.allNamespaces=false"),
    "metrics port out of range": ("--set", "metrics.port=70000"),
    "allowed store with a globbed endpoint": ("--set-json", 'storeProbe.allowedStores=[{"bucket":"b","endpoint":"https://*.x"}]'),
    "secret label without a value": ("--set", "policy.secretLabel=novalue"),
    "unknown training backend": ("--set", "training.backend=mpijob"),
}


@pytest.mark.parametrize("args", BAD_VALUES.values(), ids=BAD_VALUES)
def test_values_schema_refuses_bad_values(helm_run, args):
    result = helm_run("template", "humpback-operator", "charts/humpback-operator", *args)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


def test_the_trainjob_backend_needs_its_rbac(helm_run):
    result = helm_run("template", "x", "charts/humpback-operator", "--set", "training.backend=trainjob")
    assert result.returncode != 0 and "training.backend trainjob needs rbac.trainJobs" in result.stderr


def test_service_monitor_needs_the_metrics_port(helm_run):
    result = helm_run("template", "x", "charts/humpback-operator", "--set", "metrics.serviceMonitor.enabled=true")
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.enabled" in result.stderr


def test_every_value_is_documented():
    script = load_table_script()
    values_yaml = (CHART / "values.yaml").read_text()
    assert script.undocumented(values_yaml) == []
    keys = [row.key for row in script.parse(values_yaml)]
    assert len(keys) == len(set(keys))
    assert {"crds.enabled", "watch.allNamespaces", "runtime.image", "vllm.image", "operator.s3.existingSecret",
            "rbac.trainJobs", "metrics.serviceMonitor.enabled", "extraObjects"} <= set(keys)


def test_readme_values_table_is_current():
    script = load_table_script()
    readme = (CHART / "README.md").read_text()
    assert script.render_readme(readme, (CHART / "values.yaml").read_text()) == readme, (
        "the values table in charts/humpback-operator/README.md is out of date; run: "
        ".venv/bin/python scripts/chart_values_table.py --write charts/humpback-operator"
    )


def test_values_table_parser_follows_helm_docs_conventions():
    script = load_table_script()
    values_yaml = """\
# a plain comment, not documentation
a:
  # -- First line,
  # second line.
  b: 1
  # -- (string) Typed.
  # @default -- computed
  c:
  d: [x]  # undocumented
# -- A whole map | with a pipe.
e:
  f: true
list:
  # -- inside a list item: not a key of the values
  - name: x
"""
    rows = {r.key: r for r in script.parse(values_yaml)}
    assert set(rows) == {"a.b", "a.c", "e"}
    assert (rows["a.b"].type, rows["a.b"].default, rows["a.b"].description) == ("int", "`1`", "First line, second line.")
    assert (rows["a.c"].type, rows["a.c"].default) == ("string", "computed")
    assert (rows["e"].type, rows["e"].default, rows["e"].description) == ("object", '`{"f":true}`', "A whole map \\| with a pipe.")
    assert script.undocumented(values_yaml) == ["a.d", "list"]


def test_notes_render(helm_run):
    result = helm_run("install", "humpback-operator", "charts/humpback-operator", "-n", "humpback-system", "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n default create secret generic humpback-s3" in notes
    assert "get btr -w" in notes
    result = helm_run("install", "humpback-operator", "charts/humpback-operator", "-n", "humpback-system",
                      "--dry-run=client", "-f", CI_VALUES)
    assert "watching BacktranslationRuns in: ml-experiments, team-b" in result.stdout
