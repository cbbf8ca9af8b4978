"""prepare-seed and prepare-corpus: the data stages (no model).

    humpback stage prepare-seed --spec RUN.yaml
    humpback stage prepare-corpus --spec RUN.yaml
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError
from humpback_runtime.plan import Stage
from humpback_runtime.sources import BadRecords, iter_source_records
from humpback_runtime.storage import ShardWriter, Store


def _progress(records: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    from humpback_runtime.progress import iterate

    # Input records read (the total is known only when capped by maxDocuments).
    yield from iterate(records, desc, total=total)


def _input_records(ctx: RunContext, source: str, split: str, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    s3 = ctx.run.spec.storage.s3
    return iter_source_records(source, bad=bad, split=split, endpoint_url=s3.endpoint, region=s3.region)


def _write_records(store: Store, prefix: str, records: Iterable[dict]) -> dict[str, Any]:
    with ShardWriter(store, prefix) as writer:
        for record in records:
            writer.write(record)
    return {"records": writer.shards, "count": writer.count, "format": "jsonl"}


def run_prepare_seed(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.seed import SeedCounts, prepare_seed

    spec = ctx.run.spec.seed
    bad = BadRecords(spec.on_bad_record, label="seed")
    counts = SeedCounts()
    records = _input_records(ctx, spec.source, spec.split, bad)
    outputs = _write_records(ctx.store, prefix, prepare_seed(_progress(records, stage.name), spec, bad, counts))
    if counts.pairs == 0:
        raise StageError(
            f"prepare-seed produced no pairs from {spec.source} (format {spec.format}): "
            f"{counts.as_dict()}, bad records: {bad.count}. Check spec.seed.format and spec.seed.lang."
        )
    return {"outputs": outputs, "counts": counts.as_dict(), "badRecords": bad.summary()}


def run_prepare_corpus(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.corpus import CorpusCounts, filter_corpus

    spec = ctx.run.spec.corpus
    bad = BadRecords(spec.on_bad_record, label="corpus")
    counts = CorpusCounts()
    records = _input_records(ctx, spec.source, spec.split, bad)
    if spec.max_documents is not None:
        records = islice(records, spec.max_documents)
    outputs = _write_records(ctx.store, prefix, filter_corpus(_progress(records, stage.name, spec.max_documents),
                                                              spec, counts))
    if counts.kept == 0:
        raise StageError(
            f"prepare-corpus kept no segments from {spec.source}: {counts.as_dict()}, bad records: "
            f"{bad.count}. Check spec.corpus.textField and the minChars/maxChars window."
        )
    return {"outputs": outputs, "counts": counts.as_dict(), "badRecords": bad.summary()}
