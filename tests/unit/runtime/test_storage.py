"""The artifact store behaves the same on a local folder and on S3 (a moto server on loopback)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from humpback_runtime.storage import (
    SUCCESS,
    LocalStore,
    ObjectNotFound,
    S3Store,
    ShardWriter,
    StorageError,
    iter_shard_records,
    list_shards,
    open_store,
    read_success,
    write_success,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket}/root/", endpoint_url=endpoint)  # under a prefix, to test the mapping


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- basic operations ---------------------------------------------------------------------------

def test_write_then_read_bytes_text_and_json(store):
    store.write_bytes("a/b.bin", b"\x00\x01")
    store.write_text("a/c.txt", "héllo")
    store.write_json("d.json", {"z": 1, "a": ["ü"]})

    assert store.read_bytes("a/b.bin") == b"\x00\x01"
    assert store.read_text("a/c.txt") == "héllo"
    assert store.read_json("d.json") == {"z": 1, "a": ["ü"]}
    assert store.read_text("d.json") == '{\n  "a": [\n    "ü"\n  ],\n  "z": 1\n}\n'  # indent=2, sort_keys


def test_overwrite_replaces_the_object(store):
    store.write_text("k.txt", "old")
    store.write_text("k.txt", "new")
    assert store.read_text("k.txt") == "new"


def test_reading_a_missing_key_raises_object_not_found_naming_it(store):
    with pytest.raises(ObjectNotFound, match="nope/x.json"):
        store.read_bytes("nope/x.json")
    with pytest.raises(ObjectNotFound):
        list(store.open_lines("nope/x.jsonl"))


def test_read_json_of_invalid_json_raises_storage_error_naming_the_key(store):
    store.write_text("bad.json", "{not json")
    with pytest.raises(StorageError, match="bad.json.*not valid JSON"):
        store.read_json("bad.json")


def test_exists_and_delete(store):
    store.write_text("x/y.txt", "1")
    assert store.exists("x/y.txt")
    assert not store.exists("x/y")  # a key is not its own prefix
    assert not store.exists("x")
    store.delete("x/y.txt")
    assert not store.exists("x/y.txt")
    store.delete("x/y.txt")  # deleting a missing key is fine


def test_list_is_recursive_sorted_and_relative_to_the_root(store):
    for key in ["b/2.txt", "a/1.txt", "b/sub/3.txt", "bb/4.txt", "top.txt"]:
        store.write_text(key, key)

    assert store.list() == ["a/1.txt", "b/2.txt", "b/sub/3.txt", "bb/4.txt", "top.txt"]
    assert store.list("b") == ["b/2.txt", "b/sub/3.txt"]  # a folder, so "bb/" is not under "b"
    assert store.list("b/") == ["b/2.txt", "b/sub/3.txt"]
    assert store.list("missing") == []


def test_delete_prefix_removes_everything_under_it_and_counts(store):
    for key in ["p/1", "p/q/2", "p/q/3", "pp/4"]:
        store.write_text(key, "x")
    assert store.delete_prefix("p/") == 3
    assert store.list() == ["pp/4"]
    assert store.delete_prefix("p") == 0


def test_open_lines_streams_raw_lines_without_line_endings(store):
    store.write_bytes("l.jsonl", b'{"a": 1}\r\n\n{"b": "\xc3\xbc"}\n{"c": 3}')
    lines = store.open_lines("l.jsonl")
    assert not isinstance(lines, list)
    assert list(lines) == [b'{"a": 1}', b"", b'{"b": "\xc3\xbc"}', b'{"c": 3}']


def test_upload_and_download_files(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.upload_file(src, "files/blob.bin")
    dest = tmp_path / "out" / "blob.bin"
    store.download_file("files/blob.bin", dest)

    assert dest.read_bytes() == src.read_bytes()
    assert os.listdir(dest.parent) == ["blob.bin"]  # the temporary file was renamed, not left
    with pytest.raises(ObjectNotFound):
        store.download_file("files/missing.bin", tmp_path / "out" / "missing.bin")
    assert not (tmp_path / "out" / "missing.bin").exists()
    assert os.listdir(dest.parent) == ["blob.bin"]


def test_url_names_the_full_uri_of_a_key(store):
    assert store.url("ns/run/x.json") == f"{store.uri}/ns/run/x.json"
    assert not store.uri.endswith("/")


def test_local_path_only_for_local_stores(store):
    path = store.local_path("a/b.txt")
    if isinstance(store, LocalStore):
        assert path == Path(store.uri) / "a" / "b.txt"
    else:
        assert path is None


@pytest.mark.parametrize("key", ["../escape.txt", "/etc/passwd", "a/../../x", "a//b", "./a", "", "a/.."])
def test_keys_escaping_the_root_are_rejected(store, key):
    with pytest.raises(StorageError, match="invalid key"):
        store.write_bytes(key, b"x")
    with pytest.raises(StorageError, match="invalid key"):
        store.read_bytes(key)


def test_list_never_shows_temporary_files(store):
    store.write_text("s/a.txt", "a")
    store.write_json("s/b.json", {})
    if isinstance(store, LocalStore):  # what a writer killed mid-write leaves behind
        (Path(store.uri) / "s" / ".tmp-abc123").write_text("half")
    assert store.list() == ["s/a.txt", "s/b.json"]


# --- atomic local writes --------------------------------------------------------------------------

def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    store = open_store(str(tmp_path))
    store.write_text("k.txt", "old")

    def broken_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="k.txt.*I/O error"):
        store.write_text("k.txt", "new")
    monkeypatch.undo()

    assert store.read_text("k.txt") == "old"
    assert os.listdir(tmp_path) == ["k.txt"]


def test_open_store_accepts_paths_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store("rel/dir").uri == str(tmp_path / "rel" / "dir")
    assert open_store(f"file://{tmp_path}/x/").uri == str(tmp_path / "x")
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")


# --- stage manifests --------------------------------------------------------------------------------

def test_success_manifest_round_trip(store):
    assert read_success(store, "ns/run/stage") is None
    write_success(store, "ns/run/stage", {"fingerprint": "abc", "counts": {"n": 3}})
    assert store.exists(f"ns/run/stage/{SUCCESS}")
    assert read_success(store, "ns/run/stage") == {"fingerprint": "abc", "counts": {"n": 3}}
    assert read_success(store, "ns/run/stage/") == {"fingerprint": "abc", "counts": {"n": 3}}


@pytest.mark.parametrize("content", [b'{"fingerprint": "ab', b"\xff\xfe", b"[1, 2]"])
def test_corrupt_success_manifest_reads_as_not_finished(store, caplog, content):
    store.write_bytes(f"ns/run/stage/{SUCCESS}", content)
    with caplog.at_level(logging.WARNING, logger="humpback_runtime.storage"):
        assert read_success(store, "ns/run/stage") is None
    assert SUCCESS in caplog.text


# --- shards -----------------------------------------------------------------------------------------

RECORDS = [{"id": i, "text": f"record {i} — ü", "score": i / 2, "tags": ["a", "b"][: i % 3]} for i in range(8)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shard_writer_round_trip_over_several_shards(store, fmt):
    with ShardWriter(store, "ns/run/stage", fmt=fmt, records_per_shard=3) as writer:
        for record in RECORDS:
            writer.write(record)

    expected = [f"ns/run/stage/part-0000{i}.{fmt}" for i in range(3)]
    assert writer.shards == expected
    assert writer.count == 8
    assert list_shards(store, "ns/run/stage") == expected
    assert list(iter_shard_records(store, expected)) == RECORDS


def test_jsonl_shards_are_one_json_object_per_line(store):
    with ShardWriter(store, "s", records_per_shard=10) as writer:
        writer.write({"text": "ü"})
        writer.write({"text": "two\nlines"})
    assert store.read_bytes("s/part-00000.jsonl") == '{"text": "ü"}\n{"text": "two\\nlines"}\n'.encode()


def test_shard_writer_numbers_from_start_index_and_close_returns_keys(store):
    writer = ShardWriter(store, "s", records_per_shard=2, start_index=7)
    for record in RECORDS[:3]:
        writer.write(record)
    assert writer.shards == ["s/part-00007.jsonl"]  # a full shard is uploaded at once
    assert writer.close() == ["s/part-00007.jsonl", "s/part-00008.jsonl"]
    with pytest.raises(StorageError, match="closed"):
        writer.write({})


def test_shard_writer_drops_the_unfinished_shard_on_error(store):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(store, "s", records_per_shard=2) as writer:
            for record in RECORDS[:3]:
                writer.write(record)
            raise RuntimeError("boom")
    assert store.list("s") == ["s/part-00000.jsonl"]


def test_shard_writer_with_no_records_writes_nothing(store):
    with ShardWriter(store, "s") as writer:
        pass
    assert writer.shards == [] and store.list() == []


def test_list_shards_ignores_other_files_and_subfolders(store):
    for key in ["s/part-00001.jsonl", "s/part-00000.parquet", f"s/{SUCCESS}", "s/stats.json",
                "s/sub/part-00002.jsonl", "s/other-00003.jsonl"]:
        store.write_text(key, "")
    assert list_shards(store, "s") == ["s/part-00000.parquet", "s/part-00001.jsonl"]


def test_iter_shard_records_streams_shard_by_shard(store):
    with ShardWriter(store, "s", records_per_shard=4) as writer:
        for record in RECORDS:
            writer.write(record)
    records = iter_shard_records(store, iter([writer.shards[0], "s/part-00099.jsonl"]))
    # The first shard is read before the second (missing) key is even looked at.
    assert [next(records) for _ in range(4)] == RECORDS[:4]
    with pytest.raises(ObjectNotFound, match="part-00099"):
        next(records)


def test_iter_shard_records_streams_parquet_row_groups(tmp_path):
    import pyarrow.parquet as pq

    store = open_store(str(tmp_path))
    many = [{"id": i} for i in range(25_000)]
    with ShardWriter(store, "s", fmt="parquet", records_per_shard=len(many)) as writer:
        for record in many:
            writer.write(record)
    assert pq.ParquetFile(store.local_path(writer.shards[0])).num_row_groups == 3
    assert list(iter_shard_records(store, writer.shards)) == many


def test_corrupt_jsonl_shard_names_key_and_line(store):
    store.write_bytes("s/part-00000.jsonl", b'{"a": 1}\n{oops\n')
    with pytest.raises(StorageError, match=r"part-00000.jsonl:2: corrupt shard"):
        list(iter_shard_records(store, ["s/part-00000.jsonl"]))


# --- S3 only --------------------------------------------------------------------------------------

def test_large_upload_is_multipart_and_round_trips(s3_server, s3_client, s3_bucket, tmp_path):
    store = open_store(s3_bucket, endpoint_url=s3_server, multipart_threshold=5 * 2**20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 2**20))
    store.upload_file(src, "models/big.bin")

    head = s3_client.head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="models/big.bin")
    assert "-" in head["ETag"]  # a multipart upload's ETag is "<md5 of part md5s>-<parts>"
    assert head["ContentLength"] == src.stat().st_size
    store.download_file("models/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_small_upload_is_a_single_put(s3_server, s3_client, s3_bucket, tmp_path):
    store = open_store(s3_bucket, endpoint_url=s3_server, multipart_threshold=5 * 2**20)
    (tmp_path / "small.bin").write_bytes(b"x" * 1000)
    store.upload_file(tmp_path / "small.bin", "small.bin")
    head = s3_client.head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="small.bin")
    assert "-" not in head["ETag"]


def test_unreachable_endpoint_gives_a_storage_error_quickly(aws_env):
    pytest.importorskip("boto3")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = open_store("s3://some-bucket/runs", endpoint_url=endpoint, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.read_bytes("ns/run/x.json")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "s3://some-bucket/runs/ns/run/x.json" in message
    assert endpoint in message and "gave up after 2 attempts" in message
    with pytest.raises(StorageError, match="gave up after 2 attempts"):
        read_success(store, "ns/run/stage")  # an outage is not "stage not finished"


def test_missing_bucket_gives_a_storage_error_naming_it(s3_server, tmp_path):
    store = open_store("s3://no-such-bucket/runs", endpoint_url=s3_server)
    (tmp_path / "f").write_bytes(b"x")
    for op in [lambda: store.read_bytes("k"), lambda: store.write_bytes("k", b"x"), lambda: store.list(),
               lambda: store.exists("k"), lambda: store.upload_file(tmp_path / "f", "k"),
               lambda: store.download_file("k", tmp_path / "g"), lambda: read_success(store, "s")]:
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
            op()
        assert not isinstance(info.value, ObjectNotFound)
        assert s3_server in str(info.value)


def test_s3_uri_is_normalised(s3_server):
    store = open_store("s3://bucket/a/b/", endpoint_url=s3_server)
    assert isinstance(store, S3Store)
    assert store.uri == "s3://bucket/a/b"
    assert store.url("c.json") == "s3://bucket/a/b/c.json"
    with pytest.raises(StorageError, match="invalid S3 URI"):
        open_store("s3:///key")


def test_s3_list_does_not_show_objects_outside_the_root(s3_server, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="rootx/other", Body=b"x")
    store = open_store(f"{s3_bucket}/root", endpoint_url=s3_server)
    store.write_text("mine", "x")
    assert store.list() == ["mine"]


def test_local_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from humpback_runtime.storage import open_store

    store = open_store(str(tmp_path))
    store.write_text("a/report.html", "<html></html>")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a" / "report.html").stat().st_mode) == 0o666 & ~mask


def test_shard_temp_files_live_in_a_per_process_folder_and_dead_processes_folders_are_swept(tmp_path, monkeypatch):
    import subprocess
    import sys

    import humpback_runtime.storage as storage

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(storage.tempfile, "tempdir", None)
    monkeypatch.setattr(storage, "_scratch_dir", None)
    store = storage.open_store(str(tmp_path / "store"))
    writer = storage.ShardWriter(store, "p", records_per_shard=10)
    writer.write({"id": 1})
    mine = storage.shard_scratch_dir()
    assert mine.parent == tmp_path and list(mine.iterdir())  # the open shard
    writer.close()
    assert not list(mine.iterdir())
    # A process killed mid-shard leaves its folder; the next stage on this host removes it.
    code = ("import os, humpback_runtime.storage as s; w = s.ShardWriter(s.open_store(%r), 'p'); "
            "w.write({'id': 1}); os._exit(0)") % str(tmp_path / "store")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    dead = [d for d in tmp_path.glob("humpback-shards-*") if d != mine]
    assert len(dead) == 1 and list(dead[0].iterdir())
    assert storage.sweep_shard_scratch() == 1
    assert not dead[0].exists() and mine.exists()
