"""Where a stage finds the model it serves, and the engine that runs it.

A training stage leaves its model under `<run>/<train stage>/model/` (safetensors, tokenizer,
model card, `_COMPLETE` last). In-process engines need it on local disk: a local store is read in
place, an S3 store is downloaded once into a cache keyed by the training stage's fingerprint. On a
cluster the operator serves the model with vLLM and tells the client Job where, through
`HUMPBACK_ENDPOINT` (the server's /v1 root) and `HUMPBACK_SERVED_MODEL`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from humpback_runtime.context import RunContext
from humpback_runtime.engines import Engine, make_engine
from humpback_runtime.pod_contract import (
    ENDPOINT_ENV,
    ENDPOINTS_ENV,
    MODEL_DIR,
    SERVED_MODEL_ENV,
    server_api_key_env,
)
from humpback_runtime.stages import InputsMissing, StageError

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"


def model_prefix(ctx: RunContext, train_stage: str) -> str:
    return f"{ctx.prefix(train_stage)}/{MODEL_DIR}"


def local_model_dir(ctx: RunContext, train_stage: str) -> Path:
    """The trained model of `train_stage` as a local directory (downloaded from S3 if need be)."""
    prefix = model_prefix(ctx, train_stage)
    store = ctx.store
    if not store.exists(f"{prefix}/{COMPLETE}"):
        raise InputsMissing(f"no complete model at {store.url(prefix)} (stage {train_stage} has not finished)")
    local = store.local_path(prefix)
    if local is not None:
        return local
    fingerprint = ctx.plan[train_stage].fingerprint
    cache = Path(os.environ.get("HUMPBACK_CACHE", Path.home() / ".cache" / "humpback")) / "models" / fingerprint
    if not (cache / COMPLETE).exists():
        log.info("Downloading model of %s from %s to %s", train_stage, store.url(prefix), cache)
        for key in store.list(prefix):
            if key.endswith(f"/{COMPLETE}"):
                continue
            dest = cache / key[len(prefix) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(key, dest)
        (cache / COMPLETE).write_text("")  # last: a half-downloaded cache is never used
    return cache


def engine_for(ctx: RunContext, train_stage: str) -> Engine:
    """The engine for the model of `train_stage`: the operator's vLLM server when one is announced."""
    spec = ctx.run.spec.inference
    per_model = _endpoints_by_stage()
    # The key of a server the operator started for this model (None for a user's own endpoint).
    server_key = os.environ.get(server_api_key_env(train_stage)) or None
    if train_stage in per_model:
        server = spec.model_copy(update={"engine": "vllm-server"})  # the operator started it for us
        return make_engine(server, train_stage, endpoint=per_model[train_stage], api_key=server_key)
    endpoint = os.environ.get(ENDPOINT_ENV) or spec.endpoint
    wants_server = spec.engine == "vllm-server" or (spec.engine == "auto" and endpoint)
    if wants_server:
        served = os.environ.get(SERVED_MODEL_ENV, train_stage)
        return make_engine(spec, served, endpoint=endpoint, api_key=server_key)
    return make_engine(spec, local_model_dir(ctx, train_stage))


def _endpoints_by_stage() -> dict[str, str]:
    raw = os.environ.get(ENDPOINTS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StageError(f"{ENDPOINTS_ENV} is not JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise StageError(f"{ENDPOINTS_ENV} must be a JSON object of training stage -> endpoint URL")
    return value


def tokenizer_encode(ctx: RunContext, train_stage: str):
    """The served model's tokenizer, for prompts that depend on tokenization (logprob scoring)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(ctx, train_stage))
    return lambda text: tokenizer.encode(text, add_special_tokens=False)
