"""Read the input records of the data stages from files, S3 or the Hugging Face Hub.

    bad = BadRecords("skip", label="corpus")
    for where, record in iter_source_records("data/c4_sample.jsonl", bad=bad):
        ...                       # where = "data/c4_sample.jsonl:17"
    manifest["badRecords"] = bad.summary()

Sources: a `.jsonl` / `.json` / `.jsonl.gz` / `.json.gz` / `.parquet` file (plain path or
`file://`), a folder (every such file inside, recursively, sorted), a glob pattern, an
`s3://bucket/key` object or `s3://bucket/prefix/` (every such object under it), or
`hf://owner/name` (a Hub dataset, streamed). A malformed record is reported as "FILE:LINE: reason"
and, by policy, skipped or fatal; nothing is silently dropped except blank lines.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import unquote, urlparse

from humpback_runtime.storage import ObjectNotFound, StorageError, Store, iter_stream_lines, open_store

__all__ = ["BadRecords", "DataError", "iter_source_records"]

log = logging.getLogger(__name__)

_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
_LOGGED_INDIVIDUALLY = 20


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line (or field)."""


class BadRecords:
    """Counts bad input records; `policy="fail"` raises on the first, `"skip"` logs and goes on."""

    def __init__(self, policy: Literal["skip", "fail"], *, label: str, max_examples_kept: int = 20):
        if policy not in ("skip", "fail"):
            raise ValueError(f"policy: expected 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self.label = label
        self.max_examples_kept = max_examples_kept
        self.count = 0
        self.examples: list[str] = []

    def add(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.policy == "fail":
            raise DataError(message)
        self.count += 1
        if len(self.examples) < self.max_examples_kept:
            self.examples.append(message)
        if self.count <= _LOGGED_INDIVIDUALLY:
            log.warning("Skipped bad %s record %s", self.label, message)
        elif self.count == _LOGGED_INDIVIDUALLY + 1:
            log.warning("More than %d bad %s records; counting the rest without logging each",
                        _LOGGED_INDIVIDUALLY, self.label)

    def summary(self) -> dict[str, Any]:
        """For the stage manifest: {"count": n, "examples": ["FILE:LINE: reason", ...]}."""
        return {"count": self.count, "examples": list(self.examples)}

    def log_summary(self) -> None:
        if self.count:
            log.warning("Skipped %d bad %s record(s) in all", self.count, self.label)


def iter_source_records(source: str, *, bad: BadRecords, split: str = "train",
                        endpoint_url: str | None = None, region: str | None = None
                        ) -> Iterator[tuple[str, dict]]:
    """Yield `(where, record)` for every JSON object in `source`; see the module docstring."""
    if source.startswith("hf://"):
        yield from _iter_hub(source, split)
    elif source.startswith("s3://"):
        store, keys = _s3_keys(source, endpoint_url=endpoint_url, region=region)
        for key in keys:
            yield from _iter_object(store, key, bad)
    elif "://" in source and not source.startswith("file://"):
        raise DataError(f"unsupported source {source!r}: expected a path, file://, s3:// or hf://")
    else:
        for path in _local_files(source):
            yield from _iter_local(path, bad)


# --- where the files are ------------------------------------------------------------------------

def _supported(name: str) -> bool:
    return name.endswith(_EXTS) and not os.path.basename(name).startswith(".")


def _local_files(source: str) -> list[Path]:
    if source.startswith("file://"):
        source = unquote(urlparse(source).path)
    if glob.has_magic(source):
        files = [Path(p) for p in sorted(glob.glob(source, recursive=True)) if _supported(p) and os.path.isfile(p)]
    elif os.path.isdir(source):
        files = sorted(p for p in Path(source).rglob("*") if p.is_file() and _supported(p.name))
    elif os.path.isfile(source):
        if not source.endswith(_EXTS):
            raise DataError(f"{source}: unsupported file type (expected one of {', '.join(_EXTS)})")
        return [Path(source)]
    else:
        raise DataError(f"input file not found: {source}")
    if not files:
        raise DataError(f"no input files found at {source} (looked for {', '.join(_EXTS)})")
    return files


def _s3_keys(source: str, *, endpoint_url: str | None, region: str | None) -> tuple[Store, list[str]]:
    parsed = urlparse(source)
    store = open_store(f"s3://{parsed.netloc}", endpoint_url=endpoint_url, region=region)
    key = parsed.path.lstrip("/")
    try:
        if key and not key.endswith("/") and store.exists(key):
            if not key.endswith(_EXTS):
                raise DataError(f"{source}: unsupported file type (expected one of {', '.join(_EXTS)})")
            return store, [key]
        keys = [k for k in store.list(key) if _supported(k.rsplit("/", 1)[-1])]
    except StorageError as e:
        raise DataError(f"cannot read {source}: {e}") from e
    if not keys:
        raise DataError(f"no input files found at {source} (looked for {', '.join(_EXTS)})")
    return store, keys


# --- reading one file ---------------------------------------------------------------------------

def _iter_local(path: Path, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    where = str(path)
    if where.endswith(".parquet"):
        yield from _iter_parquet(path, where)
        return
    try:
        with open(path, "rb") as raw:
            yield from _iter_json_stream(raw, where, bad)
    except FileNotFoundError as e:
        raise DataError(f"input file not found: {where}") from e


def _iter_object(store: Store, key: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    where = store.url(key)
    try:
        if key.endswith(".parquet"):
            with tempfile.TemporaryDirectory(prefix="humpback-") as tmp:
                path = Path(tmp) / "input.parquet"  # Parquet needs random access: fetch it first
                store.download_file(key, path)
                yield from _iter_parquet(path, where)
        else:
            with store.open_read(key) as raw:
                yield from _iter_json_stream(raw, where, bad)
    except ObjectNotFound as e:
        raise DataError(f"input file not found: {where}") from e


def _iter_json_stream(raw: IO[bytes], where: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if where.endswith(".gz") else raw
    try:
        lines = iter_stream_lines(stream)
        first = next(lines, None)
        if first is None:
            return
        first = first.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        if where.endswith((".json", ".json.gz")) and first.lstrip().startswith(b"["):
            # A .json file holding one array of objects rather than JSON lines.
            yield from _iter_json_array(b"\n".join([first, *lines]), where, bad)
            return
        yield from _parse_line(first, f"{where}:1", bad)
        for lineno, line in enumerate(lines, 2):
            yield from _parse_line(line, f"{where}:{lineno}", bad)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{where}: cannot read: {e}") from e


def _parse_line(line: bytes, where: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    if not line.strip():
        return
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add(where, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        bad.add(where, f"not valid JSON: {e}")
        return
    if not isinstance(value, dict):
        bad.add(where, f"expected a JSON object, got {_type_name(value)}")
        return
    yield where, value


def _iter_json_array(data: bytes, where: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not a valid JSON array: {e}") from e
    for i, value in enumerate(items):
        if isinstance(value, dict):
            yield f"{where}:item {i}", value
        else:
            bad.add(f"{where}:item {i}", f"expected a JSON object, got {_type_name(value)}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _iter_parquet(path: Path, where: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{where}:row {row}", record
                row += 1
    except FileNotFoundError as e:
        raise DataError(f"input file not found: {where}") from e
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{where}: not a readable Parquet file: {e}") from e


# --- the Hugging Face Hub -----------------------------------------------------------------------

def _iter_hub(source: str, split: str) -> Iterator[tuple[str, dict]]:
    name = source.removeprefix("hf://").strip("/")
    if not name:
        raise DataError(f"invalid source {source!r}: expected hf://OWNER/NAME")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading {source} needs the datasets library (pip install 'humpback[hub]')") from e
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except FileNotFoundError as e:  # includes datasets' DatasetNotFoundError
        raise DataError(f"cannot load {source} (split {split!r}): {e}") from e
    except ValueError as e:  # e.g. an unknown split
        raise DataError(f"cannot load {source} (split {split!r}): {e}") from e
    for row, record in enumerate(dataset):
        yield f"{source}[{split}]:row {row}", dict(record)
