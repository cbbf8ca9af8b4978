"""Local executor: runs the plan's stages in dependency order on this machine.

    humpback run examples/tiny-cpu.yaml [--storage URI] [--until STAGE]

Each stage runs as a subprocess of `humpback stage STAGE --spec RUN.yaml`, the very command the
operator puts into pods, so the local run exercises the cluster's entry point. Finished stages
(manifest with the current fingerprint) are skipped: after Ctrl-C, a crash or a spec edit, the
same command picks up where it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from humpback_runtime.context import RunContext
from humpback_runtime.spec import BacktranslationRun


def stage_command(stage: str, spec_path: str | Path, storage_uri: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "humpback_runtime", "stage", stage, "--spec", str(spec_path)]
    if storage_uri:
        cmd += ["--storage", storage_uri]
    return cmd


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_local(run: BacktranslationRun, spec_path: str | Path, *, storage_uri: str | None = None,
              until: str | None = None, out: TextIO = sys.stdout) -> int:
    """Returns the process exit code: 0 when every selected stage is done."""
    ctx = RunContext.create(run, storage_uri)
    plan = ctx.plan
    if run.spec.suspend:
        print(f"Run {run.name} is suspended (spec.suspend: true): nothing started.", file=out)
        return 0
    # --until: everything the plan orders up to and including that stage (its inputs come earlier).
    names = plan.names()[: plan.names().index(until) + 1] if until else plan.names()
    total = len(names)
    print(f"Run {run.namespace}/{run.name}: {total} stage(s), artifacts in {ctx.store.url(ctx.run_prefix)}",
          file=out, flush=True)
    t_run = time.perf_counter()
    for i, name in enumerate(names, 1):
        stage = plan[name]
        tag = f"[{i}/{total}] {name}"
        if ctx.is_done(stage):
            print(f"{tag}: done (fingerprint {stage.fingerprint}), skipped", file=out, flush=True)
            continue
        print(f"{tag}: running (fingerprint {stage.fingerprint})", file=out, flush=True)
        t0 = time.perf_counter()
        code = _run_child(stage_command(name, spec_path, storage_uri))
        elapsed = _fmt_seconds(time.perf_counter() - t0)
        if code == -signal.SIGINT or code == 130:
            print(f"{tag}: interrupted after {elapsed}; finished stages are kept, run the same command to resume",
                  file=out, flush=True)
            return 130
        if code != 0:
            print(f"{tag}: FAILED (exit {code}) after {elapsed}; the error is above. Finished stages are kept: "
                  "fix the cause and run the same command to resume.", file=out, flush=True)
            return code if code > 0 else 1
        # Trust the manifest, not the exit code: a stage is done only once _SUCCESS.json says so.
        if not ctx.is_done(stage):
            print(f"{tag}: FAILED: exited 0 but wrote no _SUCCESS.json with fingerprint {stage.fingerprint}",
                  file=out, flush=True)
            return 1
        print(f"{tag}: done in {elapsed}", file=out, flush=True)
    print(f"Run {run.name}: {total} stage(s) done in {_fmt_seconds(time.perf_counter() - t_run)}", file=out, flush=True)
    return 0


def _run_child(cmd: list[str]) -> int:
    # The child shares our terminal and process group, so Ctrl-C reaches it directly; we only
    # wait for it to finish its cleanup instead of dying first and orphaning it.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # stuck, or a second Ctrl-C
            proc.kill()
            proc.wait()
            return 130
