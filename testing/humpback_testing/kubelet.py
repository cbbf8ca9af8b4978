"""The stand-in kubelet: runs a child's container command on this machine, as a pod would run it.

`StandIns(..., kubelet=True)` uses it for Jobs and PyTorchJobs (a PyTorchJob: its Master's
`pytorch` container). The environment is the container's as the kubelet builds it: `envFrom` and
`valueFrom` from ConfigMaps and Secrets read through the API (a missing one raises LookupError,
the kubelet's CreateContainerConfigError: the pod waits), `fieldRef`s of the pod, `$(VAR)`
references expanded; a PyTorchJob gets the PET_* / MASTER_* variables of the training operator
for one node. The image's programs are this venv's (`humpback`, `torchrun`, `kopf`, `python`).
Each container's output goes to `log_dir/<kind>-<name>.log`.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes


class Kubelet:
    """Starts containers of the children the stand-in controllers run; `kill` ends them."""

    def __init__(self, core: kubernetes.client.CoreV1Api, *, workdir: Path, env: Mapping[str, str],
                 env_overrides: Mapping[str, str], log_dir: Path, entrypoint: tuple[str, ...]) -> None:
        self._core = core
        self.workdir, self.log_dir, self.entrypoint = Path(workdir), Path(log_dir), entrypoint
        self.env = dict(env)  # under the container's env
        self.env_overrides = dict(env_overrides)  # over it: endpoints that only the test knows

    def start(self, kind: str, namespace: str, name: str, uid: str, obj: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
        """Start the child's (PyTorchJob: its Master's) container here: (process, log path).
        LookupError while a ConfigMap, Secret or key it needs is missing."""
        if kind == "PyTorchJob":
            template = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
            pod_name = f"{name}-master-0"
        else:
            template = obj["spec"]["template"]
            pod_name = f"{name}-{secrets.token_hex(3)[:5]}"
        containers = template["spec"]["containers"]
        container = next((c for c in containers if c.get("name") == "pytorch"), containers[0])
        pod_meta = {"name": pod_name, "namespace": namespace, "uid": uid,
                    "labels": {**(obj["metadata"].get("labels") or {}), **((template.get("metadata") or {}).get("labels") or {})},
                    "annotations": (template.get("metadata") or {}).get("annotations") or {}}
        container_env = self.container_env(namespace, container, pod_meta, template["spec"])
        argv = [_expand(arg, container_env) for arg in (container.get("command") or list(self.entrypoint)) + (container.get("args") or [])]
        argv = self.local_executable(argv)
        env = {**self.env, **container_env, **self.env_overrides}
        if kind == "PyTorchJob":
            nproc = str(obj["spec"].get("nprocPerNode") or _flag(argv, "--nproc-per-node", "--nproc_per_node") or "1")
            port = str(_free_port())
            env.update(PET_NNODES="1", PET_NODE_RANK="0", PET_NPROC_PER_NODE=nproc, PET_MASTER_ADDR="127.0.0.1",
                       PET_MASTER_PORT=port, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="1", RANK="0")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{kind.lower()}-{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return process, log_path

    def container_env(self, namespace: str, container: dict[str, Any], pod: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef")
            data = self.read_data(namespace, "secret" if "secretRef" in source else "configmap", ref["name"], ref.get("optional", False))
            env.update({prefix + key: value for key, value in (data or {}).items()})
        for var in container.get("env") or []:
            name, source = var["name"], var.get("valueFrom")
            if source is None:
                env[name] = _expand(var.get("value", ""), env)
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "configmap" if "configMapKeyRef" in source else "secret"
                ref = source.get("configMapKeyRef") or source.get("secretKeyRef")
                data = self.read_data(namespace, kind, ref["name"], ref.get("optional", False))
                if data is not None and ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional", False):
                    raise LookupError(f'couldn\'t find key {ref["key"]} in {kind} {namespace}/{ref["name"]}')
            elif "fieldRef" in source:
                env[name] = _field(pod, pod_spec, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = "1"
        return env

    def read_data(self, namespace: str, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        try:
            if kind == "secret":
                secret = self._core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            return dict(self._core.read_namespaced_config_map(name, namespace).data or {})
        except kubernetes.client.ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise LookupError(f'{kind} "{name}" not found in namespace {namespace}') from None
            raise

    @staticmethod
    def local_executable(argv: list[str]) -> list[str]:
        """The image's programs are this venv's: humpback, torchrun, python."""
        if not argv:
            raise ValueError("the container has no command")
        bin_dir = Path(sys.executable).parent
        if argv[0] in ("python", "python3"):
            return [sys.executable, *argv[1:]]
        if argv[0] in ("humpback", "torchrun", "kopf") and (bin_dir / argv[0]).exists():
            return [str(bin_dir / argv[0]), *argv[1:]]
        return argv


def kill(process: subprocess.Popen[bytes] | None) -> None:
    """End a started container's process group: SIGTERM, then SIGKILL after 5 s."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(5)


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) references in command, args and env values; $$(VAR) escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _field(pod: Mapping[str, Any], pod_spec: Mapping[str, Any], path: str) -> str:
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str(pod[match.group(1)].get(match.group(2), ""))
    return {
        "metadata.name": pod["name"], "metadata.namespace": pod["namespace"], "metadata.uid": pod["uid"],
        "spec.nodeName": "standin-node", "spec.serviceAccountName": pod_spec.get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "status.podIPs": "127.0.0.1",
    }.get(path, "")


def _flag(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = ["Kubelet", "kill"]
