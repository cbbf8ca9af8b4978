"""The emulated Kubernetes API behaves like kube-apiserver where kopf, the kubernetes client and the
operator depend on it, and the stand-in controllers move children as the real controllers do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")

import humpback_testing.kube as kube_package  # noqa: E402
from humpback_testing.kube import Emulator  # noqa: E402
from humpback_testing.standins import PYTORCHJOB_CRD, stage_policy, wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

BTR = ("humpback.dev", "v1alpha1", "backtranslationruns")
BTR_PATH = "/apis/humpback.dev/v1alpha1/namespaces/default/backtranslationruns"
JOBS_PATH = "/apis/batch/v1/namespaces/default/jobs"


def http(kube: Emulator, method: str, path: str, body: Any = None, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One raw request: (status, decoded JSON body), errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(kube.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def tiny_run(name: str = "tiny-cpu") -> dict[str, Any]:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"]["name"] = name
    return doc


def job(name: str, labels: dict[str, str] | None = None, container: dict[str, Any] | None = None) -> dict[str, Any]:
    container = container or {"name": "main", "image": "busybox", "command": ["true"]}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }


def merge_patch(kube: Emulator, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http(kube, "PATCH", path, body, "application/merge-patch+json")


# --- the compatibility fixes -----------------------------------------------------------------------


def test_create_answers_201_with_server_set_metadata(kube_emulator):
    status, obj = http(kube_emulator, "POST", BTR_PATH, tiny_run())
    assert status == 201
    meta = obj["metadata"]
    assert len(meta["uid"]) == 36 and meta["resourceVersion"].isdigit() and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1 and meta["namespace"] == "default"
    assert obj["kind"] == "BacktranslationRun" and obj["apiVersion"] == "humpback.dev/v1alpha1"


def test_create_twice_is_a_409_already_exists(kube_emulator):
    assert http(kube_emulator, "POST", BTR_PATH, tiny_run())[0] == 201
    status, error = http(kube_emulator, "POST", BTR_PATH, tiny_run())
    assert status == 409 and error["reason"] == "AlreadyExists"


def test_generate_name_gets_a_unique_name(kube_emulator):
    body = {"metadata": {"generateName": "kopf-event-"}, "reason": "Test", "message": "hi",
            "involvedObject": {"kind": "BacktranslationRun", "name": "x", "namespace": "default"}}
    names = {http(kube_emulator, "POST", "/api/v1/namespaces/default/events", body)[1]["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3 and all(name.startswith("kopf-event-") for name in names)


def test_core_discovery_names_the_group_version_v1(kube_emulator):
    status, doc = http(kube_emulator, "GET", "/api/v1")
    assert status == 200 and doc["groupVersion"] == "v1"
    assert {"configmaps", "secrets", "services", "events", "namespaces", "pods"} <= {r["name"] for r in doc["resources"]}


def test_discovery_serves_the_crds_with_short_name_and_status_subresource(kube_emulator):
    doc = http(kube_emulator, "GET", "/apis/humpback.dev/v1alpha1")[1]
    by_name = {r["name"]: r for r in doc["resources"]}
    assert by_name["backtranslationruns"]["shortNames"] == ["btr"]
    assert by_name["backtranslationruns"]["namespaced"] is True
    assert by_name["backtranslationruns"]["kind"] == "BacktranslationRun"
    assert by_name["backtranslationruns/status"]["shortNames"] == []
    groups = {g["name"] for g in http(kube_emulator, "GET", "/apis")[1]["groups"]}
    assert {"humpback.dev", "kubeflow.org", "apps", "batch", "events.k8s.io", "apiextensions.k8s.io"} <= groups


def test_list_has_a_list_kind_and_a_resource_version(kube_emulator):
    http(kube_emulator, "POST", BTR_PATH, tiny_run())
    doc = http(kube_emulator, "GET", BTR_PATH)[1]
    assert doc["kind"] == "BacktranslationRunList" and doc["apiVersion"] == "humpback.dev/v1alpha1"
    assert doc["metadata"]["resourceVersion"].isdigit()
    assert [item["metadata"]["name"] for item in doc["items"]] == ["tiny-cpu"]
    assert http(kube_emulator, "GET", "/api/v1/namespaces")[1]["kind"] == "NamespaceList"


def test_status_subresource_and_main_resource_change_only_their_part(kube_emulator):
    created = http(kube_emulator, "POST", BTR_PATH, {**tiny_run(), "status": {"phase": "Failed"}})[1]
    assert "status" not in created  # a create never sets the status of a resource with /status
    path = f"{BTR_PATH}/tiny-cpu"

    status, after_status = merge_patch(kube_emulator, f"{path}/status", {"status": {"phase": "Running"}, "spec": {"baseModel": "x"}})
    assert status == 200
    assert after_status["status"] == {"phase": "Running"}
    assert after_status["spec"]["baseModel"] == "../.cache/tiny-llama"
    assert int(after_status["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert after_status["metadata"]["generation"] == 1

    after_main = merge_patch(kube_emulator, path, {"status": {"phase": "Failed"}, "spec": {"baseModel": "other"}})[1]
    assert after_main["status"] == {"phase": "Running"}
    assert after_main["spec"]["baseModel"] == "other"


def test_generation_moves_on_spec_changes_only(kube_emulator):
    http(kube_emulator, "POST", BTR_PATH, tiny_run())
    path = f"{BTR_PATH}/tiny-cpu"
    labelled = merge_patch(kube_emulator, path, {"metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}}})[1]
    assert labelled["metadata"]["generation"] == 1
    respecced = merge_patch(kube_emulator, path, {"spec": {"curation": {"iterations": 3}}})[1]
    assert respecced["metadata"]["generation"] == 2
    assert respecced["spec"]["curation"] == {"iterations": 3, "mode": "logprobs", "threshold": 2, "maxTokens": 32,
                                           "minDigitMass": 0, "minYield": 0}


def test_a_no_op_patch_writes_nothing(kube_emulator):
    created = http(kube_emulator, "POST", BTR_PATH, tiny_run())[1]
    same = merge_patch(kube_emulator, f"{BTR_PATH}/tiny-cpu", {"spec": {"baseModel": "../.cache/tiny-llama"}})[1]
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_finalizers_hold_a_deleted_object_until_they_are_removed(kube_emulator):
    run = tiny_run()
    run["metadata"]["finalizers"] = ["humpback.dev/children"]
    http(kube_emulator, "POST", BTR_PATH, run)
    path = f"{BTR_PATH}/tiny-cpu"
    status, deleting = http(kube_emulator, "DELETE", path)
    assert status == 200 and deleting["metadata"]["deletionTimestamp"]
    assert http(kube_emulator, "GET", path)[1]["metadata"]["deletionTimestamp"]
    assert merge_patch(kube_emulator, path, {"metadata": {"finalizers": ["humpback.dev/children", "new"]}})[0] == 422
    assert merge_patch(kube_emulator, path, {"metadata": {"finalizers": None}})[0] == 200
    status, error = http(kube_emulator, "GET", path)
    assert status == 404 and error["reason"] == "NotFound"


def test_label_selectors_filter_lists_and_watches(kube_emulator, kube_api):
    batch = kubernetes.client.BatchV1Api(kube_api)
    batch.create_namespaced_job("default", job("a", {"humpback.dev/run": "x", "humpback.dev/stage": "prepare-seed"}))
    batch.create_namespaced_job("default", job("b", {"humpback.dev/run": "y"}))
    batch.create_namespaced_job("default", job("c", {"humpback.dev/run": "x", "humpback.dev/stage": "report"}))
    names = lambda selector: sorted(j.metadata.name for j in batch.list_namespaced_job("default", label_selector=selector).items)  # noqa: E731
    assert names("humpback.dev/run=x") == ["a", "c"]
    assert names("humpback.dev/run=x,humpback.dev/stage!=report") == ["a"]
    assert names("humpback.dev/run in (x,y),!humpback.dev/stage") == ["b"]
    assert names("humpback.dev/stage") == ["a", "c"]

    rv = batch.list_namespaced_job("default").metadata.resource_version
    batch.create_namespaced_job("default", job("d", {"humpback.dev/run": "x"}))
    batch.create_namespaced_job("default", job("e", {"humpback.dev/run": "y"}))
    batch.patch_namespaced_job("b", "default", {"metadata": {"labels": {"humpback.dev/run": "x"}}},
                               _content_type="application/merge-patch+json")
    stream = kubernetes.watch.Watch().stream(batch.list_namespaced_job, "default", label_selector="humpback.dev/run=x",
                                             resource_version=rv, timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "d"), ("ADDED", "b")]


def test_a_watch_without_resource_version_starts_with_the_current_objects(kube_emulator, kube_api):
    batch = kubernetes.client.BatchV1Api(kube_api)
    batch.create_namespaced_job("default", job("a"))
    stream = kubernetes.watch.Watch().stream(batch.list_namespaced_job, "default", timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "a")]


def test_a_watch_sees_modifications_and_deletions_live(kube_emulator, kube_api):
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    rv = custom.list_namespaced_custom_object(*BTR[:2], "default", BTR[2])["metadata"]["resourceVersion"]
    events: list[tuple[str, str]] = []

    def watch() -> None:
        for event in kubernetes.watch.Watch().stream(custom.list_namespaced_custom_object, *BTR[:2], "default", BTR[2],
                                                     resource_version=rv, timeout_seconds=3):
            events.append((event["type"], event["object"]["metadata"]["resourceVersion"]))
            if event["type"] == "DELETED":
                return

    import threading
    thread = threading.Thread(target=watch)
    thread.start()
    created = custom.create_namespaced_custom_object(*BTR[:2], "default", BTR[2], tiny_run())
    patched = custom.patch_namespaced_custom_object_status(*BTR[:2], "default", BTR[2], "tiny-cpu", {"status": {"phase": "Running"}},
                                                          _content_type="application/merge-patch+json")
    custom.delete_namespaced_custom_object(*BTR[:2], "default", BTR[2], "tiny-cpu")
    thread.join(10)
    assert [kind for kind, _ in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[0][1] == created["metadata"]["resourceVersion"]
    assert events[1][1] == patched["metadata"]["resourceVersion"]


def test_json_patch_test_failures_are_422_and_stale_updates_409(kube_emulator):
    created = http(kube_emulator, "POST", BTR_PATH, tiny_run())[1]
    path = f"{BTR_PATH}/tiny-cpu"
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
           {"op": "add", "path": "/metadata/finalizers", "value": ["kopf.zalando.org/KopfFinalizerMarker"]}]
    assert http(kube_emulator, "PATCH", path, ops, "application/json-patch+json")[0] == 422
    ops[0]["value"] = created["metadata"]["resourceVersion"]
    status, patched = http(kube_emulator, "PATCH", path, ops, "application/json-patch+json")
    assert status == 200 and patched["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    # A dict sent as a JSON patch (the kubernetes client's default for dicts) is an error, as on a cluster.
    assert http(kube_emulator, "PATCH", path, {"spec": {}}, "application/json-patch+json")[0] == 400
    status, error = http(kube_emulator, "PUT", path, created)  # created carries the old resourceVersion
    assert status == 409 and error["reason"] == "Conflict"


def test_strategic_merge_patch_merges_lists_by_their_keys(kube_emulator):
    container = {"name": "main", "image": "a", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
    http(kube_emulator, "POST", JOBS_PATH, job("j", container=container))
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "main", "env": [{"name": "B", "value": "3"}, {"name": "A", "$patch": "delete"}]}]}}},
             "metadata": {"finalizers": ["x"]}}
    patched = http(kube_emulator, "PATCH", f"{JOBS_PATH}/j", patch, "application/strategic-merge-patch+json")[1]
    merged = patched["spec"]["template"]["spec"]["containers"]
    assert merged == [{"name": "main", "image": "a", "env": [{"name": "B", "value": "3"}]}]
    # Custom resources take no strategic merge patch, as on a cluster.
    http(kube_emulator, "POST", BTR_PATH, tiny_run())
    assert http(kube_emulator, "PATCH", f"{BTR_PATH}/tiny-cpu", {}, "application/strategic-merge-patch+json")[0] == 415


def test_custom_resources_are_pruned_and_checked_against_the_crd_schema(kube_emulator):
    run = tiny_run()
    run["spec"]["notAField"] = 1
    status, error = http(kube_emulator, "POST", BTR_PATH + "?fieldValidation=Strict", run)
    assert status == 400 and 'unknown field "spec.notAField"' in error["message"]
    assert "notAField" not in http(kube_emulator, "POST", BTR_PATH, run)[1]["spec"]  # pruned without Strict
    status, error = merge_patch(kube_emulator, f"{BTR_PATH}/tiny-cpu/status", {"status": {"phase": "Exploded"}})
    assert status == 422 and error["reason"] == "Invalid" and "status.phase" in error["message"]
    kopf_state = merge_patch(kube_emulator, f"{BTR_PATH}/tiny-cpu/status", {"status": {"kopf": {"progress": {}}, "phase": "Running"}})[1]
    assert kopf_state["status"] == {"phase": "Running"}  # kopf's status storage is pruned, as on a cluster


def test_cel_rules_of_the_crd_are_evaluated(kube_emulator):
    status, body = http(kube_emulator, "POST", BTR_PATH, tiny_run("has.dot"))
    assert status == 422 and "DNS-1123 label" in body["message"]
    assert http(kube_emulator, "POST", BTR_PATH, tiny_run("fine"))[0] == 201


def test_built_in_kinds_are_validated_strictly_and_namespaces_must_exist(kube_emulator):
    bad = job("bad")
    bad["spec"]["backoffLimit"] = "not-a-number"
    status, body = http(kube_emulator, "POST", JOBS_PATH, bad)
    assert status == 422 and "spec.backoffLimit" in body["message"]
    unknown = job("unknown")
    unknown["spec"]["template"]["spec"]["containers"][0]["cpus"] = 2
    assert http(kube_emulator, "POST", JOBS_PATH, unknown)[0] == 422
    status, body = http(kube_emulator, "POST", "/apis/batch/v1/namespaces/nowhere/jobs", job("x"))
    assert status == 404 and body["message"] == 'namespaces "nowhere" not found'


def test_pods_are_refused_by_pod_security_and_quotas(kube_emulator):
    http(kube_emulator, "POST", "/api/v1/namespaces", {"metadata": {"name": "locked", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "main", "image": "busybox", "securityContext": {"privileged": True},
         "resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "8Gi"}}}]}}
    status, body = http(kube_emulator, "POST", "/api/v1/namespaces/locked/pods", pod)
    assert status == 403 and 'violates PodSecurity "restricted:latest": privileged' in body["message"]
    http(kube_emulator, "POST", "/api/v1/namespaces/default/resourcequotas",
         {"metadata": {"name": "small"}, "spec": {"hard": {"requests.memory": "4Gi"}}})
    status, body = http(kube_emulator, "POST", "/api/v1/namespaces/default/pods", pod)
    assert status == 403 and "exceeded quota: small" in body["message"]


def test_dependents_are_garbage_collected_with_their_owner(kube_emulator):
    _, run = http(kube_emulator, "POST", BTR_PATH, tiny_run("owner"))
    owned = job("owned")
    owned["metadata"]["ownerReferences"] = [{"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun",
                                            "name": "owner", "uid": run["metadata"]["uid"], "controller": True}]
    http(kube_emulator, "POST", JOBS_PATH, owned)
    http(kube_emulator, "POST", JOBS_PATH, job("unowned"))
    http(kube_emulator, "DELETE", BTR_PATH + "/owner")
    assert http(kube_emulator, "GET", JOBS_PATH + "/owned")[0] == 404
    assert http(kube_emulator, "GET", JOBS_PATH + "/unowned")[0] == 200


def test_watches_expire_on_demand_with_410_gone(kube_emulator):
    _, listed = http(kube_emulator, "GET", JOBS_PATH)
    kube_emulator.call(lambda handler: handler.expire_watches())
    http(kube_emulator, "POST", JOBS_PATH, job("later"))
    since = listed["metadata"]["resourceVersion"]
    with urllib.request.urlopen(f"{kube_emulator.url}{JOBS_PATH}?watch=true&resourceVersion={since}", timeout=10) as r:
        first = json.loads(r.readline())
    assert first["type"] == "ERROR" and first["object"]["code"] == 410


def test_lists_page_by_limit_and_continue_and_an_expired_token_is_gone(kube_emulator):
    for name in ("e", "a", "d", "c", "b"):
        http(kube_emulator, "POST", JOBS_PATH, job(name))
    names, token, remaining = [], "", []
    while True:
        _, page = http(kube_emulator, "GET", JOBS_PATH + "?limit=2" + (f"&continue={token}" if token else ""))
        names.append([j["metadata"]["name"] for j in page["items"]])
        remaining.append(page["metadata"].get("remainingItemCount"))
        token = page["metadata"].get("continue")
        if not token:
            break
    assert names == [["a", "b"], ["c", "d"], ["e"]] and remaining == [3, 1, None]  # key order, as etcd's
    _, first = http(kube_emulator, "GET", JOBS_PATH + "?limit=2")
    kube_emulator.call(lambda handler: handler.expire_watches())  # compacted: the token is too old now
    status, gone = http(kube_emulator, "GET", JOBS_PATH + f"?limit=2&continue={first['metadata']['continue']}")
    assert status == 410 and gone["reason"] == "Expired"


def test_secret_string_data_is_stored_as_data(kube_emulator, kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_secret("default", {"metadata": {"name": "s3"}, "stringData": {"AWS_ACCESS_KEY_ID": "id"}})
    assert core.read_namespaced_secret("s3", "default").data == {"AWS_ACCESS_KEY_ID": "aWQ="}


def test_a_crd_created_through_the_api_is_served(kube_api, tmp_path):
    with Emulator(crds=[PYTORCHJOB_CRD]) as kube:
        assert http(kube, "GET", "/apis/humpback.dev/v1alpha1")[0] == 404
        crd = yaml.safe_load((REPO_ROOT / "manifests/crd/humpback.dev_backtranslationruns.yaml").read_text())
        assert http(kube, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)[0] == 201
        assert http(kube, "POST", BTR_PATH, tiny_run())[0] == 201
        assert http(kube, "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/backtranslationruns.humpback.dev")[0] == 200
        assert http(kube, "GET", BTR_PATH)[0] == 404


def test_requests_are_counted_by_verb_and_resource(kube_emulator):
    mark = kube_emulator.request_count()
    http(kube_emulator, "POST", BTR_PATH, tiny_run())
    merge_patch(kube_emulator, f"{BTR_PATH}/tiny-cpu/status", {"status": {"phase": "Running"}})
    http(kube_emulator, "GET", BTR_PATH)
    http(kube_emulator, "GET", "/api/v1")
    assert kube_emulator.request_counts(since=mark) == {
        "CREATE backtranslationruns": 1, "PATCH backtranslationruns/status": 1, "LIST backtranslationruns": 1, "GET /api/v1": 1}
    assert [r.verb for r in kube_emulator.requests_since(mark)] == ["create", "patch", "list", "get"]


def test_request_counts_can_leave_a_user_agent_out(kube_emulator):
    mark = kube_emulator.request_count()
    http(kube_emulator, "GET", BTR_PATH, headers={"User-Agent": "some-standin/1"})
    http(kube_emulator, "GET", JOBS_PATH, headers={"User-Agent": "kopf/1"})
    assert kube_emulator.request_counts(since=mark, exclude_user_agent="standin") == {"LIST jobs": 1}
    assert kube_emulator.request_counts(since=mark, user_agent="standin") == {"LIST backtranslationruns": 1}


def test_the_emulator_serves_only_the_crds_it_is_given_and_names_nothing_of_humpback():
    with Emulator() as kube:
        groups = {g["name"] for g in http(kube, "GET", "/apis")[1]["groups"]}
        assert {"apps", "batch", "apiextensions.k8s.io"} <= groups
        assert not groups & {"humpback.dev", "kubeflow.org"}
    source = "\n".join(p.read_text() for p in Path(kube_package.__file__).parent.glob("*.py")).lower()
    for name in ("humpback.dev", "backtranslation", "kubeflow", "pytorchjob", "standin", "manifests/"):
        assert name not in source, name


def test_a_reaction_defined_after_requests_served_without_one_takes_precedence_from_then_on(kube_emulator):
    # Until a test defines a reaction, object requests skip KMock's parsing (only reactions read it).
    import kmock

    mark = kube_emulator.request_count()
    assert http(kube_emulator, "POST", JOBS_PATH, job("before"))[0] == 201
    kube_emulator.handler["post", kmock.resource("batch/v1/jobs")][:1] << 500 << {"kind": "Status", "code": 500}
    assert http(kube_emulator, "POST", JOBS_PATH, job("j"))[0] == 500  # the first create from now fails ...
    assert http(kube_emulator, "POST", JOBS_PATH, job("j"))[0] == 201  # ... the retry goes through
    assert [(r.verb, r.resource) for r in kube_emulator.requests_since(mark)] == [("create", "jobs")] * 3


def test_kmock_reactions_of_a_test_take_precedence(kube_emulator):
    import kmock

    kube_emulator.handler["post", kmock.resource("batch/v1/jobs")][:1] << 500 << {"kind": "Status", "code": 500}
    assert http(kube_emulator, "POST", JOBS_PATH, job("j"))[0] == 500  # the first create fails ...
    assert http(kube_emulator, "POST", JOBS_PATH, job("j"))[0] == 201  # ... the retry goes through


# --- clients --------------------------------------------------------------------------------------


def test_the_kubernetes_client_manages_backtranslationruns(kube_api):
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    args = (*BTR[:2], "default", BTR[2])
    created = custom.create_namespaced_custom_object(*args, tiny_run())
    assert created["spec"] == tiny_run()["spec"]
    assert custom.get_namespaced_custom_object(*args, "tiny-cpu")["metadata"]["uid"] == created["metadata"]["uid"]
    assert [o["metadata"]["name"] for o in custom.list_cluster_custom_object(BTR[0], BTR[1], BTR[2])["items"]] == ["tiny-cpu"]
    custom.patch_namespaced_custom_object(*args, "tiny-cpu", {"spec": {"suspend": True}}, _content_type="application/merge-patch+json")
    status = custom.patch_namespaced_custom_object_status(*args, "tiny-cpu", {"status": {"phase": "Suspended", "observedGeneration": 2}},
                                                         _content_type="application/merge-patch+json")
    assert status["spec"]["suspend"] is True and status["status"]["phase"] == "Suspended"
    custom.delete_namespaced_custom_object(*args, "tiny-cpu")
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.get_namespaced_custom_object(*args, "tiny-cpu")
    assert caught.value.status == 404


def test_the_kubernetes_client_manages_jobs(kube_api):
    batch = kubernetes.client.BatchV1Api(kube_api)
    created = batch.create_namespaced_job("default", job("j1", {"humpback.dev/run": "r"}))
    assert created.metadata.uid and created.metadata.generation == 1
    assert batch.read_namespaced_job("j1", "default").spec.backoff_limit == 0
    batch.patch_namespaced_job_status("j1", "default", {"status": {"active": 1}}, _content_type="application/merge-patch+json")
    assert batch.read_namespaced_job_status("j1", "default").status.active == 1
    batch.delete_namespaced_job("j1", "default", propagation_policy="Background")
    assert batch.list_namespaced_job("default").items == []


KOPF_OPERATOR = '''
import kopf

@kopf.on.create("humpback.dev", "v1alpha1", "backtranslationruns")
def created(spec, patch, **_):
    patch.status["phase"] = "Running"
    patch.status["message"] = "seen " + spec["baseModel"]
'''


def test_a_kopf_operator_sees_a_run_and_patches_its_status(kube_emulator, kube_api, kube_env, tmp_path):
    operator = tmp_path / "operator.py"
    operator.write_text(textwrap.dedent(KOPF_OPERATOR))
    log = tmp_path / "kopf.log"
    kopf = Path(sys.executable).parent / "kopf"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(kopf), "run", "--standalone", "-n", "default", "--verbose", str(operator)],
                                   env=kube_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: b"LISTED" in log.read_bytes() or b"Starting the watch-stream" in log.read_bytes()
                   or process.poll() is not None, timeout=30)
        custom = kubernetes.client.CustomObjectsApi(kube_api)
        custom.create_namespaced_custom_object(*BTR[:2], "default", BTR[2], tiny_run())
        def patched() -> dict[str, Any] | None:
            obj = kube_emulator.get("humpback.dev/v1alpha1/backtranslationruns", "tiny-cpu")
            return obj if (obj.get("status") or {}).get("phase") else None

        obj = wait_until(patched, timeout=30, message=f"kopf did not patch the status; its log:\n{log.read_text()}")
    finally:
        process.terminate()
        process.wait(20)
    assert obj["status"] == {"phase": "Running", "message": "seen ../.cache/tiny-llama"}
    assert "kopf.zalando.org/last-handled-configuration" in obj["metadata"]["annotations"]
    text = log.read_text()
    assert "Handler 'created' succeeded" in text
    assert "Traceback" not in text and "inconsisten" not in text.lower()
    counts = kube_emulator.request_counts(user_agent="kopf")
    assert counts["PATCH backtranslationruns/status"] == 1 and counts["WATCH backtranslationruns"] >= 1


# --- stand-in controllers -------------------------------------------------------------------------


def pytorchjob(name: str, stage: str = "train-m0", command: list[str] | None = None, nproc: str | None = None) -> dict[str, Any]:
    container = {"name": "pytorch", "image": "humpback-runtime",
                 "command": command or ["torchrun", "-m", "humpback_runtime", "stage", stage, "--spec", "env:HUMPBACK_RUN_SPEC"]}
    spec: dict[str, Any] = {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "Never",
                                                               "template": {"spec": {"containers": [container]}}}}}
    if nproc:
        spec["nprocPerNode"] = nproc
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": {"humpback.dev/run": "r", "humpback.dev/stage": stage}}, "spec": spec}


def deployment(name: str, stage: str = "augment") -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {"humpback.dev/stage": stage}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "vllm", "image": "vllm"}]}}}}


def conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}


def create(kube_api, obj: dict[str, Any]) -> None:
    group, _, version = obj["apiVersion"].rpartition("/")
    plural = {"PyTorchJob": "pytorchjobs", "Job": "jobs", "Deployment": "deployments"}[obj["kind"]]
    kubernetes.client.CustomObjectsApi(kube_api).create_namespaced_custom_object(group, version, "default", plural, obj)


def test_standins_finish_children_by_their_stage_policy(kube_emulator, kube_api, make_standins):
    standins = make_standins(policy=stage_policy({"train-m0": "fail", ("prepare-seed", 1): "fail", "augment": "never-ready"}))
    create(kube_api, pytorchjob("r-train-myx-aaaaaa-a1", "train-myx"))
    create(kube_api, pytorchjob("r-train-m0-bbbbbb-a1", "train-m0"))
    create(kube_api, job("r-prepare-seed-cccccc-a1", {"humpback.dev/stage": "prepare-seed"}))
    create(kube_api, job("r-prepare-seed-cccccc-a2", {"humpback.dev/stage": "prepare-seed"}))
    create(kube_api, deployment("r-augment-dddddd-myx", "augment"))
    create(kube_api, deployment("r-evaluate-eeeeee-m1", "evaluate"))
    get = kube_emulator.get
    wait_until(lambda: len([s for s in standins.states().values() if s in ("succeeded", "failed", "available", "never-ready")]) == 6,
               timeout=20, message=f"stand-ins stuck: {standins.states()}")

    ok_train = get("kubeflow.org/v1/pytorchjobs", "r-train-myx-aaaaaa-a1")
    assert conditions(ok_train) == {"Created": "True", "Running": "False", "Succeeded": "True"}
    assert ok_train["status"]["replicaStatuses"] == {"Master": {"succeeded": 1}} and ok_train["status"]["completionTime"]
    bad_train = get("kubeflow.org/v1/pytorchjobs", "r-train-m0-bbbbbb-a1")
    assert conditions(bad_train) == {"Created": "True", "Running": "False", "Failed": "True"}
    failed = next(c for c in bad_train["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PyTorchJobFailed" and failed["lastTransitionTime"] and failed["lastUpdateTime"]

    bad_job = get("batch/v1/jobs", "r-prepare-seed-cccccc-a1")
    assert conditions(bad_job) == {"FailureTarget": "True", "Failed": "True"} and bad_job["status"]["failed"] == 1
    assert {c["reason"] for c in bad_job["status"]["conditions"]} == {"BackoffLimitExceeded"}
    ok_job = get("batch/v1/jobs", "r-prepare-seed-cccccc-a2")
    assert conditions(ok_job) == {"SuccessCriteriaMet": "True", "Complete": "True"}
    assert ok_job["status"]["succeeded"] == 1 and ok_job["status"]["startTime"] and ok_job["status"]["completionTime"]

    stuck = get("apps/v1/deployments", "r-augment-dddddd-myx")
    assert conditions(stuck) == {"Progressing": "False", "Available": "False"}
    assert next(c for c in stuck["status"]["conditions"] if c["type"] == "Progressing")["reason"] == "ProgressDeadlineExceeded"
    ready = get("apps/v1/deployments", "r-evaluate-eeeeee-m1")
    assert conditions(ready) == {"Progressing": "True", "Available": "True"}
    assert ready["status"]["availableReplicas"] == ready["status"]["readyReplicas"] == 1

    assert standins.seen == {"PyTorchJob": ["r-train-myx-aaaaaa-a1", "r-train-m0-bbbbbb-a1"],
                             "Job": ["r-prepare-seed-cccccc-a1", "r-prepare-seed-cccccc-a2"],
                             "Deployment": ["r-augment-dddddd-myx", "r-evaluate-eeeeee-m1"]}
    assert standins.errors == []


def test_held_children_wait_for_release_and_deletion_is_seen(kube_emulator, kube_api, make_standins):
    standins = make_standins(policy=lambda obj: "hold")
    create(kube_api, pytorchjob("held"))
    create(kube_api, job("held-job"))
    create(kube_api, deployment("held-server"))
    wait_until(lambda: standins.states() == {"held": "running", "held-job": "running", "held-server": "progressing"}, timeout=10)
    time.sleep(0.3)
    assert conditions(kube_emulator.get("kubeflow.org/v1/pytorchjobs", "held")) == {"Created": "True", "Running": "True"}
    assert conditions(kube_emulator.get("apps/v1/deployments", "held-server")) == {"Progressing": "True", "Available": "False"}
    standins.release("held", "fail")
    wait_until(lambda: standins.states()["held"] == "failed", timeout=10)
    assert standins.states()["held-job"] == "running"
    standins.release()
    wait_until(lambda: standins.states()["held-job"] == "succeeded" and standins.states()["held-server"] == "available", timeout=10)
    create(kube_api, job("later-job"))  # a release without a name ends holding for good
    wait_until(lambda: standins.states().get("later-job") == "succeeded", timeout=10)
    kubernetes.client.BatchV1Api(kube_api).delete_namespaced_job("held-job", "default")
    wait_until(lambda: standins.states()["held-job"] == "deleted", timeout=10)


# --- the stand-in kubelet -------------------------------------------------------------------------

PROBE = """
import json, os, sys
names = ["SPEC", "TOKEN", "MISSING", "POD", "NAMESPACE", "STAGE", "FROM_TEST", "PET_NNODES", "PET_NODE_RANK",
         "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT", "MASTER_PORT", "WORLD_SIZE", "RANK"]
open(os.environ["OUT"], "w").write(json.dumps({n: os.environ.get(n) for n in names}))
print("probe ran in", os.getcwd())
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def probe_container(out: Path, exit_code: int = 0) -> dict[str, Any]:
    return {
        "name": "main", "image": "humpback-runtime",
        "command": ["python", "-c", PROBE],
        "env": [
            {"name": "OUT", "value": str(out)},
            {"name": "EXIT", "value": str(exit_code)},
            {"name": "SPEC", "valueFrom": {"configMapKeyRef": {"name": "run-spec", "key": "run.yaml"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "judge", "key": "apiKey"}}},
            {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "apiKey", "optional": True}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "STAGE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['humpback.dev/stage']"}}},
        ],
    }


@pytest.fixture
def spec_config(kube_api) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_config_map("default", {"metadata": {"name": "run-spec"}, "data": {"run.yaml": "kind: BacktranslationRun\n"}})
    core.create_namespaced_secret("default", {"metadata": {"name": "judge"}, "stringData": {"apiKey": "sk-test"}})


def test_the_kubelet_runs_a_job_with_its_environment_and_reports_exit_codes(kube_emulator, kube_api, make_standins, spec_config, tmp_path):
    standins = make_standins(kubelet=True, env_overrides={"FROM_TEST": "yes"})
    ok, bad = job("probe-ok", {"humpback.dev/stage": "prepare-seed"}, probe_container(tmp_path / "ok.json")), \
        job("probe-bad", {"humpback.dev/stage": "report"}, probe_container(tmp_path / "bad.json", exit_code=3))
    for obj in (ok, bad):
        obj["spec"]["template"]["metadata"] = {"labels": obj["metadata"]["labels"]}
        create(kube_api, obj)
    wait_until(lambda: set(standins.exit_codes) == {"probe-ok", "probe-bad"} and
               {standins.states()[n] for n in ("probe-ok", "probe-bad")} <= {"succeeded", "failed"}, timeout=60,
               message=f"{standins.states()} {standins.errors}")
    assert standins.exit_codes == {"probe-ok": 0, "probe-bad": 3}
    assert conditions(kube_emulator.get("batch/v1/jobs", "probe-ok"))["Complete"] == "True"
    assert conditions(kube_emulator.get("batch/v1/jobs", "probe-bad"))["Failed"] == "True"
    seen = json.loads((tmp_path / "ok.json").read_text())
    assert seen["SPEC"] == "kind: BacktranslationRun\n" and seen["TOKEN"] == "sk-test" and seen["MISSING"] is None
    assert seen["POD"].startswith("probe-ok-") and seen["NAMESPACE"] == "default" and seen["STAGE"] == "prepare-seed"
    assert seen["FROM_TEST"] == "yes" and seen["PET_NNODES"] is None
    assert f"probe ran in {REPO_ROOT}" in standins.logs["probe-ok"].read_text()
    assert standins.errors == []


def test_the_kubelet_runs_a_pytorchjob_master_with_the_training_operators_environment(kube_emulator, kube_api, make_standins, spec_config, tmp_path):
    standins = make_standins(kubelet=True)
    command = ["python", "-c", PROBE, "--nproc-per-node", "2"]
    obj = pytorchjob("train", "train-m0", command=command)
    obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"] = probe_container(tmp_path / "pt.json")["env"]
    create(kube_api, obj)
    wait_until(lambda: standins.states().get("train") == "succeeded", timeout=60, message=f"{standins.states()} {standins.errors}")
    seen = json.loads((tmp_path / "pt.json").read_text())
    assert seen["POD"] == "train-master-0"
    assert (seen["PET_NNODES"], seen["PET_NODE_RANK"], seen["PET_NPROC_PER_NODE"], seen["PET_MASTER_ADDR"]) == ("1", "0", "2", "127.0.0.1")
    assert seen["PET_MASTER_PORT"] == seen["MASTER_PORT"] and (seen["WORLD_SIZE"], seen["RANK"]) == ("1", "0")
    assert conditions(kube_emulator.get("kubeflow.org/v1/pytorchjobs", "train")) == {"Created": "True", "Running": "False", "Succeeded": "True"}


def test_the_kubelet_waits_for_a_missing_config_map_like_a_real_one(kube_emulator, kube_api, make_standins, tmp_path):
    standins = make_standins(kubelet=True)
    create(kube_api, job("waits", container=probe_container(tmp_path / "w.json")))
    wait_until(lambda: standins.states().get("waits") == "blocked", timeout=10)
    assert "run-spec" in standins.errors[0]
    assert conditions(kube_emulator.get("batch/v1/jobs", "waits")) == {}


def test_the_kubelet_runs_humpback_validate_on_a_file_named_by_a_config_map(kube_emulator, kube_api, make_standins, tmp_path,
                                                                           demo_base_model):
    standins = make_standins(kubelet=True)
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: humpback.dev/v1alpha1\nkind: BacktranslationRun\nmetadata: {name: broken}\nspec: {seed: 3}\n")
    core = kubernetes.client.CoreV1Api(kube_api)
    for name, path in (("good", "examples/tiny-cpu.yaml"), ("bad", str(broken))):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"files-{name}"}, "data": {"path": path}})
        container = {"name": "main", "image": "humpback-runtime", "command": ["humpback", "validate", "$(RUN_FILE)"],
                     "env": [{"name": "RUN_FILE", "valueFrom": {"configMapKeyRef": {"name": f"files-{name}", "key": "path"}}}]}
        create(kube_api, job(f"validate-{name}", container=container))
    wait_until(lambda: len(standins.exit_codes) == 2, timeout=120, message=f"{standins.states()} {standins.errors}")
    wait_until(lambda: {standins.states()[n] for n in ("validate-good", "validate-bad")} == {"succeeded", "failed"}, timeout=10)
    assert standins.exit_codes["validate-good"] == 0 and standins.exit_codes["validate-bad"] != 0
    assert "examples/tiny-cpu.yaml: OK" in standins.logs["validate-good"].read_text()
    assert conditions(kube_emulator.get("batch/v1/jobs", "validate-good"))["Complete"] == "True"
    assert conditions(kube_emulator.get("batch/v1/jobs", "validate-bad"))["Failed"] == "True"

