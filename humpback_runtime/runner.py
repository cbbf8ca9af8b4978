"""Local executor: runs the plan's stages in dependency order on this machine.

    humpback run examples/tiny-cpu.yaml [--storage URI] [--until STAGE] [--wait]

Each stage runs as a subprocess of `humpback stage STAGE --spec RUN.yaml`, the very command the
operator puts into pods, so the local run exercises the cluster's entry point. Finished stages
(manifest with the current fingerprint) are skipped: after Ctrl-C, a crash or a spec edit, the
same command picks up where it stopped. A finished stage whose objects no longer match its
manifest (a shard deleted or cut short) runs again instead.

Signals: the stage runs in its own process group. SIGTERM, SIGINT and SIGHUP sent to the runner
are forwarded to that group; after `grace_s` (default 30 s) the group is killed. If the runner
itself is killed (SIGKILL), the stage gets SIGTERM from the kernel (`humpback_runtime.processes`).
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
from humpback_runtime.errors import EXIT_LEASE_HELD
from humpback_runtime.manifest import verify_outputs
from humpback_runtime.processes import PARENT_ENV
from humpback_runtime.spec import BacktranslationRun
from humpback_runtime.storage import SUCCESS

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 30.0  # how long a stage may take to stop after a forwarded signal


def stage_command(stage: str, spec_path: str | Path, storage_uri: str | None = None, *,
                  wait: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "humpback_runtime", "stage", stage, "--spec", str(spec_path)]
    if storage_uri:
        cmd += ["--storage", storage_uri]
    if wait:
        cmd.append("--wait")
    return cmd


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_local(run: BacktranslationRun, spec_path: str | Path, *, storage_uri: str | None = None,
              until: str | None = None, wait: bool = False, grace_s: float = GRACE_S,
              out: TextIO = sys.stdout) -> int:
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
            problems = verify_outputs(ctx.store, ctx.prefix(name), ctx.manifest(name) or {}).problems
            if not problems:
                print(f"{tag}: done (fingerprint {stage.fingerprint}), skipped", file=out, flush=True)
                continue
            # The manifest vouches for objects that are gone or changed: withdraw it, run again.
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            print(f"{tag}: outputs do not match the manifest: {problems[0]}{more}; running it again",
                  file=out, flush=True)
            ctx.store.delete(f"{ctx.prefix(name)}/{SUCCESS}")
        print(f"{tag}: running (fingerprint {stage.fingerprint})", file=out, flush=True)
        t0 = time.perf_counter()
        code, signum = _run_child(stage_command(name, spec_path, storage_uri, wait=wait), grace_s)
        elapsed = _fmt_seconds(time.perf_counter() - t0)
        if signum is not None:
            print(f"{tag}: interrupted ({signal.Signals(signum).name}) after {elapsed}; the stage stopped, finished "
                  "stages are kept: run the same command to resume", file=out, flush=True)
            return 128 + signum
        if code == -signal.SIGINT or code == 130:
            print(f"{tag}: interrupted after {elapsed}; finished stages are kept, run the same command to resume",
                  file=out, flush=True)
            return 130
        if code == EXIT_LEASE_HELD:
            print(f"{tag}: another process is writing this stage (its holder is named above); run again once it "
                  "is done, or with --wait", file=out, flush=True)
            return code
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


def _run_child(cmd: list[str], grace_s: float) -> tuple[int, int | None]:
    """Run a stage in its own process group; (exit code, the signal we forwarded or None).

    SIGTERM, SIGINT and SIGHUP received meanwhile go to the stage's whole group (a terminal's
    Ctrl-C reaches only our group now); after `grace_s` the group is killed. The stage learns of
    our death through PARENT_ENV (it asks the kernel for SIGTERM when we die)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    received: list[tuple[int, float]] = []

    def forward(signum: int, frame) -> None:
        if not received:
            received.append((signum, time.monotonic()))
        _signal_group(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > grace_s:
                    _signal_group(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:  # whatever the stage started (torchrun workers, a server) goes with it
        _signal_group(proc.pid, signal.SIGKILL)
    return code, received[0][0] if received else None


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
