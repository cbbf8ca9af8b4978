"""Which engine a stage gets, and where it finds the model that engine runs: the one factory.

A training stage leaves its model under `<run>/<train stage>/model/` (safetensors, tokenizer,
model card, `_COMPLETE` last). In-process engines need it on local disk: a local store is read in
place, an S3 store is downloaded once into a cache keyed by the model's URI and content (the
checksums its stage's manifest lists), so a model of another store or another training with the
same fingerprint is never taken for it. On a
cluster the operator serves the model with vLLM and tells the client Job where, through
`HUMPBACK_ENDPOINT` (the server's /v1 root) and `HUMPBACK_SERVED_MODEL`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from humpback_runtime.context import RunContext
from humpback_runtime.errors import InputsMissing, StageError
from humpback_runtime.inference.engines import Engine, PromptLimit, VLLMServerEngine
from humpback_runtime.inference.local import TransformersEngine, VLLMEngine, vllm_available
from humpback_runtime.pod_contract import (
    ENDPOINT_ENV,
    ENDPOINTS_ENV,
    MODEL_DIR,
    SERVED_MODEL_ENV,
    server_api_key_env,
)

if TYPE_CHECKING:
    from humpback_runtime.spec import InferenceSpec

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"


def model_prefix(ctx: RunContext, train_stage: str) -> str:
    return f"{ctx.prefix(train_stage)}/{MODEL_DIR}"


def _complete_model(ctx: RunContext, train_stage: str) -> tuple[str, Path | None]:
    """The store prefix of `train_stage`'s finished model, and its local folder when the store is local."""
    prefix = model_prefix(ctx, train_stage)
    if not ctx.store.exists(f"{prefix}/{COMPLETE}"):
        raise InputsMissing(f"no complete model at {ctx.store.url(prefix)} (stage {train_stage} has not finished)")
    return prefix, ctx.store.local_path(prefix)


def local_model_dir(ctx: RunContext, train_stage: str) -> Path:
    """The trained model of `train_stage` as a local directory (downloaded from S3 if need be)."""
    prefix, local = _complete_model(ctx, train_stage)
    if local is not None:
        return local
    store = ctx.store
    cache = _cache_root() / "models" / _cache_key(ctx, train_stage, prefix)
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


def _cache_key(ctx: RunContext, train_stage: str, prefix: str) -> str:
    """The model's URI and content: the checksums of its files in the stage's manifest, or (a
    manifest from before checksums) its `_COMPLETE` marker, which names the training request."""
    store = ctx.store
    objects = (ctx.manifest(train_stage) or {}).get("objects")
    rel = prefix[len(ctx.prefix(train_stage)) + 1:] + "/"
    if isinstance(objects, dict) and any(k.startswith(rel) for k in objects):
        content = {k: v.get("sha256") for k, v in sorted(objects.items()) if k.startswith(rel)}
    else:
        content = {COMPLETE: hashlib.sha256(store.read_bytes(f"{prefix}/{COMPLETE}")).hexdigest(),
                   "fingerprint": ctx.plan[train_stage].fingerprint}
    payload = json.dumps({"uri": store.url(prefix), "content": content}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def engine_for(ctx: RunContext, train_stage: str) -> Engine:
    """The engine for the model of `train_stage`, which drops prompts too long for the model's context
    before sending them (our own model: its tokenizer is at hand)."""
    engine = _engine_for(ctx, train_stage)
    engine.prompt_limit = _prompt_limit(ctx, train_stage, engine)
    return engine


def _engine_for(ctx: RunContext, train_stage: str) -> Engine:
    """The engine for the model of `train_stage`: the operator's vLLM server when one is announced."""
    spec = ctx.run.spec.inference
    per_model = _endpoints_by_stage()
    # The key of a server the operator started for this model (None for a user's own endpoint).
    server_key = os.environ.get(server_api_key_env(train_stage)) or None
    if train_stage in per_model:
        # The operator started it for us: our model, our template, the completions API.
        server = spec.model_copy(update={"engine": "vllm-server", "api": "completions"})
        return make_engine(server, train_stage, endpoint=per_model[train_stage], api_key=server_key,
                           replicas=ctx.run.spec.resources.inference.replicas)
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


# The files a tokenizer loads from (AutoTokenizer reads config.json for the model type when
# tokenizer_config.json does not name the class); never the weights.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "config.json", "generation_config.json",
})


def local_tokenizer_dir(ctx: RunContext, train_stage: str) -> Path:
    """The tokenizer of `train_stage`'s model as a local directory, fetching only the tokenizer files
    from an S3 store (a client pod next to a vLLM server needs the tokenizer, not 14 GB of weights)."""
    prefix, local = _complete_model(ctx, train_stage)
    if local is not None:
        return local
    store = ctx.store
    # Keyed by where the model is, not only by its fingerprint: another store's model never answers.
    where = hashlib.sha256(store.url(prefix).encode()).hexdigest()[:16]
    cache = _cache_root() / "tokenizers" / f"{ctx.plan[train_stage].fingerprint}-{where}"
    if not (cache / COMPLETE).exists():
        keys = [k for k in store.list(prefix) if "/" not in k[len(prefix) + 1:]
                and k.rsplit("/", 1)[-1] in TOKENIZER_FILES]
        log.info("Downloading the tokenizer of %s (%d files) from %s to %s", train_stage, len(keys),
                 store.url(prefix), cache)
        for key in keys:
            store.download_file(key, cache / key.rsplit("/", 1)[-1])
        (cache / COMPLETE).write_text("")  # last: a half-downloaded cache is never used
    return cache


def _prompt_limit(ctx: RunContext, train_stage: str, engine: Engine) -> PromptLimit | None:
    """`train_stage`'s context (the server's maxModelLen, else the model's max_position_embeddings) and
    its tokenizer, loaded on the first prompt long enough to need counting; None when unknown."""
    model_dir = getattr(engine, "model_dir", None)
    if model_dir is None:
        try:
            model_dir = local_tokenizer_dir(ctx, train_stage)  # tokenizer files only
        except InputsMissing:
            return None  # a user's endpoint serving a model this store does not hold
    configured = ctx.run.spec.inference.vllm.max_model_len  # vLLM's, served or in process
    if configured is not None and not isinstance(engine, TransformersEngine):
        context, source = configured, "inference.vllm.maxModelLen"
    else:
        try:
            context = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            context = None
        if not isinstance(context, int) or context < 1:
            return None
        source = f"max_position_embeddings of {train_stage}'s model"
    tokenizer = None

    def count_tokens(prompt: str) -> int:
        nonlocal tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return len(tokenizer(prompt).input_ids)  # BOS included, as the server counts

    return PromptLimit(context=context, count_tokens=count_tokens, source=source)


def _cache_root() -> Path:
    return Path(os.environ.get("HUMPBACK_CACHE", Path.home() / ".cache" / "humpback"))


def tokenizer_encode(ctx: RunContext, train_stage: str):
    """The served model's tokenizer, for prompts that depend on tokenization (logprob scoring)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_tokenizer_dir(ctx, train_stage))
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def make_engine(spec: InferenceSpec, model: str | Path, *, endpoint: str | None = None,
                api_key: str | None = None, replicas: int = 1) -> Engine:
    """The engine `spec.engine` names, for `model` (a local directory; the served name for a server).

    `endpoint` (else `spec.endpoint`) is the server's API root (…/v1). `auto`: the server when there
    is an endpoint, in-process vLLM when it is installed, transformers on CPU otherwise. The server
    client keeps `spec.client_concurrency(replicas)` requests in flight (auto: every replica's
    maxNumSeqs); in-process vLLM gets a whole shard (checkpointEvery records) per call and
    schedules it itself, with the spec's vLLM options.
    """
    endpoint = endpoint or spec.endpoint
    kind = spec.engine
    if kind == "auto":
        kind = "vllm-server" if endpoint else "vllm" if vllm_available() else "transformers"
    if kind == "vllm-server":
        if not endpoint:
            raise ValueError("inference.endpoint: engine 'vllm-server' needs the server's API root "
                             "(http://HOST:PORT/v1), got none")
        engine: Engine = VLLMServerEngine(endpoint, str(model), api_key=api_key, concurrency=spec.client_concurrency(replicas),
                                          max_retries=spec.max_retries, per_request_seed=spec.per_request_seed,
                                          api=spec.api)
    elif kind == "vllm":
        engine = VLLMEngine(model, batch_size=spec.checkpoint_every, **spec.vllm.llm_options())
    elif kind == "transformers":
        engine = TransformersEngine(model, batch_size=spec.batch_size)
    else:
        raise ValueError(f"inference.engine: expected auto, vllm-server, vllm or transformers, got {kind!r}")
    log.info("Using inference engine %s (inference.engine %s)", engine, spec.engine)
    return engine
