"""spec.tracking on a real training run: `humpback run --until train-m0` trains the tiny model for a
few steps with TensorBoard, an MLflow file store and W&B in offline mode all on, then each tracker
is read back with its own reader (TensorBoard's EventAccumulator, MlflowClient, the W&B run file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
CURVES = ("loss", "learning_rate", "grad_norm", "tokens_per_second")  # what the Trainer logs each step


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_base_model):
    """A run folder after prepare-seed and train-m0 with every tracker on."""
    tmp = tmp_path_factory.mktemp("tracking")
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = data["spec"]
    spec["storage"]["uri"] = str(tmp / "runs")
    spec["baseModel"] = str(demo_base_model)
    spec["seed"]["source"] = str(ROOT / "examples" / spec["seed"]["source"])
    spec["corpus"]["source"] = str(ROOT / "examples" / spec["corpus"]["source"])
    spec["training"]["seed"] = {"steps": STEPS, "learningRate": 3e-3, "finalLearningRate": 1e-3, "batchSize": 8,
                                "perDeviceBatchSize": 8, "maxSeqLength": 128, "zeroStage": 0,
                                "gradientCheckpointing": False, "checkpointEvery": 100}
    spec["tracking"] = {"mlflow": {"trackingUri": "file:mlruns"},  # relative: next to the run file
                        "wandb": {"project": "humpback-tests", "mode": "offline"}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_DATA_DIR": str(tmp / "wandb-data")}
    for name in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "humpback_runtime", "run", str(tmp / "run.yaml"),
                             "--until", "train-m0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp


def stage_dir(tmp: Path, stage: str) -> Path:
    return tmp / "runs" / "default" / "tiny-cpu" / stage


def manifest(tmp: Path, stage: str) -> dict:
    return json.loads((stage_dir(tmp, stage) / "_SUCCESS.json").read_text())


def test_tensorboard_event_files_in_the_store_hold_the_training_curves_and_the_counts(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = stage_dir(trained, "train-m0") / "tensorboard"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for curve in CURVES:
        assert [e.step for e in acc.Scalars(f"train/{curve}")] == list(range(1, STEPS + 1)), curve
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_second"))
    lr = [e.value for e in acc.Scalars("train/learning_rate")]
    assert lr[0] == pytest.approx(3e-3) and lr[-1] == pytest.approx(1e-3)  # the linear schedule, first to last
    # The stage's counts, from its manifest.
    m = manifest(trained, "train-m0")
    assert acc.Scalars("stage/counts/seed")[0].value == m["counts"]["seed"] == 64
    assert acc.Scalars("stage/metrics/steps")[0].value == STEPS
    assert {"stage/outputs/count", "stage/yield/fraction", "stage/metrics/tokens_per_second"} <= tags
    # The event files are outputs of the stage: in its manifest, checked like every object.
    listed = [k for k in m["objects"] if k.startswith("tensorboard/")]
    assert sorted(listed) == sorted(f"tensorboard/{p.name}" for p in folder.iterdir())
    assert m["tracking"]["tensorboard"]["files"] == len(listed) == 2  # the Trainer's and the counts'
    # Every stage has its own, data stages too.
    seed = EventAccumulator(str(stage_dir(trained, "prepare-seed") / "tensorboard"))
    seed.Reload()
    assert seed.Scalars("stage/counts/pairs")[0].value == 64


def test_the_mlflow_file_store_holds_one_finished_run_per_stage_with_curves_and_counts(trained):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient(f"file:{trained / 'mlruns'}")
    experiment = client.get_experiment_by_name("default/tiny-cpu")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"prepare-seed", "train-m0"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    train = runs["train-m0"]
    assert train.info.run_id == manifest(trained, "train-m0")["tracking"]["mlflow"]["runId"]
    for curve in CURVES:
        history = client.get_metric_history(train.info.run_id, curve)
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), curve
    assert train.data.metrics["stage/counts/seed"] == 64 and train.data.metrics["stage/metrics/steps"] == STEPS
    assert train.data.params["max_steps"] == str(STEPS)  # the Trainer's own parameters
    assert train.data.params["humpback.training.learningRate"] == "0.003"  # the stage's settings
    assert runs["prepare-seed"].data.metrics["stage/counts/pairs"] == 64


def wandb_records(path: Path):
    """The records of a W&B run file (`run-ID.wandb`: a LevelDB-style log of protobuf records, 32 KiB
    blocks of chunks with a 7-byte header: checksum, length, type); wandb 0.31 has no reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def test_wandb_offline_writes_its_run_folder_to_the_store_with_curves_and_counts(trained):
    info = manifest(trained, "train-m0")["tracking"]["wandb"]
    folder = Path(info["uri"])
    assert folder.parent == stage_dir(trained, "train-m0") / "wandb" and folder.name.endswith(info["runId"])
    history, summary, run = [], {}, None
    for record in wandb_records(folder / f"run-{info['runId']}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            run = record.run
    assert (run.project, run.display_name, run.run_group) == ("humpback-tests", "tiny-cpu/train-m0", "default/tiny-cpu")
    steps = [h for h in history if "train/loss" in h]
    assert [h["train/global_step"] for h in steps] == list(range(1, STEPS + 1))
    assert all(f"train/{curve}" in h for h in steps for curve in CURVES)
    assert summary["stage/counts/seed"] == 64 and summary["stage/metrics/steps"] == STEPS
