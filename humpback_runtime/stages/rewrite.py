"""rewrite / rewrite-k: a model rewrites candidate responses in assistant style.

    humpback stage rewrite --spec RUN.yaml      # an external rewriter: one stage for all iterations
    humpback stage rewrite-1 --spec RUN.yaml    # self-rewriting by M(k-1)

Self-rewriting uses M(k-1) with our template (completions API); with `spec.curation.rewrite.endpoint`
an external OpenAI-compatible model rewrites (back-and-forth translation), asked through its `api`
(chat by default) without our system tags. `spec.curation.rewrite.order` (see the plan): `before`
rewrites every augment candidate and curate-k scores the rewrites; `after` (Nguyen et al. 2024)
lets curate-k score the original pairs and train-mk take the rewritten responses of the selected
ones. An external rewriter runs once for all iterations (it rewrites every candidate); self-rewriting
in order `after` rewrites only curate-k's selection.

A rewrite cut off by `maxTokens` (finish_reason "length") is an unfinished answer: it is dropped and
counted (`dropped_truncated`), never kept as training data; so is an empty one (`dropped_empty`).
"""

from __future__ import annotations

import os
from typing import Any

from humpback_runtime import prompts
from humpback_runtime.context import RunContext
from humpback_runtime.inference.engines import GenerationResult, Sampling, VLLMServerEngine
from humpback_runtime.plan import Stage
from humpback_runtime.pod_contract import REWRITE_API_KEY_ENV
from humpback_runtime.stages.augment import candidate_records, check_inference, drop_counts, summarize
from humpback_runtime.stages.guardrails import max_rejected


def run_rewrite(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.inference.models import engine_for

    spec = ctx.run.spec.curation.rewrite
    source = next(d for d in stage.deps if d == "augment" or d.startswith("curate-"))
    if source == "augment":
        pairs = list(candidate_records(ctx, source))
    else:  # order after: the pairs curate-k selected, by the selection of this run's settings
        from humpback_runtime.stages.curate import selected_pairs

        pairs = selected_pairs(ctx, source, stage.settings["selection"])[0]
    if spec.endpoint:
        # Back-and-forth translation: an external aligned model, asked without our system tags.
        engine = VLLMServerEngine(spec.endpoint, spec.model, api_key=os.environ.get(REWRITE_API_KEY_ENV),
                                  concurrency=ctx.run.spec.inference.concurrency, api=spec.api)
        system = None
    else:
        engine = engine_for(ctx, stage.serves)
        system = ctx.model_system(stage.serves)

    def handle(pair: dict, result: GenerationResult) -> dict:
        text = result.text.strip()
        dropped = "empty" if not text else "truncated" if result.finish_reason == "length" else None
        return {"id": pair["id"], "instruction": pair["instruction"], "response": text or pair["response"],
                "original_response": pair["response"], "finish_reason": result.finish_reason,
                "dropped": dropped}

    stats = engine.generate(
        pairs, lambda p: prompts.rewrite_prompt(p["instruction"], p["response"], system=system),
        Sampling.from_spec(spec.sampling), store=ctx.store, prefix=prefix, handle=handle,
        checkpoint_every=ctx.run.spec.inference.checkpoint_every, total=len(pairs), desc=stage.name,
        max_rejected=max_rejected(len(pairs), ctx.run.spec.inference.max_rejected_fraction),
    )
    summary = summarize(ctx, prefix)
    kept = check_inference(ctx, stage, "rewrite", summary, len(pairs))
    return {
        "outputs": {"records": summary["keys"], "count": summary["kept"], "format": "jsonl"},
        "counts": {"candidates": len(pairs), "rewritten": summary["kept"], **drop_counts(summary)},
        "rejectedExamples": summary["rejected"]["examples"],
        "yield": kept,
        "inference": stats,
    }
