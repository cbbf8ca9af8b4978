"""Fixtures for operator tests: an emulated Kubernetes API, its kubeconfig, clients, the stand-in
controllers, and kubectl.

    def test_something(kube_emulator, kube_api, standins): ...

The emulator and the stand-ins come from the test-support package (testing/humpback_testing,
installed by `make install`); the emulator knows nothing of humpback: the CRDs it serves are
passed in here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("humpback_testing", reason="the test-support package is not installed (make install, or pip install -e testing)")
kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is not installed (pip install -e .[operator])")

from humpback_testing.kube import Emulator, write_kubeconfig  # noqa: E402
from humpback_testing.kube import kube_env as make_kube_env  # noqa: E402
from humpback_testing.standins import PYTORCHJOB_CRD, StandIns  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBE_TOOLS = REPO_ROOT / ".cache" / "kube-tools" / "bin"
# What the emulated cluster serves: humpback's CRD (the file users apply) and the training operator's.
CRDS = (REPO_ROOT / "manifests" / "crd" / "humpback.dev_backtranslationruns.yaml", PYTORCHJOB_CRD)


@pytest.fixture
def kube_emulator() -> Iterator[Emulator]:
    """A running API server with the BacktranslationRun and PyTorchJob CRDs and the namespaces
    default and kube-system. Function-scoped: every test starts from an empty cluster."""
    with Emulator(crds=CRDS) as emulator:
        yield emulator


@pytest.fixture
def kubeconfig(kube_emulator: Emulator, tmp_path: Path) -> Path:
    """A kubeconfig file for the emulator (current namespace: default)."""
    return write_kubeconfig(tmp_path / "kubeconfig", kube_emulator.url)


@pytest.fixture
def kube_env(kubeconfig: Path, tmp_path: Path) -> dict[str, str]:
    """The environment for subprocesses (kopf, kubectl, humpback): KUBECONFIG set, no proxies,
    and a HOME of their own (kubectl caches discovery under ~/.kube)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return make_kube_env(kubeconfig, HOME=str(home))


@pytest.fixture
def kube_api(kubeconfig: Path) -> Iterator[kubernetes.client.ApiClient]:
    """A `kubernetes.client.ApiClient` for the emulator."""
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def make_standins(kubeconfig: Path, tmp_path: Path) -> Iterator:
    """A factory of started stand-in controllers: `make_standins(policy=…, kubelet=True, …)`
    (the keyword arguments of `StandIns`); each is stopped after the test."""
    started: list[StandIns] = []

    def make(**kwargs) -> StandIns:
        kwargs.setdefault("log_dir", tmp_path / "standins")
        kwargs.setdefault("workdir", REPO_ROOT)  # the children's commands run in the checkout
        standins = StandIns(kubeconfig, **kwargs).start()
        started.append(standins)
        return standins

    yield make
    for standins in started:
        standins.stop()


@pytest.fixture
def standins(make_standins) -> StandIns:
    """The stand-in controllers with the default policy: every child succeeds."""
    return make_standins()


@pytest.fixture
def kubectl() -> Path:
    """The kubectl binary of `bash scripts/kube_tools.sh`; the test is skipped without it."""
    path = KUBE_TOOLS / "kubectl"
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO_ROOT)} is missing: run `bash scripts/kube_tools.sh`")
    return path
