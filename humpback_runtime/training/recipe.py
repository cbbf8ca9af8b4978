"""The training recipe as pure functions (no torch): batch arithmetic, the learning-rate schedule,
precision, the DeepSpeed config, and tokenisation with the loss on response tokens only."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from humpback_runtime.errors import TrainingError
from humpback_runtime.prompts import TrainingExample
from humpback_runtime.spec import TrainingSpec

IGNORE_INDEX = -100  # label of tokens without loss (the prompt); what HF models ignore
MAX_GRAD_NORM = 1.0


def gradient_accumulation_steps(settings: TrainingSpec, world_size: int) -> int:
    """batchSize / (perDeviceBatchSize * world size); an error naming the fields unless it divides."""
    per_step = settings.per_device_batch_size * world_size
    if world_size < 1 or settings.batch_size % per_step:
        raise TrainingError(
            f"batchSize ({settings.batch_size}) must be a multiple of perDeviceBatchSize "
            f"({settings.per_device_batch_size}) x world size ({world_size}) = {per_step}: the global "
            "batch is made of equal micro-batches on every process"
        )
    return settings.batch_size // per_step


def learning_rate_factor(step: int, total_steps: int, lr0: float, lr_final: float) -> float:
    """Multiplier of ``lr0`` for the update of optimizer step ``step`` (0-based)."""
    last = total_steps - 1
    if last <= 0:
        return 1.0
    t = min(max(step, 0), last)
    return 1.0 + (lr_final / lr0 - 1.0) * t / last


def learning_rate_at(settings: TrainingSpec, step: int, total_steps: int) -> float:
    """lr(t) = lr0 + (lrF - lr0) * t / T: ``learningRate`` at the first update (t = 0),
    ``finalLearningRate`` at the last one (t = T = total_steps - 1); not decayed to 0."""
    lr0 = settings.learning_rate
    return lr0 * learning_rate_factor(step, total_steps, lr0, settings.final_learning_rate)


def resolve_bf16(precision: str, cuda: bool) -> bool:
    """bf16 when asked for, or ``auto`` on a CUDA GPU; fp32 otherwise (``auto`` on CPU)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return cuda


def deepspeed_config(settings: TrainingSpec, *, world_size: int, bf16: bool, gpu: bool) -> dict[str, Any] | None:
    """The DeepSpeed config for ``settings.zero_stage`` (None for 0: no DeepSpeed).

    The HF optimizer (torch AdamW) and this module's scheduler are used, so the config has neither
    an ``optimizer`` nor a ``scheduler`` section (and no offload: nothing needs DeepSpeed's C++ ops).
    Batch sizes are explicit so that DeepSpeed checks them against the Trainer's arguments.
    """
    stage = settings.zero_stage
    if stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": gpu,  # overlapping needs CUDA streams; gloo on CPU gains nothing
        "reduce_bucket_size": "auto",  # the Trainer fills these in from the model's hidden size
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # Gather the 16-bit weights for save_model(), so model/ holds ordinary safetensors.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.per_device_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(settings, world_size),
        "gradient_clipping": MAX_GRAD_NORM,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW through the Trainer
        "steps_per_print": 10**9,  # the Trainer logs every step already
        "wall_clock_breakdown": False,
    }



def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    # Text that spells a special token ("</s>") stays text: user data must not inject an EOS.
    try:
        return list(tokenizer(text, add_special_tokens=special, split_special_tokens=True)["input_ids"])
    except TypeError:  # pragma: no cover - tokenizers without split_special_tokens
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@functools.lru_cache(maxsize=8)
def _adds_eos(tokenizer: Any) -> bool:
    eos = tokenizer.eos_token_id
    ids = _encode(tokenizer, "a", True)
    return bool(ids) and ids[-1] == eos and _encode(tokenizer, "a", False)[-1:] != [eos]


def tokenize_example(tokenizer: Any, ex: TrainingExample, max_len: int) -> dict[str, list[int]] | None:
    """``input_ids``, ``attention_mask`` and ``labels`` of one example, or None when it is dropped.

    The ids are those of ``prompt + completion`` (BOS as the tokenizer adds it) followed by the EOS
    id; ``labels`` are -100 on the prompt tokens and the ids on the completion + EOS. When the
    prompt's tokens are not a prefix of the whole text's (a tokenizer merging across the seam), the
    prompt and the completion are tokenised apart and concatenated, which is what the model sees at
    inference. Longer than ``max_len``: cut from the right (the EOS goes first); when not even one
    completion token would remain, the example is dropped (None).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingError("the tokenizer has no EOS token; training needs one to teach the model to stop")
    prompt_ids = _encode(tokenizer, ex.prompt, True)
    full_ids = _encode(tokenizer, ex.prompt + ex.completion, True)
    if _adds_eos(tokenizer):  # a tokenizer that appends EOS itself: the trainer places it
        prompt_ids, full_ids = prompt_ids[:-1], full_ids[:-1]
    boundary = len(prompt_ids)
    if len(full_ids) > boundary and full_ids[:boundary] == prompt_ids:
        ids = full_ids
    else:
        ids = prompt_ids + _encode(tokenizer, ex.completion, False)
    ids = ids + [eos]
    if boundary >= max_len or len(ids) <= boundary:
        return None
    ids = ids[:max_len]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * boundary + ids[boundary:],
    }


def fit_prompt(tokenizer: Any, ex: TrainingExample, max_len: int) -> TrainingExample | None:
    """``ex`` with its cuttable prompt text (``cut_span``: the backward model's response) cut from the
    end, so that prompt + completion + EOS fit ``max_len`` tokens and the completion stays whole.

    The same object when it fits already or has nothing to cut; None when even a cut to nothing
    leaves no room (then :func:`tokenize_example` cuts from the right, or drops, as for any example).
    """
    if ex.cut_span is None:
        return ex
    start = ex.cut_span[0]
    tokens = _encode(tokenizer, ex.prompt[start:ex.cut_span[1]], False)
    current = ex
    for _ in range(8):  # decode/encode round trips move the count by a few tokens at most
        overflow = len(_encode(tokenizer, current.text, True)) + 1 - max_len  # + EOS
        if overflow <= 0:
            return current
        keep = len(_encode(tokenizer, current.prompt[start:current.cut_span[1]], False)) - overflow
        if keep <= 0:
            return None
        tokens = tokens[:keep]
        cut = tokenizer.decode(tokens, skip_special_tokens=True).rstrip()
        if not cut:
            return None
        current = ex.with_cut_text(cut)
    return None


@dataclass
class Tokenized:
    features: list[dict[str, list[int]]]
    dropped: int
    truncated: int  # completions cut from the right
    supervised_tokens: int
    tokens: int
    prompt_cut: int = 0  # prompts whose cuttable text was shortened (the backward model's response)


def tokenize_all(tokenizer: Any, examples: list[TrainingExample], max_len: int) -> Tokenized:
    out = Tokenized([], 0, 0, 0, 0)
    for ex in examples:
        fitted = fit_prompt(tokenizer, ex, max_len)
        if fitted is not None and fitted is not ex:
            out.prompt_cut += 1
            ex = fitted
        feat = tokenize_example(tokenizer, ex, max_len)
        if feat is None:
            out.dropped += 1
            continue
        if feat["labels"][-1] != tokenizer.eos_token_id:
            out.truncated += 1
        out.features.append(feat)
        out.tokens += len(feat["input_ids"])
        out.supervised_tokens += sum(1 for label in feat["labels"] if label != IGNORE_INDEX)
    return out


def check_training_yield(data: Tokenized, n_train: int, max_seq_length: int, min_yield: float) -> None:
    """Fail when fewer than `min_yield` of the training examples survive tokenisation (the rest are
    dropped because their kept part, the instruction and the template, alone fills maxSeqLength)."""
    if not data.features or len(data.features) / n_train < min_yield:
        raise TrainingError(
            f"{data.dropped} of {n_train} examples were dropped because their kept part (the instruction and "
            f"the template) alone fills maxSeqLength ({max_seq_length} tokens), leaving "
            f"{len(data.features)}, below minYield ({min_yield:g}): raise maxSeqLength")



def resolve_attention(choice: str, *, cuda: bool, bf16: bool, flash_installed: bool, packing: bool = False) -> str:
    """The ``attn_implementation`` to load the model with: ``auto`` is FlashAttention-2 where it can
    run (CUDA, bf16, flash-attn installed); otherwise SDPA, example by example within a packed row
    ("sdpa_varlen", training/varlen.py) when packing, else plain SDPA. An explicit "sdpa" with
    packing gives SDPA one dense block-diagonal mask over the row. An explicit choice that cannot
    run fails."""
    if choice == "auto":
        if cuda and bf16 and flash_installed:
            return "flash_attention_2"
        return "sdpa_varlen" if packing else "sdpa"
    if choice == "flash_attention_2" and not (cuda and bf16 and flash_installed):
        raise TrainingError("training.attention flash_attention_2 needs a CUDA GPU, bf16 precision and the "
                            "flash-attn package; use auto or sdpa")
    return choice


GIB = 1024**3


def check_fits(n_params: int, *, zero_stage: int, world_size: int, gpu_bytes: int, bf16: bool,
               trainable_params: int | None = None) -> None:
    """Refuse a configuration whose weights, gradients and AdamW state alone exceed one GPU.

    Per trainable parameter: 4 bytes of fp32 master weights + 8 of Adam moments (+ 2 of bf16 weights
    when training in bf16) are split over the ranks from ZeRO-1 on; gradients (4 bytes fp32, 2 in
    bf16) from ZeRO-2 on; weights from ZeRO-3 on. Frozen parameters (LoRA) hold their weights only.
    Activations come on top, so passing this check is necessary, not sufficient.
    """
    trainable = n_params if trainable_params is None else trainable_params
    frozen = n_params - trainable
    w = 2 if bf16 else 4
    weights = trainable * w + frozen * w
    grads = trainable * (2 if bf16 else 4)
    optim = trainable * (12 if bf16 else 8)  # fp32 master copy (bf16 only) + two fp32 moments
    n = max(world_size, 1)
    if zero_stage >= 1:
        optim /= n
    if zero_stage >= 2:
        grads /= n
    if zero_stage >= 3:
        weights /= n
    need = weights + grads + optim
    if need > gpu_bytes:
        raise TrainingError(
            f"the model does not fit one GPU with zeroStage {zero_stage}: {n_params / 1e9:.2f}B parameters "
            f"({trainable / 1e9:.2f}B trainable) need {weights / GIB:.1f} GiB weights + {grads / GIB:.1f} GiB "
            f"gradients + {optim / GIB:.1f} GiB AdamW state = {need / GIB:.1f} GiB per GPU over {n} "
            f"process(es), more than the {gpu_bytes / GIB:.1f} GiB the GPU has (activations not counted); "
            "use zeroStage 2 or 3, more GPUs, or training.lora"
        )


# Dense bf16 tensor-core peak per GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_bf16_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def mfu(n_params: int, tokens_per_second: float, peak_flops: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the peak of all GPUs (attention FLOPs and
    recomputation not counted, as usual)."""
    if not peak_flops:
        return None
    return 6 * n_params * tokens_per_second / (peak_flops * world_size)
