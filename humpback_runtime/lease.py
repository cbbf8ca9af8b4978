"""One writer per stage: a lease in the store, `<stage>/_LEASE.json`, taken before a stage writes.

    lease = Lease(store, "ns/run/augment", stage="augment")
    lease.acquire(wait=False)       # LeaseHeld naming the holder and its expiry, unless --wait
    try:
        ...                         # every write under the prefix checks lease.check() first
    finally:
        lease.release()

The lease object holds the holder (host, PID, PID namespace, a random id), when it started, the
last heartbeat and when it expires. It is taken atomically: a create that fails when the object
exists (local files: a hard link, which refuses an existing name; S3: `PutObject` with
`If-None-Match: *`). A background thread renews it every third of its time to live with a
compare-and-swap on the version it last wrote (local: under an flock; S3: `If-Match: ETag`), so a
holder that lost its lease never overwrites its successor's. An expired lease is taken over by
the same compare-and-swap; so is, at once, the lease of a process of this host (and PID
namespace) that no longer exists, which is what a `kill -9` or a crash leaves behind.

A holder writes only while its lease is valid by its own clock: up to `margin` seconds before the
expiry it last wrote, measured from when it sent that renewal. So another process, which takes
over only after the expiry it reads, never writes at the same time, provided the clocks of the
two machines differ by less than the margin (a third of the time to live: 20 s by default).
The time to live is `HUMPBACK_LEASE_TTL_S` (default 60 s): a crashed holder on another machine
delays a retry by at most that much.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from humpback_runtime.errors import LeaseHeld, LeaseLost
from humpback_runtime.processes import pid_alive, pid_namespace
from humpback_runtime.storage import ObjectNotFound, StorageError, Store

__all__ = ["LEASE", "Lease", "LeaseHeld", "LeaseLost", "describe_holder", "lease_ttl_s", "read_lease"]

log = logging.getLogger(__name__)

LEASE = "_LEASE.json"
TTL_ENV = "HUMPBACK_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


def lease_ttl_s() -> float:
    raw = os.environ.get(TTL_ENV)
    if not raw:
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        raise ValueError(f"{TTL_ENV}: expected seconds, got {raw!r}") from None
    if not ttl >= 1:
        raise ValueError(f"{TTL_ENV}: expected at least 1 second, got {raw!r}")
    return ttl


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace(), "id": uuid.uuid4().hex}


def read_lease(store: Store, prefix: str) -> dict | None:
    """The lease of the stage under `prefix`, or None when nobody holds one."""
    try:
        data, _ = store.read_versioned(f"{prefix}/{LEASE}")
    except StorageError:
        return None
    return _parse(data)


def _parse(data: bytes) -> dict | None:
    try:
        lease = json.loads(data)
    except ValueError:
        return None
    return lease if isinstance(lease, dict) else None


def _expires(lease: dict | None) -> datetime | None:
    try:
        return datetime.fromisoformat(lease["expires"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None


def describe_holder(lease: dict) -> str:
    holder = lease.get("holder") or {}
    return (f"{holder.get('host', '?')} PID {holder.get('pid', '?')} (since {lease.get('started', '?')}, "
            f"last heartbeat {lease.get('heartbeat', '?')}, expires {lease.get('expires', '?')})")


def _free(lease: dict | None) -> str | None:
    """Why a lease may be taken over now, or None while its holder may still be writing."""
    if lease is None:
        return "unreadable"
    if lease.get("released"):
        return "released"
    expires = _expires(lease)
    if expires is None:
        return "unreadable"
    if expires <= _now():
        return f"expired at {lease['expires']}"
    holder = lease.get("holder") or {}
    if (holder.get("host") == socket.gethostname() and holder.get("pidns") == pid_namespace()
            and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])):
        return f"its holder, PID {holder['pid']} of this host, is gone"
    return None


class Lease:
    """The lease of the stage under `prefix`; `acquire`, then `release` (also on errors)."""

    def __init__(self, store: Store, prefix: str, *, stage: str, ttl_s: float | None = None):
        self.store, self.prefix, self.stage = store, prefix, stage
        self.key = f"{prefix}/{LEASE}"
        self.ttl_s = ttl_s if ttl_s is not None else lease_ttl_s()
        self.margin_s = self.ttl_s / 3
        self.holder = _holder()
        self.started = _now()
        self.lost = False
        self.took_over: str | None = None  # why the previous holder's lease was taken, if it was
        self._token: str | None = None
        self._valid_until = 0.0  # time.monotonic() up to which this process may write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self, *, released: bool = False) -> bytes:
        now = _now()
        lease = {"stage": self.stage, "holder": self.holder, "started": self.started.isoformat(),
                 "heartbeat": now.isoformat(), "ttlSeconds": self.ttl_s,
                 "expires": (now if released else now + timedelta(seconds=self.ttl_s)).isoformat()}
        if released:
            lease["released"] = True
        return (json.dumps(lease, indent=2, sort_keys=True) + "\n").encode()

    # --- taking it -----------------------------------------------------------------------------

    def acquire(self, *, wait: bool = False, poll_s: float | None = None) -> None:
        """Take the lease; raises LeaseHeld (naming the holder) while another holds it, unless `wait`."""
        poll_s = poll_s if poll_s is not None else min(5.0, self.ttl_s / 3)
        announced = False
        while True:
            current = self._try_take()
            if current is None:
                break
            if not wait:
                raise LeaseHeld(
                    f"stage {self.stage} is being written by {describe_holder(current)}: one writer per stage. "
                    f"Wait for it to finish (or for its lease to expire), or pass --wait; the lease is "
                    f"{self.store.url(self.key)}")
            if not announced:
                log.info("Waiting for stage %s: its lease is held by %s", self.stage, describe_holder(current))
                announced = True
            time.sleep(poll_s)
        log.info("Took the lease of stage %s (%s)%s", self.stage, self.store.url(self.key),
                 f", taken over: {self.took_over}" if self.took_over else "")
        self._thread = threading.Thread(target=self._heartbeat, name=f"humpback-lease-{self.stage}", daemon=True)
        self._thread.start()

    def _try_take(self) -> dict | None:
        """Take the lease if it is free; returns the holder's lease while it is not."""
        current: dict | None = {}
        for _ in range(3):  # the lease may change hands between our requests: look again
            sent = time.monotonic()
            token = self.store.create_exclusive(self.key, self._content())
            if token is None:
                try:
                    data, version = self.store.read_versioned(self.key)
                except ObjectNotFound:  # released meanwhile
                    continue
                current = _parse(data)
                why = _free(current)
                if why is None:
                    return current
                sent = time.monotonic()
                token = self.store.replace_if(self.key, self._content(), version)
                if token is None:  # another process took it over first
                    continue
                self.took_over = (f"the lease of {describe_holder(current) if current else 'an unknown holder'} "
                                  f"({why})")
            self._token, self._valid_until = token, sent + self.ttl_s - self.margin_s
            return None
        return current or {}

    # --- keeping it ------------------------------------------------------------------------------

    def valid(self) -> bool:
        return not self.lost and self._token is not None and time.monotonic() < self._valid_until

    def check(self) -> None:
        """Raise LeaseLost unless this process may write under the prefix now."""
        if not self.valid():
            raise LeaseLost(f"stage {self.stage} lost its lease {self.store.url(self.key)} "
                            f"({'taken over by another writer' if self.lost else 'not renewed in time'}); "
                            f"stopped writing so the two never mix")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                _thread.interrupt_main()  # stop the stage now rather than at its next write
                return
            except StorageError as e:  # the store is unreachable: retry until the lease runs out
                log.warning("Could not renew the lease of stage %s (%s); retrying", self.stage, e)

    def renew(self) -> None:
        with self._lock:
            if self._token is None or self.lost:
                return
            sent = time.monotonic()
            token = self.store.replace_if(self.key, self._content(), self._token)
            if token is None:
                self.lost = True
                self.check()
            self._token, self._valid_until = token, sent + self.ttl_s - self.margin_s

    # --- giving it back --------------------------------------------------------------------------

    def release(self) -> None:
        """Give the lease back (a no-op when it was never taken or was lost)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            token, self._token = self._token, None
            if token is None or self.lost:
                return
            try:
                if not self.store.delete_if(self.key, token):
                    log.warning("The lease %s was no longer ours at release", self.store.url(self.key))
            except StorageError as e:  # it expires by itself
                log.warning("Could not release the lease %s (%s); it expires in %.0fs",
                            self.store.url(self.key), e, self.ttl_s)
