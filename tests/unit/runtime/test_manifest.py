"""What a manifest vouches for (every output object: size, checksum, records) and checking it."""

from __future__ import annotations

import hashlib

import pytest

from humpback_runtime.manifest import describe_outputs, verify_outputs
from humpback_runtime.storage import (
    ShardMismatch,
    ShardWriter,
    iter_shard_records,
    open_store,
)

PREFIX = "ns/run/prepare-corpus"


def _stage(store):
    with ShardWriter(store, PREFIX, records_per_shard=3) as writer:
        for i in range(7):
            writer.write({"id": i, "text": f"segment {i}"})
    store.write_json(f"{PREFIX}/stats.json", {"n": 7})
    for control in ("_ATTEMPT.json", "_LEASE.json", "_tmp/upload.part"):
        store.write_text(f"{PREFIX}/{control}", "{}")
    return {"fingerprint": "f", "objects": describe_outputs(store, PREFIX)}


def test_manifest_lists_every_output_with_size_checksum_and_records(store):
    objects = _stage(store)["objects"]
    assert sorted(objects) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl", "stats.json"]
    data = store.read_bytes(f"{PREFIX}/part-00001.jsonl")
    assert objects["part-00001.jsonl"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                           "records": 3}
    assert objects["part-00002.jsonl"]["records"] == 1 and "records" not in objects["stats.json"]
    # The same from a process that did not write them (digests read back from the store).
    fresh = open_store(store.uri, endpoint_url=getattr(store, "endpoint", None))
    assert describe_outputs(fresh, PREFIX) == objects


def test_a_shard_cut_at_a_line_boundary_or_deleted_is_named(store):
    manifest = _stage(store)
    assert verify_outputs(store, PREFIX, manifest, checksums=True).ok
    lines = store.read_bytes(f"{PREFIX}/part-00000.jsonl").splitlines(keepends=True)
    store.write_bytes(f"{PREFIX}/part-00000.jsonl", b"".join(lines[:2]))  # one whole record gone
    store.delete(f"{PREFIX}/part-00002.jsonl")
    problems = verify_outputs(store, PREFIX, manifest).problems
    assert problems == [
        f"{store.url(PREFIX + '/part-00000.jsonl')}: {len(b''.join(lines[:2]))} bytes, the manifest says "
        f"{len(b''.join(lines))}",
        f"{store.url(PREFIX + '/part-00002.jsonl')}: missing (the manifest lists "
        f"{manifest['objects']['part-00002.jsonl']['bytes']} bytes)",
    ]


def test_a_changed_byte_is_caught_by_checksums_and_while_reading(store):
    manifest = _stage(store)
    key = f"{PREFIX}/part-00001.jsonl"
    store.write_bytes(key, store.read_bytes(key).replace(b"segment 4", b"segment X"))
    assert verify_outputs(store, PREFIX, manifest).ok  # the same size: only a checksum sees it
    (problem,) = verify_outputs(store, PREFIX, manifest, checksums=True).problems
    assert problem.startswith(f"{store.url(key)}: sha256 ")
    expected = {f"{PREFIX}/{k}": v for k, v in manifest["objects"].items()}
    keys = [f"{PREFIX}/part-0000{i}.jsonl" for i in range(3)]
    with pytest.raises(ShardMismatch, match="part-00001.jsonl: sha256") as e:
        list(iter_shard_records(store, keys, expected=expected))
    assert e.value.key == key


def test_a_manifest_from_before_objects_still_counts_and_checks_its_shards(store):
    _stage(store)
    old = {"fingerprint": "f", "outputs": {"records": [f"{PREFIX}/part-00000.jsonl"], "count": 3}}
    result = verify_outputs(store, PREFIX, old)
    assert result.ok and not result.verifiable
    store.delete(f"{PREFIX}/part-00000.jsonl")
    assert verify_outputs(store, PREFIX, old).problems == [
        f"{store.url(PREFIX + '/part-00000.jsonl')}: missing (listed in the manifest)"]
