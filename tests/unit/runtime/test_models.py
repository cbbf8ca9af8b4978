"""Where an inference stage finds its model: the download cache of models in an S3 store."""

from __future__ import annotations

from humpback_runtime.context import RunContext
from humpback_runtime.inference.models import COMPLETE, local_model_dir, model_prefix
from humpback_runtime.manifest import describe_outputs
from humpback_runtime.spec import parse_run
from humpback_runtime.storage import write_success

RUN = {"metadata": {"name": "r"}, "spec": {"baseModel": "m", "seed": {"source": "s"}, "corpus": {"source": "c"}}}


def _trained(ctx: RunContext, weights: str) -> None:
    """train-myx as a finished training leaves it: model files, _COMPLETE, a manifest listing them."""
    prefix = model_prefix(ctx, "train-myx")
    ctx.store.write_text(f"{prefix}/model.safetensors", weights)
    ctx.store.write_json(f"{prefix}/{COMPLETE}", {"training_key": "k"})
    stage = ctx.prefix("train-myx")
    write_success(ctx.store, stage, {"fingerprint": ctx.plan["train-myx"].fingerprint,
                                     "objects": describe_outputs(ctx.store, stage)})


def test_the_cache_never_serves_another_stores_model_of_the_same_fingerprint(tmp_path, monkeypatch, s3_server,
                                                                             s3_client):
    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "cache"))
    dirs = []
    for bucket, weights in (("store-a", "weights of A"), ("store-b", "weights of B")):
        s3_client.create_bucket(Bucket=bucket)
        ctx = RunContext.create(parse_run(RUN), f"s3://{bucket}/runs")
        ctx.run.spec.storage.s3.endpoint = s3_server
        _trained(ctx, weights)
        local = local_model_dir(ctx, "train-myx")
        assert (local / "model.safetensors").read_text() == weights
        dirs.append(local)
    assert dirs[0] != dirs[1]
    # The same store retrained (same fingerprint, other weights): a new download, not the stale copy.
    _trained(ctx, "weights of B, retrained")
    assert (local_model_dir(ctx, "train-myx") / "model.safetensors").read_text() == "weights of B, retrained"
