"""Operator settings from the environment: default images, service account, training backend.

    HUMPBACK_RUNTIME_IMAGE=registry.example.com/humpback-runtime:0.1.0 kopf run -m humpback_operator.backtranslationrun ...

Read once at start; an invalid value stops the operator with an error that names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

DEFAULT_RUNTIME_IMAGE = "ghcr.io/humpback-dev/humpback-runtime:0.1.0"
# Built FROM vllm/vllm-openai:v0.32.0 (pinned), plus what S3 loading with the Run:ai streamer needs.
DEFAULT_VLLM_IMAGE = "ghcr.io/humpback-dev/humpback-vllm:0.1.0"

# Backends that backends.py can build, and the ones the operator's environment may select.
# "trainjob" (Kubeflow Trainer v2) is built and schema-checked but not offered yet: see the
# docstring of backends.py for what its API cannot carry. Code and tests may still pick it.
KNOWN_TRAINING_BACKENDS = ("pytorchjob", "trainjob")
SUPPORTED_TRAINING_BACKENDS = ("pytorchjob",)

ENV_RUNTIME_IMAGE = "HUMPBACK_RUNTIME_IMAGE"
ENV_VLLM_IMAGE = "HUMPBACK_VLLM_IMAGE"
ENV_SERVICE_ACCOUNT = "HUMPBACK_SERVICE_ACCOUNT"
ENV_TRAINING_BACKEND = "HUMPBACK_TRAINING_BACKEND"
ENV_STAGE_METRICS_PORT = "HUMPBACK_STAGE_METRICS_PORT"  # the chart's metrics.stagePods.port

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class OperatorConfig:
    runtime_image: str = DEFAULT_RUNTIME_IMAGE  # training pods and Jobs
    vllm_image: str = DEFAULT_VLLM_IMAGE  # vLLM server Deployments
    service_account: str | None = None  # of every child pod (e.g. one with IRSA for S3); None: namespace default
    training_backend: str = "pytorchjob"
    vllm_port: int = 8000
    # Port on which stage pods serve Prometheus metrics (declared as `metrics`); None: none.
    stage_metrics_port: int | None = None

    def __post_init__(self) -> None:
        for name, problem in _problems(vars(self)):
            raise ValueError(f"OperatorConfig.{name}: {problem}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> OperatorConfig:
        """Settings from HUMPBACK_* variables; unset or empty variables keep the defaults."""
        env_of = {
            "runtime_image": ENV_RUNTIME_IMAGE,
            "vllm_image": ENV_VLLM_IMAGE,
            "service_account": ENV_SERVICE_ACCOUNT,
            "training_backend": ENV_TRAINING_BACKEND,
        }
        values: dict[str, object] = {field: environ[var].strip() for field, var in env_of.items()
                                     if environ.get(var, "").strip()}
        raw_port = environ.get(ENV_STAGE_METRICS_PORT, "").strip()
        if raw_port:
            if not raw_port.isdigit():
                raise ValueError(f"{ENV_STAGE_METRICS_PORT}: expected a port number 1-65535, got {raw_port!r}")
            values["stage_metrics_port"] = int(raw_port)
            env_of["stage_metrics_port"] = ENV_STAGE_METRICS_PORT
        # Checked here first so that the error names the variable rather than the field.
        merged = {f.name: f.default for f in fields(cls)} | values
        for field, problem in _problems(merged, backends=SUPPORTED_TRAINING_BACKENDS):
            raise ValueError(f"{env_of[field]}: {problem}")
        return cls(**values)


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
    if backend == "trainjob" and backend not in backends:
        problems.append(("training_backend", ("'trainjob' (Kubeflow Trainer v2) is not supported yet: its TrainJob "
                                              "cannot carry the pod labels and security context the operator sets; "
                                              "use pytorchjob")))
    elif backend not in backends:
        problems.append(("training_backend", f"expected one of {', '.join(backends)}, got {backend!r}"))
    for field in ("vllm_port", "stage_metrics_port"):
        port = values[field]
        if field == "stage_metrics_port" and port is None:
            continue
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.append((field, f"expected a port number 1-65535, got {port!r}"))
    return problems
