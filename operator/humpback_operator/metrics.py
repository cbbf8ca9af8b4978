"""Prometheus metrics of the operator, served on `HUMPBACK_METRICS_PORT` when it is set (the
chart's `metrics.enabled`), bound to `HUMPBACK_METRICS_ADDRESS`; without the port nothing listens."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

METRICS_PORT_ENV = "HUMPBACK_METRICS_PORT"
METRICS_ADDRESS_ENV = "HUMPBACK_METRICS_ADDRESS"  # default 0.0.0.0 (Prometheus scrapes the pod IP)

RECONCILES = Counter("humpback_reconciles_total", "Reconciles of BacktranslationRuns.")
RECONCILE_SECONDS = Histogram("humpback_reconcile_seconds", "Time of one reconcile, API calls included.")
CHILDREN_CREATED = Counter("humpback_children_created_total", "Children the operator created.", ["kind"])
EVENTS = Counter("humpback_events_total", "Events posted on runs, by reason.", ["reason"])
RUNS = Gauge("humpback_runs", "Runs this operator follows, by phase.", ["phase"])
# A finished run has no daemon: this counts only runs with work left (or a spec not yet seen).
DAEMONS = Gauge("humpback_run_daemons", "Runs whose reconcile daemon is running.")
# Stage families (train, curate, ...) rather than stage names keep the label set small and let a
# dashboard compare iterations; a duration runs from the first attempt's start to the end.
STAGE_SECONDS = Histogram("humpback_stage_duration_seconds", "Duration of finished stages, by family and outcome.",
                          ["family", "outcome"],
                          buckets=(10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 115200, float("inf")))
STAGE_RETRIES = Counter("humpback_stage_attempt_retries_total", "Failed stage attempts that were retried, by reason.",
                        ["family", "reason"])

log = logging.getLogger(__name__)


_FAMILY = re.compile(r"^(train|curate|rewrite)-")
# Words in a failed attempt's message that name its cause, most specific first.
_REASONS = (("vLLM server", "ServerFailed"), ("OOMKilled", "OOMKilled"), ("Evicted", "Evicted"),
            ("DeadlineExceeded", "DeadlineExceeded"), ("BackoffLimitExceeded", "BackoffLimitExceeded"),
            ("ImagePull", "ImagePullFailed"))


def stage_family(name: str) -> str:
    m = _FAMILY.match(name)
    return m.group(1) if m else name


def retry_reason(stage: Mapping[str, Any]) -> str:
    """The reason label of a retried attempt: the status' own reason when it has one, else the
    cause its message names, else AttemptFailed."""
    if isinstance(stage.get("reason"), str) and stage["reason"]:
        return stage["reason"]
    message = str(stage.get("message") or "")
    return next((reason for word, reason in _REASONS if word in message), "AttemptFailed")


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def observe_stages(old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]] | None) -> None:
    """Count what changed between two `status.stages` lists: finished stages (duration) and retries."""
    before = {s.get("name"): s for s in old or []}
    for st in new or []:
        prev = before.get(st.get("name")) or {}
        family = stage_family(str(st.get("name")))
        attempt, prev_attempt = int(st.get("attempt") or 0), int(prev.get("attempt") or 0)
        if prev_attempt >= 1 and attempt > prev_attempt:
            STAGE_RETRIES.labels(family, retry_reason(st)).inc(attempt - prev_attempt)
        phase = st.get("phase")
        if phase in ("Succeeded", "Failed") and prev.get("phase") != phase:
            start, end = _time(st.get("startTime")), _time(st.get("completionTime"))
            if start and end:
                STAGE_SECONDS.labels(family, phase).observe(max(0.0, (end - start).total_seconds()))


def serve_from_env() -> int | None:
    raw = os.environ.get(METRICS_PORT_ENV)
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{METRICS_PORT_ENV} must be a port number, got {raw!r}") from None
    address = os.environ.get(METRICS_ADDRESS_ENV) or "0.0.0.0"
    start_http_server(port, addr=address)
    log.info("Serving Prometheus metrics on %s:%d/metrics", address, port)
    return port
