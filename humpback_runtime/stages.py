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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime, timezone
from itertools import islice
from typing import Any

from humpback_runtime import __version__
from humpback_runtime.context import RunContext
from humpback_runtime.plan import Stage
from humpback_runtime.sources import BadRecords, iter_source_records
from humpback_runtime.storage import SUCCESS, ShardWriter, StorageError, Store, write_success

log = logging.getLogger(__name__)

# Written when a stage starts: which fingerprint the partial outputs under the prefix belong to,
# so a resumable stage continues only its own work and never mixes in a changed spec's.
ATTEMPT = "_ATTEMPT.json"

# Exit codes the runners tell apart: a stage that failed may succeed on retry; one whose inputs
# are missing will not.
EXIT_FAILED = 1
EXIT_INPUTS_MISSING = 4


class StageError(RuntimeError):
    exit_code = EXIT_FAILED


class InputsMissing(StageError):
    exit_code = EXIT_INPUTS_MISSING


def _progress(records: Iterable[Any], desc: str) -> Iterator[Any]:
    from tqdm import tqdm

    # Bars go to stderr and switch themselves off when it is not a terminal (pods, CI logs).
    yield from tqdm(records, desc=desc, unit=" rec", mininterval=1.0, disable=None)


def _input_records(ctx: RunContext, source: str, split: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    s3 = ctx.run.spec.storage.s3
    return iter_source_records(source, bad=bad, split=split, endpoint_url=s3.endpoint, region=s3.region)


def _write_records(store: Store, prefix: str, records: Iterable[dict]) -> dict[str, Any]:
    with ShardWriter(store, prefix) as writer:
        for record in records:
            writer.write(record)
    return {"records": writer.shards, "count": writer.count, "format": "jsonl"}


def run_prepare_seed(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.seed import SeedCounts, prepare_seed

    spec = ctx.run.spec.seed
    bad = BadRecords(spec.on_bad_record, label="seed")
    counts = SeedCounts()
    records = _input_records(ctx, spec.source, spec.split, bad)
    outputs = _write_records(ctx.store, prefix, prepare_seed(_progress(records, stage.name), spec, bad, counts))
    if counts.pairs == 0:
        raise StageError(
            f"prepare-seed produced no pairs from {spec.source} (format {spec.format}): "
            f"{counts.as_dict()}, bad records: {bad.count}. Check spec.seed.format and spec.seed.lang."
        )
    return {"outputs": outputs, "counts": counts.as_dict(), "badRecords": bad.summary()}


def run_prepare_corpus(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.corpus import CorpusCounts, filter_corpus

    spec = ctx.run.spec.corpus
    bad = BadRecords(spec.on_bad_record, label="corpus")
    counts = CorpusCounts()
    records = _input_records(ctx, spec.source, spec.split, bad)
    if spec.max_documents is not None:
        records = islice(records, spec.max_documents)
    outputs = _write_records(ctx.store, prefix, filter_corpus(_progress(records, stage.name), spec, counts))
    if counts.kept == 0:
        raise StageError(
            f"prepare-corpus kept no segments from {spec.source}: {counts.as_dict()}, bad records: "
            f"{bad.count}. Check spec.corpus.textField and the minChars/maxChars window."
        )
    return {"outputs": outputs, "counts": counts.as_dict(), "badRecords": bad.summary()}


StageFn = Callable[[RunContext, Stage, str], dict[str, Any]]


@dataclass(frozen=True)
class StageImpl:
    run: StageFn  # (context, stage, prefix) -> manifest fields, "outputs" among them
    # Resumable stages keep what an interrupted attempt with the same fingerprint left under the
    # prefix (checkpoints, finished shards); the others start from an empty prefix.
    resumable: bool = False


def _lazy(module: str, function: str) -> StageFn:
    # Model stages import torch, transformers or aiohttp; load them only when such a stage runs.
    def run(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
        return getattr(importlib.import_module(f"humpback_runtime.{module}"), function)(ctx, stage, prefix)

    return run


def training_examples(ctx: RunContext, stage: Stage) -> tuple[list, dict[str, int]]:
    """The examples of a training stage, every template from prompts.py, and their counts."""
    from humpback_runtime import prompts

    tags = ctx.run.spec.system_prompts
    seed = list(ctx.records("prepare-seed"))
    if stage.role == "backward":  # Myx learns p(instruction | response) on reversed seed pairs
        return [prompts.backward_example(p["instruction"], p["response"]) for p in seed], {"seed": len(seed)}
    examples = [prompts.forward_example(p["instruction"], p["response"], prompts.seed_system(tags)) for p in seed]
    if stage.role == "seed":
        return examples, {"seed": len(seed)}
    curated = list(ctx.records(f"curate-{stage.iteration}"))
    examples += [prompts.forward_example(p["instruction"], p["response"], prompts.augmented_system(tags))
                 for p in curated]
    return examples, {"seed": len(seed), "curated": len(curated)}


def run_train(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.training import TrainRequest, train

    spec = ctx.run.spec
    base = spec.base_model
    if base.startswith((".", "/", "file://")) and not Path(base.removeprefix("file://")).is_dir():
        raise StageError(f"spec.baseModel: {base} is not a directory (a local model directory, hub id or "
                         "s3:// URI is expected; the demo's is built by `humpback tiny-model .cache/tiny-llama`)")
    examples, counts = training_examples(ctx, stage)
    card = {"run": f"{ctx.run.namespace}/{ctx.run.name}", "stage": stage.name, "role": stage.role,
            "baseModel": spec.base_model, "fingerprint": stage.fingerprint, "data": counts,
            "inputs": {d: ctx.plan[d].fingerprint for d in stage.deps}}
    metrics = train(TrainRequest(base_model=spec.base_model, examples=examples, settings=getattr(spec.training, stage.role),
                                 store=ctx.store, prefix=prefix, card=card, s3_endpoint=spec.storage.s3.endpoint,
                                 s3_region=spec.storage.s3.region))
    return {"outputs": {"model": f"{prefix}/model", "count": metrics.get("examples", len(examples))},
            "counts": counts, "metrics": metrics}


def run_evaluate(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime import prompts
    from humpback_runtime.engines import GenerationResult, Sampling
    from humpback_runtime.evaluation import evaluate
    from humpback_runtime.models import engine_for
    from humpback_runtime.storage import iter_shard_records, list_shards

    spec = ctx.run.spec
    system = prompts.inference_system(spec.system_prompts)  # the forward template, as in training

    def generate_answers(model_stage: str, records: list[dict], out_prefix: str) -> dict[str, str]:
        def handle(record: dict, result: GenerationResult) -> dict:
            return {"id": record["id"], "answer": result.text.strip(), "finish_reason": result.finish_reason}

        engine_for(ctx, model_stage).generate(
            records, lambda r: prompts.forward_prompt(r["instruction"], system),
            Sampling.from_spec(spec.evaluation.sampling), store=ctx.store, prefix=out_prefix, handle=handle,
            checkpoint_every=spec.inference.checkpoint_every, total=len(records), desc=f"{stage.name} {model_stage}",
        )
        return {r["id"]: r["answer"] for r in iter_shard_records(ctx.store, list_shards(ctx.store, out_prefix))}

    s3 = spec.storage.s3
    return evaluate(spec.evaluation, list(stage.deps), generate_answers, store=ctx.store, prefix=prefix,
                    checkpoint_every=spec.inference.checkpoint_every, endpoint_url=s3.endpoint, region=s3.region)


def run_report(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.report import build_report, collect_report_inputs

    inputs = collect_report_inputs(ctx.store, f"{ctx.run.namespace}/{ctx.run.name}", ctx.plan)
    key = f"{prefix}/index.html"
    ctx.store.write_text(key, build_report(**inputs))
    return {"outputs": {"report": key, "url": ctx.store.url(key), "count": 1}}


# Stage families by implementation. Model stages resume: their partial work (checkpoints,
# scored shards) survives a crash and is continued by the next attempt with the same fingerprint.
STAGES: dict[str, StageImpl] = {
    "prepare-seed": StageImpl(run_prepare_seed),
    "prepare-corpus": StageImpl(run_prepare_corpus),
    "train": StageImpl(run_train, resumable=True),
    "augment": StageImpl(_lazy("augmentation", "run_augment"), resumable=True),
    "rewrite": StageImpl(_lazy("curation", "run_rewrite"), resumable=True),
    "curate": StageImpl(_lazy("curation", "run_curate"), resumable=True),
    "evaluate": StageImpl(run_evaluate, resumable=True),
    "report": StageImpl(run_report),
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
        # Under torchrun every process runs the stage; rank 0 alone owns the prefix and manifest.
        impl.run(ctx, stage, prefix)
        return None
    resumed = _claim_prefix(store, prefix, stage.fingerprint, impl.resumable)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    log.info("%s stage %s of run %s (fingerprint %s) writing to %s", "Resumed" if resumed else "Started",
             name, ctx.run.name, stage.fingerprint, store.url(prefix))
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
