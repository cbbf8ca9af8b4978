"""Score once, select many: curate-k's selection over stored scores (humpback_runtime.stages.curate)."""

from __future__ import annotations

import pytest

from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError
from humpback_runtime.spec import parse_run
from humpback_runtime.stages.curate import mass_quantiles, score_summary, selected_pairs, selection
from humpback_runtime.storage import ShardWriter, read_success


def ctx_with_scores(tmp_path, scores, **curation):
    run = parse_run({"metadata": {"name": "demo"}, "spec": {
        "baseModel": "m", "seed": {"source": "s.jsonl"}, "corpus": {"source": "c.jsonl"},
        "curation": {"mode": "logprobs", **curation}}})
    ctx = RunContext.create(run, str(tmp_path / "runs"), identify_inputs=False)
    with ShardWriter(ctx.store, ctx.prefix("curate-1")) as writer:
        for i, (argmax, expected, mass) in enumerate(scores):
            writer.write({"id": f"p{i}", "instruction": f"i{i}", "response": f"r{i}", "score": argmax,
                          "argmax": argmax, "expected": expected, "mass": mass})
    return ctx


def current(ctx):
    return ctx.plan["train-m1"].settings["selection"]


def test_a_pair_with_little_mass_on_the_digits_is_unscored_and_counted(tmp_path):
    # p1: argmax 5 from 2 % of the probability: the rater wanted to write something else.
    ctx = ctx_with_scores(tmp_path, [(5, 4.8, 0.9), (5, 4.9, 0.02), (3, 3.1, 0.8)], threshold=5)
    pairs, chosen = selected_pairs(ctx, "curate-1", current(ctx))
    assert [p["id"] for p in pairs] == ["p0"]
    assert chosen["belowMinDigitMass"] == 1 and chosen["scored"] == 3 and chosen["selected"] == 1
    assert any("minDigitMass" in w for w in chosen["warnings"])
    looser = ctx_with_scores(tmp_path / "b", [(5, 4.8, 0.9), (5, 4.9, 0.02)], threshold=5, minDigitMass=0.01)
    assert [p["id"] for p in selected_pairs(looser, "curate-1", current(looser))[0]] == ["p0", "p1"]


def test_selections_live_side_by_side_and_are_reused(tmp_path):
    scores = [(5, 4.6, 0.9), (4, 4.1, 0.9), (4, 3.9, 0.9), (2, 2.2, 0.9)]
    ctx5 = ctx_with_scores(tmp_path, scores, threshold=5)
    ctx4 = ctx_with_scores(tmp_path, scores, threshold=4)
    five, four = selection(ctx5, "curate-1", current(ctx5)), selection(ctx4, "curate-1", current(ctx4))
    assert (five["selected"], four["selected"]) == (1, 3)
    assert five["prefix"].endswith("curate-1/selected/threshold-5-argmax-mass-0.5")
    assert four["prefix"].endswith("curate-1/selected/threshold-4-argmax-mass-0.5")
    assert read_success(ctx5.store, five["prefix"])["selected"] == 1  # both kept, each with its manifest
    assert read_success(ctx4.store, four["prefix"])["selected"] == 3
    assert selection(ctx5, "curate-1", current(ctx5)) == read_success(ctx5.store, five["prefix"])


def test_expected_with_a_high_threshold_warns_when_it_keeps_under_one_percent(tmp_path):
    scores = [(5, 4.7, 0.9)] * 150 + [(5, 5.0, 0.9)]
    ctx = ctx_with_scores(tmp_path, scores, threshold=5, selectBy="expected", minYield=0)
    chosen = selection(ctx, "curate-1", current(ctx))
    assert chosen["selected"] == 1
    assert any("selectBy expected with threshold 5 keeps 1 of 151" in w for w in chosen["warnings"])
    assert chosen["yield"]["warnings"] == chosen["warnings"]  # the run's summary table shows them


def test_a_selection_under_min_yield_fails_with_the_counts(tmp_path):
    ctx = ctx_with_scores(tmp_path, [(3, 3.0, 0.9)] * 10, threshold=5, minYield=0.5)
    with pytest.raises(StageError, match=r"10 of 10 scored below 5: lower curation.threshold.*kept 0 of 10"):
        selection(ctx, "curate-1", current(ctx))
    assert read_success(ctx.store, f"{ctx.prefix('curate-1')}/selected/threshold-5-argmax-mass-0.5") is None


def test_a_low_selection_names_its_cause_among_the_warnings_without_a_floor(tmp_path):
    ctx = ctx_with_scores(tmp_path, [(3, 3.0, 0.9)] * 9 + [(5, 5.0, 0.9)], threshold=5, minYield=0)
    chosen = selection(ctx, "curate-1", current(ctx))
    assert chosen["selected"] == 1
    assert chosen["yield"]["warnings"] == ["9 of 10 scored below 5: lower curation.threshold"]
    plenty = ctx_with_scores(tmp_path / "b", [(5, 5.0, 0.9)] * 9 + [(3, 3.0, 0.9)], threshold=5, minYield=0)
    assert selection(plenty, "curate-1", current(plenty))["warnings"] == []


def test_digit_mass_quantiles_go_into_the_manifest(tmp_path):
    ctx = ctx_with_scores(tmp_path, [(5, 4.0, m / 100) for m in range(1, 101)])
    summary = score_summary(ctx, ctx.prefix("curate-1"), "logprobs")
    mass = summary["scores"]["digitMass"]
    assert (mass["min"], mass["p05"], mass["p50"], mass["p95"], mass["max"]) == (0.01, 0.05, 0.5, 0.95, 1.0)
    assert mass_quantiles([0.3]) == {"min": 0.3, "p05": 0.3, "p25": 0.3, "p50": 0.3, "p75": 0.3, "p95": 0.3,
                                     "max": 0.3, "mean": 0.3}
