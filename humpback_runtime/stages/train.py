"""train-myx, train-m0 and train-mk: fine-tune the base model on the stage's examples.

    humpback stage train-m0 --spec RUN.yaml
    torchrun --nproc-per-node 8 -m humpback_runtime stage train-m0 --spec RUN.yaml   # in a PyTorchJob

The examples come from prompts.py (the only source of templates); the training itself is
:func:`humpback_runtime.training.train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError, TrainingError
from humpback_runtime.plan import Stage


def curated_pairs(ctx: RunContext, stage: Stage) -> tuple[list[dict], dict[str, Any]]:
    """The augmented training pairs of train-mk, and counts.

    curate-k's selection; with `rewrite.order: after` each selected pair's response is replaced by
    its rewrite, and a selected pair whose rewrite was dropped (empty, cut off by maxTokens) is left
    out and counted.
    """
    from humpback_runtime.plan import rewrite_stage
    from humpback_runtime.stages.augment import candidate_records

    from humpback_runtime.stages.curate import selected_pairs

    k = stage.iteration
    # The selection of the current settings, made from the stored scores if need be (no requests).
    selected, chosen = selected_pairs(ctx, f"curate-{k}", stage.settings["selection"])
    rw = ctx.run.spec.curation.rewrite
    if not rw.enabled or rw.resolved_order == "before":
        return selected, {"curated": len(selected), "selection": chosen["id"]}
    rewrites = {r["id"]: r for r in candidate_records(ctx, rewrite_stage(ctx.run, k))}
    pairs = [{**p, "response": rewrites[p["id"]]["response"]} for p in selected if p["id"] in rewrites]
    return pairs, {"curated": len(pairs), "curated_rewrite_dropped": len(selected) - len(pairs),
                   "selection": chosen["id"]}


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
    curated, counts = curated_pairs(ctx, stage)
    examples += [prompts.forward_example(p["instruction"], p["response"], prompts.augmented_system(tags))
                 for p in curated]
    return examples, {"seed": len(seed), **counts}


def lineage(ctx: RunContext, stage: Stage, counts: dict[str, Any]) -> dict[str, Any]:
    """The model card's lineage of a training stage (also part of its resume key): run, stage,
    role, base model, fingerprint, data counts and the fingerprints of its inputs."""
    return {"run": ctx.run_prefix, "stage": stage.name, "role": stage.role,
            "baseModel": ctx.run.spec.base_model, "fingerprint": stage.fingerprint, "data": counts,
            "inputs": {d: ctx.plan[d].fingerprint for d in stage.deps}}


def run_train(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime import tracking
    from humpback_runtime.training import TrainRequest, train

    from humpback_runtime.spec import looks_local

    spec = ctx.run.spec
    base = ctx.run.base_model_ref()
    if looks_local(spec.base_model) and not Path(base).is_dir():
        raise StageError(f"spec.baseModel: {spec.base_model} is not a directory (looked in {base}; a local model "
                         "directory, hub id or s3:// URI is expected; the demo's is built by "
                         "`humpback tiny-model .cache/tiny-llama`)")
    examples, counts = training_examples(ctx, stage)
    card = lineage(ctx, stage, counts)
    try:
        metrics = train(TrainRequest(base_model=base, examples=examples, settings=getattr(spec.training, stage.role),
                                     store=ctx.store, prefix=prefix, card=card, s3_endpoint=spec.storage.s3.endpoint,
                                     s3_region=spec.storage.s3.region,
                                     callbacks=tracking.trainer_callbacks()))
    except TrainingError as e:  # a setting or the data is at fault: the message says which
        raise StageError(f"{stage.name}: {e}") from e
    from humpback_runtime.stages.guardrails import yield_record

    n_in = metrics.get("examples_in", len(examples))
    n_dropped = metrics.get("examples_dropped", 0)
    warnings = []
    if metrics.get("examples_prompt_cut"):
        warnings.append(f"{metrics['examples_prompt_cut']} prompts cut to maxSeqLength")
    if metrics.get("examples_truncated"):
        warnings.append(f"{metrics['examples_truncated']} responses cut to maxSeqLength")
    if n_dropped:
        warnings.append(f"{n_dropped} dropped: the kept part alone fills maxSeqLength")
    return {"outputs": {"model": f"{prefix}/model", "count": metrics.get("examples", len(examples))},
            "counts": counts, "metrics": metrics, "yield": yield_record(n_in, n_in - n_dropped, warnings)}
