"""Near-duplicate removal side by side: prepare-corpus, datasketch and rensa on one corpus whose
duplicates are known.

    .venv/bin/python bench/dedup.py [--docs 100000] [--data examples/data/c4_sample.jsonl]

The corpus (built here, the same for every --seed):

- Base documents. First the c4 sample's documents that pass prepare-corpus's filters alone (real
  C4 text, ~530 of the 1,000). The sample is far smaller than --docs, so the rest are synthetic,
  made of real C4 sentences: every sentence of the sample's cleaned documents goes into one pool,
  and a synthetic document is sentences drawn at random from the pool until a length drawn from
  the real documents' lengths, in paragraphs of 2 to 5 sentences. Two such documents share a
  sentence now and then (as web pages share phrases) but never most of their text, so they are
  distinct; real C4 has more shared boilerplate than this, so chance LSH candidates are rarer here.
- Planted duplicates. --planted (25%) of the documents copy a base document already in the stream
  (chosen uniformly): a quarter are exact copies (half of them re-cased or re-spaced, which
  normalisation erases), the rest have light word edits: a rate drawn uniformly from 0.2% to 5%
  of the words, each edit a substitution by another C4 word (50%), a deletion (20%), an insertion
  (20%) or a swap of two neighbours (10%). Their true Jaccard with the base runs from ~0.55 to 1,
  so many pairs lie just under the threshold, where a method can produce false positives.
- Every document passes the other filters (length window, boilerplate), so all reach the dedup
  step; the order is random.

Ground truth. The exact shingle sets (word 5-grams of the cleaned, normalised text, as
prepare-corpus defines them; 64-bit xxh3 per shingle, independent of the hashes the methods use)
and the ideal removal set: in stream order, a document is removed when its Jaccard with an earlier
document the ideal kept is >= --threshold. Every such pair is found, across all documents (not
only within a planted family), with the prefix filter of all-pairs similarity joins (Bayardo et
al. 2007): two sets at Jaccard >= t share a shingle among the first |S| - ceil(t|S|) + 1 of each
in one global order (rarest shingles first), and each candidate found that way is compared exactly.

Methods: each runs the prepare-corpus stage itself, `run_prepare_corpus` (what `humpback stage
prepare-corpus` runs: read the corpus JSONL, filter (boilerplate, length window, exact dedup, then
near-dup, in batches), write the kept segments as shards to a local store), in a fresh process on
one core, timed over that call. Only the near-dup step differs:

- exact only: the baseline, near-dup off (what the rest of the stage costs);
- humpback: the default spec (MinHash 64, LSH banded for recall, each candidate verified by exact
  shingle Jaccard); "humpback-128" and so on set dedup.numPerm; "humpback@REV" runs the
  humpback_runtime of git revision REV (`git archive`), e.g. humpback@main for before/after;
- datasketch and rensa take the place of `NearDuplicateIndex` in that stage:
- datasketch: `MinHash(num_perm=128, hashfunc=xxh32).update_batch(shingles)` and
  `MinHashLSH(threshold, num_perm=128)` (its own banding, 9x13 at 0.8): a document with any
  LSH result is a duplicate, otherwise it is inserted (the library's documented use);
- rensa: `RMinHash(128, seed=42).update(shingles)`, `RMinHashLSH(threshold, 128, num_bands=16)`,
  and each candidate verified by the estimated Jaccard of the two signatures (`RMinHash.jaccard`).

Reports, per method: removed, recall against the ideal (ideal removals it removed / ideal), false
positives (removals outside the ideal) and documents per CPU second (the per-core rate; wall time
beside it; with --repeat N, each method's fastest of N interleaved rounds), the CPU time per
document the near-dup step adds to the baseline, and the planted Jaccard of the false positives
and misses. Results go to bench/results/dedup.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

ROOT = Path(__file__).resolve().parents[1]
# A child process runs one method with the code of its job's root (this checkout, or an earlier
# commit's humpback_runtime for "humpback@REV"): that root goes first on the path.
sys.path.insert(0, json.loads(sys.argv[2])["root"] if sys.argv[1:2] == ["--child"] else str(ROOT))

from humpback_runtime.corpus import CorpusFilter, clean_boilerplate, normalise  # noqa: E402
from humpback_runtime.spec import CorpusSpec, DedupSpec  # noqa: E402
from machine import machine  # noqa: E402  (bench/machine.py)

LIBRARY_NUM_PERM = 128  # datasketch's and rensa's usual setting
NGRAM = 5
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# --- the corpus -----------------------------------------------------------------------------


def sentence_pool(texts: list[str]) -> list[str]:
    pool = set()
    for text in texts:
        cleaned, _ = clean_boilerplate(text)
        for line in cleaned.split("\n"):
            for sentence in _SENTENCE.split(line.strip()):
                if len(sentence.split()) >= 4:
                    pool.add(sentence)
    return sorted(pool)


def synthetic(pool: list[str], length: int, rng: random.Random) -> str:
    paragraphs, size = [], 0
    while size < length:
        paragraph = " ".join(rng.choice(pool) for _ in range(rng.randint(2, 5)))
        paragraphs.append(paragraph)
        size += len(paragraph) + 1
    return "\n".join(paragraphs)


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(max(1, round(rate * len(words)))):
        i = rng.randrange(len(words) - 1)
        op = rng.random()
        if op < 0.5:
            words[i] = rng.choice(vocab)
        elif op < 0.7:
            del words[i]
        elif op < 0.9:
            words.insert(i, rng.choice(vocab))
        else:
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def exact_variant(text: str, rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return text.upper()
    if kind == 1:
        return text.replace(" ", "  ").replace("\n", "\n\n")
    return text


def build_corpus(texts: list[str], n_docs: int, planted: float, seed: int):
    """[(text, kind, source)] in stream order (source: the copied document's position, else None),
    every one passing prepare-corpus's filters without dedup."""
    rng = random.Random(seed)
    check = CorpusFilter(CorpusSpec(source="bench", dedup=DedupSpec(exact=False, near_duplicates=False)))

    def passes(text: str) -> bool:
        return check.process("x", text) is not None

    real = [t for t in texts if passes(t)]
    lengths = [len(clean_boilerplate(t)[0]) for t in real]
    pool = sentence_pool(texts)
    vocab = sorted({w for t in texts for w in t.split() if w.isalpha()})
    n_planted = round(planted * n_docs)
    kinds = ["base"] * (n_docs - n_planted) + ["planted"] * n_planted
    rng.shuffle(kinds)
    kinds[0] = "base"
    docs: list[tuple[str, str, int | None]] = []
    bases: list[int] = []  # positions of the base documents in docs
    real_left = list(real)
    for kind in kinds:
        while True:
            source = None if kind == "base" else rng.choice(bases)
            if kind == "base":
                text = real_left.pop(0) if real_left else synthetic(pool, rng.choice(lengths), rng)
                label = "base"
            elif rng.random() < 0.25:
                text, label = exact_variant(docs[source][0], rng), "exact copy"
            else:
                text, label = edit(docs[source][0], rng.uniform(0.002, 0.05), vocab, rng), "edited copy"
            if passes(text):
                break
        if kind == "base":
            bases.append(len(docs))
        docs.append((text, label, source))
    return docs, {"real_base_documents": len(real), "sentence_pool": len(pool)}


# --- ground truth ---------------------------------------------------------------------------


def shingle_set(text: str) -> np.ndarray:
    """Sorted distinct 64-bit hashes of the word 5-grams of the text the dedup step sees."""
    words = normalise(clean_boilerplate(text)[0]).split(" ")
    n = max(len(words) - NGRAM + 1, 1)
    return np.unique(np.fromiter((xxhash.xxh3_64_intdigest(" ".join(words[i:i + NGRAM]).encode("utf-8", "surrogatepass")) for i in range(n)),
                                 dtype=np.uint64, count=n))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def ideal_removals(docs: list[tuple[str, str, int | None]], threshold: float):
    """(ids the ideal removes, shingle sets) with the prefix filter over the ideal's kept documents."""
    sets = [shingle_set(doc[0]) for doc in docs]
    # The global order: rarest shingles first (then by hash), as in All-Pairs, so that prefixes
    # hold the shingles few documents share and the candidates are few; any order is exact.
    tokens, df = np.unique(np.concatenate(sets), return_counts=True)
    index: dict[int, list[int]] = {}
    removed = set()
    for i, s in enumerate(sets):
        rarest_first = s[np.lexsort((s, df[np.searchsorted(tokens, s)]))]
        prefix = rarest_first[:len(s) - math.ceil(threshold * len(s) - 1e-9) + 1].tolist()
        candidates = {j for token in prefix for j in index.get(token, ())}
        if any(jaccard(s, sets[j]) >= threshold for j in sorted(candidates)):
            removed.add(i)
            continue
        for token in prefix:
            index.setdefault(token, []).append(i)
    return removed, sets


# --- the methods ----------------------------------------------------------------------------


def _shingles(normalised: bytes) -> list[str]:
    words = normalised.decode("utf-8", "surrogatepass").split(" ")
    return [" ".join(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))]


class _LibraryIndex:
    """A near-dup step in place of prepare-corpus's NearDuplicateIndex (same constructor and calls)."""

    def __init__(self, dedup, counts=None):
        self.threshold = dedup.threshold

    def seen_many(self, texts: list[bytes]) -> list[bool]:
        return [self.seen(text) for text in texts]


class DatasketchIndex(_LibraryIndex):
    def __init__(self, dedup, counts=None):
        from datasketch import MinHash, MinHashLSH

        super().__init__(dedup)
        self.minhash = lambda: MinHash(num_perm=LIBRARY_NUM_PERM, hashfunc=xxhash.xxh32_intdigest)
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=LIBRARY_NUM_PERM)
        self.n = 0

    def seen(self, normalised: bytes) -> bool:
        m = self.minhash()
        m.update_batch([s.encode("utf-8", "surrogatepass") for s in _shingles(normalised)])
        if self.lsh.query(m):
            return True
        self.lsh.insert(self.n, m, check_duplication=False)
        self.n += 1
        return False


class RensaIndex(_LibraryIndex):
    def __init__(self, dedup, counts=None):
        from rensa import RMinHash, RMinHashLSH

        super().__init__(dedup)
        self.RMinHash = RMinHash
        self.lsh = RMinHashLSH(threshold=self.threshold, num_perm=LIBRARY_NUM_PERM, num_bands=16)
        self.kept: list = []

    def seen(self, normalised: bytes) -> bool:
        m = self.RMinHash(num_perm=LIBRARY_NUM_PERM, seed=42)
        m.update(_shingles(normalised))
        if any(m.jaccard(self.kept[key]) >= self.threshold for key in self.lsh.query(m)):
            return True
        self.lsh.insert(len(self.kept), m)
        self.kept.append(m)
        return False


def code_of(rev: str, tmp: Path) -> Path:
    """A folder holding the humpback_runtime of git revision `rev` of this checkout."""
    root = tmp / f"code-{re.sub(r'[^A-Za-z0-9.-]', '-', rev)}"
    if not root.exists():
        root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "humpback_runtime"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", str(root)], input=archive, check=True)
    return root


def run_method(name: str, corpus: Path, store_root: Path, threshold: float) -> dict:
    """One method over the corpus: the prepare-corpus stage itself (`run_prepare_corpus`, as
    `humpback stage prepare-corpus` runs it), in a fresh process, with this checkout's code or,
    for "humpback@REV", the humpback_runtime of git revision REV."""
    root = code_of(name.split("@", 1)[1], store_root.parent) if "@" in name else ROOT
    job = {"name": name, "corpus": str(corpus), "store": str(store_root), "threshold": threshold, "root": str(root)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(job: dict) -> None:
    sys.path.insert(0, job["root"])  # this checkout, or the extracted humpback_runtime of --before
    import humpback_runtime.corpus as corpus_module
    from humpback_runtime.context import RunContext
    from humpback_runtime.spec import parse_run
    from humpback_runtime.stages.prepare import run_prepare_corpus

    assert corpus_module.__file__.startswith(job["root"]), corpus_module.__file__
    name, threshold = job["name"], job["threshold"]
    # "humpback" runs the default spec; "humpback-128" sets numPerm=128, and so on.
    dedup = {"threshold": threshold}
    if name.startswith("humpback-"):
        dedup["numPerm"] = int(name.split("-")[1].split("@")[0])
    if name == "exact only":
        dedup["nearDuplicates"] = False  # the baseline: everything but the near-dup step
    elif name in ("datasketch", "rensa"):
        # The same stage with another near-dup step in place of NearDuplicateIndex.
        corpus_module.NearDuplicateIndex = {"datasketch": DatasketchIndex, "rensa": RensaIndex}[name]
    run = parse_run({
        "apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "metadata": {"name": "dedup-bench"},
        "spec": {"baseModel": "unused", "seed": {"source": job["corpus"]},
                 "corpus": {"source": job["corpus"], "dedup": dedup},
                 "storage": {"uri": job["store"]}},
    })
    ctx = RunContext.create(run, job["store"], identify_inputs=False)
    stage = ctx.plan["prepare-corpus"]
    prefix = ctx.prefix(stage.name)
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    manifest = run_prepare_corpus(ctx, stage, prefix)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    kept = [int(json.loads(line)["id"].rsplit(":", 1)[1]) - 1
            for key in manifest["outputs"]["records"] for line in ctx.store.read_bytes(key).splitlines()]
    print(json.dumps({"counts": manifest["counts"], "kept": kept, "wall_s": wall, "cpu_s": cpu}))


def score(result: dict, n: int, ideal: set[int], sets: list[np.ndarray], docs) -> dict:
    removed = set(range(n)) - set(result["kept"])
    false_pos = sorted(removed - ideal)
    missed = sorted(ideal - removed)

    def planted_jaccard(ids: list[int]) -> list[float]:
        # Jaccard of each (copied) document with the document it copies: where the errors lie.
        return sorted(round(jaccard(sets[i], sets[docs[i][2]]), 3) for i in ids if docs[i][2] is not None)

    c = result["counts"]
    return {
        "removed": len(removed),
        "exact_duplicate": c["exact_duplicate"],
        "near_duplicate": c["near_duplicate"],
        "recall": len(removed & ideal) / len(ideal) if ideal else 1.0,
        "false_positives": len(false_pos),
        "missed": len(missed),
        "docs_per_cpu_s": n / result["cpu_s"],
        "docs_per_wall_s": n / result["wall_s"],
        "cpu_s": result["cpu_s"],
        "false_positive_kinds": {k: sum(docs[i][1] == k for i in false_pos) for k in ("base", "exact copy", "edited copy")},
        "missed_kinds": {k: sum(docs[i][1] == k for i in missed) for k in ("base", "exact copy", "edited copy")},
        "false_positive_planted_jaccard": planted_jaccard(false_pos),
        "missed_planted_jaccard": planted_jaccard(missed),
        **({"lsh_candidates": c["lsh_candidates"], "lsh_rejected": c["lsh_rejected"]} if c.get("lsh_candidates") else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--planted", type=float, default=0.25, help="fraction of documents that copy an earlier one")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--methods", nargs="+", default=["exact only", "humpback", "datasketch", "rensa"],
                        help='also "humpback-N": humpback with numPerm=N; "humpback@REV": the code of git revision REV '
                             '(e.g. humpback@main), for before/after figures in one run')
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "c4_sample.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dedup.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over all methods; each method's fastest round counts (other load on the machine only slows a round)")
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in open(args.data, encoding="utf-8")]
    t = time.perf_counter()
    docs, info = build_corpus(texts, args.docs, args.planted, args.seed)
    kinds = {k: sum(d[1] == k for d in docs) for k in ("base", "exact copy", "edited copy")}
    print(f"corpus: {len(docs):,} documents from {args.data.name} ({info['real_base_documents']} real C4 "
          f"documents, the other bases drawn from {info['sentence_pool']:,} C4 sentences): "
          + ", ".join(f"{v:,} {k}" for k, v in kinds.items()) + f" [{time.perf_counter() - t:.0f} s]")
    t = time.perf_counter()
    ideal, sets = ideal_removals(docs, args.threshold)
    print(f"ideal dedup at Jaccard >= {args.threshold}: removes {len(ideal):,} "
          + "(" + ", ".join(f"{sum(docs[i][1] == k for i in ideal):,} {k}" for k in kinds) + ")"
          + f" [{time.perf_counter() - t:.0f} s]")
    planted = [jaccard(sets[i], sets[d[2]]) for i, d in enumerate(docs) if d[1] == "edited copy"]
    print("edited copies by Jaccard with their source: "
          + ", ".join(f"[{lo:.1f}, {hi:.1f}): {sum(lo <= j < hi for j in planted):,}"
                      for lo, hi in [(0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]))

    with tempfile.TemporaryDirectory(prefix="humpback-dedup-bench-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for text, _, _ in docs:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        best: dict[str, dict] = {}
        for round_ in range(args.repeat):
            for name in args.methods:
                store = Path(tmp) / f"store-{round_}-{re.sub(r'[^A-Za-z0-9.-]', '-', name)}"
                try:
                    raw = run_method(name, corpus, store, args.threshold)
                except RuntimeError as exc:  # a library not installed, say
                    print(f"{name}: skipped ({str(exc).strip().splitlines()[-1]})")
                    continue
                print(f"  round {round_ + 1}: {name} {len(docs) / raw['cpu_s']:,.0f} docs/cpu-s", flush=True)
                if name not in best or raw["cpu_s"] < best[name]["cpu_s"]:
                    best[name] = raw
        results = {name: score(raw, len(docs), ideal, sets, docs) for name, raw in best.items()}

    base = results.get("exact only")
    for r in results.values():
        # CPU time per document that the near-dup step adds to the rest of the stage.
        r["near_dup_us_per_doc"] = (r["cpu_s"] - base["cpu_s"]) / len(docs) * 1e6 if base else None
    header = (f"{'method':16} {'removed':>8} {'recall':>7} {'false pos':>9} {'missed':>7} {'docs/cpu-s':>10} "
              f"{'docs/s wall':>11} {'near-dup us/doc':>15}")
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{'ideal':16} {len(ideal):>8,} {1:>7.1%} {0:>9} {0:>7}")
    for name, r in results.items():
        cost = "" if r["near_dup_us_per_doc"] is None or name == "exact only" else f"{r['near_dup_us_per_doc']:,.0f}"
        print(f"{name:16} {r['removed']:>8,} {r['recall']:>7.1%} {r['false_positives']:>9,} {r['missed']:>7,} "
              f"{r['docs_per_cpu_s']:>10,.0f} {r['docs_per_wall_s']:>11,.0f} {cost:>15}")
    for name, r in results.items():
        if name != "exact only":
            print(f"{name}: false positives at planted Jaccard {summary(r['false_positive_planted_jaccard'])}; "
                  f"misses at {summary(r['missed_planted_jaccard'])}")

    import datasketch

    try:
        import rensa
        rensa_version = getattr(rensa, "__version__", None) or _dist_version("rensa")
    except ImportError:
        rensa_version = None
    out = {
        "benchmark": "dedup",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "docs": len(docs),
        "kinds": kinds,
        "threshold": args.threshold,
        "repeat": args.repeat,
        "ideal_removed": len(ideal),
        "machine": machine(numpy=np.__version__, datasketch=datasketch.__version__, rensa=rensa_version),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def summary(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f} (n={len(values)})" if values else "none"


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(json.loads(sys.argv[2]))
    else:
        main()
