"""Live progress: `<stage>/_PROGRESS.json` while a stage runs, log lines off a terminal, metrics."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request

import pytest

from humpback_runtime import metrics, progress
from humpback_runtime.progress import PROGRESS, format_line, read_progress, stage_progress, track
from humpback_runtime.storage import open_store

PREFIX = "ns/run/curate-1"


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    monkeypatch.setenv(progress.LOG_INTERVAL_ENV, "0.05")


def _wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_a_running_stage_rewrites_its_progress_file_then_marks_it_finished(store):
    with stage_progress(store, PREFIX, "curate-1"):
        assert read_progress(store, PREFIX)["state"] == "running"  # at once, before any loop
        with track("curate-1", total=10, unit="records") as p:
            p.update(3, tokens=120)
            p.retries = 2
            p.error("HTTP 503: busy", count=False)
            p.checkpoint()
            snap = _wait_for(lambda: (s := read_progress(store, PREFIX)) and s["done"] == 3 and s)
            assert snap["state"] == "running" and snap["total"] == 10 and snap["unit"] == "records"
            assert snap["tokens"] == 120 and snap["retries"] == 2 and snap["last_error"] == "HTTP 503: busy"
            assert snap["rate"] > 0 and snap["eta_seconds"] > 0 and snap["tokens_per_second"] > 0
            assert snap["checkpoint_age_seconds"] is not None and snap["updated"].endswith("Z")
            p.update(7)
    final = store.read_json(f"{PREFIX}/{PROGRESS}")
    assert final["state"] == "finished" and final["done"] == 10 and final["eta_seconds"] is None


def test_a_failing_stage_leaves_the_error_in_its_progress_file(store):
    with pytest.raises(ValueError):
        with stage_progress(store, PREFIX, "curate-1"):
            with track("curate-1", total=4) as p:
                p.update(1)
                raise ValueError("score shard unreadable")
    snap = read_progress(store, PREFIX)
    assert snap["state"] == "failed" and snap["done"] == 1
    assert snap["last_error"] == "ValueError: score shard unreadable"


def test_resumed_work_counts_toward_done_but_not_the_rate(store):
    with stage_progress(store, PREFIX, "curate-1"):
        with track("curate-1", total=100, done=90) as p:
            time.sleep(0.1)
            p.update(1)
            snap = p.snapshot()
    assert snap["done"] == 91 and snap["rate"] < 50  # 1 record in ~0.1 s, not 91


def test_off_a_terminal_progress_is_plain_log_lines(store, caplog):
    caplog.set_level(logging.INFO, logger="humpback_runtime.progress")
    with stage_progress(store, PREFIX, "augment"):
        with track("augment", total=40) as p:
            p.update(10)
            _wait_for(lambda: any("augment: 10/40 records (25%)" in r.getMessage() for r in caplog.records))
    line = next(r.getMessage() for r in caplog.records if "10/40" in r.getMessage())
    assert "records/s" in line and "ETA" in line and "\r" not in line


def test_an_unwritable_store_never_fails_the_stage(tmp_path, caplog):
    class Broken:
        def write_json(self, key, obj):
            raise OSError("disk full")

        def url(self, key):
            return f"broken://{key}"

    with stage_progress(Broken(), PREFIX, "augment"):
        with track("augment", total=2) as p:
            p.update(2)
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1  # said once


def test_format_line_reads_like_a_sentence():
    assert format_line({"phase": "train-m1", "unit": "steps", "done": 12, "total": 30, "rate": 0.5,
                        "eta_seconds": 36, "tokens_per_second": 2048.0}) == \
        "train-m1: 12/30 steps (40%), 0.5 steps/s, ETA 36s, 2,048 tokens/s"
    assert format_line({"phase": "prepare-corpus", "done": 7, "total": None}) == "prepare-corpus: 7 records"


def test_the_completions_loop_reports_records_tokens_and_checkpoints(store):
    pytest.importorskip("humpback_testing")
    from humpback_runtime.inference.client import ClientSettings, CompletionsClient, run_completions
    from humpback_testing.openai_stub import StubServer

    records = [{"id": f"r{i}", "text": f"doc {i}"} for i in range(12)]

    async def main(url):
        settings = ClientSettings(base_url=url, model="tiny", concurrency=4)
        async with CompletionsClient(settings) as client:
            return await run_completions(client, records, lambda r: (r["text"], {"max_tokens": 4}),
                                         lambda r, c: {"id": r["id"], "text": c["text"]}, store=store,
                                         prefix=PREFIX, checkpoint_every=5, total=len(records), desc="curate-1")

    with StubServer(text="Score: 5") as stub, stage_progress(store, PREFIX, "curate-1"):
        asyncio.run(main(stub.url))
    snap = read_progress(store, PREFIX)
    assert snap["state"] == "finished" and snap["phase"] == "curate-1"
    assert snap["done"] == snap["total"] == 12 and snap["tokens"] > 12
    assert snap["checkpoint_age_seconds"] is not None and snap["errors"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_metrics_are_served_on_the_declared_port(store, monkeypatch):
    pytest.importorskip("prometheus_client")
    port = _free_port()
    monkeypatch.setenv(metrics.STAGE_METRICS_PORT_ENV, str(port))
    monkeypatch.setattr(metrics, "_server_port", None)
    assert metrics.serve_from_env() == port
    with stage_progress(store, PREFIX, "augment"):
        with track("augment", total=8) as p:
            p.update(5, tokens=50)
            p.retries = 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'humpback_stage_records_total{stage="augment"} 5.0' in body
    assert 'humpback_stage_tokens_total{stage="augment"} 50.0' in body
    assert 'humpback_stage_request_retries_total{stage="augment"} 1.0' in body
    assert 'humpback_stage_progress_ratio{stage="augment"} 0.625' in body
    for name in metrics.METRIC_NAMES:
        if name != "humpback_stage_gpu_memory_bytes":  # only where torch sees a GPU
            assert f"# TYPE {name.removesuffix('_total')}" in body, name


def test_without_prometheus_client_the_stage_runs_and_says_so(monkeypatch, caplog):
    monkeypatch.setenv(metrics.STAGE_METRICS_PORT_ENV, str(_free_port()))
    monkeypatch.setattr(metrics, "_server_port", None)
    monkeypatch.setitem(__import__("sys").modules, "prometheus_client", None)
    caplog.set_level(logging.INFO, logger="humpback_runtime.metrics")
    assert metrics.serve_from_env() is None
    assert any("prometheus_client is not installed" in r.getMessage() for r in caplog.records)
    assert isinstance(metrics.stage_metrics("augment"), metrics._NoMetrics)


def test_the_cli_quiets_third_party_chatter(monkeypatch):
    from humpback_runtime.cli import setup_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(logging.getLogger("matplotlib"), "level", logging.NOTSET)
    setup_logging()
    # Read by huggingface_hub and transformers when they load: no download or weight-loading bars.
    assert __import__("os").environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert logging.getLogger("matplotlib").level == logging.WARNING  # "Using categorical units ..." is INFO
