"""bench/gpu_check.sh on its CPU path (--cpu --tiny): the same scripts and arguments the GPU run
uses, with the tiny model, so the prepared script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two short training runs and a curation run: minutes on 2 cores
@pytest.mark.skipif(os.environ.get("HUMPBACK_SLOW_TESTS") != "1", reason="slow: set HUMPBACK_SLOW_TESTS=1")
@pytest.mark.timeout(600)
def test_gpu_check_runs_its_cpu_smoke_mode(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check (cpu, tiny)" in proc.stdout
    train = json.loads((tmp_path / "train_throughput.json").read_text())["cpu"]["cases"]
    assert [(c["case"], c["packing"], c["attention"]) for c in train] == [
        ("zero2-padded", False, "sdpa"), ("zero2-packed", True, "sdpa_varlen")]
    assert all(c["tokens_per_s_run"] > 0 for c in train) and "speedup_over_padded" in train[1]
    curation = json.loads((tmp_path / "curation_throughput.json").read_text())
    rows = curation["rows"]
    modes = {(r["engine"], r["mode"]) for r in rows}
    assert modes == {("transformers", "logprobs"), ("transformers", "generate")}
    logprobs = next(r for r in rows if r["mode"] == "logprobs")
    assert logprobs["prompt_tokens_per_s"] > 0 and logprobs["device"] == "cpu"
