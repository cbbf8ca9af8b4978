"""Where a run is: one row per stage, from the store (local runs) or the run's status (cluster runs).

    humpback status RUN.yaml [--storage URI] [--watch [SECONDS]] [-o json]
    humpback status --kube NAME [-n NAMESPACE] [--watch] [-o json]

A row: stage, state (Succeeded, Running, Failed, Pending, Skipped, Stalled), attempt, duration,
records in and out, rate and ETA of the running stage (from its `_PROGRESS.json`), and the reason
when it waits or failed. On a cluster the operator's `status.stages[]` gives state, attempt and
reason; the store, where this machine can read it, adds counts and fresh progress.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from humpback_runtime.context import RunContext
from humpback_runtime.progress import format_duration, read_progress

__all__ = ["kube_status", "local_status", "render_table"]

# A running stage rewrites its progress every few seconds; this long without one, it is stalled
# (the process was killed, or the machine is gone).
STALL_SECONDS = 120.0


def _parse(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def _count(manifest: Mapping | None) -> int | None:
    outputs = (manifest or {}).get("outputs")
    count = outputs.get("count") if isinstance(outputs, Mapping) else None
    return count if isinstance(count, int) else None


def _row(name: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"stage": name, "state": state, "phase": None, "attempt": None, "seconds": None, "in": None, "out": None,
            "done": None, "total": None, "unit": None, "rate": None, "eta_seconds": None,
            "tokens_per_second": None, "reason": None, **fields}


def _progress_fields(snap: Mapping | None) -> dict[str, Any]:
    if not snap:
        return {}
    return {k: snap.get(k) for k in ("phase", "done", "total", "unit", "rate", "eta_seconds", "tokens_per_second")}


def local_status(ctx: RunContext, now: datetime | None = None) -> dict[str, Any]:
    """The run's state as the store shows it: {"run", "store", "phase", "stages": [row, ...]}."""
    now = now or datetime.now(timezone.utc)
    plan, store = ctx.plan, ctx.store
    manifests = {s.name: ctx.manifest(s.name) for s in plan.stages}
    done = {s.name for s in plan.stages
            if manifests[s.name] and manifests[s.name].get("fingerprint") == s.fingerprint}
    rows = []
    for stage in plan.stages:
        manifest = manifests[stage.name]
        # Records in: the data stages' outputs it reads (models are no records; the report reads all).
        inputs = [_count(manifests[d]) for d in stage.deps
                  if plan[d].family != "train" and d in done and stage.family != "report"]
        n_in = sum(c for c in inputs if c is not None) if inputs and None not in inputs else None
        if stage.name in done:
            seconds = (manifest.get("timings") or {}).get("seconds")
            rows.append(_row(stage.name, "Succeeded", seconds=seconds, out=_count(manifest), **{"in": n_in}))
            continue
        snap = read_progress(store, ctx.prefix(stage.name))
        waiting = [d for d in stage.deps if d not in done]
        if snap and snap.get("state") in ("running", "finished", "failed") and not waiting:
            updated = _parse(snap.get("updated"))
            age = (now - updated).total_seconds() if updated else None
            started = _parse(snap.get("started"))
            seconds = snap.get("elapsed_seconds") if snap.get("state") == "failed" or not started \
                else (now - started).total_seconds()
            if snap.get("state") == "failed":
                rows.append(_row(stage.name, "Failed", seconds=seconds, out=snap.get("done"),
                                 reason=snap.get("last_error") or "failed", **{"in": n_in}))
            elif age is not None and age > STALL_SECONDS:
                rows.append(_row(stage.name, "Stalled", seconds=snap.get("elapsed_seconds"), out=snap.get("done"),
                                 reason=f"no progress for {format_duration(age)}: the process is gone; "
                                        f"`humpback run` resumes it",
                                 **{"in": n_in}))
            else:
                rows.append(_row(stage.name, "Running", seconds=seconds, out=snap.get("done"),
                                 reason=snap.get("last_error"), **{"in": n_in}, **_progress_fields(snap)))
            continue
        if waiting:
            reason = f"waiting for {', '.join(waiting)}"
        elif manifest:
            reason = "settings changed since it ran: runs again"
        else:
            reason = "ready to run"
        rows.append(_row(stage.name, "Pending", reason=reason, **{"in": n_in}))
    return {"run": f"{ctx.run.namespace}/{ctx.run.name}", "store": store.url(ctx.run_prefix),
            "phase": _phase(rows), "stages": rows}


def _phase(rows: list[dict]) -> str:
    states = [r["state"] for r in rows]
    if "Failed" in states:
        return "Failed"
    if all(s in ("Succeeded", "Skipped") for s in states):
        return "Succeeded"
    if "Running" in states:
        return "Running"
    if "Stalled" in states:
        return "Stalled"
    return "Pending" if not any(s in ("Succeeded", "Skipped") for s in states) else "Running"


def kube_status(body: Mapping[str, Any], ctx: RunContext | None, now: datetime | None = None,
                store_error: str | None = None) -> dict[str, Any]:
    """Rows from a run object's status, completed from the store when `ctx` can read it."""
    now = now or datetime.now(timezone.utc)
    status = body.get("status") or {}
    local = None
    if ctx is not None:
        try:
            local = {r["stage"]: r for r in local_status(ctx, now)["stages"]}
        except Exception as e:  # noqa: BLE001 - the cluster's view still stands on its own
            store_error = f"{type(e).__name__}: {e}"
    rows = []
    for st in status.get("stages") or []:
        name = st.get("name")
        phase = st.get("phase") or "Pending"
        start, end = _parse(st.get("startTime")), _parse(st.get("completionTime"))
        seconds = ((end or now) - start).total_seconds() if start and phase in ("Running", "Succeeded", "Failed") else None
        row = _row(name, phase, attempt=st.get("attempt") or None, seconds=seconds)
        if phase != "Succeeded" or not (local or {}).get(name):
            row["reason"] = st.get("message")
        progress = st.get("progress")
        if isinstance(progress, Mapping):  # the CRD's camelCase copy of _PROGRESS.json
            row.update({"done": progress.get("done"), "total": progress.get("total"), "unit": progress.get("unit"),
                        "rate": progress.get("rate"), "eta_seconds": progress.get("etaSeconds"),
                        "tokens_per_second": progress.get("tokensPerSecond"), "out": progress.get("done")})
        mine = (local or {}).get(name)
        if mine:
            row["in"] = mine["in"]
            if phase in ("Succeeded", "Skipped"):
                row["out"] = mine["out"]
                row["seconds"] = mine["seconds"] if mine["seconds"] is not None else row["seconds"]
            elif phase == "Running" and mine["state"] == "Running":  # the store is fresher
                row.update({k: mine[k] for k in ("out", "done", "total", "unit", "rate", "eta_seconds",
                                                  "tokens_per_second")})
        rows.append(row)
    meta = body.get("metadata") or {}
    out = {"run": f"{meta.get('namespace')}/{meta.get('name')}", "phase": status.get("phase") or "Pending",
           "message": status.get("message"), "stages": rows}
    if ctx is not None:
        out["store"] = ctx.store.url(ctx.run_prefix)
    if store_error:
        out["storeError"] = store_error
    return out


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def render_table(result: Mapping[str, Any]) -> str:
    """The rows as aligned text, with the run's phase on top."""
    header = ("STAGE", "STATE", "ATTEMPT", "DURATION", "IN", "OUT", "RATE", "ETA", "REASON")
    lines = [header]
    for r in result["stages"]:
        rate = "-"
        if r.get("rate") is not None:
            rate = f"{r['rate']:.3g} {r.get('unit') or 'records'}/s"
            if r.get("tokens_per_second"):
                rate += f", {r['tokens_per_second']:,.0f} tok/s"
        out = _n(r.get("out"))
        if r["state"] == "Running" and r.get("total"):
            out = f"{_n(r.get('done'))}/{_n(r['total'])}"
        eta = format_duration(r["eta_seconds"]) if r.get("eta_seconds") is not None else "-"
        reason = (r.get("reason") or "").replace("\n", " ")
        if r["state"] == "Running" and r.get("phase") and r["phase"] != r["stage"]:
            reason = f"now: {r['phase']}" + (f"; {reason}" if reason else "")  # e.g. evaluate's current model
        lines.append((r["stage"], r["state"], _n(r.get("attempt")), format_duration(r.get("seconds")),
                      _n(r.get("in")), out, rate, eta, reason[:160]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"Run {result['run']}: {result['phase']}" + (f" ({result['store']})" if result.get("store") else "")]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    if result.get("storeError"):
        text.append(f"(store not readable from here, counts missing: {result['storeError']})")
    return "\n".join(text)


def to_json(result: Mapping[str, Any]) -> str:
    return json.dumps(result, indent=2, default=str)


class KubeReader:
    """Reads a BacktranslationRun from the cluster (kubeconfig, else in-cluster) and its store."""

    def __init__(self, name: str, namespace: str | None = None, *, storage_uri: str | None = None,
                 api_client: Any = None):
        try:
            from kubernetes import client, config
        except ImportError:
            raise SystemExit("humpback status --kube needs the kubernetes client: pip install 'humpback[operator]'") from None
        if api_client is None:
            try:
                config.load_kube_config()
                _, context = config.list_kube_config_contexts()
                namespace = namespace or (context or {}).get("context", {}).get("namespace")
            except (config.ConfigException, FileNotFoundError, TypeError):
                config.load_incluster_config()
                if namespace is None:
                    ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
                    try:
                        with open(ns_file, encoding="utf-8") as f:
                            namespace = f.read().strip()
                    except OSError:
                        pass
            api_client = client.ApiClient()
        self.name, self.namespace, self.storage_uri = name, namespace or "default", storage_uri
        self.api = client.CustomObjectsApi(api_client)
        self._rest_error = client.exceptions.ApiException

    def __call__(self, now: datetime | None = None) -> dict[str, Any]:
        from humpback_runtime.spec import GROUP, PLURAL, VERSION, parse_run

        try:
            body = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        except self._rest_error as e:
            if e.status == 404:
                raise SystemExit(f"no BacktranslationRun {self.name!r} in namespace {self.namespace!r}") from None
            raise
        ctx = store_error = None
        try:
            meta = body.get("metadata") or {}
            run = parse_run({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                             "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
                             "spec": body.get("spec")}, f"{self.namespace}/{self.name}")
            ctx = RunContext.create(run, self.storage_uri)
        except Exception as e:  # noqa: BLE001 - the cluster's view stands without the store
            store_error = f"{type(e).__name__}: {e}"
        return kube_status(body, ctx, now, store_error=store_error)
