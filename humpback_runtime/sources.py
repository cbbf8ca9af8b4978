"""Read the input records of the data stages from files, S3 or the Hugging Face Hub.

    bad = BadRecords("skip", label="corpus")
    for where, record in iter_source_records("data/c4_sample.jsonl", bad=bad):
        ...                       # where = "data/c4_sample.jsonl:17"
    manifest["badRecords"] = bad.summary()

Sources: a `.jsonl` / `.json` file, compressed or not (`.gz`, `.zst`), or a `.parquet` file
(plain path or `file://`), a folder (every such file inside, recursively, sorted), a glob pattern,
an `s3://bucket/key` object or `s3://bucket/prefix/` (every such object under it), or
`hf://owner/name` (a Hub dataset, streamed). A malformed record is reported as "FILE:LINE: reason"
and, by policy, skipped or fatal; nothing is silently dropped except blank lines.

Compression is told by the first bytes (gzip `1f 8b`, zstd `28 b5 2f fd`), not by the name, so a
mislabelled file is read right. Memory stays bounded: lines are streamed, a record longer than
`max_record_bytes` (spec `maxRecordBytes`, 16 MiB) is a counted bad record whose bytes are skipped,
never held, and a `.json` array is parsed item by item (ijson), never loaded whole.

Relative local paths are taken against `base_dir` (the run file's folder, see
:func:`resolve_source`). :func:`source_identity` gives an input's identity for content fingerprints.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import unquote, urlparse

from humpback_runtime.storage import ObjectNotFound, StorageError, Store, open_store

__all__ = ["BadRecords", "DataError", "DEFAULT_MAX_RECORD_BYTES", "bounded_lines", "iter_source_records",
           "resolve_source", "source_identity"]

log = logging.getLogger(__name__)

_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".json.zstd",
         ".parquet")
_JSON_ARRAY_EXTS = (".json", ".json.gz", ".json.zst", ".json.zstd")
_LOGGED_INDIVIDUALLY = 20
DEFAULT_MAX_RECORD_BYTES = 16 * 2**20
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


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
                        endpoint_url: str | None = None, region: str | None = None,
                        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, base_dir: str | Path | None = None,
                        ) -> Iterator[tuple[str, dict]]:
    """Yield `(where, record)` for every JSON object in `source`; see the module docstring."""
    source = resolve_source(source, base_dir)
    if source.startswith("hf://"):
        yield from _iter_hub(source, split)
    elif source.startswith("s3://"):
        store, keys = _s3_keys(source, endpoint_url=endpoint_url, region=region)
        for key in keys:
            yield from _iter_object(store, key, bad, max_record_bytes)
    elif "://" in source and not source.startswith("file://"):
        raise DataError(f"unsupported source {source!r}: expected a path, file://, s3:// or hf://")
    else:
        for path in _local_files(source):
            yield from _iter_local(path, bad, max_record_bytes)


def resolve_source(source: str, base_dir: str | Path | None) -> str:
    """A relative local path taken against `base_dir` (the run file's folder); URIs as they are."""
    if "://" in source:
        return source
    source = os.path.expanduser(source)
    if base_dir is None or os.path.isabs(source):
        return source
    return os.path.normpath(os.path.join(base_dir, source))


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

def _iter_local(path: Path, bad: BadRecords, max_record_bytes: int) -> Iterator[tuple[str, dict]]:
    where = str(path)
    if where.endswith(".parquet"):
        yield from _iter_parquet(path, where)
        return
    try:
        with open(path, "rb") as raw:
            yield from _iter_json_stream(raw, where, bad, max_record_bytes)
    except FileNotFoundError as e:
        raise DataError(f"input file not found: {where}") from e


def _iter_object(store: Store, key: str, bad: BadRecords, max_record_bytes: int) -> Iterator[tuple[str, dict]]:
    where = store.url(key)
    try:
        if key.endswith(".parquet"):
            with tempfile.TemporaryDirectory(prefix="humpback-") as tmp:
                path = Path(tmp) / "input.parquet"  # Parquet needs random access: fetch it first
                store.download_file(key, path)
                yield from _iter_parquet(path, where)
        else:
            with store.open_read(key) as raw:
                yield from _iter_json_stream(raw, where, bad, max_record_bytes)
    except ObjectNotFound as e:
        raise DataError(f"input file not found: {where}") from e


class _Peeked:
    """A binary stream whose first bytes were read ahead (to tell its format), then given back."""

    def __init__(self, raw: IO[bytes], head: bytes):
        self._raw, self._head = raw, head

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._raw.read(n)
        head, self._head = self._head, b""
        if n < 0:
            return head + self._raw.read()
        if len(head) > n:
            head, self._head = head[:n], head[n:]
            return head
        return head + self._raw.read(n - len(head))


def _decompressed(raw: IO[bytes], where: str) -> IO[bytes]:
    """The stream, unwrapped from gzip or zstd when its first bytes say so (whatever its name)."""
    head = raw.read(4)
    stream = _Peeked(raw, head)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=stream)  # type: ignore[arg-type]
    if head.startswith(_ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - a core dependency
            raise ImportError(f"reading {where} (zstd) needs zstandard (pip install zstandard)") from e
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)  # type: ignore[arg-type]
    return stream  # type: ignore[return-value]


def bounded_lines(stream: IO[bytes], max_bytes: int) -> Iterator[bytes | int]:
    """The stream's lines without their line ending, read 1 MiB at a time. A line longer than
    `max_bytes` comes as its length (an int) instead: its bytes are skipped, never held."""
    pending: list[bytes] = []
    size = 0
    skipping = False  # inside a line already over the limit: count it, do not keep it
    while chunk := stream.read(_CHUNK):
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end == -1 else chunk[start:end]
            size += len(piece)
            if not skipping:
                if size > max_bytes:
                    skipping, pending = True, []
                else:
                    pending.append(piece)
            if end == -1:
                break
            yield size if skipping else b"".join(pending).removesuffix(b"\r")
            pending, size, skipping = [], 0, False
            start = end + 1
    if size or pending:
        yield size if skipping else b"".join(pending).removesuffix(b"\r")


def _iter_json_stream(raw: IO[bytes], where: str, bad: BadRecords,
                      max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[str, dict]]:
    try:
        stream = _decompressed(raw, where)
        head = stream.read(64)
        head = head.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        stream = _Peeked(stream, head)
        if where.endswith(_JSON_ARRAY_EXTS) and head.lstrip().startswith(b"["):
            # A .json file holding one array of objects rather than JSON lines: parsed item by item.
            yield from _iter_json_array(stream, where, bad)
            return
        for lineno, line in enumerate(bounded_lines(stream, max_record_bytes), 1):
            yield from _parse_line(line, f"{where}:{lineno}", bad, max_record_bytes)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{where}: cannot read: {e}") from e
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{where}: cannot read: {e}") from e
        raise


def _parse_line(line: bytes | int, where: str, bad: BadRecords, max_record_bytes: int) -> Iterator[tuple[str, dict]]:
    if isinstance(line, int):
        bad.add(where, f"record of {line} bytes is longer than maxRecordBytes ({max_record_bytes}); skipped unread")
        return
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


def _iter_json_array(stream: IO[bytes], where: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    import ijson

    try:
        for i, value in enumerate(ijson.items(stream, "item", use_float=True)):
            if isinstance(value, dict):
                yield f"{where}:item {i}", value
            else:
                bad.add(f"{where}:item {i}", f"expected a JSON object, got {_type_name(value)}")
    except ijson.JSONError as e:
        raise DataError(f"{where}: not a valid JSON array: {e}") from e


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


# --- the identity of an input, for content fingerprints -----------------------------------------

def source_identity(source: str, *, base_dir: str | Path | None = None, endpoint_url: str | None = None,
                    region: str | None = None) -> str | None:
    """What the data of `source` is, as one string that changes when the data does.

    A local file: the SHA-256 of its bytes, cached by (absolute path, size, mtime) so an unchanged
    file is not read again; a folder or glob: those of its input files; `s3://`: each object's ETag
    (and VersionId); `hf://`: the dataset's revision sha. None when it cannot be known here (no Hub
    access, a store that does not answer): the caller then fingerprints by the settings alone.
    """
    resolved = resolve_source(source, base_dir)
    try:
        if resolved.startswith("hf://"):
            return _hub_identity(resolved)
        if resolved.startswith("s3://"):
            return _s3_identity(resolved, endpoint_url=endpoint_url, region=region)
        if "://" in resolved and not resolved.startswith("file://"):
            return None
        files = _local_files(resolved)
        if len(files) == 1 and str(files[0]) == resolved.removeprefix("file://"):
            return _file_identity(files[0])
        return _digest({str(f): _file_identity(f) for f in files})
    except Exception as e:  # no identity is no error: the stage itself reports unreadable inputs
        log.warning("No content identity for input %s (%s): its stage is fingerprinted by its settings alone",
                    source, e)
        return None


def _digest(parts: dict[str, Any]) -> str:
    data = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _identity_cache_path() -> Path:
    root = Path(os.environ.get("HUMPBACK_CACHE", Path.home() / ".cache" / "humpback"))
    return root / "input-identities.json"


def _file_identity(path: Path) -> str:
    path = path.resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _identity_cache_path()
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    identity = "sha256:" + h.hexdigest()
    # Old entries of this path go: the cache holds one line per input file, not its history.
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
    cache[key] = identity
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=".input-identities-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)  # atomic: concurrent runs never read half a cache
    except OSError as e:
        log.debug("Cannot write the input identity cache %s: %s", cache_path, e)
    return identity


def _s3_identity(source: str, *, endpoint_url: str | None, region: str | None) -> str:
    store, keys = _s3_keys(source, endpoint_url=endpoint_url, region=region)
    return _digest({store.url(k): store.version_tag(k) for k in keys})


def _hub_identity(source: str) -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None  # offline: no revision to ask for
    from huggingface_hub import HfApi

    name = source.removeprefix("hf://").strip("/")
    return "hf:" + str(HfApi().dataset_info(name, timeout=10).sha)


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
