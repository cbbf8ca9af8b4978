"""The plan: stage DAG, dependency order and fingerprints."""

import pytest

from humpback_runtime.plan import build_plan
from humpback_runtime.spec import parse_run


def run_with(**spec):
    return parse_run({
        "metadata": {"name": "demo"},
        "spec": {"baseModel": "m", "seed": {"source": "s.jsonl"}, "corpus": {"source": "c.jsonl"}, **spec},
    })


def test_two_iterations_give_the_papers_dag():
    plan = build_plan(run_with())
    assert plan.names() == [
        "prepare-seed", "prepare-corpus", "train-myx", "train-m0", "augment",
        "curate-1", "train-m1", "curate-2", "train-m2", "report",
    ]
    assert plan["augment"].deps == ("train-myx", "prepare-corpus")
    assert plan["curate-1"].deps == ("augment", "train-m0")
    assert plan["curate-2"].deps == ("augment", "train-m1")
    assert plan["train-m2"].deps == ("prepare-seed", "curate-2")
    assert plan["curate-2"].serves == "train-m1" and plan["augment"].serves == "train-myx"
    assert plan["train-m2"].iteration == 2 and plan["train-m2"].role == "forward"
    assert {s.kind for s in plan.stages} == {"cpu", "train", "inference"}


def test_every_stage_comes_after_its_dependencies():
    plan = build_plan(run_with(curation={"iterations": 3, "rewrite": {"enabled": True}}, evaluation={"enabled": True}))
    seen = set()
    for stage in plan.stages:
        assert set(stage.deps) <= seen, stage.name
        seen.add(stage.name)
    assert len(seen) == len(plan.stages)


def test_optional_rewrite_and_evaluate_stages():
    plan = build_plan(run_with(curation={"rewrite": {"enabled": True}}, evaluation={"enabled": True}))
    assert plan["rewrite-1"].deps == ("augment", "train-m0")
    assert plan["curate-1"].deps == ("rewrite-1", "train-m0")
    assert plan["evaluate"].deps == ("train-m0", "train-m1", "train-m2")
    assert "evaluate" in plan["report"].deps


EXTERNAL = {"enabled": True, "endpoint": "http://x/v1", "model": "big"}


def test_an_external_rewriter_runs_once_for_all_iterations_after_curation_by_default():
    plan = build_plan(run_with(curation={"iterations": 3, "rewrite": EXTERNAL}))
    rewrites = [s for s in plan.stages if s.family == "rewrite"]
    assert [s.name for s in rewrites] == ["rewrite"] and rewrites[0].deps == ("augment",)
    assert rewrites[0].serves is None and rewrites[0].settings["rewrite"]["order"] == "after"
    for k in (1, 2, 3):  # Nguyen et al.: curate the original pairs, train on the rewritten responses
        assert plan[f"curate-{k}"].deps == ("augment", f"train-m{k - 1}" if k > 1 else "train-m0")
        assert plan[f"train-m{k}"].deps == ("prepare-seed", f"curate-{k}", "rewrite")


def test_external_rewrite_before_curation_is_one_stage_that_every_curation_reads():
    plan = build_plan(run_with(curation={"rewrite": {**EXTERNAL, "order": "before"}}))
    assert [s.name for s in plan.stages if s.family == "rewrite"] == ["rewrite"]
    assert plan["curate-1"].deps == ("rewrite", "train-m0") and plan["curate-2"].deps == ("rewrite", "train-m1")
    assert plan["train-m2"].deps == ("prepare-seed", "curate-2")


def test_self_rewriting_after_curation_rewrites_each_selection():
    plan = build_plan(run_with(curation={"rewrite": {"enabled": True, "order": "after"}}))
    assert plan["curate-1"].deps == ("augment", "train-m0")
    assert plan["rewrite-1"].deps == ("curate-1", "train-m0") and plan["rewrite-1"].serves == "train-m0"
    assert plan["train-m1"].deps == ("prepare-seed", "curate-1", "rewrite-1")
    assert plan["rewrite-2"].deps == ("curate-2", "train-m1")


def test_plan_is_deterministic():
    a, b = build_plan(run_with()), build_plan(run_with())
    assert [s.fingerprint for s in a.stages] == [s.fingerprint for s in b.stages]


def changed(before, after):
    fa = {s.name: s.fingerprint for s in build_plan(before).stages}
    fb = {s.name: s.fingerprint for s in build_plan(after).stages}
    return sorted(n for n in fa if fa[n] != fb.get(n))


def test_a_setting_changes_its_stage_and_everything_downstream_only():
    # The threshold selects among stored scores: curate-1 keeps its scores, train-m1 re-selects.
    assert changed(run_with(), run_with(curation={"threshold": 4})) == sorted(
        ["train-m1", "curate-2", "train-m2", "report"])
    assert changed(run_with(), run_with(corpus={"source": "c.jsonl", "minChars": 500})) == sorted(
        ["prepare-corpus", "augment", "curate-1", "train-m1", "curate-2", "train-m2", "report"])
    assert changed(run_with(), run_with(training={"backward": {"steps": 3}})) == sorted(
        ["train-myx", "augment", "curate-1", "train-m1", "curate-2", "train-m2", "report"])


def test_system_prompt_tags_change_the_forward_models_but_not_myx():
    diff = changed(run_with(), run_with(systemPrompts={"seed": "Be an assistant."}))
    assert "train-myx" not in diff and "augment" not in diff
    assert {"train-m0", "train-m1", "train-m2"} <= set(diff)


@pytest.mark.parametrize("spec", [
    {"resources": {"training": {"gpusPerNode": 1}}},
    {"retries": {"limit": 9}},
    {"storage": {"uri": "s3://elsewhere/runs"}},
    {"suspend": True},
    {"inference": {"engine": "transformers", "concurrency": 3}},
])
def test_operational_settings_do_not_change_fingerprints(spec):
    assert changed(run_with(), run_with(**spec)) == []


def test_upstream_and_downstream():
    plan = build_plan(run_with())
    assert plan.upstream("augment") == ["prepare-seed", "prepare-corpus", "train-myx", "augment"]
    assert plan.downstream("train-m1") == ["train-m1", "curate-2", "train-m2", "report"]
    with pytest.raises(KeyError, match="no stage 'nope'"):
        plan["nope"]


def test_spec_and_plan_stay_light_for_the_operator():
    # The operator imports these two modules; they must never drag in the model or data stack.
    import subprocess
    import sys

    code = (
        "import sys, humpback_runtime.spec, humpback_runtime.plan\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'deepspeed', 'datasets', 'boto3', 'pyarrow',"
        " 'datasketch', 'numpy', 'kopf') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_template_change_reruns_the_stages_that_use_prompts(monkeypatch):
    import humpback_runtime.plan as plan_module

    before = {s.name: s.fingerprint for s in build_plan(run_with()).stages}
    monkeypatch.setattr(plan_module, "TEMPLATE_VERSION", plan_module.TEMPLATE_VERSION + 1)
    after = {s.name: s.fingerprint for s in build_plan(run_with()).stages}
    assert before["prepare-seed"] == after["prepare-seed"] and before["prepare-corpus"] == after["prepare-corpus"]
    assert all(before[n] != after[n] for n in before if n.startswith(("train", "augment", "curate")))


# --- content fingerprints (issue 10) ---------------------------------------------------------------

def changed_by_data(before: dict, after: dict):
    fa = {s.name: s.fingerprint for s in build_plan(run_with(), before).stages}
    fb = {s.name: s.fingerprint for s in build_plan(run_with(), after).stages}
    return sorted(n for n in fa if fa[n] != fb[n])


def test_an_edited_input_changes_exactly_the_stages_it_feeds():
    ids = {"s.jsonl": "sha256:seed-1", "c.jsonl": "sha256:corpus-1"}
    assert changed_by_data(ids, {**ids, "c.jsonl": "sha256:corpus-2"}) == sorted(
        ["prepare-corpus", "augment", "curate-1", "train-m1", "curate-2", "train-m2", "report"])
    seed_changed = changed_by_data(ids, {**ids, "s.jsonl": "sha256:seed-2"})
    assert "prepare-corpus" not in seed_changed and {"prepare-seed", "train-myx", "train-m0"} <= set(seed_changed)


def test_without_identities_the_plan_is_the_operators_spec_only_plan():
    spec_only = build_plan(run_with())
    assert build_plan(run_with(), {"s.jsonl": None, "c.jsonl": None}).stages == spec_only.stages
    assert spec_only["prepare-seed"].data == {} and spec_only["prepare-seed"].sources == ("s.jsonl",)


def test_stale_reasons_say_why():
    from humpback_runtime.plan import fingerprint_parts, stale_reasons

    ids = {"s.jsonl": "sha256:1", "c.jsonl": "sha256:2"}
    old = build_plan(run_with(), ids)
    manifest = {s.name: {"fingerprint": s.fingerprint, "fingerprintParts": fingerprint_parts(s)} for s in old.stages}
    new = build_plan(run_with(corpus={"source": "c.jsonl", "minChars": 500}), {**ids, "s.jsonl": "sha256:3"})
    assert stale_reasons(new["prepare-seed"], manifest["prepare-seed"]) == ["input changed: s.jsonl"]
    assert stale_reasons(new["prepare-corpus"], manifest["prepare-corpus"]) == ["settings changed"]
    assert stale_reasons(new["augment"], manifest["augment"]) == ["upstream changed: train-myx, prepare-corpus"]
    assert stale_reasons(old["augment"], manifest["augment"]) == []
    assert stale_reasons(old["augment"], None) == ["missing"]


def test_selection_settings_stay_out_of_the_scoring_fingerprint():
    from humpback_runtime.plan import selection_id

    base = run_with(curation={"mode": "logprobs"})
    for change in ({"threshold": 4}, {"selectBy": "expected"}, {"minDigitMass": 0.2}, {"minYield": 0.1}):
        other = build_plan(run_with(curation={"mode": "logprobs", **change}))
        assert other["curate-1"].fingerprint == build_plan(base)["curate-1"].fingerprint, change
        assert other["train-m1"].fingerprint != build_plan(base)["train-m1"].fingerprint, change
    assert build_plan(run_with(curation={"mode": "logprobs", "topLogprobs": 5}))["curate-1"].fingerprint != \
        build_plan(base)["curate-1"].fingerprint  # what the server returns changes the scores
    assert selection_id(build_plan(base)["train-m1"].settings["selection"]) == "threshold-5-argmax-mass-0.5"
    assert selection_id(build_plan(run_with())["train-m1"].settings["selection"]) == "threshold-5"


def test_until_needs_only_the_upstream_stages_and_force_takes_the_downstream():
    from humpback_runtime.cli import forced_stages

    plan = build_plan(run_with())
    assert plan.upstream("prepare-corpus") == ["prepare-corpus"]
    assert plan.upstream("train-m0") == ["prepare-seed", "train-m0"]
    assert forced_stages(plan, ["train-myx"], None) == {"train-myx", "augment", "curate-1", "train-m1", "curate-2",
                                                        "train-m2", "report"}
    assert forced_stages(plan, None, "train-m0") == set(plan.names()[plan.names().index("train-m0"):])


def test_training_strategy_fingerprints_only_when_not_the_default():
    # strategy came after runs existed: the default leaves their fingerprints as they were.
    before = {s.name: s.fingerprint for s in build_plan(run_with()).stages}
    explicit = {s.name: s.fingerprint for s in build_plan(run_with(training={"seed": {"strategy": "deepspeed"}})).stages}
    fsdp = {s.name: s.fingerprint for s in build_plan(run_with(training={"seed": {"strategy": "fsdp"}})).stages}
    assert explicit == before
    assert fsdp["train-m0"] != before["train-m0"] and fsdp["train-myx"] == before["train-myx"]
    assert "strategy" not in build_plan(run_with())["train-m0"].settings["training"]
