"""Inference engines: transformers on the tiny model, the server engine on the OpenAI stub, selection."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("aiohttp")

from humpback_runtime import prompts  # noqa: E402
from humpback_runtime.inference import engines  # noqa: E402
from humpback_runtime.inference import local as local_engines  # noqa: E402
from humpback_runtime.inference.engines import GenerationResult, Sampling, VLLMServerEngine, record_seed  # noqa: E402
from humpback_runtime.inference.local import TransformersEngine  # noqa: E402
from humpback_runtime.inference import models as inference_models  # noqa: E402
from humpback_runtime.inference.models import make_engine  # noqa: E402
from humpback_runtime.spec import InferenceSpec  # noqa: E402
from humpback_runtime.storage import LocalStore, iter_shard_records, list_shards  # noqa: E402
from humpback_runtime.tiny_model import build_tiny_model  # noqa: E402
from humpback_testing.openai_stub import StubServer  # noqa: E402

TEXTS = [
    "Humpback whales sing long, complex songs.",
    "hi",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog finally gets up.",
    "Name three whales.",
    "What is instruction backtranslation?",
    "A",
    "Write a haiku about the sea and the moon.",
    "Explain left padding.",
    "Grüße aus Köln!",
    "1 2 3 4",
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TransformersEngine:
    return TransformersEngine(model_dir, batch_size=4).load()


@pytest.fixture(scope="module")
def engine_unbatched(model_dir: Path) -> TransformersEngine:
    return TransformersEngine(model_dir, batch_size=1).load()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _records(texts=TEXTS) -> list[dict]:
    return [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]


def _prompt(record: dict) -> str:
    return prompts.backward_prompt(record["text"])


def _ids(store, prefix: str) -> list:
    return [r["id"] for r in iter_shard_records(store, list_shards(store, prefix))]


def _generate(engine, store, sampling, prefix="gen", records=None) -> dict[str, GenerationResult]:
    results: dict[str, GenerationResult] = {}

    def handle(record, result):
        results[record["id"]] = result
        return {"id": record["id"], "text": result.text}

    records = _records() if records is None else records
    stats = engine.generate(records, _prompt, sampling, store=store, prefix=prefix, handle=handle,
                            checkpoint_every=3, total=len(records))
    assert stats["completed"] + stats["skipped_done"] == len(records) and stats["engine"] == engine.name
    return results


def _score(engine, store, top_k, prefix="score", records=None, build=_prompt) -> dict[str, dict]:
    results: dict[str, dict] = {}

    def handle(record, top):
        results[record["id"]] = top
        return {"id": record["id"]}

    records = _records() if records is None else records
    engine.score(records, build, top_k=top_k, store=store, prefix=prefix, handle=handle, checkpoint_every=4)
    return results


# --- transformers -------------------------------------------------------------------------------

def test_batched_generation_is_bounded_by_max_tokens_for_every_record(engine, store):
    results = _generate(engine, store, Sampling(temperature=0.8, top_p=0.9, max_tokens=8, seed=1))
    assert set(results) == {r["id"] for r in _records()}
    for result in results.values():
        assert isinstance(result.text, str)
        assert result.finish_reason in ("stop", "length")
        assert 1 <= result.completion_tokens <= 8
        if result.finish_reason == "length":
            assert result.completion_tokens == 8
    assert sorted(_ids(store, "gen")) == sorted(results)
    assert len(list_shards(store, "gen")) == 4  # checkpoint_every=3 over 10 records


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(engine, store):
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=6, seed=7)
    first = _generate(engine, store, sampling, prefix="a")
    second = _generate(engine, store, sampling, prefix="b")
    other = _generate(engine, store, dataclasses.replace(sampling, seed=8), prefix="c")
    assert first == second
    assert first != other


def test_generation_does_not_depend_on_batch_composition(engine, engine_unbatched, store):
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=6, seed=3)
    batched = _generate(engine, store, sampling, prefix="batched")
    alone = _generate(engine_unbatched, store, sampling, prefix="alone")
    shuffled = _generate(engine, store, sampling, prefix="shuffled", records=_records()[::-1])
    assert batched == alone == shuffled


def test_greedy_generation_matches_transformers_generate(engine, store):
    results = _generate(engine, store, Sampling(temperature=0.0, max_tokens=7))
    tok, model = engine.tokenizer, engine._model
    for record in _records()[:4]:
        ids = tok(_prompt(record), return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=7, do_sample=False)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert results[record["id"]].text == expected
        assert results[record["id"]].prompt_tokens == ids.shape[1]


def test_stop_strings_end_the_text_and_are_cut(engine, store):
    greedy = _generate(engine, store, Sampling(temperature=0.0, max_tokens=12), prefix="free")
    text = greedy["r0"].text
    stop = text[3:5]  # a piece of what the model writes anyway
    assert stop.strip()
    stopped = _generate(engine, store, Sampling(temperature=0.0, max_tokens=12, stop=(stop,)), prefix="stopped",
                        records=_records()[:1])
    assert stopped["r0"].finish_reason == "stop"
    assert stopped["r0"].text == text[:text.find(stop)]
    assert stopped["r0"].completion_tokens < 12


def test_prompts_get_exactly_one_bos(engine):
    tok = engine.tokenizer
    ids = engine._encode_prompt("Name three whales.")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert engine._encode_prompt(tok.bos_token + "Name three whales.") == ids


def test_score_returns_top_k_logprobs_with_the_model_argmax_first(engine, store):
    k = 20
    results = _score(engine, store, k)
    tok, model = engine.tokenizer, engine._model
    for record in _records():
        top = results[record["id"]]
        assert 0 < len(top) <= k
        assert all(isinstance(t, str) and isinstance(lp, float) and lp <= 0 for t, lp in top.items())
        assert sum(math.exp(lp) for lp in top.values()) <= 1 + 1e-6
        assert list(top.values()) == sorted(top.values(), reverse=True)
        ids = tok(_prompt(record), return_tensors="pt").input_ids
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), -1)
        best = int(logits.argmax())
        assert next(iter(top)) == tok.decode([best])
        assert top[tok.decode([best])] == pytest.approx(float(logprobs[best]), abs=1e-5)
        # K entries, fewer only where two of the top K ids decode to the same text
        assert len(top) == len({tok.decode([i]) for i in logprobs.topk(k).indices.tolist()})


def test_batched_scores_equal_unbatched_scores(engine, engine_unbatched, store):
    batched = _score(engine, store, 10, prefix="batched")
    alone = _score(engine_unbatched, store, 10, prefix="alone")
    assert batched.keys() == alone.keys()
    for rid in batched:
        assert list(batched[rid]) == list(alone[rid])
        assert list(batched[rid].values()) == pytest.approx(list(alone[rid].values()), abs=1e-5)


def test_scoring_resumes_exactly_once_after_a_failure(engine, store):
    records = _records()
    calls = []

    def failing(record, top):
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        calls.append(record["id"])
        return {"id": record["id"], "best": next(iter(top))} if record["id"] != "r1" else None

    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.score(records, _prompt, top_k=5, store=store, prefix="curate", handle=failing, checkpoint_every=2)
    first_outputs, first_dropped = _ids(store, "curate"), _ids(store, "curate/dropped")
    assert 0 < len(first_outputs) + len(first_dropped) <= 5

    seen = []
    stats = engine.score(records, _prompt, top_k=5, store=store, prefix="curate", checkpoint_every=2,
                         handle=lambda r, top: seen.append(r["id"]) or {"id": r["id"], "best": next(iter(top))})
    outputs, dropped = _ids(store, "curate"), _ids(store, "curate/dropped")
    assert sorted(outputs + dropped) == sorted(r["id"] for r in records)  # every id once
    assert not set(seen) & set(first_outputs + first_dropped)  # nothing done twice
    assert stats["skipped_done"] == len(first_outputs) + len(first_dropped)
    assert stats["completed"] == len(seen)


def test_generation_resumes_with_the_samples_the_first_run_would_have_drawn(engine, store):
    sampling = Sampling(temperature=1.0, max_tokens=5, seed=11)
    full = _generate(engine, store, sampling, prefix="full")
    _generate(engine, store, sampling, prefix="resumed", records=_records()[:3])
    rest = _generate(engine, store, sampling, prefix="resumed")  # redoes only r3..r9
    assert set(rest) == {f"r{i}" for i in range(3, 10)}
    assert all(rest[rid] == full[rid] for rid in rest)
    assert sorted(_ids(store, "resumed")) == sorted(full)


def test_in_process_batches_are_full_until_the_last_one(engine, store, monkeypatch):
    sizes = []
    original = engine._complete_batch
    monkeypatch.setattr(engine, "_complete_batch", lambda p, q: sizes.append(len(p)) or original(p, q))
    _generate(engine, store, Sampling(max_tokens=2))  # checkpoint_every=3 keeps workers writing meanwhile
    assert sizes == [4, 4, 2]


def test_scoring_is_one_forward_pass_per_batch(engine, store):
    forwards = []
    hook = engine._model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        _score(engine, store, 5)
    finally:
        hook.remove()
    assert len(forwards) == 3  # 10 records, batches of 4


def test_a_failing_batch_fails_the_run_after_checkpointing_what_finished(engine, store, monkeypatch):
    calls = []
    original = engine._complete_batch

    def flaky(prompts_, params):
        calls.append(len(prompts_))
        if len(calls) == 2:
            raise RuntimeError("model exploded")
        return original(prompts_, params)

    monkeypatch.setattr(engine, "_complete_batch", flaky)
    with pytest.raises(RuntimeError, match="model exploded"):
        engine.score(_records(), _prompt, top_k=3, store=store, prefix="x", checkpoint_every=100,
                     handle=lambda r, top: {"id": r["id"]})
    assert sorted(_ids(store, "x")) == ["r0", "r1", "r2", "r3"]


# --- the server engine, and the same shapes from both ---------------------------------------------

def test_server_engine_gives_the_same_shapes_as_transformers(engine, store):
    top = {" 5": -0.1, " 4": -2.4, "x": -4.0}
    with StubServer(text="Name three whales please", top_logprobs=top, model="tiny") as stub:
        server = VLLMServerEngine(stub.url, "tiny", concurrency=4)
        sampling = Sampling(temperature=0.7, max_tokens=2, seed=0)
        served = _generate(server, store, sampling, prefix="served-gen")
        served_scores = _score(server, store, 3, prefix="served-score")
    local = _generate(engine, store, sampling, prefix="local-gen")
    # the whole vocabulary, so that the digit tokens are surely among them even for random weights
    vocab = len(engine.tokenizer)
    local_scores = _score(engine, store, vocab, prefix="local-score", records=_records()[:3],
                          build=lambda r: prompts.curation_logprob_prompt(r["text"], "An answer."))

    first = served["r0"]
    assert (first.text, first.finish_reason, first.completion_tokens) == ("Name three", "length", 2)
    for result in [*served.values(), *local.values()]:
        assert type(result) is GenerationResult
        assert isinstance(result.text, str) and result.finish_reason in ("stop", "length")
        assert isinstance(result.prompt_tokens, int) and isinstance(result.completion_tokens, int)
    assert served_scores["r0"] == top
    for scores in (served_scores, local_scores):
        for top_logprobs in scores.values():
            assert type(top_logprobs) is dict
            assert all(type(t) is str and type(lp) is float for t, lp in top_logprobs.items())
            parsed = prompts.score_from_top_logprobs(top_logprobs)
            assert parsed is not None and 1 <= parsed.expected <= 5 and 0 < parsed.mass <= 1
    assert prompts.score_from_top_logprobs(served_scores["r0"]).argmax == 5


def test_server_engine_sends_sampling_params_and_a_seed_per_record(store):
    bodies = []
    with StubServer(text="ok") as stub:
        server = VLLMServerEngine(stub.url, "tiny", concurrency=2)
        client_cls = engines.CompletionsClient

        class Recording(client_cls):
            async def complete(self, prompt, **params):
                bodies.append(params)
                return await super().complete(prompt, **params)

        server._open_client = lambda: Recording(server.settings)
        sampling = Sampling(temperature=0.5, top_p=0.8, max_tokens=9, seed=4, stop=("\n\n",))
        _generate(server, store, sampling, records=_records()[:2])
        _score(server, store, 7, records=_records()[:1])
    assert sorted(bodies[:2], key=lambda b: b["seed"]) == sorted(
        [{"max_tokens": 9, "temperature": 0.5, "top_p": 0.8, "stop": ["\n\n"], "seed": record_seed(4, rid)}
         for rid in ("r0", "r1")], key=lambda b: b["seed"])
    assert bodies[2] == {"max_tokens": 1, "temperature": 0.0, "logprobs": 7}


def test_record_seed_is_stable_and_differs_by_id_and_seed():
    assert record_seed(0, "r1") == record_seed(0, "r1")
    assert len({record_seed(0, "r1"), record_seed(0, "r2"), record_seed(1, "r1"), record_seed(0, 1)}) == 4
    assert 0 <= record_seed(123, "x") < 2**31


# --- choosing an engine ---------------------------------------------------------------------------

def test_make_engine_auto_takes_the_server_when_an_endpoint_is_given(model_dir):
    engine = make_engine(InferenceSpec(concurrency=3, max_retries=2), "served-name", endpoint="http://vllm:8000/v1")
    assert isinstance(engine, VLLMServerEngine)
    assert (engine.settings.model, engine.settings.concurrency, engine.settings.max_retries) == ("served-name", 3, 2)
    from_spec = make_engine(InferenceSpec(endpoint="http://localhost:8000/v1"), "m")
    assert isinstance(from_spec, VLLMServerEngine) and from_spec.settings.base_url == "http://localhost:8000/v1"


def test_make_engine_auto_takes_vllm_when_installed_else_transformers(model_dir, monkeypatch):
    monkeypatch.setattr(inference_models, "vllm_available", lambda: False)
    engine = make_engine(InferenceSpec(batch_size=5), model_dir)
    assert isinstance(engine, TransformersEngine) and engine.batch_size == 5

    class FakeVLLMEngine:
        def __init__(self, model, batch_size, **options):
            self.model, self.batch_size = model, batch_size

    monkeypatch.setattr(inference_models, "vllm_available", lambda: True)
    monkeypatch.setattr(inference_models, "VLLMEngine", FakeVLLMEngine)
    engine = make_engine(InferenceSpec(batch_size=5, checkpoint_every=300), model_dir)
    assert isinstance(engine, FakeVLLMEngine) and engine.batch_size == 300  # a whole shard per call


def test_make_engine_explicit_choices(model_dir, monkeypatch):
    assert isinstance(make_engine(InferenceSpec(engine="transformers", endpoint="http://x:1/v1"), model_dir),
                      TransformersEngine)
    with pytest.raises(ValueError, match="inference.endpoint"):
        make_engine(InferenceSpec(engine="vllm-server"), "m")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        make_engine(InferenceSpec(engine="transformers"), model_dir / "missing")
    if not local_engines.vllm_available():
        with pytest.raises(ImportError, match="vLLM is not installed.*'transformers'.*'vllm-server'"):
            make_engine(InferenceSpec(engine="vllm"), model_dir)


def test_sampling_validates_its_fields():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        Sampling(max_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        Sampling(stop="\n")
    from humpback_runtime.spec import SamplingSpec

    assert Sampling.from_spec(SamplingSpec(temperature=0.3, seed=9)) == Sampling(temperature=0.3, top_p=0.9,
                                                                                max_tokens=256, seed=9)


# --- in-process vLLM, where installed -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not local_engines.vllm_available(), reason="vLLM is not installed")
def test_vllm_engine_gives_the_same_shapes(model_dir, store):
    vllm_engine = local_engines.VLLMEngine(model_dir, batch_size=4, enforce_eager=True, gpu_memory_utilization=0.3)
    results = _generate(vllm_engine, store, Sampling(temperature=0.7, max_tokens=8, seed=1))
    again = _generate(vllm_engine, store, Sampling(temperature=0.7, max_tokens=8, seed=1), prefix="again")
    assert results == again
    assert all(1 <= r.completion_tokens <= 8 for r in results.values())
    scores = _score(vllm_engine, store, 5)
    assert all(0 < len(top) <= 5 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
               for top in scores.values())


def test_a_client_uses_the_generated_key_of_the_operators_server(monkeypatch):
    """The operator gives a client the key of each server it started (HUMPBACK_SERVER_API_KEY_<MODEL>,
    by secretKeyRef); the engine sends it, and a model without a key of its own gets none."""
    from humpback_runtime.context import RunContext
    from humpback_runtime.inference.models import engine_for
    from humpback_runtime.spec import parse_run

    run = parse_run({"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "metadata": {"name": "r"},
                     "spec": {"baseModel": "m", "seed": {"source": "s.jsonl"}, "corpus": {"source": "c.jsonl"}}})
    monkeypatch.setenv("HUMPBACK_ENDPOINTS", '{"train-m0": "http://s0:8000/v1", "train-m1": "http://s1:8000/v1"}')
    monkeypatch.setenv("HUMPBACK_SERVER_API_KEY_M0", "k0")
    ctx = RunContext.create(run)
    assert engine_for(ctx, "train-m0").settings.api_key == "k0"
    assert engine_for(ctx, "train-m1").settings.api_key is None
    monkeypatch.delenv("HUMPBACK_ENDPOINTS")
    monkeypatch.setenv("HUMPBACK_ENDPOINT", "http://s:8000/v1")
    monkeypatch.setenv("HUMPBACK_SERVER_API_KEY_MYX", "kx")
    assert engine_for(ctx, "train-myx").settings.api_key == "kx"


def test_a_users_own_endpoint_may_speak_the_chat_api_the_operators_servers_never(monkeypatch, tmp_path):
    from humpback_runtime.context import RunContext
    from humpback_runtime.inference.models import engine_for
    from humpback_runtime.spec import parse_run

    def ctx_with(**inference):
        run = parse_run({"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "metadata": {"name": "r"},
                         "spec": {"baseModel": "m", "seed": {"source": "s.jsonl"}, "corpus": {"source": "c.jsonl"},
                                  "inference": inference}})
        return RunContext.create(run, str(tmp_path / "runs"))

    assert engine_for(ctx_with(endpoint="http://mine:8000/v1"), "train-m0").settings.api == "completions"
    chat = ctx_with(endpoint="http://mine:8000/v1", api="chat")
    assert engine_for(chat, "train-m0").settings.api == "chat"
    monkeypatch.setenv("HUMPBACK_ENDPOINTS", '{"train-m0": "http://s0:8000/v1"}')  # the operator's server
    assert engine_for(chat, "train-m0").settings.api == "completions"


# --- prompts too long for the context (issue 10) -----------------------------------------------------

def test_prompt_limit_counts_only_prompts_that_may_not_fit_and_names_the_figures():
    from humpback_runtime.inference.engines import PromptLimit

    counted: list[str] = []

    def count(prompt: str) -> int:
        counted.append(prompt)
        return len(prompt.split()) + 1  # a word a token, plus BOS

    limit = PromptLimit(context=100, count_tokens=count, source="inference.vllm.maxModelLen")
    assert limit.check("short prompt", max_tokens=16) is None
    assert counted == []  # 12 bytes + 16 cannot pass 100 tokens: no tokenizer call
    assert limit.check("x " * 60, max_tokens=16) is None  # 120 bytes, but 61 + 16 tokens fit
    reason = limit.check("word " * 90, max_tokens=16)
    assert reason == ("prompt too long for the context: 91 prompt tokens + 16 max_tokens > 100 "
                      "(inference.vllm.maxModelLen); not sent")
    assert len(counted) == 2
