"""The HTML report: built from synthetic manifests and shards in a local store."""

from __future__ import annotations

import base64
import html
import logging
import re
import sys
from datetime import datetime, timedelta, timezone
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


def _shards(store, prefix: str, records: list[dict]) -> list[str]:
    with ShardWriter(store, prefix, records_per_shard=4) as writer:
        for r in records:
            writer.write(r)
    return writer.shards


def _stage(store, plan, name: str, records: list[dict] | None = None, **fields) -> None:
    if name not in plan:  # a smaller plan: the stage does not exist
        return
    prefix = f"{RUN}/{name}"
    keys = _shards(store, prefix, records) if records is not None else []
    index = plan.names().index(name)
    started = datetime(2024, 1, 1, 10, 0, tzinfo=timezone.utc) + timedelta(minutes=2 * index)
    manifest = {"stage": name, "fingerprint": plan[name].fingerprint, "resumed": name == "augment",
                "humpbackVersion": "0.1.0", "outputs": {"records": keys, "count": len(records or [])},
                "timings": {"seconds": 1.5, "started": started.isoformat(),
                            "finished": (started + timedelta(seconds=90)).isoformat()}, **fields}
    write_success(store, prefix, manifest)


def _full_run(store, plan, *, judged: bool = True, mode: str = "generate") -> None:
    seed = [{"id": f"s{i}", "instruction": "Q" * (20 + 7 * i), "response": "A" * (200 + 50 * i)} for i in range(10)]
    _stage(store, plan, "prepare-seed", seed, counts={"records": 40, "roots": 12, "dropped_lang": 2, "pairs": 10},
           badRecords={"count": 2, "examples": ["seed.jsonl:7: not JSON"]})
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
            scores = {"histogram": {"1": 1, "2": 0, "3": 2, "4": 2, "5": 2 + k}, "unparsable": 1,
                      "unparsableRate": 0.125, "threshold": 5}
        else:
            scores = {"histogram": {"3": 3, "4": 2, "5": 2 + k},
                      "expected_histogram": {"3.1": 2, "4.6": 3, "4.9": 2 + k}, "threshold": 5}
        if name_in(plan, f"curate-{k}"):  # every scored candidate, as the stage writes them (outputs.scores)
            rows = [{**c, "score": float(s), "argmax": s, "expected": s - 0.3, "mass": 0.5 + 0.05 * i,
                     "probs": {str(s): 0.9}} if mode == "logprobs" else {**c, "score": s, "judgement": f"Score: {s}"}
                    for i, (c, s) in enumerate(zip(candidates, [5, 5, 5, 3, 4, 3, 4, 1][: 8 - (2 - k)] + [5] * (2 - k)))]
            rows[0]["instruction"] = EVIL  # the best pair: shown among the examples
            scores_keys = _shards(store, f"{RUN}/curate-{k}", rows)
            selected = _shards(store, f"{RUN}/curate-{k}/selected", curated)
            _stage(store, plan, f"curate-{k}", None, mode=mode, scored=8, selected=2 + k, threshold=5, scores=scores,
                   outputs={"records": selected, "count": len(curated), "scores": scores_keys})
    answers = {}
    if "evaluate" in plan:
        from humpback_runtime.evaluation import load_eval_set

        prompts = load_eval_set("builtin:vicuna80")[:4]
        for i, model in enumerate(("train-m0", "train-m1", "train-m2")):
            prefix = f"{RUN}/evaluate/answers/vicuna80/{model}"
            _shards(store, prefix, [{"id": p["id"], "answer": f"{model} says <b>{'x' * (40 * (i + 1))}</b>"}
                                    for p in prompts])
            answers[model] = {"prefix": prefix, "count": len(prompts)}
    evaluation = {
        "judged": judged, "note": None if judged else "no judge configured (spec.evaluation.judge): answers only",
        "judge": {"endpoint": "http://judge:8000/v1", "model": "judge"} if judged else None,
        "sets": {"vicuna80": {"source": "builtin:vicuna80", "prompts": 80, "answers": answers, "pairs": {
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


def name_in(plan, name: str) -> bool:
    return name in plan


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
    assert sorted(inputs["scores"][1]) == [3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0]  # every scored candidate
    assert inputs["loss_curves"]["train-m1"][:2] == [(0, 3.0), (2, 1.0)]
    assert sorted(inputs["lengths"]) == ["candidates", "curated-1", "curated-2", "seed"]
    assert len(inputs["lengths"]["curated-2"]["response"]) == 4
    assert inputs["examples"]["curated-1"][0]["instruction"] == EVIL
    assert "report" not in inputs["manifests"]


def test_stage_table_lists_fingerprint_records_seconds_and_resumed(store):
    plan = _plan()
    _full_run(store, plan)
    page = build_report(**collect_report_inputs(store, RUN, plan))
    stages = re.search(r'<section id="stages">(.*?)</section>', page, re.S).group(1)
    rows = re.findall(r"<tr><td>augment</td>(.*?)</tr>", stages)
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


def _capture_figures(monkeypatch) -> list:
    from humpback_runtime import report

    figures, original = [], report._Plots.img

    def img(self, fig, alt):
        figures.append(fig)
        return original(self, fig, alt)

    monkeypatch.setattr(report._Plots, "img", img)
    return figures


def test_logprob_mode_plots_the_score_selection_used_with_the_threshold_and_digit_mass(store, monkeypatch):
    pytest.importorskip("matplotlib")
    plan = _plan(iterations=1, evaluation=False)  # selectBy: argmax (the default)
    _full_run(store, plan, mode="logprobs")
    inputs = collect_report_inputs(store, RUN, plan)
    # The most likely digit of every candidate, as selection compared it; not the expected score.
    assert sorted(inputs["scores"][1]) == [3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert inputs["curation"][1]["basis"] == "argmax" and inputs["curation"][1]["threshold"] == 5
    figures = _capture_figures(monkeypatch)
    page = build_report(**inputs)
    doc = _parse(page)
    assert len(doc.imgs) >= 4
    text = " ".join(doc.text)
    assert "not available (stage evaluate not in the plan" in text
    assert "most likely score (argmax)" in text
    (ax,) = next(f for f in figures if "threshold" in str(f.axes[0].get_legend_handles_labels()[1])).axes
    (label,) = ax.get_legend_handles_labels()[1]
    assert label.startswith("threshold 5: keep ≥") and "argmax" in label
    assert ax.get_xlabel() == "most likely score (argmax)"
    # Digit mass quantiles, in logprobs mode only.
    mass = re.search(r"Probability mass on the digits.*?</table>", page, re.S).group(0)
    assert "<th>median</th>" in mass and "<td>0.700</td>" in mass


def test_expected_selection_is_plotted_as_expected_scores(store):
    plan = build_plan(parse_run({
        "apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {"baseModel": "tiny", "seed": {"source": "seed.jsonl"}, "corpus": {"source": "corpus.jsonl"},
                 "curation": {"iterations": 1, "mode": "logprobs", "selectBy": "expected", "threshold": 4.5},
                 "evaluation": {"enabled": False}}}))
    rows = [{"id": f"c{i}", "instruction": f"q{i}", "response": f"r{i}", "score": e, "argmax": 5, "expected": e,
             "mass": 0.9} for i, e in enumerate([4.9, 4.4, 3.2])]
    keys = _shards(store, f"{RUN}/curate-1", rows)
    write_success(store, f"{RUN}/curate-1", {"fingerprint": plan["curate-1"].fingerprint, "mode": "logprobs",
                                             "scored": 3, "selected": 1, "outputs": {"scores": keys, "count": 1}})
    inputs = collect_report_inputs(store, RUN, plan)
    assert inputs["scores"][1] == [4.9, 4.4, 3.2] and inputs["curation"][1]["basis"] == "expected"
    assert inputs["curation"][1]["threshold"] == 4.5
    examples = inputs["curation"][1]
    assert [r["score"] for r in examples["best"]] == [4.9, 4.4, 3.2]
    assert [r["score"] for r in examples["borderline"]] == [4.9, 4.4] and [r["score"] for r in examples["rejected"]] == [3.2]


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
    assert "Probability mass on the digits 1–5" in page
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
@pytest.fixture(scope="module")
def full_page(tmp_path_factory) -> str:
    """The report of a 2-iteration run with evaluation (generate mode), built once for the tests below."""
    store = open_store(str(tmp_path_factory.mktemp("full") / "store"))
    plan = _plan()
    _full_run(store, plan)
    return build_report(**collect_report_inputs(store, RUN, plan))


def _section_of(page: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S).group(1)


def _text(html_part: str) -> str:
    return " ".join(" ".join(_parse(f"<div>{html_part}</div>").text).split())


def test_verdict_banner_says_succeeded_with_the_plans_stage_count_and_wall_clock(full_page):
    page = full_page
    banner = re.search(r'<div class="verdict ok" id="verdict">(.*?)</div>', page, re.S).group(1)
    # 11 stages in the plan, the report among them (this page is its output); 10 had "10 of 10".
    assert _text(banner) == "Succeeded · 11 of 11 stages finished · wall-clock 19m30s"


def test_verdict_says_failed_or_running_from_the_progress_files(store):
    plan = _plan(iterations=1, evaluation=False)
    _stage(store, plan, "prepare-seed", [{"id": "s", "instruction": "Hi?", "response": "Hello."}], counts={"pairs": 1})
    store.write_json(f"{RUN}/prepare-corpus/_PROGRESS.json", {"state": "running", "phase": "prepare-corpus",
                                                              "done": 50, "total": 200, "unit": "records"})
    text = _text(build_report(**collect_report_inputs(store, RUN, plan)))
    assert "Running · 1 of 8 stages finished" in text and "prepare-corpus: 50/200 records (25%)" in text
    store.write_json(f"{RUN}/prepare-corpus/_PROGRESS.json", {"state": "failed", "done": 50,
                                                              "last_error": "DataError: c4.jsonl:3: <bad>"})
    page = build_report(**collect_report_inputs(store, RUN, plan))
    assert 'class="verdict fail"' in page and "stage prepare-corpus failed: DataError: c4.jsonl:3: &lt;bad&gt;" in page


def test_settings_warnings_and_funnel_come_first(full_page):
    page = full_page
    settings = _text(_section_of(page, "settings"))
    for expected in ("base model tiny", "seed source seed.jsonl", "iterations 2", "curation mode generate",
                     "curation threshold 5", "selection compares parsed score (generate)", "evaluation sets vicuna80"):
        assert expected in settings, expected
    warnings = _text(_section_of(page, "warnings"))
    assert "prepare-seed: 2 bad input record(s) skipped, e.g. seed.jsonl:7: not JSON" in warnings
    assert "curate-1: 12.5% of the scores were unparsable (not kept)" in warnings
    funnel = re.findall(r"<tr>(.*?)</tr>", _section_of(page, "funnel"))
    assert [_text(c) for c in re.findall(r"<td>(.*?)</td>", funnel[1])][:7] == ["1", "20", "8", "8", "not used", "8", "3"]
    assert page.index('id="verdict"') < page.index('id="settings"') < page.index('id="stages"')


def test_no_empty_header_rows(full_page):
    page = full_page
    assert "<th></th>" not in page and "<thead><tr></tr></thead>" not in page
    assert '<table class="kv"><tbody><tr><th scope="row">run</th><td>demo</td></tr>' in page


def test_example_pairs_answers_side_by_side_and_artifact_links(full_page):
    page = full_page
    examples = _text(_section_of(page, "examples"))
    assert examples.index("Iteration 1") < examples.index("Best") < examples.index("Borderline") < examples.index("Rejected")
    assert re.search(r"Rejected score 1 Q", examples.replace("I" * 30, "Q"))  # the lowest-scored pair
    side = _section_of(page, "answers")
    assert re.findall(r"<thead><tr><th>prompt</th>(.*?)</tr></thead>", side) == [
        "<th>train-m0</th><th>train-m1</th><th>train-m2</th>"]
    assert "How can I improve my time management skills?" in side
    assert "train-m2 says &lt;b&gt;" in side and "<b>" not in side  # answers are text, escaped
    lengths = _text(_section_of(page, "win-rates"))
    assert "Answer lengths" in lengths and "vicuna80 train-m2 4 141 141 141" in lengths
    links = re.findall(r'href="([^"]*)"', _section_of(page, "artifacts"))
    for href in ("../train-m0/model/", "../curate-1/selected/", "../evaluate/answers/", "../evaluate/judgments/",
                 "../prepare-seed/_SUCCESS.json"):
        assert href in links, href
    assert all(h.startswith("../") for h in links)  # relative to the report: no external reference


def test_length_plot_labels_do_not_overlap(store, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.ticker import NullFormatter

    from humpback_runtime.report import _length_plot, _Plots

    plan = _plan()
    _full_run(store, plan)
    figures = _capture_figures(monkeypatch)
    _length_plot(_Plots(), collect_report_inputs(store, RUN, plan)["lengths"])  # 20-900 characters: < 2 decades
    wide = {"candidates": {"instruction": [1, 3, 30, 300, 2967], "response": [601, 900, 2967]}}  # the demo's
    _length_plot(_Plots(), wide)
    for fig, ax in ((f, a) for f in figures for a in f.axes):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels(which="both")
                 if t.get_visible() and t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert len(boxes) >= 2
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), ax.get_title()


def test_two_iteration_report_with_evaluation_in_a_real_browser(store, chromium, tmp_path):
    """Headless Chromium: no console error, every image decodes; the screenshot stays for review."""
    from humpback_testing.browser import inspect_page

    plan = _plan()
    _full_run(store, plan, mode="logprobs")
    page = tmp_path / "report" / "index.html"
    page.parent.mkdir()
    page.write_text(build_report(**collect_report_inputs(store, RUN, plan)), encoding="utf-8")
    result = inspect_page(chromium, page, screenshot=tmp_path / "report.png")
    assert result.console_errors == []
    assert result.broken_images == [] and result.images >= 6
    assert result.title == "humpback report: demo"
    assert "Succeeded · 11 of 11 stages finished" in result.text
    assert result.screenshot.stat().st_size > 50_000
    print(f"screenshot: {result.screenshot}")


def test_plots_log_no_matplotlib_chatter(caplog):
    pytest.importorskip("matplotlib")
    from humpback_runtime.report import _Plots, _yield_plot

    caplog.set_level(logging.DEBUG, logger="matplotlib")
    _yield_plot(_Plots(), [(1, 0.4), (2, 0.5)])
    assert not [r for r in caplog.records if "categorical units" in r.getMessage()]


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
