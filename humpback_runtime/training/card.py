"""The model card (README.md) of every trained model: lineage, data, settings, loss.

The training stage writes it beside the model; the publish stage renders the same card with what
is known later (:func:`render_model_card` with hub metadata, the evaluation results of the
evaluate stage, a usage snippet and the contamination warning).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from humpback_runtime.prompts import TEMPLATE_VERSION
from humpback_runtime.publishing import CONTAMINATION_WARNING

if TYPE_CHECKING:
    from humpback_runtime.spec import TrainingSpec
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
    """The card the training stage writes beside the model."""
    return render_model_card(base_model=request.base_model, settings=request.settings, card=request.card,
                             metrics=metrics, grad_accum=grad_accum)


def render_model_card(*, base_model: str, settings: TrainingSpec, card: Mapping[str, Any], metrics: Mapping[str, Any],
                      grad_accum: int, metadata: Mapping[str, Any] | None = None,
                      sections: Sequence[str] = ()) -> str:
    """The model card: YAML metadata (``metadata`` is merged over the defaults: library, pipeline,
    tags, ``base_model`` for a hub id), lineage, data, hyperparameters, loss, then ``sections``
    (markdown, each starting with its ``##`` heading) before the loss."""
    s = settings
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["humpback", "instruction-backtranslation"]}
    if _looks_like_hub_id(base_model):
        meta["base_model"] = base_model
    meta.update(metadata or {})
    strategy = "FSDP (full shard)" if s.strategy == "fsdp" else f"DeepSpeed ZeRO stage {s.zero_stage or 'off'}"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=4096).rstrip("\n"),
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
        f"| base model | `{base_model}` |",
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
        f"| weight decay | {s.weight_decay:g} (AdamW, betas {s.adam_beta1:g}, {s.adam_beta2:g}) |",
        f"| dropout | {s.dropout:g} |",
        f"| LoRA | {f'rank {s.lora.rank}, alpha {s.lora.alpha:g} (merged)' if s.lora else 'no (all weights)'} |",
        f"| global batch | {s.batch_size} ({s.per_device_batch_size} per device x {metrics['world_size']} "
        f"processes x {grad_accum} accumulation) |",
        f"| steps | {metrics['steps']} |",
        f"| max sequence length | {s.max_seq_length} |",
        f"| precision | {metrics['precision']} |",
        f"| strategy | {strategy} |",
        f"| gradient checkpointing | {s.gradient_checkpointing} |",
        f"| seed | {s.seed} |",
        "",
    ]
    for section in sections:
        lines += [section.rstrip("\n"), ""]
    lines += [
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


# --- what the publish stage adds ------------------------------------------------------------


def evaluation_results(evaluation: Mapping[str, Any] | None, model: str) -> list[dict[str, Any]]:
    """The judged results of `model` in the evaluate stage's manifest ``evaluation`` field, one row per
    metric: ``{"set", "source", "metric_type", "metric_name", "value", "stderr", "n"}`` (values in
    [0, 1] for win rates, 1-10 for MT-Bench). Empty when nothing was judged."""
    rows: list[dict[str, Any]] = []
    if not evaluation or not evaluation.get("judged"):
        return rows
    for name, entry in (evaluation.get("sets") or {}).items():
        source = entry.get("source")

        def add(metric_type: str, metric_name: str, value: Any, stderr: Any = None, n: Any = None) -> None:
            if isinstance(value, (int, float)):
                rows.append({"set": name, "source": source, "metric_type": metric_type, "metric_name": metric_name,
                             "value": round(float(value), 4), "stderr": stderr, "n": n})

        for pair in (entry.get("pairs") or {}).values():
            if model not in (pair.get("a"), pair.get("b")):
                continue
            other = pair["b"] if pair.get("a") == model else pair["a"]
            value = pair.get("win_rate")
            if isinstance(value, (int, float)) and pair.get("b") == model:
                value = 1.0 - value  # a prompt's score for B is 1 - A's (ties 0.5)
            add("win_rate", f"win rate vs {other}", value, pair.get("stderr"), pair.get("n"))
        reference = ((entry.get("reference") or {}).get("models") or {}).get(model)
        if reference:
            generator = (entry.get("reference") or {}).get("generator") or "reference"
            add("win_rate", f"win rate vs {generator}", reference.get("win_rate"), reference.get("stderr"),
                reference.get("n"))
            add("length_controlled_win_rate", f"length-controlled win rate vs {generator}",
                reference.get("length_controlled_win_rate"), None, reference.get("n"))
        graded = (entry.get("mt_bench") or {}).get(model)
        if graded:
            add("mt_bench_score", "MT-Bench score (1-10)", graded.get("score"), None, graded.get("graded"))
            add("mt_bench_turn_1", "MT-Bench turn 1", graded.get("turn_1"))
            add("mt_bench_turn_2", "MT-Bench turn 2", graded.get("turn_2"))
    return rows


def evaluation_section(evaluation: Mapping[str, Any] | None, model: str) -> str:
    """``## Evaluation``: the judged results of `model`, or why there are none."""
    lines = ["## Evaluation", ""]
    if not evaluation:
        return "\n".join(lines + ["Not evaluated (spec.evaluation.enabled is false)."])
    judge = evaluation.get("judge") or {}
    rows = evaluation_results(evaluation, model)
    if not rows:
        note = evaluation.get("note") or "no judged result for this model"
        return "\n".join(lines + [f"No judged results: {note}."])
    lines += [f"Judged by `{judge.get('model')}` ({judge.get('api', 'chat')} API), each pair in both orders; "
              "win rates count a tie as half a win (docs/evaluation.md).", "",
              "| set | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for r in rows:
        percent = not r["metric_type"].startswith("mt_bench")  # win rates; MT-Bench grades are 1-10
        value = f"{r['value']:.1%}" if percent else f"{r['value']:.2f}"
        stderr = f"{r['stderr']:.1%}" if isinstance(r["stderr"], (int, float)) else ""
        lines.append(f"| {_cell(r['set'])} | {_cell(r['metric_name'])} | {value} | {stderr} | {r['n'] or ''} |")
    return "\n".join(lines)


def usage_section(repo_id: str, role: str | None, default_system: str) -> str:
    """``## Usage``: how to prompt the published model through its chat template."""
    if role == "backward":
        example = "A response whose instruction you want (the backward model writes it)."
        what = ("This is the backward model p(instruction | response): give it a response as the user message "
                "and it writes the instruction (the chat template renders humpback's backward prompt).")
    else:
        example = "Name three whales."
        what = ("The tokenizer's chat template renders humpback's prompt format exactly (`### Instruction:` / "
                f"`### Response:`); without a system message it puts the seed tag the model was trained with, "
                f"\"{default_system}\", first.")
    return "\n".join([
        "## Usage", "", what, "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'messages = [{{"role": "user", "content": {json.dumps(example)}}}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=256, do_sample=True, temperature=0.7, top_p=0.9)",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        f"Served with `vllm serve {repo_id}`, the same template applies on `/v1/chat/completions`.",
    ])


def contamination_section() -> str:
    """``## Contamination warning``, for a model whose seed data looks like oasst1."""
    return "\n".join(["## Contamination warning", "", "The seed data of this model is oasst1 data. " + CONTAMINATION_WARNING])
