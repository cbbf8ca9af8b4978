"""A create that meets an existing object (409) adopts it only if it is this run's, and a server's
API key Secret gets a fresh random key only when the operator creates it."""

from __future__ import annotations

from humpback_operator.backtranslationrun import with_generated_key
from humpback_operator.kube import adoption_problem

OWNER = {"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "name": "demo", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}


def child(kind="Job", owner=OWNER, fingerprint="fp1"):
    meta = {"name": "demo-prepare-seed-abc-a1", "namespace": "ns", "annotations": {"humpback.dev/fingerprint": fingerprint}}
    if owner:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": kind, "metadata": meta}


def test_an_object_with_our_owner_and_fingerprint_is_adopted():
    assert adoption_problem(child(), child()) is None


def test_an_object_of_another_owner_or_none_is_not_adopted():
    other = dict(OWNER, name="someone-else", uid="uid-2")
    assert "its controller is BacktranslationRun someone-else (uid uid-2)" in adoption_problem(child(), child(owner=other))
    assert "no owner" in adoption_problem(child(), child(owner=None))


def test_an_object_with_another_fingerprint_is_not_adopted_except_the_spec_configmap():
    assert "fingerprint is fp0, expected fp1" in adoption_problem(child(), child(fingerprint="fp0"))
    assert adoption_problem(child("ConfigMap"), child("ConfigMap", fingerprint="fp0")) is None


def test_a_generated_key_is_random_per_creation_and_only_for_marked_secrets():
    secret = child("Secret")
    secret["metadata"]["annotations"]["humpback.dev/generated-key"] = "apiKey"
    first, second = with_generated_key(secret), with_generated_key(secret)
    assert len(first["stringData"]["apiKey"]) >= 32 and first["stringData"] != second["stringData"]
    assert "stringData" not in secret  # the decision's object is left as it was
    assert with_generated_key(child("Job")) == child("Job")
