"""How full the client keeps a capacity-limited server: occupancy with `inference.concurrency: auto`
beside the old fixed 64.

    .venv/bin/python bench/inference_occupancy.py [--capacity 128] [--seq-delay-s 0.5] [--records 4000]

Starts the OpenAI stub as a separate process shaped like one vLLM replica: --capacity sequences
at once (vLLM's --max-num-seqs), each holding its slot --seq-delay-s (a GPU sequence's decode
time), the rest queued. For each concurrency the client (`run_completions` over
`VLLMServerEngine`'s settings, checkpointing shards to a local store as the stages do) completes
--records prompts. Two figures, both from the stub's /stats: "steady" occupancy = slot-seconds
used / (capacity x seconds) from the first request until the client dispatched its last record
(while it has work to send: what a long curation run sees), and "whole run" including the drain
at the end, when no client can fill the slots. `auto` resolves with `InferenceSpec.client_concurrency(replicas=1)` from a spec
whose vllm.maxNumSeqs is --capacity: what the stages do. Goal: occupancy >= 95 %.
Results go to bench/results/inference_occupancy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from humpback_runtime.inference.client import ClientSettings, CompletionsClient, run_completions  # noqa: E402
from humpback_runtime.spec import InferenceSpec  # noqa: E402
from humpback_runtime.storage import open_store  # noqa: E402
from stub_process import start_stub  # noqa: E402  (bench/stub_process.py)

GOAL = 0.95


def stub_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as resp:
        return json.loads(resp.read())


async def fetch_stats(session, url: str) -> tuple[float, dict]:
    async with session.get(url.removesuffix("/v1") + "/stats") as resp:
        return time.perf_counter(), await resp.json()


async def complete_all(url: str, concurrency: int, n: int, root: str) -> tuple[tuple, tuple]:
    """(time, stats) at the first dispatch and at the last one."""
    import aiohttp

    recs = [{"id": f"r{i:07d}", "text": f"document {i}"} for i in range(n)]
    settings = ClientSettings(base_url=url, model="stub", concurrency=concurrency, max_retries=2)
    marks: dict[str, asyncio.Task] = {}
    async with aiohttp.ClientSession() as session, CompletionsClient(settings) as client:
        def build(r: dict):
            if r["id"] == recs[0]["id"] or r["id"] == recs[-1]["id"]:
                marks[r["id"]] = asyncio.get_running_loop().create_task(fetch_stats(session, url))
            return r["text"], {"max_tokens": 16}

        await run_completions(client, recs, build, lambda r, c: {"id": r["id"], "text": c["text"]},
                              store=open_store(root), prefix="bench/out", checkpoint_every=1000)
        return await marks[recs[0]["id"]], await marks[recs[-1]["id"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacity", type=int, default=128)
    p.add_argument("--seq-delay-s", type=float, default=0.5)
    p.add_argument("--records", type=int, default=4000)
    args = p.parse_args()
    auto = InferenceSpec(vllm={"maxNumSeqs": args.capacity}).client_concurrency(replicas=1)
    cases = [("fixed 64 (old default)", 64), (f"auto ({auto})", auto)]
    proc, url = start_stub("a short answer", "--capacity", str(args.capacity), "--seq-delay-s", str(args.seq_delay_s))
    results = []
    try:
        for label, concurrency in cases:
            before = stub_stats(url)
            with tempfile.TemporaryDirectory() as root:
                t0 = time.perf_counter()
                (t_first, first), (t_last, last) = asyncio.run(complete_all(url, concurrency, args.records, root))
                wall = time.perf_counter() - t0
            after = stub_stats(url)
            busy = after["busy_seconds"] - before["busy_seconds"]
            occupancy = busy / (args.capacity * wall)
            steady = (last["slot_seconds"] - first["slot_seconds"]) / (args.capacity * (t_last - t_first))
            results.append({"case": label, "concurrency": concurrency, "records": args.records,
                            "wall_s": round(wall, 2), "completions_per_s": round(args.records / wall, 1),
                            "occupancy_steady": round(steady, 4), "occupancy_whole_run": round(occupancy, 4),
                            "max_in_flight": after["max_in_flight"]})
            print(f"{label:>24}: {args.records / wall:8.1f} completions/s, occupancy steady {steady:6.1%}, "
                  f"whole run {occupancy:6.1%}, server max in flight {after['max_in_flight']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ideal = args.capacity / args.seq_delay_s
    print(f"ideal: {ideal:.1f} completions/s (capacity / seq delay); goal occupancy >= {GOAL:.0%} with auto: "
          f"{'met' if results[-1]['occupancy_steady'] >= GOAL else 'NOT met'} (steady)")
    out = ROOT / "bench" / "results" / "inference_occupancy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                               "capacity": args.capacity, "seq_delay_s": args.seq_delay_s,
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
