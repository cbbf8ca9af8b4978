"""Reads `_SUCCESS.json` of stages about to start, so that finished work is skipped without a child.

The operator reads with its own credentials (its environment: AWS_* variables, IRSA, instance
roles), never the run's Secret: it has no access to Secrets. A run names its store, so reading any
store it names would send the operator's credentials wherever a tenant points them (a confused
deputy). The probe therefore reads only stores an admin allowed (`OperatorConfig.probe_allowed_stores`,
the chart's `storeProbe.allowedStores`): a bucket glob at an exact endpoint, plain http only when
that endpoint is listed. For any other store, and whenever a read fails, a stage counts as "not
known done": its child starts, finds the stage done itself (with the run's own Secret) and exits.

A slow store must not hold up other runs: probes (and the reads of running stages' `_PROGRESS.json`,
under the same rules) run in their own small thread pool, apart from the Kubernetes API calls
(kube.py: connections of their own on the event loop), each read has a hard timeout, and an
endpoint that keeps failing is skipped for a while (circuit breaker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from humpback_runtime.layout import stage_prefix
from humpback_runtime.progress import read_progress
from humpback_runtime.storage import Store, open_store, read_success

from humpback_operator.config import OperatorConfig, normalize_endpoint

PROBE_TIMEOUT_SECONDS = 5.0  # the whole read, from the caller's side
CONNECT_TIMEOUT_SECONDS = 2.0  # botocore's own timeouts free the pool's thread soon after
READ_TIMEOUT_SECONDS = 3.0
PROBE_THREADS = 4
BREAKER_FAILURES = 3  # consecutive failures that open an endpoint's circuit...
BREAKER_OPEN_SECONDS = 60.0  # ...for this long; then one read tries again


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0


class StoreProbe:
    def __init__(self, config: OperatorConfig | None = None, *, timeout: float = PROBE_TIMEOUT_SECONDS,
                 threads: int = PROBE_THREADS):
        self.config = config or OperatorConfig()
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-probe")
        self._breakers: dict[str, _Breaker] = {}
        self._warned: set[str] = set()  # one warning per store, not one per stage

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _warn_once(self, key: str, logger: logging.Logger, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    async def read(self, body: Mapping[str, Any], stages: Iterable[str], logger: logging.Logger) -> dict[str, dict | None]:
        """Each stage's `_SUCCESS.json`; None where there is none or it cannot be read."""
        return await self._each(body, stages, logger, _read)

    async def read_progress(self, body: Mapping[str, Any], stages: Iterable[str], logger: logging.Logger) -> dict[str, dict]:
        """The `_PROGRESS.json` of each stage that has one; unreadable ones are left out. The same
        rules as `read`: allowed stores only, this pool, the timeout and the circuit breaker."""
        read = await self._each(body, stages, logger, _read_progress)
        return {stage: snap for stage, snap in read.items() if snap is not None}

    def reads(self, body: Mapping[str, Any], logger: logging.Logger) -> bool:
        """Whether this run's store is one the probe may read (warns once per store when not)."""
        uri, s3 = _storage(body)
        endpoint = s3.get("endpoint")
        if self.config.probe_allowed(uri, endpoint):
            return True
        self._warn_once(f"{uri} {endpoint}", logger, "Not reading the store %s%s with the operator's credentials: "
                        "it is not in storeProbe.allowedStores; each stage checks it itself",
                        uri, f" at {endpoint}" if endpoint else "")
        return False

    async def _each(self, body: Mapping[str, Any], stages: Iterable[str], logger: logging.Logger,
                    reader: Callable[[str, str | None, str | None, str], dict | None]) -> dict[str, dict | None]:
        meta = body["metadata"]
        uri, s3 = _storage(body)
        endpoint = s3.get("endpoint")
        stages = list(stages)
        if not self.reads(body, logger):
            return {stage: None for stage in stages}
        breaker = self._breakers.setdefault(normalize_endpoint(endpoint), _Breaker())
        loop = asyncio.get_running_loop()
        out: dict[str, dict | None] = {}
        for stage in stages:
            if breaker.open_until > time.monotonic():
                out[stage] = None
                continue
            prefix = stage_prefix(meta["namespace"], meta["name"], stage)
            future = loop.run_in_executor(self._pool, reader, uri, endpoint, s3.get("region"), prefix)
            try:
                out[stage] = await asyncio.wait_for(future, timeout=self.timeout)
                breaker.failures = 0
            except Exception as e:  # noqa: BLE001 - any failure means "unknown": the child decides
                breaker.failures += 1
                if breaker.failures >= BREAKER_FAILURES:
                    breaker.open_until = time.monotonic() + BREAKER_OPEN_SECONDS
                self._warn_once(uri, logger, "Cannot read the store %s (%s); stages will check it themselves",
                                uri, type(e).__name__ if isinstance(e, asyncio.TimeoutError) else e)
                out[stage] = None
        return out


def _storage(body: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The run's store URI (the spec's default when unset) and its `s3` settings."""
    storage = (body.get("spec") or {}).get("storage") or {}
    return storage.get("uri", "./runs"), storage.get("s3") or {}


def _read(uri: str, endpoint: str | None, region: str | None, prefix: str) -> dict | None:
    return read_success(_store(uri, endpoint, region), prefix)


def _read_progress(uri: str, endpoint: str | None, region: str | None, prefix: str) -> dict | None:
    return read_progress(_store(uri, endpoint, region), prefix)


@functools.lru_cache(maxsize=64)
def _store(uri: str, endpoint: str | None, region: str | None) -> Store:
    # One client per store for the operator's lifetime: making a boto3 client costs tens of
    # milliseconds of CPU, which at hundreds of runs is most of a reconcile. Clients are thread-safe.
    return open_store(uri, endpoint_url=endpoint, region=region, max_attempts=1,
                      connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS)
