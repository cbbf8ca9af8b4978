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
def test_examples_validate(path, capsys, request):
    if "tiny-cpu" in path.name:  # its baseModel is a local folder: validate checks that it exists
        request.getfixturevalue("demo_base_model")
    assert main(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_prints_every_error_and_fails(tmp_path, capsys):
    data = minimal(curation={"threshold": 0, "iterations": 0})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.curation.threshold" in err and "spec.curation.iterations" in err and "2 error(s)" in err


# --- validate means validate (issue 10) -------------------------------------------------------------

@pytest.mark.parametrize("spec, field, words", [
    ({"storage": {"uri": "gs://bucket/runs"}}, "spec.storage.uri", "unsupported scheme gs://"),
    ({"storage": {"uri": "ftp://host/runs"}}, "spec.storage.uri", "unsupported scheme ftp://"),
    ({"seed": {"source": "ftp://host/seed.jsonl"}}, "spec.seed.source", "unsupported scheme ftp://"),
    ({"corpus": {"source": "gs://bucket/c4/"}}, "spec.corpus.source", "unsupported scheme gs://"),
    ({"baseModel": "gs://bucket/model"}, "spec.baseModel", "unsupported scheme gs://"),
    ({"baseModel": "not a hub id!"}, "spec.baseModel", "neither a Hugging Face hub id"),
    ({"baseModel": "owner/name/extra:tag"}, "spec.baseModel", "no such"),  # looks local: checked on disk
    ({"training": {"seed": {"batchSize": 32, "perDeviceBatchSize": 3}}}, "spec.training.seed",
     "batchSize (32) must be a multiple of perDeviceBatchSize (3)"),
    ({"corpus": {"source": "c.jsonl", "maxDocuments": 10**30}}, "spec.corpus.maxDocuments", "less than or equal"),
    ({"inference": {"concurrency": 10**9}}, "spec.inference.concurrency", "less than or equal to 4096"),
    ({"augmentation": {"maxTokens": 10**9}}, "spec.augmentation.maxTokens", "less than or equal"),
    ({"training": {"forward": {"steps": 10**12}}}, "spec.training.forward.steps", "less than or equal"),
])
def test_validate_reports_what_can_be_known_without_running(tmp_path, capsys, spec, field, words):
    (tmp_path / "s.jsonl").write_text("{}\n")
    (tmp_path / "c.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal(**spec)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if ln.strip().startswith(field)), None)
    assert line is not None and words in line, err


def test_validate_names_missing_local_inputs_and_base_model_with_the_resolved_path(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "project"
    runs.mkdir()
    (runs / "c.jsonl").write_text("{}\n")
    path = runs / "run.yaml"
    path.write_text(yaml.safe_dump(minimal(baseModel="./models/llama", seed={"source": "data/seed.jsonl"},
                                           evaluation={"enabled": True, "sets": [{"name": "mine", "source": "evals/*.jsonl"}]})))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"spec.seed.source: no such file or folder: {runs / 'data' / 'seed.jsonl'}" in err
    assert f"spec.baseModel: no such model folder: {runs / 'models' / 'llama'}" in err
    assert f"spec.evaluation.sets[0].source: no file matches {runs / 'evals' / '*.jsonl'}" in err
    assert "spec.corpus.source" not in err  # c.jsonl is next to the run file: found
    assert "relative paths are taken against the run file's folder" in err


def test_relative_paths_resolve_against_the_run_files_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "model").mkdir()
    path = project / "run.yaml"
    path.write_text(yaml.safe_dump(minimal(baseModel="./model", seed={"source": "data/s.jsonl"},
                                           storage={"uri": "out"})))
    monkeypatch.chdir(tmp_path)
    run = load_run(path)
    assert run.local_path(run.spec.seed.source) == str(project / "data" / "s.jsonl")
    assert run.base_model_ref() == str(project / "model")
    from humpback_runtime.context import RunContext

    assert RunContext.create(run, identify_inputs=False).storage_uri == str(project / "out")
    hub = parse_run(minimal(baseModel="meta-llama/Llama-2-7b-hf"))
    assert hub.base_model_ref() == "meta-llama/Llama-2-7b-hf"  # a hub id stays one
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


def test_training_strategy_is_validated_naming_the_field():
    assert parse_run(minimal(training={"forward": {"strategy": "fsdp"}})).spec.training.forward.strategy == "fsdp"
    assert parse_run(minimal()).spec.training.forward.strategy == "deepspeed"
    errors = errors_of(minimal(training={"forward": {"strategy": "megatron"}}))
    assert any("training.forward.strategy" in e and "fsdp" in e for e in errors), errors
    errors = errors_of(minimal(training={"seed": {"strategy": "fsdp", "lora": {"rank": 8}}}))
    assert any("training.seed" in e and "lora needs strategy deepspeed" in e for e in errors), errors
