"""What the operator shows of a running stage (status.stages[].progress, read at a bounded rate),
what stage pods declare for Prometheus, and the operator's stage metrics."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from humpback_operator import backtranslationrun, metrics
from humpback_operator.children import build_stage_children
from humpback_operator.config import OperatorConfig
from humpback_operator.reconcile import PROGRESS_SECONDS, decide
from humpback_runtime.plan import build_plan
from humpback_runtime.pod_contract import STAGE_METRICS_PORT_ENV
from humpback_runtime.spec import parse_run

ROOT = Path(__file__).resolve().parents[3]
CONFIG = OperatorConfig()
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
SNAP = {"stage": "prepare-seed", "state": "running", "phase": "prepare-seed", "unit": "records", "done": 12,
        "total": 40, "rate": 4.0, "eta_seconds": 7.0, "tokens": 0, "tokens_per_second": None, "errors": 0,
        "retries": 0, "last_error": None, "updated": "2026-11-21T12:00:30Z"}


def _body() -> dict:
    doc = yaml.safe_load((ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    doc["spec"]["storage"] = {"uri": "s3://bucket/runs"}
    return doc


def _reconcile(body: dict, children: list[dict], now: datetime, progress=None):
    d = decide(body, children, {}, now, CONFIG, progress=progress)
    if d.needs_store:
        d = decide(body, children, {s: None for s in d.needs_store}, now, CONFIG, progress=progress)
    body["status"] = d.status
    return d


def _stage(body: dict, name: str) -> dict:
    return next(s for s in body["status"]["stages"] if s["name"] == name)


def test_a_running_stage_shows_its_progress_in_status_and_the_printer_column():
    body = _body()
    first = _reconcile(body, [], T0)
    jobs = [o for o in first.create if o["kind"] == "Job"]
    assert {j["metadata"]["labels"]["humpback.dev/stage"] for j in jobs} == {"prepare-seed", "prepare-corpus"}
    d = _reconcile(body, jobs, T0 + timedelta(seconds=30), {"prepare-seed": SNAP})
    progress = _stage(body, "prepare-seed")["progress"]
    assert progress == {"phase": "prepare-seed", "done": 12, "total": 40, "unit": "records", "rate": 4.0,
                        "etaSeconds": 7.0, "updated": "2026-11-21T12:00:30Z",
                        "summary": "12/40 records (30%), 4 records/s, ETA 7s"}
    assert "progress" not in _stage(body, "prepare-corpus")  # nothing read for it yet
    assert body["status"]["stageProgress"] == "prepare-seed 12/40 records (30%), 4 records/s, ETA 7s"
    assert d.requeue_after <= PROGRESS_SECONDS  # looked at again while it runs

    # Between reads the status keeps what it shows; a finished stage shows none.
    _reconcile(body, jobs, T0 + timedelta(seconds=35), {})
    assert _stage(body, "prepare-seed")["progress"]["done"] == 12
    for job in jobs:
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    _reconcile(body, jobs, T0 + timedelta(seconds=40), {"prepare-seed": SNAP})
    assert _stage(body, "prepare-seed")["phase"] == "Succeeded"
    assert "progress" not in _stage(body, "prepare-seed") and body["status"]["stageProgress"] == ""


def test_a_failed_progress_file_is_not_shown_as_progress():
    body = _body()
    jobs = [o for o in _reconcile(body, [], T0).create if o["kind"] == "Job"]
    _reconcile(body, jobs, T0, {"prepare-seed": {**SNAP, "state": "failed", "last_error": "boom"}})
    assert "progress" not in _stage(body, "prepare-seed")


class _CountingProbe:
    def __init__(self):
        self.reads = 0

    async def read_progress(self, body, stages, logger):
        self.reads += 1
        return {s: {**SNAP, "stage": s} for s in stages}


def test_the_operator_reads_progress_files_at_most_once_per_period(monkeypatch):
    op = backtranslationrun.Operator(kube=object(), config=CONFIG)
    op.probe = _CountingProbe()
    body = _body()
    body["status"] = {"stages": [{"name": "prepare-seed", "phase": "Running"}, {"name": "train-m0", "phase": "Pending"}]}
    clock = [1000.0]
    monkeypatch.setattr(backtranslationrun.time, "monotonic", lambda: clock[0])
    log = logging.getLogger("test")

    async def reads():
        first = await backtranslationrun._stage_progress(op, body, log)
        clock[0] += PROGRESS_SECONDS / 2
        second = await backtranslationrun._stage_progress(op, body, log)
        clock[0] += PROGRESS_SECONDS
        third = await backtranslationrun._stage_progress(op, body, log)
        return first, second, third

    first, second, third = asyncio.run(reads())
    assert list(first) == ["prepare-seed"] and second == first and third == first
    assert op.probe.reads == 2  # the second call used the cached read


def test_stage_pods_declare_the_metrics_port_the_operator_is_given():
    run = parse_run(_body(), "tiny")
    plan = build_plan(run)
    config = OperatorConfig(stage_metrics_port=9400)
    job = build_stage_children(run, plan, plan["prepare-seed"], 1, config, None).primary
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert {"name": STAGE_METRICS_PORT_ENV, "value": "9400"} in container["env"]
    training = build_stage_children(run, plan, plan["train-m0"], 1, config, None).primary
    replica = training["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert replica["ports"] == container["ports"]
    # Without a port (the default) nothing is declared: the goldens stay as they are.
    plain = build_stage_children(run, plan, plan["prepare-seed"], 1, CONFIG, None).primary
    assert "ports" not in plain["spec"]["template"]["spec"]["containers"][0]


def test_the_metrics_port_variable_is_checked():
    assert OperatorConfig.from_env({"HUMPBACK_STAGE_METRICS_PORT": "9400"}).stage_metrics_port == 9400
    with pytest.raises(ValueError, match="HUMPBACK_STAGE_METRICS_PORT: expected a port number"):
        OperatorConfig.from_env({"HUMPBACK_STAGE_METRICS_PORT": "http"})
    with pytest.raises(ValueError, match="stage_metrics_port"):
        OperatorConfig(stage_metrics_port=70000)


def _sample(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_operator_metrics_count_retries_by_reason_and_stage_durations():
    before_retry = _sample("humpback_stage_attempt_retries_total", family="curate", reason="ServerFailed")
    before_other = _sample("humpback_stage_attempt_retries_total", family="train", reason="OOMKilled")
    before_count = _sample("humpback_stage_duration_seconds_count", family="train", outcome="Succeeded")
    before_sum = _sample("humpback_stage_duration_seconds_sum", family="train", outcome="Succeeded")
    old = [{"name": "curate-1", "phase": "Running", "attempt": 1},
           {"name": "train-m1", "phase": "Running", "attempt": 1, "startTime": "2026-11-21T12:00:00Z"},
           {"name": "train-m2", "phase": "Running", "attempt": 2}]
    new = [{"name": "curate-1", "phase": "Running", "attempt": 2,
            "message": "attempt 1 failed: vLLM server x: ProgressDeadlineExceeded; attempt 2 of 3 in 30s"},
           {"name": "train-m1", "phase": "Succeeded", "attempt": 1, "startTime": "2026-11-21T12:00:00Z",
            "completionTime": "2026-11-21T12:10:00Z"},
           {"name": "train-m2", "phase": "Running", "attempt": 3, "reason": "OOMKilled"}]
    metrics.observe_stages(old, new)
    metrics.observe_stages(new, new)  # nothing changed: nothing counted twice
    assert _sample("humpback_stage_attempt_retries_total", family="curate", reason="ServerFailed") == before_retry + 1
    assert _sample("humpback_stage_attempt_retries_total", family="train", reason="OOMKilled") == before_other + 1
    assert _sample("humpback_stage_duration_seconds_count", family="train", outcome="Succeeded") == before_count + 1
    assert _sample("humpback_stage_duration_seconds_sum", family="train", outcome="Succeeded") == before_sum + 600
