"""spec.tracking: every stage's numbers reach TensorBoard event files in the store and an MLflow
file store, run in-process on the data stage prepare-seed (seconds). The training curves and W&B
are in tests/integration/test_training_tracking.py, on a real training run."""

from __future__ import annotations

import copy
import logging
import socket
from pathlib import Path

import pytest
import yaml

from humpback_runtime import tracking
from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError
from humpback_runtime.plan import build_plan
from humpback_runtime.spec import SpecError, parse_run
from humpback_runtime.stages import run_stage

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())


def run_doc(**tracking_spec) -> dict:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"]["seed"]["source"] = str(ROOT / "examples" / doc["spec"]["seed"]["source"])
    doc["spec"]["corpus"]["source"] = str(ROOT / "examples" / doc["spec"]["corpus"]["source"])
    if tracking_spec:
        doc["spec"]["tracking"] = tracking_spec
    return doc


def context(tmp_path: Path, **tracking_spec) -> RunContext:
    return RunContext.create(parse_run(run_doc(**tracking_spec)), str(tmp_path / "runs"))


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def file_store_env(monkeypatch):
    """Leave no MLflow setting behind (tracking.py opts in to MLflow's file store in os.environ)."""
    pytest.importorskip("mlflow")
    for name in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_stage_metrics_are_every_number_of_the_manifest_fields_flattened():
    result = {"outputs": {"count": 50, "format": "jsonl", "records": ["a"]}, "counts": {"kept": 50, "read": 80},
              "yield": {"fraction": 0.625, "warnings": []}, "packing": True, "metrics": {"mfu": None, "steps": 4},
              "objects": {"part-00000.jsonl": {"bytes": 10}}, "timings": {"seconds": 1.0}}
    assert tracking.stage_metrics(result) == {
        "stage/outputs/count": 50.0, "stage/counts/kept": 50.0, "stage/counts/read": 80.0,
        "stage/yield/fraction": 0.625, "stage/metrics/steps": 4.0}


@pytest.mark.parametrize("tracking_spec, error", [
    ({"mlflow": {"trackingUri": "sqlite:///mlflow.db"}}, "spec.tracking.mlflow.trackingUri: unsupported tracking URI"),
    ({"mlflow": {"trackingUri": " "}}, "spec.tracking.mlflow.trackingUri: must be an MLflow tracking URI"),
    ({"mlflow": {}}, "spec.tracking.mlflow.trackingUri: required field is missing"),
    ({"mlflow": {"trackingUri": "https://m", "credentialsSecret": "My_Secret"}},
     "spec.tracking.mlflow.credentialsSecret: must be a Kubernetes object name"),
    ({"wandb": {"project": "team/project"}}, "spec.tracking.wandb.project: String should match pattern"),
    ({"wandb": {"project": "p", "mode": "disabled"}}, "spec.tracking.wandb.mode: Input should be 'online' or 'offline'"),
    ({"wandb": {"project": "p", "baseUrl": "wandb.corp"}}, "spec.tracking.wandb.baseUrl: String should match pattern"),
    ({"tensorboard": {"enabled": True, "logdir": "x"}}, "spec.tracking.tensorboard.logdir: unknown field"),
])
def test_invalid_tracking_settings_are_refused_naming_the_field(tracking_spec, error):
    with pytest.raises(SpecError) as info:
        parse_run(run_doc(**tracking_spec))
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors


def test_trackers_change_no_stage_fingerprint():
    plain = build_plan(parse_run(run_doc()))
    tracked = build_plan(parse_run(run_doc(tensorboard={"enabled": False}, mlflow={"trackingUri": "https://m"},
                                           wandb={"project": "p", "mode": "offline"})))
    assert [(s.name, s.fingerprint) for s in plain.stages] == [(s.name, s.fingerprint) for s in tracked.stages]


def test_a_stages_counts_reach_tensorboard_in_the_store_and_an_mlflow_file_store(tmp_path, file_store_env):
    from mlflow.tracking import MlflowClient

    ctx = context(tmp_path, mlflow={"trackingUri": f"file:{tmp_path / 'mlruns'}", "experiment": "humpback-tests"})
    manifest = run_stage(ctx, "prepare-seed")
    pairs = manifest["counts"]["pairs"]
    assert pairs == 64

    # TensorBoard: event files under the stage's prefix, listed in its manifest like every output.
    folder = tmp_path / "runs" / "default" / "tiny-cpu" / "prepare-seed" / "tensorboard"
    events = scalars(folder)
    assert events["stage/counts/pairs"] == [(0, 64.0)]
    assert events["stage/outputs/count"] == [(0, 64.0)] and "stage/yield/fraction" in events
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in manifest["objects"])
    assert manifest["tracking"]["tensorboard"]["uri"] == str(folder)

    # MLflow: one run named after the stage, tagged with the run, its numbers as metrics.
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("humpback-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == manifest["tracking"]["mlflow"]["runId"]
    assert (run.info.run_name, run.info.status) == ("prepare-seed", "FINISHED")
    assert run.data.tags["humpback.run"] == "tiny-cpu" and run.data.tags["humpback.namespace"] == "default"
    assert run.data.tags["humpback.fingerprint"] == ctx.plan["prepare-seed"].fingerprint
    assert run.data.metrics["stage/counts/pairs"] == 64 and run.data.metrics["stage/outputs/count"] == 64
    assert run.data.params["humpback.seed.maxExamples"] == "64"  # the stage's settings as parameters

    # Run again (same fingerprint, as a retried attempt): the same MLflow run continues, no second one.
    again = run_stage(ctx, "prepare-seed", force=True)
    assert again["tracking"]["mlflow"]["runId"] == run.info.run_id
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert len(client.get_metric_history(run.info.run_id, "stage/counts/pairs")) == 2


def test_without_tensorboard_a_stage_writes_no_event_files(tmp_path):
    manifest = run_stage(context(tmp_path, tensorboard={"enabled": False}), "prepare-seed")
    assert not any(k.startswith("tensorboard/") for k in manifest["objects"])
    assert not (tmp_path / "runs" / "default" / "tiny-cpu" / "prepare-seed" / "tensorboard").exists()
    assert "tracking" not in manifest


def test_an_unreachable_mlflow_server_costs_a_warning_not_the_stage(tmp_path, file_store_env, monkeypatch, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.WARNING, logger="humpback_runtime.tracking")
    manifest = run_stage(context(tmp_path, mlflow={"trackingUri": f"http://127.0.0.1:{port}"}), "prepare-seed")
    assert manifest["counts"]["pairs"] == 64  # the stage finished
    assert manifest["tracking"]["mlflow"]["error"].startswith("start: ")
    assert "mlflow could not start for stage prepare-seed" in caplog.text
    assert "stage/counts/pairs" in scalars(tmp_path / "runs" / "default" / "tiny-cpu" / "prepare-seed" / "tensorboard")


def test_a_configured_tracker_without_its_package_stops_the_stage_naming_the_field(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    ctx = context(tmp_path, wandb={"project": "p"})
    with pytest.raises(StageError, match=r"spec.tracking.wandb is set but the wandb package is not installed: "
                                         r"pip install 'humpback\[tracking\]'"):
        run_stage(ctx, "prepare-seed")
    assert not ctx.is_done(ctx.plan["prepare-seed"])


def test_a_trainer_integration_that_raises_stops_its_own_logging_not_the_training(tmp_path, caplog):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback, TrainerControl

    class Refusing(TrainerCallback):  # e.g. MLflow refusing a changed parameter of a resumed run
        calls = 0

        def on_log(self, args, state, control, **kwargs):
            Refusing.calls += 1
            raise RuntimeError("Changing param values is not allowed")

        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = True
            return control

    ctx = context(tmp_path)
    trackers = tracking.StageTrackers(ctx.run, ctx.plan["train-m0"], ctx.store, ctx.prefix("train-m0"))
    guarded = tracking._guarded(Refusing(), "mlflow", trackers)
    control = TrainerControl()
    assert guarded.on_step_end(None, None, control).should_save  # what the callback returns passes through
    caplog.set_level(logging.WARNING, logger="humpback_runtime.tracking")
    assert guarded.on_log(None, None, control, logs={"loss": 1.0}) is None  # no exception reaches the Trainer
    assert guarded.on_log(None, None, control, logs={"loss": 0.9}) is None
    assert Refusing.calls == 1  # after its first failure the integration is left alone
    assert trackers.info["mlflow"]["error"] == "training: RuntimeError: Changing param values is not allowed"
    assert "mlflow stopped logging the training of stage train-m0" in caplog.text
    trackers.close()


def test_a_failed_stage_ends_its_mlflow_run_failed(tmp_path, file_store_env):
    from mlflow.tracking import MlflowClient

    doc = run_doc(mlflow={"trackingUri": f"file:{tmp_path / 'mlruns'}"})
    doc["spec"]["seed"]["source"] = str(tmp_path / "no-such-seed.jsonl")
    ctx = RunContext.create(parse_run(doc), str(tmp_path / "runs"))
    with pytest.raises(Exception, match="no-such-seed.jsonl"):
        run_stage(ctx, "prepare-seed")
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("default/tiny-cpu").experiment_id])
    assert (run.info.run_name, run.info.status) == ("prepare-seed", "FAILED")
    assert not any(k.startswith("stage/") for k in run.data.metrics)  # a failed stage has no numbers to log


def test_training_event_files_reach_the_store_every_minute_and_when_a_stage_fails(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    ctx = context(tmp_path)
    prefix = ctx.prefix("train-m0")
    trackers = tracking.StageTrackers(ctx.run, ctx.plan["train-m0"], ctx.store, prefix)
    trackers.tensorboard_dir.mkdir()
    events = trackers.tensorboard_dir / "events.out.tfevents.1.host.train"
    events.write_bytes(b"step 1")
    sync = tracking._sync_callback(trackers)
    rank0, rank1 = SimpleNamespace(is_world_process_zero=True), SimpleNamespace(is_world_process_zero=False)
    sync.on_log(None, rank0, None, logs={"loss": 1.0})  # under a minute since training began: not yet
    assert not ctx.store.exists(f"{prefix}/tensorboard/{events.name}")
    monkeypatch.setattr(tracking, "SYNC_EVERY_S", 0.0)
    sync.on_log(None, rank1, None, logs={"loss": 1.0})  # other ranks never upload
    assert not ctx.store.exists(f"{prefix}/tensorboard/{events.name}")
    sync.on_log(None, rank0, None, logs={"loss": 1.0})
    assert ctx.store.read_bytes(f"{prefix}/tensorboard/{events.name}") == b"step 1"
    # A stage that fails keeps the curves written so far.
    events.write_bytes(b"step 1, step 2")
    trackers.fail()
    assert ctx.store.read_bytes(f"{prefix}/tensorboard/{events.name}") == b"step 1, step 2"
    assert not trackers.local.exists()  # the local copies are gone
