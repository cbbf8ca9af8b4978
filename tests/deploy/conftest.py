"""Fixtures of the deployment tests: the helm and kubectl binaries (`bash scripts/kube_tools.sh`
puts them in .cache/kube-tools/bin/), rendering the chart and building kustomizations, and
validating objects against the Kubernetes OpenAPI schemas (kubernetes-validate).

No cluster is needed. A missing binary or library skips the tests that need it, never fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE_TOOLS = ROOT / ".cache" / "kube-tools" / "bin"


def _tool(name: str) -> str:
    for candidate in (KUBE_TOOLS / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} not found in {KUBE_TOOLS} or on PATH; run: bash scripts/kube_tools.sh")


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool("helm")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _tool("kubectl")


def run_tool(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a binary with a clean Helm/kubectl environment (no user config, no cluster)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(ROOT / ".cache" / "kube-tools" / "home"),
        "HELM_CACHE_HOME": str(ROOT / ".cache" / "kube-tools" / "helm-cache"),
        "HELM_CONFIG_HOME": str(ROOT / ".cache" / "kube-tools" / "helm-config"),
        "HELM_DATA_HOME": str(ROOT / ".cache" / "kube-tools" / "helm-data"),
        "KUBECONFIG": "/nonexistent/humpback-tests/kubeconfig",
    }
    result = subprocess.run(list(args), check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-05` (no dot) is a string; kustomize writes YAML 1.2, where
    it is a float (as for the API server)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_Yaml12Loader) if isinstance(d, dict)]


@pytest.fixture(scope="session")
def helm_run(helm) -> Callable[..., subprocess.CompletedProcess[str]]:
    """helm_run(*args): run helm with these arguments; the result, whatever its exit status."""
    return lambda *args: run_tool([helm, *args], check=False)


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., list[dict[str, Any]]]:
    """render(*helm_args): the objects `helm template` renders from charts/humpback-operator,
    release humpback-operator in namespace humpback-system (the names manifests/ uses)."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(*args: str) -> list[dict[str, Any]]:
        if args not in cache:
            out = run_tool([helm, "template", "humpback-operator", "charts/humpback-operator",
                            "--namespace", "humpback-system", *args]).stdout
            cache[args] = documents(out)
        return cache[args]

    return _render


@pytest.fixture(scope="session")
def kustomize(kubectl) -> Callable[[str], list[dict[str, Any]]]:
    """kustomize(dir): the objects `kubectl kustomize` builds from a directory under the repository."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _build(directory: str) -> list[dict[str, Any]]:
        if directory not in cache:
            cache[directory] = documents(run_tool([kubectl, "kustomize", directory]).stdout)
        return cache[directory]

    return _build


@pytest.fixture(scope="session")
def k8s_validate() -> Callable[[dict[str, Any]], None]:
    """Validate an object against the Kubernetes OpenAPI schemas, strictly (unknown fields fail),
    for the oldest Kubernetes the chart claims (1.30 tested) and the newest kubernetes-validate knows."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    versions = ("1.30.0", kubernetes_validate.latest_version())

    def _validate(obj: dict[str, Any]) -> None:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
                raise AssertionError(f"{name} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}") from e

    return _validate
