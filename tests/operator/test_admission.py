"""The emulator's admission answers as fast as it can and exactly as a plain validation would: the
shortcuts taken for speed under load (validity decided by the compiled jsonschema-rs, CEL rules
given only the fields they read) never change an answer."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("celpy")

from humpback_testing.kube import admission  # noqa: E402
from humpback_testing.kube.emulator import _to_jsonschema  # noqa: E402

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "humpback.dev_backtranslationruns.yaml"


def run_schema() -> dict:
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return _to_jsonschema({k: v for k, v in schema.items() if k != "x-kubernetes-validations"})


def whole_errors(schema: dict, body: dict) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(body))


STATUS = {
    "phase": "Running", "observedGeneration": 2, "message": "train-m0 running",
    "stages": [{"name": "prepare-seed", "phase": "Succeeded", "attempt": 1},
               {"name": "train-m0", "phase": "Running", "attempt": 2, "reason": "Unschedulable"}],
    "conditions": [{"type": "Ready", "status": "False", "reason": "Running", "message": "m"}],
}
BREAKAGES = [  # (path, value): each makes the status invalid somewhere in its tree
    (("phase",), 3), (("phase",), "Exploded"), (("observedGeneration",), "two"), (("stages",), {"a": 1}),
    (("stages", 0, "attempt"), "x"), (("stages", 1, "name"), 5), (("stages", 1, "phase"), None),
    (("conditions", 0, "status"), ["True"]), (("conditions",), "none"),
]


def broken(status: dict, path: tuple, value: object) -> dict:
    """`status` with the value at `path` replaced (in place)."""
    target = status
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return status


@pytest.mark.parametrize("path,value", [((), None), *BREAKAGES])
def test_a_status_checked_fast_gets_the_errors_of_a_plain_validation(path, value):
    schema = run_schema()
    validator = admission.schema_validator(schema)
    assert validator.fast is not None  # jsonschema-rs (a dev dependency) decides, jsonschema words the errors
    body = {"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
            "spec": {"baseModel": "m", "corpus": {"source": "c.jsonl"}, "seed": {"source": "s.jsonl"}}, "status": broken(copy.deepcopy(STATUS), path, value) if path else STATUS}
    expected = whole_errors(schema, body)
    assert (expected == []) == (path == ())  # each breakage is one the schema refuses
    assert admission.schema_errors(validator, body) == expected


def test_random_statuses_checked_fast_and_plain_agree():
    schema = run_schema()
    validator = admission.schema_validator(schema)
    rng = random.Random(7)
    for _ in range(200):
        status = copy.deepcopy(STATUS)
        for path, value in rng.sample(BREAKAGES, rng.randint(0, 3)):
            try:
                broken(status, path, value)
            except (KeyError, IndexError, TypeError):  # an earlier breakage removed the path
                pass
        body = {"spec": {"baseModel": "m", "corpus": {"source": "c.jsonl"}, "seed": {"source": "s.jsonl"}}, "status": status}
        assert admission.schema_errors(validator, body) == whole_errors(schema, body)


def test_a_job_checked_fast_gets_the_errors_of_a_plain_validation():
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "resourceVersion": "7"},
           "spec": {"backoffLimit": "no", "template": {"spec": {"containers": [{"name": "a", "image": "b"}]}}},
           "status": {"active": "x", "bogus": 1}}
    assert admission.builtin_errors(job) == [
        "spec.backoffLimit: Invalid value: 'no' is not of type 'integer', 'null'",
        "status: Invalid value: Additional properties are not allowed ('bogus' was unexpected)",
        "status.active: Invalid value: 'x' is not of type 'integer', 'null'",
    ]
    job["spec"]["backoffLimit"], job["status"] = 1, {"active": 1}
    assert admission.builtin_errors(job) == []


@pytest.mark.parametrize("rule,value,holds", [
    ("self.metadata.name.size() <= 4", {"metadata": {"name": "abcd", "resourceVersion": "1"}, "status": {"a": 1}}, True),
    ("self.metadata.name.size() <= 3", {"metadata": {"name": "abcd"}}, False),
    ("!has(self.spec.x) || self.spec.x > 1", {"spec": {"y": 1}}, True),
    ("!has(self.spec.x) || self.spec.x > 1", {"spec": {"x": 0}}, False),
    ("self.items[0] == 'a'", {"items": ["a", "b"], "other": 1}, True),
    ("size(self) == 2", {"a": 1, "b": 2}, True),  # self used whole: given whole
    ("self.all(k, k != 'c')", {"a": 1, "c": 2}, False),
])
def test_a_cel_rule_given_only_the_fields_it_reads_answers_as_on_the_whole_value(rule, value, holds):
    assert admission._holds(rule, value, None) is holds
    assert admission._holds(rule, value, None) is holds  # the kept answer


def whole_builtin_errors(obj: dict) -> list[str]:
    """kubernetes-validate's own way: the kind's schema, its references resolved as they come."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = utils.latest_version()
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    group, _, api = obj["apiVersion"].rpartition("/")
    schema = utils.schema_contents(f"{directory}/{obj['kind'].lower()}-{group.split('.')[0] + '-' if group else ''}{api}.json", version)
    registry = Resource.from_contents(utils.schema_contents(f"{directory}/_definitions.json", version)) @ (
        Resource.from_contents(schema) @ Registry())
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: Invalid value: {e.message}" for e in validator.iter_errors(obj))


def rendered_children() -> list[dict]:
    from humpback_operator.children import render_run
    from humpback_operator.config import OperatorConfig
    from humpback_runtime.spec import parse_run

    example = Path(__file__).resolve().parents[2] / "examples" / "llama2-7b-paper.yaml"
    return [o for o in render_run(parse_run(yaml.safe_load(example.read_text())), OperatorConfig())
            if o["kind"] in ("Job", "Deployment", "Service", "ConfigMap")]


CHILD_BREAKAGES = [  # (path, value) for a Job's or Deployment's template, at every depth
    (("spec", "template", "spec", "containers", 0, "resources", "limits"), "lots"),
    (("spec", "template", "spec", "containers", 0, "env", 0, "valueFrom"), {"bogus": 1}),
    (("spec", "template", "spec", "containers", 0, "image"), 5),
    (("spec", "template", "spec", "volumes"), [{"name": "v", "emptyDir": {"sizeLimit": []}}]),
    (("spec", "template", "metadata", "labels"), {"a": 1}),
    (("spec", "unknownField"), True),
    (("metadata", "annotations"), "no"),
    (("status",), {"active": "x", "bogus": 1}),
]


def test_built_in_children_checked_fast_get_the_errors_of_a_plain_validation():
    children = rendered_children()
    assert {o["kind"] for o in children} >= {"Job", "Deployment", "Service"}
    for obj in children:
        assert admission.builtin_errors(obj) == whole_builtin_errors(obj) == []  # (both sorted by path)
        for path, value in CHILD_BREAKAGES:
            if obj["kind"] not in ("Job", "Deployment") and path[0] == "spec":
                continue
            changed = copy.deepcopy(obj)
            try:
                broken(changed, path, value)
            except (KeyError, IndexError):  # this child has no such part (no env, no volumes)
                continue
            expected = whole_builtin_errors(changed)
            assert expected, (obj["kind"], path)
            assert sorted(admission.builtin_errors(changed)) == expected, (obj["kind"], path)
