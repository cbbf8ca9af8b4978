"""The stage entry point's bookkeeping: which partial outputs an attempt keeps or discards."""

from humpback_runtime.stages import ATTEMPT, _claim_prefix
from humpback_runtime.storage import SUCCESS, open_store


def test_resumable_stage_keeps_its_own_partial_work(tmp_path):
    store = open_store(str(tmp_path))
    assert _claim_prefix(store, "ns/run/curate-1", "fp1", resumable=True) is False
    store.write_text("ns/run/curate-1/part-00000.jsonl", '{"id": "a"}\n')
    # The same fingerprint again (a retry after a crash): the finished shard stays.
    assert _claim_prefix(store, "ns/run/curate-1", "fp1", resumable=True) is True
    assert store.exists("ns/run/curate-1/part-00000.jsonl")


def test_a_changed_fingerprint_discards_partial_work(tmp_path):
    store = open_store(str(tmp_path))
    _claim_prefix(store, "ns/run/curate-1", "fp1", resumable=True)
    store.write_text("ns/run/curate-1/part-00000.jsonl", '{"id": "a"}\n')
    assert _claim_prefix(store, "ns/run/curate-1", "fp2", resumable=True) is False
    assert store.list("ns/run/curate-1") == [f"ns/run/curate-1/{ATTEMPT}"]
    assert store.read_json(f"ns/run/curate-1/{ATTEMPT}")["fingerprint"] == "fp2"


def test_non_resumable_stage_always_starts_empty_and_drops_the_old_manifest(tmp_path):
    store = open_store(str(tmp_path))
    _claim_prefix(store, "ns/run/prepare-seed", "fp1", resumable=False)
    store.write_text("ns/run/prepare-seed/part-00000.jsonl", "{}\n")
    store.write_json(f"ns/run/prepare-seed/{SUCCESS}", {"fingerprint": "fp1"})
    assert _claim_prefix(store, "ns/run/prepare-seed", "fp1", resumable=False) is False
    assert store.list("ns/run/prepare-seed") == [f"ns/run/prepare-seed/{ATTEMPT}"]


def test_partial_work_of_unknown_origin_is_discarded(tmp_path):
    store = open_store(str(tmp_path))
    store.write_text("ns/run/augment/part-00000.jsonl", "{}\n")  # no _ATTEMPT.json beside it
    assert _claim_prefix(store, "ns/run/augment", "fp1", resumable=True) is False
    assert not store.exists("ns/run/augment/part-00000.jsonl")


def test_every_planned_stage_has_an_implementation():
    from humpback_runtime.plan import build_plan
    from humpback_runtime.spec import parse_run
    from humpback_runtime.stages import STAGES

    run = parse_run({"metadata": {"name": "r"}, "spec": {
        "baseModel": "m", "seed": {"source": "s"}, "corpus": {"source": "c"},
        "curation": {"rewrite": {"enabled": True}}, "evaluation": {"enabled": True}}})
    assert {s.family for s in build_plan(run).stages} <= set(STAGES)
