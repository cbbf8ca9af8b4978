"""Local executor: runs the plan's stages in dependency order on this machine.

    humpback run examples/tiny-cpu.yaml [--storage URI] [--until STAGE] [--force STAGE]... [--from STAGE] [--wait]

Each stage runs as a subprocess of `humpback stage STAGE --spec RUN.yaml`, the very command the
operator puts into pods, so the local run exercises the cluster's entry point. Finished stages
(manifest with the current fingerprint: settings, data files and upstream stages) are skipped:
after Ctrl-C, a crash, a spec edit or a data edit, the same command picks up where it stopped and
re-runs exactly what changed. A finished stage whose objects no longer match its manifest (a shard
deleted or cut short) runs again instead. `--until` runs only the stages that stage needs; `--force`
re-runs stages that are done (and, in this run, every stage that reads their outputs). The run ends
with a table of every stage's records in and out and its warnings.

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
                  force: bool = False, wait: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "humpback_runtime", "stage", stage, "--spec", str(spec_path)]
    if storage_uri:
        cmd += ["--storage", storage_uri]
    if force:
        cmd.append("--force")
    if wait:
        cmd.append("--wait")
    return cmd


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_local(run: BacktranslationRun, spec_path: str | Path, *, storage_uri: str | None = None,
              until: str | list[str] | None = None, force: set[str] | frozenset[str] = frozenset(),
              wait: bool = False, grace_s: float = GRACE_S, out: TextIO = sys.stdout) -> int:
    """Returns the process exit code: 0 when every selected stage is done.

    `force`: stages to re-run even when done (the CLI expands --force/--from into them).
    """
    ctx = RunContext.create(run, storage_uri)
    plan = ctx.plan
    if run.spec.suspend:
        print(f"Run {run.name} is suspended (spec.suspend: true): nothing started.", file=out)
        return 0
    # --until: those stages and the stages they need, not every stage the plan lists before them.
    targets = [until] if isinstance(until, str) else list(until or [])
    wanted = {name for target in targets for name in plan.upstream(target)}
    names = [name for name in plan.names() if name in wanted] if targets else plan.names()
    total = len(names)
    print(f"Run {run.namespace}/{run.name}: {total} stage(s), artifacts in {ctx.store.url(ctx.run_prefix)}",
          file=out, flush=True)
    t_run = time.perf_counter()
    outcome: dict[str, str] = {}
    forced_here: set[str] = set()
    code = 0
    for i, name in enumerate(names, 1):
        stage = plan[name]
        tag = f"[{i}/{total}] {name}"
        # A forced stage's outputs are new though its fingerprint is not: what reads them runs again too.
        rerun_inputs = [d for d in stage.deps if d in forced_here]
        forced = name in force or bool(rerun_inputs)
        if not forced and ctx.is_done(stage):
            problems = verify_outputs(ctx.store, ctx.prefix(name), ctx.manifest(name) or {}).problems
            if not problems:
                print(f"{tag}: done (fingerprint {stage.fingerprint}), skipped", file=out, flush=True)
                outcome[name] = "skipped"
                continue
            # The manifest vouches for objects that are gone or changed: withdraw it, run again.
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            print(f"{tag}: outputs do not match the manifest: {problems[0]}{more}; running it again",
                  file=out, flush=True)
            ctx.store.delete(f"{ctx.prefix(name)}/{SUCCESS}")
        why = "forced" if name in force else f"forced: {', '.join(rerun_inputs)} ran again" if rerun_inputs else ""
        print(f"{tag}: running (fingerprint {stage.fingerprint}{'; ' + why if why else ''})", file=out, flush=True)
        t0 = time.perf_counter()
        code, signum = _run_child(stage_command(name, spec_path, storage_uri, force=forced, wait=wait), grace_s)
        elapsed = _fmt_seconds(time.perf_counter() - t0)
        if signum is not None:
            print(f"{tag}: interrupted ({signal.Signals(signum).name}) after {elapsed}; the stage stopped, finished "
                  "stages are kept: run the same command to resume", file=out, flush=True)
            outcome[name], code = "interrupted", 128 + signum
            break
        if code == -signal.SIGINT or code == 130:
            print(f"{tag}: interrupted after {elapsed}; finished stages are kept, run the same command to resume",
                  file=out, flush=True)
            outcome[name], code = "interrupted", 130
            break
        if code == EXIT_LEASE_HELD:
            print(f"{tag}: another process is writing this stage (its holder is named above); run again once it "
                  "is done, or with --wait", file=out, flush=True)
            outcome[name] = "lease held"
            break
        if code != 0:
            print(f"{tag}: FAILED (exit {code}) after {elapsed}; the error is above. Finished stages are kept: "
                  "fix the cause and run the same command to resume.", file=out, flush=True)
            outcome[name], code = "FAILED", code if code > 0 else 1
            break
        # Trust the manifest, not the exit code: a stage is done only once _SUCCESS.json says so.
        if not ctx.is_done(stage):
            print(f"{tag}: FAILED: exited 0 but wrote no _SUCCESS.json with fingerprint {stage.fingerprint}",
                  file=out, flush=True)
            outcome[name], code = "FAILED", 1
            break
        outcome[name] = "ran"
        if forced:
            forced_here.add(name)
        print(f"{tag}: done in {elapsed}", file=out, flush=True)
    print_summary(ctx, names, outcome, out)
    if code == 0:
        print(f"Run {run.name}: {total} stage(s) done in {_fmt_seconds(time.perf_counter() - t_run)}",
              file=out, flush=True)
    return code


def print_summary(ctx: RunContext, names: list[str], outcome: dict[str, str], out: TextIO) -> None:
    """One row per stage: what it did in this run, its records in and out, and its warnings."""
    rows = [("STAGE", "THIS RUN", "IN", "OUT", "KEPT", "WARNINGS")]
    for name in names:
        manifest = ctx.manifest(name) if outcome.get(name) in ("ran", "skipped") else None
        kept = (manifest or {}).get("yield") or {}
        n_in, n_out = kept.get("in"), kept.get("out")
        share = f"{n_out / n_in:.0%}" if isinstance(n_in, int) and isinstance(n_out, int) and n_in else "-"
        warnings = "; ".join(kept.get("warnings") or []) or "-"
        rows.append((name, outcome.get(name, "not run"), "-" if n_in is None else str(n_in),
                     "-" if n_out is None else str(n_out), share, warnings))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    print("\nSummary:", file=out)
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1], file=out)
    out.flush()


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
