"""LoRA / QLoRA through PEFT, and the merged export: later stages serve a plain model, never adapters."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from humpback_runtime.errors import TrainingError
from humpback_runtime.spec import LoraSpec


def qlora_config(cuda: bool, torch: Any) -> Any:
    """bitsandbytes 4-bit NF4 for the frozen base weights (QLoRA); only on CUDA with bitsandbytes."""
    if not cuda or importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("training.lora.quantizeBase needs a CUDA GPU and the bitsandbytes package")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def add_lora(model: Any, spec: LoraSpec, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` with trainable LoRA adapters on ``spec.target_modules``; the base stays frozen."""
    if importlib.util.find_spec("peft") is None:
        raise TrainingError("training.lora needs the peft package (pip install 'humpback[train]')")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(spec.target_modules) - names)
    if missing:
        raise TrainingError(f"training.lora.targetModules: no module named {', '.join(missing)} in "
                            f"{type(model).__name__}")
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_merged(trainer: Any, out: Path, tokenizer: Any, base: str, is_main: bool) -> None:
    """Merge the adapters into the base weights and save a plain model (safetensors, no adapter files).

    ZeRO 0-2 keep the whole model on every rank (LoRA with ZeRO-3 is refused by the spec), so rank 0
    merges its own copy; the others wait at the caller's barrier. A 4-bit (QLoRA) base cannot take
    the merge: the base is loaded again in bf16 and the trained adapters applied to it."""
    if not is_main:
        return
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(peft_model, "is_loaded_in_4bit", False) or getattr(peft_model.base_model, "is_loaded_in_4bit", False):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        adapter = out.parent / "adapter"
        peft_model.save_pretrained(str(adapter))
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(plain, str(adapter)).merge_and_unload()
    else:
        merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
