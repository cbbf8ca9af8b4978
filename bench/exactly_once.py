"""What one writer per stage and verified manifests cost: stage time with them on and off.

    .venv/bin/python bench/exactly_once.py [--records 100000] [--repeat 3] [--concurrency 128]

Two workloads, each run with the safeguards on (as shipped) and off (patched out in this process:
no lease, no input verification, no object list in the manifest, no checksums while writing or
reading), alternating on/off `--repeat` times on fresh local stores; the median is reported:

- demo: the demo's data (examples/tiny-cpu.yaml: 64 seed pairs, 200 documents) through
  prepare-seed, prepare-corpus, augment and curate-1 (generate mode), augment and curate asking
  the OpenAI stub (`python -m humpback_testing.openai_stub`, its own process) instead of the tiny
  model; the training stages are stood in for (their cost does not depend on these safeguards
  beyond one lease and one manifest, and on CPU it would drown the figures).
- augment-100k: augment of `--records` synthetic segments (~1,000 characters each) against the stub.

Besides the stage times it prints the safeguards' own times: taking and giving back the lease,
`verify_inputs_seconds` (the input size check) and `manifest_seconds` (listing the outputs) from
each manifest's `timings`, and the time spent computing checksums (SHA-256 while writing and
reading). Goal: the safeguards cost under 2 % of stage time.
Results go to bench/results/exactly_once.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import yaml  # noqa: E402

import humpback_runtime.stages as stages  # noqa: E402
import humpback_runtime.storage as storage  # noqa: E402
from humpback_runtime.context import RunContext  # noqa: E402
from humpback_runtime.manifest import Verification, describe_outputs  # noqa: E402
from humpback_runtime.spec import parse_run  # noqa: E402
from stub_process import start_stub  # noqa: E402  (bench/stub_process.py)

GOAL = 0.02
STUB_TEXT = "A clear and helpful answer.\nScore: 4"  # an instruction for augment, a score for curate


class _NoLease:
    took_over = None
    lost = False

    def __init__(self, store, prefix, *, stage, ttl_s=None):
        self.key = f"{prefix}/_LEASE.json"

    def acquire(self, *, wait=False):
        pass

    def check(self):
        pass

    def release(self):
        pass


class _NullDigest(storage._Digest):
    def update(self, data: bytes) -> None:
        self.size += len(data)

    def info(self, key, path=None):
        return {"bytes": self.size}


class _TimedLease(stages.Lease):
    """The shipped lease, timing how long taking and giving it back take (the heartbeat runs on
    its own thread and is not on the stage's path)."""

    seconds = 0.0

    def acquire(self, **kw) -> None:
        t0 = time.perf_counter()
        super().acquire(**kw)
        _TimedLease.seconds += time.perf_counter() - t0

    def release(self) -> None:
        t0 = time.perf_counter()
        super().release()
        _TimedLease.seconds += time.perf_counter() - t0


class _TimedDigest(storage._Digest):
    seconds = 0.0

    def update(self, data: bytes) -> None:
        t0 = time.perf_counter()
        super().update(data)
        _TimedDigest.seconds += time.perf_counter() - t0


@contextmanager
def safeguards(on: bool):
    """On: the shipped code, with checksum time counted. Off: lease, verification, object list and
    checksums patched out."""
    saved = (stages.Lease, stages.verify_outputs, stages.describe_outputs, storage._Digest)
    _TimedDigest.seconds = _TimedLease.seconds = 0.0
    if on:
        storage._Digest = _TimedDigest
        stages.Lease = _TimedLease
    else:
        stages.Lease = _NoLease
        stages.verify_outputs = lambda *a, **k: Verification()
        stages.describe_outputs = lambda store, prefix: {}
        storage._Digest = _NullDigest
    try:
        yield
    finally:
        stages.Lease, stages.verify_outputs, stages.describe_outputs, storage._Digest = saved


def demo_run(endpoint: str, concurrency: int) -> dict:
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = data["spec"]
    spec["seed"]["source"] = str(ROOT / "examples" / spec["seed"]["source"])  # relative to the run file
    spec["corpus"]["source"] = str(ROOT / "examples" / spec["corpus"]["source"])
    spec["curation"]["mode"] = "generate"
    spec["inference"] = {"engine": "vllm-server", "endpoint": endpoint, "concurrency": concurrency,
                         "checkpointEvery": 50}
    return data


def stand_in(ctx: RunContext, *names: str) -> None:
    for name in names:
        storage.write_success(ctx.store, ctx.prefix(name), {"stage": name, "fingerprint": ctx.plan[name].fingerprint})


def timed_stages(ctx: RunContext, names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        _TimedLease.seconds = 0.0
        t0 = time.perf_counter()
        manifest = stages.run_stage(ctx, name)
        seconds = time.perf_counter() - t0
        own = manifest["timings"]
        out[name] = {"seconds": seconds, "lease_seconds": _TimedLease.seconds,
                     **{k: own.get(k, 0.0) for k in ("verify_inputs_seconds", "manifest_seconds")}}
    return out


def demo_once(endpoint: str, concurrency: int, on: bool) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="bench-eo-") as tmp, safeguards(on):
        ctx = RunContext.create(parse_run(demo_run(endpoint, concurrency)), tmp)
        stand_in(ctx, "train-myx", "train-m0")
        result = timed_stages(ctx, ["prepare-seed", "prepare-corpus", "augment", "curate-1"])
        return result, _TimedDigest.seconds


def augment_once(endpoint: str, concurrency: int, records: int, on: bool) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="bench-eo-") as tmp, safeguards(on):
        data = demo_run(endpoint, concurrency)
        data["spec"]["inference"]["checkpointEvery"] = 1000
        ctx = RunContext.create(parse_run(data), tmp)
        stand_in(ctx, "train-myx")
        prefix = ctx.prefix("prepare-corpus")  # the corpus as prepare-corpus leaves it
        filler = ("The quick brown fox jumps over the lazy dog near the riverbank at dawn. " * 14)[:1000]
        with storage.ShardWriter(ctx.store, prefix) as writer:
            for i in range(records):
                writer.write({"id": f"seg-{i:07d}", "text": f"{i} {filler}"})
        manifest = {"stage": "prepare-corpus", "fingerprint": ctx.plan["prepare-corpus"].fingerprint,
                    "outputs": {"records": writer.shards, "count": writer.count, "format": "jsonl"}}
        if on:
            manifest["objects"] = describe_outputs(ctx.store, prefix)
        storage.write_success(ctx.store, prefix, manifest)
        _TimedDigest.seconds = 0.0  # count the stage's checksums only
        return timed_stages(ctx, ["augment"]), _TimedDigest.seconds


def summarize(label: str, runs: dict[bool, list[tuple[dict, float]]]) -> dict:
    names = list(runs[True][0][0])
    rows = {}
    for name in names:
        on = statistics.median(r[0][name]["seconds"] for r in runs[True])
        off = statistics.median(r[0][name]["seconds"] for r in runs[False])
        parts = {k: statistics.median(r[0][name][k] for r in runs[True])
                 for k in ("lease_seconds", "verify_inputs_seconds", "manifest_seconds")}
        rows[name] = {"on_s": on, "off_s": off, "difference": (on - off) / off if off else None, **parts}
    total_on = statistics.median(sum(v["seconds"] for v in r[0].values()) for r in runs[True])
    total_off = statistics.median(sum(v["seconds"] for v in r[0].values()) for r in runs[False])
    checksum_s = statistics.median(r[1] for r in runs[True])
    measured = sum(rows[n][k] for n in rows for k in ("lease_seconds", "verify_inputs_seconds", "manifest_seconds"))
    print(f"\n{label}")
    print(f"{'stage':16} {'on s':>8} {'off s':>8} {'diff':>7} {'lease s':>8} {'verify s':>9} {'manifest s':>10}")
    for name, r in rows.items():
        diff = f"{r['difference']:+.1%}" if r["difference"] is not None else "-"
        print(f"{name:16} {r['on_s']:8.3f} {r['off_s']:8.3f} {diff:>7} {r['lease_seconds']:8.4f} "
              f"{r['verify_inputs_seconds']:9.4f} {r['manifest_seconds']:10.4f}")
    share = (measured + checksum_s) / total_on
    print(f"{'total':16} {total_on:8.3f} {total_off:8.3f} {(total_on - total_off) / total_off:+7.1%}   "
          f"checksums {checksum_s:.3f}s; lease + verify + manifest + checksums = {measured + checksum_s:.3f}s "
          f"= {share:.2%} of stage time (goal < {GOAL:.0%})")
    return {"stages": rows, "total_on_s": total_on, "total_off_s": total_off, "checksum_s": checksum_s,
            "measured_overhead_s": measured + checksum_s, "measured_share": share,
            "difference": (total_on - total_off) / total_off}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=100_000, help="segments of the big augment (0: skip it)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--big-repeat", type=int, default=1, help="repeats of the 100k augment")
    p.add_argument("--concurrency", type=int, default=128)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    stub, endpoint = start_stub(STUB_TEXT)
    results = {"machine": platform.platform(), "python": platform.python_version(), "records": args.records}
    try:
        demo_once(endpoint, args.concurrency, False)  # warm-up: imports, first connections
        demo: dict[bool, list] = {True: [], False: []}
        for _ in range(args.repeat):
            for on in (True, False):
                demo[on].append(demo_once(endpoint, args.concurrency, on))
        results["demo"] = summarize("demo-sized run (stages against the stub)", demo)
        if args.records:  # --records 0: the demo only
            big: dict[bool, list] = {True: [], False: []}
            for _ in range(args.big_repeat):
                for on in (True, False):
                    big[on].append(augment_once(endpoint, args.concurrency, args.records, on))
            results["augment"] = summarize(f"augment of {args.records:,} records against the stub", big)
    finally:
        stub.kill()
    out = ROOT / "bench" / "results" / "exactly_once.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
