"""Completions/s the inference client sustains against a zero-latency server on loopback.

    .venv/bin/python bench/client_overhead.py [--records 20000] [--concurrency 64 256]

Starts the OpenAI stub (`python -m humpback_testing.openai_stub`, delay 0) as a separate process,
so client and server do not share one GIL, then for each concurrency runs:

- raw: `CompletionsClient.complete` from `concurrency` workers, no bookkeeping (the HTTP floor);
- run: `run_completions` checkpointing once, at the end (a single shard);
- run+ckpt: `run_completions` checkpointing a shard to a LocalStore every 1,000 records.

Prompts are --prompt-chars long and completions --text-chars (augment-sized by default). Prints
completions/s (wall) and the client's CPU seconds per 1,000 completions, with the stub's CPU time
beside it: on a 2-core machine the two processes split the cores, so the client's CPU cost is
the figure that carries over to a pod talking to a remote vLLM. Goal: >= 2,000 completions/s.
Results go to bench/results/client_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import aiohttp  # noqa: E402

from humpback_runtime.inference.client import ClientSettings, CompletionsClient, run_completions  # noqa: E402
from humpback_runtime.storage import list_shards, open_store  # noqa: E402
from stub_process import start_stub  # noqa: E402  (bench/stub_process.py)

GOAL = 2000.0


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def records(n: int, prompt_chars: int) -> list[dict]:
    filler = ("lorem ipsum dolor sit amet " * (prompt_chars // 27 + 1))[:prompt_chars]
    return [{"id": f"doc-{i:08d}", "text": filler} for i in range(n)]


def build(record: dict) -> tuple[str, dict]:
    return record["text"], {"max_tokens": 512, "temperature": 0.7}


def handle(record: dict, choice: dict) -> dict:
    return {"id": record["id"], "instruction": choice["text"], "output": record["text"]}


async def raw(settings: ClientSettings, recs: list[dict]) -> int:
    async with CompletionsClient(settings) as client:
        it = iter(recs)

        async def worker():
            for record in it:
                prompt, params = build(record)
                handle(record, await client.complete(prompt, **params))

        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
    return len(recs)


async def run(settings: ClientSettings, recs: list[dict], root: str, every: int) -> int:
    store = open_store(root)
    async with CompletionsClient(settings) as client:
        stats = await run_completions(client, recs, build, handle, store=store, prefix="bench/out",
                                      checkpoint_every=every, total=len(recs))
    assert stats["completed"] == len(recs), stats
    return len(list_shards(store, "bench/out"))


async def warm_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.post(f"{url}/completions", json={"model": "bench", "prompt": "x"}) as r:
                await r.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--prompt-chars", type=int, default=1500)
    p.add_argument("--text-chars", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "bench/results/client_overhead.json"))
    args = p.parse_args()

    text = ("an instruction that asks for the document " * (args.text_chars // 42 + 1))[:args.text_chars]
    recs = records(args.records, args.prompt_chars)
    stub, url = start_stub(text)
    rows = []
    try:
        asyncio.run(warm_up(url))
        print(f"{'mode':<9} {'conc':>5} {'completions/s':>14} {'client CPU s/1k':>16} {'stub CPU s/1k':>14} {'shards':>7}")
        for concurrency in args.concurrency:
            settings = ClientSettings(base_url=url, model="bench", concurrency=concurrency)
            for mode in ("raw", "run", "run+ckpt"):
                with tempfile.TemporaryDirectory(prefix="humpback-bench-") as root:
                    cpu0, stub0, t0 = time.process_time(), _proc_cpu(stub.pid), time.perf_counter()
                    if mode == "raw":
                        shards = 0
                        asyncio.run(raw(settings, recs))
                    else:
                        every = 1000 if mode == "run+ckpt" else len(recs) + 1
                        shards = asyncio.run(run(settings, recs, root, every))
                    wall = time.perf_counter() - t0
                    cpu, stub_cpu = time.process_time() - cpu0, _proc_cpu(stub.pid) - stub0
                row = {"mode": mode, "concurrency": concurrency, "records": len(recs),
                       "seconds": round(wall, 3), "completions_per_s": round(len(recs) / wall, 1),
                       "client_cpu_s_per_1k": round(cpu / len(recs) * 1000, 4),
                       "stub_cpu_s_per_1k": round(stub_cpu / len(recs) * 1000, 4), "shards": shards}
                rows.append(row)
                print(f"{mode:<9} {concurrency:>5} {row['completions_per_s']:>14,.0f} "
                      f"{row['client_cpu_s_per_1k']:>16.3f} {row['stub_cpu_s_per_1k']:>14.3f} {shards:>7}")
    finally:
        stub.terminate()
        stub.wait(timeout=10)
        stub.stdout.close()

    worst = min(r["completions_per_s"] for r in rows if r["mode"] != "raw")
    print(f"goal >= {GOAL:,.0f} completions/s: {'met' if worst >= GOAL else 'MISSED'} (slowest run: {worst:,.0f}/s)")
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "aiohttp": aiohttp.__version__},
        "settings": {"records": args.records, "prompt_chars": args.prompt_chars, "text_chars": args.text_chars},
        "goal_completions_per_s": GOAL,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
