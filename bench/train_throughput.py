"""Training throughput of `humpback_runtime.training.train`: tokens/s with padded vs packed
batches on the seed data's real lengths, and MFU on a GPU.

    .venv/bin/python bench/train_throughput.py                       # CPU: tiny model
    python bench/train_throughput.py --gpu --model-size 1b           # GPU: ~1B Llama, bf16, SDPA

Every case runs the real entry point (`train()`: HF Trainer, the DeepSpeed config built there, a
local store, checkpoints off) in this process, one case after the other: for each ZeRO stage of
--zero (default 2), right-padded micro-batches (`packing: false`: padded to the longest example of
the micro-batch, what the trainer does without packing) beside padding-free packed ones
(`packing: true`), both with `--attention` (default auto, as the trainer: padded batches get SDPA,
packed ones SDPA example by example, "sdpa_varlen", or FlashAttention-2 where installed on a GPU);
--dense-packed adds packed batches under plain SDPA (one dense block-diagonal mask over the row). The data are the shipped seed pairs (examples/data/oasst1_pairs.jsonl) as
forward examples, so the lengths are the real, short, variable ones the seed model trains on
(--data full-length: c4 text cut to --seq-len tokens, the old figure). tokens/s counts real tokens
only (the padding is not counted), so the ratio packed / padded is the speed-up on that data.

- CPU: the tiny random-init Llama of `humpback_runtime.tiny_model` (built into a temporary folder).
- GPU (--gpu): a Llama-shaped model of --model-size built from a config with random weights in
  bf16, saved to a temporary folder with the tiny model's tokenizer (the vocabulary size of the
  config is kept, so the parameter count and FLOPs are the real model's). Nothing is downloaded:
  it runs on a machine without network. MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s
  (--peak-tflops, default 989: H100 SXM dense bf16); attention FLOPs and the recomputation of
  gradient checkpointing are not counted, as usual for MFU.

tokens/s: "steady" is measured between the end of step --warmup and the last step (callback
timestamps), "run" is the entry point's own `tokens_per_second` (whole loop, first steps
included). Results go to bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import transformers  # noqa: E402

from humpback_runtime.prompts import TrainingExample  # noqa: E402
from humpback_runtime.spec import TrainingSpec  # noqa: E402
from humpback_runtime.storage import LocalStore  # noqa: E402
from humpback_runtime.tiny_model import build_tiny_model  # noqa: E402
from humpback_runtime.training import TrainRequest, train  # noqa: E402

# Llama-shaped presets (hidden, intermediate, layers, heads, kv heads, vocab).
MODEL_SIZES = {
    "tiny": None,  # humpback_runtime.tiny_model
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B's shape
}


class StepClock(transformers.TrainerCallback):
    """(step, seconds, tokens seen) at the end of every optimizer step."""

    def __init__(self):
        self.marks: list[tuple[int, float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen or 0)))

    def steady(self, warmup: int) -> float | None:
        marks = [m for m in self.marks if m[0] >= warmup]
        if len(marks) < 2:
            return None
        (_, t0, n0), (_, t1, n1) = marks[0], marks[-1]
        return (n1 - n0) / (t1 - t0)


def seed_examples(n: int) -> list[TrainingExample]:
    """The shipped seed pairs as forward training examples (repeated up to n)."""
    from humpback_runtime import prompts
    from humpback_runtime.spec import SystemPrompts

    system = prompts.seed_system(SystemPrompts())
    pairs = [json.loads(line) for line in (ROOT / "examples/data/oasst1_pairs.jsonl").open(encoding="utf-8")]
    return [prompts.forward_example(p["instruction"], p["response"], system) for p in (pairs * (n // len(pairs) + 1))[:n]]


def full_length_examples(tokenizer, n: int, seq_len: int) -> list[TrainingExample]:
    """n examples of at least seq_len tokens: a short prompt, then c4 text as the completion."""
    texts = [json.loads(line)["text"] for line in (ROOT / "examples/data/c4_sample.jsonl").open(encoding="utf-8")]
    corpus = "\n\n".join(texts)[: 8 * (seq_len + 16) * (n + 1)]  # plenty of text, not all of it
    tokenizer.model_max_length = 10**9  # one long encode below; no "longer than the maximum" warning
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len + 1:
        raise SystemExit(f"the c4 sample has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    out = []
    stride = max(1, (len(ids) - seq_len) // max(n, 1))
    for i in range(n):
        start = (i * stride) % (len(ids) - seq_len)
        chunk = tokenizer.decode(ids[start:start + seq_len + 16]).strip() or "text"
        out.append(TrainingExample(f"### Instruction:\nContinue text {i}.\n\n### Response:\n", chunk))
    return out


def build_model(size: str, out: Path, tokenizer_dir: Path) -> tuple[Path, int]:
    """A random-init Llama of `size` in bf16 with the tiny tokenizer, saved to `out`; (dir, params)."""
    cfg = MODEL_SIZES[size]
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = transformers.LlamaConfig(
        **cfg, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, params


def run_case(name: str, model_dir: Path, examples: list[TrainingExample], work: Path, *, zero: int,
             steps: int, batch: int, per_device: int, seq_len: int, checkpointing: bool, warmup: int,
             precision: str, packing: bool, attention: str) -> dict:
    clock = StepClock()
    settings = TrainingSpec(steps=steps, batch_size=batch, per_device_batch_size=per_device, max_seq_length=seq_len,
                            zero_stage=zero, gradient_checkpointing=checkpointing, precision=precision,
                            checkpoint_every=10**6, packing=packing, attention=attention)
    store = LocalStore(work / f"store-{name}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    metrics = train(TrainRequest(base_model=str(model_dir), examples=examples, settings=settings, store=store,
                                 prefix=f"bench/{name}", card={"stage": "bench"}, callbacks=[clock],
                                 work_dir=work / f"work-{name}"))
    row = {
        "case": name, "zero_stage": zero, "packing": packing, "attention": metrics["attention"],
        "precision": metrics["precision"], "steps": steps,
        "batch": batch, "per_device_batch": per_device, "seq_len": seq_len, "gradient_checkpointing": checkpointing,
        "tokens_per_s_steady": clock.steady(warmup), "tokens_per_s_run": metrics["tokens_per_second"],
        "train_seconds": metrics["train_seconds"], "seconds_total": metrics["seconds"],
        "final_loss": metrics["train_loss"][-1][1] if metrics["train_loss"] else None,
    }
    if torch.cuda.is_available():
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run the GPU cases (needs CUDA)")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None,
                   help="model for the cases (default: tiny on CPU, 1b with --gpu)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the GPU (H100 SXM: 989)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per case (CPU 20, GPU 30)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the steady figure (CPU 3, GPU 5)")
    p.add_argument("--batch", type=int, default=None, help="global batch (CPU 8, GPU 16)")
    p.add_argument("--per-device-batch", type=int, default=None, help="micro-batch (CPU 4, GPU 8)")
    p.add_argument("--seq-len", type=int, default=None, help="maxSeqLength (CPU 1024, GPU 2048)")
    p.add_argument("--data", choices=["seed", "full-length"], default="seed",
                   help="seed: the shipped seed pairs' real lengths; full-length: c4 cut to --seq-len")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash_attention_2", "eager"],
                   help="training.attention (auto, as the trainer: flash_attention_2 where installed on a GPU; "
                        "else sdpa for padded and sdpa_varlen for packed batches)")
    p.add_argument("--dense-packed", action="store_true",
                   help="also run packed batches with plain sdpa (one dense block-diagonal mask over the row)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--zero", type=int, nargs="+", default=[2], help="ZeRO stages to run (0 = no DeepSpeed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). On a shared machine 1 thread gives steadier "
                        "figures: other processes make multi-threaded small ops wait on each other")
    p.add_argument("--out", default=str(ROOT / "bench/results/train_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # else accelerate resets the count on CPU
        torch.set_num_threads(args.threads)

    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    size = args.model_size or ("1b" if gpu else "tiny")
    steps = args.steps or (30 if gpu else 20)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    batch = args.batch or (16 if gpu else 16)
    per_device = args.per_device_batch or (8 if gpu else 8)
    seq_len = args.seq_len or (2048 if gpu else 1024)
    checkpointing = not args.no_gradient_checkpointing
    precision = "bf16" if gpu else "fp32"

    with tempfile.TemporaryDirectory(prefix="humpback-bench-") as tmp:
        work = Path(tmp)
        tiny = build_tiny_model(work / "tiny")
        if size == "tiny":
            model_dir = tiny
            params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(str(tiny)).parameters())
        else:
            t0 = time.perf_counter()
            model_dir, params = build_model(size, work / f"llama-{size}", tiny)
            print(f"built a random {size} Llama ({params / 1e9:.2f} B parameters) in {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        if args.data == "seed":
            examples = seed_examples(batch * steps)
        else:
            examples = full_length_examples(tokenizer, max(batch * 4, 32), seq_len)
        rows = []
        for zero in args.zero:
            cases = [("padded", False, args.attention), ("packed", True, args.attention)]
            if args.dense_packed:
                cases.append(("packed-dense", True, "sdpa"))
            for suffix, packing, attention in cases:
                name = ("zero%d" % zero if zero else "no-ds") + "-" + suffix
                row = run_case(name, model_dir, examples, work, zero=zero, steps=steps, batch=batch,
                               per_device=per_device, seq_len=seq_len, checkpointing=checkpointing, warmup=warmup,
                               precision=precision, packing=packing, attention=attention)
                row["model"], row["parameters"], row["data"] = size, params, args.data
                if gpu and row["tokens_per_s_steady"]:
                    row["mfu"] = round(6 * params * row["tokens_per_s_steady"] / (args.peak_tflops * 1e12), 4)
                rows.append(row)
            padded = rows[-len(cases)]["tokens_per_s_steady"]
            for row in rows[-len(cases) + 1:]:
                if padded and row["tokens_per_s_steady"]:
                    row["speedup_over_padded"] = round(row["tokens_per_s_steady"] / padded, 3)

    device = (torch.cuda.get_device_name(0) if gpu
              else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    print(f"\n{device}; model {size} ({params / 1e6:.1f} M parameters), batch {batch} x {seq_len} tokens, "
          f"micro-batch {per_device}, gradient checkpointing {checkpointing}, {steps} steps")
    header = f"{'case':<20}{'attention':>13}{'precision':>10}{'tokens/s steady':>17}{'tokens/s run':>14}{'train s':>9}{'x padded':>10}"
    header += f"{'MFU':>8}{'peak GiB':>10}" if gpu else ""
    print(header)
    for r in rows:
        line = (f"{r['case']:<20}{r['attention']:>13}{r['precision']:>10}{(r['tokens_per_s_steady'] or 0):>17,.0f}"
                f"{r['tokens_per_s_run']:>14,.0f}{r['train_seconds']:>9.1f}{r.get('speedup_over_padded', 1.0):>10.2f}")
        if gpu:
            line += f"{r.get('mfu', 0):>8.1%}{r.get('peak_memory_gib', 0):>10.1f}"
        print(line)

    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "device": device, "torch": torch.__version__, "transformers": transformers.__version__},
        "peak_tflops": args.peak_tflops if gpu else None,
        "cases": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing["gpu" if gpu else "cpu"] = result
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
