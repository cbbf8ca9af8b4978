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
from humpback_runtime.spec import DataSource
from humpback_runtime.stages.guardrails import check_yield, likely_cause, yield_record
from humpback_runtime.storage import ShardWriter, Store


def _progress(records: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    from humpback_runtime.progress import iterate

    # Input records read (the total is known only when capped by maxDocuments).
    yield from iterate(records, desc, total=total)


def _input_records(ctx: RunContext, spec: DataSource, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    s3 = ctx.run.spec.storage.s3
    return iter_source_records(spec.source, bad=bad, split=spec.split, endpoint_url=s3.endpoint, region=s3.region,
                               max_record_bytes=spec.max_record_bytes, base_dir=ctx.run.base_dir)


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
    records = _input_records(ctx, spec, bad)
    outputs = _write_records(ctx.store, prefix, prepare_seed(_progress(records, stage.name), spec, bad, counts))
    if counts.pairs == 0:
        raise StageError(
            f"prepare-seed produced no pairs from {spec.source} (format {spec.format}): "
            f"{counts.as_dict()}, bad records: {bad.count}. Check spec.seed.format and spec.seed.lang."
        )
    # The yield over what the user's own choices (language, cap) left: the rest is data lost to filters.
    candidates = counts.roots if spec.format != "pairs" else counts.records + bad.count
    candidates -= counts.dropped_lang + counts.dropped_over_cap
    lost = {k.removeprefix("dropped_"): v for k, v in counts.as_dict().items()
            if k.startswith("dropped_") and k not in ("dropped_lang", "dropped_over_cap") and v}
    if bad.count:
        lost["bad_record"] = bad.count
    check_yield(stage.name, candidates, counts.pairs, spec.min_yield, "seed.minYield",
                likely_cause("prepare-seed", lost, candidates, "prompts"))
    return {"outputs": outputs, "counts": counts.as_dict(), "badRecords": bad.summary(),
            "yield": yield_record(candidates, counts.pairs, [f"{bad.count} bad records"] if bad.count else [])}


def run_prepare_corpus(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.corpus import CorpusCounts, filter_corpus

    spec = ctx.run.spec.corpus
    bad = BadRecords(spec.on_bad_record, label="corpus")
    counts = CorpusCounts()
    records = _input_records(ctx, spec, bad)
    if spec.max_documents is not None:
        records = islice(records, spec.max_documents)
    outputs = _write_records(ctx.store, prefix, filter_corpus(_progress(records, stage.name, spec.max_documents),
                                                              spec, counts))
    if counts.kept == 0:
        raise StageError(
            f"prepare-corpus kept no segments from {spec.source}: {counts.as_dict()}, bad records: "
            f"{bad.count}. Check spec.corpus.textField and the minChars/maxChars window."
        )
    warnings = [f"{bad.count} bad records"] if bad.count else []
    if counts.duplicate_ids_renamed:
        warnings.append(f"{counts.duplicate_ids_renamed} duplicate {spec.id_field or 'id'} values made unique")
    return {"outputs": outputs, "counts": counts.as_dict(), "badRecords": bad.summary(),
            "yield": yield_record(counts.read + bad.count, counts.kept, warnings)}
