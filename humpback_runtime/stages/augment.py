"""augment: the backward model Myx writes an instruction for every corpus segment (self-augmentation).

    humpback stage augment --spec RUN.yaml

Every segment gets one record in the output shards, kept or not: `dropped` is null for a usable
candidate pair, else the reason (empty, too_long, echo). Keeping the reason in the record makes
the counts exact after any number of restarts, and the engines' exactly-once bookkeeping skips
every segment already answered. Readers take the records whose `dropped` is null
(`candidate_records`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from humpback_runtime import prompts
from humpback_runtime.context import RunContext
from humpback_runtime.inference.engines import GenerationResult, Sampling
from humpback_runtime.plan import Stage
from humpback_runtime.storage import iter_shard_records, list_shards

_SPACE = re.compile(r"\s+")
# A backward model that learned the template may continue it; such text is no instruction.
_TEMPLATE_MARKERS = ("### Response:", "### Instruction")


def candidate_records(ctx: RunContext, stage: str) -> Iterator[dict[str, Any]]:
    """Usable (instruction, response) candidates of an augment or rewrite stage."""
    return (r for r in ctx.records(stage) if not r.get("dropped"))


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def drop_reason(instruction: str, segment: str, result: GenerationResult, max_chars: int) -> str | None:
    if not instruction:
        return "empty"
    # Cut off by max_tokens: an unfinished instruction.
    if len(instruction) > max_chars or result.finish_reason == "length":
        return "too_long"
    normal = _normal(instruction)
    if any(m.lower() in normal for m in _TEMPLATE_MARKERS) or normal in _normal(segment):
        return "echo"
    return None


def summarize(ctx: RunContext, prefix: str) -> dict[str, Any]:
    """Counts and output shard keys from everything written under `prefix` (all attempts)."""
    keys = list_shards(ctx.store, prefix)
    reasons: Counter[str] = Counter()
    kept = 0
    for record in iter_shard_records(ctx.store, keys):
        if record.get("dropped"):
            reasons[record["dropped"]] += 1
        else:
            kept += 1
    return {"keys": keys, "kept": kept, "dropped": dict(sorted(reasons.items()))}


def run_augment(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.inference.models import engine_for

    spec = ctx.run.spec.augmentation
    segments = list(ctx.records("prepare-corpus"))
    engine = engine_for(ctx, stage.serves)

    def handle(segment: dict, result: GenerationResult) -> dict:
        instruction = result.text.strip()
        return {
            "id": segment["id"],
            "instruction": instruction,
            "response": segment["text"],
            "finish_reason": result.finish_reason,
            "dropped": drop_reason(instruction, segment["text"], result, spec.max_instruction_chars),
        }

    stats = engine.generate(
        segments, lambda seg: prompts.backward_prompt(seg["text"]), Sampling.from_spec(spec),
        store=ctx.store, prefix=prefix, handle=handle,
        checkpoint_every=ctx.run.spec.inference.checkpoint_every, total=len(segments), desc=stage.name,
    )
    summary = summarize(ctx, prefix)
    return {
        "outputs": {"records": summary["keys"], "count": summary["kept"], "format": "jsonl"},
        "counts": {"segments": len(segments), "candidates": summary["kept"], **{f"dropped_{k}": v for k, v in summary["dropped"].items()}},
        "inference": stats,
    }
