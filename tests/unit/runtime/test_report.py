"""The HTML report: built from synthetic manifests and shards in a local store."""

from __future__ import annotations

import base64
import html
import re
import sys
from datetime import datetime, timezone
from html.parser import HTMLParser

import pytest

from humpback_runtime.plan import build_plan
from humpback_runtime.report import build_report, collect_report_inputs
from humpback_runtime.spec import parse_run
from humpback_runtime.storage import ShardWriter, open_store, write_success

RUN = "ns/demo"
EVIL = "Explain <script>alert('x')</script> see https://evil.example/x?a=1&b=2"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "embed", "source", "track", "wbr"}


def _plan(iterations: int = 2, evaluation: bool = True):
    return build_plan(parse_run({
        "apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {"baseModel": "tiny", "seed": {"source": "seed.jsonl"}, "corpus": {"source": "corpus.jsonl"},
                 "curation": {"iterations": iterations}, "evaluation": {"enabled": evaluation}},
    }))


def _stage(store, plan, name: str, records: list[dict] | None = None, **fields) -> None:
    if name not in plan:  # a smaller plan: the stage does not exist
        return
    prefix = f"{RUN}/{name}"
    keys = []
    if records is not None:
        with ShardWriter(store, prefix, records_per_shard=4) as writer:
            for r in records:
                writer.write(r)
        keys = writer.shards
    manifest = {"stage": name, "fingerprint": plan[name].fingerprint, "resumed": name == "augment",
                "humpbackVersion": "0.1.0", "outputs": {"records": keys, "count": len(records or [])},
                "timings": {"seconds": 1.5}, **fields}
    write_success(store, prefix, manifest)


def _full_run(store, plan, *, judged: bool = True, mode: str = "generate") -> None:
    seed = [{"id": f"s{i}", "instruction": "Q" * (20 + 7 * i), "response": "A" * (200 + 50 * i)} for i in range(10)]
    _stage(store, plan, "prepare-seed", seed, counts={"records": 40, "roots": 12, "dropped_lang": 2, "pairs": 10})
    _stage(store, plan, "prepare-corpus", [{"id": f"c{i}", "text": "w" * (600 + 40 * i)} for i in range(8)],
           counts={"read": 20, "kept": 8, "missing_text": 1, "too_short": 5, "too_long": 1, "boilerplate": 2,
                   "exact_duplicate": 2, "near_duplicate": 1, "boilerplate_lines_removed": 9,
                   "lsh_candidates": 4, "lsh_rejected": 3})
    for name in ("train-myx", "train-m0", "train-m1", "train-m2"):
        _stage(store, plan, name, metrics={"train_loss": [[s, 3.0 / (s + 1)] for s in range(0, 20, 2)]})
    candidates = [{"id": f"c{i}", "instruction": "I" * (30 + 9 * i), "response": "w" * (600 + 40 * i)}
                  for i in range(8)]
    _stage(store, plan, "augment", candidates, counts={"segments": 8, "candidates": 8, "dropped_empty": 1})
    for k in (1, 2):
        curated = [{**c, "score": 5} for c in candidates[: 2 + k]]
        curated[0]["instruction"] = EVIL
        if mode == "generate":
            scores = {"histogram": {"1": 1, "2": 0, "3": 2, "4": 2, "5": 2 + k}, "unparsable": 1}
        else:
            scores = {"histogram": {"3": 3, "4": 2, "5": 2 + k},
                      "expected_histogram": {"3.1": 2, "4.6": 3, "4.9": 2 + k}}
        _stage(store, plan, f"curate-{k}", curated, mode=mode, scored=8, selected=2 + k, threshold=5, scores=scores)
    evaluation = {
        "judged": judged, "note": None if judged else "no judge configured (spec.evaluation.judge): answers only",
        "judge": {"endpoint": "http://judge:8000/v1", "model": "judge"} if judged else None,
        "sets": {"vicuna80": {"source": "builtin:vicuna80", "prompts": 80, "answers": {}, "pairs": {
            "train-m2-vs-train-m0": {"a": "train-m2", "b": "train-m0", "win_rate": 0.62, "stderr": 0.05, "n": 80,
                                     "wins": 90, "ties": 12, "losses": 55, "unparsed": 3,
                                     "position_consistency": 0.7},
            "train-m2-vs-train-m1": {"a": "train-m2", "b": "train-m1", "win_rate": 0.55, "stderr": 0.06, "n": 79,
                                     "wins": 80, "ties": 10, "losses": 68, "unparsed": 2,
                                     "position_consistency": 0.65}} if judged else {}}},
    }
    _stage(store, plan, "evaluate", [], evaluation=evaluation, outputs={"count": 240})


class _Checker(HTMLParser):
    """Collects tags, attributes and text; fails on unbalanced or misnested elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags, self.imgs, self.ids, self.text = [], [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors
    assert checker.stack == []
    return checker


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def test_full_report_is_one_valid_self_contained_page(store):
    pytest.importorskip("matplotlib")
    plan = _plan()
    _full_run(store, plan)
    inputs = collect_report_inputs(store, RUN, plan)
    page = build_report(**inputs, generated=datetime(2024, 1, 2, tzinfo=timezone.utc))
    doc = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    for sid in ("summary", "stages", "counts", "lengths", "scores", "yield", "loss", "win-rates", "examples"):
        assert sid in doc.ids
    pngs = [src for src in doc.imgs if src.startswith("data:image/png;base64,")]
    assert len(pngs) >= 3 and len(pngs) == len(doc.imgs)
    for src in pngs:
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"matplotlib.org" not in data
    # No script, no external reference: the only URL is the user's, and it is escaped text.
    assert "script" not in doc.tags and "link" not in doc.tags
    assert "&lt;script&gt;" in page and "<script" not in page.lower()
    stripped = page.replace(html.escape(EVIL, quote=True), "")
    assert not re.search(r"https?://", stripped.replace("http://judge:8000/v1", "")), "external reference"
    assert "http://judge:8000/v1" in page  # the judge endpoint is shown as text, not linked
    assert 'href="http' not in page and 'src="http' not in page
    text = " ".join(doc.text)
    assert EVIL in text  # shown to the reader verbatim
    assert "not available" not in text


def test_report_shows_counts_yield_and_win_rates(store):
    plan = _plan()
    _full_run(store, plan)
    inputs = collect_report_inputs(store, RUN, plan)
    text = " ".join(_parse(build_report(**inputs)).text)
    assert "removed: too short" in text and "near duplicate" in text
    # Candidate pairs are not documents: never listed as removals.
    assert "removed: lsh" not in text and "candidate pairs under the threshold (kept) 3" in text
    assert "37.5%" in text and "50.0%" in text  # 3/8 and 4/8 selected
    assert "0.620" in text and "0.050" in text and "train-m2" in text
    assert inputs["scores"][1] == {1.0: 1.0, 3.0: 2.0, 4.0: 2.0, 5.0: 3.0}  # the zero bin dropped
    assert inputs["loss_curves"]["train-m1"][:2] == [(0, 3.0), (2, 1.0)]
    assert sorted(inputs["lengths"]) == ["augmented", "curated-1", "curated-2", "seed"]
    assert len(inputs["lengths"]["curated-2"]["response"]) == 4
    assert inputs["examples"]["curated-1"][0]["instruction"] == EVIL
    assert "report" not in inputs["manifests"]


def test_stage_table_lists_fingerprint_records_seconds_and_resumed(store):
    plan = _plan()
    _full_run(store, plan)
    page = build_report(**collect_report_inputs(store, RUN, plan))
    rows = re.findall(r"<tr><td>augment</td>(.*?)</tr>", page)
    assert rows == [f"<td>done</td><td><code>{plan['augment'].fingerprint}</code></td><td>8</td>"
                    "<td>1.5</td><td>yes</td>"]


def test_missing_stages_say_not_available(store):
    plan = _plan()
    _stage(store, plan, "prepare-seed", [{"id": "s", "instruction": "Hi?", "response": "Hello."}],
           counts={"pairs": 1})
    page = build_report(**collect_report_inputs(store, RUN, plan))
    text = " ".join(_parse(page).text)
    for reason in ("stage prepare-corpus not run", "stage augment not run", "stage curate-k not run",
                   "stage train-* not run", "stage evaluate not run", "no curated pairs"):
        assert f"not available ({reason}" in text, reason
    assert text.count("not run") >= 10  # the stage table marks every missing stage


def test_report_from_manifests_alone_with_odd_fields(store):
    manifests = {"prepare-seed": {"fingerprint": "x", "counts": "garbage", "timings": None},
                 "curate-1": {"selected": 3, "scored": 0, "scores": {"histogram": {"five": 2}}},
                 "train-m0": {"metrics": {"train_loss": [[1, "nan"], "bad"]}}}
    page = build_report(manifests, curate_stages=[(1, "curate-1")], loss_curves={}, scores={}, win_rates=None)
    text = " ".join(_parse(page).text)
    assert "not available (stage evaluate not in the plan: evaluation is not enabled)" in text
    assert "not available (no metrics.train_loss in the train manifests)" in text
    assert "not available (no scores in the curate manifests)" in text


def test_evaluation_without_judge_says_so(store):
    plan = _plan()
    _full_run(store, plan, judged=False)
    text = " ".join(_parse(build_report(**collect_report_inputs(store, RUN, plan))).text)
    assert "not available (no judge configured" in text


def test_logprob_mode_plots_expected_scores(store):
    pytest.importorskip("matplotlib")
    plan = _plan(iterations=1, evaluation=False)
    _full_run(store, plan, mode="logprobs")
    inputs = collect_report_inputs(store, RUN, plan)
    assert inputs["scores"] == {1: {3.1: 2.0, 4.6: 3.0, 4.9: 3.0}}
    page = build_report(**inputs)
    doc = _parse(page)
    assert len(doc.imgs) >= 4
    assert "not available (stage evaluate not in the plan" in " ".join(doc.text)


def test_scores_come_from_records_when_the_stage_writes_every_candidate(store):
    plan = _plan(iterations=1, evaluation=False)
    rows = [{"id": f"c{i}", "instruction": f"q{i}", "response": f"r{i}", "score": s, "selected": (s or 0) >= 4}
            for i, s in enumerate([5, 4, 2, None, 3])]
    _stage(store, plan, "curate-1", rows, scored=5, selected=2)
    inputs = collect_report_inputs(store, RUN, plan)
    assert inputs["scores"][1] == [5.0, 4.0, 2.0, 3.0]
    assert len(inputs["lengths"]["curated-1"]["instruction"]) == 2


def test_without_matplotlib_tables_remain_and_plots_say_why(store, monkeypatch):
    plan = _plan()
    _full_run(store, plan)
    inputs = collect_report_inputs(store, RUN, plan)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    doc = _parse(build_report(**inputs))
    assert doc.imgs == []
    assert "not available (plot: matplotlib is not installed" in " ".join(doc.text)


def test_digit_mass_quantiles_are_in_the_report():
    mass = {"min": 0.01, "p05": 0.02, "p25": 0.3, "p50": 0.61, "p75": 0.8, "p95": 0.9, "max": 0.99, "mean": 0.5}
    manifests = {"curate-1": {"mode": "logprobs", "scored": 4, "selected": 1,
                              "scores": {"histogram": {"5": 4}, "digitMass": mass}}}
    page = build_report(manifests, curate_stages=[(1, "curate-1")], scores={1: [5.0, 4.0, 4.5, 3.0]})
    assert "Probability on the score digits" in page
    assert ">0.610<" in page and ">0.020<" in page


def test_the_report_shows_the_current_selection_of_the_stored_scores(tmp_path):
    from humpback_runtime.context import RunContext
    from humpback_runtime.spec import parse_run
    from humpback_runtime.stages.curate import selection
    from humpback_runtime.storage import ShardWriter, write_success

    run = parse_run({"metadata": {"name": "demo"}, "spec": {"baseModel": "m", "seed": {"source": "s.jsonl"},
                     "corpus": {"source": "c.jsonl"}, "curation": {"mode": "logprobs", "threshold": 4}}})
    ctx = RunContext.create(run, str(tmp_path), identify_inputs=False)
    with ShardWriter(ctx.store, ctx.prefix("curate-1")) as writer:
        for i, score in enumerate([5, 4, 2]):
            writer.write({"id": f"p{i}", "instruction": "i", "response": "r", "score": score, "argmax": score,
                          "expected": float(score), "mass": 0.9})
    write_success(ctx.store, ctx.prefix("curate-1"), {"fingerprint": ctx.plan["curate-1"].fingerprint,
                                                       "mode": "logprobs", "scored": 3, "selected": 99,
                                                       "outputs": {"records": writer.shards}})
    selection(ctx, "curate-1", ctx.plan["train-m1"].settings["selection"])
    inputs = collect_report_inputs(ctx.store, ctx.run_prefix, ctx.plan)
    assert inputs["manifests"]["curate-1"]["selected"] == 2  # threshold 4 now, not what curate-1 first selected
    assert inputs["scores"][1] == [5.0, 4.0, 2.0]
    assert len(inputs["lengths"]["curated-1"]["instruction"]) == 2


def test_report_shows_reference_win_rates_and_mt_bench_grades():
    evaluation = {"judged": True, "note": None, "judge": {"model": "j", "endpoint": "http://j"}, "sets": {
        "ref": {"pairs": {}, "reference": {"generator": "gpt4", "models": {"train-m0": {
            "win_rate": 0.75, "stderr": 0.14, "length_controlled_win_rate": 0.6667, "avg_length": 120.0,
            "reference_avg_length": 300.0, "n": 4}}}},
        "mt": {"pairs": {}, "mt_bench": {"train-m0": {"score": 8.0, "turn_1": 8.5, "turn_2": 7.5,
                                                     "categories": {"math": 9.0, "writing": 7.0},
                                                     "graded": 4, "unparsed": 0}}}}}
    page = build_report({"evaluate": {"evaluation": evaluation}}, curate_stages=[], loss_curves={}, scores={},
                        win_rates=None)
    text = " ".join(_parse(page).text)
    assert "Against reference outputs" in text and "gpt4" in text and "0.667" in text
    assert "MT-Bench" in text and "math 9.00, writing 7.00" in text
