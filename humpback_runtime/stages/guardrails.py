"""Yield guardrails: what each stage kept, and the floors below which a run must not go on silently.

Every stage's manifest carries `yield: {in, out, fraction, warnings}`; `humpback run` prints them as
a table at the end. A stage whose yield falls under its floor (`seed.minYield`,
`augmentation.minYield`, `curation.minYield`, `training.<role>.minYield`) fails with the counts and
the likely cause, e.g. "38 of 42 instructions hit maxTokens: raise augmentation.maxTokens". A stage
whose server refused more than `inference.maxRejectedFraction` of its records fails too.
"""

from __future__ import annotations

from typing import Any

from humpback_runtime.errors import StageError

# The causes a stage can name, by drop reason: what happened, and the setting that helps.
CAUSES = {
    "prepare-seed": {
        "no_reply": ("prompts have no usable rank-0 reply", "check seed.format (oasst1 or oasst1-trees)"),
        "quality": ("pairs are under seed.minQuality", "lower seed.minQuality"),
        "deleted": ("messages are deleted", ""),
        "synthetic": ("messages are synthetic", ""),
        "empty": ("pairs have an empty instruction or response", "check seed.fields"),
        "bad_record": ("records are malformed", "see badRecords in the manifest"),
    },
    "augment": {
        "max_tokens": ("instructions hit maxTokens", "raise augmentation.maxTokens"),
        "too_long": ("instructions are longer than maxInstructionChars", "raise augmentation.maxInstructionChars"),
        "echo": ("instructions repeat the segment or the template",
                 "train the backward model longer (training.backward.steps)"),
        "empty": ("instructions are empty", "train the backward model longer (training.backward.steps)"),
        "rejected_by_server": ("prompts were refused by the server", "check the server's --max-model-len"),
        "prompt_too_long": ("segments do not fit the model's context",
                            "lower corpus.maxChars or raise inference.vllm.maxModelLen"),
    },
    "rewrite": {
        "empty": ("rewrites are empty", "check the rewriter (curation.rewrite)"),
        "rejected_by_server": ("prompts were refused by the server", "check the server's --max-model-len"),
        "prompt_too_long": ("pairs do not fit the model's context", "raise inference.vllm.maxModelLen"),
    },
}


# Under this share kept, a stage names the likely cause among its warnings (shown in the run's
# summary table) even when no floor stops it: a low yield is never only a log line.
LOW_YIELD_WARNING = 0.5


def yield_record(n_in: int, n_out: int, warnings: list[str] | None = None) -> dict[str, Any]:
    """The manifest's `yield` field."""
    return {"in": n_in, "out": n_out, "fraction": round(n_out / n_in, 4) if n_in else None,
            "warnings": list(warnings or [])}


def likely_cause(family: str, dropped: dict[str, int], n_in: int, noun: str = "records") -> str:
    """ "38 of 42 instructions hit maxTokens: raise augmentation.maxTokens" for the largest drop reason."""
    dropped = {k: v for k, v in dropped.items() if v}
    if not dropped:
        return ""
    reason, n = max(dropped.items(), key=lambda kv: kv[1])
    what, fix = CAUSES.get(family, {}).get(reason, (f"{noun} were dropped as {reason}", ""))
    return f"{n} of {n_in} {what}" + (f": {fix}" if fix else "")


def check_yield(stage: str, n_in: int, n_out: int, floor: float, setting: str, cause: str) -> None:
    """Fail the stage when it kept less than `floor` of its input."""
    if n_in and n_out / n_in < floor:
        raise StageError(
            (f"{cause}. " if cause else "")
            + f"{stage} kept {n_out} of {n_in} ({n_out / n_in:.1%}), below {setting} ({floor:g}): fix the "
            f"cause, or lower {setting} if this yield is expected."
        )


def check_rejected(stage: str, rejected: dict[str, Any], n_in: int, max_fraction: float) -> None:
    """Fail the stage when more than `inference.maxRejectedFraction` of its records were refused: by the
    server, or before sending as too long for the model's context."""
    count = rejected.get("count", 0)
    if n_in and count / n_in > max_fraction:
        first = (rejected.get("examples") or [{}])[0]
        raise StageError(
            f"{stage}: {count} of {n_in} records were refused ({count / n_in:.1%}), more than "
            f"inference.maxRejectedFraction ({max_fraction:g}); e.g. record {first.get('id')!r}: {first.get('reason')}"
        )


def max_rejected(n_in: int, max_fraction: float) -> int:
    """How many refused records the client takes before it fails early."""
    return int(n_in * max_fraction)
