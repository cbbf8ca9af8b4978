"""prepare-seed on the shipped oasst1 samples, in all three input formats."""

import json
from pathlib import Path

import pytest

from humpback_runtime.seed import SeedCounts, prepare_seed
from humpback_runtime.sources import BadRecords, DataError, iter_source_records
from humpback_runtime.spec import SeedSpec

DATA = Path(__file__).resolve().parents[3] / "examples" / "data"
PAIR_KEYS = ("prompt_message_id", "response_message_id", "instruction", "response",
             "message_tree_id", "response_rank", "instruction_quality", "response_quality")


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def records(rows):
    return [(f"mem:{i + 1}", r) for i, r in enumerate(rows)]


def seed(spec: SeedSpec, rows, counts=None, policy="skip"):
    bad = BadRecords(policy, label="seed")
    return list(prepare_seed(records(rows), spec, bad, counts)), bad


def to_trees(messages):
    """The flat oasst1 table nested into oasst trees (the *.trees.jsonl export shape)."""
    by_id = {m["message_id"]: {**m, "replies": []} for m in messages}
    trees = []
    for m in messages:
        node = by_id[m["message_id"]]
        if m["parent_id"] is None:
            trees.append({"message_tree_id": m["message_tree_id"], "tree_state": m["tree_state"], "prompt": node})
        elif m["parent_id"] in by_id:
            by_id[m["parent_id"]]["replies"].append(node)
    return trees


def test_oasst1_flat_table_yields_exactly_the_reference_pairs():
    expected = read(DATA / "oasst1_pairs.jsonl")
    counts = SeedCounts()
    pairs, bad = seed(SeedSpec(source="x", format="oasst1"), read(DATA / "oasst1_sample.jsonl"), counts)
    assert len(pairs) == 186
    assert [tuple(p[k] for k in PAIR_KEYS) for p in pairs] == [tuple(e[k] for k in PAIR_KEYS) for e in expected]
    assert counts.records == 2022 and counts.roots == 188 and counts.pairs == 186
    assert counts.dropped_no_reply == 2 and bad.count == 0


def test_trees_format_gives_the_same_pairs():
    messages = read(DATA / "oasst1_sample.jsonl")
    flat, _ = seed(SeedSpec(source="x", format="oasst1"), messages)
    nested, _ = seed(SeedSpec(source="x", format="oasst1-trees"), to_trees(messages))
    assert nested == flat


def test_shipped_trees_sample_drops_synthetic_messages():
    counts = SeedCounts()
    pairs, bad = seed(SeedSpec(source="x", format="oasst1-trees"), read(DATA / "oasst_trees_sample.jsonl"), counts)
    assert counts.records == 100 and bad.count == 0
    assert counts.dropped_synthetic > 0
    assert counts.pairs == len(pairs) == 100 - counts.dropped_synthetic - counts.dropped_no_reply - counts.dropped_deleted - counts.dropped_lang
    assert all(p["response_rank"] == 0 for p in pairs)


def test_cap_keeps_the_first_pairs_and_counts_the_rest():
    counts = SeedCounts()
    pairs, _ = seed(SeedSpec(source="x", max_examples=10), read(DATA / "oasst1_sample.jsonl"), counts)
    assert len(pairs) == 10 and counts.dropped_over_cap == 176
    assert pairs[0]["instruction"] == "What do you think about ChatGPT?"


def test_quality_filter_drops_low_rated_pairs_and_keeps_unlabelled_ones():
    reference = read(DATA / "oasst1_pairs.jsonl")
    expected = [p for p in reference if all(q is None or q >= 0.5 for q in (p["instruction_quality"], p["response_quality"]))]
    counts = SeedCounts()
    pairs, _ = seed(SeedSpec(source="x", min_quality=0.5), read(DATA / "oasst1_sample.jsonl"), counts)
    assert [p["prompt_message_id"] for p in pairs] == [p["prompt_message_id"] for p in expected]
    assert 0 < counts.dropped_quality == 186 - len(expected)


def test_language_deleted_and_synthetic_filters():
    root = {"message_id": "r", "parent_id": None, "role": "prompter", "text": "Hi?", "lang": "en",
            "deleted": False, "synthetic": False, "message_tree_id": "r"}
    reply = {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "Hello.", "lang": "en",
             "deleted": False, "synthetic": False, "rank": 0}
    spec = SeedSpec(source="x")
    assert len(seed(spec, [root, reply])[0]) == 1
    for field, value, counter in [("lang", "de", "dropped_lang"), ("deleted", True, "dropped_deleted"),
                                  ("synthetic", True, "dropped_synthetic")]:
        counts = SeedCounts()
        assert seed(spec, [{**root, field: value}, reply], counts)[0] == []
        assert getattr(counts, counter) == 1
        counts = SeedCounts()
        assert seed(spec, [root, {**reply, field: value}], counts)[0] == []
        assert counts.dropped_no_reply == 1
    # A German seed is a setting away.
    assert len(seed(SeedSpec(source="x", lang="de"), [{**root, "lang": "de"}, {**reply, "lang": "de"}])[0]) == 1


def test_pairs_format_with_custom_fields_and_bad_records(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"q": "What is 2+2?", "a": "4", "key": "k1"}\n'
        '{"q": null, "a": "x", "key": "k2"}\n'
        "{not json\n"
        '{"q": "Name a colour.", "a": "Blue.", "key": "k3"}\n'
    )
    spec = SeedSpec(source=str(path), format="pairs", fields={"instruction": "q", "response": "a", "id": "key"})
    bad = BadRecords("skip", label="seed")
    pairs = list(prepare_seed(iter_source_records(str(path), bad=bad), spec, bad))
    assert pairs == [{"id": "k1", "instruction": "What is 2+2?", "response": "4"},
                     {"id": "k3", "instruction": "Name a colour.", "response": "Blue."}]
    assert bad.count == 2
    assert any(f"{path}:2" in e and "'q'" in e for e in bad.examples)
    assert any(f"{path}:3" in e for e in bad.examples)


def test_fail_policy_stops_at_the_first_bad_record():
    with pytest.raises(DataError, match=r"mem:2: field 'response' \(response\) is missing"):
        seed(SeedSpec(source="x", format="pairs"), [{"instruction": "a", "response": "b", "id": 1},
                                                      {"instruction": "a", "id": 2}], policy="fail")


def test_blank_pairs_are_dropped_and_counted():
    counts = SeedCounts()
    pairs, _ = seed(SeedSpec(source="x", format="pairs", fields={"id": None}),
                    [{"instruction": "  ", "response": "b"}, {"instruction": "a", "response": "b"}], counts)
    assert pairs == [{"id": "seed-1", "instruction": "a", "response": "b"}] and counts.dropped_empty == 1
