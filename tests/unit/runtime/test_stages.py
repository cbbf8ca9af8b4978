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


def test_a_new_attempt_removes_what_a_killed_one_left_half_written_and_keeps_the_lease(tmp_path):
    store = open_store(str(tmp_path))
    _claim_prefix(store, "ns/run/train-m0", "fp1", resumable=True)
    store.write_text("ns/run/train-m0/checkpoints/step-10/model.safetensors", "weights")
    store.write_text("ns/run/train-m0/_LEASE.json", "{}")
    # An upload killed half-way: in _tmp/ now, `.tmp-*` beside the object in older versions.
    (tmp_path / "ns/run/train-m0/_tmp").mkdir()
    (tmp_path / "ns/run/train-m0/_tmp/.tmp-abc").write_text("half an optimizer state")
    (tmp_path / "ns/run/train-m0/checkpoints/step-10/.tmp-xyz").write_text("half a file")
    assert _claim_prefix(store, "ns/run/train-m0", "fp1", resumable=True) is True
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["ns/run/train-m0/_ATTEMPT.json", "ns/run/train-m0/_LEASE.json",
                    "ns/run/train-m0/checkpoints/step-10/model.safetensors"]
    _claim_prefix(store, "ns/run/train-m0", "fp2", resumable=True)  # another fingerprint: all but the lease go
    assert store.list("ns/run/train-m0") == [f"ns/run/train-m0/{ATTEMPT}", "ns/run/train-m0/_LEASE.json"]


def test_writes_during_a_stage_put_temporary_files_under_its_tmp_prefix(tmp_path, monkeypatch):
    import humpback_runtime.storage as storage

    store = open_store(str(tmp_path))
    store.scratch = "ns/run/augment/_tmp"
    seen = []
    real = storage.tempfile.mkstemp
    monkeypatch.setattr(storage.tempfile, "mkstemp", lambda **kw: seen.append(kw["dir"]) or real(**kw))
    store.write_text("ns/run/augment/part-00000.jsonl", "{}\n")
    assert seen == [tmp_path / "ns/run/augment/_tmp"]
    assert store.list("ns/run/augment") == ["ns/run/augment/part-00000.jsonl"]


def test_a_manifest_from_before_checksums_counts_as_done(tmp_path):
    from humpback_runtime.context import RunContext
    from humpback_runtime.spec import parse_run
    from humpback_runtime.stages import check_inputs

    run = parse_run({"metadata": {"name": "r"}, "spec": {"baseModel": "m", "seed": {"source": "s"},
                                                           "corpus": {"source": "c"}}})
    ctx = RunContext.create(run, str(tmp_path))
    seed = ctx.plan["prepare-seed"]
    ctx.store.write_text(f"{ctx.prefix('prepare-seed')}/part-00000.jsonl", '{"id": 1}\n')
    ctx.store.write_json(f"{ctx.prefix('prepare-seed')}/{SUCCESS}", {  # as humpback 0.x wrote it
        "fingerprint": seed.fingerprint, "outputs": {"records": [f"{ctx.prefix('prepare-seed')}/part-00000.jsonl"],
                                                     "count": 1}})
    assert ctx.is_done(seed)
    check_inputs(ctx, ctx.plan["train-myx"])  # no error: nothing to verify against, nothing missing
    assert [r["id"] for r in ctx.records("prepare-seed")] == [1]
