"""Local executor: runs the plan's stages in dependency order on this machine.

    humpback run examples/tiny-cpu.yaml [--storage URI] [--until STAGE] [--force STAGE]... [--from STAGE]

Each stage runs as a subprocess of `humpback stage STAGE --spec RUN.yaml`, the very command the
operator puts into pods, so the local run exercises the cluster's entry point. Finished stages
(manifest with the current fingerprint: settings, data files and upstream stages) are skipped:
after Ctrl-C, a crash, a spec edit or a data edit, the same command picks up where it stopped and
re-runs exactly what changed. `--until` runs only the stages that stage needs; `--force` re-runs
stages that are done (and, in this run, every stage that reads their outputs). The run ends with a
table of every stage's records in and out and its warnings.
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


def stage_command(stage: str, spec_path: str | Path, storage_uri: str | None = None, *,
                  force: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "humpback_runtime", "stage", stage, "--spec", str(spec_path)]
    if storage_uri:
        cmd += ["--storage", storage_uri]
    if force:
        cmd.append("--force")
    return cmd


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_local(run: BacktranslationRun, spec_path: str | Path, *, storage_uri: str | None = None,
              until: str | list[str] | None = None, force: set[str] | frozenset[str] = frozenset(),
              out: TextIO = sys.stdout) -> int:
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
            print(f"{tag}: done (fingerprint {stage.fingerprint}), skipped", file=out, flush=True)
            outcome[name] = "skipped"
            continue
        why = "forced" if name in force else f"forced: {', '.join(rerun_inputs)} ran again" if rerun_inputs else ""
        print(f"{tag}: running (fingerprint {stage.fingerprint}{'; ' + why if why else ''})", file=out, flush=True)
        t0 = time.perf_counter()
        code = _run_child(stage_command(name, spec_path, storage_uri, force=forced))
        elapsed = _fmt_seconds(time.perf_counter() - t0)
        if code == -signal.SIGINT or code == 130:
            print(f"{tag}: interrupted after {elapsed}; finished stages are kept, run the same command to resume",
                  file=out, flush=True)
            outcome[name], code = "interrupted", 130
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
