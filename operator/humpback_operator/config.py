"""Operator settings from the environment: default images, service account, training backend.

    HUMPBACK_RUNTIME_IMAGE=registry.example.com/humpback-runtime:0.1.0 kopf run -m humpback_operator.backtranslationrun ...

Read once at start; an invalid value stops the operator with an error that names the variable.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

DEFAULT_RUNTIME_IMAGE = "ghcr.io/humpback-dev/humpback-runtime:0.1.0"
# Built FROM vllm/vllm-openai:v0.32.0 (pinned), plus what S3 loading with the Run:ai streamer needs.
DEFAULT_VLLM_IMAGE = "ghcr.io/humpback-dev/humpback-vllm:0.1.0"

# Backends that backends.py can build.
KNOWN_TRAINING_BACKENDS = ("pytorchjob", "trainjob")

ENV_RUNTIME_IMAGE = "HUMPBACK_RUNTIME_IMAGE"
ENV_VLLM_IMAGE = "HUMPBACK_VLLM_IMAGE"
ENV_SERVICE_ACCOUNT = "HUMPBACK_SERVICE_ACCOUNT"
ENV_TRAINING_BACKEND = "HUMPBACK_TRAINING_BACKEND"
# "true": Kubeflow Trainer v2 is installed and the operator may create and watch TrainJobs (the
# chart's rbac.trainJobs); implied by HUMPBACK_TRAINING_BACKEND=trainjob.
ENV_TRAINJOBS = "HUMPBACK_TRAINJOBS"
ENV_PROBE_ALLOWED_STORES = "HUMPBACK_PROBE_ALLOWED_STORES"
ENV_POLICY = "HUMPBACK_POLICY"
ENV_STAGE_METRICS_PORT = "HUMPBACK_STAGE_METRICS_PORT"  # the chart's metrics.stagePods.port

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def normalize_endpoint(url: str | None) -> str:
    """scheme://host[:port] in lower case, without path or trailing slash; "" for no endpoint."""
    if not url:
        return ""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class AllowedStore:
    """A store the operator may read with its own credentials: buckets matching `bucket` (a glob,
    e.g. "ml-runs-*") at exactly `endpoint` ("" = AWS S3 itself; a plain http:// endpoint is only
    ever allowed by naming it here)."""

    bucket: str
    endpoint: str = ""

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"bucket: expected a bucket name or glob (no '/'), got {self.bucket!r}")
        endpoint = normalize_endpoint(self.endpoint)
        if endpoint and (urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc
                         or any(c in endpoint for c in "*?[")):
            raise ValueError(f"endpoint: expected an exact http(s)://host[:port] (no globs), got {self.endpoint!r}")
        object.__setattr__(self, "endpoint", endpoint)

    def allows(self, uri: str, endpoint: str | None) -> bool:
        if not uri.startswith("s3://"):
            return False
        bucket = urlsplit(uri).netloc
        return fnmatch.fnmatchcase(bucket, self.bucket) and normalize_endpoint(endpoint) == self.endpoint


def parse_allowed_stores(raw: str) -> tuple[AllowedStore, ...]:
    """`[{"bucket": "ml-*", "endpoint": "https://minio.example:9000"}, ...]` (JSON, as the chart writes it)."""
    try:
        items = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"expected a JSON list of {{bucket, endpoint}} objects ({e})") from None
    if not isinstance(items, list):
        raise ValueError("expected a JSON list of {bucket, endpoint} objects")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"bucket", "endpoint"}:
            raise ValueError(f"item {i}: expected an object with keys bucket and endpoint, got {item!r}")
        try:
            out.append(AllowedStore(str(item.get("bucket") or ""), str(item.get("endpoint") or "")))
        except ValueError as e:
            raise ValueError(f"item {i}: {e}") from None
    return tuple(out)


@dataclass(frozen=True)
class OperatorConfig:
    runtime_image: str = DEFAULT_RUNTIME_IMAGE  # training pods and Jobs
    vllm_image: str = DEFAULT_VLLM_IMAGE  # vLLM server Deployments
    service_account: str | None = None  # of every child pod (e.g. one with IRSA for S3); None: namespace default
    training_backend: str = "pytorchjob"  # runs may choose their own (spec.trainingBackend)
    trainjobs: bool = False  # TrainJobs may be created (and are watched); see ENV_TRAINJOBS
    vllm_port: int = 8000
    # Stores the operator reads with its own credentials (the store probe); empty: none, every
    # stage's pod checks its own store with the run's Secret.
    probe_allowed_stores: tuple[AllowedStore, ...] = ()
    # Tenancy policy (policy.py; the chart's `policy`), from HUMPBACK_POLICY as JSON
    # {"allowedImages": [...], "allowedServiceAccounts": [...], "secretLabel": "key=value"}.
    allowed_images: tuple[str, ...] = ()  # prefixes of images a run may name; empty: any
    allowed_service_accounts: tuple[str, ...] = ()  # globs a run may name; empty: none ("*": any)
    secret_label: str = ""  # "key=value" every Secret a run references must carry; empty: any Secret

    def probe_allowed(self, uri: str, endpoint: str | None) -> bool:
        return any(a.allows(uri, endpoint) for a in self.probe_allowed_stores)
    # Port on which stage pods serve Prometheus metrics (declared as `metrics`); None: none.
    stage_metrics_port: int | None = None

    def __post_init__(self) -> None:
        for name, problem in _problems(vars(self)):
            raise ValueError(f"OperatorConfig.{name}: {problem}")
        if self.training_backend == "trainjob":
            object.__setattr__(self, "trainjobs", True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> OperatorConfig:
        """Settings from HUMPBACK_* variables; unset or empty variables keep the defaults."""
        env_of = {
            "runtime_image": ENV_RUNTIME_IMAGE,
            "vllm_image": ENV_VLLM_IMAGE,
            "service_account": ENV_SERVICE_ACCOUNT,
            "training_backend": ENV_TRAINING_BACKEND,
        }
        values: dict = {field: environ[var].strip() for field, var in env_of.items() if environ.get(var, "").strip()}
        if environ.get(ENV_PROBE_ALLOWED_STORES, "").strip():
            try:
                values["probe_allowed_stores"] = parse_allowed_stores(environ[ENV_PROBE_ALLOWED_STORES])
            except ValueError as e:
                raise ValueError(f"{ENV_PROBE_ALLOWED_STORES}: {e}") from None
        if environ.get(ENV_POLICY, "").strip():
            try:
                values.update(parse_policy(environ[ENV_POLICY]))
            except ValueError as e:
                raise ValueError(f"{ENV_POLICY}: {e}") from None
        raw_port = environ.get(ENV_STAGE_METRICS_PORT, "").strip()
        if raw_port:
            if not raw_port.isdigit():
                raise ValueError(f"{ENV_STAGE_METRICS_PORT}: expected a port number 1-65535, got {raw_port!r}")
            values["stage_metrics_port"] = int(raw_port)
            env_of["stage_metrics_port"] = ENV_STAGE_METRICS_PORT
        # Checked here first so that the error names the variable rather than the field.
        merged = {f.name: f.default for f in fields(cls)} | values
        for field, problem in _problems(merged):
            raise ValueError(f"{env_of[field]}: {problem}")
        values["trainjobs"] = trainjobs_enabled(environ)
        return cls(**values)


def trainjobs_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the operator may create and watch TrainJobs (read at import by child_events too: what it watches)."""
    return (environ.get(ENV_TRAINJOBS, "").strip().lower() == "true"
            or environ.get(ENV_TRAINING_BACKEND, "").strip() == "trainjob")


def parse_policy(raw: str) -> dict:
    """The fields of HUMPBACK_POLICY (JSON, as the chart writes it) as OperatorConfig arguments."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"expected a JSON object ({e})") from None
    keys = {"allowedImages": "allowed_images", "allowedServiceAccounts": "allowed_service_accounts",
            "secretLabel": "secret_label"}
    if not isinstance(data, dict) or set(data) - set(keys):
        raise ValueError(f"expected a JSON object with keys {', '.join(keys)}, got {raw.strip()!r}")
    out: dict = {}
    for key in ("allowedImages", "allowedServiceAccounts"):
        items = data.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
            raise ValueError(f"{key}: expected a list of non-empty strings, got {items!r}")
        out[keys[key]] = tuple(i.strip() for i in items)
    label = data.get("secretLabel") or ""
    if not isinstance(label, str) or (label and (label.count("=") != 1 or not label.split("=")[0])):
        raise ValueError(f"secretLabel: expected KEY=VALUE (e.g. humpback.dev/usable-by-runs=true), got {label!r}")
    out["secret_label"] = label
    return out


def _problems(values: Mapping[str, object], backends: tuple[str, ...] = KNOWN_TRAINING_BACKENDS) -> list[tuple[str, str]]:
    """(field, what is wrong) for each invalid setting."""
    problems = []
    for field in ("runtime_image", "vllm_image"):
        image = values[field]
        if not isinstance(image, str) or not image or any(c.isspace() for c in image):
            problems.append((field, f"expected a container image reference without spaces, got {image!r}"))
    sa = values["service_account"]
    if sa is not None and (not isinstance(sa, str) or len(sa) > 253 or not _DNS_SUBDOMAIN.match(sa)):
        problems.append(("service_account", f"expected a ServiceAccount name (lowercase letters, digits, '-' and '.'), got {sa!r}"))
    backend = values["training_backend"]
    if backend not in backends:
        problems.append(("training_backend", f"expected one of {', '.join(backends)}, got {backend!r}"))
    for field in ("vllm_port", "stage_metrics_port"):
        port = values[field]
        if field == "stage_metrics_port" and port is None:
            continue
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.append((field, f"expected a port number 1-65535, got {port!r}"))
    return problems
