"""The model card (README.md) written beside every trained model: lineage, data, settings, loss."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from humpback_runtime.prompts import TEMPLATE_VERSION

if TYPE_CHECKING:
    from humpback_runtime.training import TrainRequest


def _loss_summary(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most ~10 evenly spaced points of the loss curve, first and last included."""
    if len(history) <= 10:
        return history
    idx = sorted({round(i * (len(history) - 1) / 9) for i in range(10)})
    return [history[i] for i in idx]


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _looks_like_hub_id(ref: str) -> bool:
    return "://" not in ref and not ref.startswith((".", "/", "~")) and ref.count("/") == 1


def model_card(request: TrainRequest, metrics: dict[str, Any], grad_accum: int) -> str:
    s = request.settings
    card = request.card
    strategy = "FSDP (full shard)" if s.strategy == "fsdp" else f"DeepSpeed ZeRO stage {s.zero_stage or 'off'}"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- humpback",
        "- instruction-backtranslation",
        *([f"base_model: {request.base_model}"] if _looks_like_hub_id(request.base_model) else []),
        "---",
        "",
        f"# {card.get('stage', 'humpback')} ({card.get('role', 'fine-tuned')}) of {card.get('run', 'a humpback run')}",
        "",
        "Fine-tuned with humpback's instruction backtranslation pipeline (Li et al. 2023, "
        "\"Self-Alignment with Instruction Backtranslation\", arXiv:2308.06259). The loss covers the "
        "response tokens only; prompts follow `humpback_runtime.prompts` "
        f"(template version {TEMPLATE_VERSION}): use the same module at inference.",
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{request.base_model}` |",
    ]
    for k, v in card.items():
        if k == "data":
            continue
        lines.append(f"| {_cell(k)} | `{_cell(v)}` |")
    lines += [
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| examples given | {metrics['examples_in']} |",
        f"| examples trained on | {metrics['examples']} |",
        f"| dropped (prompt longer than maxSeqLength) | {metrics['examples_dropped']} |",
        f"| truncated | {metrics['examples_truncated']} |",
        f"| tokens seen in training | {metrics['tokens']} |",
    ]
    data = card.get("data")
    if isinstance(data, dict):
        for k, v in data.items():
            lines.append(f"| {_cell(k)} | {_cell(v)} |")
    elif data is not None:
        lines.append(f"| data | {_cell(data)} |")
    lines += [
        "",
        "## Hyperparameters",
        "",
        "| | |",
        "|---|---|",
        f"| learning rate | {s.learning_rate:g} → {s.final_learning_rate:g} (linear) |",
        f"| weight decay | {s.weight_decay:g} (AdamW) |",
        f"| global batch | {s.batch_size} ({s.per_device_batch_size} per device x {metrics['world_size']} "
        f"processes x {grad_accum} accumulation) |",
        f"| steps | {metrics['steps']} |",
        f"| max sequence length | {s.max_seq_length} |",
        f"| precision | {metrics['precision']} |",
        f"| strategy | {strategy} |",
        f"| gradient checkpointing | {s.gradient_checkpointing} |",
        f"| seed | {s.seed} |",
        "",
        "## Training loss",
        "",
    ]
    history = metrics["train_loss"]
    if history:
        losses = [v for _, v in history]
        lines += [
            f"First {losses[0]:.4f}, last {losses[-1]:.4f}, min {min(losses):.4f} over {len(history)} logged steps"
            + (f" (resumed from step {metrics['resumed_from']})." if metrics["resumed_from"] else "."),
            "",
            "| step | loss |",
            "|---|---|",
            *(f"| {step} | {loss:.4f} |" for step, loss in _loss_summary(history)),
        ]
    else:
        lines.append("No loss was logged.")
    return "\n".join(lines) + "\n"

