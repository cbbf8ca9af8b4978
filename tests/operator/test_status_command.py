"""`humpback status --kube NAME`: reads the run from the (emulated) API server and its store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes
import yaml

from humpback_runtime.plan import build_plan
from humpback_runtime.spec import parse_run
from humpback_runtime.storage import open_store, write_success

REPO_ROOT = Path(__file__).resolve().parents[2]
BTR = ("humpback.dev", "v1alpha1", "backtranslationruns")


def test_status_of_a_cluster_run_reads_its_status_and_its_store(kube_api, kube_env, tmp_path):
    doc = yaml.safe_load((REPO_ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["storage"] = {"uri": str(tmp_path / "store")}
    plan = build_plan(parse_run(doc, "tiny"))
    store = open_store(str(tmp_path / "store"))
    write_success(store, "default/tiny-cpu/prepare-seed", {"fingerprint": plan["prepare-seed"].fingerprint,
                                                           "outputs": {"count": 64}, "timings": {"seconds": 1.0}})
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(*BTR[:2], "default", BTR[2], doc)
    custom.patch_namespaced_custom_object_status(*BTR[:2], "default", BTR[2], "tiny-cpu", {"status": {
        "phase": "Running", "progress": "1/11", "stageProgress": "prepare-corpus 30/200 records (15%)",
        "stages": [
            {"name": "prepare-seed", "phase": "Succeeded", "attempt": 1, "startTime": "2026-11-21T11:00:00Z",
             "completionTime": "2026-11-21T11:00:04Z", "message": "attempt 1 succeeded"},
            {"name": "prepare-corpus", "phase": "Running", "attempt": 2, "startTime": "2026-11-21T11:00:00Z",
             "message": "attempt 1 failed: Job failed: BackoffLimitExceeded; attempt 2 of 3 running",
             "progress": {"done": 30, "total": 200, "unit": "records", "rate": 2.5, "etaSeconds": 68.0,
                          "summary": "30/200 records (15%), 2.5 records/s, ETA 1m08s"}},
            {"name": "train-m0", "phase": "Pending", "attempt": 0, "message": "waiting for prepare-seed"}]}},
        _content_type="application/merge-patch+json")

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "humpback_runtime", "status", "--kube", "tiny-cpu", *args],
                              env=kube_env, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    out = status("-n", "default", "-o", "json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    rows = {r["stage"]: r for r in result["stages"]}
    assert result["run"] == "default/tiny-cpu" and result["phase"] == "Running"
    assert rows["prepare-seed"]["out"] == 64  # from the store
    corpus = rows["prepare-corpus"]
    assert (corpus["state"], corpus["attempt"], corpus["done"], corpus["eta_seconds"]) == ("Running", 2, 30, 68.0)
    assert "BackoffLimitExceeded" in corpus["reason"]
    assert rows["train-m0"]["reason"] == "waiting for prepare-seed"

    table = status()  # the kubeconfig's namespace
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("prepare-corpus"))
    assert "Running" in line and "30/200" in line and "1m08s" in line

    missing = subprocess.run([sys.executable, "-m", "humpback_runtime", "status", "--kube", "nope", "-n", "default"],
                             env=kube_env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no BacktranslationRun 'nope' in namespace 'default'" in missing.stderr
