"""The operator under load: N runs at once against the emulated Kubernetes API, with instant
stand-in controllers (every child finishes the moment it appears), artifacts on a moto S3 server.

    .venv/bin/python bench/operator_scale.py --runs 100
    .venv/bin/python bench/operator_scale.py --runs 1000 --light --timeout 3600
    .venv/bin/python bench/operator_scale.py --runs 1000 --finished     # idle cost of 1,000 finished runs

Measures, for the operator process (`kopf run -m humpback_operator.backtranslationrun`):
- latency from a child's completion (a Job/PyTorchJob finishing, or a vLLM Deployment becoming
  available) to the creation of the next child of the same run, p50 and p95 (goal p95 <= 2 s);
- API requests per run (everything the operator sent: Kopf's watches and patches, our creates,
  deletes and status patches), and by kind of request;
- operator memory: peak resident set (VmHWM) (goal <= 300 MB);
- operator CPU per reconcile (its own CPU time / reconciles: the emulator's cost apart);
- idle cost once every run has finished (`--idle-seconds`): the operator's CPU-seconds per minute
  and its resident set (goal: CPU ~ 0; a finished run has no daemon).

Writes bench/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import yaml

from humpback_testing.kube import Emulator, kube_env, write_kubeconfig
from humpback_testing.standins import PYTORCHJOB_CRD, STANDINS_USER_AGENT

ROOT = Path(__file__).resolve().parents[1]
# What the emulated cluster serves: humpback's CRD and the training operator's.
CRDS = (ROOT / "manifests" / "crd" / "humpback.dev_backtranslationruns.yaml", PYTORCHJOB_CRD)

BENCH_AGENT = "humpback-bench"
NAMESPACE = "default"
WATCHED = {  # kind: (list function, patch-status function, terminal status)
    "Job": ("batch", "v1", "jobs"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "Deployment": ("apps", "v1", "deployments"),
}


def done_status(kind: str) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if kind == "Deployment":
        return {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}
    kind_ok = "Complete" if kind == "Job" else "Succeeded"
    return {"conditions": [{"type": kind_ok, "status": "True", "reason": "Done", "lastTransitionTime": now}]}


class InstantControllers:
    """Watches children and finishes each one as soon as it is created; records both times."""

    def __init__(self, kubeconfig: Path):
        self.api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.api.user_agent = BENCH_AGENT
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.events: dict[str, list[tuple[float, str, str]]] = collections.defaultdict(list)  # run -> (t, what, name)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(8)
        self.seen: set[tuple[str, str]] = set()
        self.threads = [threading.Thread(target=self.watch, args=(kind,), daemon=True) for kind in WATCHED]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def watch(self, kind: str) -> None:
        group, version, plural = WATCHED[kind]
        path = f"/apis/{group}/{version}/namespaces/{NAMESPACE}/{plural}"
        w = kubernetes.watch.Watch()
        while not self.stop.is_set():
            try:
                for ev in w.stream(self._list, path, timeout_seconds=5):
                    obj = ev["object"]
                    if ev["type"] != "ADDED" or obj.get("status"):
                        continue
                    name = obj["metadata"]["name"]
                    if (kind, name) in self.seen:
                        continue
                    self.seen.add((kind, name))
                    run = obj["metadata"]["labels"]["humpback.dev/run"]
                    with self.lock:
                        self.events[run].append((time.monotonic(), "created", name))
                    self.pool.submit(self.finish, kind, path, name, run)
            except Exception as e:  # noqa: BLE001 - a dropped watch just restarts
                if not self.stop.is_set():
                    print(f"watch {kind}: {e}", file=sys.stderr)

    def _list(self, path: str, **kwargs):
        query = [(k, str(v).lower() if isinstance(v, bool) else v) for k, v in kwargs.items() if k != "_preload_content"]
        return self.api.call_api(path, "GET", query_params=query, auth_settings=["BearerToken"],
                                 _preload_content=False, _return_http_data_only=True)

    def finish(self, kind: str, path: str, name: str, run: str) -> None:
        self.api.call_api(f"{path}/{name}/status", "PATCH", body={"status": done_status(kind)},
                          header_params={"Content-Type": "application/merge-patch+json"},
                          auth_settings=["BearerToken"], _preload_content=False)
        with self.lock:
            self.events[run].append((time.monotonic(), "completed", name))



# Creations of one run this close together come from one decision (the operator waits 0.1 s after
# a wake-up before it decides): the evaluate stage's three servers, train-myx and train-m0.
SAME_DECISION_SECONDS = 0.05


def latencies(events_by_run: dict[str, list[tuple[float, str, str]]]) -> list[float]:
    """Per run: each completion -> the next creation of that run (the operator's reaction). A
    creation right after another of the same run is part of the same reaction, never one of its
    own (the controllers may record a completion between two creations of one decision)."""
    out = []
    for events in events_by_run.values():
        last_completion = None
        last_creation = float("-inf")
        for t, what, _ in sorted(events):
            if what == "completed":
                last_completion = t
                continue
            same_decision = t - last_creation < SAME_DECISION_SECONDS
            last_creation = t
            if last_completion is not None and not same_decision:
                out.append(t - last_completion)
                last_completion = None  # one reaction per completion
    return out


def controllers_process(kubeconfig: str, conn) -> None:
    """The instant controllers in a process of their own, so that they do not share the
    emulator's GIL; they report their timeline when told to stop."""
    controllers = InstantControllers(Path(kubeconfig))
    controllers.start()
    conn.recv()
    controllers.stop.set()
    with controllers.lock:
        conn.send((dict(controllers.events), cpu_seconds(os.getpid())))


def run_doc(name: str, bucket: str, endpoint: str, light: bool = False) -> dict:
    doc = yaml.safe_load((ROOT / "examples/tiny-cpu.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NAMESPACE}
    doc["spec"]["storage"] = {"uri": f"s3://{bucket}/runs", "s3": {"endpoint": endpoint}}
    # Full: a vLLM server (Deployment, Service, Secret, NetworkPolicy) + client Job per inference
    # stage. Light: inference in-process (one Job per stage), half the children and API writes.
    doc["spec"]["inference"]["engine"] = "transformers" if light else "auto"
    return doc


def finished_status(doc: dict) -> dict:
    """The status of `doc` once every stage succeeded, as the operator's own decide() writes it
    against children that finish at once (for --finished: runs that are done before it starts)."""
    from datetime import datetime, timezone

    from humpback_operator.config import OperatorConfig
    from humpback_operator.reconcile import decide, run_from_body
    from humpback_runtime.plan import build_plan

    body = copy.deepcopy(doc)
    body["metadata"].update(uid="0", generation=1)
    store = {stage.name: None for stage in build_plan(run_from_body(body)).stages}
    children: dict[tuple[str, str], dict] = {}
    for _ in range(500):
        d = decide(body, list(children.values()), store, datetime.now(timezone.utc), OperatorConfig())
        for ref in d.delete:
            children.pop((ref.kind, ref.name), None)
        for obj in d.create:
            children[(obj["kind"], obj["metadata"]["name"])] = {**obj, "status": done_status(obj["kind"])}
        body["status"] = d.status
        if d.status.get("phase") == "Succeeded":
            return d.status
    raise RuntimeError(f"the simulated run did not finish: {body['status'].get('message')}")


def scrape(port: int) -> dict[str, float]:
    """The operator's own view from its /metrics: reconciles and the time they took."""
    import urllib.request

    values: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("humpback_reconcile_seconds_sum", "humpback_reconcile_seconds_count", "humpback_reconciles_total")):
                name, value = line.split()
                values[name] = float(value)
    count = values.get("humpback_reconcile_seconds_count", 0)
    return {"reconciles": count,
            "mean_reconcile_ms": round(1000 * values.get("humpback_reconcile_seconds_sum", 0) / count, 1) if count else None}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def finished_runs(args: argparse.Namespace, kubeconfig: Path, work: Path, s3_endpoint: str, load_before) -> dict:
    """--finished: N runs already Succeeded when the operator starts; what following them costs."""
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    api.user_agent = BENCH_AGENT
    custom = kubernetes.client.CustomObjectsApi(api)
    status = finished_status(run_doc("bench", "bench", s3_endpoint, args.light))
    started = time.monotonic()
    for i in range(args.runs):
        created = custom.create_namespaced_custom_object("humpback.dev", "v1alpha1", NAMESPACE, "backtranslationruns",
                                                         run_doc(f"bench-{i:04d}", "bench", s3_endpoint, args.light))
        done = {**status, "observedGeneration": created["metadata"]["generation"]}
        custom.patch_namespaced_custom_object_status("humpback.dev", "v1alpha1", NAMESPACE, "backtranslationruns",
                                                     created["metadata"]["name"], {"status": done})
    setup = time.monotonic() - started
    metrics_port = free_port()
    env = kube_env(kubeconfig, HOME=str(work), HUMPBACK_METRICS_PORT=str(metrics_port))
    with (work / "operator-finished.log").open("wb") as log:
        op = subprocess.Popen([str(Path(sys.executable).parent / "kopf"), "run", "-m", "humpback_operator.backtranslationrun",
                               "--standalone", "--all-namespaces", "--quiet"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
        started = time.monotonic()
        # Starting, it lists the runs and puts its finalizer on each: that is startup, not idle.
        finalized = 0
        while time.monotonic() - started < args.timeout and finalized < args.runs:
            time.sleep(2)
            items = custom.list_namespaced_custom_object("humpback.dev", "v1alpha1", NAMESPACE, "backtranslationruns")["items"]
            finalized = sum(1 for o in items if o["metadata"].get("finalizers"))
        startup = time.monotonic() - started
        time.sleep(10)
        startup_cpu = cpu_seconds(op.pid)
        time.sleep(args.idle_seconds)
        idle_cpu = cpu_seconds(op.pid) - startup_cpu
        values = _metrics(metrics_port)
        result = {
            "mode": "finished runs: the operator starts after all runs finished",
            "runs": args.runs,
            "children": "light (inference in-process)" if args.light else "full (vLLM servers)",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "setup_seconds": round(setup, 1),
            "operator_startup_seconds": round(startup, 1),
            "runs_with_finalizer": finalized,
            "operator_startup_cpu_seconds": round(startup_cpu, 1),
            "idle_seconds": args.idle_seconds,
            "idle_operator_cpu_seconds_per_minute": round(idle_cpu * 60 / args.idle_seconds, 3),
            "idle_operator_rss_mb": round(current_rss_mb(op.pid), 1),
            "operator_peak_rss_mb": round(peak_rss_mb(op.pid), 1),
            "daemons": values.get("humpback_run_daemons", 0.0),
            "reconciles": values.get("humpback_reconciles_total", 0.0),
            "machine": f"{os.cpu_count()} cores",
        }
        op.terminate()
        op.wait(60)
    return result


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {line.split()[0]: float(line.split()[1]) for line in r.read().decode().splitlines()
                if line and not line.startswith("#")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--light", action="store_true", help="the lighter child set: inference in-process, no vLLM servers")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--profile", action="store_true", help="cProfile the operator into bench/results/operator_scale/")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/operator_scale.json")
    p.add_argument("--timeline", type=Path, help="also write each run's creations and completions (time, what, child) here")
    p.add_argument("--idle-seconds", type=float, default=60, help="after the last run finished, measure this long")
    p.add_argument("--pin", action="store_true",
                   help="the operator on a core of its own and everything else (the emulated API server, the "
                        "controllers, moto) on the others, as on a cluster whose API server runs elsewhere")
    p.add_argument("--finished", action="store_true",
                   help="only the idle cost: N runs that finished before the operator starts (status as decide() "
                        "writes it), then the operator's CPU and RSS while it follows them")
    args = p.parse_args()

    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    operator_cores: set[int] | None = None
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            p.error("--pin needs two cores or more")
        operator_cores = {cores[0]}
        os.sched_setaffinity(0, set(cores[1:]))  # this process (the emulator) and all it starts but the operator
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    # moto in its own process: the emulator (this process) should not share its GIL with it.
    s3_port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for _ in range(100):
        try:
            s3.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)

    work = ROOT / "bench/results/operator_scale"
    work.mkdir(parents=True, exist_ok=True)
    with Emulator(crds=CRDS) as emulator:
        kubeconfig = write_kubeconfig(work / "kubeconfig", emulator.url)
        if args.finished:
            result = finished_runs(args, kubeconfig, work, s3_endpoint, load_before)
            moto.terminate()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return 0 if result["daemons"] == 0 else 1
        import multiprocessing

        parent_conn, child_conn = multiprocessing.Pipe()
        worker = multiprocessing.get_context("spawn").Process(target=controllers_process, args=(str(kubeconfig), child_conn))
        worker.start()
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        api.user_agent = BENCH_AGENT
        log = (work / "operator.log").open("wb")
        metrics_port = free_port()
        env = kube_env(kubeconfig, HOME=str(work), HUMPBACK_METRICS_PORT=str(metrics_port))
        profile = ["-m", "cProfile", "-o", str(work / "operator.prof")] if args.profile else []
        op = subprocess.Popen([sys.executable, *profile, str(Path(sys.executable).parent / "kopf"), "run", "-m", "humpback_operator.backtranslationrun",
                               "--standalone", "--all-namespaces", "--quiet"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT,
                              preexec_fn=(lambda: os.sched_setaffinity(0, operator_cores)) if operator_cores else None)
        time.sleep(3)
        mark = emulator.request_count()
        custom = kubernetes.client.CustomObjectsApi(api)
        started = time.monotonic()
        for i in range(args.runs):
            custom.create_namespaced_custom_object("humpback.dev", "v1alpha1", NAMESPACE, "backtranslationruns",
                                                   run_doc(f"bench-{i:04d}", "bench", s3_endpoint, args.light))
        created = time.monotonic() - started

        def phases() -> collections.Counter:
            items = custom.list_namespaced_custom_object("humpback.dev", "v1alpha1", NAMESPACE, "backtranslationruns")["items"]
            return collections.Counter((o.get("status") or {}).get("phase", "-") for o in items)

        # Progress from the operator's own gauge (humpback_runs{phase}): listing every run from
        # the emulator each second costs it more than the operator does at 1,000 runs.
        while time.monotonic() - started < args.timeout:
            try:
                values = _metrics(metrics_port)
            except OSError:  # not serving yet
                values = {}
            if values.get('humpback_runs{phase="Succeeded"}', 0) + values.get('humpback_runs{phase="Failed"}', 0) >= args.runs:
                break
            time.sleep(2)
        wall = time.monotonic() - started
        counts = phases()
        operator_cpu = cpu_seconds(op.pid)
        reconcile = scrape(metrics_port)
        time.sleep(5)  # the last status patches and Events, the daemons of finished runs stopping
        idle_from = cpu_seconds(op.pid)
        time.sleep(args.idle_seconds)
        idle_cpu_per_minute = (cpu_seconds(op.pid) - idle_from) * 60 / args.idle_seconds
        idle_rss = current_rss_mb(op.pid)
        peak = peak_rss_mb(op.pid)  # the high-water mark of the whole run, the idle minutes after it included
        harness_cpu = cpu_seconds(os.getpid())
        requests = [r for r in emulator.requests_since(mark) if BENCH_AGENT not in r.user_agent
                    and STANDINS_USER_AGENT not in r.user_agent]
        by_kind = collections.Counter(r.key for r in requests)
        op.send_signal(signal.SIGINT if args.profile else signal.SIGTERM)  # cProfile writes on a clean exit
        op.wait(60)
        parent_conn.send("stop")
        events, controllers_cpu = parent_conn.recv()
        worker.join(30)

    moto.terminate()
    lat = latencies(events)
    result = {
        "runs": args.runs,
        "children": "light (inference in-process)" if args.light else "full (vLLM servers)",
        "pinned": f"operator on core {sorted(operator_cores)}, the rest on {sorted(os.sched_getaffinity(0))}" if operator_cores else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "phases": dict(counts),
        "wall_seconds": round(wall, 1),
        "create_runs_seconds": round(created, 2),
        "reactions": len(lat),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(percentile(lat, 0.95), 3) if lat else None,
        "latency_max_s": round(max(lat), 3) if lat else None,
        "reconciles_per_run": round(reconcile["reconciles"] / args.runs, 1),
        "mean_reconcile_ms": reconcile["mean_reconcile_ms"],  # wall time inside the operator, API calls included
        "requests_total": len(requests),
        "requests_per_run": round(len(requests) / args.runs, 1),
        "requests_by_kind_per_run": {k: round(v / args.runs, 1) for k, v in by_kind.most_common()},
        "operator_peak_rss_mb": round(peak, 1),
        "operator_cpu_seconds": round(operator_cpu, 1),
        "operator_cpu_ms_per_reconcile": round(1000 * operator_cpu / reconcile["reconciles"], 1) if reconcile["reconciles"] else None,
        "idle_operator_cpu_seconds_per_minute": round(idle_cpu_per_minute, 3),
        "idle_operator_rss_mb": round(idle_rss, 1),
        "emulator_cpu_seconds": round(harness_cpu, 1),  # the API server (and this script), same 2 cores
        "controllers_cpu_seconds": round(controllers_cpu, 1),
        "machine": f"{os.cpu_count()} cores",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.timeline:
        args.timeline.write_text(json.dumps(events))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = counts.get("Succeeded", 0) == args.runs
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
