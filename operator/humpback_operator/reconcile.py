"""Pure decisions: what a run needs now, from what is observed.

`decide()` takes the run object as the API server has it (spec and status), its children as the
operator's watches see them, and what the store says about stages about to start, and returns the
children to create and delete, the new status, the Events to post and when to look again. It does
no I/O, so every behaviour of the operator (starting stages, retries, suspend, spec edits) is a
plain function call in the unit tests; `backtranslationrun.py` applies the decision.

Level-triggered: the same observation always gives the same decision, and applying a decision
twice is harmless (creates of existing names are 409s, deletes of missing objects are 404s), so a
restarted operator just decides again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from humpback_runtime import plan as plan_module
from humpback_runtime.plan import Plan, Stage, build_plan
from humpback_runtime.progress import format_line
from humpback_runtime.prompts import TEMPLATE_VERSION
from humpback_runtime.spec import BacktranslationRun, PodResources, SpecError, duration_seconds, parse_run

from humpback_operator import names, policy
from humpback_operator.backends import backend_of_kind
from humpback_operator.children import (
    SPEC_KEY,
    build_spec_configmap,
    build_stage_children,
    claim_problems,
    cluster_problems,
    content_digest,
    data_digests,
    job_outcome,
    owner_reference,
    server_state,
    spec_yaml,
    stage_primary_ref,
    stage_uri,
)
from humpback_operator.config import OperatorConfig
from humpback_operator.diagnosis import Problem, diagnose

DONE = ("Succeeded", "Skipped")
CONDITION_TYPES = ("Accepted", "Running", "Complete", "Failed", "Suspended")

# A server's API key Secret and NetworkPolicy: created with the server, never watched.
UNWATCHED_KINDS = ("Secret", "NetworkPolicy")

# Without news, look again after this long: a safety net for missed watch events.
RESYNC_SECONDS = 60.0
# While a stage runs, its progress (`_PROGRESS.json`) is read and copied into status at most this
# often: one store read and one status patch per run per period, however many runs there are.
PROGRESS_SECONDS = 30.0


@dataclass(frozen=True)
class Delete:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str
    child: str | None = None  # posted only if creating this child really created it (not a 409)


@dataclass
class Decision:
    create: list[dict] = field(default_factory=list)  # in order: ConfigMap, servers, then the Jobs that use them
    update: list[dict] = field(default_factory=list)  # objects to replace in place (the spec ConfigMap)
    delete: list[Delete] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    # Stages ready to start whose store state is unknown: read their _SUCCESS.json, decide again.
    needs_store: list[str] = field(default_factory=list)
    requeue_after: float = RESYNC_SECONDS


def _now_str(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def run_from_body(body: Mapping[str, Any]) -> BacktranslationRun:
    meta = body.get("metadata", {})
    data = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace", "default"),
            "labels": dict(meta.get("labels") or {}),
        },
        "spec": body.get("spec"),
    }
    return parse_run(data, f"{meta.get('namespace')}/{meta.get('name')}")


class _Children:
    """A run's children by name, their pods and the Warning Events on them, with the helpers
    decide() asks of them."""

    def __init__(self, objects: list[Mapping[str, Any]], pods: list[Mapping[str, Any]] = (),
                 events: list[Mapping[str, Any]] = ()):
        self.by_name: dict[tuple[str, str], Mapping[str, Any]] = {}
        for obj in objects:
            self.by_name[(obj.get("kind", ""), obj["metadata"]["name"])] = obj
        self.pods = list(pods)
        self.events: dict[str, list[Mapping[str, Any]]] = {}
        for event in events:
            self.events.setdefault((event.get("involvedObject") or {}).get("name", ""), []).append(event)

    def pods_of(self, stage: str, **labels: str) -> list[Mapping[str, Any]]:
        """Pods of `stage` with the given humpback.dev/<key> labels (attempt, component, model)."""
        want = {names.LABEL_STAGE: stage, **{f"humpback.dev/{k}": v for k, v in labels.items()}}
        return [p for p in self.pods if want.items() <= (p["metadata"].get("labels") or {}).items()]

    def events_of(self, name: str) -> list[Mapping[str, Any]]:
        return self.events.get(name, [])

    def get(self, kind: str, name: str) -> Mapping[str, Any] | None:
        return self.by_name.get((kind, name))

    def of_stage(self, stage: str) -> list[Mapping[str, Any]]:
        return [o for o in self.by_name.values() if o["metadata"].get("labels", {}).get(names.LABEL_STAGE) == stage]


def _ref(obj: Mapping[str, Any]) -> dict[str, str]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"]}


def _is_terminating(obj: Mapping[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def _outcome(obj: Mapping[str, Any], config: OperatorConfig) -> tuple[str | None, str]:
    if obj["kind"] == "Job":
        return job_outcome(obj)
    backend = backend_of_kind(obj["kind"])
    return backend.outcome(obj) if backend else (None, "")  # servers, Secrets, ...: no outcome


def _is_finished(obj: Mapping[str, Any], config: OperatorConfig) -> bool:
    if obj["kind"] in ("Deployment", "Service", "ConfigMap"):
        return False
    return _outcome(obj, config)[0] is not None


def decide(
    body: Mapping[str, Any],
    children: list[Mapping[str, Any]],
    store: Mapping[str, dict | None],
    now: datetime,
    config: OperatorConfig,
    pods: list[Mapping[str, Any]] = (),
    events: list[Mapping[str, Any]] = (),
    *,
    secret_labels: Mapping[str, Mapping[str, str] | None] | None = None,
    claim_modes: Mapping[str, list[str] | None] | None = None,
    progress: Mapping[str, Mapping[str, Any]] | None = None,
    spec_text: str | None = None,
) -> Decision:
    """The decision for one run. `store` maps stage name -> its `_SUCCESS.json` (None: not done)
    for the stages the caller has read; a stage missing from it is reported in `needs_store`.
    `pods` are the pods of the run's children, `events` the Warning Events on its children.
    `secret_labels`: labels of the Secrets the run references (None: no such Secret), when the
    policy checks them (`policy.needs_secret_labels`). `claim_modes`: access modes of the claims
    the training pods share across nodes (`children.shared_claims`; None: no such claim).
    `progress` maps running stages to their `_PROGRESS.json` as last read (see PROGRESS_SECONDS);
    a stage missing from it keeps the progress its status already shows. `spec_text`:
    `spec_json(body)`, when the caller has made it already."""
    d = Decision()
    spec_text = spec_text if spec_text is not None else spec_json(body)
    old_status = dict(body.get("status") or {})
    generation = body.get("metadata", {}).get("generation")
    try:
        run, plan = run_and_plan(body, spec_text)
        problems = cluster_problems(run, config) + claim_problems(run, claim_modes or {})
    except SpecError as e:
        problems = e.errors
        run = None
    if problems:
        return _invalid(d, old_status, generation, problems, now)
    refused = policy.violations(run, config, secret_labels)
    if refused:
        return _invalid(d, old_status, generation, refused, now, reason="PolicyViolation")

    if _finished_and_unchanged(old_status, generation):
        # A finished run stays finished: an operator upgrade that changes fingerprints (new code
        # versions, new defaults) must not start it again. Editing the spec does.
        d.status = old_status
        return d

    kids = _Children(children, pods, events)
    owner = owner_reference(body)
    old_stages = {s["name"]: s for s in old_status.get("stages") or [] if "name" in s}
    # An operator upgrade may compute a stage's fingerprint differently (new code versions): a
    # running attempt keeps its child, its fingerprint and its fingerprint version unless the user
    # changed the spec; the next attempt uses the new ones.
    plan.stages = [_in_flight(stage, old_stages.get(stage.name), old_status, generation, run.name, kids)
                   for stage in plan.stages]

    existing_cm = kids.get("ConfigMap", names.spec_configmap_name(run.name))
    if existing_cm is None or data_digests(existing_cm) != _spec_digests(run, body, spec_text):
        (d.create if existing_cm is None else d.update).append(build_spec_configmap(run, owner))

    # Children of settings that no longer exist (a spec edit) are replaced: delete the active ones.
    current = {s.name: s.fingerprint for s in plan.stages}
    for obj in children:
        labels = obj["metadata"].get("labels", {})
        stage_name = labels.get(names.LABEL_STAGE)
        if stage_name is None or _is_terminating(obj):
            continue
        fp = obj["metadata"].get("annotations", {}).get(names.ANNOTATION_FINGERPRINT)
        if current.get(stage_name) != fp and not _is_finished(obj, config):
            d.delete.append(Delete(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]))

    suspended = run.spec.suspend
    # A stage that failed for good (with today's settings and retry limit) stops new starts anywhere.
    limit = run.spec.retries.limit
    failed_before = any(s.get("fingerprint") == current.get(name) and _failed_for_good(s, limit)
                        for name, s in old_stages.items())
    failed_stage: str | None = None
    states: dict[str, dict[str, Any]] = {}
    for stage in plan.stages:
        st = _stage_state(d, run, plan, stage, old_stages.get(stage.name), states, kids, store, now, config,
                          owner, suspended=suspended, blocked=failed_before or failed_stage is not None)
        states[stage.name] = st
        if st["phase"] == "Failed" and failed_stage is None:
            failed_stage = stage.name

    _copy_progress(d, states, progress or {})
    if d.needs_store:  # the caller reads the store and decides again; apply nothing yet
        d.create.clear()
        d.update.clear()
        d.delete.clear()
        d.events.clear()
    d.status = _run_status(run, plan, states, old_status, generation, suspended, failed_stage, now, d)
    return d


def _copy_progress(d: Decision, states: dict[str, dict[str, Any]], progress: Mapping[str, Mapping[str, Any]]) -> None:
    """Running stages whose own process reports (not a stage waiting for its server) show its progress."""
    for name, st in states.items():
        child = st.get("child") or {}
        if st["phase"] != "Running" or child.get("kind") in ("Deployment", "Service"):
            st.pop("progress", None)
            continue
        snap = progress.get(name)
        if snap is not None and snap.get("state") == "running":
            st["progress"] = progress_status(snap)
        if "progress" in st:
            d.requeue_after = min(d.requeue_after, PROGRESS_SECONDS)


def progress_status(snap: Mapping[str, Any]) -> dict[str, Any]:
    """The CRD's `stages[].progress` from a `_PROGRESS.json`: the fields a person and kubectl need."""
    fields = {"phase": snap.get("phase"), "done": snap.get("done"), "total": snap.get("total"),
              "unit": snap.get("unit"), "rate": snap.get("rate"), "etaSeconds": snap.get("eta_seconds"),
              "tokensPerSecond": snap.get("tokens_per_second"), "lastError": snap.get("last_error"),
              "updated": snap.get("updated")}
    out = {k: v for k, v in fields.items() if v is not None}
    out["summary"] = format_line(snap).split(": ", 1)[-1]
    return out


def spec_json(body: Mapping[str, Any]) -> str:
    """The run's spec as canonical JSON: the part of the cache keys below that is costly to make, so
    a reconcile makes it once (for `named_objects` and both rounds of `decide`)."""
    return json.dumps(body.get("spec"), sort_keys=True, default=str)


def run_and_plan(body: Mapping[str, Any], spec_text: str | None = None) -> tuple[BacktranslationRun, Plan]:
    """The run parsed and planned, once per spec: both depend only on the spec, the run's identity
    and the code versions, and were most of a decision's CPU (bench/operator_scale.py). Raises
    SpecError for an invalid spec. The plan is a copy: decide() replaces its stages. `spec_text`:
    `spec_json(body)`, when the caller has it."""
    meta = body.get("metadata", {})
    head = json.dumps([body.get("apiVersion"), body.get("kind"), meta.get("namespace"), meta.get("name"),
                       meta.get("labels"), plan_module.STAGE_CODE_VERSIONS, plan_module.FINGERPRINT_ALGORITHM,
                       TEMPLATE_VERSION], sort_keys=True, default=str)
    run, plan = _planned(head + "\n" + (spec_text if spec_text is not None else spec_json(body)))
    return run, Plan(plan.run_name, plan.namespace, list(plan.stages))


# ~60 KB each (the parsed spec and its plan): 256 keep the operator's memory bounded at 1,000 runs.
@functools.lru_cache(maxsize=256)
def _planned(key: str) -> tuple[BacktranslationRun, Plan]:
    head, spec_text = key.split("\n", 1)  # compact JSON has no line breaks of its own
    api_version, kind, namespace, name, labels, *_versions = json.loads(head)
    spec = json.loads(spec_text)
    meta = {k: v for k, v in (("namespace", namespace), ("name", name), ("labels", labels)) if v is not None}
    run = run_from_body({"apiVersion": api_version, "kind": kind, "spec": spec, "metadata": meta})
    return run, build_plan(run)


_spec_digests_by_key: dict[bytes, dict[str, str]] = {}  # by a digest of the run's name and spec: one per active run


def _spec_digests(run: BacktranslationRun, body: Mapping[str, Any], spec_text: str) -> dict[str, str]:
    """The spec ConfigMap's data as `data_digests` gives it, made once per spec: YAML-dumping the spec
    on every reconcile of every run was the operator's largest CPU cost under load, and keeping the
    ConfigMaps themselves ~11 MB at 1,000 runs (bench/operator_scale.py)."""
    meta = body.get("metadata", {})
    key = hashlib.sha256(f"{meta.get('namespace')}/{meta.get('name')}\n{spec_text}".encode()).digest()
    if key not in _spec_digests_by_key:
        if len(_spec_digests_by_key) >= 1024:
            _spec_digests_by_key.clear()
        _spec_digests_by_key[key] = {SPEC_KEY: content_digest(spec_yaml(run))}
    return _spec_digests_by_key[key]


def _finished_and_unchanged(old: Mapping[str, Any], generation: Any) -> bool:
    return (old.get("phase") in ("Succeeded", "Failed")
            and old.get("observedGeneration") == generation
            and any(c.get("type") == "Accepted" and c.get("status") == "True" for c in old.get("conditions") or [])
            and not any(s.get("phase") == "Running" for s in old.get("stages") or []))


def _invalid(d: Decision, old: dict, generation: Any, problems: list[str], now: datetime,
             reason: str = "InvalidSpec") -> Decision:
    prefix = "refused by the operator's policy: " if reason == "PolicyViolation" else "invalid spec: "
    message = prefix + "; ".join(problems)
    conditions = {c["type"]: c for c in old.get("conditions") or []}
    accepted = conditions.get("Accepted")
    if not accepted or accepted.get("status") != "False" or accepted.get("message") != message:
        d.events.append(Event("Warning", reason, message))
    d.status = {
        **{k: v for k, v in old.items() if k in ("stages", "progress")},
        "observedGeneration": generation,
        "phase": "Failed",
        "stage": "",
        "message": message,
        "conditions": _conditions(old, now, generation, {
            "Accepted": ("False", reason, message),
            "Running": ("False", reason, "the spec must be fixed first"),
            "Complete": ("False", reason, ""),
            "Failed": ("True", reason, message),
            "Suspended": ("False", reason, ""),
        }),
    }
    d.requeue_after = RESYNC_SECONDS
    return d


def _in_flight(stage: Stage, old: Mapping[str, Any] | None, old_status: Mapping[str, Any], generation: Any,
               run_name: str, kids: _Children) -> Stage:
    """`stage` with the fingerprint and fingerprint version its running attempt was started with,
    when only the operator (not the spec: same metadata.generation) computes them differently now;
    else `stage` as planned. Only the attempt that is running keeps them: once it has ended
    (succeeded, failed, disrupted) the stage meets the new fingerprint, and its next attempt uses it."""
    if not old or old.get("phase") != "Running" or not old.get("fingerprint") or old["fingerprint"] == stage.fingerprint:
        return stage
    if generation is None or old_status.get("observedGeneration") != generation or not old.get("child"):
        return stage
    kept = dataclasses.replace(stage, fingerprint=old["fingerprint"], fingerprint_version=old.get("fingerprintVersion", ""))
    child = old["child"]
    if child.get("kind") == "Deployment":  # its servers are starting: they are the attempt so far
        server = kids.get("Deployment", child.get("name", ""))
        running = server is not None and not _is_terminating(server)
    else:  # the current attempt's Job or PyTorchJob, not the child of an attempt that has ended
        running = child.get("name") == names.stage_child_name(run_name, kept, int(old.get("attempt") or 0))
    return kept if running else stage


def _uncounted(st: Mapping[str, Any]) -> int:
    """Attempts that do not count against retries.limit: disrupted ones, those that found an input
    damaged, and those of an earlier run of the stage (before a consumer sent it back)."""
    return sum(int(st.get(key) or 0) for key in ("disruptions", "inputRechecks", "attemptsBefore"))


def _counted(st: Mapping[str, Any]) -> int:
    """Attempts that count against retries.limit."""
    return int(st.get("attempt") or 0) - _uncounted(st)


def _failed_for_good(st: Mapping[str, Any], limit: int) -> bool:
    return st.get("phase") == "Failed" and (_counted(st) > limit or st.get("reason") == "InvalidInput")


def _resources_of(run: BacktranslationRun, stage: Stage) -> PodResources:
    """The resources block whose deadlines apply to `stage` (training, inference or cpu)."""
    res = run.spec.resources
    return {"train": res.training, "inference": res.inference}.get(stage.kind, res.cpu)


def _stage_state(d: Decision, run: BacktranslationRun, plan: Plan, stage: Stage, old: dict | None,
                 states: dict[str, dict[str, Any]], kids: _Children, store: Mapping[str, dict | None],
                 now: datetime, config: OperatorConfig, owner: dict, *, suspended: bool, blocked: bool) -> dict[str, Any]:
    st: dict[str, Any] = dict(old) if old else {"name": stage.name, "phase": "Pending", "attempt": 0}
    if st.get("fingerprint") != stage.fingerprint:
        if old and old.get("fingerprint") and old.get("phase") != "Pending":
            was = old.get("fingerprintVersion")
            why = (f"this operator computes its fingerprint with version {stage.fingerprint_version} (was {was})"
                   if was and was != stage.fingerprint_version else "settings of the stage changed")
            d.events.append(Event("Normal", "StageReplanned", f"Stage {stage.name}: {why}: it will run again"))
        st = {"name": stage.name, "phase": "Pending", "attempt": 0, "fingerprint": stage.fingerprint}
        if stage.fingerprint_version:
            st["fingerprintVersion"] = stage.fingerprint_version

    def delete_servers() -> None:
        for obj in kids.of_stage(stage.name):
            if obj["kind"] in ("Deployment", "Service") and not _is_terminating(obj):
                d.delete.append(Delete(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]))
                if obj["kind"] == "Deployment":  # its key and NetworkPolicy (not watched: by name)
                    d.delete += [Delete("v1", "Secret", obj["metadata"]["name"]),
                                 Delete("networking.k8s.io/v1", "NetworkPolicy", obj["metadata"]["name"])]

    phase = st["phase"]
    limit = run.spec.retries.limit
    if phase in DONE or _failed_for_good(st, limit):
        delete_servers()
        return st

    deps_done = all(states[dep]["phase"] in DONE for dep in stage.deps)
    if not deps_done:
        st.update(phase="Pending", message=f"waiting for {', '.join(x for x in stage.deps if states[x]['phase'] not in DONE)}")
        return st

    if suspended:
        active = [o for o in kids.of_stage(stage.name)
                  if o["metadata"].get("annotations", {}).get(names.ANNOTATION_FINGERPRINT) == stage.fingerprint
                  and not _is_terminating(o) and not _is_finished(o, config)]
        for obj in active:
            d.delete.append(Delete(obj["apiVersion"], obj["kind"], obj["metadata"]["name"]))
        if phase == "Running":
            d.events.append(Event("Normal", "StageSuspended", f"Stage {stage.name} stopped: the run is suspended"))
            st.update(phase="Pending", message="suspended; continues when spec.suspend is false")
        return st

    attempt = int(st.get("attempt") or 0)
    if attempt == 0:
        if blocked:  # another stage failed for good: start nothing new
            st["message"] = "not started: the run has failed"
            return st
        if stage.name not in store:
            d.needs_store.append(stage.name)
            return st
        manifest = store[stage.name]
        if manifest and manifest.get("fingerprint") == stage.fingerprint:
            outputs = manifest.get("outputs") or {}
            st.update(phase="Skipped", completionTime=_now_str(now), outputs=[stage_uri(run, stage.name) + "/"],
                      message="already done in the store with the same settings; outputs reused"
                      + (f" ({outputs.get('count')} records)" if isinstance(outputs, dict) and outputs.get("count") is not None else ""))
            d.events.append(Event("Normal", "StageSkipped", f"Stage {stage.name} is already done in the store: skipped"))
            return st
        attempt = int(st.get("attemptsBefore") or 0) + 1  # run again after a consumer found it damaged
        st.update(phase="Running", attempt=attempt, startTime=_now_str(now), message="starting")
        st.pop("completionTime", None)
        st.pop("nextAttemptTime", None)

    # What the attempt's child is called: building the children is for starting them.
    primary = stage_primary_ref(run, stage, attempt, config)
    existing = kids.get(primary["kind"], primary["name"])

    if existing is not None and not _is_terminating(existing):
        outcome, message = _outcome(existing, config)
        pods = kids.pods_of(stage.name, attempt=str(attempt))
        problem = diagnose(existing, pods, kids.events_of(primary["name"]))
        if outcome == "Succeeded":
            st.update(phase="Succeeded", completionTime=_now_str(now), outputs=[stage_uri(run, stage.name) + "/"],
                      message=f"attempt {attempt} succeeded")
            for key in ("nextAttemptTime", "reason", "pendingSince"):
                st.pop(key, None)
            d.events.append(Event("Normal", "StageSucceeded",
                                  f"Stage {stage.name} succeeded ({primary['kind']} {primary['name']})"))
            delete_servers()
            return st
        if outcome == "Failed":
            wait = _settling(existing, problem, now)
            if wait:  # the pods' last status may still be on its way: decide with it
                d.requeue_after = min(d.requeue_after, wait)
                st.update(phase="Running", child=primary)
                return st
            if (problem is not None and problem.reason == "InputsDamaged"
                    and int(st.get("inputRechecks") or 0) < MAX_INPUT_RECHECKS):
                return _inputs_damaged(d, st, stage, attempt, problem, states, plan)
            if problem is not None and problem.reason == "Disrupted" and existing["kind"] != "Job":
                # A Job ignores disruptions itself (podFailurePolicy); a training job fails: start it again.
                return _attempt_disrupted(d, st, stage, attempt, problem)
            reason = None
            if problem is not None and problem.reason != "Queued":
                reason, message = problem.reason, f"{problem.text()} ({message})"
            # The runtime's bad-input exit codes matched the Job's FailJob rule: a retry fails the same way.
            permanent = existing["kind"] == "Job" and message.startswith("PodFailurePolicy")
            return _attempt_failed(d, st, stage, attempt, message, limit, run, now, delete_servers,
                                   rebuild_servers=False, reason="InvalidInput" if permanent else reason)
        st.update(phase="Running", child=primary)
        if _watch(d, st, stage, attempt, problem, run, now):
            d.delete.append(Delete(existing["apiVersion"], existing["kind"], existing["metadata"]["name"]))
            return _attempt_failed(d, st, stage, attempt, _pending_too_long(run, stage, problem), limit, run, now,
                                   delete_servers, rebuild_servers=False, reason="PendingTimeout")
        return st

    # The current attempt's child is not there (yet): retries wait for their time, servers first.
    retry_at = _parse_time(st.get("nextAttemptTime"))
    if retry_at is not None and retry_at > now:
        d.requeue_after = min(d.requeue_after, (retry_at - now).total_seconds())
        return st
    if existing is not None:  # same name still being deleted (suspend, then resume at once)
        d.requeue_after = min(d.requeue_after, 2.0)
        st["message"] = f"waiting for the old {primary['kind']} {primary['name']} to be deleted"
        return st

    built = build_stage_children(run, plan, stage, attempt, config, owner)

    waiting: list[str] = []
    server_problem: Problem | None = None
    for server in built.servers:
        if server["kind"] in UNWATCHED_KINDS:
            # Not watched (the operator must not read Secrets): made with their Deployment, kept
            # until the run goes (ownerReference). A 409 after a restart adopts them.
            if kids.get("Deployment", server["metadata"]["name"]) is None:
                d.create.append(server)
            continue
        have = kids.get(server["kind"], server["metadata"]["name"])
        if have is None:
            d.create.append(server)
            if server["kind"] == "Deployment":
                waiting.append(server["metadata"]["name"])
                d.events.append(Event("Normal", "ServerCreated",
                                      f"Created vLLM Deployment {server['metadata']['name']} for stage {stage.name}",
                                      child=server["metadata"]["name"]))
        elif _is_terminating(have):
            d.requeue_after = min(d.requeue_after, 2.0)
            waiting.append(server["metadata"]["name"])
        elif server["kind"] == "Deployment":
            state, message = server_state(have)
            labels = server["metadata"]["labels"]
            problem = diagnose(have, kids.pods_of(stage.name, component="server", model=labels[names.LABEL_MODEL]), [])
            # Kueue gates a Deployment's pods until admitted: its progress deadline runs meanwhile.
            if state == "Failed" and not (problem is not None and problem.reason == "Queued"):
                return _attempt_failed(d, st, stage, attempt, f"vLLM server {server['metadata']['name']}: {message}",
                                       limit, run, now, delete_servers, rebuild_servers=True)
            if state != "Available":
                waiting.append(server["metadata"]["name"])
                server_problem = server_problem or problem
    if waiting:
        st.update(phase="Running", child=_ref(next(o for o in built.servers if o["kind"] == "Deployment")))
        if _watch(d, st, stage, attempt, server_problem, run, now):
            return _attempt_failed(d, st, stage, attempt, _pending_too_long(run, stage, server_problem), limit, run,
                                   now, delete_servers, rebuild_servers=True, reason="PendingTimeout")
        if server_problem is None:
            st["message"] = f"attempt {attempt}: waiting for vLLM server {', '.join(waiting)} to become available"
        return st

    d.create.append(built.primary)
    for key in ("nextAttemptTime", "reason", "pendingSince"):
        st.pop(key, None)
    if stage.fingerprint_version:  # the attempt's record, as on its child's annotation
        st["fingerprintVersion"] = stage.fingerprint_version
    st.update(phase="Running", child=primary, message=f"attempt {attempt} running")
    if attempt == 1 or st.get("startTime") is None:
        st["startTime"] = st.get("startTime") or _now_str(now)
    d.events.append(Event("Normal", "StageStarted",
                          f"Created {primary['kind']} {primary['name']} for stage {stage.name} (attempt {attempt})",
                          child=primary["name"]))
    return st


def _watch(d: Decision, st: dict, stage: Stage, attempt: int, problem: Problem | None, run: BacktranslationRun,
           now: datetime) -> bool:
    """Put what keeps a running attempt from moving into its status (and an Event when that
    changes); True when its pods have waited to start longer than the stage's pendingTimeout."""
    old_reason = st.get("reason")
    if problem is None:
        st.pop("reason", None)
        st.pop("pendingSince", None)
        st["message"] = f"attempt {attempt} running"
        return False
    st.update(reason=problem.reason, message=f"attempt {attempt}: {problem.text()}")
    if problem.reason != old_reason:
        d.events.append(Event("Normal" if problem.reason == "Queued" else "Warning", problem.reason,
                              f"Stage {stage.name} (attempt {attempt}): {problem.message}"))
    if not problem.pending:  # queued, crash-looping, ...: not waiting to start
        st.pop("pendingSince", None)
        return False
    since = _parse_time(st.get("pendingSince")) or now
    st["pendingSince"] = _now_str(since)
    timeout = duration_seconds(_resources_of(run, stage).pending_timeout)
    if timeout is None:
        return False
    left = timeout - (now - since).total_seconds()
    if left <= 0:
        return True
    d.requeue_after = min(d.requeue_after, max(left, 0.5))
    return False


# A child's failure and its pods' last status (OOMKilled, an input found damaged) come by different
# watches, in either order: a failure without a known cause is decided only after this long.
FAILURE_SETTLE_SECONDS = 3.0


def _settling(child: Mapping[str, Any], problem: Problem | None, now: datetime) -> float:
    """Seconds to wait before deciding a failure whose cause the pods have not told yet; 0: decide now."""
    if problem is not None:
        return 0.0
    failed = next((c for c in (child.get("status") or {}).get("conditions") or []
                   if c.get("type") == "Failed" and c.get("status") == "True"), None)
    since = _parse_time((failed or {}).get("lastTransitionTime"))
    if since is None:
        return 0.0
    elapsed = (now - since).total_seconds()
    if not -FAILURE_SETTLE_SECONDS < elapsed < FAILURE_SETTLE_SECONDS:  # decided, or clocks far apart
        return 0.0
    return min(FAILURE_SETTLE_SECONDS, FAILURE_SETTLE_SECONDS - elapsed) + 0.1


def _pending_too_long(run: BacktranslationRun, stage: Stage, problem: Problem | None) -> str:
    what = problem.text() if problem is not None else "pods not started"
    return f"pods did not start within pendingTimeout {_resources_of(run, stage).pending_timeout}: {what}"


def _attempt_disrupted(d: Decision, st: dict, stage: Stage, attempt: int, problem: Problem) -> dict:
    """A training attempt ended by a disruption (eviction, preemption, node loss): the next one
    starts now and the disrupted one does not count against retries.limit."""
    st.update(phase="Running", attempt=attempt + 1, disruptions=int(st.get("disruptions") or 0) + 1,
              reason="Disrupted", message=f"attempt {attempt} was disrupted ({problem.message}); attempt "
              f"{attempt + 1} starts now and the disrupted one does not count as a retry")
    d.events.append(Event("Warning", "StageDisrupted", f"Attempt {attempt} of stage {stage.name} was disrupted: "
                          f"{problem.message}; starting attempt {attempt + 1} (not counted as a retry)"))
    return _next_attempt_now(d, st)


def _next_attempt_now(d: Decision, st: dict) -> dict:
    """The next attempt starts at the next reconcile, with no retry backoff and a fresh pending clock."""
    for key in ("nextAttemptTime", "pendingSince"):
        st.pop(key, None)
    d.requeue_after = min(d.requeue_after, 0.5)
    return st


# A stage whose inputs arrive damaged again and again fails (counted) after this many re-checks.
MAX_INPUT_RECHECKS = 2


def _inputs_damaged(d: Decision, st: dict, stage: Stage, attempt: int, problem: Problem,
                    states: dict[str, dict[str, Any]], plan: Plan) -> dict:
    """The attempt found an input that differs from its producer's manifest and withdrew that
    manifest (the runtime's exit code 6). The producers are looked up in the store again, so the
    damaged one runs again (an intact one is skipped), and then a new attempt of this stage starts;
    none of it counts against retries.limit."""
    for dep in stage.deps:
        old = states[dep]
        states[dep] = {"name": dep, "phase": "Pending", "attempt": 0, "fingerprint": plan[dep].fingerprint,
                       "attemptsBefore": max(int(old.get("attempt") or 0), int(old.get("attemptsBefore") or 0)),
                       "message": f"checking the store again: {stage.name} found an output of it damaged"}
    st.update(phase="Pending", attempt=attempt + 1, inputRechecks=int(st.get("inputRechecks") or 0) + 1,
              reason="InputsDamaged", message=f"attempt {attempt} found an input damaged ({problem.message}); "
              f"{', '.join(stage.deps)} checked again, then attempt {attempt + 1} (not counted as a retry)")
    d.events.append(Event("Warning", "InputsDamaged", f"Attempt {attempt} of stage {stage.name} found an input "
                          f"damaged: {problem.message}; re-checking {', '.join(stage.deps)} in the store"))
    return _next_attempt_now(d, st)


def _attempt_failed(d: Decision, st: dict, stage: Stage, attempt: int, message: str, limit: int,
                    run: BacktranslationRun, now: datetime, delete_servers, *, rebuild_servers: bool,
                    reason: str | None = None) -> dict:
    st.pop("pendingSince", None)
    if reason:
        st["reason"] = reason
    else:
        st.pop("reason", None)
    if reason == "InvalidInput" or _counted(st) > limit:  # that was the last one
        if reason == "InvalidInput":
            message += "; the runtime rejected the stage's input or settings: not retried"
        st.update(phase="Failed", completionTime=_now_str(now),
                  message=f"attempt {attempt} of {limit + 1 + _uncounted(st)} failed: {message}")
        st.pop("nextAttemptTime", None)
        d.events.append(Event("Warning", "StageFailed",
                              f"Stage {stage.name} failed after {attempt} attempt(s): {message}"))
        delete_servers()
        return st
    delay = run.spec.retries.backoff_seconds * 2 ** (_counted(st) - 1)
    retry_at = now + timedelta(seconds=delay)
    st.update(phase="Running", attempt=attempt + 1, nextAttemptTime=_now_str(retry_at),
              message=f"attempt {attempt} failed: {message}; attempt {attempt + 1} of "
              f"{limit + 1 + _uncounted(st)} in {delay}s")
    d.events.append(Event("Warning", "StageRetrying",
                          f"Attempt {attempt} of stage {stage.name} failed: {message}; retrying in {delay}s"))
    if rebuild_servers:  # a server that never became ready is rebuilt for the next attempt
        delete_servers()
    d.requeue_after = min(d.requeue_after, max(float(delay), 0.5))
    return st


def _run_status(run: BacktranslationRun, plan: Plan, states: dict[str, dict[str, Any]], old: dict, generation: Any,
                suspended: bool, failed_stage: str | None, now: datetime, d: Decision) -> dict[str, Any]:
    stages = [states[s.name] for s in plan.stages]
    done = sum(1 for s in stages if s["phase"] in DONE)
    running = [s["name"] for s in stages if s["phase"] == "Running"]
    complete = done == len(stages)
    total = len(stages)

    if failed_stage:
        failed = ("True", "StageFailed", f"stage {failed_stage} failed: {states[failed_stage].get('message', '')}")
    else:
        failed = ("False", "NoFailure", "")
    if complete:
        complete_c = ("True", "AllStagesDone", f"all {total} stages done")
    else:
        complete_c = ("False", "InProgress", f"{done}/{total} stages done")
    if suspended:
        running_c = ("False", "Suspended", "spec.suspend is true")
    elif complete:
        running_c = ("False", "Completed", "")
    elif running:
        running_c = ("True", "StagesRunning", ", ".join(running))
    elif failed_stage:
        running_c = ("False", "Failed", "")
    else:
        running_c = ("False", "Waiting", "no stage is running")
    suspended_c = ("True", "Suspended", "running children deleted; finished work kept") if suspended \
        else ("False", "NotSuspended", "")
    conditions = _conditions(old, now, generation, {
        "Accepted": ("True", "Planned", f"{total} stages planned"),
        "Running": running_c,
        "Complete": complete_c,
        "Failed": failed,
        "Suspended": suspended_c,
    })
    if failed_stage:
        phase = "Failed"
    elif complete:
        phase = "Succeeded"
    elif suspended:
        phase = "Suspended"
    elif running or done:
        phase = "Running"
    else:
        phase = "Pending"

    old_conditions = {c["type"]: c.get("status") for c in old.get("conditions") or []}
    def flipped(kind: str, to: str) -> bool:
        return old_conditions.get(kind) != to
    if flipped("Accepted", "True"):
        d.events.append(Event("Normal", "Accepted", f"Planned {total} stages: {', '.join(plan.names())}"))
    if suspended and flipped("Suspended", "True"):
        d.events.append(Event("Normal", "Suspended", "Run suspended: running children deleted, finished work kept"))
    if not suspended and old_conditions.get("Suspended") == "True":
        d.events.append(Event("Normal", "Resumed", "Run resumed"))
    if complete and flipped("Complete", "True"):
        d.events.append(Event("Normal", "Succeeded", f"Run succeeded: all {total} stages done"))
    if failed_stage and flipped("Failed", "True"):
        d.events.append(Event("Warning", "Failed", failed[2]))

    message = failed[2] if failed_stage else complete_c[2] if complete else (
        "suspended" if suspended else "; ".join(f"{s['name']}: {s.get('message', '')}" for s in stages if s["phase"] == "Running"))
    return {
        "observedGeneration": generation,
        "phase": phase,
        "stage": ",".join(running),
        "progress": f"{done}/{total}",
        "stageProgress": "; ".join(f"{s['name']} {s['progress']['summary']}" for s in stages
                                   if s["phase"] == "Running" and s.get("progress")),
        "message": message,
        "conditions": conditions,
        "stages": stages,
    }


def _conditions(old: dict, now: datetime, generation: Any,
                wanted: dict[str, tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Conditions in a fixed order; lastTransitionTime changes only when status does."""
    previous = {c["type"]: c for c in old.get("conditions") or [] if "type" in c}
    out = []
    for kind in CONDITION_TYPES:
        status, reason, message = wanted[kind]
        before = previous.get(kind)
        changed = before is None or before.get("status") != status
        out.append({
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": _now_str(now) if changed else before.get("lastTransitionTime", _now_str(now)),
            "observedGeneration": generation,
        })
    return out
