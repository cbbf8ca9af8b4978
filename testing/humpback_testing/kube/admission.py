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
    validator = _builtin_validator(obj.get("apiVersion", ""), obj.get("kind", ""))
    if validator is None:
        return []
    return [f"{'.'.join(path) or '<root>'}: Invalid value: {message}" for path, message in sorted(validator.errors(obj))]


def schema_errors(validator: _Validator, obj: Mapping[str, Any]) -> list[str]:
    """`obj` (a custom resource, metadata left out) checked against its CRD's schema
    (`validator`: from `schema_validator`), as the API server phrases it."""
    return sorted(f"{'.'.join(path) or '<root>'}: {message}" for path, message in validator.errors(obj))


class _Validator:
    """A schema checked in two steps: jsonschema-rs (compiled, in Rust) says whether an object is
    valid, and only for one that is not does jsonschema (Python) list the errors, in its wording.
    Under load nearly every write is valid, and the Python validation of a run's status or a Job was
    the emulator's largest cost. Without jsonschema-rs, jsonschema alone answers (the same answers:
    both implement the drafts; formats are not checked, as jsonschema does by default)."""

    def __init__(self, slow: Any, fast: Any | None) -> None:
        self.slow, self.fast = slow, fast

    def errors(self, value: Any) -> list[tuple[tuple[str, ...], str]]:
        if self.fast is not None and self.fast.is_valid(value):
            return []
        return [(tuple(map(str, e.absolute_path)), e.message) for e in self.slow.iter_errors(value)]


def _compiled(draft: str, schema: Mapping[str, Any], definitions: Mapping[str, Any] | None = None) -> Any | None:
    """jsonschema-rs's validator of `schema` (None without jsonschema-rs); `definitions`: the
    document its remaining `$ref`s point into."""
    try:
        import jsonschema_rs
    except ImportError:
        return None
    options = {"registry": jsonschema_rs.Registry([(definitions["$id"], definitions)])} if definitions else {}
    return getattr(jsonschema_rs, f"{draft}Validator")(schema, validate_formats=False, **options)


def schema_validator(schema: Mapping[str, Any]) -> _Validator:
    """A CRD's schema (draft-4 JSON Schema, no references) as a validator."""
    import jsonschema

    return _Validator(jsonschema.Draft4Validator(schema), _compiled("Draft4", schema))


@functools.lru_cache(maxsize=64)
def _builtin_validator(api_version: str, kind: str) -> _Validator | None:
    """One validator per kind (kubernetes_validate.validate() builds one per call: ~50 ms)."""
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
    slow = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    # Definitions inlined: the compiled validator then needs only the definitions that recur.
    return _Validator(slow, _compiled("Draft202012", _inline(schema, definitions, frozenset()), definitions))


def _inline(node: Any, definitions: Mapping[str, Any], expanding: frozenset[str]) -> Any:
    """`node` with each `$ref` to a definition replaced by the definition itself; a definition that
    contains itself (none of the kinds validated here) keeps an absolute `$ref` where it recurs."""
    if isinstance(node, list):
        return [_inline(item, definitions, expanding) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if not isinstance(ref, str) or "#/$defs/" not in ref:
        return {key: _inline(value, definitions, expanding) for key, value in node.items()}
    name = ref.split("#/$defs/", 1)[1]
    if name in expanding:
        return {**node, "$ref": f"{definitions['$id']}#/$defs/{name}"}
    target = _inline(definitions["$defs"][name], definitions, expanding | {name})
    siblings = {key: _inline(value, definitions, expanding) for key, value in node.items() if key not in ("$ref", "description")}
    return {"allOf": [target], **siblings} if siblings else target


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
