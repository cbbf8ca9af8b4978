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
from humpback_runtime.errors import StageError
from humpback_runtime.plan import Stage


def model_system(ctx: RunContext, train_stage: str) -> str:
    """The system text a stage puts before its task when it prompts the model of `train_stage`.

    The text the model was trained with (prompts.inference_system): the seed tag, which M0 saw on
    every example and Mk on every seed example. Myx (backward) is never prompted with a system text.
    """
    from humpback_runtime import prompts

    role = ctx.plan[train_stage].role
    if role not in ("seed", "forward"):
        raise ValueError(f"{train_stage} (role {role}) is not a forward model: it takes no system text")
    return prompts.inference_system(ctx.run.spec.system_prompts)


def curated_pairs(ctx: RunContext, k: int) -> tuple[list[dict], dict[str, int]]:
    """The augmented training pairs of train-mk, and counts.

    curate-k's selection; with `rewrite.order: after` each selected pair's response is replaced by
    its rewrite, and a selected pair whose rewrite was dropped (empty, cut off by maxTokens) is left
    out and counted.
    """
    from humpback_runtime.plan import rewrite_stage
    from humpback_runtime.stages.augment import candidate_records

    selected = list(ctx.records(f"curate-{k}"))
    rw = ctx.run.spec.curation.rewrite
    if not rw.enabled or rw.resolved_order == "before":
        return selected, {"curated": len(selected)}
    rewrites = {r["id"]: r for r in candidate_records(ctx, rewrite_stage(ctx.run, k))}
    pairs = [{**p, "response": rewrites[p["id"]]["response"]} for p in selected if p["id"] in rewrites]
    return pairs, {"curated": len(pairs), "curated_rewrite_dropped": len(selected) - len(pairs)}


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
    curated, counts = curated_pairs(ctx, stage.iteration)
    examples += [prompts.forward_example(p["instruction"], p["response"], prompts.augmented_system(tags))
                 for p in curated]
    return examples, {"seed": len(seed), **counts}


def run_train(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.training import TrainRequest, train

    spec = ctx.run.spec
    base = spec.base_model
    if base.startswith((".", "/", "file://")) and not Path(base.removeprefix("file://")).is_dir():
        raise StageError(f"spec.baseModel: {base} is not a directory (a local model directory, hub id or "
                         "s3:// URI is expected; the demo's is built by `humpback tiny-model .cache/tiny-llama`)")
    examples, counts = training_examples(ctx, stage)
    card = {"run": ctx.run_prefix, "stage": stage.name, "role": stage.role,
            "baseModel": spec.base_model, "fingerprint": stage.fingerprint, "data": counts,
            "inputs": {d: ctx.plan[d].fingerprint for d in stage.deps}}
    metrics = train(TrainRequest(base_model=spec.base_model, examples=examples, settings=getattr(spec.training, stage.role),
                                 store=ctx.store, prefix=prefix, card=card, s3_endpoint=spec.storage.s3.endpoint,
                                 s3_region=spec.storage.s3.region))
    return {"outputs": {"model": f"{prefix}/model", "count": metrics.get("examples", len(examples))},
            "counts": counts, "metrics": metrics}
