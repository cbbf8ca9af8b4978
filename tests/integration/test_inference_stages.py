"""augment, rewrite and curate through `run_stage`, on the tiny model and the transformers engine.

The trained models are stood in for by the tiny base model, copied where train-myx and train-m0
leave theirs, so these tests exercise the inference stages alone; the full run trains for real.
"""

import shutil
from pathlib import Path

import pytest
import yaml

from humpback_runtime.context import RunContext
from humpback_runtime.inference.models import COMPLETE, model_prefix
from humpback_runtime.spec import parse_run
from humpback_runtime.stages import run_stage
from humpback_runtime.storage import iter_shard_records, list_shards, write_success

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from humpback_runtime.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def make_ctx(tmp_path, tiny_model, **curation):
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = data["spec"]
    spec["baseModel"] = str(tiny_model)
    spec["seed"]["source"] = str(ROOT / "examples" / spec["seed"]["source"])
    spec["corpus"].update(source=str(ROOT / "examples" / spec["corpus"]["source"]), maxDocuments=60)
    spec["augmentation"].update(maxTokens=12, minYield=0)  # a random Myx: almost every instruction is cut
    # A random model puts little probability on the digits and rates low: no floors here.
    spec["curation"].update(maxTokens=12, **{"minDigitMass": 0.0, "minYield": 0.0, **curation})
    spec["inference"]["checkpointEvery"] = 8
    ctx = RunContext.create(parse_run(data), str(tmp_path / "runs"))
    return ctx


def stand_in_for_training(ctx, tiny_model, *stages):
    for name in stages:
        dest = ctx.store.local_path(model_prefix(ctx, name))
        shutil.copytree(tiny_model, dest)
        (dest / COMPLETE).write_text("")
        write_success(ctx.store, ctx.prefix(name), {"stage": name, "fingerprint": ctx.plan[name].fingerprint})


def records(ctx, prefix):
    return list(iter_shard_records(ctx.store, list_shards(ctx.store, prefix)))


@pytest.fixture
def augmented(tmp_path, tiny_model):
    ctx = make_ctx(tmp_path, tiny_model)
    run_stage(ctx, "prepare-seed")
    corpus = run_stage(ctx, "prepare-corpus")
    stand_in_for_training(ctx, tiny_model, "train-myx", "train-m0")
    manifest = run_stage(ctx, "augment")
    return ctx, corpus, manifest


def test_augment_writes_one_record_per_segment_and_counts_drops(augmented):
    ctx, corpus, manifest = augmented
    out = records(ctx, ctx.prefix("augment"))
    assert len(out) == corpus["outputs"]["count"] == manifest["counts"]["segments"]
    assert len({r["id"] for r in out}) == len(out)
    kept = [r for r in out if r["dropped"] is None]
    assert manifest["outputs"]["count"] == len(kept)
    drops = {k: v for k, v in manifest["counts"].items() if k.startswith("dropped_")}
    assert sum(drops.values()) + len(kept) == len(out)
    # max_tokens 12 cuts almost every random instruction: counted as too_long, never kept.
    assert all(r["finish_reason"] == "stop" for r in kept)
    assert manifest["inference"]["engine"] == "transformers"


@pytest.mark.parametrize("mode", ["logprobs", "generate"])
def test_curate_scores_every_candidate_and_selects_by_threshold(tmp_path, tiny_model, mode):
    ctx = make_ctx(tmp_path, tiny_model, mode=mode, threshold=2)
    stand_in_for_training(ctx, tiny_model, "train-myx", "train-m0")
    # Candidates stand in for augment's (a random Myx rarely writes a usable instruction):
    # real oasst1 pairs, plus one dropped record that curation must not score.
    n = _candidates(ctx, 12, extra=[{"id": "x", "instruction": "", "response": "r", "dropped": "empty"}])
    manifest = run_stage(ctx, "curate-1")
    scores = manifest["scores"]
    assert manifest["scored"] == n
    assert sum(scores["histogram"].values()) + scores["unparsable"] == n
    assert manifest["outputs"]["records"] == list_shards(ctx.store, ctx.prefix("curate-1"))  # the scores
    selected = records(ctx, manifest["outputs"]["selection"]["prefix"])
    assert len(selected) == manifest["selected"] == manifest["outputs"]["selection"]["count"]
    assert all(r["score"] >= 2 for r in selected)
    if mode == "logprobs":
        assert scores["unparsable"] == 0  # never unparsable: a distribution over 1..5 always exists
        scored = records(ctx, ctx.prefix("curate-1"))
        assert all(abs(sum(r["probs"].values()) - 1) < 1e-6 for r in scored)
    else:
        # A random model almost never ends with "Score: N": counted, never guessed.
        assert scores["unparsable"] >= 1


def _candidates(ctx, n=8, extra=()):
    """Real oasst1 pairs written as augment's output, standing in for what Myx would write."""
    import json

    from humpback_runtime.storage import ShardWriter

    lines = (ROOT / "examples" / "data" / "oasst1_pairs.jsonl").read_text().splitlines()[:n]
    with ShardWriter(ctx.store, ctx.prefix("augment")) as writer:
        for p in map(json.loads, lines):
            writer.write({"id": p["id"], "instruction": p["instruction"], "response": p["response"][:400], "dropped": None})
        for record in extra:
            writer.write(record)
    write_success(ctx.store, ctx.prefix("augment"), {"fingerprint": ctx.plan["augment"].fingerprint,
                                                     "outputs": {"records": writer.shards}})
    return n


def test_self_rewriting_by_the_previous_model_feeds_curation(tmp_path, tiny_model):
    ctx = make_ctx(tmp_path, tiny_model, rewrite={"enabled": True, "sampling": {"maxTokens": 8}}, threshold=1)
    stand_in_for_training(ctx, tiny_model, "train-myx", "train-m0")
    n = _candidates(ctx)
    assert ctx.plan["curate-1"].deps == ("rewrite-1", "train-m0")
    manifest = run_stage(ctx, "rewrite-1")
    rewritten = records(ctx, ctx.prefix("rewrite-1"))
    assert len(rewritten) == n == manifest["counts"]["candidates"]
    assert all(r["original_response"] and r["response"] for r in rewritten)
    curated = run_stage(ctx, "curate-1")
    assert curated["scored"] == manifest["outputs"]["count"]


def test_external_chat_rewriter_runs_once_drops_cut_off_rewrites_and_feeds_training_after_curation(
        tmp_path, tiny_model):
    import json

    from humpback_runtime.stages.train import training_examples
    from humpback_testing.openai_stub import StubServer

    first = json.loads((ROOT / "examples" / "data" / "oasst1_pairs.jsonl").read_text().splitlines()[0])

    def rewrite(prompt: str) -> str:  # the first candidate's rewrite runs past maxTokens
        return "word " * 50 if first["instruction"].strip() in prompt else "A rewritten, assistant-style answer."

    with StubServer(text=rewrite, chat_only=True) as stub:  # an external model behind the chat API only
        ctx = make_ctx(tmp_path, tiny_model, rewrite={"enabled": True, "endpoint": stub.url, "model": "model",
                                                      "sampling": {"maxTokens": 20}})
        n = _candidates(ctx)
        assert [s.name for s in ctx.plan.stages if s.family == "rewrite"] == ["rewrite"]  # once, all iterations
        assert ctx.plan["rewrite"].deps == ("augment",)  # no dependency on M0
        manifest = run_stage(ctx, "rewrite")
        assert stub.stats.chat_requests == n
    kept = [r for r in records(ctx, ctx.prefix("rewrite")) if not r["dropped"]]
    assert {r["response"] for r in kept} == {"A rewritten, assistant-style answer."}
    assert manifest["counts"]["rewritten"] == n - 1 and manifest["counts"]["dropped_truncated"] == 1
    assert manifest["inference"]["engine"] == "vllm-server"

    # Order after (the default for an external rewriter): curate-1 scored the original pairs (every one a
    # 5 here); train-m1 trains on the rewrites of the selected ones, and a selected pair whose rewrite was
    # cut off is left out.
    scores = [{"id": r["id"], "instruction": r["instruction"], "response": r["original_response"], "score": 5,
               "argmax": 5, "expected": 5.0, "mass": 1.0} for r in records(ctx, ctx.prefix("rewrite"))]
    from humpback_runtime.storage import ShardWriter

    with ShardWriter(ctx.store, ctx.prefix("curate-1")) as writer:  # curate-k stores scores; selection is made
        for r in scores:
            writer.write(r)
    write_success(ctx.store, ctx.prefix("curate-1"), {"fingerprint": ctx.plan["curate-1"].fingerprint,
                                                      "outputs": {"records": writer.shards}})
    write_success(ctx.store, ctx.prefix("prepare-seed"), {"fingerprint": ctx.plan["prepare-seed"].fingerprint,
                                                          "outputs": {"records": []}})
    examples, counts = training_examples(ctx, ctx.plan["train-m1"])
    assert counts["curated"] == n - 1 and counts["curated_rewrite_dropped"] == 1
    assert {ex.completion for ex in examples} == {"A rewritten, assistant-style answer."}


def test_evaluate_answers_with_every_model_and_a_chat_only_judge_gives_win_rates(tmp_path, tiny_model):
    """The demo's configuration with a judge served only behind /v1/chat/completions (spec default api: chat)."""
    import json

    from humpback_testing.openai_stub import StubServer

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"q{i}", "instruction": q}) + "\n" for i, q in
                                    enumerate(["Name a planet.", "What is 2+2?", "Say hello."])))
    with StubServer(text="Both are fine, A is clearer.\nVerdict: A", chat_only=True) as judge:
        ctx = make_ctx(tmp_path, tiny_model)
        ctx.run.spec.evaluation = ctx.run.spec.evaluation.model_validate({
            "enabled": True, "sets": [{"name": "mini", "source": str(prompts_file)}],
            "judge": {"endpoint": judge.url, "model": "model"}, "sampling": {"maxTokens": 8}})
        stand_in_for_training(ctx, tiny_model, "train-m0", "train-m1", "train-m2")
        manifest = run_stage(ctx, "evaluate")
        asked = judge.stats.requests
        assert judge.stats.chat_requests == asked  # every judgment through the chat route
    result = manifest["evaluation"]
    assert result["judged"] is True and result["judge"]["api"] == "chat"
    pairs = result["sets"]["mini"]["pairs"]
    # M2 vs M0 and M2 vs M1, each prompt judged in both orders.
    assert len(pairs) == 2 and asked == 2 * 2 * 3
    for pair in pairs.values():
        # The judge always says "A": a win when M2 is shown first, a loss when second -> 0.5.
        assert pair["n"] == 3 and pair["win_rate"] == 0.5 and pair["wins"] == 3 and pair["losses"] == 3
        assert pair["position_consistency"] == 0.0
    assert manifest["outputs"]["answers"] == 3 * 3



def test_evaluate_runs_mt_bench_in_two_turns_and_exports_alpaca_eval(tmp_path, tiny_model):
    import json

    from humpback_testing.openai_stub import StubServer

    rows = [{"id": "w", "instruction": "Write a haiku.", "category": "writing",
             "turns": ["Write a haiku.", "Now translate it."]},
            {"id": "m", "instruction": "What is 2+2?", "category": "math",
             "turns": ["What is 2+2?", "And 3+3?"], "reference": ["4", "6"]}]
    mt = tmp_path / "mt.jsonl"
    mt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with StubServer(text="Fine.\nRating: [[7]]") as judge:
        ctx = make_ctx(tmp_path, tiny_model)
        ctx.run.spec.evaluation = ctx.run.spec.evaluation.model_validate({
            "enabled": True, "sets": [{"name": "mt", "source": str(mt), "kind": "mt_bench"}],
            "judge": {"endpoint": judge.url, "model": "model"}, "sampling": {"maxTokens": 8}})
        stand_in_for_training(ctx, tiny_model, "train-m0", "train-m1", "train-m2")
        manifest = run_stage(ctx, "evaluate")
        assert judge.stats.prompts == 3 * 2 * 2  # three models, two questions, two turns each
    assert manifest["outputs"]["answers"] == 3 * 2 * 2
    scores = manifest["evaluation"]["sets"]["mt"]["mt_bench"]
    assert set(scores) == {"train-m0", "train-m1", "train-m2"}
    assert all(s["score"] == 7.0 and s["categories"] == {"math": 7.0, "writing": 7.0} for s in scores.values())
    turn2 = manifest["evaluation"]["sets"]["mt"]["answers"]["train-m2"]["turn_2"]["prefix"]
    assert turn2.endswith("/answers/mt/turn-2/train-m2")
    export = manifest["evaluation"]["sets"]["mt"]["answers"]["train-m2"]["alpaca_eval"]
    rows_out = ctx.store.read_json(export)
    assert [r["instruction"] for r in rows_out] == ["Write a haiku.", "What is 2+2?"]
    assert {(r["generator"], r["dataset"]) for r in rows_out} == {("train-m2", "mt")}


# --- score once, select many; bad records; yield floors (issues 10 and 13) --------------------------

def stub_ctx(tmp_path, tiny_model, stub, spec=None, **curation):
    """make_ctx, with the inference stages asking the stub server (engine vllm-server); `spec` maps a
    section of the spec to the settings to change in it."""
    ctx = make_ctx(tmp_path, tiny_model, **curation)
    data = ctx.run.model_dump(mode="json", by_alias=True, exclude={"status"})
    data["spec"]["inference"].update(engine="vllm-server", endpoint=stub.url, perRequestSeed=False)
    for section, settings in (spec or {}).items():
        data["spec"][section].update(settings)
    return RunContext.create(parse_run(data), ctx.storage_uri, identify_inputs=False)


def test_a_threshold_change_reselects_without_a_single_request(tmp_path, tiny_model):
    from humpback_runtime.stages.curate import selected_pairs
    from humpback_testing.openai_stub import StubServer

    with StubServer(top_logprobs={" 5": -0.9, " 4": -0.6, " 3": -3.0}) as stub:
        ctx = stub_ctx(tmp_path, tiny_model, stub, mode="logprobs", threshold=5, topLogprobs=7, minYield=0)
        stand_in_for_training(ctx, tiny_model, "train-myx", "train-m0")
        n = _candidates(ctx, 10)
        first = run_stage(ctx, "curate-1")
        assert stub.stats.requests == n and stub.stats.logprobs == 7  # curation.topLogprobs reaches the server
        assert first["selected"] == 0  # argmax is 4 for every pair
        assert first["scores"]["digitMass"]["p50"] > 0.8

        lower = stub_ctx(tmp_path, tiny_model, stub, mode="logprobs", threshold=4, topLogprobs=7, minYield=0)
        assert lower.plan["curate-1"].fingerprint == ctx.plan["curate-1"].fingerprint
        assert run_stage(lower, "curate-1") is None  # scores are done: nothing to ask
        pairs, chosen = selected_pairs(lower, "curate-1", lower.plan["train-m1"].settings["selection"])
        assert stub.stats.requests == n  # ZERO new requests
    assert len(pairs) == chosen["selected"] == n
    selected = sorted(k.split("/")[-2] for k in ctx.store.list(f"{ctx.prefix('curate-1')}/selected")
                      if k.endswith("_SUCCESS.json"))
    assert selected == ["threshold-4-argmax-mass-0", "threshold-5-argmax-mass-0"]  # side by side


def test_an_http_400_for_one_record_drops_it_and_the_stage_goes_on(tmp_path, tiny_model):
    from humpback_testing.openai_stub import StubServer

    with StubServer(text="What is this text about?", fail_on="Beginners BBQ", status_on_fail=400) as stub:
        ctx = stub_ctx(tmp_path, tiny_model, stub, spec={"inference": {"maxRejectedFraction": 0.05}})
        run_stage(ctx, "prepare-seed")
        segments = run_stage(ctx, "prepare-corpus")["outputs"]["count"]
        stand_in_for_training(ctx, tiny_model, "train-myx")
        manifest = run_stage(ctx, "augment")
    assert manifest["counts"]["rejected_by_server"] == 1
    assert manifest["rejectedExamples"][0]["reason"] == "HTTP 400: stub failure (HTTP 400)"
    assert manifest["counts"]["segments"] == segments and manifest["outputs"]["count"] == segments - 1
    assert "1 refused by the server" in manifest["yield"]["warnings"]

    # Above inference.maxRejectedFraction (default 1 %) the stage fails, naming the record.
    with StubServer(text="What is this text about?", fail_on="Beginners BBQ", status_on_fail=400) as stub:
        strict = stub_ctx(tmp_path / "strict", tiny_model, stub)
        run_stage(strict, "prepare-seed")
        run_stage(strict, "prepare-corpus")
        stand_in_for_training(strict, tiny_model, "train-myx")
        with pytest.raises(Exception, match=r"1 records were refused, more than the 0 allowed"):
            run_stage(strict, "augment")


def test_a_segment_too_long_for_the_models_context_is_dropped_before_sending(tmp_path, tiny_model):
    """Our own model's tokenizer is at hand: a prompt that cannot fit the server's maxModelLen is never
    sent (the server would answer 400), but dropped, counted and named; the stage goes on."""
    from humpback_testing.openai_stub import StubServer

    sent: list[str] = []
    with StubServer(text=lambda prompt: sent.append(prompt) or "What is this text about?") as stub:
        ctx = stub_ctx(tmp_path, tiny_model, stub,
                       spec={"inference": {"maxRejectedFraction": 0.9, "vllm": {"maxModelLen": 400}}})
        run_stage(ctx, "prepare-seed")
        run_stage(ctx, "prepare-corpus")
        segments = list(ctx.records("prepare-corpus"))
        stand_in_for_training(ctx, tiny_model, "train-myx")
        manifest = run_stage(ctx, "augment")
    from transformers import AutoTokenizer

    from humpback_runtime import prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = {s["id"]: len(tokenizer(prompts.backward_prompt(s["text"])).input_ids) for s in segments}
    too_long = {i for i, n in lengths.items() if n + 12 > 400}  # augmentation.maxTokens is 12
    assert 0 < len(too_long) < len(segments)
    assert len(sent) == len(segments) - len(too_long)  # not one of them reached the server
    assert manifest["counts"]["prompt_too_long"] == len(too_long)
    assert manifest["counts"]["rejected_by_server"] == 0
    assert manifest["counts"]["segments"] == len(segments)
    example = manifest["rejectedExamples"][0]
    assert example["id"] in too_long
    assert example["reason"] == (f"prompt too long for the context: {lengths[example['id']]} prompt tokens + 12 "
                                 f"max_tokens > 400 (inference.vllm.maxModelLen); not sent")
    assert f"{len(too_long)} prompts too long for the model's context (not sent)" in manifest["yield"]["warnings"]


def test_augment_under_its_yield_floor_fails_with_the_likely_cause(tmp_path, tiny_model):
    from humpback_runtime.errors import StageError
    from humpback_testing.openai_stub import StubServer

    with StubServer(text="word " * 50) as stub:  # every instruction runs into maxTokens (12)
        ctx = stub_ctx(tmp_path, tiny_model, stub, spec={"augmentation": {"minYield": 0.2}})
        run_stage(ctx, "prepare-seed")
        n = run_stage(ctx, "prepare-corpus")["outputs"]["count"]
        stand_in_for_training(ctx, tiny_model, "train-myx")
        with pytest.raises(StageError) as err:
            run_stage(ctx, "augment")
    assert str(err.value).startswith(f"{n} of {n} instructions hit maxTokens: raise augmentation.maxTokens.")
    assert f"augment kept 0 of {n} (0.0%), below augmentation.minYield (0.2)" in str(err.value)
    assert ctx.manifest("augment") is None  # not done: a rerun after the fix resumes


def test_a_client_pod_fetches_only_the_tokenizer_files(tmp_path, tiny_model, s3_server, s3_bucket, monkeypatch):
    from humpback_runtime.inference.models import local_tokenizer_dir, tokenizer_encode

    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "cache"))
    ctx = make_ctx(tmp_path, tiny_model)
    data = ctx.run.model_dump(mode="json", by_alias=True, exclude={"status"})
    data["spec"]["storage"] = {"uri": f"{s3_bucket}/runs", "s3": {"endpoint": s3_server}}
    ctx = RunContext.create(parse_run(data), identify_inputs=False)
    prefix = model_prefix(ctx, "train-m0")
    for path in tiny_model.iterdir():
        ctx.store.upload_file(path, f"{prefix}/{path.name}")
    ctx.store.write_bytes(f"{prefix}/model-00002-of-00002.safetensors", b"\0" * 1024)
    ctx.store.write_text(f"{prefix}/{COMPLETE}", "")
    local = local_tokenizer_dir(ctx, "train-m0")
    fetched = sorted(p.name for p in local.iterdir())
    assert not any(name.endswith((".safetensors", ".bin", ".pt")) for name in fetched), fetched
    assert "tokenizer.json" in fetched or "tokenizer_config.json" in fetched
    assert tokenizer_encode(ctx, "train-m0")("Score: 5")  # enough to build the logprob prompt
