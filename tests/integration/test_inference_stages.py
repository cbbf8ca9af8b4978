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
    spec["seed"]["source"] = str(ROOT / spec["seed"]["source"])
    spec["corpus"].update(source=str(ROOT / spec["corpus"]["source"]), maxDocuments=60)
    spec["augmentation"]["maxTokens"] = 12
    spec["curation"].update(maxTokens=12, **curation)
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
    selected = list(iter_shard_records(ctx.store, manifest["outputs"]["records"]))
    assert len(selected) == manifest["selected"]
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

    # Order after (the default for an external rewriter): curate-1 scored the original pairs; train-m1
    # trains on the rewrites of the selected ones, and a selected pair whose rewrite was cut off is left out.
    selected = [{"id": r["id"], "instruction": r["instruction"], "response": r["original_response"], "score": 5}
                for r in records(ctx, ctx.prefix("rewrite"))]
    from humpback_runtime.storage import ShardWriter

    with ShardWriter(ctx.store, ctx.prefix("curate-1") + "/selected") as writer:
        for r in selected:
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
