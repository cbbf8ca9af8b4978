"""The BacktranslationRun CRD: generated from the spec models, structural, checked in, and in
agreement with the runtime's own validation (`spec.parse_run`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, Field

from humpback_runtime import crd
from humpback_runtime.cli import main
from humpback_runtime.spec import API_VERSION, KIND, SpecError, dump_run, parse_run

ROOT = Path(__file__).resolve().parents[3]
CHECKED_IN = ROOT / "manifests" / "crd" / "humpback.dev_backtranslationruns.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
REGENERATE = "humpback crd > manifests/crd/humpback.dev_backtranslationruns.yaml"


def minimal(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "demo"},
        "spec": {"baseModel": "m", "seed": {"source": "s.jsonl"}, "corpus": {"source": "c.jsonl"}, **spec},
    }


def with_value(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of doc with the dotted path (list indices as numbers) set; missing maps are created."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for part in parents:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[last] = value
    return doc


def without(doc: dict[str, Any], path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    del node[last]
    return doc


# --- an offline stand-in for the API server's handling of a custom resource ----------------


def openapi_schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def to_jsonschema(node: Any) -> Any:
    """The structural schema as draft-4 JSON Schema: `nullable` and int-or-string made explicit.

    Draft 4 already has OpenAPI 3.0's boolean exclusiveMinimum/exclusiveMaximum."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_jsonschema(value)
        elif key != "nullable" and not key.startswith("x-kubernetes-"):
            out[key] = value
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def prune(obj: Any, schema: dict[str, Any], *, root: bool = False) -> Any:
    """What the API server stores: unknown fields dropped, and nulls dropped where the schema is
    not nullable (apiextensions' pruning and PruneNonNullableNullsWithoutDefaults)."""
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return obj
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in obj.items():
            if root and key == "metadata":
                out[key] = value  # ObjectMeta is the API server's own business
                continue
            sub = props.get(key) if props else extra if isinstance(extra, dict) else None
            if sub is None:
                continue
            if value is None and not sub.get("nullable"):
                continue
            out[key] = prune(value, sub)
        return out
    if isinstance(obj, list) and "items" in schema:
        return [prune(v, schema["items"]) for v in obj]
    return obj


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Schema errors the API server would report for doc (CEL rules excluded)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = openapi_schema()
    validator = jsonschema.Draft4Validator(to_jsonschema(schema))
    stored = prune(doc, schema, root=True)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(stored)]


def runtime_accepts(doc: dict[str, Any]) -> bool:
    try:
        parse_run(doc)
    except SpecError:
        return False
    return True


# --- the checked-in file --------------------------------------------------------------------


def test_checked_in_crd_is_current():
    assert CHECKED_IN.exists(), f"{CHECKED_IN.relative_to(ROOT)} is missing; generate it: {REGENERATE}"
    assert CHECKED_IN.read_text(encoding="utf-8") == crd.render_crd(), (
        f"{CHECKED_IN.relative_to(ROOT)} differs from what humpback_runtime/spec.py generates; "
        f"regenerate it and commit the result: {REGENERATE}"
    )


def test_rendering_is_stable_and_marked_generated():
    text = crd.render_crd()
    assert text == crd.render_crd()
    assert text.startswith("# Generated by `humpback crd` from humpback_runtime/spec.py; do not edit.\n")
    assert yaml.safe_load(text) == crd.build_crd()


def test_kustomization_lists_the_crd():
    kustomization = yaml.safe_load((CHECKED_IN.parent / "kustomization.yaml").read_text())
    assert CHECKED_IN.name in kustomization["resources"]


def test_cli_prints_the_crd(capsys):
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd.render_crd()


def test_cli_writes_the_crd_to_a_file(tmp_path):
    out = tmp_path / "crd.yaml"
    assert main(["crd", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == crd.render_crd()


# --- the CRD object -------------------------------------------------------------------------


def test_names_group_version_and_scope():
    obj = crd.build_crd()
    assert obj["apiVersion"] == "apiextensions.k8s.io/v1"
    assert obj["kind"] == "CustomResourceDefinition"
    assert obj["metadata"]["name"] == "backtranslationruns.humpback.dev"
    spec = obj["spec"]
    assert f"{spec['group']}/{spec['versions'][0]['name']}" == API_VERSION
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == KIND
    assert names["listKind"] == "BacktranslationRunList"
    assert (names["plural"], names["singular"]) == ("backtranslationruns", "backtranslationrun")
    assert names["shortNames"] == ["btr"]
    assert "humpback" in names["categories"] and "all" not in names["categories"]


def test_one_served_storage_version_with_status_subresource():
    (version,) = crd.build_crd()["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns():
    (version,) = crd.build_crd()["spec"]["versions"]
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Stage", "Progress", "Message", "Age"]
    assert columns["Phase"] == ("string", ".status.phase")
    assert columns["Stage"] == ("string", ".status.stage")
    assert columns["Progress"] == ("string", ".status.progress")
    assert columns["Age"] == ("date", ".metadata.creationTimestamp")
    status = openapi_schema()["properties"]["status"]["properties"]
    for _, path in list(columns.values())[:3]:
        assert path.removeprefix(".status.") in status


def test_status_schema_lists_are_maps_keyed_by_required_fields():
    status = crd.status_schema()["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Suspended"]
    assert status["observedGeneration"]["type"] == "integer"
    for name, key in (("conditions", "type"), ("stages", "name")):
        node = status[name]
        assert node["x-kubernetes-list-type"] == "map"
        assert node["x-kubernetes-list-map-keys"] == [key]
        assert key in node["items"]["required"]
    condition = status["conditions"]["items"]["properties"]
    assert condition["status"]["enum"] == ["True", "False", "Unknown"]
    assert condition["lastTransitionTime"]["format"] == "date-time"
    stage = status["stages"]["items"]["properties"]
    assert stage["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Skipped"]
    assert set(stage["child"]["properties"]) == {"apiVersion", "kind", "name"}
    assert stage["outputs"]["items"] == {"type": "string"}
    assert {"attempt", "fingerprint", "startTime", "completionTime", "message"} <= set(stage)


def test_constants_match_the_spec_module():
    assert f"{crd.GROUP}/{crd.VERSION}" == API_VERSION
    assert crd.KIND == KIND
    assert crd.PLURAL == "backtranslationruns" and crd.SHORT_NAMES == ["btr"]


# --- structural schema ----------------------------------------------------------------------

# Keywords of apiextensions.k8s.io/v1 JSONSchemaProps that this CRD may use.
ALLOWED_KEYS = {
    "description", "type", "format", "enum", "nullable",
    "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "items",
    "properties", "required", "additionalProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
}


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path or "(root)", node)]
    for name, sub in node.get("properties", {}).items():
        found += schema_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += schema_nodes(node["additionalProperties"], f"{path}{{}}")
    return found


def test_schema_is_structural():
    problems = []
    for path, node in schema_nodes(openapi_schema()):
        if unknown := set(node) - ALLOWED_KEYS:  # no $ref, $defs, title, default, anyOf/oneOf/allOf/not
            problems.append(f"{path}: keywords {sorted(unknown)}")
        if "type" not in node and not (
            node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        ):
            problems.append(f"{path}: no type")
        if "properties" in node:
            if node.get("type") != "object":
                problems.append(f"{path}: properties without type object")
            if "additionalProperties" in node:
                problems.append(f"{path}: both properties and additionalProperties")
            if missing := set(node.get("required", [])) - set(node["properties"]):
                problems.append(f"{path}: required but not declared: {sorted(missing)}")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false")
        if node.get("type") == "array" and not isinstance(node.get("items"), dict):
            problems.append(f"{path}: array without items")
        if node.get("type") == "object" and not (
            "properties" in node or "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        ) and path != ".metadata":
            problems.append(f"{path}: object without properties (everything in it would be pruned)")
        if "exclusiveMinimum" in node and (not isinstance(node["exclusiveMinimum"], bool) or "minimum" not in node):
            problems.append(f"{path}: exclusiveMinimum must be a boolean next to minimum")
        if "exclusiveMaximum" in node and (not isinstance(node["exclusiveMaximum"], bool) or "maximum" not in node):
            problems.append(f"{path}: exclusiveMaximum must be a boolean next to maximum")
        if node.get("nullable") and "enum" in node:
            problems.append(f"{path}: nullable enum (the API server rejects null against an enum)")
        if "enum" in node:
            python_type = {"string": str, "integer": int, "number": (int, float), "boolean": bool}[node["type"]]
            if not all(isinstance(v, python_type) for v in node["enum"]):
                problems.append(f"{path}: enum values do not match type {node['type']}")
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            if not set(keys) <= set(node["items"].get("required", [])):
                problems.append(f"{path}: list-map keys must be required")
    assert not problems, "\n".join(problems)


def test_no_defaults_titles_or_refs_anywhere_in_the_file():
    text = CHECKED_IN.read_text(encoding="utf-8")
    for word in ("$ref", "$defs", "title:", "default:", "anyOf", "oneOf", "allOf"):
        assert word not in text, word


def test_spec_fields_are_required_as_in_the_models():
    spec = openapi_schema()["properties"]["spec"]
    assert openapi_schema()["required"] == ["spec"]
    assert spec["required"] == ["baseModel", "seed", "corpus"]
    assert spec["properties"]["seed"]["required"] == ["source"]
    assert spec["properties"]["evaluation"]["properties"]["judge"]["required"] == ["endpoint", "model"]


def test_constraints_are_carried_over():
    spec = openapi_schema()["properties"]["spec"]["properties"]
    curation = spec["curation"]["properties"]
    assert curation["threshold"] == {**curation["threshold"], "type": "number", "minimum": 1, "maximum": 5}
    assert curation["mode"]["enum"] == ["generate", "logprobs"]
    assert curation["iterations"]["type"] == "integer"
    top_p = spec["augmentation"]["properties"]["topP"]
    assert (top_p["minimum"], top_p["exclusiveMinimum"], top_p["maximum"]) == (0, True, 1)
    zero = spec["training"]["properties"]["forward"]["properties"]["zeroStage"]
    assert (zero["type"], zero["enum"]) == ("integer", [0, 1, 2, 3])
    selector = spec["resources"]["properties"]["training"]["properties"]["nodeSelector"]
    assert selector["type"] == "object" and selector["additionalProperties"] == {"type": "string"}
    sets = spec["evaluation"]["properties"]["sets"]
    assert sets["minItems"] == 1 and sets["items"]["properties"]["name"]["pattern"]
    assert spec["systemPrompts"]["properties"]["seed"]["minLength"] == 1


def test_nullable_only_where_null_differs_from_absent():
    spec = openapi_schema()["properties"]["spec"]["properties"]
    seed = spec["seed"]["properties"]
    assert seed["lang"]["nullable"] is True  # null: every language; absent: "en"
    assert seed["maxExamples"]["nullable"] is True
    assert seed["fields"]["properties"]["id"]["nullable"] is True
    # default None: null and absent mean the same; the API server prunes the null
    assert "nullable" not in spec["corpus"]["properties"]["idField"]
    assert "nullable" not in spec["evaluation"]["properties"]["judge"]
    toleration = spec["resources"]["properties"]["training"]["properties"]["tolerations"]["items"]["properties"]
    assert "nullable" not in toleration["operator"] and toleration["operator"]["enum"] == ["Exists", "Equal"]


def test_defaults_are_described_not_applied():
    spec = openapi_schema()["properties"]["spec"]["properties"]
    assert spec["curation"]["properties"]["threshold"]["description"].endswith("Default: 5.")
    assert 'Default: "generate"' in spec["curation"]["properties"]["mode"]["description"]
    max_tokens = spec["curation"]["properties"]["rewrite"]["properties"]["sampling"]["properties"]["maxTokens"]
    assert max_tokens["description"] == "Default: 256; 1024 when sampling is left out."
    selector = spec["resources"]["properties"]["inference"]["properties"]["nodeSelector"]
    assert "NVIDIA-A100-SXM4-80GB" in selector["description"]


def test_run_name_is_limited_to_a_dns_label_by_cel_rules():
    rules = {r["rule"] for r in openapi_schema()["x-kubernetes-validations"]}
    assert rules == {"self.metadata.name.size() <= 63", "!self.metadata.name.contains('.')"}
    # the runtime enforces the same
    assert not runtime_accepts(with_value(minimal(), "metadata.name", "a" * 64))
    assert not runtime_accepts(with_value(minimal(), "metadata.name", "a.b"))
    assert runtime_accepts(with_value(minimal(), "metadata.name", "a" * 63))


# --- the CRD schema and the runtime agree ---------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == KIND]
    assert docs
    for doc in docs:
        assert crd_errors(doc) == []
        assert runtime_accepts(doc)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_lose_nothing_to_pruning(path):
    """Every field an example sets is declared in the CRD, so the API server stores it as written."""
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            assert prune(doc, openapi_schema(), root=True) == doc


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_a_fully_defaulted_spec_validates_and_survives_pruning(path):
    """The runtime's resolved spec (every default filled in) is a valid custom resource, every
    field the models know is declared in the schema (pruning drops only nulls that mean "unset"),
    and the stored object parses back to the same spec."""
    from humpback_runtime.spec import load_run

    dumped = dump_run(load_run(path))
    assert crd_errors(dumped) == []
    stored = prune(dumped, openapi_schema(), root=True)
    assert {value for _, value in removed(dumped, stored)} <= {None}, removed(dumped, stored)
    assert parse_run(stored).spec == parse_run(dumped).spec


def removed(before: Any, after: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, value) of every map entry in `before` that `after` lacks."""
    if isinstance(before, dict):
        found = []
        for key, value in before.items():
            if key not in after:
                found.append((f"{path}.{key}", value))
            else:
                found += removed(value, after[key], f"{path}.{key}")
        return found
    if isinstance(before, list):
        return [r for i, (b, a) in enumerate(zip(before, after)) for r in removed(b, a, f"{path}[{i}]")]
    return []


BROKEN = {
    "threshold above 5": ("spec.curation.threshold", 7),
    "threshold below 1": ("spec.curation.threshold", 0.5),
    "unknown curation mode": ("spec.curation.mode", "vibes"),
    "negative iterations": ("spec.curation.iterations", -1),
    "too many iterations": ("spec.curation.iterations", 11),
    "iterations not a number": ("spec.curation.iterations", "two"),
    "baseModel not a string": ("spec.baseModel", 5),
    "empty baseModel": ("spec.baseModel", ""),
    "seed not an object": ("spec.seed", "oasst1"),
    "unknown seed format": ("spec.seed.format", "csv"),
    "minQuality above 1": ("spec.seed.minQuality", 1.5),
    "dedup threshold 0 (exclusive minimum)": ("spec.corpus.dedup.threshold", 0),
    "numPerm too small": ("spec.corpus.dedup.numPerm", 8),
    "maxDocuments 0": ("spec.corpus.maxDocuments", 0),
    "topP 0 (exclusive minimum)": ("spec.augmentation.topP", 0),
    "temperature above 2": ("spec.augmentation.temperature", 2.5),
    "zero stage 4": ("spec.training.forward.zeroStage", 4),
    "negative learning rate": ("spec.training.seed.learningRate", -1e-5),
    "empty steps schedule": ("spec.training.backward.stepsBySize", []),
    "schedule entry missing steps": ("spec.training.backward.stepsBySize", [{"maxExamples": 10}]),
    "unknown precision": ("spec.training.backward.precision", "fp8"),
    "empty system prompt": ("spec.systemPrompts.seed", ""),
    "unknown engine": ("spec.inference.engine", "llama.cpp"),
    "no evaluation sets": ("spec.evaluation.sets", []),
    "eval set name with spaces": ("spec.evaluation.sets", [{"name": "Vicuna 80", "source": "builtin:vicuna80"}]),
    "judge without model": ("spec.evaluation.judge", {"endpoint": "http://judge"}),
    "node selector value not a string": ("spec.resources.training.nodeSelector", {"gpu": 1}),
    "unknown toleration operator": ("spec.resources.inference.tolerations", [{"operator": "Maybe"}]),
    "extraArgs not a list": ("spec.resources.inference.extraArgs", "--enforce-eager"),
    "negative retry limit": ("spec.retries.limit", -1),
    "suspend not a boolean": ("spec.suspend", 3),
    "storage uri not a string": ("spec.storage.uri", 5),
}


@pytest.mark.parametrize("path,value", BROKEN.values(), ids=BROKEN.keys())
def test_broken_specs_fail_the_crd_and_the_runtime(path, value):
    doc = with_value(minimal(), path, value)
    assert crd_errors(doc), f"the CRD schema accepts {path}={value!r}"
    assert not runtime_accepts(doc), f"the runtime accepts {path}={value!r}"


@pytest.mark.parametrize("path", ["spec", "spec.baseModel", "spec.seed", "spec.corpus", "spec.seed.source"])
def test_missing_required_fields_fail_both(path):
    doc = without(minimal(), path)
    assert crd_errors(doc)
    assert not runtime_accepts(doc)


VALID = {
    "minimal": ("spec.suspend", False),
    "integer threshold for a number": ("spec.curation.threshold", 4),
    "every language (null)": ("spec.seed.lang", None),
    "no seed cap (null)": ("spec.seed.maxExamples", None),
    "numbered records (null id field)": ("spec.seed.fields.id", None),
    "no judge (null, pruned)": ("spec.evaluation.judge", None),
    "null idField (pruned)": ("spec.corpus.idField", None),
    "toleration with a null operator (pruned)": ("spec.resources.training.tolerations", [{"key": "a", "operator": None}]),
    "empty node selector": ("spec.resources.inference.nodeSelector", {}),
    "logprobs mode": ("spec.curation.mode", "logprobs"),
    "judge": ("spec.evaluation.judge", {"endpoint": "http://judge/v1", "model": "j", "apiKeySecret": "k"}),
}


@pytest.mark.parametrize("path,value", VALID.values(), ids=VALID.keys())
def test_valid_variants_pass_the_crd_and_the_runtime(path, value):
    doc = with_value(minimal(), path, value)
    assert crd_errors(doc) == []
    assert runtime_accepts(doc)


def test_null_keeps_its_meaning_through_the_api_server():
    doc = with_value(minimal(), "spec.seed.lang", None)
    stored = prune(doc, openapi_schema(), root=True)
    assert stored["spec"]["seed"]["lang"] is None
    assert parse_run(stored).spec.seed.lang is None


def test_unknown_fields_are_pruned_by_the_api_server_but_rejected_by_the_runtime():
    """Documented difference: a structural schema cannot forbid unknown fields; the API server
    drops them (kubectl apply's strict field validation refuses them), `humpback validate` names them."""
    doc = with_value(minimal(), "spec.curation.treshold", 3)
    assert crd_errors(doc) == []
    assert "treshold" not in prune(doc, openapi_schema(), root=True)["spec"]["curation"]
    assert not runtime_accepts(doc)


def test_the_api_server_is_stricter_about_numeric_strings():
    """Documented difference, in the safe direction: pydantic's lax mode reads "2" as 2, the API
    server does not; whatever a cluster accepts, the runtime accepts too."""
    doc = with_value(minimal(), "spec.curation.iterations", "2")
    assert crd_errors(doc)
    assert runtime_accepts(doc)


# --- the apiextensions schema of the CRD object itself --------------------------------------


def test_crd_object_is_valid_for_apiextensions_v1():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    obj = yaml.safe_load(CHECKED_IN.read_text(encoding="utf-8"))
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(obj, version, strict=True)


# --- the converter on constructs the spec does not use (yet) -------------------------------


class _Leaf(BaseModel):
    x: int = 0


def test_int_or_string_union_becomes_int_or_string():
    class M(BaseModel):
        port: int | str = Field(description="A port number or name.")

    schema = crd.structural_schema(M)
    assert schema["properties"]["port"] == {"description": "A port number or name.", "x-kubernetes-int-or-string": True}


def test_other_unions_are_rejected_with_the_field_path():
    class M(BaseModel):
        value: str | list[str]

    with pytest.raises(crd.CRDSchemaError, match=r"M\.value: union of string, array"):
        crd.structural_schema(M)


def test_unsupported_keywords_are_errors_not_silently_dropped():
    class M(BaseModel):
        pair: tuple[int, str] = (0, "")

    with pytest.raises(crd.CRDSchemaError, match=r"M\.pair: JSON schema keyword 'prefixItems'"):
        crd.structural_schema(M)


def test_recursive_models_are_rejected():
    class Node(BaseModel):
        children: list[Node] = []

    Node.model_rebuild()
    with pytest.raises(crd.CRDSchemaError, match="contains itself"):
        crd.structural_schema(Node)


def test_nullable_enum_with_a_meaning_for_null_is_rejected():
    class M(BaseModel):
        mode: Literal["a", "b"] | None = "a"

    with pytest.raises(crd.CRDSchemaError, match="nullable enum"):
        crd.structural_schema(M)


def test_bounds_constants_maps_and_any():
    class M(BaseModel):
        both: float = Field(1.0, ge=0, gt=0.5)
        looser_exclusive: float = Field(1.0, ge=1, gt=0)
        below: int = Field(0, lt=10)
        fixed: Literal["only"] = "only"
        labels: dict[str, int] = {}
        anything: dict[str, Any] = {}
        whatever: Any = Field(None, description="Free-form.")
        leaves: list[_Leaf] = []
        tags: set[str] = set()

    props = crd.structural_schema(M)["properties"]
    assert props["both"] == {"type": "number", "minimum": 0.5, "exclusiveMinimum": True}
    assert props["looser_exclusive"] == {"type": "number", "minimum": 1}
    assert props["below"] == {"type": "integer", "maximum": 10, "exclusiveMaximum": True}
    assert props["fixed"] == {"type": "string", "enum": ["only"]}
    assert props["labels"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert props["anything"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert props["whatever"] == {"description": "Free-form.", "x-kubernetes-preserve-unknown-fields": True}
    assert props["leaves"]["items"] == {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}


def test_long_descriptions_are_cut():
    class M(BaseModel):
        x: int = Field(0, description="word " * 200)

    description = crd.structural_schema(M)["properties"]["x"]["description"]
    assert len(description) <= crd.MAX_DESCRIPTION and description.endswith("...")
