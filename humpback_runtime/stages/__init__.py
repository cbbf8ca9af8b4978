"""Stage entry point: one command per stage, the same locally and in a cluster pod.

    humpback stage prepare-seed --spec examples/tiny-cpu.yaml [--storage URI]

A stage reads its inputs from the artifact store, writes its outputs under
`<storage>/<namespace>/<run>/<stage>/`, and writes `_SUCCESS.json` last. A stage whose manifest
already carries its current fingerprint is skipped. Stages never call the Kubernetes API.

Before it writes anything a stage takes its lease (`<stage>/_LEASE.json`, :mod:`humpback_runtime.lease`):
one writer per stage, whoever runs it (two `humpback run`, an orphaned process, a retried pod).
Its inputs are checked against their producers' manifests first (sizes; checksums as they are
read); its own manifest lists every object it wrote (:mod:`humpback_runtime.manifest`).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from humpback_runtime import __version__, metrics, progress, tracking
from humpback_runtime.context import RunContext
from humpback_runtime.errors import (EXIT_FAILED, EXIT_INPUTS_MISSING, InputsDamaged, InputsMissing, LeaseLost,
                                     StageError)
from humpback_runtime.lease import LEASE, Lease
from humpback_runtime.manifest import ATTEMPT, TMP, describe_outputs, verify_outputs
from humpback_runtime.plan import Stage, fingerprint_parts
from humpback_runtime.storage import (SUCCESS, ShardMismatch, StorageError, Store, sweep_shard_scratch,
                                      write_success)

__all__ = ["ATTEMPT", "STAGES", "EXIT_FAILED", "EXIT_INPUTS_MISSING", "InputsDamaged", "InputsMissing",
           "StageError", "check_inputs", "run_stage"]

log = logging.getLogger(__name__)

# ATTEMPT, written when a stage starts: which fingerprint the partial outputs under the prefix
# belong to, so a resumable stage continues only its own work and never mixes in a changed spec's.

StageFn = Callable[[RunContext, Stage, str], dict[str, Any]]


@dataclass(frozen=True)
class StageImpl:
    """Where a stage family's code lives: `run(ctx, stage, prefix)` in `humpback_runtime.stages.<module>`.

    Model stages import torch, transformers or aiohttp; their module loads only when such a stage runs.
    """

    module: str
    function: str
    # Resumable stages keep what an interrupted attempt with the same fingerprint left under the
    # prefix (checkpoints, finished shards); the others start from an empty prefix.
    resumable: bool = False

    def run(self, ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
        """The manifest fields of the finished stage, "outputs" among them."""
        module = importlib.import_module(f"humpback_runtime.stages.{self.module}")
        return getattr(module, self.function)(ctx, stage, prefix)


# Stage families by implementation. Model stages resume: their partial work (checkpoints,
# scored shards) survives a crash and is continued by the next attempt with the same fingerprint.
STAGES: dict[str, StageImpl] = {
    "prepare-seed": StageImpl("prepare", "run_prepare_seed"),
    "prepare-corpus": StageImpl("prepare", "run_prepare_corpus"),
    "train": StageImpl("train", "run_train", resumable=True),
    "augment": StageImpl("augment", "run_augment", resumable=True),
    "rewrite": StageImpl("rewrite", "run_rewrite", resumable=True),
    "curate": StageImpl("curate", "run_curate", resumable=True),
    "evaluate": StageImpl("evaluate", "run_evaluate", resumable=True),
    "report": StageImpl("report", "run_report"),
    "publish": StageImpl("publish", "run_publish"),
}


def _claim_prefix(store: Store, prefix: str, fingerprint: str, resumable: bool) -> bool:
    """Make the prefix this attempt's; True when a resumable stage continues earlier work.

    Called under the stage's lease, which it keeps."""
    # The old manifest goes first, so a crash from here on never leaves a stale stage looking done.
    store.delete(f"{prefix}/{SUCCESS}")
    # What a killed attempt left half-written (temporary files, multipart uploads) is never resumed.
    store.clear_scratch(prefix)
    try:
        previous = store.read_json(f"{prefix}/{ATTEMPT}")
    except StorageError:  # absent or unreadable: nothing to continue
        previous = None
    if resumable and isinstance(previous, dict) and previous.get("fingerprint") == fingerprint:
        return True
    store.delete_prefix(prefix + "/", keep=[f"{prefix}/{LEASE}"])
    store.write_json(f"{prefix}/{ATTEMPT}", {"fingerprint": fingerprint,
                                            "started": datetime.now(timezone.utc).isoformat()})
    return False


def check_inputs(ctx: RunContext, stage: Stage) -> None:
    """The stages `stage` reads have finished with the current spec, and their objects are all
    there with the sizes their manifests list (one listing each; checksums come as they are read)."""
    missing = [d for d in stage.deps if not ctx.is_done(ctx.plan[d])]
    if missing:
        raise InputsMissing(
            f"stage {stage.name} needs {', '.join(missing)} to have finished with the current spec "
            f"(no _SUCCESS.json with the current fingerprint under {ctx.store.url(ctx.prefix(missing[0]))}); "
            f"run them first, e.g. `humpback run RUN.yaml --until {stage.name}`"
        )
    for dep in stage.deps:
        manifest = ctx.manifest(dep) or {}
        problems = verify_outputs(ctx.store, ctx.prefix(dep), manifest).problems
        if problems:
            raise _damaged(ctx, stage.name, dep, problems)


def _damaged(ctx: RunContext, stage: str, dep: str, problems: list[str]) -> InputsDamaged:
    """Withdraw `dep`'s manifest, which vouches for objects that are not what it says, so that any
    executor runs `dep` again instead of failing on it at every retry."""
    ctx.store.delete(f"{ctx.prefix(dep)}/{SUCCESS}")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return InputsDamaged(f"stage {stage} cannot read the outputs of {dep}: {problems[0]}{more}. The manifest "
                         f"of {dep} was withdrawn: run {dep} again (`humpback run` does), then {stage}")


def run_stage(ctx: RunContext, name: str, *, force: bool = False, wait: bool = False) -> dict[str, Any] | None:
    """Run one stage to completion; returns its manifest, or None when it was already done.

    `wait`: while another process holds the stage's lease, wait for it instead of raising LeaseHeld."""
    stage = ctx.plan[name]
    if not force and ctx.is_done(stage):
        log.info("Skipped stage %s of run %s: already done (fingerprint %s)", name, ctx.run.name, stage.fingerprint)
        return None
    t_verify = time.perf_counter()
    check_inputs(ctx, stage)
    verify_seconds = time.perf_counter() - t_verify
    impl = STAGES[stage.family]

    prefix = ctx.prefix(name)
    store = ctx.store
    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun every process runs the stage; rank 0 alone owns the prefix, lease, progress
        # file and manifest.
        impl.run(ctx, stage, prefix)
        return None
    t_lease = time.perf_counter()
    lease = Lease(store, prefix, stage=name)
    lease.acquire(wait=wait)
    lease_seconds = time.perf_counter() - t_lease
    try:
        if not force and ctx.is_done(stage):  # finished by the writer we waited for
            log.info("Skipped stage %s of run %s: finished by the lease's previous holder", name, ctx.run.name)
            return None
        store.write_guard, store.scratch = lease.check, f"{prefix}/{TMP}"
        sweep_shard_scratch()  # shard files in TMPDIR of processes of this host that were killed
        return _run_claimed(ctx, stage, impl, prefix, lease, force,
                            timings={"verify_inputs_seconds": verify_seconds, "lease_seconds": lease_seconds})
    except KeyboardInterrupt:
        if lease.lost:  # the heartbeat stopped us: say why rather than "interrupted"
            raise LeaseLost(f"stage {name} lost its lease {store.url(lease.key)} and stopped writing") from None
        raise
    except ShardMismatch as e:  # an input shard read back other than its producer's manifest says
        dep = next((d for d in stage.deps if e.key.startswith(ctx.prefix(d) + "/")), None)
        if dep is None:
            raise
        raise _damaged(ctx, name, dep, [str(e)]) from None
    finally:
        store.write_guard = store.scratch = None
        lease.release()


def _run_claimed(ctx: RunContext, stage: Stage, impl: StageImpl, prefix: str, lease: Lease, force: bool,
                 timings: dict[str, float]) -> dict[str, Any]:
    name, store = stage.name, ctx.store
    # Forced: start afresh, so a forced inference stage asks its server again instead of resuming.
    resumed = _claim_prefix(store, prefix, stage.fingerprint, impl.resumable and not force)
    if lease.took_over:
        log.warning("Stage %s: took over %s; %s", name, lease.took_over,
                    "resuming its finished work" if resumed else "starting over")
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    log.info("%s stage %s of run %s (fingerprint %s) writing to %s", "Resumed" if resumed else "Started",
             name, ctx.run.name, stage.fingerprint, store.url(prefix))
    metrics.serve_from_env()
    with tracking.stage_tracking(ctx.run, stage, store, prefix) as trackers:
        with progress.stage_progress(store, prefix, name):
            result = impl.run(ctx, stage, prefix)
        seconds = time.perf_counter() - t0
        # The stage's numbers go to its trackers (and event files into the prefix) before the manifest.
        tracked = trackers.finish(result, seconds)
    store.clear_scratch(prefix)  # a finished stage leaves no `_tmp/`
    t_manifest = time.perf_counter()
    objects = describe_outputs(store, prefix)
    timings["manifest_seconds"] = time.perf_counter() - t_manifest
    manifest = {
        "stage": name,
        "fingerprint": stage.fingerprint,
        # What the fingerprint was made of, so `humpback plan` can say why a stage went stale.
        "fingerprintParts": fingerprint_parts(stage),
        "run": ctx.run.name,
        "namespace": ctx.run.namespace,
        "humpbackVersion": __version__,
        "resumed": resumed,
        **result,
        **({"inputIdentities": {s: ctx.input_identities.get(s) for s in stage.sources}} if stage.sources else {}),
        **({"tracking": tracked} if tracked else {}),
        "objects": objects,
        "timings": {
            "started": started.isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "seconds": round(seconds, 3),
            **{k: round(v, 4) for k, v in timings.items()},
        },
    }
    write_success(store, prefix, manifest)
    count = result.get("outputs", {}).get("count")
    log.info("Finished stage %s of run %s: %s records in %.1f s", name, ctx.run.name, count, seconds)
    return manifest
