"""Peak memory of reading inputs: one huge record, and a large gzip / zstd / JSON-array file.

    .venv/bin/python bench/input_memory.py [--record-mb 200] [--before COMMIT]

Each case reads in a fresh subprocess and reports the peak of Python allocations while reading
(tracemalloc), records read and seconds, side by side for this checkout and for the reader of
`--before` (default: the commit this branch started from; `git archive` of its humpback_runtime).
The huge record is a bad record now (over maxRecordBytes, 16 MiB by default): it must cost no more
memory than a normal file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(path: str, root: str) -> None:
    import tracemalloc

    sys.path.insert(0, root)
    from humpback_runtime.sources import BadRecords, iter_source_records

    bad = BadRecords("skip", label="bench")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        n = sum(1 for _ in iter_source_records(path, bad=bad))
        error = None
    except Exception as e:  # the old reader on a zstd file, say
        n, error = 0, f"{type(e).__name__}"
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"records": n, "bad": bad.count, "seconds": round(time.perf_counter() - t0, 2),
                      "peak_mb": round(peak / 2**20, 1), "error": error}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--record-mb", type=int, default=200)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--before", default="main", help="git commit whose reader to compare with")
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="humpback-bench-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(here), "archive", args.before, "humpback_runtime"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", str(before)], input=archive, check=True)
        normal = "".join(json.dumps({"id": i, "text": "lorem ipsum " * 40}) + "\n" for i in range(args.records))
        cases = {
            f"one {args.record_mb} MB record + 2 small (jsonl)": ("huge.jsonl", (
                '{"text": "a"}\n{"text": "' + "x" * (args.record_mb * 2**20) + '"}\n{"text": "c"}\n').encode()),
            f"{args.records} records (jsonl)": ("plain.jsonl", normal.encode()),
            f"{args.records} records (jsonl.gz)": ("plain.jsonl.gz", gzip.compress(normal.encode())),
        }
        try:
            import zstandard

            cases[f"{args.records} records (jsonl.zst)"] = ("plain.jsonl.zst",
                                                            zstandard.ZstdCompressor().compress(normal.encode()))
        except ImportError:
            pass
        array = "[\n" + ",\n".join(json.dumps({"id": i, "text": "lorem ipsum " * 40}) for i in range(args.records)) + "\n]\n"
        cases[f"{args.records} records (one .json array)"] = ("array.json", array.encode())
        print(f"{'case':44} {'reader':>7} {'records':>8} {'bad':>5} {'seconds':>8} {'peak MB':>8}")
        for label, (name, data) in cases.items():
            path = tmp / name
            path.write_bytes(data)
            for reader, root in (("before", before), ("now", here)):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), str(root)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                note = f"  ({r['error']})" if r["error"] else ""
                print(f"{label:44} {reader:>7} {r['records']:>8} {r['bad']:>5} {r['seconds']:>8} {r['peak_mb']:>8}{note}")
            path.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
