"""Prometheus metrics of the operator, served on `HUMPBACK_METRICS_PORT` when it is set (the
chart's `metrics.enabled`); without the variable nothing listens."""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

METRICS_PORT_ENV = "HUMPBACK_METRICS_PORT"

RECONCILES = Counter("humpback_reconciles_total", "Reconciles of BacktranslationRuns.")
RECONCILE_SECONDS = Histogram("humpback_reconcile_seconds", "Time of one reconcile, API calls included.")
CHILDREN_CREATED = Counter("humpback_children_created_total", "Children the operator created.", ["kind"])
EVENTS = Counter("humpback_events_total", "Events posted on runs, by reason.", ["reason"])
RUNS = Gauge("humpback_runs", "Runs this operator follows, by phase.", ["phase"])

log = logging.getLogger(__name__)


def serve_from_env() -> int | None:
    raw = os.environ.get(METRICS_PORT_ENV)
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{METRICS_PORT_ENV} must be a port number, got {raw!r}") from None
    start_http_server(port)
    log.info("Serving Prometheus metrics on :%d/metrics", port)
    return port
