"""One writer per stage: the store's conditional writes and the lease built on them, on local
files and on S3 (moto's server, which honours If-None-Match and If-Match like S3)."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from humpback_runtime.errors import EXIT_LEASE_HELD, LeaseHeld, LeaseLost
from humpback_runtime.lease import LEASE, Lease, read_lease
from humpback_runtime.storage import StorageError, open_store

PREFIX = "ns/run/augment"
KEY = f"{PREFIX}/{LEASE}"


def test_conditional_writes(store):
    v1 = store.create_exclusive("a/obj.json", b"one")
    assert v1 and store.create_exclusive("a/obj.json", b"two") is None
    assert store.read_versioned("a/obj.json") == (b"one", v1)
    v2 = store.replace_if("a/obj.json", b"three", v1)
    assert v2 and v2 != v1
    assert store.replace_if("a/obj.json", b"four", v1) is None  # a stale version never overwrites
    assert store.delete_if("a/obj.json", v1) is False
    assert store.read_bytes("a/obj.json") == b"three"
    assert store.delete_if("a/obj.json", v2) is True and not store.exists("a/obj.json")
    assert store.replace_if("a/obj.json", b"five", v2) is None  # gone: nothing to replace
    assert store.list("a") == []  # lock files and temporary files are never listed


def test_concurrent_creates_have_one_winner(store):
    for trial in range(3):
        wins = []
        barrier = threading.Barrier(8)

        def create(i: int) -> None:
            barrier.wait()
            if store.create_exclusive(f"race/{trial}", str(i).encode()):
                wins.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(wins) == 1
        assert store.read_bytes(f"race/{trial}") == str(wins[0]).encode()


def test_a_second_writer_is_refused_naming_the_holder_and_its_expiry(store):
    first = Lease(store, PREFIX, stage="augment", ttl_s=30)
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as e:
            Lease(store, PREFIX, stage="augment", ttl_s=30).acquire()
        lease = read_lease(store, PREFIX)
        assert e.value.exit_code == EXIT_LEASE_HELD
        assert f"being written by {socket.gethostname()} PID {lease['holder']['pid']}" in str(e.value)
        assert f"expires {lease['expires']}" in str(e.value) and "--wait" in str(e.value)
    finally:
        first.release()
    assert not store.exists(KEY)
    second = Lease(store, PREFIX, stage="augment", ttl_s=30)
    second.acquire()  # free again
    second.release()


def _forge(store, *, host="other-host", seconds=30.0):
    expires = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    store.write_json(KEY, {"stage": "augment", "holder": {"host": host, "pid": 4242, "pidns": "1", "id": "x"},
                           "started": expires.isoformat(), "heartbeat": expires.isoformat(),
                           "expires": expires.isoformat()})


def test_an_expired_lease_is_taken_over_and_a_live_one_waited_for(store):
    _forge(store, seconds=-1)
    lease = Lease(store, PREFIX, stage="augment", ttl_s=30)
    lease.acquire()
    assert "other-host PID 4242" in lease.took_over and "expired at" in lease.took_over
    lease.release()

    _forge(store, seconds=1.5)
    waiting = Lease(store, PREFIX, stage="augment", ttl_s=30)
    t0 = time.monotonic()
    waiting.acquire(wait=True, poll_s=0.1)
    assert time.monotonic() - t0 >= 1.0 and "expired" in waiting.took_over
    waiting.release()


def test_heartbeat_renews_and_a_writer_that_lost_its_lease_may_not_write(store):
    lease = Lease(store, PREFIX, stage="augment", ttl_s=1.5)
    lease.acquire()
    first = read_lease(store, PREFIX)
    time.sleep(1.2)  # past a third of the time to live: renewed at least once
    renewed = read_lease(store, PREFIX)
    assert renewed["heartbeat"] > first["heartbeat"] and renewed["expires"] > first["expires"]
    assert lease.valid()

    store.write_guard = lease.check
    store.write_text(f"{PREFIX}/part-00000.jsonl", "{}\n")  # allowed while valid
    # Another writer took it over (as after a long stall): the next renewal finds out.
    data, version = store.read_versioned(KEY)
    store.replace_if(KEY, json.dumps({**json.loads(data), "holder": {"host": "other", "pid": 1}}).encode(), version)
    with pytest.raises(LeaseLost):
        lease.renew()
    with pytest.raises(LeaseLost, match="taken over by another writer"):
        store.write_text(f"{PREFIX}/part-00001.jsonl", "{}\n")
    assert not store.exists(f"{PREFIX}/part-00001.jsonl")
    store.write_guard = None
    lease.release()
    assert read_lease(store, PREFIX)["holder"]["host"] == "other"  # the successor's lease is left alone


def test_a_lease_not_renewed_in_time_stops_writes(tmp_path):
    store = open_store(str(tmp_path))
    lease = Lease(store, PREFIX, stage="augment", ttl_s=3)
    lease.acquire()
    lease._stop.set()  # as if the heartbeat thread were stuck (the store unreachable)
    store.write_guard = lease.check
    lease._valid_until = time.monotonic() - 1  # a third of the time to live before its expiry
    with pytest.raises(LeaseLost, match="not renewed in time"):
        store.upload_file(__file__, f"{PREFIX}/x.py")
    with pytest.raises(StorageError):
        store.read_bytes(f"{PREFIX}/x.py")
