"""The GitOps integrations under gitops/: Argo CD's Lua health check, Flux's CEL health checks,
and the example manifests.

The Lua runs in a real Lua interpreter (lupa) the way Argo CD calls it: a global `obj` holding the
live object, and the returned table's `status` and `message`. The CEL expressions run in
cel-python the way kustomize-controller evaluates them (the object's top-level fields as
variables; observedGeneration first, then inProgress, failed, current). Both are checked against
the same sample statuses, each valid against the CRD's status schema.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from humpback_runtime import crd

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "gitops"
LUA_FILE = GITOPS / "argocd" / "backtranslationrun-health.lua"
ARGOCD_CM = GITOPS / "argocd" / "argocd-cm.yaml"
HEALTH_KEY = f"resource.customizations.health.{crd.GROUP}_{crd.KIND}"
API_VERSION = f"{crd.GROUP}/{crd.VERSION}"


# --- sample runs --------------------------------------------------------------------------------


def _cond(type_: str, status: str, reason: str = "", message: str = "") -> dict:
    c = {"type": type_, "status": status, "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def run(status: dict | None = None, generation: int = 1) -> dict:
    obj = {
        "apiVersion": API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "paper-7b", "namespace": "experiments", "generation": generation},
        "spec": {"baseModel": "meta-llama/Llama-2-7b-hf"},
    }
    if status is not None:
        obj["status"] = status
    return obj


ACCEPTED = _cond("Accepted", "True", "Valid", "The spec is valid")

SAMPLES = {
    "no status": run(),
    "empty status": run({}),
    "pending": run({
        "observedGeneration": 1, "phase": "Pending", "progress": "0/10",
        "conditions": [ACCEPTED, _cond("Running", "False", "Waiting", "Waiting for train-myx, train-m0 to be scheduled")],
    }),
    "running with stage": run({
        "observedGeneration": 1, "phase": "Running", "stage": "train-myx,train-m0", "progress": "2/10",
        "conditions": [ACCEPTED, _cond("Running", "True", "StagesRunning")],
        "stages": [{"name": "prepare-seed", "phase": "Succeeded"}, {"name": "train-m0", "phase": "Running", "attempt": 1}],
    }),
    "running with message": run({
        "observedGeneration": 1, "phase": "Running", "stage": "curate-1", "progress": "6/10",
        "message": "Created Job paper-7b-curate-1-a1b2c3-a1 for run paper-7b (stage curate-1, attempt 1)",
        "conditions": [ACCEPTED, _cond("Running", "True", "StagesRunning")],
    }),
    "succeeded": run({
        "observedGeneration": 1, "phase": "Succeeded", "progress": "10/10",
        "conditions": [ACCEPTED, _cond("Complete", "True", "AllStagesSucceeded", "All 10 stages succeeded")],
    }),
    "failed": run({
        "observedGeneration": 1, "phase": "Failed", "stage": "", "progress": "4/10",
        "message": "Stage train-m0 failed after 4 attempts: PyTorchJob paper-7b-train-m0-1a2b3c-a4 failed",
        "conditions": [ACCEPTED, _cond("Failed", "True", "StageFailed", "train-m0 failed")],
    }),
    "failed, message only in the condition": run({
        "observedGeneration": 1, "phase": "Failed", "progress": "4/10",
        "conditions": [ACCEPTED, _cond("Failed", "True", "StageFailed", "train-m0 failed after 4 attempts")],
    }),
    "suspended": run({
        "observedGeneration": 1, "phase": "Suspended", "progress": "3/10",
        "conditions": [ACCEPTED, _cond("Suspended", "True", "Suspended", "spec.suspend is true")],
    }),
    "accepted false": run({
        "observedGeneration": 1, "phase": "Failed",
        "conditions": [_cond("Accepted", "False", "InvalidSpec",
                             "spec.corpus: minChars (3000) must be <= maxChars (600)")],
    }),
    "accepted false, still pending": run({
        "observedGeneration": 1, "phase": "Pending",
        "conditions": [_cond("Accepted", "False", "InvalidSpec", "spec.storage: a cluster run needs s3:// storage")],
    }),
    "status older than the spec": run({
        "observedGeneration": 1, "phase": "Succeeded", "progress": "10/10",
        "conditions": [ACCEPTED, _cond("Complete", "True", "AllStagesSucceeded")],
    }, generation=2),
}

# What Argo CD shows: (health status, a fragment of the message).
ARGO_EXPECTED = {
    "no status": ("Progressing", "Waiting for the operator"),
    "empty status": ("Progressing", "Waiting for the operator"),
    "pending": ("Progressing", "Waiting for train-myx, train-m0 to be scheduled"),
    "running with stage": ("Progressing", "Running train-myx,train-m0 (2/10 stages)"),
    "running with message": ("Progressing", "Created Job paper-7b-curate-1"),
    "succeeded": ("Healthy", "All 10 stages succeeded"),
    "failed": ("Degraded", "Stage train-m0 failed after 4 attempts"),
    "failed, message only in the condition": ("Degraded", "train-m0 failed after 4 attempts"),
    "suspended": ("Suspended", "spec.suspend is true"),
    "accepted false": ("Degraded", "minChars (3000) must be <= maxChars (600)"),
    "accepted false, still pending": ("Degraded", "a cluster run needs s3:// storage"),
    "status older than the spec": ("Progressing", "generation 2"),
}

# What Flux makes of each with the example's expressions (gitops/flux/kustomization.yaml), and
# with the "wait for runs to finish" ones of gitops/README.md. "Unknown": cel-go cannot evaluate
# the expressions (no `status` yet); Flux keeps waiting, as for InProgress.
FLUX_ACCEPTED_EXPECTED = {
    "no status": "Unknown",
    "empty status": "InProgress",
    "pending": "Current",
    "running with stage": "Current",
    "running with message": "Current",
    "succeeded": "Current",
    "failed": "Failed",
    "failed, message only in the condition": "Failed",
    "suspended": "Current",
    "accepted false": "Failed",
    "accepted false, still pending": "Failed",
    "status older than the spec": "InProgress",
}
FLUX_FINISHED_EXPECTED = {
    **FLUX_ACCEPTED_EXPECTED,
    "pending": "InProgress",
    "running with stage": "InProgress",
    "running with message": "InProgress",
    "suspended": "InProgress",
}


def test_samples_are_valid_statuses():
    jsonschema = pytest.importorskip("jsonschema")
    schema = crd.status_schema()
    for name, obj in SAMPLES.items():
        if "status" in obj:
            try:
                jsonschema.validate(obj["status"], schema)
            except jsonschema.ValidationError as e:
                pytest.fail(f"sample {name!r}: {e.message}")
    assert set(SAMPLES) == set(ARGO_EXPECTED) == set(FLUX_ACCEPTED_EXPECTED)


# --- Argo CD ------------------------------------------------------------------------------------


def argo_health(obj: dict) -> tuple[str, str]:
    """Run the health check as Argo CD does: a fresh interpreter, the global `obj`, the returned table."""
    lupa = pytest.importorskip("lupa")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    hs = lua.execute(LUA_FILE.read_text())
    return hs["status"], hs["message"]


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_argocd_health(sample):
    status, message = argo_health(SAMPLES[sample])
    want_status, want_fragment = ARGO_EXPECTED[sample]
    assert status == want_status
    assert want_fragment in message, message


def test_argocd_health_statuses_are_argo_cd_ones():
    for obj in SAMPLES.values():
        assert argo_health(obj)[0] in {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def test_argocd_health_uses_only_what_argo_cd_offers():
    # Argo CD's Lua sandbox has the base, table, string and math libraries; no I/O, no modules.
    code = "\n".join(line.split("--", 1)[0] for line in LUA_FILE.read_text().splitlines())
    for forbidden in ("os.", "io.", "require", "dofile", "loadfile", "debug."):
        assert forbidden not in code


def test_argocd_cm_embeds_the_lua_file_verbatim():
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "argocd-cm"
    assert list(cm["data"]) == [HEALTH_KEY]
    assert cm["data"][HEALTH_KEY] == LUA_FILE.read_text(), (
        "argocd-cm.yaml and backtranslationrun-health.lua differ: copy the .lua file into the key "
        "(indented by four spaces)"
    )


def test_argocd_application_example():
    app = yaml.safe_load((GITOPS / "argocd" / "application.yaml").read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    spec = app["spec"]
    assert {"repoURL", "targetRevision", "path"} <= set(spec["source"])
    assert spec["destination"]["namespace"]
    assert "ServerSideApply=true" in spec["syncPolicy"]["syncOptions"]
    assert "ignoreDifferences" not in spec, "runs need no ignoreDifferences (see gitops/README.md)"


# --- Flux ---------------------------------------------------------------------------------------


def _flux_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all((GITOPS / "flux" / "kustomization.yaml").read_text()) if d]


def _readme_kustomizations() -> list[dict]:
    """The Kustomizations in yaml code blocks of gitops/README.md."""
    blocks = re.findall(r"```yaml\n(.*?)```", (GITOPS / "README.md").read_text(), flags=re.S)
    docs = [d for block in blocks for d in yaml.safe_load_all(block) if d]
    return [d for d in docs if d.get("kind") == "Kustomization"]


def _run_exprs(kustomization: dict) -> dict[str, str]:
    spec = kustomization["spec"]
    assert spec.get("wait") is True, "healthCheckExprs apply to the objects Flux waits for: wait: true"
    (exprs,) = [e for e in spec["healthCheckExprs"] if e["apiVersion"] == API_VERSION and e["kind"] == crd.KIND]
    assert "current" in exprs, "current is required"
    assert set(exprs) <= {"apiVersion", "kind", "current", "failed", "inProgress"}
    return exprs


def flux_health(exprs: dict[str, str], obj: dict) -> str:
    """kustomize-controller's evaluation (fluxcd/pkg runtime/cel StatusEvaluator), with cel-python.

    Flux parses the expressions without declaring variables and evaluates them with the object's
    top-level fields as the activation. cel-go fails on an identifier that is not in it, even
    inside has(); cel-python is more lenient there, so that case is decided here first.
    """
    celpy = pytest.importorskip("celpy", reason="cel-python is not installed (pip install cel-python)")
    status = obj.get("status")
    if isinstance(status, dict) and "observedGeneration" in status:
        if status["observedGeneration"] != obj["metadata"].get("generation"):
            return "InProgress"
    env = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        if "status" not in obj and re.search(r"\bstatus\b", exprs[key]):
            return "Unknown"  # cel-go: no such attribute 'status'
        value = env.program(env.compile(exprs[key])).evaluate(activation)
        assert isinstance(value, celpy.celtypes.BoolType), f"{key}: {exprs[key]!r} gave {value!r}, not a bool"
        if value:
            return result
    return "InProgress"


def test_flux_example_manifests():
    docs = _flux_documents()
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("source.toolkit.fluxcd.io/v1", "GitRepository"),
        ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"),
    ]
    source, kustomization = docs
    assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert kustomization["spec"]["prune"] in (True, False), "prune is a required field"
    _run_exprs(kustomization)


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_flux_health_of_the_example(sample):
    (kustomization,) = [d for d in _flux_documents() if d["kind"] == "Kustomization"]
    assert flux_health(_run_exprs(kustomization), SAMPLES[sample]) == FLUX_ACCEPTED_EXPECTED[sample]


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_flux_health_when_waiting_for_runs_to_finish(sample):
    (kustomization,) = _readme_kustomizations()
    assert flux_health(_run_exprs(kustomization), SAMPLES[sample]) == FLUX_FINISHED_EXPECTED[sample]


def test_flux_expressions_use_no_optional_syntax():
    # `status.?field` needs cel-go's optional types: Flux has them, but keep to what every CEL
    # implementation (and the CEL playground) parses.
    for kustomization in [*_readme_kustomizations(), *(d for d in _flux_documents() if d["kind"] == "Kustomization")]:
        for expr in _run_exprs(kustomization).values():
            assert ".?" not in expr and "orValue" not in expr
