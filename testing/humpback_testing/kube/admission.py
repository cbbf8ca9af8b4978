"""What kube-apiserver refuses and KMock accepts: the CEL rules of a CRD's schema
(`x-kubernetes-validations`, evaluated with cel-python) and the schemas of built-in kinds
(`kubernetes_validate`, strict: unknown fields and wrong types are errors).

    errors = cel_errors(crd_schema, obj, old)   # ["metadata.name must be a DNS-1123 label ...", ...]
    errors = builtin_errors(job)                # ["spec.backoffLimit: 'x' is not of type 'integer', 'null'"]

Both return messages as the API server phrases them after `<Kind> "<name>" is invalid: `, and []
when the object is fine. Without their libraries (cel-python, kubernetes-validate: the dev extra)
they check nothing.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

_ABSENT = object()


def cel_errors(schema: Mapping[str, Any], obj: Any, old: Any = _ABSENT) -> list[str]:
    """Every failed `x-kubernetes-validations` rule of `schema` on `obj`. Rules that read
    `oldSelf` (transition rules) are checked on updates only, as the API server does."""
    try:
        import celpy  # noqa: F401
    except ImportError:
        return []
    errors: list[str] = []
    _walk(schema, obj, None if old is _ABSENT else old, old is not _ABSENT, "", errors)
    return errors


_RULES_UNDER: dict[int, tuple[Mapping[str, Any], bool]] = {}  # id -> (schema node, kept so the id stays its own; answer)


def _has_rules(schema: Mapping[str, Any]) -> bool:
    """Whether `schema` or any schema under it has CEL rules (most of an object's subtrees have none)."""
    known = _RULES_UNDER.get(id(schema))
    if known is None or known[0] is not schema:
        subs = [*(schema.get("properties") or {}).values(), *(s for s in (schema.get("additionalProperties"), schema.get("items")) if isinstance(s, dict))]
        known = _RULES_UNDER[id(schema)] = (schema, bool(schema.get("x-kubernetes-validations")) or any(_has_rules(sub) for sub in subs))
    return known[1]


def _walk(schema: Mapping[str, Any], value: Any, old: Any, update: bool, path: str, errors: list[str]) -> None:
    if value is None or not _has_rules(schema):
        return
    for rule in schema.get("x-kubernetes-validations") or ():
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and (not update or old is None):
            continue
        if not _holds(rule["rule"], value, old if uses_old else None):
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            errors.append(f"{path or '<root>'}: Invalid value: {message}")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if sub:
                _walk(sub, child, old.get(key) if isinstance(old, dict) else None, update, f"{path}.{key}".lstrip("."), errors)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            _walk(schema["items"], child, None, update, f"{path}[{i}]", errors)


@functools.lru_cache(maxsize=256)
def _program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


@functools.lru_cache(maxsize=256)
def _paths_read(rule: str) -> tuple[tuple[str, ...], ...] | None:
    """The paths under `self` a rule reads (`self.metadata.name.size()` reads metadata.name), when
    it reads `self` only through field paths; None when it uses `self` whole (`size(self)`,
    `self.all(...)`)."""
    paths = []
    for match in re.finditer(r"\bself\b", rule):
        chain = re.match(r"((?:\.[A-Za-z_]\w*)+)(\s*\()?", rule[match.end():])
        if chain is None:
            return None
        names = tuple(chain.group(1).lstrip(".").split("."))
        if chain.group(2):  # the last name is a method called on the path before it
            names = names[:-1]
        if not names:
            return None
        paths.append(names)
    return tuple(paths)


def _only(value: Any, paths: list[tuple[str, ...]]) -> Any:
    """`value` with just the given paths (a path that ends here keeps the whole subtree)."""
    if not isinstance(value, dict) or any(not p for p in paths):
        return value
    return {key: _only(value[key], [p[1:] for p in paths if p[0] == key]) for key in dict.fromkeys(p[0] for p in paths) if key in value}


def _holds(rule: str, value: Any, old: Any) -> bool:
    paths = _paths_read(rule)
    if paths is not None:
        # Only what the rule reads counts: a root rule on metadata.name need not see (or convert)
        # a run's whole status on every status patch; the same input then gives the cached answer.
        value = _only(value, list(paths))
    return _evaluate(rule, json.dumps(value, sort_keys=True), None if old is None else json.dumps(old, sort_keys=True))


@functools.lru_cache(maxsize=4096)
def _evaluate(rule: str, value: str, old: str | None) -> bool:
    import celpy

    activation = {"self": celpy.json_to_cel(json.loads(value))}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(json.loads(old))
    try:
        result = _program(rule).evaluate(activation)
    except Exception:  # noqa: BLE001 -- a rule that cannot be evaluated on this value fails, as in the API server
        return False
    return bool(result) and not isinstance(result, Exception)


# --- built-in kinds ------------------------------------------------------------------------------


def builtin_errors(obj: Mapping[str, Any]) -> list[str]:
    """`obj` (a built-in kind) checked against the newest Kubernetes schemas kubernetes-validate
    ships, strictly; [] for a kind it has no schema for."""
    validators = _validators(obj.get("apiVersion", ""), obj.get("kind", ""))
    if validators is None:
        return []
    return [f"{'.'.join(path) or '<root>'}: Invalid value: {message}" for path, message in _split_errors(*validators, obj)]


def schema_errors(validators: tuple[_Validator, _Validator | None], obj: Mapping[str, Any]) -> list[str]:
    """`obj` (a custom resource, metadata left out) checked against its CRD's schema
    (`validators`: from `schema_validators`), as the API server phrases it."""
    return sorted(f"{'.'.join(path) or '<root>'}: {message}" for path, message in _split_errors(*validators, obj))


def _split_errors(validator: _Validator, status_validator: _Validator | None, obj: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Errors of `obj`, its status validated apart: most writes under load are status patches that
    leave the rest as it was, and answers are kept by the JSON validated, so an unchanged part is
    not validated again (resourceVersion, always valid, changes on every write: left out)."""
    rest = {k: v for k, v in obj.items() if k != "status"}
    if isinstance(rest.get("metadata"), dict):
        rest["metadata"] = {k: v for k, v in rest["metadata"].items() if k != "resourceVersion"}
    if "status" in obj and status_validator is None:  # a schema without a status: the whole object, as it is
        return sorted(validator.errors({**rest, "status": obj["status"]}))
    errors = validator.errors(rest)
    if "status" in obj:
        errors += [(("status", *path), message) for path, message in status_validator.errors(obj["status"])]
    return sorted(errors)


class _Validator:
    """A jsonschema validator whose answers are kept by the JSON it validated."""

    def __init__(self, validator: Any) -> None:
        self.validator = validator

    def errors(self, value: Any) -> list[tuple[tuple[str, ...], str]]:
        return list(_errors(self, json.dumps(value, sort_keys=True)))


class _TreeValidator(_Validator):
    """For a draft-4 schema without references: an object's declared properties and an array's
    items, `depth` levels down, are validated on their own and their answers kept, so a status patch
    that changes one stage of a run validates that stage again, not the whole status."""

    def __init__(self, schema: Mapping[str, Any], depth: int) -> None:
        import jsonschema

        super().__init__(jsonschema.Draft4Validator(schema))
        properties, items = schema.get("properties"), schema.get("items")
        self.parts = {k: _TreeValidator(v, depth - 1) for k, v in (properties or {}).items()} if depth > 0 else {}
        self.item = _TreeValidator(items, depth - 1) if depth > 0 and isinstance(items, dict) else None
        self.shallow = None  # the node's own keywords (type, required, ...), its parts accepting anything
        if self.parts or self.item is not None:
            shallow = {**schema, **({"properties": {k: {} for k in self.parts}} if self.parts else {}),
                       **({"items": {}} if self.item is not None else {})}
            self.shallow = jsonschema.Draft4Validator(shallow)

    def errors(self, value: Any) -> list[tuple[tuple[str, ...], str]]:
        if self.shallow is None:
            return super().errors(value)
        errors = [(tuple(map(str, e.absolute_path)), e.message) for e in self.shallow.iter_errors(value)]
        if isinstance(value, dict):
            for key, child in value.items():
                if key in self.parts:
                    errors += [((key, *path), message) for path, message in self.parts[key].errors(child)]
        elif isinstance(value, list) and self.item is not None:
            for i, child in enumerate(value):
                errors += [((str(i), *path), message) for path, message in self.item.errors(child)]
        return errors


@functools.lru_cache(maxsize=8192)
def _errors(validator: _Validator, document: str) -> tuple[tuple[tuple[str, ...], str], ...]:
    return tuple((tuple(map(str, e.absolute_path)), e.message) for e in validator.validator.iter_errors(json.loads(document)))


def schema_validators(schema: Mapping[str, Any]) -> tuple[_Validator, _Validator | None]:
    """A CRD's schema (draft-4 JSON Schema) as two validators: the object less its status, and the status."""
    import jsonschema

    status = (schema.get("properties") or {}).get("status")
    rest = {**schema, "properties": {k: v for k, v in (schema.get("properties") or {}).items() if k != "status"}}
    return _Validator(jsonschema.Draft4Validator(rest)), (_TreeValidator(status, depth=3) if status is not None else None)


@functools.lru_cache(maxsize=64)
def _validators(api_version: str, kind: str) -> tuple[_Validator, _Validator | None] | None:
    """One compiled validator per kind and one for its status: kubernetes_validate.validate() builds
    one per call (~50 ms)."""
    try:
        import jsonschema
        from kubernetes_validate import utils
        from referencing import Registry, Resource
    except ImportError:
        return None
    version = utils.latest_version()
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{directory}/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(f"{directory}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    status = (schema.get("properties") or {}).get("status")
    if status is not None:  # its $ref is relative to the kind's $id
        status = {**status, "$id": schema["$id"], "$schema": schema["$schema"]}
    rest = {**schema, "properties": {k: v for k, v in (schema.get("properties") or {}).items() if k != "status"}}
    return (_Validator(jsonschema.validators.Draft202012Validator(rest, registry=registry)),
            _Validator(jsonschema.validators.Draft202012Validator(status, registry=registry)) if status is not None else None)


# --- pod admission: PodSecurity and ResourceQuota -------------------------------------------------


def pod_security_problems(pod: Mapping[str, Any], level: str) -> list[str]:
    """The main checks of the Pod Security Standards ("baseline", "restricted"), phrased as the
    PodSecurity admission plugin phrases them."""
    spec = pod.get("spec") or {}
    pod_context = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    problems = []
    privileged = [c["name"] for c in containers if (c.get("securityContext") or {}).get("privileged")]
    if privileged:
        problems.append(f'privileged (container "{privileged[0]}" must not set securityContext.privileged=true)')
    if any("hostPath" in v for v in spec.get("volumes") or []):
        problems.append("restricted volume types (volumes must not use hostPath)")
    if level != "restricted":
        return problems
    escalating = [c["name"] for c in containers if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False]
    if escalating:
        problems.append(f'allowPrivilegeEscalation != false (container "{escalating[0]}" must set '
                        "securityContext.allowPrivilegeEscalation=false)")
    not_dropped = [c["name"] for c in containers
                   if "ALL" not in (((c.get("securityContext") or {}).get("capabilities") or {}).get("drop") or [])]
    if not_dropped:
        problems.append(f'unrestricted capabilities (container "{not_dropped[0]}" must set securityContext.capabilities.drop=["ALL"])')
    if not pod_context.get("runAsNonRoot") and not all((c.get("securityContext") or {}).get("runAsNonRoot") for c in containers):
        problems.append("runAsNonRoot != true (pod or containers must set securityContext.runAsNonRoot=true)")
    def seccomp(context: Mapping[str, Any]) -> str | None:
        return (context.get("seccompProfile") or {}).get("type")
    if seccomp(pod_context) not in ("RuntimeDefault", "Localhost") and not all(
            seccomp(c.get("securityContext") or {}) in ("RuntimeDefault", "Localhost") for c in containers):
        problems.append('seccompProfile (pod or containers must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    return problems


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity(text: Any) -> float:
    """A Kubernetes resource quantity ("500m", "96Gi", "8", 2) as a number."""
    text = str(text)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def _pod_usage(pod: Mapping[str, Any]) -> dict[str, float]:
    """What a pod counts against a quota: "pods", "requests.X", "limits.X", and "cpu", "memory"...
    for the requests (a resource with a limit only is requested at its limit, as the API server
    defaults it)."""
    usage: dict[str, float] = {"pods": 1}
    for c in (pod.get("spec") or {}).get("containers") or []:
        resources = c.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = {**limits, **(resources.get("requests") or {})}
        for prefix, amounts in (("requests.", requests), ("limits.", limits), ("", requests)):
            for name, amount in amounts.items():
                if prefix or "/" not in name:
                    usage[prefix + name] = usage.get(prefix + name, 0) + quantity(amount)
    return usage


def quota_exceeded(quota: Mapping[str, Any], pods: list[Mapping[str, Any]], new: Mapping[str, Any]) -> str:
    """"requested: memory=8Gi, used: memory=0, limited: memory=4Gi" if `new` does not fit in the
    ResourceQuota beside `pods`; "" if it does."""
    hard = (quota.get("spec") or {}).get("hard") or {}
    wanted = _pod_usage(new)
    used: dict[str, float] = {}
    for pod in pods:
        for key, amount in _pod_usage(pod).items():
            used[key] = used.get(key, 0) + amount
    over = [name for name, limit in hard.items() if wanted.get(name, 0) and used.get(name, 0) + wanted[name] > quantity(limit)]
    if not over:
        return ""
    def show(values: Mapping[str, float]) -> str:
        return ",".join(f"{name}={values.get(name, 0):g}" for name in over)
    return f"requested: {show(wanted)}, used: {show(used)}, limited: " + ",".join(f"{n}={hard[n]}" for n in over)
