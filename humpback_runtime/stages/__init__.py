"""Stage entry point: one command per stage, the same locally and in a cluster pod.

    humpback stage prepare-seed --spec examples/tiny-cpu.yaml [--storage URI]

A stage reads its inputs from the artifact store, writes its outputs under
`<storage>/<namespace>/<run>/<stage>/`, and writes `_SUCCESS.json` last. A stage whose manifest
already carries its current fingerprint is skipped. Stages never call the Kubernetes API.
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

from humpback_runtime import __version__, metrics, progress
from humpback_runtime.context import RunContext
from humpback_runtime.errors import EXIT_FAILED, EXIT_INPUTS_MISSING, InputsMissing, StageError
from humpback_runtime.plan import Stage
from humpback_runtime.storage import SUCCESS, StorageError, Store, write_success

__all__ = ["ATTEMPT", "STAGES", "EXIT_FAILED", "EXIT_INPUTS_MISSING", "InputsMissing", "StageError",
           "check_inputs", "run_stage"]

log = logging.getLogger(__name__)

# Written when a stage starts: which fingerprint the partial outputs under the prefix belong to,
# so a resumable stage continues only its own work and never mixes in a changed spec's.
ATTEMPT = "_ATTEMPT.json"

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
}


def _claim_prefix(store: Store, prefix: str, fingerprint: str, resumable: bool) -> bool:
    """Make the prefix this attempt's; True when a resumable stage continues earlier work."""
    # The old manifest goes first, so a crash from here on never leaves a stale stage looking done.
    store.delete(f"{prefix}/{SUCCESS}")
    try:
        previous = store.read_json(f"{prefix}/{ATTEMPT}")
    except StorageError:  # absent or unreadable: nothing to continue
        previous = None
    if resumable and isinstance(previous, dict) and previous.get("fingerprint") == fingerprint:
        return True
    store.delete_prefix(prefix + "/")
    store.write_json(f"{prefix}/{ATTEMPT}", {"fingerprint": fingerprint,
                                            "started": datetime.now(timezone.utc).isoformat()})
    return False


def check_inputs(ctx: RunContext, stage: Stage) -> None:
    missing = [d for d in stage.deps if not ctx.is_done(ctx.plan[d])]
    if missing:
        raise InputsMissing(
            f"stage {stage.name} needs {', '.join(missing)} to have finished with the current spec "
            f"(no _SUCCESS.json with the current fingerprint under {ctx.store.url(ctx.prefix(missing[0]))}); "
            f"run them first, e.g. `humpback run RUN.yaml --until {stage.name}`"
        )


def run_stage(ctx: RunContext, name: str, *, force: bool = False) -> dict[str, Any] | None:
    """Run one stage to completion; returns its manifest, or None when it was already done."""
    stage = ctx.plan[name]
    if not force and ctx.is_done(stage):
        log.info("Skipped stage %s of run %s: already done (fingerprint %s)", name, ctx.run.name, stage.fingerprint)
        return None
    check_inputs(ctx, stage)
    impl = STAGES[stage.family]

    prefix = ctx.prefix(name)
    store = ctx.store
    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun every process runs the stage; rank 0 alone owns the prefix, the progress
        # file and the manifest.
        impl.run(ctx, stage, prefix)
        return None
    resumed = _claim_prefix(store, prefix, stage.fingerprint, impl.resumable)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    log.info("%s stage %s of run %s (fingerprint %s) writing to %s", "Resumed" if resumed else "Started",
             name, ctx.run.name, stage.fingerprint, store.url(prefix))
    metrics.serve_from_env()
    with progress.stage_progress(store, prefix, name):
        result = impl.run(ctx, stage, prefix)
    seconds = time.perf_counter() - t0
    manifest = {
        "stage": name,
        "fingerprint": stage.fingerprint,
        "run": ctx.run.name,
        "namespace": ctx.run.namespace,
        "humpbackVersion": __version__,
        "resumed": resumed,
        **result,
        "timings": {
            "started": started.isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "seconds": round(seconds, 3),
        },
    }
    write_success(store, prefix, manifest)
    count = result.get("outputs", {}).get("count")
    log.info("Finished stage %s of run %s: %s records in %.1f s", name, ctx.run.name, count, seconds)
    return manifest
