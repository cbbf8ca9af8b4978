"""Where a run's artifacts live and which stages are finished, shared by the stages and runners.

Layout (:mod:`humpback_runtime.layout`): `<storage uri>/<namespace>/<run name>/<stage>/…`, each
finished stage closed by a `_SUCCESS.json` that carries its fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from humpback_runtime.layout import run_prefix, stage_prefix
from humpback_runtime.plan import Plan, Stage, build_plan
from humpback_runtime.spec import BacktranslationRun
from humpback_runtime.storage import Store, iter_shard_records, open_store, output_shards, read_success


@dataclass
class RunContext:
    run: BacktranslationRun
    storage_uri: str  # the spec's storage.uri unless overridden on the command line

    @classmethod
    def create(cls, run: BacktranslationRun, storage_uri: str | None = None) -> RunContext:
        return cls(run, storage_uri or run.spec.storage.uri)

    @cached_property
    def plan(self) -> Plan:
        return build_plan(self.run)

    @cached_property
    def store(self) -> Store:
        s3 = self.run.spec.storage.s3
        return open_store(self.storage_uri, endpoint_url=s3.endpoint, region=s3.region)

    @property
    def run_prefix(self) -> str:
        return run_prefix(self.run.namespace, self.run.name)

    def prefix(self, stage: str) -> str:
        return stage_prefix(self.run.namespace, self.run.name, stage)

    def manifest(self, stage: str) -> dict | None:
        return read_success(self.store, self.prefix(stage))

    def records(self, stage: str) -> Iterator[dict]:
        """The output records of a finished stage, each shard checked against the stage's manifest
        (checksum, size, record count) as it streams: ShardMismatch names a damaged one."""
        prefix = self.prefix(stage)
        manifest = self.manifest(stage)
        objects = (manifest or {}).get("objects")
        expected = {f"{prefix}/{rel}": info for rel, info in objects.items()} if isinstance(objects, dict) else None
        return iter_shard_records(self.store, output_shards(self.store, prefix, manifest), expected=expected)

    def is_done(self, stage: Stage) -> bool:
        """Finished with the current settings: its manifest carries the plan's fingerprint."""
        manifest = self.manifest(stage.name)
        return bool(manifest) and manifest.get("fingerprint") == stage.fingerprint
