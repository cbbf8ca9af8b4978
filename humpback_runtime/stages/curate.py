"""curate-k: M(k-1) scores every candidate pair once; a cheap selection step picks the curated set.

    humpback stage curate-1 --spec RUN.yaml

curate-k scores every candidate in one of two modes (`spec.curation.mode`):

- `generate`, the paper's: the model writes brief reasoning and "Score: N" on its last line;
  `prompts.parse_score` takes N strictly, anything else is counted as unparsed, never guessed. The
  record keeps the parsed `score` and the raw output (`judgement`).
- `logprobs`: one forward pass per pair; the probability the model puts on "1".."5" as the next
  token after "Score:" (`probs`, renormalised), how much it put on them at all (`mass`), the
  expected score and the argmax (`score` = argmax). Never unparsable. The server returns its top
  `curation.topLogprobs` candidates (vLLM serves at most its --max-logprobs, 20 by default).

The scores land in checkpointed shards under the stage prefix (exactly-once on restart): they are
the stage's output, and its fingerprint holds only what changes them. Selection (`threshold`,
`selectBy`, `minDigitMass`, `minYield`) is a separate, cheap step over the stored scores
(:func:`selection`): each combination is written side by side to `<prefix>/selected/<selection-id>/`
(e.g. `selected/threshold-5-argmax-mass-0.5/`) with its own `_SUCCESS.json`, so another threshold
re-selects in seconds without one new request, and earlier selections stay for comparison (the
paper's A4 and A5 sets). curate-k selects with the current settings when it finishes; train-mk,
whose fingerprint holds the selection settings, reads the current selection (making it if need be).
The candidates come from augment, or from rewrite-k when the run rewrites them first
(:mod:`humpback_runtime.stages.rewrite`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import Any

from humpback_runtime import prompts
from humpback_runtime.context import RunContext
from humpback_runtime.inference.engines import GenerationResult, Sampling
from humpback_runtime.plan import Stage, selection_id, selection_settings
from humpback_runtime.stages.augment import candidate_records, refusal_counts
from humpback_runtime.storage import (ShardWriter, iter_shard_records, list_shards, output_shards, read_success,
                                      write_success)

log = logging.getLogger(__name__)

SELECTED = "selected"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXPECTED_WARNING_SHARE = 0.01  # selectBy expected keeping less than this gets a warning


def _candidates_stage(stage: Stage) -> str:
    return next(d for d in stage.deps if d in ("augment", "rewrite") or d.startswith("rewrite-"))


def _score_record(pair: dict, **fields: Any) -> dict:
    return {"id": pair["id"], "instruction": pair["instruction"], "response": pair["response"], **fields}


def run_curate(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.inference.client import rejected_records
    from humpback_runtime.inference.models import engine_for, tokenizer_encode
    from humpback_runtime.stages.guardrails import check_rejected, max_rejected

    spec = ctx.run.spec.curation
    system = ctx.model_system(stage.serves)  # what M(k-1) was trained with
    pairs = list(candidate_records(ctx, _candidates_stage(stage)))
    engine = engine_for(ctx, stage.serves)
    common = dict(store=ctx.store, prefix=prefix, checkpoint_every=ctx.run.spec.inference.checkpoint_every,
                  total=len(pairs), desc=stage.name,
                  max_rejected=max_rejected(len(pairs), ctx.run.spec.inference.max_rejected_fraction))

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
            # Everything a selection may need, and nothing that depends on the selection settings.
            scored = prompts.score_from_top_logprobs(top)
            if scored is None:
                return _score_record(pair, score=None, expected=None, argmax=None, probs=None, mass=0.0)
            return _score_record(pair, score=scored.argmax, expected=scored.expected, argmax=scored.argmax,
                                 probs={str(k): v for k, v in scored.probs.items()}, mass=scored.mass)

        stats = engine.score(pairs, build, top_k=spec.top_logprobs, handle=handle, **common)
    rejected = rejected_records(ctx.store, prefix)
    check_rejected(stage.name, rejected, len(pairs), ctx.run.spec.inference.max_rejected_fraction)
    summary = score_summary(ctx, prefix, spec.mode)
    # Select with the current settings now, so that the yield is known (and checked) at once.
    chosen = selection(ctx, stage.name, selection_settings(spec))
    return {
        "outputs": {"records": summary.pop("keys"), "count": summary["scored"], "format": "jsonl",
                    "selection": {"id": chosen["id"], "prefix": chosen["prefix"], "count": chosen["selected"]}},
        **summary,
        "selected": chosen["selected"],
        "counts": {"candidates": len(pairs), "scored": summary["scored"], **refusal_counts(rejected)},
        "rejectedExamples": rejected["examples"],
        "yield": chosen["yield"],
        "inference": stats,
    }


def score_summary(ctx: RunContext, prefix: str, mode: str) -> dict[str, Any]:
    """Histograms and digit-mass quantiles over every stored score (no selection setting involved)."""
    store = ctx.store
    keys = list_shards(store, prefix)
    histogram: Counter[str] = Counter()
    expected_histogram: Counter[str] = Counter()
    masses: list[float] = []
    scored = unparsed = 0
    for record in iter_shard_records(store, keys):
        scored += 1
        if mode == "logprobs" and isinstance(record.get("mass"), (int, float)):
            masses.append(float(record["mass"]))
        score = record.get("score")
        if score is None:
            unparsed += 1
            continue
        histogram[str(record.get("argmax") or round(score))] += 1
        if record.get("expected") is not None:
            expected_histogram[f"{record['expected']:.2f}"] += 1
    scores: dict[str, Any] = {
        "histogram": {str(k): histogram.get(str(k), 0) for k in range(1, 6)},
        "unparsable": unparsed,
        "unparsableRate": round(unparsed / scored, 4) if scored else None,
    }
    if expected_histogram:
        scores["expected_histogram"] = dict(sorted(expected_histogram.items()))
    if masses:
        scores["digitMass"] = mass_quantiles(masses)
    return {"keys": keys, "mode": mode, "scored": scored, "scores": scores}


def mass_quantiles(masses: list[float]) -> dict[str, float]:
    """min, p05, p25, p50, p75, p95, max and mean of the digit masses (nearest-rank quantiles)."""
    values = sorted(masses)
    n = len(values)
    out = {"min": round(values[0], 4)}
    for q in QUANTILES:
        out[f"p{round(q * 100):02d}"] = round(values[min(n - 1, max(0, math.ceil(q * n) - 1))], 4)
    out["max"] = round(values[-1], 4)
    out["mean"] = round(sum(values) / n, 4)
    return out


def selection_prefix(ctx: RunContext, curate_stage: str, settings: dict[str, Any]) -> str:
    return f"{ctx.prefix(curate_stage)}/{SELECTED}/{selection_id(settings)}"


def selection(ctx: RunContext, curate_stage: str, settings: dict[str, Any], *, write: bool = True) -> dict[str, Any]:
    """The selection `settings` (:func:`humpback_runtime.plan.selection_settings`) over the stored scores.

    Returns its manifest ({"id", "prefix", "settings", "scored", "selected", "unscored",
    "belowMinDigitMass", "yield", "warnings", "outputs"}). Reused when already stored for these
    scores, else made from them: either way no request is sent. `write=False` computes it without
    storing it (and adds "records"): ranks other than 0 under torchrun. Fails with StageError when
    the yield is under curation.minYield.
    """
    from humpback_runtime.stages.guardrails import LOW_YIELD_WARNING, check_yield, yield_record

    store = ctx.store
    scores_fingerprint = ctx.plan[curate_stage].fingerprint
    prefix = selection_prefix(ctx, curate_stage, settings)
    existing = read_success(store, prefix)
    if existing and existing.get("scoresFingerprint") == scores_fingerprint and existing.get("settings") == settings:
        return existing

    threshold = settings["threshold"]
    by = settings.get("selectBy", "argmax")
    min_mass = settings.get("minDigitMass")
    scored = unscored = low_mass = 0
    kept: list[dict] = []
    if write:
        store.delete_prefix(prefix + "/")  # a crash mid-selection must not leave a mix
    writer = ShardWriter(store, prefix) if write else None
    try:
        for record in iter_shard_records(store, list_shards(store, ctx.prefix(curate_stage))):
            scored += 1
            if record.get("score") is None:
                unscored += 1
                continue
            if min_mass is not None and record.get("mass") is not None and record["mass"] < min_mass:
                low_mass += 1  # the rater mostly wanted to write something else: no score to trust
                continue
            value = record.get("expected") if by == "expected" else record["score"]
            if value is not None and value >= threshold:
                row = {k: record[k] for k in ("id", "instruction", "response", "score")}
                if writer is not None:
                    writer.write(row)
                else:
                    kept.append(row)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.__exit__(Exception, None, None)  # drops the unfinished shard
        raise
    selected = writer.count if writer is not None else len(kept)
    sid = selection_id(settings)
    warnings = []
    if low_mass:
        warnings.append(f"{low_mass} of {scored} unscored: digit mass below curation.minDigitMass ({min_mass:g})")
    if by == "expected" and scored and selected / scored < EXPECTED_WARNING_SHARE:
        warnings.append(f"selectBy expected with threshold {threshold:g} keeps {selected} of {scored} "
                        f"({selected / scored:.1%}): an expected score rarely reaches a high threshold; "
                        "lower curation.threshold (e.g. 4) or use selectBy argmax")
    if unscored + low_mass > (scored - unscored - low_mass):
        cause = f"{unscored + low_mass} of {scored} candidates got no usable score"
    else:
        cause = f"{scored - unscored - low_mass - selected} of {scored} scored below {threshold:g}: lower curation.threshold"
    if scored and selected / scored < LOW_YIELD_WARNING:
        warnings.append(cause)
    for warning in warnings:
        log.warning("%s selection %s: %s", curate_stage, sid, warning)
    check_yield(f"{curate_stage} (selection {sid})", scored, selected, settings.get("minYield", 0.0),
                "curation.minYield", cause)
    manifest = {
        "id": sid, "prefix": prefix, "settings": settings, "scoresFingerprint": scores_fingerprint,
        "scored": scored, "selected": selected, "unscored": unscored, "belowMinDigitMass": low_mass,
        "threshold": threshold, "yield": yield_record(scored, selected, warnings), "warnings": warnings,
        "outputs": {"records": writer.shards if writer is not None else [], "count": selected, "format": "jsonl"},
    }
    if writer is not None:
        write_success(store, prefix, manifest)
    else:
        manifest["records"] = kept
    log.info("Selected %d of %d scored pairs of %s (%s), no requests sent", selected, scored, curate_stage, sid)
    return manifest


def selected_pairs(ctx: RunContext, curate_stage: str, settings: dict[str, Any]) -> tuple[list[dict], dict]:
    """The curated pairs of the selection `settings`, and its manifest (made if need be)."""
    write = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone writes the selection
    chosen = selection(ctx, curate_stage, settings, write=write)
    if "records" in chosen:
        return chosen["records"], chosen
    return list(iter_shard_records(ctx.store, output_shards(ctx.store, chosen["prefix"], chosen))), chosen
