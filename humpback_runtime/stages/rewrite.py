"""rewrite-k: a model rewrites each candidate's response in assistant style before curation.

    humpback stage rewrite-1 --spec RUN.yaml

Self-rewriting uses M(k-1) with our template; with `spec.curation.rewrite.endpoint` an external
OpenAI-compatible model rewrites, asked without our system tags (back-and-forth translation).
"""

from __future__ import annotations

import os
from typing import Any

from humpback_runtime import prompts
from humpback_runtime.context import RunContext
from humpback_runtime.inference.engines import GenerationResult, Sampling, VLLMServerEngine
from humpback_runtime.plan import Stage
from humpback_runtime.pod_contract import REWRITE_API_KEY_ENV
from humpback_runtime.stages.augment import candidate_records, summarize


def run_rewrite(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.inference.models import engine_for

    spec = ctx.run.spec.curation.rewrite
    pairs = list(candidate_records(ctx, "augment"))
    if spec.endpoint:
        # Back-and-forth translation: an external aligned model, asked without our system tags.
        engine = VLLMServerEngine(spec.endpoint, spec.model, api_key=os.environ.get(REWRITE_API_KEY_ENV),
                                  concurrency=ctx.run.spec.inference.client_concurrency())
        system = None
    else:
        engine = engine_for(ctx, stage.serves)
        system = prompts.inference_system(ctx.run.spec.system_prompts)

    def handle(pair: dict, result: GenerationResult) -> dict:
        text = result.text.strip()
        return {"id": pair["id"], "instruction": pair["instruction"], "response": text or pair["response"],
                "original_response": pair["response"], "finish_reason": result.finish_reason,
                "dropped": None if text else "empty"}

    stats = engine.generate(
        pairs, lambda p: prompts.rewrite_prompt(p["instruction"], p["response"], system=system),
        Sampling.from_spec(spec.sampling), store=ctx.store, prefix=prefix, handle=handle,
        checkpoint_every=ctx.run.spec.inference.checkpoint_every, total=len(pairs), desc=stage.name,
    )
    summary = summarize(ctx, prefix)
    return {
        "outputs": {"records": summary["keys"], "count": summary["kept"], "format": "jsonl"},
        "counts": {"candidates": len(pairs), "rewritten": summary["kept"],
                   **{f"dropped_{k}": v for k, v in summary["dropped"].items()}},
        "inference": stats,
    }
