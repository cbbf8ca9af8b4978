"""An emulated Kubernetes API server for tests (KMock-based; see README.md here)."""

from humpback_testing.kube.emulator import (
    BUILTIN_RESOURCES,
    Emulator,
    KubeEmulator,
    RequestRecord,
    ResourceType,
    kube_env,
    load_crds,
    match_labels,
    parse_label_selector,
    write_kubeconfig,
)

__all__ = [
    "BUILTIN_RESOURCES",
    "Emulator",
    "KubeEmulator",
    "RequestRecord",
    "ResourceType",
    "kube_env",
    "load_crds",
    "match_labels",
    "parse_label_selector",
    "write_kubeconfig",
]
