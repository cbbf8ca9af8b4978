"""Prometheus metrics of the operator, served on `HUMPBACK_METRICS_PORT` when it is set (the
chart's `metrics.enabled`), bound to `HUMPBACK_METRICS_ADDRESS`; without the port nothing listens."""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

METRICS_PORT_ENV = "HUMPBACK_METRICS_PORT"
METRICS_ADDRESS_ENV = "HUMPBACK_METRICS_ADDRESS"  # default 0.0.0.0 (Prometheus scrapes the pod IP)

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
    address = os.environ.get(METRICS_ADDRESS_ENV) or "0.0.0.0"
    start_http_server(port, addr=address)
    log.info("Serving Prometheus metrics on %s:%d/metrics", address, port)
    return port
