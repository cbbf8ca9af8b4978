"""One small interface over the artifact store: local paths / `file://` URIs and `s3://`.

    store = open_store("s3://bucket/runs", endpoint_url="http://minio:9000")
    store.write_json("ns/run/prepare-seed/stats.json", {...})
    with ShardWriter(store, "ns/run/prepare-seed") as writer:
        for record in records:
            writer.write(record)
    write_success(store, "ns/run/prepare-seed", {"fingerprint": ..., "outputs": writer.shards})

Keys are relative to the store root and use "/". Every write is atomic: a reader sees the old
object, the new one or none, never half of one; `_SUCCESS.json` is written last, so a stage that
died half-way is never taken for a finished one. boto3 and pyarrow are imported lazily, so the
light modules (spec, plan, operator) can import this one without them.

For the one-writer lease (:mod:`humpback_runtime.lease`) a store also does conditional writes:
`create_exclusive` (fails when the key exists), `replace_if` / `delete_if` (only while the object
is still the version read). A store remembers the size, SHA-256 and record count of every object
this process wrote (`object_info`), so a stage's manifest lists them without reading them back.
While a stage runs, `write_guard` (its lease's check) vets every plain write, and local temporary
files go under `scratch` (the stage's `_tmp/`), which the stage's next attempt removes.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal
from urllib.parse import unquote, urlparse

from humpback_runtime.processes import pid_alive, pid_namespace

__all__ = [
    "SUCCESS",
    "LocalStore",
    "ObjectNotFound",
    "S3Store",
    "ShardMismatch",
    "ShardWriter",
    "Store",
    "StorageError",
    "iter_shard_records",
    "iter_stream_lines",
    "list_shards",
    "object_info",
    "open_store",
    "output_shards",
    "read_success",
    "shard_scratch_dir",
    "sweep_shard_scratch",
    "write_success",
]

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
TMP_PREFIX = ".tmp-"  # local temporary files; never listed
LOCK_PREFIX = ".lock-"  # local lock files of conditional writes; never listed
_CHUNK = 1 << 20
_HIDDEN = (TMP_PREFIX, LOCK_PREFIX)


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the cause."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class ShardMismatch(StorageError):
    """An object differs from what the manifest of the stage that wrote it says."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def _check_key(key: str, *, prefix: bool = False) -> str:
    """A clean relative key; refuses anything that could escape the store root."""
    if not isinstance(key, str):
        raise StorageError(f"invalid key {key!r}: expected a string")
    if prefix:
        key = key.rstrip("/")
        if not key:
            return ""
    if not key or key.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"invalid key {key!r}: keys are relative, '/'-separated and stay inside the store root")
    return key


def iter_stream_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """Split a binary stream into lines without their line ending, reading 1 MiB at a time."""
    pending: list[bytes] = []
    while chunk := stream.read(_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            pending.append(chunk[start:end])
            yield b"".join(pending).removesuffix(b"\r")
            pending = []
            start = end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending).removesuffix(b"\r")


class _Digest:
    """Size, SHA-256 and line count of bytes as they go by."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.lines = 0
        self.last = b""

    def update(self, data: bytes) -> None:
        if data:
            self.sha.update(data)
            self.size += len(data)
            self.lines += data.count(b"\n")
            self.last = data[-1:]

    def info(self, key: str, path: Path | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {"bytes": self.size, "sha256": self.sha.hexdigest()}
        if key.endswith(".jsonl"):
            info["records"] = self.lines + (1 if self.last not in (b"", b"\n") else 0)
        elif key.endswith(".parquet") and path is not None:
            info["records"] = _parquet_rows(path)
        return info


def _parquet_rows(path: Path) -> int | None:
    try:
        _, pq = _import_pyarrow()
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # unreadable: the size and checksum still vouch for it
        return None


def _file_info(path: str | os.PathLike, key: str) -> dict[str, Any]:
    digest = _Digest()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.info(key, Path(path))


def _bytes_info(data: bytes, key: str) -> dict[str, Any]:
    digest = _Digest()
    digest.update(data)
    return digest.info(key)


class Store(ABC):
    """The artifact store. Implementations: `LocalStore`, `S3Store`; get one from `open_store`."""

    uri: str  # root URI, normalised: no trailing slash
    # While a stage runs: raises unless this process may write (the stage's lease is valid).
    write_guard: Callable[[], None] | None = None
    # While a stage runs: the key prefix local temporary files go under (the stage's `_tmp`).
    scratch: str | None = None

    def _may_write(self) -> None:
        if self.write_guard is not None:
            self.write_guard()

    @property
    def _written(self) -> dict[str, dict[str, Any]]:
        """key -> object_info of the objects this process wrote (and has not deleted since)."""
        if "_written_objects" not in self.__dict__:
            self.__dict__["_written_objects"] = {}
        return self.__dict__["_written_objects"]

    def _forget(self, prefix: str) -> None:
        for key in [k for k in self._written if k == prefix or k.startswith(prefix.rstrip("/") + "/")]:
            del self._written[key]

    def url(self, key: str) -> str:
        """The full URI of a key, for messages and manifests."""
        key = _check_key(key, prefix=True)
        return f"{self.uri}/{key}" if key else self.uri

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A binary stream over the object (close it, or use it in a `with`)."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the store root) under the folder `prefix`, recursive, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key; a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str, *, keep: Iterable[str] = ()) -> int:
        """Remove every key under the folder `prefix` but those in `keep`; returns how many were removed."""

    @abstractmethod
    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """key -> size in bytes, for the keys `list(prefix)` gives."""

    # --- conditional writes (the lease) ------------------------------------------------------------
    # A version token is opaque: a content hash locally, the ETag on S3.

    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and its version token."""

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> str | None:
        """Create the object unless the key exists; its version token, or None when it existed."""

    @abstractmethod
    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite the object only while it is still `version`; the new token, or None."""

    @abstractmethod
    def delete_if(self, key: str, version: str) -> bool:
        """Delete the object only while it is still `version`; False when it was not."""

    @abstractmethod
    def clear_scratch(self, prefix: str) -> int:
        """Remove what an earlier attempt left unfinished under `prefix`: its `_tmp/` objects and
        local temporary files, incomplete S3 multipart uploads. Returns how many went."""

    def local_path(self, key: str) -> Path | None:
        return None

    def _read_errors(self, key: str):
        """A context turning errors while an object streams into StorageError naming it."""
        return self._errors("read", self.url(key))  # type: ignore[attr-defined]

    def read_text(self, key: str) -> str:
        data = self.read_bytes(key)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StorageError(f"{self.url(key)}: not valid UTF-8: {e}") from e

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_text(key))
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.url(key)}: not valid JSON: {e}") from e

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_text(key, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def open_lines(self, key: str) -> Iterator[bytes]:
        """Stream the object's lines (raw bytes, line endings removed) without loading it whole."""
        with self.open_read(key) as stream:
            yield from iter_stream_lines(stream)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --- local files ------------------------------------------------------------------------------

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class _DigestWriter:
    """A binary file that also digests what is written to it."""

    def __init__(self, f: BinaryIO, digest: _Digest):
        self.f, self.digest = f, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)


def _atomic_write(dest: Path, fill: Callable[[BinaryIO], None], *, tmp_dir: Path | None = None,
                  exclusive: bool = False, durable: bool = True) -> _Digest:
    """Write through a temporary file (in `tmp_dir`, else the destination's folder; the same
    filesystem), fsync, then rename over the destination. `exclusive`: link it instead, which
    fails with FileExistsError when the destination exists. `durable=False` skips the fsyncs (for
    a lease: if the machine dies, so did its holder). Returns the digest of what was written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = tmp_dir or dest.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    digest = _Digest()
    try:
        with os.fdopen(fd, "wb") as f:
            fill(_DigestWriter(f, digest))  # type: ignore[arg-type]
            f.flush()
            if durable:
                os.fsync(f.fileno())
        # mkstemp creates 0600; artifacts get the mode a plain open() would give them.
        os.chmod(tmp, 0o666 & ~_UMASK)
        if exclusive:
            os.link(tmp, dest)  # atomic, and refuses an existing name
            os.unlink(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return digest
    try:  # make the rename itself durable; not every filesystem lets a folder be fsynced
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return digest


def _copy_from(path: Path) -> Callable[[BinaryIO], None]:
    def fill(out: BinaryIO) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, out, _CHUNK)
    return fill


class LocalStore(Store):
    """A folder on this machine. `uri` is its absolute path."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(os.path.expanduser(root)))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def _read_errors(self, key: str):
        return self._errors("read", key)

    @contextmanager
    def _errors(self, action: str, key: str):
        try:
            yield
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ObjectNotFound(f"Cannot {action} {self.url(key)}: no such file") from e
        except OSError as e:
            raise StorageError(f"Cannot {action} {self.url(key)}: {e}") from e

    def read_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            return self._path(key).read_bytes()

    def open_read(self, key: str) -> BinaryIO:
        with self._errors("read", key):
            return open(self._path(key), "rb")

    def _tmp_dir(self) -> Path | None:
        return self._path(self.scratch) if self.scratch else None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._may_write()
        with self._errors("write", key):
            digest = _atomic_write(self._path(key), lambda f: f.write(data), tmp_dir=self._tmp_dir())
        self._written[_check_key(key)] = digest.info(key)

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        self._may_write()
        dest = self._path(key)
        try:
            digest = _atomic_write(dest, _copy_from(Path(local_path)), tmp_dir=self._tmp_dir())
        except OSError as e:
            raise StorageError(f"Cannot copy {local_path} to {self.url(key)}: {e}") from e
        self._written[_check_key(key)] = digest.info(key, dest)

    # Conditional writes: a create is a hard link (refused for an existing name); a replace or
    # delete compares and acts under an flock on a lock file beside the object, never removed.
    @contextmanager
    def _locked(self, key: str):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f"{LOCK_PREFIX}{path.name}", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # releases the lock

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def create_exclusive(self, key: str, data: bytes) -> str | None:
        with self._errors("create", key):
            try:
                # beside the object, not in `scratch`: the lease is written before and while it is cleared
                _atomic_write(self._path(key), lambda f: f.write(data), exclusive=True, durable=False)
            except FileExistsError:
                return None
        return hashlib.sha256(data).hexdigest()

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        with self._errors("replace", key), self._locked(key) as path:
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return None
            if hashlib.sha256(current).hexdigest() != version:
                return None
            _atomic_write(path, lambda f: f.write(data), durable=False)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, key: str, version: str) -> bool:
        with self._errors("delete", key), self._locked(key) as path:
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if hashlib.sha256(current).hexdigest() != version:
                return False
            path.unlink()
        return True

    def clear_scratch(self, prefix: str) -> int:
        base = self._path(prefix)
        removed = 0
        for folder, _, files in os.walk(base):
            # `_tmp/` of this version; `.tmp-*` files that older versions left in stage folders
            in_tmp = Path(folder).relative_to(base).parts[:1] == ("_tmp",)
            for name in files:
                if in_tmp or name.startswith(TMP_PREFIX):
                    Path(folder, name).unlink(missing_ok=True)
                    removed += 1
        shutil.rmtree(base / "_tmp", ignore_errors=True)
        return removed

    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"Cannot download {self.url(key)}: no such file")
        try:
            _atomic_write(Path(local_path), _copy_from(src))
        except OSError as e:
            raise StorageError(f"Cannot copy {self.url(key)} to {local_path}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_key(prefix, prefix=True)
        base = self.root / prefix if prefix else self.root
        keys = []
        for folder, _, files in os.walk(base):
            rel = Path(folder).relative_to(self.root).as_posix()
            keys += [name if rel == "." else f"{rel}/{name}" for name in files if not name.startswith(_HIDDEN)]
        return sorted(keys)

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        sizes = {}
        for key in self.list(prefix):
            try:
                sizes[key] = self._path(key).stat().st_size
            except FileNotFoundError:  # deleted since the listing
                pass
        return sizes

    def delete(self, key: str) -> None:
        self._may_write()
        with self._errors("delete", key):
            self._path(key).unlink(missing_ok=True)
        self._forget(_check_key(key))

    def delete_prefix(self, prefix: str, *, keep: Iterable[str] = ()) -> int:
        prefix = _check_key(prefix, prefix=True)
        kept = set(keep)
        keys = [k for k in self.list(prefix) if k not in kept]
        for key in keys:
            self.delete(key)
        base = self.root / prefix if prefix else self.root
        # Drop the emptied folders (deepest first); a folder still holding something stays.
        for folder, _, _ in sorted(os.walk(base), key=lambda w: -len(w[0])):
            if Path(folder) != self.root:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
        return len(keys)


# --- S3 and S3-compatible stores ----------------------------------------------------------------

class S3Store(Store):
    """`s3://bucket[/prefix]` through boto3. Credentials come from the environment / default chain."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                 max_attempts: int = 5, multipart_threshold: int = 64 * 2**20,
                 connect_timeout: float = 10, read_timeout: float = 60):
        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        if not self.bucket:
            raise StorageError(f"invalid S3 URI {uri!r}: expected s3://BUCKET[/PREFIX]")
        self.prefix = _check_key(parsed.path.lstrip("/"), prefix=True)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.max_attempts = max_attempts
        self.multipart_threshold = multipart_threshold
        try:
            import boto3
            import boto3.exceptions
            import botocore.exceptions
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as e:
            raise StorageError(f"Cannot open {self.uri}: boto3 is not installed (pip install 'humpback[s3]')") from e
        self._exc = botocore.exceptions
        self._upload_failed = boto3.exceptions.S3UploadFailedError
        config = Config(
            # total_max_attempts counts the first try, so "gave up after N attempts" is exact.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # MinIO and most S3-compatible stores serve buckets by path, not by virtual host.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                      config=config)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=max(multipart_threshold, 5 * 2**20))  # S3's minimum part
        self.endpoint = self._client.meta.endpoint_url

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _bucket_missing(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._exc.ClientError as e:
            return e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound")
        except self._exc.BotoCoreError:
            return False
        return False

    @contextmanager
    def _errors(self, action: str, target: str):
        """Turn botocore's exceptions into StorageError / ObjectNotFound naming the URI and endpoint."""
        exc = self._exc
        try:
            yield
        except (exc.BotoCoreError, exc.ClientError, self._upload_failed) as e:
            raise self._translate(e, action, target) from e

    def _translate(self, e: Exception, action: str, target: str) -> StorageError:
        exc = self._exc
        if isinstance(e, self._upload_failed) and isinstance(e.__context__, exc.ClientError):
            e = e.__context__  # boto3 wraps the S3 error of an upload; judge by the original
        if isinstance(e, exc.ClientError):
            err = e.response.get("Error", {})
            code, message = err.get("Code", ""), err.get("Message", "")
            # HEAD requests (download) get a bare 404 for a missing key and bucket alike.
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and self._bucket_missing()):
                return StorageError(f"Cannot {action} {target}: bucket '{self.bucket}' does not exist "
                                    f"at {self.endpoint}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"Cannot {action} {target}: no such object")
            return StorageError(f"Cannot {action} {target} at {self.endpoint}: {code} {message}".rstrip())
        if isinstance(e, (exc.EndpointConnectionError, exc.ConnectTimeoutError, exc.ReadTimeoutError,
                          exc.ConnectionClosedError)):
            return StorageError(f"Cannot {action} {target}: endpoint {self.endpoint} unreachable, "
                                f"gave up after {self.max_attempts} attempts ({e})")
        if isinstance(e, exc.NoCredentialsError):
            return StorageError(f"Cannot {action} {target}: no AWS credentials found (set AWS_ACCESS_KEY_ID "
                                f"and AWS_SECRET_ACCESS_KEY, or mount a credentials file)")
        return StorageError(f"Cannot {action} {target} at {self.endpoint}: {e}")

    def read_bytes(self, key: str) -> bytes:
        with self._errors("read", self.url(key)):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def open_read(self, key: str) -> BinaryIO:
        with self._errors("read", self.url(key)):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def open_lines(self, key: str) -> Iterator[bytes]:
        with self._errors("read", self.url(key)):  # also covers errors while the body streams
            yield from super().open_lines(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        # A PUT is atomic in S3: the object appears whole when the request completes, or not at all.
        self._may_write()
        with self._errors("write", self.url(key)):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        self._written[_check_key(key)] = _bytes_info(data, key)

    def upload_file(self, local_path: str | os.PathLike, key: str) -> None:
        # Above the threshold boto3 uploads in parts; the object appears only when the upload is
        # completed, and s3transfer aborts the multipart upload on failure, so no parts linger
        # (those of a killed process are aborted by the stage's next attempt: clear_scratch).
        self._may_write()
        if not Path(local_path).is_file():
            raise StorageError(f"Cannot upload {local_path} to {self.url(key)}: no such local file")
        info = _file_info(local_path, key)
        with self._errors("upload to", self.url(key)):
            self._client.upload_file(str(local_path), self.bucket, self._key(key), Config=self._transfer)
        self._written[_check_key(key)] = info

    def _conditional(self, action: str, key: str, call: Callable[[], Any]) -> Any:
        """`call()`, or None when S3 refused its precondition (412, or 409 for a concurrent one)."""
        try:
            return call()
        except self._exc.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return None
            raise self._translate(e, action, self.url(key)) from e
        except (self._exc.BotoCoreError, self._upload_failed) as e:
            raise self._translate(e, action, self.url(key)) from e

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        with self._errors("read", self.url(key)):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"]

    def create_exclusive(self, key: str, data: bytes) -> str | None:
        resp = self._conditional("create", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"))
        return resp["ETag"] if resp else None

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        resp = self._conditional("replace", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=version))
        return resp["ETag"] if resp else None

    def delete_if(self, key: str, version: str) -> bool:
        # S3 (and moto) honour If-Match on DeleteObject; a store that ignores it deletes plainly.
        return self._conditional("delete", key, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=self._key(key), IfMatch=version)) is not None

    def clear_scratch(self, prefix: str) -> int:
        removed = self.delete_prefix(f"{_check_key(prefix, prefix=True)}/_tmp")
        full = self._key(prefix) + "/"
        with self._errors("list uploads under", self.url(prefix)):
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                      Prefix=full):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])
                    removed += 1
        return removed

    def download_file(self, key: str, local_path: str | os.PathLike) -> None:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
        os.close(fd)
        try:
            with self._errors("download", self.url(key)):
                self._client.download_file(self.bucket, self._key(key), tmp, Config=self._transfer)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        # A listing (not a HEAD) tells a missing key from a missing bucket. An exact key sorts
        # before every longer key that starts with it, so the first result answers.
        full = self._key(key)
        with self._errors("check", self.url(key)):
            resp = self._client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        return any(obj["Key"] == full for obj in resp.get("Contents", []))

    def version_tag(self, key: str) -> str:
        """What the object's content is: its ETag, and its VersionId on a versioned bucket."""
        with self._errors("check", self.url(key)):
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        tag = str(head.get("ETag", "")).strip('"')
        version = head.get("VersionId")
        return f"{tag}@{version}" if version and version != "null" else tag

    def _list_full(self, prefix: str) -> dict[str, int]:
        prefix = _check_key(prefix, prefix=True)
        full = "/".join(p for p in (self.prefix, prefix) if p)
        full = full + "/" if full else ""
        keys = {}
        with self._errors("list", self.url(prefix)):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.update((obj["Key"], obj["Size"]) for obj in page.get("Contents", []))
        return keys

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        return {k[cut:]: size for k, size in sorted(self._list_full(prefix).items())
                if not k.rsplit("/", 1)[-1].startswith(TMP_PREFIX)}

    def list(self, prefix: str = "") -> list[str]:
        return list(self.list_sizes(prefix))

    def delete(self, key: str) -> None:
        self._may_write()
        with self._errors("delete", self.url(key)):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        self._forget(_check_key(key))

    def delete_prefix(self, prefix: str, *, keep: Iterable[str] = ()) -> int:
        self._may_write()
        kept = {self._key(k) for k in keep}
        keys = [k for k in self._list_full(prefix) if k not in kept]
        self._forget(_check_key(prefix, prefix=True))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = keys[i:i + 1000]
            with self._errors("delete under", self.url(prefix)):
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if errors := resp.get("Errors"):
                first = errors[0]
                raise StorageError(f"Cannot delete {len(errors)} object(s) under {self.url(prefix)}, e.g. "
                                   f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip())
        return len(keys)


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               max_attempts: int = 5, multipart_threshold: int = 64 * 2**20,
               connect_timeout: float = 10, read_timeout: float = 60) -> Store:
    """The store at `uri`: a local path, `file:///abs/path` or `s3://bucket[/prefix]`.

    `endpoint_url`, `region`, `max_attempts`, `multipart_threshold` and the timeouts (seconds)
    apply to S3 only.
    Opening a store makes no request; errors surface on the first operation.
    """
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=endpoint_url, region=region, max_attempts=max_attempts,
                       multipart_threshold=multipart_threshold, connect_timeout=connect_timeout,
                       read_timeout=read_timeout)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"invalid file URI {uri!r}: use file:///absolute/path or a plain path")
        return LocalStore(unquote(parsed.path))
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: expected a local path, file:// or s3://")
    return LocalStore(uri)


# --- stage manifests ------------------------------------------------------------------------------

def _success_key(prefix: str) -> str:
    prefix = _check_key(prefix, prefix=True)
    return f"{prefix}/{SUCCESS}" if prefix else SUCCESS


def write_success(store: Store, prefix: str, manifest: dict) -> None:
    """Mark the stage under `prefix` finished. Call it LAST, after every output is written."""
    store.write_json(_success_key(prefix), manifest)


def read_success(store: Store, prefix: str) -> dict | None:
    """The stage's manifest, or None when it is absent or unreadable (then the stage runs again).

    Outages (unreachable endpoint, missing bucket) still raise: they say nothing about the stage.
    """
    key = _success_key(prefix)
    try:
        data = store.read_bytes(key)
    except ObjectNotFound:
        return None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        log.warning("Ignoring corrupt manifest %s (%s); the stage counts as not finished", store.url(key), e)
        return None
    if not isinstance(manifest, dict):
        log.warning("Ignoring manifest %s: expected a JSON object, got %s", store.url(key), type(manifest).__name__)
        return None
    return manifest


def object_info(store: Store, key: str, size: int | None = None, *, cached: bool = True) -> dict[str, Any]:
    """`{"bytes", "sha256"[, "records"]}` of an object: remembered when this process wrote it
    (and `cached`), else read and digested. `records`: lines of a .jsonl, rows of a .parquet."""
    key = _check_key(key)
    known = store._written.get(key) if cached else None
    if known is not None and (size is None or known["bytes"] == size):
        return dict(known)
    path = store.local_path(key)
    if path is not None:
        try:
            return _file_info(path, key)
        except FileNotFoundError as e:
            raise ObjectNotFound(f"Cannot read {store.url(key)}: no such file") from e
        except OSError as e:
            raise StorageError(f"Cannot read {store.url(key)}: {e}") from e
    if key.endswith(".parquet"):  # the row count needs the file
        with tempfile.TemporaryDirectory(prefix="humpback-") as tmp:
            local = Path(tmp) / "object.parquet"
            store.download_file(key, local)
            return _file_info(local, key)
    digest = _Digest()
    with store._read_errors(key), store.open_read(key) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.info(key)


# --- record shards ----------------------------------------------------------------------------------

_scratch_dir: Path | None = None
_SCRATCH_PREFIX = "humpback-shards-"


def shard_scratch_dir() -> Path:
    """This process's folder for shards being built, in TMPDIR; removed when the process exits.

    Named after the PID (and PID namespace), so `sweep_shard_scratch` can remove the folders of
    processes that died without cleaning up (SIGKILL, OOM)."""
    global _scratch_dir
    if _scratch_dir is None or not _scratch_dir.is_dir():
        _scratch_dir = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{pid_namespace() or 0}-{os.getpid()}-"))
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


def sweep_shard_scratch() -> int:
    """Remove the shard folders in TMPDIR of this host's processes that no longer exist."""
    removed = 0
    ns = pid_namespace() or "0"
    with os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            parts = entry.name[len(_SCRATCH_PREFIX):].split("-")
            if (entry.name.startswith(_SCRATCH_PREFIX) and len(parts) >= 3 and parts[0] == ns and parts[1].isdigit()
                    and not pid_alive(int(parts[1]))):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
    return removed


_SHARD_EXTS = (".jsonl", ".parquet")
_PARQUET_ROW_GROUP = 10_000  # readers stream a Parquet shard one row group at a time


def _import_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise StorageError("Parquet needs pyarrow (pip install pyarrow)") from e
    return pa, pq


class ShardWriter:
    """Write records as `PREFIX/part-00000.jsonl` (or `.parquet`) shards of `records_per_shard` each.

    A shard is built in a local temporary file and uploaded whole, so a shard in the store is
    complete or absent. `start_index` numbers the first shard (resuming after shards already written).
    Leaving the `with` block on an exception drops the unfinished shard; finished ones stay.
    """

    def __init__(self, store: Store, prefix: str, *, fmt: Literal["jsonl", "parquet"] = "jsonl",
                 records_per_shard: int = 50_000, start_index: int = 0):
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"fmt: expected 'jsonl' or 'parquet', got {fmt!r}")
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard: expected >= 1, got {records_per_shard}")
        self.store = store
        self.prefix = _check_key(prefix, prefix=True)
        self.fmt = fmt
        self.records_per_shard = records_per_shard
        self.shards: list[str] = []
        self.count = 0
        self._index = start_index
        self._rows: list[dict] = []  # parquet: the shard's records (the schema is inferred from all)
        self._file: IO[bytes] | None = None  # jsonl: lines streamed to a temporary file
        self._in_shard = 0
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def write(self, record: dict) -> None:
        if self._closed:
            raise StorageError(f"ShardWriter for {self.store.url(self.prefix)} is closed")
        if self.fmt == "jsonl":
            line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
            if self._file is None:
                self._file = tempfile.NamedTemporaryFile("wb", prefix="humpback-shard-", suffix=".jsonl",
                                                         dir=shard_scratch_dir(), delete=False)
            self._file.write(line)
        else:
            self._rows.append(record)
        self._in_shard += 1
        self.count += 1
        if self._in_shard >= self.records_per_shard:
            self._flush()

    def close(self) -> list[str]:
        """Upload the last shard; returns every key written."""
        if not self._closed:
            self._flush()
            self._closed = True
        return self.shards

    def _next_key(self) -> str:
        name = f"part-{self._index:05d}.{self.fmt}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _flush(self) -> None:
        if not self._in_shard:
            return
        key = self._next_key()
        if self.fmt == "jsonl":
            assert self._file is not None
            self._file.close()
            tmp = self._file.name
        else:
            tmp = self._write_parquet(key)
        try:
            self.store.upload_file(tmp, key)
        finally:
            Path(tmp).unlink(missing_ok=True)
            self._file, self._rows, self._in_shard = None, [], 0
        self.shards.append(key)
        self._index += 1

    def _write_parquet(self, key: str) -> str:
        pa, pq = _import_pyarrow()
        fd, tmp = tempfile.mkstemp(prefix="humpback-shard-", suffix=".parquet", dir=shard_scratch_dir())
        os.close(fd)
        try:
            table = pa.Table.from_pylist(self._rows)
            pq.write_table(table, tmp, row_group_size=_PARQUET_ROW_GROUP)
        except (pa.ArrowException, TypeError, ValueError) as e:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"Cannot write {self.store.url(key)} as Parquet: {e}") from e
        return tmp

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
        self._file, self._rows, self._in_shard = None, [], 0
        self._closed = True


def list_shards(store: Store, prefix: str) -> list[str]:
    """The `part-*.jsonl` / `part-*.parquet` keys directly under `prefix`, sorted."""
    prefix = _check_key(prefix, prefix=True)
    cut = len(prefix) + 1 if prefix else 0
    return [k for k in store.list(prefix)
            if "/" not in k[cut:] and k[cut:].startswith("part-") and k.endswith(_SHARD_EXTS)]


def output_shards(store: Store, prefix: str, manifest: dict | None) -> list[str]:
    """The record shards a stage wrote: those its manifest lists, else the part-* shards under it."""
    keys = ((manifest or {}).get("outputs") or {}).get("records")
    if isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys):
        return keys
    return list_shards(store, prefix)


class _DigestReader:
    """A binary stream that digests what is read from it."""

    def __init__(self, stream: BinaryIO, digest: _Digest):
        self.stream, self.digest = stream, digest

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data


def _check_object(store: Store, key: str, actual: dict[str, Any], expected: dict) -> None:
    for name in ("bytes", "sha256", "records"):
        if name in expected and expected[name] != actual.get(name):
            raise ShardMismatch(f"{store.url(key)}: {name} {actual.get(name)}, but the manifest of the stage "
                                f"that wrote it says {expected[name]}", key)


def iter_shard_records(store: Store, keys: Iterable[str], *,
                       expected: dict[str, dict] | None = None) -> Iterator[dict]:
    """Stream the records of JSONL / Parquet shards, in order, never holding a whole shard.

    `expected`: key -> the manifest's `{"bytes", "sha256", "records"}`; each listed shard is
    digested as it streams and ShardMismatch (naming it) is raised at its end if it differs."""
    for key in keys:
        want = (expected or {}).get(key)
        if key.endswith(".jsonl"):
            digest = _Digest()
            with store._read_errors(key), store.open_read(key) as stream:
                source = _DigestReader(stream, digest) if want else stream
                for lineno, line in enumerate(iter_stream_lines(source), 1):  # type: ignore[arg-type]
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except (UnicodeDecodeError, ValueError) as e:
                        raise StorageError(f"{store.url(key)}:{lineno}: corrupt shard: {e}") from e
            if want:
                _check_object(store, key, digest.info(key), want)
        elif key.endswith(".parquet"):
            if want:
                _check_object(store, key, object_info(store, key, cached=False), want)
            yield from _iter_parquet(store, key)
        else:
            raise StorageError(f"{store.url(key)}: not a shard (expected .jsonl or .parquet)")


def _iter_parquet(store: Store, key: str) -> Iterator[dict]:
    pa, pq = _import_pyarrow()
    with tempfile.TemporaryDirectory(prefix="humpback-") as tmp:
        path = store.local_path(key)
        if path is None:  # Parquet needs random access: fetch the object to a local file first
            path = Path(tmp) / "shard.parquet"
            store.download_file(key, path)
        try:
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except FileNotFoundError as e:
            raise ObjectNotFound(f"Cannot read {store.url(key)}: no such file") from e
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{store.url(key)}: corrupt Parquet shard: {e}") from e
