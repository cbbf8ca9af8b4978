"""Yield floors and the end-of-run summary (issue 10): a stage that keeps too little fails with the
counts and the likely cause; `humpback run` ends with one row per stage."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError
from humpback_runtime.runner import print_summary
from humpback_runtime.spec import parse_run
from humpback_runtime.stages import run_stage
from humpback_runtime.storage import write_success

ROOT = Path(__file__).resolve().parents[3]


def tiny_ctx(tmp_path, **seed) -> RunContext:
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    data["spec"]["seed"].update(source=str(ROOT / "examples" / data["spec"]["seed"]["source"]), **seed)
    data["spec"]["corpus"]["source"] = str(ROOT / "examples" / data["spec"]["corpus"]["source"])
    return RunContext.create(parse_run(data), str(tmp_path / "runs"), identify_inputs=False)


def test_the_seed_under_its_yield_floor_fails_with_the_likely_cause(tmp_path):
    kept = run_stage(tiny_ctx(tmp_path / "a", minQuality=0.9, minYield=0.0), "prepare-seed")
    n_in, n_out = kept["yield"]["in"], kept["yield"]["out"]
    assert 0 < n_out < n_in and kept["counts"]["dropped_quality"] > 0

    with pytest.raises(StageError) as err:
        run_stage(tiny_ctx(tmp_path / "b", minQuality=0.9, minYield=0.99), "prepare-seed")
    dropped = kept["counts"]["dropped_quality"]
    assert str(err.value).startswith(f"{dropped} of {n_in} pairs are under seed.minQuality: lower seed.minQuality. "
                                     f"prepare-seed kept {n_out} of {n_in} ")
    assert "below seed.minYield (0.99)" in str(err.value)


def test_the_summary_has_a_row_per_stage_with_its_counts_and_warnings(tmp_path):
    ctx = tiny_ctx(tmp_path)
    write_success(ctx.store, ctx.prefix("prepare-seed"), {
        "fingerprint": ctx.plan["prepare-seed"].fingerprint,
        "yield": {"in": 80, "out": 64, "fraction": 0.8, "warnings": ["3 bad records"]}})
    write_success(ctx.store, ctx.prefix("augment"), {
        "fingerprint": ctx.plan["augment"].fingerprint,
        "yield": {"in": 42, "out": 4, "fraction": 0.0952,
                  "warnings": ["38 of 42 instructions hit maxTokens: raise augmentation.maxTokens"]}})
    out = io.StringIO()
    print_summary(ctx, ["prepare-seed", "prepare-corpus", "augment", "curate-1"],
                  {"prepare-seed": "skipped", "prepare-corpus": "FAILED", "augment": "ran"}, out)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["", "Summary:"]
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["STAGE", "THIS", "RUN", "IN", "OUT", "KEPT", "WARNINGS"]
    assert rows[1] == ["prepare-seed", "skipped", "80", "64", "80%", "3", "bad", "records"]
    assert rows[2] == ["prepare-corpus", "FAILED", "-", "-", "-", "-"]
    assert rows[3][:5] == ["augment", "ran", "42", "4", "10%"]
    assert " ".join(rows[3][5:]) == "38 of 42 instructions hit maxTokens: raise augmentation.maxTokens"
    assert rows[4] == ["curate-1", "not", "run", "-", "-", "-", "-"]
    # Columns line up: every value starts where its header does.
    header = lines[2]
    assert lines[5].index("42") == header.index("IN") and lines[5].index("10%") == header.index("KEPT")
