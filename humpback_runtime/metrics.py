"""Prometheus metrics of a stage process, served on the port the operator declares
(`HUMPBACK_STAGE_METRICS_PORT`, see :mod:`humpback_runtime.pod_contract`).

prometheus_client is optional for the runtime (`pip install 'humpback[metrics]'`): without it, or
without the variable, nothing listens and :func:`stage_metrics` returns a recorder that does
nothing; the stage logs one line saying so. The values come from the stage's progress trackers
(:mod:`humpback_runtime.progress`), so a metric and `_PROGRESS.json` never disagree.

Exported (every one labelled ``stage``; the PodMonitor adds the pod's run label):

==========================================  ================================================
humpback_stage_records_total                records (or training steps) finished
humpback_stage_records_per_second           rate over the last minute
humpback_stage_tokens_total                 prompt + completion tokens (training: input tokens)
humpback_stage_tokens_per_second            rate over the last minute
humpback_stage_errors_total                 records that failed or were refused
humpback_stage_request_retries_total                requests retried
humpback_stage_progress_ratio               done / total (absent while the total is unknown)
humpback_stage_eta_seconds                  estimated seconds to the end of the current loop
humpback_stage_checkpoint_age_seconds       seconds since the last checkpoint was written
humpback_stage_gpu_memory_bytes             torch.cuda.memory_allocated, where torch sees a GPU
==========================================  ================================================
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from humpback_runtime.pod_contract import STAGE_METRICS_PORT_ENV

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "humpback_stage_records_total", "humpback_stage_records_per_second", "humpback_stage_tokens_total",
    "humpback_stage_tokens_per_second", "humpback_stage_errors_total", "humpback_stage_request_retries_total",
    "humpback_stage_progress_ratio", "humpback_stage_eta_seconds", "humpback_stage_checkpoint_age_seconds",
    "humpback_stage_gpu_memory_bytes",
)

_server_port: int | None = None
_families: dict[str, Any] | None = None


def serve_from_env() -> int | None:
    """Start the metrics endpoint when the pod declares a port; returns the port, or None."""
    global _server_port
    raw = os.environ.get(STAGE_METRICS_PORT_ENV)
    if not raw or _server_port is not None:
        return _server_port
    try:
        port = int(raw)
    except ValueError:
        log.warning("%s must be a port number, got %r: no metrics served", STAGE_METRICS_PORT_ENV, raw)
        return None
    try:
        from prometheus_client import start_http_server
    except ImportError:
        log.info("prometheus_client is not installed (pip install 'humpback[metrics]'): no metrics on :%d", port)
        return None
    start_http_server(port)
    _server_port = port
    log.info("Serving stage metrics on :%d/metrics", port)
    return port


def _make_families() -> dict[str, Any] | None:
    global _families
    if _families is not None:
        return _families
    try:
        from prometheus_client import Counter, Gauge
    except ImportError:
        return None
    c = lambda name, doc: Counter(name.removesuffix("_total"), doc, ["stage"])  # noqa: E731
    g = lambda name, doc: Gauge(name, doc, ["stage"])  # noqa: E731
    _families = {
        "records": c("humpback_stage_records_total", "Records (or training steps) the stage finished."),
        "records_rate": g("humpback_stage_records_per_second", "Records per second over the last minute."),
        "tokens": c("humpback_stage_tokens_total", "Tokens processed (prompt + completion; training: input)."),
        "tokens_rate": g("humpback_stage_tokens_per_second", "Tokens per second over the last minute."),
        "errors": c("humpback_stage_errors_total", "Records that failed or were refused."),
        "retries": c("humpback_stage_request_retries_total", "Requests retried."),
        "ratio": g("humpback_stage_progress_ratio", "Done / total of the stage's current loop."),
        "eta": g("humpback_stage_eta_seconds", "Estimated seconds to the end of the current loop."),
        "checkpoint_age": g("humpback_stage_checkpoint_age_seconds", "Seconds since the last checkpoint."),
        "gpu_memory": g("humpback_stage_gpu_memory_bytes", "GPU memory allocated by torch in this process."),
    }
    return _families


class StageMetrics:
    """Feeds one tracker's snapshots into the metric families (counters by their increase)."""

    def __init__(self, stage: str, families: dict[str, Any], start_done: int = 0):
        self.stage, self.f = stage, families
        # Work an earlier attempt finished is not this process's: counters count from here.
        self._seen = {"done": start_done, "tokens": 0, "errors": 0, "retries": 0}

    def observe(self, snap: dict[str, Any]) -> None:
        f, label = self.f, self.stage
        for field, family in (("done", "records"), ("tokens", "tokens"), ("errors", "errors"), ("retries", "retries")):
            value = int(snap.get(field) or 0)
            delta = value - self._seen[field]
            if delta > 0:
                f[family].labels(label).inc(delta)
            self._seen[field] = value
        f["records_rate"].labels(label).set(snap.get("rate") or 0.0)
        f["tokens_rate"].labels(label).set(snap.get("tokens_per_second") or 0.0)
        if snap.get("total"):
            f["ratio"].labels(label).set(min(1.0, (snap.get("done") or 0) / snap["total"]))
        if snap.get("eta_seconds") is not None:
            f["eta"].labels(label).set(snap["eta_seconds"])
        if snap.get("checkpoint_age_seconds") is not None:
            f["checkpoint_age"].labels(label).set(snap["checkpoint_age_seconds"])
        memory = _gpu_memory()
        if memory is not None:
            f["gpu_memory"].labels(label).set(memory)


class _NoMetrics:
    def observe(self, snap: dict[str, Any]) -> None:
        pass


def stage_metrics(stage: str, start_done: int = 0) -> StageMetrics | _NoMetrics:
    families = _make_families() if _server_port is not None else None
    return StageMetrics(stage, families, start_done) if families else _NoMetrics()


def _gpu_memory() -> int | None:
    torch = sys.modules.get("torch")  # only where the stage already uses torch: never import it here
    try:
        if torch is not None and torch.cuda.is_available():
            return int(torch.cuda.memory_allocated())
    except Exception:  # noqa: BLE001 - a metric must never fail the stage
        return None
    return None
