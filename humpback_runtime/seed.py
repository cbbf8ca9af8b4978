"""prepare-seed: the seed pairs (instruction, response) the backward and seed models train on.

The paper's seed data is the first turn of oasst1: each root prompt with its rank-0 assistant
reply, English (3,200 pairs; Li et al. 2023, section 3.1). Dropping deleted messages is ours. Three input formats give the same
records: the flat oasst1 message table of the HF release, nested oasst trees, or ready pairs.
Pure functions over (where, record) pairs; the stage wires them to sources and storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from humpback_runtime.sources import BadRecords
from humpback_runtime.spec import SeedSpec


@dataclass
class SeedCounts:
    records: int = 0  # input records (messages, trees or pairs)
    roots: int = 0  # root prompts seen (oasst formats)
    dropped_lang: int = 0
    dropped_deleted: int = 0
    dropped_synthetic: int = 0
    dropped_no_reply: int = 0  # root with no usable rank-0 reply
    dropped_quality: int = 0
    dropped_empty: int = 0  # blank instruction or response
    dropped_over_cap: int = 0
    pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _quality(message: dict[str, Any]) -> float | None:
    labels = message.get("labels") or {}
    names, values = labels.get("name") or [], labels.get("value") or []
    for name, value in zip(names, values):
        if name == "quality":
            return value
    return None


def _message_problem(message: dict[str, Any], spec: SeedSpec) -> str | None:
    """Why a message cannot be part of a seed pair, as a SeedCounts field, or None."""
    if spec.lang is not None and message.get("lang") != spec.lang:
        return "dropped_lang"
    if message.get("deleted"):
        return "dropped_deleted"
    if message.get("synthetic"):
        return "dropped_synthetic"
    return None


def _make_pair(prompt: dict[str, Any], reply: dict[str, Any], tree_id: str | None) -> dict[str, Any]:
    return {
        "id": prompt["message_id"],
        "instruction": prompt["text"],
        "response": reply["text"],
        "message_tree_id": tree_id,
        "prompt_message_id": prompt["message_id"],
        "response_message_id": reply["message_id"],
        "response_rank": reply.get("rank"),
        "instruction_quality": _quality(prompt),
        "response_quality": _quality(reply),
    }


def _first_turn(prompt: dict[str, Any], replies: list[dict[str, Any]], tree_id: str | None,
                spec: SeedSpec, counts: SeedCounts) -> dict[str, Any] | None:
    counts.roots += 1
    problem = _message_problem(prompt, spec)
    if problem:
        setattr(counts, problem, getattr(counts, problem) + 1)
        return None
    # Ranks are unique per parent in oasst1; on a tie the first in input order wins.
    best = next((r for r in replies if r.get("role") == "assistant" and r.get("rank") == 0
                 and _message_problem(r, spec) is None), None)
    if best is None:
        counts.dropped_no_reply += 1
        return None
    return _make_pair(prompt, best, tree_id)


def _require_text(message: dict[str, Any], where: str, bad: BadRecords) -> bool:
    for key in ("message_id", "text"):
        if not isinstance(message.get(key), str):
            bad.add(where, f"field '{key}' is missing or not a string")
            return False
    return True


def _oasst1_pairs(records: Iterable[tuple[str, dict]], spec: SeedSpec, counts: SeedCounts,
                  bad: BadRecords) -> Iterator[dict[str, Any]]:
    # Replies may come before their prompt in the table, so collect roots and rank-0 replies first.
    roots: list[dict[str, Any]] = []
    replies: dict[str, list[dict[str, Any]]] = {}
    for where, msg in records:
        counts.records += 1
        if not _require_text(msg, where, bad):
            continue
        if msg.get("parent_id") is None:
            if msg.get("role") == "prompter":
                roots.append(msg)
        elif msg.get("rank") == 0:
            replies.setdefault(msg["parent_id"], []).append(msg)
    for root in roots:
        pair = _first_turn(root, replies.get(root["message_id"], []), root.get("message_tree_id"), spec, counts)
        if pair:
            yield pair


def _tree_pairs(records: Iterable[tuple[str, dict]], spec: SeedSpec, counts: SeedCounts,
                bad: BadRecords) -> Iterator[dict[str, Any]]:
    for where, tree in records:
        counts.records += 1
        prompt = tree.get("prompt")
        if not isinstance(prompt, dict):
            bad.add(where, "field 'prompt' is missing or not an object (expected an oasst message tree)")
            continue
        if not _require_text(prompt, where, bad):
            continue
        replies = [r for r in prompt.get("replies") or [] if isinstance(r, dict) and _require_text(r, where, bad)]
        pair = _first_turn(prompt, replies, tree.get("message_tree_id"), spec, counts)
        if pair:
            yield pair


def _ready_pairs(records: Iterable[tuple[str, dict]], spec: SeedSpec, counts: SeedCounts,
                 bad: BadRecords) -> Iterator[dict[str, Any]]:
    f = spec.fields
    for n, (where, rec) in enumerate(records):
        counts.records += 1
        values = {}
        for role, key in (("instruction", f.instruction), ("response", f.response)):
            value = rec.get(key)
            if not isinstance(value, str):
                bad.add(where, f"field '{key}' ({role}) is missing, null or not a string")
                break
            values[role] = value
        else:
            rid = rec.get(f.id) if f.id else None
            if f.id and rid is None:
                bad.add(where, f"field '{f.id}' (id) is missing or null")
                continue
            yield {"id": str(rid) if rid is not None else f"seed-{n}", **values}


_READERS = {"oasst1": _oasst1_pairs, "oasst1-trees": _tree_pairs, "pairs": _ready_pairs}


def prepare_seed(records: Iterable[tuple[str, dict]], spec: SeedSpec, bad: BadRecords,
                 counts: SeedCounts | None = None) -> Iterator[dict[str, Any]]:
    """Seed pairs in input order, filtered and capped; `counts` says what each step dropped."""
    counts = counts if counts is not None else SeedCounts()
    for pair in _READERS[spec.format](records, spec, counts, bad):
        if not pair["instruction"].strip() or not pair["response"].strip():
            counts.dropped_empty += 1
            continue
        if spec.min_quality is not None and any(
            q is not None and q < spec.min_quality
            for q in (pair.get("instruction_quality"), pair.get("response_quality"))
        ):
            counts.dropped_quality += 1
            continue
        if spec.max_examples is not None and counts.pairs >= spec.max_examples:
            counts.dropped_over_cap += 1
            continue
        counts.pairs += 1
        yield pair
