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
    from humpback_runtime.inference.client import rejected_records

    keys = list_shards(ctx.store, prefix)
    reasons: Counter[str] = Counter()
    kept = 0
    for record in iter_shard_records(ctx.store, keys):
        if record.get("dropped"):
            # "too_long" covers both limits; the cause a user acts on is which one.
            cut = record["dropped"] == "too_long" and record.get("finish_reason") == "length"
            reasons["max_tokens" if cut else record["dropped"]] += 1
        else:
            kept += 1
    rejected = rejected_records(ctx.store, prefix)
    if rejected["count"] - rejected["before_sending"]:
        reasons["rejected_by_server"] = rejected["count"] - rejected["before_sending"]
    if rejected["before_sending"]:
        reasons["prompt_too_long"] = rejected["before_sending"]
    return {"keys": keys, "kept": kept, "dropped": dict(sorted(reasons.items())), "rejected": rejected}


def check_inference(ctx: RunContext, stage: Stage, family: str, summary: dict[str, Any], n_in: int,
                    floor: float | None = None, setting: str = "") -> dict[str, Any]:
    """The manifest's `yield` of an inference stage; fails it on too many refusals or a low yield."""
    from humpback_runtime.stages.guardrails import (LOW_YIELD_WARNING, check_rejected, check_yield, likely_cause,
                                                    yield_record)

    check_rejected(stage.name, summary["rejected"], n_in, ctx.run.spec.inference.max_rejected_fraction)
    cause = likely_cause(family, summary["dropped"], n_in)
    if floor is not None:
        check_yield(stage.name, n_in, summary["kept"], floor, setting, cause)
    warnings = [cause] if cause and n_in and summary["kept"] / n_in < LOW_YIELD_WARNING else []
    return yield_record(n_in, summary["kept"], warnings + refusal_warnings(summary["rejected"]))


def refusal_warnings(rejected: dict[str, Any]) -> list[str]:
    by_server = rejected["count"] - rejected["before_sending"]
    return ([f"{by_server} refused by the server"] if by_server else []) + (
        [f"{rejected['before_sending']} prompts too long for the model's context (not sent)"]
        if rejected["before_sending"] else [])


def refusal_counts(rejected: dict[str, Any]) -> dict[str, int]:
    """The manifest's counts of refused records: by the server, and too long to send."""
    return {"rejected_by_server": rejected["count"] - rejected["before_sending"],
            "prompt_too_long": rejected["before_sending"]}


def drop_counts(summary: dict[str, Any]) -> dict[str, int]:
    refused = refusal_counts(summary["rejected"])
    dropped = {f"dropped_{k}": v for k, v in summary["dropped"].items() if k not in refused}
    return {**dropped, **refused}


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

    from humpback_runtime.stages.guardrails import max_rejected

    stats = engine.generate(
        segments, lambda seg: prompts.backward_prompt(seg["text"]), Sampling.from_spec(spec),
        store=ctx.store, prefix=prefix, handle=handle,
        checkpoint_every=ctx.run.spec.inference.checkpoint_every, total=len(segments), desc=stage.name,
        max_rejected=max_rejected(len(segments), ctx.run.spec.inference.max_rejected_fraction),
    )
    summary = summarize(ctx, prefix)
    kept = check_inference(ctx, stage, "augment", summary, len(segments), spec.min_yield, "augmentation.minYield")
    return {
        "outputs": {"records": summary["keys"], "count": summary["kept"], "format": "jsonl"},
        "counts": {"segments": len(segments), "candidates": summary["kept"], **drop_counts(summary)},
        "rejectedExamples": summary["rejected"]["examples"],
        "yield": kept,
        "inference": stats,
    }
