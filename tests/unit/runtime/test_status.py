"""`humpback status RUN.yaml`: one row per stage from the store, for people (a table) and scripts (JSON)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from humpback_runtime.cli import main
from humpback_runtime.context import RunContext
from humpback_runtime.progress import PROGRESS
from humpback_runtime.spec import load_run
from humpback_runtime.status import kube_status, local_status, render_table
from humpback_runtime.storage import write_success

ROOT = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.fixture
def run_file(tmp_path) -> Path:
    doc = yaml.safe_load((ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["spec"]["storage"] = {"uri": str(tmp_path / "store")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def ctx(run_file) -> RunContext:
    return RunContext.create(load_run(str(run_file)))


def _done(ctx: RunContext, name: str, count: int, seconds: float = 2.0, fingerprint: str | None = None) -> None:
    write_success(ctx.store, ctx.prefix(name), {
        "stage": name, "fingerprint": fingerprint or ctx.plan[name].fingerprint,
        "outputs": {"count": count}, "timings": {"seconds": seconds}})


def _progress(ctx: RunContext, name: str, **fields) -> None:
    snap = {"stage": name, "state": "running", "phase": name, "unit": "records", "done": 30, "total": 120,
            "rate": 1.5, "eta_seconds": 60.0, "tokens_per_second": 900.0, "last_error": None,
            "started": _iso(NOW - timedelta(seconds=20)), "updated": _iso(NOW - timedelta(seconds=3)),
            "elapsed_seconds": 17.0, **fields}
    ctx.store.write_json(f"{ctx.prefix(name)}/{PROGRESS}", snap)


def _rows(result: dict) -> dict[str, dict]:
    return {r["stage"]: r for r in result["stages"]}


def test_rows_say_state_counts_rate_eta_and_why_a_stage_waits(ctx):
    _done(ctx, "prepare-seed", 64, seconds=0.3)
    _done(ctx, "prepare-corpus", 106, seconds=2.4)
    _done(ctx, "train-myx", 64, seconds=300)
    _progress(ctx, "augment")
    result = local_status(ctx, NOW)
    rows = _rows(result)
    assert list(rows) == ctx.plan.names()  # one row per stage of the plan, report included
    assert result["phase"] == "Running"
    corpus = rows["prepare-corpus"]
    assert (corpus["state"], corpus["out"], corpus["seconds"]) == ("Succeeded", 106, 2.4)
    augment = rows["augment"]
    assert augment["state"] == "Running" and augment["in"] == 106  # the corpus segments (models are no records)
    assert (augment["done"], augment["total"], augment["rate"], augment["eta_seconds"]) == (30, 120, 1.5, 60.0)
    assert augment["seconds"] == 20.0
    assert rows["train-m0"]["state"] == "Pending" and rows["train-m0"]["reason"] == "ready to run"
    assert rows["curate-1"]["reason"] == "waiting for augment, train-m0"

    text = render_table(result)
    lines = text.splitlines()
    assert lines[0].startswith("Run default/tiny-cpu: Running")
    assert lines[1].split() == ["STAGE", "STATE", "ATTEMPT", "DURATION", "IN", "OUT", "RATE", "ETA", "REASON"]
    assert len(lines) == 2 + len(ctx.plan.names())
    line = next(ln for ln in lines if ln.startswith("augment "))
    assert "Running" in line and "30/120" in line and "1.5 records/s, 900 tok/s" in line and "1m00s" in line
    assert "5m00s" in next(ln for ln in lines if ln.startswith("train-myx "))


def test_a_failed_stage_shows_its_error_and_fails_the_run(ctx):
    _done(ctx, "prepare-seed", 64)
    _progress(ctx, "prepare-corpus", state="failed", last_error="DataError: c4.jsonl:17: not JSON")
    result = local_status(ctx, NOW)
    row = _rows(result)["prepare-corpus"]
    assert result["phase"] == "Failed" and row["state"] == "Failed"
    assert row["reason"] == "DataError: c4.jsonl:17: not JSON"


def test_a_stage_whose_process_is_gone_is_stalled_and_edited_settings_are_named(ctx):
    _done(ctx, "prepare-seed", 64, fingerprint="0ld")
    _progress(ctx, "prepare-corpus", updated=_iso(NOW - timedelta(minutes=10)))
    rows = _rows(local_status(ctx, NOW))
    assert rows["prepare-corpus"]["state"] == "Stalled" and "no progress for 10m00s" in rows["prepare-corpus"]["reason"]
    assert rows["prepare-seed"]["state"] == "Pending"
    assert rows["prepare-seed"]["reason"] == "settings changed since it ran: runs again"


def test_cli_prints_json_for_scripts_and_exits_when_the_run_is_over(ctx, run_file, capsys):
    for stage in ctx.plan.stages:
        _done(ctx, stage.name, 1)
    assert main(["status", str(run_file), "-o", "json", "--watch", "0.01"]) == 0  # finished: no waiting
    result = json.loads(capsys.readouterr().out)
    assert result["phase"] == "Succeeded" and len(result["stages"]) == len(ctx.plan.stages)
    assert main(["status", str(run_file), "--kube", "x"]) == 2  # a file or --kube, not both
    assert "not both" in capsys.readouterr().err


def test_kube_rows_come_from_the_run_status_completed_by_the_store(ctx):
    _done(ctx, "prepare-seed", 64, seconds=1.0)
    _progress(ctx, "prepare-corpus", done=50, total=200)
    body = {"metadata": {"name": "tiny-cpu", "namespace": "default"}, "status": {"phase": "Running", "stages": [
        {"name": "prepare-seed", "phase": "Succeeded", "attempt": 1, "startTime": "2026-11-21T11:00:00Z",
         "completionTime": "2026-11-21T11:00:05Z", "message": "attempt 1 succeeded"},
        {"name": "prepare-corpus", "phase": "Running", "attempt": 2, "startTime": "2026-11-21T11:59:00Z",
         "message": "attempt 2 running", "progress": {"done": 10, "total": 200, "unit": "records"}},
        {"name": "train-m0", "phase": "Pending", "attempt": 0, "message": "waiting for prepare-seed"}]}}
    rows = _rows(kube_status(body, ctx, NOW))
    assert rows["prepare-seed"]["out"] == 64 and rows["prepare-seed"]["seconds"] == 1.0
    corpus = rows["prepare-corpus"]
    assert corpus["attempt"] == 2 and corpus["done"] == 50  # the store is fresher than the status
    assert rows["train-m0"]["reason"] == "waiting for prepare-seed"
    # Without the store (no credentials here), the cluster's own view still stands.
    rows = _rows(kube_status(body, None, NOW, store_error="no credentials"))
    assert rows["prepare-corpus"]["done"] == 10 and rows["prepare-corpus"]["seconds"] == 60.0
