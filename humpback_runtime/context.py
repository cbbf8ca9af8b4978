"""Where a run's artifacts live and which stages are finished, shared by the stages and runners.

Layout (:mod:`humpback_runtime.layout`): `<storage uri>/<namespace>/<run name>/<stage>/…`, each
finished stage closed by a `_SUCCESS.json` that carries its fingerprint.

Content fingerprints: a context made with `identify_inputs=True` (the local runner, `humpback plan`,
`humpback stage` with a run file) computes the identity of every data file the spec names and puts
it into the plan, so an edited file re-runs the stages it feeds. The operator and its pods plan from
the spec alone (`identify_inputs=False`): the operator never reads tenant data, and a pod must write
the fingerprint the operator waits for. A pod still records the identities it read in its manifest
(`inputIdentities`), and `humpback plan --spec-only` reads such a store as the operator does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from humpback_runtime import prompts
from humpback_runtime.layout import run_prefix, stage_prefix
from humpback_runtime.plan import Plan, Stage, build_plan, stage_sources
from humpback_runtime.spec import BacktranslationRun
from humpback_runtime.storage import Store, iter_shard_records, open_store, output_shards, read_success


@dataclass
class RunContext:
    run: BacktranslationRun
    storage_uri: str  # the spec's storage.uri unless overridden on the command line
    identify_inputs: bool = True  # content fingerprints (see the module docstring)

    @classmethod
    def create(cls, run: BacktranslationRun, storage_uri: str | None = None, *,
               identify_inputs: bool = True) -> RunContext:
        # A relative store path in the spec is the run file's folder's; one on the command line the cwd's.
        return cls(run, storage_uri or run.local_path(run.spec.storage.uri), identify_inputs)

    @cached_property
    def input_identities(self) -> dict[str, str | None]:
        """The identity of every data file the run reads, keyed by the source as the spec writes it."""
        from humpback_runtime.sources import source_identity

        s3 = self.run.spec.storage.s3
        sources = {src for srcs in stage_sources(self.run).values() for src in srcs}
        return {src: source_identity(src, base_dir=self.run.base_dir, endpoint_url=s3.endpoint, region=s3.region)
                for src in sorted(sources)}

    @cached_property
    def plan(self) -> Plan:
        return build_plan(self.run, self.input_identities if self.identify_inputs else None)

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

    def model_system(self, train_stage: str) -> str:
        """The system text a stage puts before its task when it prompts the model of `train_stage`.

        The text the model was trained with (prompts.inference_system): the seed tag, which M0 saw on
        every example and Mk on every seed example. Myx (backward) is never prompted with a system text.
        """
        role = self.plan[train_stage].role
        if role not in ("seed", "forward"):
            raise ValueError(f"{train_stage} (role {role}) is not a forward model: it takes no system text")
        return prompts.inference_system(self.run.spec.system_prompts)

    def is_done(self, stage: Stage) -> bool:
        """Finished with the current settings: its manifest carries the plan's fingerprint."""
        manifest = self.manifest(stage.name)
        return bool(manifest) and manifest.get("fingerprint") == stage.fingerprint
