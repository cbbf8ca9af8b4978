"""Real training runs of the tiny model on CPU: one process with DeepSpeed ZeRO-2, a crash and
resume from the store's checkpoint, and torchrun with two processes over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from humpback_runtime.spec import TrainingSpec  # noqa: E402
from humpback_runtime.storage import LocalStore  # noqa: E402
from humpback_runtime.training import COMPLETE, TrainRequest, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CARD = {"run": "default/tiny", "stage": "train-m0", "role": "seed", "fingerprint": "f-123",
        "data": {"seed pairs": 32}}


def _settings(**changes) -> TrainingSpec:
    base = dict(steps=4, batch_size=4, per_device_batch_size=2, max_seq_length=128, checkpoint_every=2,
                zero_stage=2, gradient_checkpointing=True)
    return TrainingSpec(**{**base, **changes})


class _Recorder(transformers.TrainerCallback):
    """Learning rates the Trainer logged, and the complete checkpoints in the store after each save."""

    def __init__(self, store: LocalStore, prefix: str):
        self.store, self.prefix = store, prefix
        self.lr: dict[int, float] = {}
        self.checkpoints: dict[int, list[str]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            self.lr[state.global_step] = float(logs["learning_rate"])

    def on_save(self, args, state, control, **kwargs):  # runs after the upload callback
        keys = self.store.list(f"{self.prefix}/checkpoints")
        self.checkpoints[state.global_step] = sorted(k.split("/")[-2] for k in keys if k.endswith(COMPLETE))


class _Crash(transformers.TrainerCallback):
    """Dies right after the checkpoint of `step` reached the store, like a killed pod."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash after checkpoint {self.step}")


def test_single_process_zero2_trains_and_publishes_the_model(tiny_model, examples, tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    env_before = dict(os.environ)
    recorder = _Recorder(store, "default/tiny/train-m0")
    # A repeated tiny batch (4 examples, batch 4) and a larger step than the paper's, so that six
    # steps visibly lower the loss of the random model.
    settings = _settings(steps=6, learning_rate=1e-3, final_learning_rate=9e-4)
    request = TrainRequest(base_model=str(tiny_model), examples=examples[:4], settings=settings, store=store,
                           prefix="default/tiny/train-m0", card=CARD, callbacks=[recorder])
    metrics = train(request)

    # The one-rank process group and accelerate's variables are gone: a next run starts clean.
    assert {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"} == {
        k: v for k, v in env_before.items() if k != "TORCH_EXTENSIONS_DIR"}
    assert not torch.distributed.is_initialized()
    assert metrics["steps"] == 6 and metrics["world_size"] == 1
    assert (metrics["zero_stage"], metrics["precision"], metrics["resumed_from"]) == (2, "fp32", None)
    assert metrics["examples"] == 4 and metrics["gradient_accumulation_steps"] == 2
    losses = [loss for _, loss in metrics["train_loss"]]
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    assert metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0
    # The schedule as the Trainer applied it: lr0 at step 1, the final rate at the last step.
    assert recorder.lr[1] == pytest.approx(1e-3) and recorder.lr[6] == pytest.approx(9e-4)

    model_dir = store.local_path("default/tiny/train-m0/model")
    assert (model_dir / COMPLETE).is_file()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (model_dir / name).is_file(), name
    card = (model_dir / "README.md").read_text()
    for text in (str(tiny_model), "train-m0", "f-123", "default/tiny", "seed pairs", "0.001 → 0.0009"):
        assert text in card, text
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model))
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "training did not change any weight"
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.eos_token_id == base.config.eos_token_id

    # Checkpoints every 2 steps, uploaded in the background (at a save the previous one is complete
    # and the older ones gone: the store keeps the last), none once the model is complete.
    assert metrics["checkpoints"] == [2, 4, 6]
    assert recorder.checkpoints[2] in ([], ["step-2"])  # its upload may still be running
    assert recorder.checkpoints[4] in (["step-2"], ["step-4"])  # never none, never two
    assert recorder.checkpoints[6] in (["step-4"], ["step-6"])
    assert [entry["step"] for entry in metrics["checkpoint_stalls"]] == [2, 4, 6]
    assert all(entry["stall_seconds"] >= 0 and entry["upload_seconds"] > 0 for entry in metrics["checkpoint_stalls"])
    assert not store.list("default/tiny/train-m0/checkpoints")
    assert store.read_json("default/tiny/train-m0/train_metrics.json") == json.loads(json.dumps(metrics))

    # The same request again: the model is complete, nothing is trained twice.
    again = train(TrainRequest(base_model=str(tiny_model), examples=examples[:4], settings=settings, store=store,
                               prefix="default/tiny/train-m0", card=CARD))
    assert again == json.loads(json.dumps(metrics))


def test_restarted_attempt_resumes_from_the_last_checkpoint(tiny_model, examples, tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    prefix = "default/tiny/train-myx"

    def request(**kw) -> TrainRequest:
        return TrainRequest(base_model=str(tiny_model), examples=examples, settings=_settings(), store=store,
                            card=CARD, **kw)

    with pytest.raises(RuntimeError, match="simulated crash after checkpoint 2"):
        train(request(prefix=prefix, callbacks=[_Crash(2)]))
    assert store.exists(f"{prefix}/checkpoints/step-2/{COMPLETE}")
    assert not store.list(f"{prefix}/model")

    resumed = train(request(prefix=prefix))
    assert resumed["resumed_from"] == 2
    assert resumed["steps"] == 4 and resumed["checkpoints"] == [4]
    assert [step for step, _ in resumed["train_loss"]] == [1, 2, 3, 4]  # history carried over
    assert store.exists(f"{prefix}/model/{COMPLETE}")

    # Optimizer, scheduler, RNG and data order came back: the same losses as without the crash.
    straight = train(request(prefix="default/tiny/train-straight"))
    assert straight["resumed_from"] is None
    assert [loss for _, loss in resumed["train_loss"]] == pytest.approx(
        [loss for _, loss in straight["train_loss"]], rel=1e-4)


def test_a_kill_between_the_published_model_and_the_manifest_leaves_no_checkpoints(tiny_model, examples,
                                                                                   tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    prefix = "default/tiny/train-m0"
    request = TrainRequest(base_model=str(tiny_model), examples=examples[:4], store=store, prefix=prefix, card=CARD,
                           settings=_settings(zero_stage=0, gradient_checkpointing=False))
    real = store.delete_prefix

    def killed(key: str, **kw) -> int:
        if key == f"{prefix}/checkpoints":  # model/_COMPLETE is written; the process dies here
            raise KeyboardInterrupt
        return real(key, **kw)

    store.delete_prefix = killed
    with pytest.raises(KeyboardInterrupt):
        train(request)
    store.delete_prefix = real
    assert store.exists(f"{prefix}/model/{COMPLETE}") and store.list(f"{prefix}/checkpoints")
    again = train(request)  # the next attempt: the model is published, nothing is trained
    assert again["steps"] == 4
    assert not store.list(f"{prefix}/checkpoints")


def test_s3_base_model_and_store_without_deepspeed(tiny_model, examples, tmp_path, s3_server, s3_bucket,
                                                   monkeypatch) -> None:
    from humpback_runtime.storage import open_store

    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "cache"))
    models = open_store(f"{s3_bucket}/models/tiny", endpoint_url=s3_server)
    for path in tiny_model.iterdir():
        if path.is_file():
            models.upload_file(path, path.name)
    store = open_store(f"{s3_bucket}/runs", endpoint_url=s3_server)
    prefix = "default/tiny/train-mk"
    metrics = train(TrainRequest(base_model=f"{s3_bucket}/models/tiny", examples=examples[:8],
                                 settings=_settings(zero_stage=0), store=store, prefix=prefix, card=CARD,
                                 s3_endpoint=s3_server, keep_checkpoints=True))
    assert (metrics["steps"], metrics["zero_stage"], metrics["checkpoints"]) == (4, 0, [2, 4])
    assert metrics["model_uri"] == f"{s3_bucket}/runs/{prefix}/model"
    assert (tmp_path / "cache" / "models").is_dir()  # downloaded once per node, then loaded locally
    for key in ("model/model.safetensors", "model/README.md", f"model/{COMPLETE}", "train_metrics.json",
                f"checkpoints/step-4/{COMPLETE}", "checkpoints/step-4/optimizer.pt"):  # torch format: no ZeRO
        assert store.exists(f"{prefix}/{key}"), (key, store.list(prefix))
    assert not store.list(f"{prefix}/checkpoints/step-2")  # the store keeps the last one


_TRACE_WRITES = textwrap.dedent("""
    # Test-only: records every store write of every process as "RANK KEY" lines.
    import os
    from humpback_runtime import storage

    def _traced(name):
        original = getattr(storage.LocalStore, name)

        def wrapper(self, *args, **kwargs):
            key = args[-1] if name == "upload_file" else args[0]
            with open(os.environ["HUMPBACK_TEST_WRITES"], "a") as log:
                log.write(f"{os.environ.get('RANK', '-')} {name} {key}\\n")
            return original(self, *args, **kwargs)
        return wrapper

    for _name in ("write_bytes", "upload_file", "delete", "delete_prefix"):
        setattr(storage.LocalStore, _name, _traced(_name))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_m0_under_torchrun(tiny_model: Path, tmp_path: Path, training: dict):
    """The command a PyTorchJob pod runs, `torchrun -m humpback_runtime stage train-m0 --spec ...`,
    with two processes over gloo and `training` as spec.training.seed; (context, process, the
    store writes as (rank, operation, key))."""
    import yaml

    from humpback_runtime.context import RunContext
    from humpback_runtime.spec import load_run
    from humpback_runtime.stages import run_stage

    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    data["spec"]["baseModel"] = str(tiny_model)
    data["spec"]["seed"].update(source=str(ROOT / "examples" / "data" / "oasst1_sample.jsonl"), maxExamples=32)
    data["spec"]["training"]["seed"] = training
    data["spec"]["storage"]["uri"] = str(tmp_path / "store")
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(data))
    ctx = RunContext.create(load_run(spec))
    run_stage(ctx, "prepare-seed")

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_TRACE_WRITES)
    writes = tmp_path / "writes.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "HUMPBACK_TEST_WRITES": str(writes)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "humpback_runtime", "stage", "train-m0", "--spec", str(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = [line.split(" ", 2) for line in writes.read_text().splitlines()]
    assert records, "the write trace is empty: sitecustomize was not loaded"
    return ctx, proc, records


def test_torchrun_two_processes_zero2_over_gloo(tiny_model, tmp_path) -> None:
    ctx, proc, records = _train_m0_under_torchrun(tiny_model, tmp_path, {
        "steps": 4, "batchSize": 4, "perDeviceBatchSize": 1, "maxSeqLength": 128, "checkpointEvery": 2,
        "zeroStage": 2, "gradientCheckpointing": False})
    store = LocalStore(tmp_path / "store")
    prefix = ctx.prefix("train-m0")

    manifest = ctx.manifest("train-m0")
    assert manifest and manifest["fingerprint"] == ctx.plan["train-m0"].fingerprint
    metrics = manifest["metrics"]
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and metrics["zero_stage"] == 2
    assert metrics["gradient_accumulation_steps"] == 2 and metrics["checkpoints"] == [2, 4]
    assert store.exists(f"{prefix}/model/{COMPLETE}")
    assert transformers.AutoModelForCausalLM.from_pretrained(str(store.local_path(f"{prefix}/model")))
    # Both ranks' ZeRO partitions reached the checkpoint (deleted once the model was complete),
    # and only rank 0 wrote to the store.
    uploaded = {key.rsplit("/", 1)[1] for _, _, key in records if f"{prefix}/checkpoints/step-4/" in key}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= uploaded
    assert {rank for rank, _, _ in records} == {"0"}, sorted({r for r, _, _ in records})
    assert any(key.endswith(f"model/{COMPLETE}") for _, _, key in records)
    assert not store.list(f"{prefix}/checkpoints")
    # Only rank 0 logs at INFO.
    assert "INFO humpback_runtime.training: Trained" in proc.stderr
    assert proc.stderr.count("Uploaded checkpoint step 2") == 1


def test_torchrun_two_processes_fsdp_over_gloo(tiny_model, tmp_path) -> None:
    ctx, proc, records = _train_m0_under_torchrun(tiny_model, tmp_path, {
        "strategy": "fsdp", "steps": 4, "batchSize": 4, "perDeviceBatchSize": 1, "maxSeqLength": 128,
        "checkpointEvery": 2, "gradientCheckpointing": True, "learningRate": 1e-3, "finalLearningRate": 1e-3})
    store = LocalStore(tmp_path / "store")
    prefix = ctx.prefix("train-m0")
    metrics = ctx.manifest("train-m0")["metrics"]
    assert (metrics["strategy"], metrics["zero_stage"], metrics["world_size"]) == ("fsdp", None, 2)
    assert metrics["steps"] == 4 and metrics["checkpoints"] == [2, 4]
    losses = [loss for _, loss in metrics["train_loss"]]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    # The export is the whole model (FSDP's full state dict gathered from both shards), every
    # tensor at its full shape, and only rank 0 wrote to the store.
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(store.local_path(f"{prefix}/model")))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert {k: v.shape for k, v in trained.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in trained.state_dict().items())
    assert {rank for rank, _, _ in records} == {"0"}, sorted({r for r, _, _ in records})
    assert "FSDP (full shard)" in (store.local_path(f"{prefix}/model") / "README.md").read_text()
