"""Kopf handlers of `BacktranslationRun`: one daemon per run that reconciles, and deletion.

    kopf run -m humpback_operator.backtranslationrun --standalone --all-namespaces

Importing this module registers the operator's handlers. Kopf watches the runs; the operator's own
watches (`child_events.ChildWatches`) keep the children in memory. What the handlers share lives on
one `Operator` object, made at startup and kept in Kopf's operator-wide memo (each resource's memo
is a shallow copy of it).

The daemon loops: read the run, decide (`reconcile.decide`), apply, then sleep until a child or
the run changes, a retry is due, or a minute has passed. All state is in the run's status and in
its children, so a restarted operator picks up where the last one stopped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import kopf

from humpback_runtime.spec import GROUP, PLURAL, VERSION, SpecError

from humpback_operator import child_events, metrics, policy
from humpback_operator.children import ANNOTATION_GENERATED_KEY, WORKLOAD_KINDS, shared_claims
from humpback_operator.config import OperatorConfig
from humpback_operator.kube import ApiError, Kube
from humpback_operator.reconcile import (
    PROGRESS_SECONDS,
    Decision,
    _finished_and_unchanged,
    decide,
    run_and_plan,
    spec_json,
)
from humpback_operator.store_probe import StoreProbe

log = logging.getLogger(__name__)

# Children change in bursts (a Job's pods, conditions); wait this long after a wake-up so one
# reconcile sees them all.
DEBOUNCE_SECONDS = 0.1


# How long Kopf keeps an idle object's worker (see `configure`).
WORKER_IDLE_SECONDS = 1.0

# The cyclic garbage collector's thresholds (`tune_garbage_collector`): a young collection every
# 10,000 new container objects, not Python's 700.
GC_THRESHOLDS = (10_000, 10, 10)

ENV_PEERING_PRIORITY = "HUMPBACK_PEERING_PRIORITY"
ENV_PEERING_LIFETIME = "HUMPBACK_PEERING_LIFETIME"
ENV_PEERING_NAMESPACES = "HUMPBACK_PEERING_NAMESPACES"  # watching some namespaces: where the KopfPeerings go

# How long our own creates and deletes stand in for what the watches have not shown yet.
RECENT_SECONDS = 30.0

# Every so often a run's reconcile lists its children from the API instead of trusting the
# indexes: the watches list again after a gap, but an index that missed a change some other way
# (a watch stuck without an error) heals too. Only runs that are not finished have a daemon, so
# this costs a few lists per active run.
SAFETY_NET_SECONDS = float(os.environ.get("HUMPBACK_SAFETY_NET_SECONDS", "300"))


RUN_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")


class Operator:
    """What the handlers share: API access, settings, the store probe, and per run (keyed by
    (namespace, run)) what this operator process remembers of it."""

    def __init__(self, kube: Kube | None = None, config: OperatorConfig | None = None):
        self.kube = kube or Kube()
        self.config = config or OperatorConfig.from_env()
        self.probe = StoreProbe(self.config)
        self.watches = child_events.ChildWatches(self, self.kube)
        # Our recent writes: (kind, name) -> (time, what the index will hold of the object created
        # (child_events.snapshot) | None when deleted). Under load the indexes lag by many
        # seconds: whole objects (a Job's pod template) kept meanwhile were ~12 MB at 1,000 runs.
        self.recent: dict[tuple[str, str], dict[tuple[str, str], tuple[float, dict | None]]] = {}
        # resourceVersion of the run's last status patch by this operator: the watch event it
        # causes carries nothing new, so it need not wake the daemon again.
        self.own_versions: dict[tuple[str, str], str] = {}
        # The status patch on its way (the generation it was decided on, the status sent): under
        # load its watch event often comes before its answer, when own_versions does not know it yet.
        self.patching: dict[tuple[str, str], tuple[Any, dict]] = {}
        # What that patch made of the run (its resourceVersion and status), and the resourceVersion
        # of the body it was decided on: while Kopf still shows that older body, the next reconcile
        # uses it with the patched status instead of asking the API (one GET fewer in the path from
        # a child's end to the next). Only the status is kept, as JSON text (a third of its size
        # parsed: ~15 MB at 1,000 runs while Kopf lags): Kopf keeps the rest.
        self.patched: dict[tuple[str, str], tuple[str | None, str, str]] = {}
        # The run's phase after its last reconcile, and how many runs are in each, for the
        # `humpback_runs` gauge (counted as phases change: a sum over all runs per reconcile grew
        # with the number of runs).
        self.phases: dict[tuple[str, str], str] = {}
        self.phase_counts = collections.Counter({phase: 0 for phase in RUN_PHASES})
        for phase in RUN_PHASES:  # every phase shows, at 0 until a run is in it
            metrics.RUNS.labels(phase).set(0)
        # Set when the run or one of its children changes: wakes the run's daemon.
        self.wakeups: dict[tuple[str, str], asyncio.Event] = {}
        # When each run's children were last listed from the API (the safety net), and what the
        # indexes still hold that the API said was gone: (kind, name, uid).
        self.listed: dict[tuple[str, str], float] = {}
        self.ghosts: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
        # The running stages' _PROGRESS.json as last read, and when: read at most every PROGRESS_SECONDS.
        self.progress: dict[tuple[str, str], tuple[float, dict[str, dict]]] = {}

    def wakeup(self, namespace: str, run: str) -> asyncio.Event:
        return self.wakeups.setdefault((namespace, run), asyncio.Event())

    def forget(self, namespace: str, run: str) -> None:
        """Drop all that is remembered of a deleted run."""
        self.set_phase(namespace, run, None)
        for per_run in (self.recent, self.own_versions, self.patching, self.patched, self.wakeups,
                        self.listed, self.ghosts, self.progress):
            per_run.pop((namespace, run), None)

    def set_phase(self, namespace: str, run: str, phase: str | None) -> None:
        """The run's phase after a reconcile (None: the run is gone), counted for `humpback_runs`."""
        old = self.phases.pop((namespace, run), None) if phase is None else self.phases.get((namespace, run))
        if phase is not None:
            self.phases[(namespace, run)] = phase
        if old == phase:
            return
        for changed, by in ((old, -1), (phase, 1)):
            if changed is not None:
                self.phase_counts[changed] += by
                metrics.RUNS.labels(changed).set(self.phase_counts[changed])

    def rest(self, namespace: str, run: str) -> None:
        """Drop what only a running daemon needs (a finished run keeps nothing large in memory)."""
        for per_run in (self.recent, self.patched, self.listed, self.ghosts, self.progress):
            per_run.pop((namespace, run), None)

    def note(self, namespace: str, run: str, kind: str, name: str, obj: Mapping[str, Any] | None) -> Any:
        """Remember our create (`obj`) or delete (None) of a child; returns what was noted before."""
        kept = None if obj is None else child_events.snapshot(obj)
        per_run = self.recent.setdefault((namespace, run), {})
        before = per_run.get((kind, name))
        per_run[(kind, name)] = (time.monotonic(), kept)
        return before

    def unnote(self, namespace: str, run: str, kind: str, name: str, before: Any) -> None:
        """Take back a note made in advance of a write that did not happen (`before`: note's answer)."""
        per_run = self.recent.setdefault((namespace, run), {})
        if before is None:
            per_run.pop((kind, name), None)
        else:
            per_run[(kind, name)] = before

    def own_echo(self, namespace: str, run: str, body: Mapping[str, Any]) -> bool:
        """Whether `body` is what our last status patch made of the run (nothing new to decide on):
        its resourceVersion, or, while the patch's answer is still on its way, the status sent on
        the generation it was decided on (a spec edit in between is a new generation)."""
        meta = body.get("metadata") or {}
        if meta.get("resourceVersion") == self.own_versions.get((namespace, run)):
            return True
        generation, status = self.patching.get((namespace, run), (None, None))
        if status is None or meta.get("generation") != generation:
            return False
        current = body.get("status") or {}
        return all(current.get(key) == value for key, value in status.items())

    def remember_patch(self, namespace: str, run: str, based_on: str | None, patched: Mapping[str, Any]) -> None:
        """Our status patch of the run, decided on version `based_on`, made `patched` (the answer)."""
        version = (patched.get("metadata") or {}).get("resourceVersion")
        self.own_versions[(namespace, run)] = version
        self.patched[(namespace, run)] = (based_on, version, json.dumps(patched.get("status") or {}))

    def children(self, namespace: str, run: str) -> list[dict]:
        """The indexes' view, corrected by our own writes they have not caught up with: a reconcile
        right after a create must not create again (a 409 and a duplicate Event), nor act on a
        child it has just deleted."""
        seen = child_events.children_of(self.watches.indexes, namespace, run)
        ghosts = self.ghosts.get((namespace, run))
        if ghosts:
            ghosts &= {_identity(o) for o in seen}  # those gone from the index need no filter
            seen = [o for o in seen if _identity(o) not in ghosts]
        recent = self.recent.get((namespace, run))
        if not recent:
            return seen
        now = time.monotonic()
        by_key = {(o["kind"], o["metadata"]["name"]): o for o in seen}
        for key, (when, obj) in list(recent.items()):
            if now - when > RECENT_SECONDS:
                del recent[key]
            elif obj is not None and key not in by_key:
                by_key[key] = obj
            elif obj is None and key in by_key:
                gone = dict(by_key[key])
                gone["metadata"] = {**gone["metadata"], "deletionTimestamp": "deleting"}
                by_key[key] = gone
            elif obj is None or key in by_key:
                del recent[key]  # the index caught up
        return list(by_key.values())


    async def safety_net(self, namespace: str, run: str) -> None:
        """Every SAFETY_NET_SECONDS: list the run's children from the API; what the indexes hold
        and the API does not is a ghost from then on, what the API has and the indexes miss
        stands in as a recent create."""
        now = time.monotonic()
        key = (namespace, run)
        if now - self.listed.setdefault(key, now) < SAFETY_NET_SECONDS:
            return
        self.listed[key] = now
        listed = await self.kube.list_children(namespace, run, self.watches.child_kinds())
        indexed = child_events.children_of(self.watches.indexes, namespace, run)
        self.ghosts[key] = {_identity(o) for o in indexed} - {_identity(o) for o in listed}
        known = {(o["kind"], o["metadata"]["name"]) for o in indexed}
        for obj in listed:
            if (obj["kind"], obj["metadata"]["name"]) not in known:
                self.note(namespace, run, obj["kind"], obj["metadata"]["name"], obj)


def _identity(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return obj.get("kind", ""), meta.get("name", ""), meta.get("uid") or ""


def _active(body: kopf.Body, **_: Any) -> bool:
    """A run that still has work (or a spec not yet seen) gets a daemon; a finished one costs
    nothing, and a spec edit (a new generation) brings its daemon back."""
    return not _finished_and_unchanged(body.get("status") or {}, body.get("metadata", {}).get("generation"))


class RunEssenceStorage(kopf.AnnotationsDiffBaseStorage):
    """Kopf's diff base in annotations, built for less. Kopf builds the "essence" of every run by
    deep-copying the whole body and then dropping the status, most of a run's body. So a run's is
    built without its status and shares the body's spec (Kopf replaces a body whole on each event,
    never in place; the essence is only read, and `RunProgressStorage.clear` changes its metadata
    alone). Under load (100 runs) that copying was about a quarter of the operator's CPU."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:  # a handler that follows status fields (none of ours does): kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        essence = super().build(body=kopf.Body({k: v for k, v in body.items() if k not in ("status", "spec")}))
        if "spec" in body:
            essence["spec"] = body["spec"]
        return essence


class RunProgressStorage(kopf.AnnotationsProgressStorage):
    """Kopf's progress storage in annotations, whose `clear` (Kopf's handler records taken out of an
    essence before comparing) deep-copies the essence first. The essences it gets are new on each
    event (`RunEssenceStorage.build`, or parsed from the diff-base annotation): copying their
    metadata, the only part changed here, is enough."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        essence = kopf.BodyEssence(**essence)
        if isinstance(essence.get("metadata"), dict):
            essence["metadata"] = dict(essence["metadata"])
        annotations = essence.get("metadata", {}).get("annotations", {})
        self.remove_annotations(essence, {key for key in annotations if self.prefix and key.startswith(f"{self.prefix}/")})
        self.remove_empty_stanzas(essence)
        return essence


def tune_garbage_collector() -> None:
    """The operator keeps thousands of parsed objects (Kopf's bodies, the indexes) and parses a
    stream of JSON: with Python's defaults, collecting cycles among them was ~20 % of its CPU at
    1,000 runs, with pauses up to 0.8 s (bench/operator_scale.py). What startup made (modules,
    Kopf's registries) is frozen, never scanned again; collections come less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The CRD's status schema has no `kopf` field: Kopf's bookkeeping goes into annotations.
    settings.persistence.progress_storage = RunProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = RunEssenceStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Events are posted explicitly (reconcile.Event); log lines become Events only from warnings up.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 270
    # Kopf keeps a worker per object for this long after its last event (default 5 s), holding
    # that event's whole body: at 1,000 runs the operator's peak RSS was ~20 MB higher with 5 s.
    settings.batching.idle_timeout = WORKER_IDLE_SECONDS
    # API calls go out on Kube's own connections; store reads (and anything else in threads) run in
    # the default thread pool, made larger: the default (cores + 4) would queue the reads of many runs.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    # Replicas (`kopf run --peering=NAME`): the highest priority acts, the others wait; equal
    # priorities would freeze all of them, so each process draws its own unless one is given.
    settings.peering.priority = int(os.environ.get(ENV_PEERING_PRIORITY) or secrets.randbelow(2**31 - 1) + 1)
    settings.peering.lifetime = int(os.environ.get(ENV_PEERING_LIFETIME) or settings.peering.lifetime)
    # Kopf watches nothing before the startup handlers are done, so every handler finds it.
    memo.operator = op = Operator()
    # `kopf run --all-namespaces`: the children are watched across the cluster too (one stream per kind).
    op.watches.clusterwide = settings.peering.clusterwide
    tune_garbage_collector()
    if not settings.peering.standalone and settings.peering.name:
        namespaces = [None] if settings.peering.clusterwide else os.environ.get(ENV_PEERING_NAMESPACES, "").split()
        for namespace in namespaces:
            await op.kube.ensure_peering(settings.peering.name, namespace)
    metrics.serve_from_env()


@kopf.on.cleanup()
async def close_connections(memo: kopf.Memo, **_: Any) -> None:
    op: Operator | None = getattr(memo, "operator", None)
    if op is not None:
        await op.watches.stop()
        await op.kube.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_changed(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    op: Operator = memo.operator
    if op.own_echo(namespace, name, body):
        return
    op.wakeup(namespace, name).set()


# Stopped (a finished run), the daemon is told first and leaves on its own within the backoff;
# only one stuck in an API call is cancelled.
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=2.0, cancellation_timeout=5.0, when=_active)
async def run_daemon(namespace: str, name: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                     logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    op: Operator = memo.operator
    wake = op.wakeup(namespace, name)
    metrics.DAEMONS.inc()
    try:
        await op.watches.ready(namespace)
        while not stopped:
            wake.clear()
            try:
                delay = await reconcile_once(op, namespace, name, body, logger)
            except ApiError as e:
                logger.warning("Reconciling run %s/%s failed: %s; trying again in 10s", namespace, name, e)
                delay = 10.0
            if delay is None:  # the run is gone
                return
            await _sleep(wake, stopped, max(min(delay, SAFETY_NET_SECONDS), DEBOUNCE_SECONDS))
            if wake.is_set():
                await asyncio.sleep(DEBOUNCE_SECONDS)
    finally:
        metrics.DAEMONS.dec()
        op.rest(namespace, name)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until the run or a child changes, Kopf stops the daemon (the run finished: `_active`), or
    `seconds` have passed. Leaving at once when stopped spares Kopf's cancellation (and its warning
    for every finished run)."""
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


async def reconcile_once(op: Operator, namespace: str, name: str, live: Mapping[str, Any] | None,
                         logger: logging.Logger) -> float | None:
    """One round for the run (`live`: Kopf's view of it); returns when to look again (None: it is gone)."""
    body = _current_body(op, live, namespace, name)
    if body is None:  # the watch has not shown us our own last status patch yet: ask the API
        body = await op.kube.get_run(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    metrics.RECONCILES.inc()
    started = time.monotonic()
    await op.safety_net(namespace, name)
    children = op.children(namespace, name)
    pods = child_events.pods_of(op.watches.indexes, namespace, name)
    events = child_events.events_of(op.watches.indexes, namespace, [c["metadata"]["name"] for c in children])
    now = datetime.now(timezone.utc)
    spec_text = spec_json(body)  # once: the caches of run_and_plan and the spec ConfigMap key on it
    store = _store_unread(op, body, spec_text, logger)
    secret_labels, claim_modes = await named_objects(op, body, spec_text)
    progress = await _stage_progress(op, body, logger)
    decision = decide(body, children, store, now, op.config, pods, events, secret_labels=secret_labels,
                      claim_modes=claim_modes, progress=progress, spec_text=spec_text)
    for _round in range(3):  # stages about to start: read their _SUCCESS.json, then decide again
        if not decision.needs_store:
            break
        store.update(await op.probe.read(body, decision.needs_store, logger))
        decision = decide(body, children, store, now, op.config, pods, events, secret_labels=secret_labels,
                          claim_modes=claim_modes, progress=progress, spec_text=spec_text)
    await apply(op, body, decision, logger)
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    op.set_phase(namespace, name, decision.status.get("phase", "Pending"))
    return decision.requeue_after


def _store_unread(op: Operator, body: Mapping[str, Any], spec_text: str, logger: logging.Logger) -> dict[str, dict | None]:
    """What decide() knows of the store before any read: nothing, or, where the probe may not read
    this run's store, that no stage is known done (each stage checks for itself), so that a stage
    about to start needs no second decision after a read that would not happen."""
    if op.probe.reads(body, logger):
        return {}
    try:
        _run, plan = run_and_plan(body, spec_text)
    except SpecError:
        return {}
    return dict.fromkeys((stage.name for stage in plan.stages), None)


async def named_objects(op: Operator, body: Mapping[str, Any],
                        spec_text: str | None = None) -> tuple[dict[str, dict | None], dict[str, list[str] | None]]:
    """What decide() must know of objects the spec names and the operator does not own: the labels
    of the Secrets the run references, when the policy checks them, and the access modes of the
    claims its training pods share across nodes (most runs: neither, no read)."""
    try:
        run, _plan = run_and_plan(body, spec_text)  # parsed once per spec, as decide() parses it
    except SpecError:
        return {}, {}
    namespace = body["metadata"]["namespace"]
    labels = {name: await op.kube.secret_labels(namespace, name) for name in policy.needs_secret_labels(run, op.config)}
    modes = {name: await op.kube.claim_access_modes(namespace, name) for name in shared_claims(run)}
    return labels, modes


async def _stage_progress(op: Operator, body: Mapping[str, Any], logger: logging.Logger) -> dict[str, dict]:
    """The running stages' progress files, read again only when the last read is PROGRESS_SECONDS old."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    running = [s["name"] for s in (body.get("status") or {}).get("stages") or []
               if s.get("phase") == "Running" and "name" in s]
    when, cached = op.progress.get(key, (float("-inf"), {}))
    if not running or time.monotonic() - when < PROGRESS_SECONDS:
        return {k: v for k, v in cached.items() if k in running}
    read = await op.probe.read_progress(body, running, logger)
    op.progress[key] = (time.monotonic(), read)
    return read


def _current_body(op: Operator, live: Mapping[str, Any] | None, namespace: str, name: str) -> dict | None:
    """Kopf's live view of the run, when it is known to include our last status patch (so a
    decision never rests on a status older than what we wrote); while Kopf still shows the body
    that patch was decided on, that body with the patched status (nothing else changed the run in
    between); None means: read it from the API. A snapshot without copying: Kopf swaps in each new body whole
    (its live view is replaced, never changed in place), and no decision changes the body it reads."""
    if live is None:
        return None
    own = op.own_versions.get((namespace, name))
    version = live.get("metadata", {}).get("resourceVersion")
    if own is not None and version != own:
        based_on, patched_version, status = op.patched.get((namespace, name), (None, None, None))
        if status is None or version is None or version != based_on:
            return None
        return {**live, "metadata": {**live["metadata"], "resourceVersion": patched_version}, "status": json.loads(status)}
    op.patched.pop((namespace, name), None)  # Kopf has caught up: the copy is not needed any more
    return dict(live)


async def apply(op: Operator, body: Mapping[str, Any], decision: Decision, logger: logging.Logger) -> None:
    namespace = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    errors: list[str] = []
    existed: set[str] = set()
    for obj in decision.update:
        await op.kube.replace_data(obj)
    # All at once: a finished stage's server is four objects, and the next stage's child (created
    # below, after them: a server may be deleted and made again under its name) waited for each.
    refs = list(dict.fromkeys(decision.delete))  # a stale server may be listed twice (stale, and stage over)
    for ref in refs:
        op.note(namespace, name, ref.kind, ref.name, None)
    deleted = await asyncio.gather(*(op.kube.delete(ref.api_version, ref.kind, namespace, ref.name) for ref in refs))
    for ref, done in zip(refs, deleted, strict=True):
        if done:
            logger.info("Deleted %s %s of run %s", ref.kind, ref.name, name)
    # Concurrently, in two rounds: what the workloads refer to (the spec ConfigMap, a server's key
    # Secret, NetworkPolicy and Service), then the workloads; one after the other, each create
    # waited its turn among every other run's calls (the API connections are shared).
    supporting = [obj for obj in decision.create if obj["kind"] not in WORKLOAD_KINDS]
    workloads = [obj for obj in decision.create if obj["kind"] in WORKLOAD_KINDS]
    for tier in (supporting, workloads):
        # Noted first: the watch may show a child before its create returns (child_events).
        before = [op.note(namespace, name, obj["kind"], obj["metadata"]["name"], obj) for obj in tier]
        outcomes = await asyncio.gather(*(op.kube.create(with_generated_key(obj)) for obj in tier),
                                        return_exceptions=True)
        for obj, outcome, noted in zip(tier, outcomes, before, strict=True):
            kind, child = obj["kind"], obj["metadata"]["name"]
            if isinstance(outcome, BaseException):
                op.unnote(namespace, name, kind, child, noted)
                if not isinstance(outcome, ApiError):
                    raise outcome
                # Kept in status and as an Event; the next reconcile tries again.
                message = f"could not create {kind} {child}: {outcome}"
                errors.append(message)
                kopf.event(body, type="Warning", reason="CreateFailed", message=message)
                continue
            if outcome:
                metrics.CHILDREN_CREATED.labels(kind).inc()
                logger.info("Created %s %s for run %s", kind, child, name)
            else:
                existed.add(child)
    status = dict(decision.status)
    if errors:
        status["message"] = "; ".join(errors)
        decision.requeue_after = min(decision.requeue_after, 30.0)
    if _changed(body.get("status") or {}, status):
        metrics.observe_stages((body.get("status") or {}).get("stages"), status.get("stages"))
        op.patching[(namespace, name)] = (body["metadata"].get("generation"), status)
        try:
            patched = await op.kube.patch_run_status(namespace, name, status)
        finally:
            op.patching.pop((namespace, name), None)
        if patched:
            op.remember_patch(namespace, name, body["metadata"].get("resourceVersion"), patched)
        else:
            op.own_versions[(namespace, name)] = None
    for event in decision.events:
        if event.child in existed:  # not ours to announce: it was there already
            continue
        metrics.EVENTS.labels(event.reason).inc()
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def with_generated_key(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """A Secret the builders mark with `humpback.dev/generated-key: KEY` gets a new random value
    under KEY (a vLLM server's API key). Only here: the builders stay pure and nothing logs it."""
    key = (obj["metadata"].get("annotations") or {}).get(ANNOTATION_GENERATED_KEY)
    if obj["kind"] != "Secret" or not key:
        return obj
    return {**obj, "stringData": {key: secrets.token_urlsafe(32)}}


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def run_deleted(namespace: str, name: str, logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    """Delete the children now (GPUs free at once; ownerReferences are the backstop), then let go."""
    op: Operator = memo.operator
    started = time.monotonic()
    await op.watches.ready(namespace)
    for obj in child_events.children_of(op.watches.indexes, namespace, name):
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            await op.kube.delete(obj["apiVersion"], obj["kind"], namespace, meta["name"])
        except ApiError as e:  # never hold the run's deletion hostage: the garbage collector follows
            logger.warning("Could not delete %s %s of run %s: %s", obj["kind"], meta["name"], name, e)
    op.forget(namespace, name)
    logger.info("Deleted the children of run %s/%s in %.2fs", namespace, name, time.monotonic() - started)
