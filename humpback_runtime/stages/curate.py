"""curate-k: M(k-1) rates the candidate pairs and keeps the best (self-curation).

    humpback stage curate-1 --spec RUN.yaml

curate-k scores every candidate in one of two modes (`spec.curation.mode`):

- `generate`, the paper's: the model writes brief reasoning and "Score: N" on its last line;
  `prompts.parse_score` takes N strictly, anything else is counted as unparsed, never guessed.
- `logprobs`: one forward pass per pair; the probability the model puts on "1".."5" as the next
  token after "Score:" gives an expected score and an argmax. Never unparsable.

Scores land in checkpointed shards under the stage prefix (exactly-once on restart); a final pass
writes the pairs that reach `spec.curation.threshold` to `<prefix>/selected/`, which train-mk reads.
The candidates come from augment, or from rewrite-k when the run rewrites them first
(:mod:`humpback_runtime.stages.rewrite`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from humpback_runtime import prompts
from humpback_runtime.context import RunContext
from humpback_runtime.inference.engines import GenerationResult, Sampling
from humpback_runtime.plan import Stage
from humpback_runtime.stages.augment import candidate_records
from humpback_runtime.stages.train import model_system
from humpback_runtime.storage import ShardWriter, iter_shard_records, list_shards

SELECTED = "selected"


def _candidates_stage(stage: Stage) -> str:
    return next(d for d in stage.deps if d in ("augment", "rewrite") or d.startswith("rewrite-"))


def _score_record(pair: dict, **fields: Any) -> dict:
    return {"id": pair["id"], "instruction": pair["instruction"], "response": pair["response"], **fields}


def run_curate(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.inference.models import engine_for, tokenizer_encode

    spec = ctx.run.spec.curation
    system = model_system(ctx, stage.serves)  # what M(k-1) was trained with
    pairs = list(candidate_records(ctx, _candidates_stage(stage)))
    engine = engine_for(ctx, stage.serves)
    common = dict(store=ctx.store, prefix=prefix, checkpoint_every=ctx.run.spec.inference.checkpoint_every,
                  total=len(pairs), desc=stage.name)

    if spec.mode == "generate":
        def build(pair: dict) -> str:
            if spec.instruction_only:
                return prompts.instruction_only_prompt(pair["instruction"], system=system)
            return prompts.curation_prompt(pair["instruction"], pair["response"], system=system)

        def handle(pair: dict, result: GenerationResult) -> dict:
            return _score_record(pair, score=prompts.parse_score(result.text), judgement=result.text)

        sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=spec.max_tokens)
        stats = engine.generate(pairs, build, sampling, handle=handle, **common)
    else:
        score_prefix = prompts.logprob_score_prefix(tokenizer_encode(ctx, stage.serves))
        if hasattr(engine, "always_include"):
            # In process the digits' exact logprobs are at hand, so no pair is ever unscored; a
            # server reports its top K only (vLLM: up to --max-logprobs, 20 by default).
            space = "" if score_prefix.endswith(" ") else " "
            engine.always_include = tuple(f"{space}{d}" for d in "12345")

        def build(pair: dict) -> str:
            if spec.instruction_only:
                return prompts.instruction_only_logprob_prompt(pair["instruction"], system=system,
                                                               score_prefix=score_prefix)
            return prompts.curation_logprob_prompt(pair["instruction"], pair["response"], system=system,
                                                   score_prefix=score_prefix)

        def handle(pair: dict, top: dict[str, float]) -> dict:
            scored = prompts.score_from_top_logprobs(top)
            if scored is None:
                return _score_record(pair, score=None, expected=None, probs=None, mass=0.0)
            score = scored.argmax if spec.select_by == "argmax" else scored.expected
            return _score_record(pair, score=score, expected=scored.expected, argmax=scored.argmax,
                                 probs={str(k): v for k, v in scored.probs.items()}, mass=scored.mass)

        stats = engine.score(pairs, build, handle=handle, **common)
    return {**select(ctx, prefix, spec.threshold, spec.mode), "inference": stats}


def select(ctx: RunContext, prefix: str, threshold: float, mode: str) -> dict[str, Any]:
    """Write the pairs scoring >= threshold to <prefix>/selected/ and summarise the scores."""
    store = ctx.store
    store.delete_prefix(f"{prefix}/{SELECTED}/")  # a crash mid-selection must not leave a mix
    histogram: Counter[str] = Counter()
    expected_histogram: Counter[str] = Counter()
    scored = unparsed = 0
    with ShardWriter(store, f"{prefix}/{SELECTED}") as writer:
        for record in iter_shard_records(store, list_shards(store, prefix)):
            scored += 1
            score = record.get("score")
            if score is None:
                unparsed += 1
                continue
            histogram[str(record.get("argmax", round(score)))] += 1
            if record.get("expected") is not None:
                expected_histogram[f"{record['expected']:.2f}"] += 1
            if score >= threshold:
                writer.write({k: record[k] for k in ("id", "instruction", "response", "score")})
    selected = writer.count
    return {
        "outputs": {"records": writer.shards, "count": selected, "format": "jsonl", "scores": list_shards(store, prefix)},
        "mode": mode,
        "scored": scored,
        "selected": selected,
        "scores": {
            "histogram": {str(k): histogram.get(str(k), 0) for k in range(1, 6)},
            "unparsable": unparsed,
            "unparsableRate": round(unparsed / scored, 4) if scored else None,
            "threshold": threshold,
            "yield": round(selected / scored, 4) if scored else None,
            **({"expected_histogram": dict(sorted(expected_histogram.items()))} if expected_histogram else {}),
        },
    }
