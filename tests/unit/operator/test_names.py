"""Child names: at most 63 characters, deterministic, unique, valid as Service names; labels."""

from __future__ import annotations

import re

import pytest
from humpback_operator.names import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGED_BY,
    QUEUE_LABEL,
    child_labels,
    dns_name,
    model_short,
    server_name,
    spec_configmap_name,
    stage_child_name,
)

from humpback_runtime.plan import build_plan
from humpback_runtime.spec import parse_run

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def make_run(name: str = "demo", labels: dict | None = None):
    return parse_run({
        "apiVersion": "humpback.dev/v1alpha1",
        "kind": "BacktranslationRun",
        "metadata": {"name": name, "namespace": "team-a", "labels": labels or {}},
        "spec": {"baseModel": "org/model", "seed": {"source": "s3://b/seed.jsonl"},
                 "corpus": {"source": "s3://b/corpus/"}, "storage": {"uri": "s3://b/runs"}},
    })


def test_short_names_are_the_parts_joined_by_dashes():
    assert dns_name("demo", "train-m0", "abc123", "a1") == "demo-train-m0-abc123-a1"


@pytest.mark.parametrize("length", range(1, 200))
def test_names_never_exceed_63_characters_and_stay_dns_1035_labels(length):
    run = ("r" + "x" * 62)[: min(length, 63)]  # run names are at most 63 characters
    stage = "curate-" + "9" * max(0, length - 63)
    name = dns_name(run, stage, "0a1b2c", "a12")
    assert len(name) <= 63
    assert DNS_1035.match(name), name


def test_long_names_are_cut_and_end_with_a_hash_of_the_full_name():
    parts = ("r" * 60, "train-m0", "abcdef", "a1")
    name = dns_name(*parts)
    assert len(name) == 63
    assert re.fullmatch(r"r+-[0-9a-f]{8}", name), name
    assert name == dns_name(*parts)  # deterministic


def test_a_cut_never_leaves_a_double_or_trailing_dash():
    # The cut falls right after a dash: the head must not end with one.
    name = dns_name("a" * 53, "bcdefghijklmnop")
    assert "--" not in name and not name.endswith("-")
    assert len(name) <= 63


def test_distinct_long_inputs_get_distinct_names():
    base = "r" * 58
    names = {dns_name(base, "train-m0", "abcdef", f"a{attempt}") for attempt in range(1, 200)}
    assert len(names) == 199


def test_names_starting_with_a_digit_get_a_letter_prefix_for_services():
    name = dns_name("7b-run", "augment", "abcdef", "myx")
    assert name == "btr-7b-run-augment-abcdef-myx"
    assert DNS_1035.match(name)
    assert DNS_1035.match(dns_name("9" * 63, "augment", "abcdef", "myx"))


def test_child_names_follow_the_documented_patterns():
    run = make_run()
    plan = build_plan(run)
    curate = plan["curate-1"]
    fp = curate.fingerprint[:6]
    assert spec_configmap_name("demo") == "demo-spec"
    assert stage_child_name("demo", curate, 3) == f"demo-curate-1-{fp}-a3"
    assert server_name("demo", curate, "train-m0") == f"demo-curate-1-{fp}-m0"
    assert server_name("demo", plan["augment"], "train-myx").endswith("-myx")


def test_model_short_drops_the_train_prefix():
    assert model_short("train-myx") == "myx"
    assert model_short("train-m0") == "m0"
    assert model_short("train-m12") == "m12"


def test_a_changed_fingerprint_changes_the_child_name():
    plan_a = build_plan(make_run())
    run_b = make_run()
    run_b.spec.curation.max_tokens = 99  # a scoring setting (a threshold only re-selects, in train-mk)
    plan_b = build_plan(run_b)
    assert stage_child_name("demo", plan_a["curate-1"], 1) != stage_child_name("demo", plan_b["curate-1"], 1)
    assert stage_child_name("demo", plan_a["prepare-seed"], 1) == stage_child_name("demo", plan_b["prepare-seed"], 1)


def test_labels_copy_only_the_kueue_queue_name_from_the_run():
    run = make_run(labels={QUEUE_LABEL: "gpu-queue", "team": "nlp", "app.kubernetes.io/name": "x"})
    labels = child_labels(run, "train-m0", "train", attempt="2")
    assert labels == {
        LABEL_RUN: "demo",
        LABEL_STAGE: "train-m0",
        LABEL_COMPONENT: "train",
        LABEL_ATTEMPT: "2",
        **MANAGED_BY,
        QUEUE_LABEL: "gpu-queue",
    }


def test_labels_have_no_queue_name_when_the_run_has_none():
    labels = child_labels(make_run(labels={"team": "nlp"}), "prepare-seed", "job")
    assert QUEUE_LABEL not in labels and "team" not in labels
    assert labels[LABEL_STAGE] == "prepare-seed"
