"""Efficient fine-tuning on the real path with the tiny model: padding-free packing gives the same
loss as padded batches (no attention across examples, loss on responses only), and LoRA trains
through `train()` and exports a plain merged model, with an eval split logged."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from humpback_runtime.spec import TrainingSpec  # noqa: E402
from humpback_runtime.storage import LocalStore  # noqa: E402
from humpback_runtime.training import COMPLETE, IGNORE_INDEX, TrainRequest, train  # noqa: E402
from humpback_runtime.training.varlen import register_varlen  # noqa: E402
from humpback_runtime.training.recipe import tokenize_example  # noqa: E402
from humpback_runtime.training.trainer import make_collator  # noqa: E402


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen", "eager"])
def test_packed_loss_equals_the_padded_and_the_per_example_loss(tiny_model, examples, attention) -> None:
    if attention == "sdpa_varlen":
        register_varlen()  # SDPA example by example within the packed row
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation=attention)
    model.eval()
    model.config.use_cache = False  # as in training: with a KV cache transformers ignores packed position ids
    feats = [tokenize_example(tok, ex, 256) for ex in examples[:6]]
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1  # variable lengths: padding would be needed

    packed = make_collator(True, tok.eos_token_id, cuda=False, attention=attention)(feats)
    padded = make_collator(False, tok.eos_token_id, cuda=False, attention=attention)(feats)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert padded["input_ids"].shape == (6, max(lengths))
    # Position ids restart at every example; the first label of each example is masked, so no
    # token predicts across a boundary.
    starts = [sum(lengths[:i]) for i in range(6)]
    assert [int(packed["position_ids"][0, s]) for s in starts] == [0] * 6
    assert all(int(packed["labels"][0, s]) == IGNORE_INDEX for s in starts)

    with torch.no_grad():
        loss_packed = model(**packed).loss
        loss_padded = model(**padded).loss
        # Token-weighted mean of each example run alone: what the batch loss must be.
        total, n = 0.0, 0
        for f in feats:
            one = {k: torch.tensor([v]) for k, v in f.items()}
            k = sum(1 for label in f["labels"][1:] if label != IGNORE_INDEX)
            total += float(model(**one).loss) * k
            n += k
        # Logits of the packed row equal each example's own logits: no attention across examples.
        logits = model(**packed).logits[0]
        alone = model(input_ids=torch.tensor([feats[3]["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[starts[3]:starts[3] + lengths[3]], alone, atol=1e-4, rtol=1e-4)
    assert float(loss_packed) == pytest.approx(total / n, rel=1e-4)
    assert float(loss_packed) == pytest.approx(float(loss_padded), rel=1e-4)


def test_lora_trains_and_exports_a_plain_merged_model_with_eval_loss(tiny_model, examples, tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    settings = TrainingSpec(steps=4, batch_size=4, per_device_batch_size=2, max_seq_length=128,
                            checkpoint_every=100, zero_stage=2, learning_rate=1e-2, final_learning_rate=1e-2,
                            lora={"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
                            eval_fraction=0.25, eval_every=2)
    metrics = train(TrainRequest(base_model=str(tiny_model), examples=examples[:8], settings=settings,
                                 store=store, prefix="default/tiny/train-m0"))
    assert metrics["lora"]["rank"] == 4 and metrics["packing"] and metrics["attention"] == "sdpa_varlen"
    assert metrics["examples"] == 6 and metrics["eval_examples"] == 2
    assert [step for step, _ in metrics["eval_loss"]] == [2, 4, 4]  # every evalEvery steps, then the final one
    assert all(loss > 0 for _, loss in metrics["eval_loss"])
    assert metrics["tokens_per_second"] > 0 and metrics["mfu"] is None  # no GPU peak on CPU

    model_dir = store.local_path("default/tiny/train-m0/model")
    assert (model_dir / COMPLETE).is_file() and (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("adapter_*")), "the export must be a plain model, not an adapter"
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert set(trained.state_dict()) == set(base.state_dict())  # no lora_A / lora_B left
    changed = {n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(".q_proj." in n or ".v_proj." in n for n in changed), changed


def test_time_based_checkpoints_upload_in_the_background_and_the_store_keeps_the_last(
        tiny_model, examples, tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    prefix = "default/tiny/train-m0"
    # checkpointEvery is out of reach: every save below is due to the clock (a minute's 1/10,000th).
    settings = TrainingSpec(steps=3, batch_size=2, per_device_batch_size=2, max_seq_length=96, zero_stage=2,
                            checkpoint_every=1000, checkpoint_every_minutes=0.0001)
    metrics = train(TrainRequest(base_model=str(tiny_model), examples=examples[:4], settings=settings, store=store,
                                 prefix=prefix, keep_checkpoints=True))
    assert metrics["checkpoints"] == [1, 2]  # not at the last step: the model is the output there
    assert [e["step"] for e in metrics["checkpoint_stalls"]] == [1, 2]
    assert all(e["upload_seconds"] > 0 for e in metrics["checkpoint_stalls"])
    assert metrics["checkpoint_seconds"] == pytest.approx(sum(e["stall_seconds"] for e in metrics["checkpoint_stalls"]),
                                                          abs=0.01)
    folders = {k.split("/")[4] for k in store.list(f"{prefix}/checkpoints")}
    assert folders == {"step-2"} and store.exists(f"{prefix}/checkpoints/step-2/{COMPLETE}")
    assert len(store.list(f"{prefix}/checkpoints/step-2")) > 3  # weights, optimizer, RNG, state: not only the marker
