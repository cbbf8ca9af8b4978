"""evaluate: each model answers the evaluation sets; a judge compares the answers pairwise, against
reference outputs, or grades them 1-10 (MT-Bench, two turns: a record's ``history`` holds the
earlier questions and answers).

    humpback stage evaluate --spec RUN.yaml
"""

from __future__ import annotations

from typing import Any

from humpback_runtime.context import RunContext
from humpback_runtime.plan import Stage


def run_evaluate(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime import prompts
    from humpback_runtime.inference.engines import GenerationResult, Sampling
    from humpback_runtime.evaluation import evaluate
    from humpback_runtime.inference.models import engine_for
    from humpback_runtime.storage import iter_shard_records, list_shards

    spec = ctx.run.spec

    def generate_answers(model_stage: str, records: list[dict], out_prefix: str) -> dict[str, str]:
        def handle(record: dict, result: GenerationResult) -> dict:
            return {"id": record["id"], "answer": result.text.strip(), "finish_reason": result.finish_reason}

        system = ctx.model_system(model_stage)  # the system text this model was trained with
        engine_for(ctx, model_stage).generate(
            records, lambda r: prompts.forward_turn_prompt(r.get("history") or [], r["instruction"], system),
            Sampling.from_spec(spec.evaluation.sampling), store=ctx.store, prefix=out_prefix, handle=handle,
            checkpoint_every=spec.inference.checkpoint_every, total=len(records), desc=f"{stage.name} {model_stage}",
        )
        return {r["id"]: r["answer"] for r in iter_shard_records(ctx.store, list_shards(ctx.store, out_prefix))}

    s3 = spec.storage.s3
    return evaluate(spec.evaluation, list(stage.deps), generate_answers, store=ctx.store, prefix=prefix,
                    checkpoint_every=spec.inference.checkpoint_every, endpoint_url=s3.endpoint, region=s3.region,
                    base_dir=ctx.run.base_dir)
