"""The evaluate stage's pieces: evaluation sets, pairwise judging against the OpenAI stub, win rates."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("aiohttp")

from humpback_runtime.evaluation import (  # noqa: E402
    BUILTIN_SETS,
    JUDGE_API_KEY_ENV,
    EvaluationError,
    comparisons,
    evaluate,
    judge_pairs,
    load_eval_set,
    win_rate,
)
from humpback_runtime.inference.client import ClientSettings  # noqa: E402
from humpback_runtime.spec import EvalSet, EvaluationSpec, JudgeSpec  # noqa: E402
from humpback_runtime.storage import ShardWriter, iter_shard_records, list_shards, open_store  # noqa: E402
from humpback_testing.openai_stub import StubServer  # noqa: E402

PREFIX = "ns/run/evaluate/judgments/tiny/train-m1-vs-train-m0"
_ANSWERS = re.compile(r"Answer A:\n(?P<a>.*)\n\nAnswer B:\n(?P<b>.*)\Z", re.S)


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def _settings(url: str) -> ClientSettings:
    return ClientSettings(base_url=url, model="judge", concurrency=4, backoff_base_s=0.001, backoff_max_s=0.01)


def _prompts(n: int) -> list[dict]:
    return [{"id": f"p{i}", "instruction": f"Question {i}?"} for i in range(n)]


def prefers_good(prompt: str) -> str:
    """A consistent judge: the answer that says GOOD wins, wherever it stands; UNSURE is unreadable."""
    m = _ANSWERS.search(prompt)
    a, b = m.group("a"), m.group("b")
    if "UNSURE" in a + b:
        return "Both have merits.\nI cannot decide."
    if "GOOD" in a and "GOOD" not in b:
        return "The first is better.\nVerdict: A"
    if "GOOD" in b and "GOOD" not in a:
        return "The second is better.\nVerdict: B"
    return "Equal.\nVerdict: tie"


# --- evaluation sets ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_builtin_sets_load_80_prompts_with_unique_ids(name):
    records = load_eval_set(f"builtin:{name}")
    assert len(records) == 80
    assert len({r["id"] for r in records}) == 80
    assert all(isinstance(r["instruction"], str) and r["instruction"].strip() for r in records)


def test_unknown_builtin_set_names_the_shipped_ones():
    with pytest.raises(EvaluationError, match=r"builtin:vicuna80, builtin:mt_bench"):
        load_eval_set("builtin:alpaca_eval")


def test_jsonl_set_keeps_extra_fields_and_takes_integer_ids_as_strings(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": 7, "instruction": "Hi?", "category": "x"}\n\n{"id": "b", "instruction": "Yo?"}\n')
    assert load_eval_set(str(path)) == [{"id": "7", "instruction": "Hi?", "category": "x"},
                                        {"id": "b", "instruction": "Yo?"}]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "Hi?"}',
     r"set\.jsonl:2: missing or invalid 'id' \(expected a non-empty string, got no such field\)"),
    ('{"id": "b", "instruction": "  "}', r"set\.jsonl:2: missing or invalid 'instruction'"),
    ('{"id": "b", "prompt": "Hi?"}', r"set\.jsonl:2: missing or invalid 'instruction'.*no such field"),
    ('{"id": "a", "instruction": "Again?"}', r"set\.jsonl:2: duplicate id 'a' \(first at .*set\.jsonl:1\)"),
    ('not json', r"set\.jsonl:2: not valid JSON"),
])
def test_bad_records_fail_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": "a", "instruction": "Hi?"}\n' + line + "\n")
    with pytest.raises(EvaluationError, match=message):
        load_eval_set(str(path))


def test_missing_set_file_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="input file not found"):
        load_eval_set(str(tmp_path / "nope.jsonl"))


# --- win rates ------------------------------------------------------------------------------------

def _j(pid, order, winner):
    return {"prompt_id": pid, "order": order, "winner": winner}


def test_win_rate_combines_both_orders_per_prompt():
    judgments = [
        _j("p1", "ab", "a"), _j("p1", "ba", "a"),      # 1.0, consistent
        _j("p2", "ab", "a"), _j("p2", "ba", "b"),      # 0.5, position bias
        _j("p3", "ab", "tie"), _j("p3", "ba", "b"),    # 0.25
        _j("p4", "ab", "b"), _j("p4", "ba", "b"),      # 0.0, consistent
        _j("p5", "ab", None), _j("p5", "ba", "a"),     # 1.0 from the one readable order
        _j("p6", "ab", None), _j("p6", "ba", None),    # excluded
    ]
    stats = win_rate(judgments)
    scores = [1.0, 0.5, 0.25, 0.0, 1.0]
    mean = sum(scores) / 5
    assert stats["win_rate"] == pytest.approx(0.55)
    std = (sum((s - mean) ** 2 for s in scores) / 4) ** 0.5
    assert stats["stderr"] == pytest.approx(std / 5 ** 0.5)
    assert stats["stderr"] == pytest.approx(0.2)  # squares 0.8, variance 0.2, sqrt(0.2 / 5)
    assert stats["n"] == 5
    assert (stats["wins"], stats["ties"], stats["losses"], stats["unparsed"]) == (4, 1, 4, 3)
    assert stats["excluded"] == 1
    assert stats["both_orders"] == 4
    assert stats["position_consistency"] == pytest.approx(0.5)  # p1 and p4 of p1..p4


def test_win_rate_without_readable_verdicts_reports_none_not_a_guess():
    stats = win_rate([_j("p1", "ab", None), _j("p1", "ba", None)])
    assert stats["win_rate"] is None and stats["stderr"] is None and stats["n"] == 0
    assert stats["excluded"] == 1 and stats["unparsed"] == 2
    assert stats["position_consistency"] is None
    assert win_rate([])["n"] == 0


def test_win_rate_of_one_prompt_has_no_stderr():
    stats = win_rate([_j("p1", "ab", "tie"), _j("p1", "ba", "tie")])
    assert stats["win_rate"] == 0.5 and stats["stderr"] is None and stats["position_consistency"] == 1.0


def test_comparisons_are_mk_against_m0_and_the_previous_model():
    assert comparisons(["m0"]) == []
    assert comparisons(["m0", "m1"]) == [("m1", "m0")]
    assert comparisons(["m0", "m1", "m2"]) == [("m2", "m0"), ("m2", "m1")]


# --- judging against the stub ---------------------------------------------------------------------

def test_judge_asks_both_orders_and_maps_verdicts_to_models(store):
    prompts = _prompts(4)
    a = {p["id"]: "GOOD answer" for p in prompts}
    b = {p["id"]: "meh" for p in prompts}
    with StubServer(text=prefers_good) as stub:
        run = judge_pairs(_settings(stub.url), prompts, a, b, store=store, prefix=PREFIX, checkpoint_every=3)
        assert stub.stats.prompts == 8
    assert sorted(j["id"] for j in run.judgments) == sorted(f"p{i}:{o}" for i in range(4) for o in ("ab", "ba"))
    by_id = {j["id"]: j for j in run.judgments}
    assert by_id["p0:ab"]["verdict"] == "A" and by_id["p0:ab"]["winner"] == "a"
    assert by_id["p0:ba"]["verdict"] == "B" and by_id["p0:ba"]["winner"] == "a"
    assert by_id["p0:ab"]["text"].endswith("Verdict: A")
    stats = win_rate(run.judgments)
    assert stats["win_rate"] == 1.0 and stats["position_consistency"] == 1.0 and stats["n"] == 4
    assert run.stats["completed"] == 8 and run.stats["shards_written"] == 3


def test_position_biased_judge_cancels_out(store):
    prompts = _prompts(3)
    with StubServer(text="Verdict: A") as stub:
        run = judge_pairs(_settings(stub.url), prompts, {p["id"]: "x" for p in prompts},
                          {p["id"]: "y" for p in prompts}, store=store, prefix=PREFIX)
    stats = win_rate(run.judgments)
    assert stats["win_rate"] == 0.5 and stats["stderr"] == 0.0
    assert stats["position_consistency"] == 0.0 and (stats["wins"], stats["losses"]) == (3, 3)


def test_restart_asks_the_judge_only_what_is_not_judged(store):
    prompts = _prompts(5)
    a = {p["id"]: "GOOD" for p in prompts}
    b = {p["id"]: "bad" for p in prompts}
    # An earlier attempt checkpointed three judgments before it died.
    with ShardWriter(store, PREFIX) as writer:
        for jid in ("p0:ab", "p0:ba", "p3:ba"):
            pid, order = jid.split(":")
            writer.write({"id": jid, "prompt_id": pid, "order": order, "verdict": "tie", "winner": "tie",
                          "text": "Verdict: tie"})
    with StubServer(text=prefers_good) as stub:
        run = judge_pairs(_settings(stub.url), prompts, a, b, store=store, prefix=PREFIX)
        assert stub.stats.prompts == 7
        assert run.stats["skipped_done"] == 3 and run.stats["completed"] == 7
        assert len(run.judgments) == 10
        again = judge_pairs(_settings(stub.url), prompts, a, b, store=store, prefix=PREFIX)
        assert stub.stats.prompts == 7  # nothing asked twice
    assert again.stats["completed"] == 0 and again.stats["skipped_done"] == 10
    assert sorted(j["id"] for j in again.judgments) == sorted(j["id"] for j in run.judgments)
    assert win_rate(again.judgments)["ties"] == 3


def test_unparsable_verdicts_are_stored_and_counted_never_guessed(store):
    prompts = _prompts(3)
    a = {"p0": "GOOD", "p1": "UNSURE", "p2": "GOOD"}
    b = {"p0": "bad", "p1": "bad", "p2": "GOOD"}
    with StubServer(text=prefers_good) as stub:
        run = judge_pairs(_settings(stub.url), prompts, a, b, store=store, prefix=PREFIX)
    unread = [j for j in run.judgments if j["winner"] is None]
    assert sorted(j["id"] for j in unread) == ["p1:ab", "p1:ba"]
    assert all(j["verdict"] is None and j["text"].endswith("I cannot decide.") for j in unread)
    stats = win_rate(run.judgments)
    assert (stats["n"], stats["excluded"], stats["unparsed"]) == (2, 1, 2)
    assert stats["win_rate"] == pytest.approx(0.75)  # p0 won, p2 tied


def test_missing_answers_fail_before_any_request(store):
    with StubServer(text="Verdict: A") as stub:
        with pytest.raises(EvaluationError, match=r"1 answer\(s\) missing.*'p1' \(model B\)"):
            judge_pairs(_settings(stub.url), _prompts(2), {"p0": "x", "p1": "y"}, {"p0": "x"},
                        store=store, prefix=PREFIX)
        assert stub.stats.requests == 0


# --- the stage ------------------------------------------------------------------------------------

def _eval_set(tmp_path, n: int = 3) -> str:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in _prompts(n)))
    return str(path)


class FakeAnswers:
    """Answers like a model would: the newest model says GOOD, the others do not."""

    def __init__(self, good: str):
        self.good = good
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, model: str, records: list[dict], prefix: str) -> dict[str, str]:
        self.calls.append((model, len(records), prefix))
        return {r["id"]: ("GOOD " if model == self.good else "plain ") + model for r in records}


def test_evaluate_judges_mk_against_m0_and_m_k_minus_1(tmp_path, store, monkeypatch):
    monkeypatch.setenv(JUDGE_API_KEY_ENV, "sk-test-secret")
    models = ["train-m0", "train-m1", "train-m2"]
    gen = FakeAnswers(good="train-m2")
    with StubServer(text=prefers_good) as stub:
        spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path))],
                              judge=JudgeSpec(endpoint=stub.url, model="judge"))
        result = evaluate(spec, models, gen, store=store, prefix="ns/run/evaluate", checkpoint_every=2)
        assert stub.stats.prompts == 2 * 2 * 3  # two comparisons, both orders, three prompts
        assert stub.stats.authorization == "Bearer sk-test-secret"
    assert gen.calls == [(m, 3, f"ns/run/evaluate/answers/tiny/{m}") for m in models]
    ev = result["evaluation"]
    assert ev["judged"] is True and ev["note"] is None
    assert ev["comparisons"] == [["train-m2", "train-m0"], ["train-m2", "train-m1"]]
    pairs = ev["sets"]["tiny"]["pairs"]
    assert set(pairs) == {"train-m2-vs-train-m0", "train-m2-vs-train-m1"}
    pair = pairs["train-m2-vs-train-m0"]
    assert (pair["win_rate"], pair["stderr"], pair["n"], pair["wins"], pair["ties"], pair["losses"],
            pair["unparsed"]) == (1.0, 0.0, 3, 6, 0, 0, 0)
    assert list_shards(store, pair["prefix"])
    assert ev["sets"]["tiny"]["answers"]["train-m1"] == {"prefix": "ns/run/evaluate/answers/tiny/train-m1",
                                                        "count": 3,
                                                        "alpaca_eval": "ns/run/evaluate/alpaca_eval/tiny/train-m1.json"}
    assert result["outputs"] == {"count": 9, "answers": 9, "judgments": 12}
    assert ev["judging"]["completed"] == 12
    assert "sk-test-secret" not in json.dumps(result)


def test_evaluate_without_a_judge_writes_answers_and_says_so(tmp_path, store):
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path))])
    gen = FakeAnswers(good="train-m1")
    result = evaluate(spec, ["train-m0", "train-m1"], gen, store=store, prefix="ns/run/evaluate")
    ev = result["evaluation"]
    assert ev["judged"] is False and "no judge configured" in ev["note"]
    assert ev["sets"]["tiny"]["pairs"] == {} and ev["comparisons"] == [] and ev["judge"] is None
    assert len(gen.calls) == 2
    assert "win_rate" not in json.dumps(result)
    # Nothing judged: the only files are the alpaca_eval exports of the answers.
    assert sorted(store.list("ns/run/evaluate")) == [f"ns/run/evaluate/alpaca_eval/tiny/train-m{i}.json"
                                                     for i in (0, 1)]


def test_evaluate_fails_when_a_model_leaves_prompts_unanswered(tmp_path, store):
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path))])

    def partial(model, records, prefix):
        return {r["id"]: "x" for r in records[1:]}

    message = r"train-m0 left 1 of 3 prompts of set tiny without a text answer, e.g. 'p0'"
    with pytest.raises(EvaluationError, match=message):
        evaluate(spec, ["train-m0"], partial, store=store, prefix="ns/run/evaluate")


def test_evaluate_checks_every_set_before_any_model_runs(tmp_path, store):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path)),
                                              EvalSet(name="bad", source=str(bad))])
    gen = FakeAnswers(good="train-m1")
    with pytest.raises(EvaluationError, match=r"bad\.jsonl:1: missing or invalid 'instruction'"):
        evaluate(spec, ["train-m0", "train-m1"], gen, store=store, prefix="ns/run/evaluate")
    assert gen.calls == []


def test_judge_endpoint_must_be_an_api_root(tmp_path, store):
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path))],
                          judge=JudgeSpec(endpoint="http://judge:8000", model="judge"))
    with pytest.raises(EvaluationError, match=r"spec\.evaluation\.judge: base_url"):
        evaluate(spec, ["train-m0", "train-m1"], FakeAnswers("x"), store=store, prefix="ns/run/evaluate")


def test_judgments_are_readable_shards(store):
    prompts = _prompts(2)
    with StubServer(text="Verdict: tie") as stub:
        judge_pairs(_settings(stub.url), prompts, {"p0": "a", "p1": "b"}, {"p0": "c", "p1": "d"},
                    store=store, prefix=PREFIX)
    records = list(iter_shard_records(store, list_shards(store, PREFIX)))
    assert {r["order"] for r in records} == {"ab", "ba"}
    assert all(set(r) == {"id", "prompt_id", "order", "verdict", "winner", "text"} for r in records)


# --- reference outputs, length control, alpaca_eval export (issue 13.2) ---------------------------

def test_length_controlled_win_rate_matches_the_hand_computed_example():
    from humpback_runtime.evaluation import length_controlled_win_rate
    # Seven prompts: A is 100 characters longer on five (wins 4, loses 1), 100 shorter on two (wins
    # 1, loses 1). d = +-100 everywhere, so x = tanh(d / std(d)) takes two values +c and -c, and the
    # two-parameter logistic model is saturated: sigmoid(b0 + b1 c) = 4/5 and sigmoid(b0 - b1 c) = 1/2.
    # logit(4/5) = ln 4, logit(1/2) = 0, so b0 = (ln 4 + 0) / 2 = ln 2 and the length-controlled
    # win rate sigmoid(b0) = 2 / (1 + 2) = 2/3, below the raw win rate 5/7 = 0.714.
    scores = [1, 1, 1, 1, 0, 1, 0]
    lengths_b = [200] * 7
    lengths_a = [300] * 5 + [100] * 2
    assert sum(scores) / 7 == pytest.approx(5 / 7)
    assert length_controlled_win_rate(scores, lengths_a, lengths_b) == pytest.approx(2 / 3, abs=1e-9)
    # Ties count 1/2 (soft labels). Longer on four: 1, 1, 1, 1/2 -> mean 7/8, logit ln 7; shorter on
    # three: 1/2, 1/2, 0 -> mean 1/3, logit -ln 2. b0 = (ln 7 - ln 2) / 2 = ln sqrt(3.5), so
    # LC = sqrt(3.5) / (1 + sqrt(3.5)) = 1.870829 / 2.870829 = 0.651668.
    scores = [1, 1, 1, 0.5, 0.5, 0.5, 0]
    lengths_a = [250] * 4 + [150] * 3
    assert length_controlled_win_rate(scores, lengths_a, [200] * 7) == pytest.approx(0.651668, abs=1e-6)
    # No length difference at all: the model is the intercept alone, LC = the raw win rate.
    assert length_controlled_win_rate([1, 0, 0.5, 1], [5] * 4, [5] * 4) == pytest.approx(0.625)
    assert length_controlled_win_rate([], [], []) is None


def _set_with_references(tmp_path) -> str:
    path = tmp_path / "ref.jsonl"
    rows = [{"id": "p0", "instruction": "Question 0?", "reference": "GOOD reference"},
            {"id": "p1", "instruction": "Question 1?", "reference": "bad"},
            {"id": "p2", "instruction": "Question 2?", "reference": "bad"},
            {"id": "p3", "instruction": "Question 3?", "reference": "GOOD but much longer reference text"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_judges_each_model_against_reference_outputs_in_both_orders(tmp_path, store):
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="ref", source=_set_with_references(tmp_path))],
                          judge=JudgeSpec(endpoint="http://unused", model="judge"))
    with StubServer(text=prefers_good) as stub:
        spec = spec.model_copy(update={"judge": JudgeSpec(endpoint=stub.url, model="judge")})
        result = evaluate(spec, ["train-m0"], FakeAnswers(good="train-m0"), store=store, prefix="ns/run/evaluate")
        assert stub.stats.prompts == 8  # 4 prompts x 2 orders, one model, no other model to compare
    ev = result["evaluation"]
    assert ev["judged"] is True and ev["note"] is None
    ref = ev["sets"]["ref"]["reference"]
    assert ref["generator"] == "reference"
    m0 = ref["models"]["train-m0"]
    # "GOOD train-m0" wins p1 and p2 against "bad", ties p0 and p3 against GOOD references.
    assert (m0["wins"], m0["ties"], m0["losses"], m0["n"]) == (4, 4, 0, 4)
    assert m0["win_rate"] == pytest.approx(0.75)
    assert m0["stderr"] == pytest.approx(0.25 * (4 / 3) ** 0.5 / 2)  # sd of 0.5, 1, 1, 0.5 / sqrt(4)
    assert m0["avg_length"] == len("GOOD train-m0")
    assert m0["reference_avg_length"] == pytest.approx(sum(map(len, ["GOOD reference", "bad", "bad",
                                                                     "GOOD but much longer reference text"])) / 4)
    assert m0["length_controlled_win_rate"] is not None and 0 < m0["length_controlled_win_rate"] < 1
    judged = list(iter_shard_records(store, list_shards(store, "ns/run/evaluate/judgments/ref/train-m0-vs-reference")))
    assert sorted(j["id"] for j in judged) == sorted(f"p{i}:{o}" for i in range(4) for o in ("ab", "ba"))


def test_evaluate_writes_alpaca_eval_model_outputs_for_every_model_and_set(tmp_path, store):
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path)),
                                              EvalSet(name="ref", source=_set_with_references(tmp_path))])
    result = evaluate(spec, ["train-m0", "train-m1"], FakeAnswers(good="train-m1"), store=store,
                      prefix="ns/run/evaluate")
    for name, n in (("tiny", 3), ("ref", 4)):
        for model in ("train-m0", "train-m1"):
            key = f"ns/run/evaluate/alpaca_eval/{name}/{model}.json"
            assert result["evaluation"]["sets"][name]["answers"][model]["alpaca_eval"] == key
            rows = store.read_json(key)
            assert len(rows) == n
            assert rows[0] == {"instruction": "Question 0?", "output": ("GOOD " if model == "train-m1" else "plain ")
                               + model, "generator": model, "dataset": name}


def test_reference_outputs_file_in_alpaca_eval_format_is_matched_by_instruction(tmp_path, store):
    ref = tmp_path / "alpaca_eval_gpt4_baseline.json"
    ref.write_text(json.dumps([{"instruction": f"Question {i}?", "output": "GOOD" if i == 0 else "bad",
                                "generator": "gpt4_1106_preview", "dataset": "x"} for i in (2, 1, 0)]))
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path),
                                                      referenceOutputs=str(ref))])
    with StubServer(text=prefers_good) as stub:
        spec = spec.model_copy(update={"judge": JudgeSpec(endpoint=stub.url, model="judge")})
        result = evaluate(spec, ["train-m0"], FakeAnswers(good="none"), store=store, prefix="ns/run/evaluate")
    ref_entry = result["evaluation"]["sets"]["tiny"]["reference"]
    assert ref_entry["generator"] == "gpt4_1106_preview" and ref_entry["source"] == str(ref)
    m0 = ref_entry["models"]["train-m0"]
    assert (m0["wins"], m0["ties"], m0["losses"]) == (0, 4, 2)  # p0 lost to the GOOD reference


def test_reference_outputs_missing_a_prompt_name_the_file(tmp_path, store):
    ref = tmp_path / "refs.json"
    ref.write_text(json.dumps([{"instruction": "Question 0?", "output": "x", "generator": "g"}]))
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="tiny", source=_eval_set(tmp_path),
                                                      referenceOutputs=str(ref))])
    answers = FakeAnswers(good="none")
    with pytest.raises(EvaluationError, match=r"refs\.json have no output for 2 of 3 prompts.*'p1'"):
        evaluate(spec, ["train-m0"], answers, store=store, prefix="ns/run/evaluate")
    assert answers.calls == []
    ref.write_text(json.dumps([{"instruction": "Question 0?", "generator": "g"}]))
    with pytest.raises(EvaluationError, match=r"refs\.json.*'output'"):
        evaluate(spec, ["train-m0"], answers, store=store, prefix="ns/run/evaluate")


# --- MT-Bench (issue 13.3) ---------------------------------------------------------------------------

def test_builtin_mt_bench_is_graded_as_mt_bench_with_two_turns():
    from humpback_runtime.evaluation import _check_mt_bench
    assert EvalSet(name="mt_bench", source="builtin:mt_bench").kind == "mt_bench"
    assert EvalSet(name="v", source="builtin:vicuna80").kind == "pairwise"
    records = load_eval_set("builtin:mt_bench")
    _check_mt_bench(records, "builtin:mt_bench")
    assert all(len(r["turns"]) == 2 for r in records)


def _mt_set(tmp_path) -> str:
    path = tmp_path / "mt.jsonl"
    rows = [{"id": "w1", "instruction": "Write a poem.", "category": "writing",
             "turns": ["Write a poem.", "Now make it rhyme."]},
            {"id": "m1", "instruction": "What is 2+2?", "category": "math",
             "turns": ["What is 2+2?", "And times 3?"], "reference": ["4", "12"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mt_judge(prompt: str) -> str:
    """Grades like a judge: 9 with a reference answer, 6 for a second turn, 8 otherwise."""
    if "[The Start of Reference Answer]" in prompt or "<|The Start of Reference Answer|>" in prompt:
        return "Correct.\nRating: [[9]]"
    if "### Assistant A:" in prompt:
        return "Fine. Rating: [[6]]"
    return "Good. [[8]]"


def test_mt_bench_asks_the_second_turn_with_the_first_answer_and_grades_1_to_10(tmp_path, store):
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="mt", source=_mt_set(tmp_path), kind="mt_bench")])
    seen: list[dict] = []

    def answers(model, records, prefix):
        seen.extend(records)
        return {r["id"]: f"{model} says {r['instruction']}" for r in records}

    with StubServer(text=mt_judge) as stub:
        spec = spec.model_copy(update={"judge": JudgeSpec(endpoint=stub.url, model="judge")})
        result = evaluate(spec, ["train-m0"], answers, store=store, prefix="ns/run/evaluate")
        assert stub.stats.prompts == 4  # 2 questions x 2 turns, single-answer grading (no pairs)
    turn2 = [r for r in seen if "history" in r]
    assert turn2 == [{"id": "w1", "instruction": "Now make it rhyme.",
                      "history": [["Write a poem.", "train-m0 says Write a poem."]]},
                     {"id": "m1", "instruction": "And times 3?",
                      "history": [["What is 2+2?", "train-m0 says What is 2+2?"]]}]
    scores = result["evaluation"]["sets"]["mt"]["mt_bench"]["train-m0"]
    assert scores["categories"] == {"math": 9.0, "writing": 7.0}  # math: 9, 9; writing: 8 (t1), 6 (t2)
    assert (scores["turn_1"], scores["turn_2"], scores["score"]) == (8.5, 7.5, 8.0)
    assert (scores["graded"], scores["unparsed"]) == (4, 0)
    assert result["evaluation"]["sets"]["mt"]["pairs"] == {}
    graded = {j["id"]: j for j in iter_shard_records(store, list_shards(store, "ns/run/evaluate/judgments/mt/train-m0"))}
    assert graded["m1:t2"]["rating"] == 9.0 and graded["w1:t2"]["rating"] == 6.0


def test_mt_bench_record_without_two_turns_names_the_record(tmp_path, store):
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps({"id": "x", "instruction": "Hi?", "turns": ["Hi?"]}) + "\n")
    spec = EvaluationSpec(enabled=True, sets=[EvalSet(name="mt", source=str(path), kind="mt_bench")])
    with pytest.raises(EvaluationError, match=r"record 'x'.*'turns', a list of 2"):
        evaluate(spec, ["train-m0"], FakeAnswers(good="none"), store=store, prefix="ns/run/evaluate")


@pytest.mark.parametrize("text, rating", [("Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("score [6]", 6.0),
                                          ("Rating: [[0]]", None), ("[[11]]", None), ("no rating", None)])
def test_parse_rating_reads_fastchat_format(text, rating):
    from humpback_runtime.prompts import parse_rating
    assert parse_rating(text) == rating


def test_mt_bench_judge_prompts_are_fastchats_wording():
    from humpback_runtime.prompts import forward_prompt, forward_turn_prompt, mt_bench_judge_prompt
    one = mt_bench_judge_prompt("Q?", "A.")
    assert one.startswith("You are a helpful assistant.\n\n[Instruction]\nPlease act as an impartial judge")
    assert one.endswith("[Question]\nQ?\n\n[The Start of Assistant's Answer]\nA.\n[The End of Assistant's Answer]")
    two = mt_bench_judge_prompt("Q?", "A.", question_2="Q2?", answer_2="B.", reference=["r1", "r2"])
    assert "You evaluation should focus on the assistant's answer to the second question." in two
    assert "### User:\nQ2?\n\n### Reference answer:\nr2" in two and "### Assistant A:\nB." in two
    assert (forward_turn_prompt([("Q?", "A. ")], "Q2?", "sys")
            == forward_prompt("Q?", "sys") + "A.\n\n### Instruction:\nQ2?\n\n### Response:\n")
