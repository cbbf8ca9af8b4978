"""Input records come from files, folders, globs, S3 and the Hub; bad records are named by file and line."""

from __future__ import annotations

import gzip
import json
import logging
import re
import sys

import pytest

from humpback_runtime.sources import BadRecords, DataError, iter_source_records


def _jsonl(path, *records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read(source, policy="skip", **kwargs):
    bad = BadRecords(policy, label="test")
    return list(iter_source_records(str(source), bad=bad, **kwargs)), bad


def _parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# --- one JSONL file -------------------------------------------------------------------------------

def test_jsonl_records_come_with_file_and_line(tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n   \n{"text": "\xc3\xbc"}\r\n{"text": "last"}')
    records, bad = _read(path)
    assert records == [(f"{path}:1", {"text": "a"}), (f"{path}:4", {"text": "ü"}), (f"{path}:5", {"text": "last"})]
    assert bad.count == 0  # blank lines are not bad records


def test_malformed_json_is_skipped_and_reported_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n{"text": "c"}\n')
    with caplog.at_level(logging.WARNING):
        records, bad = _read(path)
    assert [r for _, r in records] == [{"text": "a"}, {"text": "c"}]
    assert bad.count == 1
    assert bad.examples[0].startswith(f"{path}:2: not valid JSON: Expecting value")
    assert f"{path}:2: not valid JSON" in caplog.text


def test_malformed_json_is_fatal_under_the_fail_policy(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: not valid JSON")):
        _read(path, policy="fail")


def test_non_utf8_line_names_the_byte_and_column(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    records, bad = _read(path)
    assert len(records) == 1
    assert bad.summary() == {"count": 1, "examples": [f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14)"]}


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "null")])
def test_json_that_is_not_an_object_is_a_bad_record(tmp_path, line, kind):
    path = tmp_path / "in.jsonl"
    path.write_text(f'{line}\n{{"text": "x"}}\n')
    records, bad = _read(path)
    assert records == [(f"{path}:2", {"text": "x"})]
    assert bad.examples == [f"{path}:1: expected a JSON object, got {kind}"]


def test_gzipped_jsonl_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress('\ufeff{"text": "a"}\n{"text": "b"}\n'.encode()))
    records, _ = _read(path)
    assert records == [(f"{path}:1", {"text": "a"}), (f"{path}:2", {"text": "b"})]


def test_corrupt_gzip_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])  # gzip magic, then cut short
    with pytest.raises(DataError, match="in.jsonl.gz"):
        _read(path)


def test_json_file_holding_an_array(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"a": 1}, 5, {"a": 2}]))
    records, bad = _read(path)
    assert records == [(f"{path}:item 0", {"a": 1}), (f"{path}:item 2", {"a": 2})]
    assert bad.examples == [f"{path}:item 1: expected a JSON object, got int"]


def test_file_uri(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", {"a": 1})
    records, _ = _read(f"file://{path}")
    assert records == [(f"{path}:1", {"a": 1})]


def test_parquet_rows_are_named_by_row(tmp_path):
    path = _parquet(tmp_path / "in.parquet", [{"text": "a", "n": 1}, {"text": "b", "n": 2}])
    records, _ = _read(path)
    assert records == [(f"{path}:row 0", {"text": "a", "n": 1}), (f"{path}:row 1", {"text": "b", "n": 2})]


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "in.parquet"
    path.write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="in.parquet"):
        _read(path)


# --- many files -----------------------------------------------------------------------------------

def test_a_directory_reads_every_data_file_inside_sorted(tmp_path):
    _jsonl(tmp_path / "d" / "b.jsonl", {"f": "b"})
    _jsonl(tmp_path / "d" / "a.jsonl", {"f": "a"})
    _jsonl(tmp_path / "d" / "sub" / "c.jsonl", {"f": "c"})
    _parquet(tmp_path / "d" / "e.parquet", [{"f": "e"}])
    (tmp_path / "d" / "README.md").write_text("not data")
    _jsonl(tmp_path / "d" / ".hidden.jsonl", {"f": "hidden"})
    records, _ = _read(tmp_path / "d")
    assert [r["f"] for _, r in records] == ["a", "b", "e", "c"]


def test_a_glob_reads_the_matching_files(tmp_path):
    for name in ["part-1.jsonl", "part-2.jsonl", "other.jsonl"]:
        _jsonl(tmp_path / name, {"f": name})
    records, _ = _read(tmp_path / "part-*.jsonl")
    assert [r["f"] for _, r in records] == ["part-1.jsonl", "part-2.jsonl"]


@pytest.mark.parametrize("source", ["missing.jsonl", "missing-dir/"])
def test_a_missing_source_is_a_data_error_naming_it(tmp_path, source):
    with pytest.raises(DataError, match=re.escape(f"not found: {tmp_path / source}")):
        _read(f"{tmp_path}/{source}")


def test_a_source_matching_no_files_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(f"no input files found at {tmp_path / 'empty'}")):
        _read(tmp_path / "empty")
    with pytest.raises(DataError, match="no input files found at"):
        _read(tmp_path / "*.jsonl")


def test_a_file_of_an_unknown_type_is_a_data_error(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        _read(tmp_path / "data.csv")


def test_an_unknown_scheme_is_a_data_error():
    with pytest.raises(DataError, match="unsupported source"):
        _read("gs://bucket/x.jsonl")


def test_an_empty_file_yields_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert _read(tmp_path / "empty.jsonl")[0] == []


# --- S3 -------------------------------------------------------------------------------------------

def test_an_s3_prefix_reads_every_data_object_under_it(s3_server, s3_client, s3_bucket, tmp_path):
    bucket = s3_bucket.removeprefix("s3://")
    s3_client.put_object(Bucket=bucket, Key="in/b.jsonl", Body=b'{"f": "b"}\n{bad\n')
    s3_client.put_object(Bucket=bucket, Key="in/a.jsonl.gz", Body=gzip.compress(b'{"f": "a"}\n'))
    s3_client.put_object(Bucket=bucket, Key="in/c.parquet",
                         Body=_parquet(tmp_path / "c.parquet", [{"f": "c"}]).read_bytes())
    s3_client.put_object(Bucket=bucket, Key="in/notes.txt", Body=b"not data")
    s3_client.put_object(Bucket=bucket, Key="inx/d.jsonl", Body=b'{"f": "d"}\n')

    records, bad = _read(f"{s3_bucket}/in/", endpoint_url=s3_server)
    assert records == [(f"{s3_bucket}/in/a.jsonl.gz:1", {"f": "a"}), (f"{s3_bucket}/in/b.jsonl:1", {"f": "b"}),
                       (f"{s3_bucket}/in/c.parquet:row 0", {"f": "c"})]
    assert bad.examples[0].startswith(f"{s3_bucket}/in/b.jsonl:2: not valid JSON")

    # The same prefix without its slash, and one object by its key.
    assert _read(f"{s3_bucket}/in", endpoint_url=s3_server)[0] == records
    assert _read(f"{s3_bucket}/in/b.jsonl", endpoint_url=s3_server)[0] == [records[1]]


def test_an_empty_s3_prefix_or_missing_bucket_is_a_data_error(s3_server, s3_bucket):
    with pytest.raises(DataError, match=re.escape(f"no input files found at {s3_bucket}/nothing/")):
        _read(f"{s3_bucket}/nothing/", endpoint_url=s3_server)
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        _read("s3://no-such-bucket/in/", endpoint_url=s3_server)


# --- the Hub --------------------------------------------------------------------------------------

def test_hf_source_streams_with_datasets(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    # A local folder named like a Hub id loads offline, through the same load_dataset call.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "owner" / "name" / "train.jsonl", {"text": "a"}, {"text": "b"})
    records, _ = _read("hf://owner/name")
    assert records == [("hf://owner/name[train]:row 0", {"text": "a"}), ("hf://owner/name[train]:row 1", {"text": "b"})]


def test_hf_source_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"humpback\[hub\]"):
        _read("hf://owner/name")


# --- BadRecords -----------------------------------------------------------------------------------

def test_bad_records_logs_the_first_twenty_then_counts(caplog):
    bad = BadRecords("skip", label="corpus", max_examples_kept=5)
    with caplog.at_level(logging.WARNING, logger="humpback_runtime.sources"):
        for i in range(30):
            bad.add(f"f.jsonl:{i}", "broken")
    assert bad.count == 30
    assert bad.summary() == {"count": 30, "examples": [f"f.jsonl:{i}: broken" for i in range(5)]}
    assert len(caplog.records) == 21  # twenty individual lines, then one saying the rest are only counted
    assert "f.jsonl:19: broken" in caplog.text and "f.jsonl:20" not in caplog.text


def test_bad_records_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        BadRecords("ignore", label="x")


# --- bounded memory, compression by magic bytes, streamed arrays (issue 10) ------------------------

def test_a_record_over_max_record_bytes_is_a_counted_bad_record_never_held_in_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "a"}\n')
        f.write(b'{"text": "' + b"x" * (40 * 2**20) + b'"}\n')  # one 40 MiB record
        f.write(b'{"text": "c"}\n')
    tracemalloc.start()
    try:
        records, bad = _read(path, max_record_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r for _, r in records] == [{"text": "a"}, {"text": "c"}]
    assert bad.count == 1 and bad.examples[0].startswith(f"{path}:2: record of {40 * 2**20 + 12} bytes")
    assert "maxRecordBytes" in bad.examples[0]
    assert peak < 8 * 2**20, f"reading held {peak / 2**20:.1f} MiB for a 40 MiB record"


@pytest.mark.parametrize("name, compress", [
    ("in.jsonl.gz", lambda b: gzip.compress(b)),
    ("in.jsonl.zst", lambda b: __import__("zstandard").ZstdCompressor().compress(b)),
    ("mislabelled.jsonl", lambda b: gzip.compress(b)),  # gzip inside a plain name: told by its first bytes
])
def test_gzip_and_zstd_are_told_by_their_magic_bytes(tmp_path, name, compress):
    path = tmp_path / name
    path.write_bytes(compress("".join(json.dumps({"text": f"r{i}"}) + "\n" for i in range(3)).encode()))
    records, bad = _read(path)
    assert [r["text"] for _, r in records] == ["r0", "r1", "r2"] and bad.count == 0


def test_a_json_array_is_streamed_item_by_item(tmp_path):
    path = tmp_path / "pairs.json"
    # Pretty-printed, and broken after the second item: the first two come before the error.
    path.write_text('[\n  {"id": 1},\n  {"id": 2},\n  {"id": oops}\n]\n')
    got = []
    with pytest.raises(DataError, match="not a valid JSON array"):
        for _, record in iter_source_records(str(path), bad=BadRecords("skip", label="t")):
            got.append(record)
    assert got == [{"id": 1}, {"id": 2}]


def test_a_relative_source_is_taken_against_the_base_dir(tmp_path, monkeypatch):
    _jsonl(tmp_path / "runs" / "data" / "in.jsonl", {"text": "a"})
    monkeypatch.chdir(tmp_path)  # not where the file is relative to
    records, _ = _read("data/in.jsonl", base_dir=tmp_path / "runs")
    assert [r for _, r in records] == [{"text": "a"}]


# --- input identity for content fingerprints (issue 10) --------------------------------------------

def test_a_files_identity_follows_its_content_and_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import os

    from humpback_runtime.sources import source_identity

    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "cache"))
    path = _jsonl(tmp_path / "in.jsonl", {"text": "a"})
    first = source_identity(str(path))
    assert first.startswith("sha256:") and source_identity(str(path)) == first
    stat = path.stat()
    path.write_text(path.read_text().replace("a", "b"))  # same size...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and mtime: the cached hash answers
    assert source_identity(str(path)) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert source_identity(str(path)) != first
    folder = source_identity(str(tmp_path), base_dir=None)
    _jsonl(tmp_path / "more.jsonl", {"text": "c"})
    assert source_identity(str(tmp_path)) != folder  # a folder: every input file in it


def test_an_s3_objects_identity_is_its_etag(s3_server, s3_client, s3_bucket):
    from humpback_runtime.sources import source_identity

    bucket = s3_bucket.removeprefix("s3://")
    s3_client.put_object(Bucket=bucket, Key="in/a.jsonl", Body=b'{"text": "a"}\n')
    first = source_identity(f"{s3_bucket}/in/", endpoint_url=s3_server)
    assert first and source_identity(f"{s3_bucket}/in/", endpoint_url=s3_server) == first
    s3_client.put_object(Bucket=bucket, Key="in/a.jsonl", Body=b'{"text": "b"}\n')
    assert source_identity(f"{s3_bucket}/in/", endpoint_url=s3_server) != first
