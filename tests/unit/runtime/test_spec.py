"""The BacktranslationRun spec: defaults, validation errors naming the field, the CLI's validate."""

from pathlib import Path

import pytest
import yaml

from humpback_runtime.cli import main
from humpback_runtime.spec import PAPER_STEPS_BY_SIZE, SpecError, dump_run, load_run, parse_run

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def minimal(**spec):
    return {
        "apiVersion": "humpback.dev/v1alpha1",
        "kind": "BacktranslationRun",
        "metadata": {"name": "demo"},
        "spec": {"baseModel": "m", "seed": {"source": "s.jsonl"}, "corpus": {"source": "c.jsonl"}, **spec},
    }


def errors_of(data) -> list[str]:
    with pytest.raises(SpecError) as exc:
        parse_run(data)
    return exc.value.errors


def test_defaults_are_the_papers():
    run = parse_run(minimal())
    s = run.spec
    assert run.namespace == "default"
    assert (s.corpus.min_chars, s.corpus.max_chars) == (600, 3000)
    assert (s.curation.iterations, s.curation.threshold, s.curation.mode) == (2, 5, "generate")
    assert (s.augmentation.temperature, s.augmentation.top_p) == (0.7, 0.9)
    t = s.training.forward
    assert (t.learning_rate, t.final_learning_rate, t.weight_decay, t.batch_size) == (1e-5, 9e-6, 0.1, 32)
    assert s.system_prompts.seed == "Answer in the style of an AI Assistant."
    assert s.system_prompts.augmented == "Answer with knowledge from web search."
    assert s.storage.uri == "./runs"
    assert s.seed.max_examples == 3200
    assert s.resources.training.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert s.suspend is False


@pytest.mark.parametrize(
    ("n", "steps"),
    [(100, 30), (1600, 600), (3200, 500), (3201, 600), (12800, 600), (25600, 1200), (51200, 1600), (10**6, 1600)],
)
def test_steps_follow_the_papers_schedule(n, steps):
    assert parse_run(minimal()).spec.training.forward.steps_for(n) == steps
    assert PAPER_STEPS_BY_SIZE[3] == (3200, 32, 500)


def test_fixed_steps_override_the_schedule():
    run = parse_run(minimal(training={"seed": {"steps": 7}}))
    assert run.spec.training.seed.steps_for(10**6) == 7
    assert run.spec.training.backward.steps_for(10**6) == 1600


def test_unknown_field_is_an_error_naming_its_path():
    errs = errors_of(minimal(curation={"treshold": 4}))
    assert errs == ["spec.curation.treshold: unknown field (check the spelling; fields are camelCase)"]


def test_every_error_is_reported_with_its_path():
    data = minimal(curation={"threshold": 7, "mode": "vibes"})
    data["metadata"]["name"] = "Not_A_Name"
    data["spec"]["corpus"].update(minChars=5000, maxChars=100)
    del data["spec"]["baseModel"]
    errs = errors_of(data)
    joined = "\n".join(errs)
    assert len(errs) == 5, joined
    assert any(e.startswith("metadata.name: must be a DNS-1123 label") for e in errs)
    assert "spec.baseModel: required field is missing" in errs
    assert any(e.startswith("spec.curation.threshold: Input should be less than or equal to 5 (got 7)") for e in errs)
    assert any(e.startswith("spec.curation.mode: Input should be 'generate' or 'logprobs'") for e in errs)
    assert "spec.corpus: minChars (5000) must not exceed maxChars (100)" in errs


def test_list_positions_appear_in_paths():
    errs = errors_of(minimal(resources={"training": {"tolerations": [{"effect": "Sometimes"}]}}))
    assert errs[0].startswith("spec.resources.training.tolerations[0].effect:")


def test_credentials_are_never_part_of_the_spec():
    errs = errors_of(minimal(storage={"s3": {"accessKey": "AKIA..."}}))
    assert errs == ["spec.storage.s3.accessKey: unknown field (check the spelling; fields are camelCase)"]
    assert errors_of(minimal(storage={"s3": {"credentialsSecret": "Not A Secret"}}))[0].startswith(
        "spec.storage.s3.credentialsSecret: must be a Kubernetes Secret name"
    )


def test_wrong_api_version_and_non_mapping_documents():
    data = minimal()
    data["apiVersion"] = "humpback.dev/v2"
    assert errors_of(data)[0].startswith("apiVersion: Input should be 'humpback.dev/v1alpha1'")
    assert errors_of(["not", "a", "mapping"])[0].startswith("(document): expected a mapping")


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("apiVersion: humpback.dev/v1alpha1\nspec:\n  seed: [unclosed\n")
    with pytest.raises(SpecError) as exc:
        load_run(bad)
    assert "line " in exc.value.errors[0] and "not valid YAML" in exc.value.errors[0]


def test_dump_round_trips_in_camel_case():
    run = parse_run(minimal())
    dumped = dump_run(run)
    assert dumped["spec"]["curation"]["threshold"] == 5
    assert "baseModel" in dumped["spec"] and "base_model" not in dumped["spec"]
    assert parse_run(dumped) == run


def test_live_object_metadata_and_status_are_accepted():
    data = minimal()
    data["metadata"].update(uid="1234", resourceVersion="7", generation=2, labels={"kueue.x-k8s.io/queue-name": "q"})
    data["status"] = {"phase": "Running"}
    run = parse_run(data)
    assert run.metadata.labels == {"kueue.x-k8s.io/queue-name": "q"}
    assert "status" not in dump_run(run)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_prints_every_error_and_fails(tmp_path, capsys):
    data = minimal(curation={"threshold": 0, "iterations": 0})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.curation.threshold" in err and "spec.curation.iterations" in err and "2 error(s)" in err


# --- the paper's settings (Li et al. 2023, arXiv 2308.06259, section 3.1 and the appendix table) ---

def test_training_defaults_are_the_papers():
    from humpback_runtime.spec import TrainingSpec

    t = TrainingSpec()
    assert (t.learning_rate, t.final_learning_rate, t.weight_decay, t.batch_size, t.dropout) == (1e-5, 9e-6, 0.1, 32, 0.1)
    assert (t.adam_beta1, t.adam_beta2) == (0.9, 0.999)  # not in the paper: PyTorch's defaults, configurable
    assert TrainingSpec(dropout=0.0, adamBeta2=0.95).adam_beta2 == 0.95


def test_small_training_sets_get_the_papers_batch_8_rows():
    from humpback_runtime.spec import TrainingSpec

    t = TrainingSpec()
    table = {100: (8, 30), 800: (8, 300), 1600: (8, 600), 3200: (32, 500), 6400: (32, 600),
             12800: (32, 600), 25600: (32, 1200), 51200: (32, 1600)}
    for n, (batch, steps) in table.items():
        assert (t.batch_size_for(n), t.steps_for(n)) == (batch, steps), n
    assert (t.batch_size_for(64), t.steps_for(64)) == (8, 30)
    assert (t.batch_size_for(2000), t.steps_for(2000)) == (32, 500)  # between rows: the next row up
    resolved = TrainingSpec(perDeviceBatchSize=16).for_size(1000)
    assert (resolved.batch_size, resolved.steps, resolved.per_device_batch_size) == (8, 600, 8)
    fixed = TrainingSpec(steps=7, batchSize=16).for_size(100)  # fixed steps: the rows do not apply
    assert (fixed.batch_size, fixed.steps) == (16, 7)
