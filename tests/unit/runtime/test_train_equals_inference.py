"""Every stage prompts every model with exactly the text format it was trained with, token for token.

The inference stages (augment, self-rewriting, curation, evaluation) run through `run_stage` with a
recording engine in place of a real one; their prompts are compared, with the tiny model's
tokenizer, against the training examples that train.py builds for the model each stage prompts:

- Myx (augment): the backward prompt of a training example for the same response;
- M0, M1, M2 (curate-k, rewrite-k, evaluate): a forward training prompt, with one of the system
  texts that model was trained with, for the same instruction (the stage's task text).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from humpback_runtime import prompts as P
from humpback_runtime.context import RunContext
from humpback_runtime.inference import models
from humpback_runtime.inference.engines import Engine, GenerationResult
from humpback_runtime.spec import parse_run
from humpback_runtime.stages import run_stage
from humpback_runtime.stages.train import training_examples
from humpback_runtime.storage import ShardWriter, write_success

ROOT = Path(__file__).resolve().parents[3]
SEED = [{"id": f"s{i}", "instruction": f"Seed question {i}?", "response": f"Seed answer {i}."} for i in range(3)]
SEGMENTS = [{"id": f"c{i}", "text": f"A web page about whales, part {i}. " * 20} for i in range(3)]


class RecordingEngine(Engine):
    """Writes a fixed answer for every record and remembers each prompt with the model it was for."""

    name = "recording"

    def __init__(self, model: str, seen: list[tuple[str, str]]):
        self.model, self.seen = model, seen

    def generate(self, records, build_prompt, sampling, *, store, prefix, handle, id_field="id", **_):
        with ShardWriter(store, prefix) as writer:
            for record in records:
                self.seen.append((self.model, build_prompt(record)))
                out = handle(record, GenerationResult("Write about whales.\nScore: 5", "stop", 1, 1))
                if out is not None:
                    writer.write(out)
        return {"completed": writer.count}

    def _open_client(self):  # pragma: no cover - generate is overridden
        raise NotImplementedError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    model_dir = ROOT / ".cache" / "tiny-llama"
    if not (model_dir / "tokenizer.json").is_file():
        from humpback_runtime.tiny_model import build_tiny_model

        model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _finish(ctx: RunContext, stage: str, records: list[dict] | None = None) -> None:
    """Mark `stage` finished with `records` as its output (a stand-in for running it)."""
    keys = []
    if records is not None:
        with ShardWriter(ctx.store, ctx.prefix(stage)) as writer:
            for r in records:
                writer.write(r)
        keys = writer.shards
    write_success(ctx.store, ctx.prefix(stage), {"stage": stage, "fingerprint": ctx.plan[stage].fingerprint,
                                                  "outputs": {"records": keys, "count": len(records or [])}})


def _forward_parts(prompt: str) -> tuple[str, str]:
    head, rest = prompt.split("### Instruction:\n", 1)
    return head.removesuffix("\n\n"), rest.removesuffix("\n\n### Response:\n")


@pytest.mark.parametrize("order", ["before", "after"])
def test_every_stage_prompts_each_model_as_it_was_trained(tmp_path, monkeypatch, tokenizer, order):
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = data["spec"]
    spec["curation"].update(mode="generate", threshold=1, rewrite={"enabled": True, "order": order})
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"Eval question {i}?"}) + "\n"
                               for i in range(2)))
    spec["evaluation"] = {"enabled": True, "sets": [{"name": "mini", "source": str(evalset)}]}
    ctx = RunContext.create(parse_run(data), str(tmp_path / "runs"))
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(models, "engine_for", lambda _ctx, stage: RecordingEngine(stage, seen))

    _finish(ctx, "prepare-seed", SEED)
    _finish(ctx, "prepare-corpus", SEGMENTS)
    for name in ctx.plan.names():
        stage = ctx.plan[name]
        if stage.family == "train":
            _finish(ctx, name)  # training itself is not under test; its examples are, below
        elif stage.family in ("augment", "rewrite", "curate", "evaluate"):
            run_stage(ctx, name)

    trained = {name: training_examples(ctx, ctx.plan[name])[0]
               for name in ("train-myx", "train-m0", "train-m1", "train-m2")}
    prompted = {model for model, _ in seen}
    assert prompted == set(trained), prompted  # every model was prompted by some stage
    ids = lambda text: tokenizer(text).input_ids  # noqa: E731
    for model, prompt in seen:
        if model == "train-myx":
            response = prompt.split("### Response:\n", 1)[1].rsplit("\n\n### Instruction", 1)[0]
            assert ids(prompt) == ids(P.backward_example("unused", response).prompt)
            continue
        systems = {_forward_parts(ex.prompt)[0] for ex in trained[model]}
        system, instruction = _forward_parts(prompt)
        assert system in systems, (model, system, systems)
        assert any(ids(prompt) == ids(P.forward_example(instruction, "An answer.", s).prompt) for s in systems)
    # M0 trained with the seed tag only, so that is all it may ever see.
    m0 = [p for model, p in seen if model == "train-m0"]
    assert m0 and all(_forward_parts(p)[0] == P.seed_system(ctx.run.spec.system_prompts) for p in m0)
