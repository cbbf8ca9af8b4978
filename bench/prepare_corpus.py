"""Throughput of the prepare-corpus filter, with and without near-duplicate removal.

    .venv/bin/python bench/prepare_corpus.py [--docs 100000] [--data examples/data/c4_sample.jsonl]

Replicates the c4 sample (1,000 real documents) to --docs documents in four datasets:

- perturbed: each replica after the first has a few adjacent words swapped (one swap per 150
  words, at least one) and a unique reference sentence appended, so exact dedup cannot catch
  it and near-dup should;
- exact: replicas are exact copies, which exact dedup catches before near-dup is reached;
- perturbed, in-window: as perturbed, but replicating only the documents that pass the filters
  alone, so every document pays for boilerplate cleaning, hashing and the MinHash/LSH step;
- distinct, in-window: as in-window, but every third word of a replica is replaced by a random
  word, so no two documents are near-duplicates and every one is inserted into the LSH index
  (the worst case for throughput and memory, and the common case of a real web corpus).

Each dataset runs single-process, one core, with (a) near-duplicates off (exact dedup on) and
(b) near-duplicates on, and prints documents/s (wall and CPU time), what each filter removed,
and replicas_kept: replicas kept beside an earlier kept copy of the same base document
(duplicates that got through; for "distinct" they are meant to be kept). A micro-benchmark compares ways of computing the MinHash signatures. Results go to
bench/results/prepare_corpus.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import string
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from humpback_runtime.corpus import CorpusCounts, MinHasher, filter_corpus, normalise  # noqa: E402
from humpback_runtime.spec import CorpusSpec, DedupSpec  # noqa: E402
from machine import machine  # noqa: E402  (bench/machine.py)

COUNT_KEYS = ("kept", "missing_text", "too_short", "too_long", "boilerplate", "exact_duplicate",
              "near_duplicate", "boilerplate_lines_removed")


def perturb(text: str, replica: int, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(max(1, len(words) // 150)):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words) + f" Reference {replica:06x}{rng.getrandbits(32):08x}."


_POOL = ["".join(random.Random(i).choices(string.ascii_lowercase, k=6)) for i in range(20_000)]


def randomise_words(text: str, rng: random.Random) -> str:
    """Every third word replaced by a random 6-letter word (its trailing punctuation kept)."""
    words = text.split(" ")
    for i in range(0, len(words), 3):
        word = words[i]
        tail = word[len(word.rstrip(".,;:!?\"')")):]
        words[i] = _POOL[rng.randrange(len(_POOL))] + tail
    return " ".join(words)


def replicate(texts: list[str], n: int, mode: str, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        replica, base = divmod(i, len(texts))
        text = texts[base]
        if replica and mode == "perturbed":
            text = perturb(text, i, rng)
        elif replica and mode == "distinct":
            text = randomise_words(text, rng)
        records.append((f"bench:{i + 1}", {"text": text}))
    return records


def run_filter(records: list[tuple[str, dict]], near: bool, n_base: int) -> dict:
    spec = CorpusSpec(source="bench", dedup=DedupSpec(near_duplicates=near))
    counts = CorpusCounts()
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    kept = [s["id"] for s in filter_corpus(records, spec, counts)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # Replicas kept beside an earlier kept copy of the same base document.
    per_base = Counter((int(doc_id.split(":")[1]) - 1) % n_base for doc_id in kept)
    return {
        "near_duplicates": near,
        "docs": counts.read,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "docs_per_s": round(counts.read / wall),
        "docs_per_cpu_s": round(counts.read / cpu),
        "replicas_kept": sum(n - 1 for n in per_base.values()),
        "counts": counts.as_dict(),
    }


def signature_bench(texts: list[str], num_perm: int = 128, ngram: int = 5) -> dict[str, float]:
    """Microseconds per document to compute one MinHash signature, four ways."""
    import xxhash
    from datasketch import MinHash

    norms = [normalise(t) for t in texts]
    shingles = []
    for norm in norms:
        words = norm.split(" ")
        shingles.append([" ".join(words[i:i + ngram]).encode() for i in range(max(len(words) - ngram + 1, 1))])

    def per_doc(fn, items):
        t = time.perf_counter()
        for item in items:
            fn(item)
        return round((time.perf_counter() - t) / len(items) * 1e6, 1)

    def datasketch_sha1(sh):  # MinHash.update per shingle, default sha1 hash
        m = MinHash(num_perm=num_perm)
        for s in sh:
            m.update(s)

    def datasketch_xxhash_batch(sh):  # MinHash.update_batch with a 32-bit xxhash
        m = MinHash(num_perm=num_perm, hashfunc=xxhash.xxh32_intdigest)
        m.update_batch(sh)

    hasher = MinHasher(num_perm, ngram)
    encoded = [n.encode("utf-8", "surrogatepass") for n in norms]
    batches = [encoded[i:i + 256] for i in range(0, len(encoded), 256)]  # as filter_corpus batches
    return {
        "datasketch_update_sha1_us": per_doc(datasketch_sha1, shingles[:50]),
        "datasketch_update_batch_xxh32_us": per_doc(datasketch_xxhash_batch, shingles),
        "vectorised_numpy_us (humpback, one document per call)": per_doc(hasher.signature, norms),
        "vectorised_numpy_us (humpback, 256 documents per call)": round(
            per_doc(lambda b: hasher.signatures_of(*hasher.mixed_many(b)), batches) * len(batches) / len(encoded), 1),
        "shingles_per_doc": round(sum(map(len, shingles)) / len(shingles), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "c4_sample.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prepare_corpus.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in open(args.data, encoding="utf-8")]
    base = [(f"base:{i}", {"text": t}) for i, t in enumerate(texts)]
    passing = [s["text"] for s in filter_corpus(base, CorpusSpec(source="bench"))]
    print(f"{args.data.name}: {len(texts)} documents, {len(passing)} pass the filters alone "
          f"(600-3,000 characters); replicated to {args.docs:,} documents per dataset\n")

    datasets = {
        "perturbed": (texts, "perturbed"),
        "exact": (texts, "exact"),
        "perturbed, in-window": (passing, "perturbed"),
        "distinct, in-window": (passing, "distinct"),
    }
    header = f"{'dataset':22} {'near-dup':8} {'docs/s':>8} {'docs/cpu-s':>10}  " + " ".join(
        f"{k.replace('_duplicate', '_dup').replace('boilerplate_lines_removed', 'bp_lines'):>10}" for k in COUNT_KEYS) + f" {'replicas_kept':>13}"
    print(header)
    print("-" * len(header))
    runs = []
    for name, (source, mode) in datasets.items():
        records = replicate(source, args.docs, mode, args.seed)
        for near in (False, True):
            result = {"dataset": name, **run_filter(records, near, len(source))}
            runs.append(result)
            c = result["counts"]
            print(f"{name:22} {'on' if near else 'off':8} {result['docs_per_s']:>8,} {result['docs_per_cpu_s']:>10,}  "
                  + " ".join(f"{c[k]:>10,}" for k in COUNT_KEYS) + f" {result['replicas_kept']:>13,}")
        del records

    sig = signature_bench(passing)
    print("\nMinHash signature (128 permutations, word 5-grams), microseconds per in-window document:")
    for k, v in sig.items():
        print(f"  {k:40} {v}")
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {max_rss_mib:,.0f} MiB (whole process, all datasets)")

    import datasketch
    import numpy

    results = {
        "benchmark": "prepare_corpus",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": str(args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data),
        "docs_per_dataset": args.docs,
        "base_documents": len(texts),
        "base_documents_passing": len(passing),
        "processes": 1,
        "machine": machine(numpy=numpy.__version__, datasketch=datasketch.__version__),
        "runs": runs,
        "signature_us_per_doc": sig,
        "peak_rss_mib": round(max_rss_mib),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
