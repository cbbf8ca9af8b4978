"""The publish stage: the exact folders a push uploads (checked with huggingface_hub's own card
parsers and transformers' chat templating), and the push itself against a local Hub stand-in
(humpback_testing.hub_stub). No network: HF_ENDPOINT points at the stub on loopback.

The upstream stages are stand-ins with real outputs: the tiny model's files as each trained
model, stored curation scores, and a real evaluate() run judged by the OpenAI stub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from humpback_runtime import prompts as P
from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError
from humpback_runtime.manifest import describe_outputs
from humpback_runtime.plan import build_plan
from humpback_runtime.spec import SpecError, parse_run
from humpback_runtime.stages import run_stage
from humpback_runtime.stages.train import training_examples
from humpback_runtime.storage import ShardWriter, write_success

hub_stub = pytest.importorskip("humpback_testing.hub_stub")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[3]
PREFIX = "me/humpback-demo"
SEED = [{"id": f"s{i}", "instruction": f"Seed question {i}?", "response": f"Seed answer {i}."} for i in range(3)]
SEGMENTS = [{"id": f"https://example.org/{i}", "text": f"A web page about whales, part {i}. " * 20} for i in range(6)]
# curate-k's stored scores: candidate i scored SCORES[i] (None: unparsable).
SCORES = [5, 4, 3, 5, None, 1]
MODELS = ["train-myx", "train-m0", "train-m1", "train-m2"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    model = ROOT / ".cache" / "tiny-llama"
    if not (model / "model.safetensors").is_file():
        from humpback_runtime.tiny_model import build_tiny_model

        model = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return model


def _spec(tmp_path: Path, **hub) -> dict:
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = data["spec"]
    spec["curation"].update(mode="generate", threshold=4, minYield=0)
    sets = tmp_path / "sets"
    sets.mkdir(exist_ok=True)
    (sets / "mini.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"Eval question {i}?",
                                                         "reference": "A reference answer."}) + "\n"
                                             for i in range(2)))
    (sets / "mt.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "instruction": f"First {i}?", "category": "writing",
                                                       "turns": [f"First {i}?", f"Second {i}?"]}) + "\n"
                                           for i in range(2)))
    spec["evaluation"] = {"enabled": True, "judge": {"endpoint": "http://127.0.0.1:9/v1", "model": "judge-7b"},
                          "sets": [{"name": "mini", "source": str(sets / "mini.jsonl")},
                                   {"name": "mt", "source": str(sets / "mt.jsonl"), "kind": "mt_bench"}]}
    spec["publish"] = {"hub": {"repoPrefix": PREFIX, "tokenSecret": "hf-write", **hub}}
    return data


def _finish(ctx: RunContext, stage: str, records: list[dict] | None = None, **fields) -> None:
    prefix = ctx.prefix(stage)
    keys = []
    if records is not None:
        with ShardWriter(ctx.store, prefix) as writer:
            for r in records:
                writer.write(r)
        keys = writer.shards
    write_success(ctx.store, prefix, {"stage": stage, "fingerprint": ctx.plan[stage].fingerprint,
                                      "outputs": {"records": keys, "count": len(records or [])},
                                      "objects": describe_outputs(ctx.store, prefix), **fields})


def _judge(prompt: str) -> str:
    """Grades MT-Bench 7; prefers an answer containing GOOD (train-m2's), else a tie."""
    if "[[rating]]" in prompt:
        return "Rating: [[7]]"
    a, b = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)
    return "Verdict: A" if "GOOD" in a else "Verdict: B" if "GOOD" in b else "Verdict: tie"


def _upstream(ctx: RunContext, tiny_model: Path) -> None:
    """Every stage publish reads, finished with the current plan's fingerprints."""
    from humpback_testing.openai_stub import StubServer

    from humpback_runtime.evaluation import evaluate

    spec = ctx.run.spec
    _finish(ctx, "prepare-seed", SEED, inputIdentities={spec.seed.source: "sha256:seed"})
    _finish(ctx, "prepare-corpus", SEGMENTS, inputIdentities={spec.corpus.source: "sha256:corpus"})
    for name in MODELS:
        for f in tiny_model.iterdir():
            if f.is_file() and f.name != "README.md":
                ctx.store.upload_file(f, f"{ctx.prefix(name)}/model/{f.name}")
        ctx.store.write_json(f"{ctx.prefix(name)}/model/_COMPLETE", {"steps": 3})
        metrics = {"examples_in": 9, "examples": 9, "examples_dropped": 0, "examples_truncated": 0, "tokens": 900,
                   "world_size": 1, "steps": 3, "precision": "fp32", "train_loss": [[1, 5.5], [2, 4.0], [3, 3.25]],
                   "resumed_from": None, "gradient_accumulation_steps": 1}
        _finish(ctx, name, counts={"seed": 3, "curated": 2}, metrics=metrics)
    _finish(ctx, "augment", [{"id": s["id"], "instruction": f"Write about whales {i}.", "response": s["text"]}
                             for i, s in enumerate(SEGMENTS)])
    for k in (1, 2):
        scored = [{"id": s["id"], "instruction": f"Write about whales {i}.", "response": s["text"],
                   "score": SCORES[i], "judgement": f"Fine.\nScore: {SCORES[i]}"} for i, s in enumerate(SEGMENTS)]
        histogram = {str(d): sum(1 for x in SCORES if x == d) for d in range(1, 6)}
        _finish(ctx, f"curate-{k}", scored, counts={"candidates": len(SEGMENTS), "scored": len(SEGMENTS)},
                scores={"histogram": histogram, "unparsable": 1})
    answers = {"train-m0": "a bad answer", "train-m1": "a bad answer", "train-m2": "a GOOD answer"}
    with StubServer(text=_judge) as judge:
        evaluation = spec.evaluation.model_copy(update={"judge": spec.evaluation.judge.model_copy(
            update={"endpoint": judge.url})})
        result = evaluate(evaluation, ["train-m0", "train-m1", "train-m2"],
                          lambda model, records, _prefix: {r["id"]: answers[model] for r in records},
                          store=ctx.store, prefix=ctx.prefix("evaluate"))
    _finish(ctx, "evaluate", **result)


@pytest.fixture
def make_ctx(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login token from this machine
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def make(**hub) -> RunContext:
        ctx = RunContext.create(parse_run(_spec(tmp_path, **hub)), str(tmp_path / "runs"), identify_inputs=False)
        _upstream(ctx, tiny_model)
        return ctx

    return make


def _folder(ctx: RunContext, repo: str) -> Path:
    return Path(ctx.store.local_path(f"{ctx.prefix('publish')}/{repo}"))


# --- the plan and the spec --------------------------------------------------------------------


def test_plan_publishes_after_what_it_pushes(tmp_path):
    plan = build_plan(parse_run(_spec(tmp_path)))
    publish = plan["publish"]
    assert plan.names()[-1] == "publish" and publish.kind == "cpu"
    assert set(publish.deps) == {*MODELS, "curate-1", "curate-2", "evaluate"}
    assert publish.settings["models"] == MODELS and publish.settings["datasets"] == [1, 2]
    assert "tokenSecret" not in publish.settings["hub"]  # who pushes is not what is pushed

    final = build_plan(parse_run(_spec(tmp_path, artifacts=["final-model"])))["publish"]
    assert set(final.deps) == {"train-m2", "evaluate"} and final.settings["datasets"] == []
    data_only = build_plan(parse_run(_spec(tmp_path, artifacts=["datasets"])))["publish"]
    assert set(data_only.deps) == {"curate-1", "curate-2"}

    no_hub = _spec(tmp_path)
    del no_hub["spec"]["publish"]
    assert "publish" not in build_plan(parse_run(no_hub))
    # A changed selection re-publishes the data; another token does not.
    other = _spec(tmp_path)
    other["spec"]["curation"]["threshold"] = 5
    assert build_plan(parse_run(other))["publish"].fingerprint != publish.fingerprint
    assert build_plan(parse_run(_spec(tmp_path, tokenSecret="other")))["publish"].fingerprint == publish.fingerprint


@pytest.mark.parametrize("hub, field", [
    ({"repoPrefix": "me/bad name"}, "spec.publish.hub.repoPrefix"),
    ({"repoPrefix": "no-owner"}, "spec.publish.hub.repoPrefix"),
    ({"repoPrefix": "me/" + "x" * 90}, "spec.publish.hub.repoPrefix"),
    ({"repoPrefix": "me/ok", "tokenSecret": "Not_A_Name"}, "spec.publish.hub.tokenSecret"),
    ({"repoPrefix": "me/ok", "artifacts": ["weights"]}, "spec.publish.hub.artifacts[0]"),
    ({"repoPrefix": "me/ok", "token": "hf_abc"}, "spec.publish.hub.token"),  # no literal token field
])
def test_bad_publish_settings_name_the_field(tmp_path, hub, field):
    data = _spec(tmp_path)
    data["spec"]["publish"] = {"hub": hub}
    with pytest.raises(SpecError) as e:
        parse_run(data)
    assert any(line.startswith(field + ":") for line in e.value.errors), e.value.errors


# --- the upload folders -------------------------------------------------------------------------


def test_dry_run_writes_the_exact_upload_folders(make_ctx):
    from huggingface_hub import DatasetCard, ModelCard

    ctx = make_ctx(dryRun=True)
    with hub_stub.HubStub() as hub:  # where a push would go: nothing may reach it
        manifest = run_stage(ctx, "publish")
    assert hub.requests == []
    repos = {r["repo"]: r for r in manifest["outputs"]["repos"]}
    assert set(repos) == {f"{PREFIX}-myx", f"{PREFIX}-m0", f"{PREFIX}-m1", f"{PREFIX}-m2", f"{PREFIX}-curated"}
    assert not any(r["pushed"] for r in repos.values()) and manifest["dryRun"] is True

    m2 = _folder(ctx, f"{PREFIX}-m2")
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= \
        {p.name for p in m2.iterdir()}
    assert not (m2 / "_COMPLETE").exists()
    card = ModelCard.load(m2 / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "other"
    assert card.data.datasets == [f"{PREFIX}-curated"]  # M2 trained on the published curated pairs
    results = {(r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("mini", "win rate vs train-m0")] == 1.0
    assert results[("mini", "win rate vs train-m1")] == 1.0
    assert results[("mini", "win rate vs reference")] == 1.0
    assert results[("mt", "MT-Bench score (1-10)")] == 7.0
    for heading in ("## Lineage", "## Hyperparameters", "## Usage", "## Evaluation", "## Contamination warning",
                    "## Training loss"):
        assert heading in card.text
    assert f'AutoTokenizer.from_pretrained("{PREFIX}-m2")' in card.text
    assert ctx.plan["train-m2"].fingerprint in card.text  # lineage

    m0 = ModelCard.load(_folder(ctx, f"{PREFIX}-m0") / "README.md")
    assert m0.data.datasets is None  # M0 saw the seed only
    m0_results = {(r.dataset_name, r.metric_name): r.metric_value for r in m0.data.eval_results}
    assert m0_results[("mini", "win rate vs train-m2")] == 0.0 and m0_results[("mini", "win rate vs reference")] == 0.5
    myx = ModelCard.load(_folder(ctx, f"{PREFIX}-myx") / "README.md")
    assert myx.data.eval_results is None and "## Evaluation" not in myx.text and "backward model" in myx.text
    assert "model_name" not in myx.data.to_dict()

    data = _folder(ctx, f"{PREFIX}-curated")
    dcard = DatasetCard.load(data / "README.md")
    assert dcard.data.license == "other" and dcard.data.task_categories == ["text-generation"]
    assert [c["config_name"] for c in dcard.data.configs] == ["iteration_1", "iteration_2"]
    assert dcard.data.configs[-1]["default"] is True
    import pyarrow.parquet as pq

    for config in dcard.data.configs:
        path = config["data_files"][0]["path"]
        files = sorted(data.glob(path))
        assert len(files) == 1
        rows = pq.read_table(files[0]).to_pylist()
        # Threshold 4 over the stored scores: candidates 0, 1 and 3.
        assert [(r["id"], r["score"]) for r in rows] == [(SEGMENTS[i]["id"], SCORES[i]) for i in (0, 1, 3)]
        assert rows[0]["response"] == SEGMENTS[0]["text"].strip()
    # The card's configs are what `datasets` loads from the repository.
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(str(data), "iteration_2", split="train")
    assert loaded.column_names == ["id", "instruction", "response", "score"] and loaded.num_rows == 3
    text = dcard.text
    assert "Apache-2.0" in text and "ODC-BY 1.0" in text  # oasst1 seed, c4 corpus
    assert "sha256:seed" in text and "sha256:corpus" in text
    assert "AlpacaEval" in text and "oasst1 **validation**" in text
    # Counts and the score histogram: 6 candidates, 1 unparsable, 3 selected; two 5s among the scored.
    assert "| iteration_1 | threshold-4 | 6 | 6 | 1 | 3 | 3 |" in text
    assert "| 5 | 2 | 2 |" in text and "| 1 | 1 | 0 |" in text


def test_published_tokenizers_render_the_training_prompts_token_for_token(make_ctx):
    """The chat template of each published tokenizer gives exactly the tokens the model was trained on
    before its answer (every training example's prompt), and the multi-turn prompts of evaluation."""
    ctx = make_ctx(dryRun=True)
    run_stage(ctx, "publish")
    for model in MODELS:
        tok = transformers.AutoTokenizer.from_pretrained(str(_folder(ctx, f"{PREFIX}-{model.removeprefix('train-')}")))
        assert tok.chat_template, model
        examples, _ = training_examples(ctx, ctx.plan[model])
        assert examples
        for ex in examples:
            expected = tok(ex.prompt).input_ids  # what training and the completions API tokenize
            if model == "train-myx":
                response = ex.prompt.removeprefix("### Response:\n").rsplit("\n\n### Instruction that", 1)[0]
                messages = [{"role": "user", "content": response}]
            else:
                system, instruction = ex.prompt.split("\n\n### Instruction:\n", 1)
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": instruction.removesuffix("\n\n### Response:\n")}]
            got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
            assert got == expected, (model, ex.prompt)
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": ex.completion}],
                                           tokenize=False)
            assert full == tok.bos_token + ex.text  # the whole example, answer included
    m2 = transformers.AutoTokenizer.from_pretrained(str(_folder(ctx, f"{PREFIX}-m2")))
    system = P.inference_system(ctx.run.spec.system_prompts)
    # No system message: the seed tag, as every stage prompts a forward model here.
    default = m2.apply_chat_template([{"role": "user", "content": "Name three whales."}], add_generation_prompt=True,
                                     tokenize=False)
    assert default == m2.bos_token + P.forward_prompt("Name three whales.", system)
    turns = [{"role": "user", "content": "First?"}, {"role": "assistant", "content": " One. "},
             {"role": "user", "content": "Second?"}]
    assert m2.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == \
        m2.bos_token + P.forward_turn_prompt([("First?", "One.")], "Second?", system)


@pytest.mark.parametrize("system", ["Answer in the style of an AI Assistant.", 'Réponds "vite" \\ — 答え 🐋\n{{ x }}', ""])
def test_chat_template_renders_forward_prompt_for_any_system_text(system, tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = P.chat_template("forward", default_system=system)
    rendered = tok.apply_chat_template([{"role": "user", "content": " Why?\n"}], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered == P.forward_prompt("Why?", system)
    tok.chat_template = P.chat_template("backward")
    assert tok.apply_chat_template([{"role": "user", "content": "Because."}], add_generation_prompt=True,
                                   tokenize=False) == P.backward_prompt("Because.")
    with pytest.raises(Exception, match="backward model takes a user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False)


def test_tokenizer_without_bos_gets_a_template_without_bos(tmp_path, tiny_model):
    from humpback_runtime.stages.publish import _set_chat_template

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, folder / name)
    config = json.loads((folder / "tokenizer.json").read_text())
    config["post_processor"] = None  # encodes text without adding <s>
    (folder / "tokenizer.json").write_text(json.dumps(config))
    _set_chat_template(folder, "forward", "Tag.")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    prompt = P.forward_prompt("Why?", "Tag.")
    assert tok(prompt).input_ids[0] != tok.bos_token_id
    assert tok.apply_chat_template([{"role": "user", "content": "Why?"}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"] == tok(prompt).input_ids


# --- the push -----------------------------------------------------------------------------------


def test_push_uploads_the_staged_folders_to_the_hub(make_ctx, monkeypatch):
    ctx = make_ctx()
    with hub_stub.HubStub(token="hf_test") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        manifest = run_stage(ctx, "publish")
    assert {r[2] for r in hub.requests} == {"Bearer hf_test"}
    assert set(hub.repos) == {f"{PREFIX}-myx", f"{PREFIX}-m0", f"{PREFIX}-m1", f"{PREFIX}-m2", f"{PREFIX}-curated"}
    assert hub.repos[f"{PREFIX}-curated"].repo_type == "dataset"
    assert all(r.private for r in hub.repos.values())  # private: true by default
    for entry in manifest["outputs"]["repos"]:
        repo = hub.repos[entry["repo"]]
        assert entry["pushed"] is True and entry["commit"] == repo.sha and len(repo.commits) == 1
        staged = _folder(ctx, entry["repo"])
        files = {p.relative_to(staged).as_posix(): p.read_bytes() for p in staged.rglob("*") if p.is_file()}
        assert repo.files == files  # exactly what was staged in the store
    assert f"fingerprint {ctx.plan['publish'].fingerprint}" in hub.repos[f"{PREFIX}-m2"].commits[0]["summary"]
    # Every card went through the Hub's metadata check (the stub parses it with huggingface_hub's cards).
    assert sorted(t for t, _ in hub.validated) == ["dataset"] + ["model"] * 4
    assert {c for _, c in hub.validated} == {r.files["README.md"].decode() for r in hub.repos.values()}


def test_push_without_a_token_fails_and_says_how_to_give_one(make_ctx):
    ctx = make_ctx()
    with pytest.raises(StageError, match="HF_TOKEN.*tokenSecret.*dryRun"):
        run_stage(ctx, "publish")
    assert not ctx.is_done(ctx.plan["publish"])


def test_private_publish_refuses_an_existing_public_repo(make_ctx, monkeypatch):
    ctx = make_ctx(artifacts=["final-model"])
    with hub_stub.HubStub(token="hf_test") as hub:
        public = hub.add_repo(f"{PREFIX}-m2", "model", private=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        with pytest.raises(StageError, match="exists and is public"):
            run_stage(ctx, "publish")
    assert public.files == {} and public.private is False


def test_the_local_runner_runs_publish_as_its_own_stage_command(tmp_path, tiny_model, monkeypatch):
    """`humpback run --until publish` runs the stage in a subprocess, as a pod would (`humpback stage publish`)."""
    import io

    from humpback_runtime.runner import run_local
    from humpback_runtime.spec import load_run

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    data = _spec(tmp_path, dryRun=True, artifacts=["datasets"])  # no transformers import in the subprocess
    spec = data["spec"]
    spec["baseModel"] = str(tiny_model)
    for part in ("seed", "corpus"):
        spec[part]["source"] = str(ROOT / "examples" / spec[part]["source"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    run = load_run(path)
    storage = str(tmp_path / "runs")
    ctx = RunContext.create(run, storage)  # content fingerprints, as the runner plans
    _upstream(ctx, tiny_model)
    out = io.StringIO()
    assert run_local(run, path, storage_uri=storage, until="publish", out=out) == 0, out.getvalue()
    assert ctx.is_done(ctx.plan["publish"])
    readme = _folder(ctx, f"{PREFIX}-curated") / "README.md"
    assert readme.is_file() and "## Score histograms" in readme.read_text()
    assert "publish" in out.getvalue()
