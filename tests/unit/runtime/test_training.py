"""Training building blocks without a training run: tokenisation and loss mask, truncation, the
learning-rate schedule, batch arithmetic, the DeepSpeed config and checkpoint choice."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from humpback_runtime import prompts
from humpback_runtime.spec import SystemPrompts, TrainingSpec
from humpback_runtime.storage import LocalStore
from humpback_runtime.training import COMPLETE, IGNORE_INDEX, TrainingError
from humpback_runtime.training.checkpoints import choose_checkpoint
from humpback_runtime.training.recipe import (
    deepspeed_config,
    gradient_accumulation_steps,
    learning_rate_at,
    learning_rate_factor,
    resolve_bf16,
    tokenize_example,
)

ROOT = Path(__file__).resolve().parents[3]
SYSTEM = prompts.seed_system(SystemPrompts())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from humpback_runtime.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    with open(ROOT / "examples" / "data" / "oasst1_pairs.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(24), fh)]


def _prompt_len(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt)["input_ids"])


# --- tokenisation ---------------------------------------------------------------------------------


def test_labels_mask_exactly_the_prompt_tokens(tokenizer, pairs) -> None:
    for pair in pairs:
        for ex in (prompts.forward_example(pair["instruction"], pair["response"], SYSTEM),
                   prompts.backward_example(pair["instruction"], pair["response"])):
            feat = tokenize_example(tokenizer, ex, 100_000)
            n_prompt = _prompt_len(tokenizer, ex.prompt)
            ids, labels = feat["input_ids"], feat["labels"]
            assert len(ids) == len(labels) == len(feat["attention_mask"])
            assert set(feat["attention_mask"]) == {1}
            assert ids[0] == tokenizer.bos_token_id
            assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
            assert labels[n_prompt:] == ids[n_prompt:]
            assert ids[-1] == tokenizer.eos_token_id
            # The unmasked tokens are the completion followed by EOS, nothing of the prompt.
            assert tokenizer.decode(ids[n_prompt:]) == ex.completion + tokenizer.eos_token
            assert tokenizer.decode(ids[:n_prompt]) == tokenizer.bos_token + ex.prompt


def test_eos_is_appended_once_and_special_token_text_stays_text(tokenizer) -> None:
    ex = prompts.forward_example("Say the end marker.", "It is written </s> like this.", SYSTEM)
    feat = tokenize_example(tokenizer, ex, 4096)
    assert feat["input_ids"].count(tokenizer.eos_token_id) == 1
    assert feat["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_cuts_from_the_right_and_keeps_response_tokens(tokenizer, pairs) -> None:
    ex = prompts.forward_example(pairs[0]["instruction"], pairs[0]["response"], SYSTEM)
    full = tokenize_example(tokenizer, ex, 100_000)
    n_prompt = _prompt_len(tokenizer, ex.prompt)
    assert len(full["input_ids"]) > n_prompt + 3
    cut = tokenize_example(tokenizer, ex, n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3
    assert cut["input_ids"][-1] != tokenizer.eos_token_id  # the stop was cut off with the tail


def test_example_is_dropped_when_the_prompt_fills_the_window(tokenizer, pairs) -> None:
    ex = prompts.forward_example(pairs[1]["instruction"], pairs[1]["response"], SYSTEM)
    n_prompt = _prompt_len(tokenizer, ex.prompt)
    assert tokenize_example(tokenizer, ex, n_prompt) is None
    assert tokenize_example(tokenizer, ex, n_prompt - 1) is None
    one = tokenize_example(tokenizer, ex, n_prompt + 1)
    assert len(one["input_ids"]) == n_prompt + 1
    assert sum(label != IGNORE_INDEX for label in one["labels"]) == 1


def test_short_example_keeps_its_eos_within_the_window(tokenizer) -> None:
    ex = prompts.forward_example("Hi", "Hello!", SYSTEM)
    feat = tokenize_example(tokenizer, ex, 4096)
    assert feat["labels"][-1] == tokenizer.eos_token_id


# --- learning-rate schedule -----------------------------------------------------------------------


def test_learning_rate_is_lr0_at_the_first_step_and_final_lr_at_the_last() -> None:
    spec = TrainingSpec()  # paper: 1e-5 -> 9e-6
    assert learning_rate_at(spec, 0, 500) == pytest.approx(1e-5, rel=1e-12)
    assert learning_rate_at(spec, 499, 500) == pytest.approx(9e-6, rel=1e-12)
    assert learning_rate_at(spec, 250, 501) == pytest.approx(9.5e-6, rel=1e-12)
    lrs = [learning_rate_at(spec, t, 500) for t in range(500)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate_at(spec, 10_000, 500) == pytest.approx(9e-6)  # never below the final rate
    assert learning_rate_at(spec, 0, 1) == pytest.approx(1e-5)


def test_lambda_lr_over_an_optimizer_applies_the_schedule_per_step() -> None:
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-5)
    steps = 6
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(learning_rate_factor, total_steps=steps, lr0=1e-5, lr_final=9e-6))
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used[0] == pytest.approx(1e-5)
    assert used[-1] == pytest.approx(9e-6)
    assert used == pytest.approx([1e-5 - 2e-7 * t for t in range(steps)])


# --- batch arithmetic and configs -----------------------------------------------------------------


@pytest.mark.parametrize(("batch", "per_device", "world", "expected"), [
    (32, 1, 8, 4), (32, 4, 1, 8), (32, 2, 16, 1), (4, 2, 1, 2), (4, 1, 2, 2),
])
def test_gradient_accumulation_makes_up_the_global_batch(batch, per_device, world, expected) -> None:
    spec = TrainingSpec(batch_size=batch, per_device_batch_size=per_device)
    assert gradient_accumulation_steps(spec, world) == expected


# batchSize % perDeviceBatchSize is the spec's to refuse (test_spec); the world size is known here only.
@pytest.mark.parametrize(("batch", "per_device", "world"), [(32, 4, 3), (4, 2, 4), (30, 2, 4)])
def test_gradient_accumulation_error_names_the_fields(batch, per_device, world) -> None:
    spec = TrainingSpec(batch_size=batch, per_device_batch_size=per_device)
    with pytest.raises(TrainingError) as err:
        gradient_accumulation_steps(spec, world)
    msg = str(err.value)
    assert f"batchSize ({batch})" in msg and f"perDeviceBatchSize ({per_device})" in msg
    assert f"world size ({world})" in msg


def test_deepspeed_config_per_zero_stage() -> None:
    assert deepspeed_config(TrainingSpec(zero_stage=0), world_size=1, bf16=False, gpu=False) is None
    cfg = deepspeed_config(TrainingSpec(batch_size=32, per_device_batch_size=2), world_size=8, bf16=True, gpu=True)
    assert cfg["zero_optimization"]["stage"] == 2
    batches = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert [cfg[k] for k in batches] == [32, 2, 2]
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_allow_untested_optimizer"] is True
    # The torch AdamW and our schedule: nothing for DeepSpeed to build or offload.
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert not any("offload" in k for k in cfg["zero_optimization"])
    cpu = deepspeed_config(TrainingSpec(batch_size=4, per_device_batch_size=2), world_size=1, bf16=False, gpu=False)
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"]["overlap_comm"] is False
    z3 = deepspeed_config(TrainingSpec(zero_stage=3, batch_size=8), world_size=8, bf16=True, gpu=True)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(("precision", "cuda", "bf16"), [
    ("auto", True, True), ("auto", False, False), ("bf16", False, True), ("bf16", True, True),
    ("fp32", True, False), ("fp32", False, False),
])
def test_precision_resolution(precision, cuda, bf16) -> None:
    assert resolve_bf16(precision, cuda) is bf16


# --- checkpoint choice ----------------------------------------------------------------------------


def _checkpoint(store: LocalStore, step: int, key: str | None, world_size: int = 1) -> None:
    store.write_bytes(f"run/stage/checkpoints/step-{step}/trainer_state.json", b"{}")
    if key is not None:
        store.write_json(f"run/stage/checkpoints/step-{step}/{COMPLETE}",
                         {"step": step, "training_key": key, "world_size": world_size})


def test_resume_takes_the_latest_complete_checkpoint_of_this_request(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert choose_checkpoint(store, "run/stage", "k", 1, 2) == (None, [])
    _checkpoint(store, 100, "k")
    _checkpoint(store, 200, "k")
    _checkpoint(store, 300, "k")
    _checkpoint(store, 400, None)  # an upload that never finished
    _checkpoint(store, 50, "other")  # an earlier request (spec edited)
    step, stale = choose_checkpoint(store, "run/stage", "k", 1, 2)
    assert step == 300
    assert stale == [50, 100, 200, 400]  # the store keeps the newest complete one only


def test_zero_checkpoint_of_another_world_size_is_not_resumed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _checkpoint(store, 100, "k", world_size=8)
    assert choose_checkpoint(store, "run/stage", "k", 16, 2) == (None, [100])
    assert choose_checkpoint(store, "run/stage", "k", 16, 0) == (100, [])  # plain DDP state is portable


# --- the cut policy (issue 10): cut what the model reads, keep what it learns ----------------------


def test_the_backward_model_cuts_the_response_to_fit_and_keeps_the_instruction(tokenizer, pairs) -> None:
    from humpback_runtime.training.recipe import tokenize_all

    long_response = " ".join(p["response"] for p in pairs[:6])  # far over the window
    ex = prompts.backward_example("Write about whales.", long_response)
    max_len = 96
    assert _prompt_len(tokenizer, ex.prompt) > max_len  # today's code drops this pair
    data = tokenize_all(tokenizer, [ex], max_len)
    assert data.dropped == 0 and data.prompt_cut == 1 and data.truncated == 0
    feat = data.features[0]
    assert len(feat["input_ids"]) <= max_len and feat["input_ids"][-1] == tokenizer.eos_token_id
    learned = [t for t, label in zip(feat["input_ids"], feat["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Write about whales." + tokenizer.eos_token  # the instruction, whole
    text = tokenizer.decode(feat["input_ids"])
    assert "### Response:\n" in text and "### Instruction that this is the answer to:\n" in text  # the template stays


def test_the_forward_model_keeps_the_instruction_and_cuts_the_response(tokenizer, pairs) -> None:
    from humpback_runtime.training.recipe import tokenize_all

    ex = prompts.forward_example("Write about whales.", " ".join(p["response"] for p in pairs[:6]), SYSTEM)
    data = tokenize_all(tokenizer, [ex], 96)
    assert data.dropped == 0 and data.truncated == 1 and data.prompt_cut == 0
    assert tokenizer.decode(data.features[0]["input_ids"]).startswith(tokenizer.bos_token + ex.prompt)
def test_training_under_its_yield_floor_fails_naming_the_counts_and_the_setting(tokenizer, pairs) -> None:
    """A forward model drops an example only when its instruction and template alone fill the window."""
    from humpback_runtime.errors import TrainingError
    from humpback_runtime.training.recipe import check_training_yield, tokenize_all

    long_instruction = " ".join(p["response"] for p in pairs[:6])
    examples = [prompts.forward_example(long_instruction, "Fine.", SYSTEM)] * 3 + [
        prompts.forward_example("Write about whales.", "Whales are large.", SYSTEM)]
    data = tokenize_all(tokenizer, examples, 96)
    assert (data.dropped, len(data.features)) == (3, 1)
    check_training_yield(data, len(examples), 96, 0.25)  # 1 of 4 meets a floor of 0.25
    with pytest.raises(TrainingError) as err:
        check_training_yield(data, len(examples), 96, 0.5)
    assert str(err.value) == ("3 of 4 examples were dropped because their kept part (the instruction and the "
                              "template) alone fills maxSeqLength (96 tokens), leaving 1, below minYield (0.5): "
                              "raise maxSeqLength")


def test_dropout_goes_on_every_dropout_field_the_config_has():
    transformers = pytest.importorskip("transformers")
    from humpback_runtime.training.trainer import apply_dropout

    llama = transformers.LlamaConfig()
    assert apply_dropout(llama, 0.1) == ["attention_dropout"] and llama.attention_dropout == 0.1
    gpt2 = transformers.GPT2Config()
    assert set(apply_dropout(gpt2, 0.1)) == {"resid_pdrop", "embd_pdrop", "attn_pdrop"}
    assert gpt2.resid_pdrop == gpt2.embd_pdrop == gpt2.attn_pdrop == 0.1


# --- efficient fine-tuning: memory arithmetic, attention choice, MFU, eval split ----------------


def test_zero0_refuses_a_7b_model_on_an_80gb_gpu_with_the_arithmetic() -> None:
    from humpback_runtime.training.recipe import check_fits

    with pytest.raises(TrainingError) as err:
        check_fits(7_000_000_000, zero_stage=0, world_size=8, gpu_bytes=80 * 10**9, bf16=False)
    msg = str(err.value)
    # 16 bytes per parameter: fp32 weights 4 + gradients 4 + Adam moments 8 = 104.3 GiB.
    for text in ("zeroStage 0", "7.00B parameters", "26.1 GiB weights", "26.1 GiB gradients",
                 "52.2 GiB AdamW state", "104.3 GiB", "74.5 GiB", "training.lora"):
        assert text in msg, (text, msg)
    # ZeRO-2 over 8 GPUs in bf16 fits; so does LoRA training (few trainable parameters) without ZeRO.
    check_fits(7_000_000_000, zero_stage=2, world_size=8, gpu_bytes=80 * 10**9, bf16=True)
    check_fits(7_000_000_000, zero_stage=0, world_size=8, gpu_bytes=80 * 10**9, bf16=True,
               trainable_params=40_000_000)


@pytest.mark.parametrize("choice, cuda, bf16, flash, packing, expected", [
    ("auto", True, True, True, True, "flash_attention_2"),
    ("auto", True, True, False, False, "sdpa"),
    ("auto", False, False, True, False, "sdpa"),
    # Packed rows without FlashAttention: SDPA example by example, not one dense mask over the row.
    ("auto", False, False, False, True, "sdpa_varlen"),
    ("auto", True, True, False, True, "sdpa_varlen"),
    ("sdpa", False, False, False, True, "sdpa"),
    ("sdpa", True, True, True, False, "sdpa"),
    ("eager", False, False, False, False, "eager"),
])
def test_attention_resolution(choice, cuda, bf16, flash, packing, expected) -> None:
    from humpback_runtime.training.recipe import resolve_attention

    assert resolve_attention(choice, cuda=cuda, bf16=bf16, flash_installed=flash, packing=packing) == expected


def test_flash_attention_without_a_gpu_is_an_error_naming_the_field() -> None:
    from humpback_runtime.training.recipe import resolve_attention

    with pytest.raises(TrainingError, match="training.attention flash_attention_2"):
        resolve_attention("flash_attention_2", cuda=False, bf16=False, flash_installed=True)


def test_mfu_is_six_n_tokens_over_the_peak() -> None:
    from humpback_runtime.training.recipe import mfu, peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bf16_flops("cpu") is None
    assert mfu(1_000_000_000, 41_000, 989e12) == pytest.approx(6e9 * 41_000 / 989e12)
    assert mfu(1_000_000_000, 41_000, 989e12, world_size=2) == pytest.approx(6e9 * 41_000 / 989e12 / 2)
    assert mfu(10, 10.0, None) is None


def test_eval_split_is_seeded_disjoint_and_never_empty() -> None:
    from humpback_runtime.training.trainer import split_eval

    exs = [prompts.TrainingExample(prompt=f"p{i}", completion=f"c{i}") for i in range(40)]
    train_part, eval_part = split_eval(exs, 0.1, seed=3)
    assert len(eval_part) == 4 and len(train_part) == 36
    assert not {e.prompt for e in eval_part} & {e.prompt for e in train_part}
    assert split_eval(exs, 0.1, seed=3) == (train_part, eval_part)
    assert split_eval(exs, 0.0, seed=3) == (exs, [])
    assert len(split_eval(exs[:3], 0.01, seed=3)[1]) == 1  # at least one held out


def test_lora_with_zero3_is_refused_by_the_spec() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lora does not work with zeroStage 3"):
        TrainingSpec(zero_stage=3, lora={"rank": 8})
    with pytest.raises(ValidationError, match="quantizeBase .QLoRA. needs zeroStage 0"):
        TrainingSpec(zero_stage=2, lora={"rank": 8, "quantizeBase": True})
    assert TrainingSpec(lora={"rank": 8}).lora.target_modules[0] == "q_proj"


def test_qlora_without_a_gpu_is_an_error_naming_the_field() -> None:
    torch = pytest.importorskip("torch")
    from humpback_runtime.training.lora import qlora_config

    with pytest.raises(TrainingError, match="training.lora.quantizeBase needs a CUDA GPU"):
        qlora_config(False, torch)


def test_local_checkpoints_go_to_the_work_dir_the_operator_names(tmp_path, monkeypatch):
    from humpback_runtime.pod_contract import WORK_DIR_ENV
    from humpback_runtime.training import default_work_dir

    store = LocalStore(tmp_path / "store")
    monkeypatch.delenv(WORK_DIR_ENV, raising=False)
    assert not str(default_work_dir(store, "r/train-m0")).startswith("/checkpoints")
    monkeypatch.setenv(WORK_DIR_ENV, "/checkpoints")  # a checkpoint volume's mount (children.py)
    work = default_work_dir(store, "r/train-m0")
    assert work.parent == Path("/checkpoints/humpback-train") and work == default_work_dir(store, "r/train-m0")
    assert work != default_work_dir(store, "r/train-m1")
