"""Reads `_SUCCESS.json` of stages about to start, so that finished work is skipped without a child.

The operator uses its own credentials (its environment: AWS_* variables, IRSA, instance roles),
never the run's Secret: it has no access to Secrets. When it cannot read the store, a stage counts
as not done; its child then finds the stage done itself and exits at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from humpback_runtime.layout import stage_prefix
from humpback_runtime.progress import read_progress
from humpback_runtime.storage import Store, open_store, read_success

PROBE_TIMEOUT_SECONDS = 20.0


class StoreProbe:
    def __init__(self) -> None:
        self._warned: set[str] = set()  # one warning per store, not one per stage

    async def read(self, body: Mapping[str, Any], stages: Iterable[str], logger: logging.Logger) -> dict[str, dict | None]:
        meta = body["metadata"]
        spec = body.get("spec") or {}
        storage = spec.get("storage") or {}
        uri = storage.get("uri", "./runs")
        s3 = storage.get("s3") or {}
        out: dict[str, dict | None] = {}
        for stage in stages:
            prefix = stage_prefix(meta["namespace"], meta["name"], stage)
            try:
                out[stage] = await asyncio.wait_for(
                    asyncio.to_thread(_read, uri, s3.get("endpoint"), s3.get("region"), prefix),
                    timeout=PROBE_TIMEOUT_SECONDS)
            except Exception as e:  # noqa: BLE001 - any failure means "unknown": the child decides
                if uri not in self._warned:
                    self._warned.add(uri)
                    logger.warning("Cannot read the store %s (%s); stages will check it themselves", uri, e)
                out[stage] = None
        return out


    async def read_progress(self, body: Mapping[str, Any], stages: Iterable[str], logger: logging.Logger) -> dict[str, dict]:
        """The `_PROGRESS.json` of each stage that has one; unreadable ones are left out."""
        meta = body["metadata"]
        storage = (body.get("spec") or {}).get("storage") or {}
        uri, s3 = storage.get("uri", "./runs"), storage.get("s3") or {}
        out: dict[str, dict] = {}
        for stage in stages:
            prefix = stage_prefix(meta["namespace"], meta["name"], stage)
            try:
                snap = await asyncio.wait_for(
                    asyncio.to_thread(_read_progress, uri, s3.get("endpoint"), s3.get("region"), prefix),
                    timeout=PROBE_TIMEOUT_SECONDS)
            except Exception as e:  # noqa: BLE001 - progress is for show: never stall a reconcile on it
                logger.debug("Cannot read the progress of stage %s: %s", stage, e)
                continue
            if snap is not None:
                out[stage] = snap
        return out


def _read(uri: str, endpoint: str | None, region: str | None, prefix: str) -> dict | None:
    return read_success(_store(uri, endpoint, region), prefix)


def _read_progress(uri: str, endpoint: str | None, region: str | None, prefix: str) -> dict | None:
    return read_progress(_store(uri, endpoint, region), prefix)


@functools.lru_cache(maxsize=64)
def _store(uri: str, endpoint: str | None, region: str | None) -> Store:
    # One client per store for the operator's lifetime: making a boto3 client costs tens of
    # milliseconds of CPU, which at hundreds of runs is most of a reconcile. Clients are thread-safe.
    return open_store(uri, endpoint_url=endpoint, region=region, max_attempts=2)
