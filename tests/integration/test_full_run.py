"""The demo run, every stage for real on CPU, killed mid-curation and resumed: `make demo` as a test."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from humpback_runtime.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.mark.timeout(1800)  # two passes over the whole method: about 2 minutes on an idle 2-core machine
def test_whole_run_survives_a_kill_mid_curation(tmp_path, tiny_model):
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    data["spec"]["baseModel"] = str(tiny_model)
    data["spec"]["storage"]["uri"] = str(tmp_path / "runs")
    for part in ("seed", "corpus"):  # the example's paths are relative to examples/; this file lives elsewhere
        data["spec"][part]["source"] = str(ROOT / "examples" / data["spec"][part]["source"])
    data["spec"]["inference"]["checkpointEvery"] = 20
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs" / "default" / "tiny-cpu"
    cmd = [sys.executable, "-m", "humpback_runtime", "run", str(spec)]

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not list((run_dir / "curate-1").glob("part-*.jsonl")):
            assert proc.poll() is None, "the run ended before curate-1 wrote its first shard"
            assert time.monotonic() < deadline, "curate-1 wrote no shard within 10 minutes"
            time.sleep(0.05)
    finally:
        # A crash: no cleanup, no chance to finish the stage. The stage runs in its own process
        # group (its lease names its PID); killed first, so it does not stop cleanly when the
        # runner dies (it would: the runner's death sends it SIGTERM).
        lease = run_dir / "curate-1" / "_LEASE.json"
        if lease.exists():
            os.killpg(json.loads(lease.read_text())["holder"]["pid"], signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "curate-1" / "_SUCCESS.json").exists()
    finished_before = {p.parent.name for p in run_dir.glob("*/_SUCCESS.json")}
    assert {"prepare-seed", "prepare-corpus", "train-myx", "train-m0", "augment"} <= finished_before

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name in sorted(finished_before):
        assert f"{name}: done (fingerprint" in resumed.stdout  # skipped, not redone

    def manifest(stage):
        return json.loads((run_dir / stage / "_SUCCESS.json").read_text())

    curate = manifest("curate-1")
    assert curate["resumed"] is True
    candidates = manifest("augment")["outputs"]["count"]
    scored_ids = [json.loads(line)["id"] for p in sorted((run_dir / "curate-1").glob("part-*.jsonl"))
                  for line in p.read_text().splitlines()]
    assert len(scored_ids) == len(set(scored_ids)) == candidates == curate["scored"]  # none lost, none twice
    assert manifest("train-m2")["counts"]["curated"] == manifest("curate-2")["selected"]
    for stage in ("train-myx", "train-m0", "train-m1", "train-m2"):
        assert (run_dir / stage / "model" / "model.safetensors").exists()
        assert (run_dir / stage / "model" / "README.md").exists()
    assert manifest("evaluate")["outputs"]["answers"] == 3 * 80
    report = (run_dir / "report" / "index.html").read_text()
    assert "curated pairs, iteration 2" in report and "data:image/png;base64," in report
