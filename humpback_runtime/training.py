"""Supervised fine-tuning for train-myx, train-m0 and train-mk: one entry point, one process or many.

The stage builds the examples with :mod:`humpback_runtime.prompts` (the only source of templates)
and calls :func:`train`; on a cluster the same code runs under ``torchrun`` inside a PyTorchJob::

    from humpback_runtime.training import TrainRequest, train
    metrics = train(TrainRequest(base_model="meta-llama/Llama-2-7b-hf", examples=examples,
                                 settings=run.spec.training.seed, store=store,
                                 prefix="default/run/train-m0", card={...}))

As a worker (what the stage launches; ``REQUEST.json`` is described by :class:`TrainJobRequest`)::

    python -m humpback_runtime.training --request REQUEST.json [--metrics-out metrics.json]
    torchrun --nproc_per_node 8 -m humpback_runtime.training --request REQUEST.json

``REQUEST.json`` (snake_case or camelCase keys; unknown keys are errors)::

    {"base_model": ".cache/tiny-llama",            # local dir, hub id or s3:// URI
     "examples_uri": "ns/run/train-m0/examples",   # store key: a JSONL file or a folder of part-* shards
                                                   # of {"prompt": ..., "completion": ...} records
     "settings": {"steps": 4, "batchSize": 4, ...},  # a TrainingSpec, camelCase as in the run file
     "storage": {"uri": "s3://bucket/runs", "s3": {"endpoint": "http://minio:9000"}},  # or a plain URI string
     "prefix": "ns/run/train-m0",
     "card": {"run": "ns/run", "stage": "train-m0", "role": "seed", "fingerprint": "..."}}

Distributed runs. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` for each process it starts; this module only reads those. In a Kubeflow PyTorchJob
the training operator sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` on every pod, and ``torchrun`` reads every ``PET_<ARG>``
variable as the default of its ``--<arg>`` flag, so the container command is simply
``torchrun -m humpback_runtime.training --request ...`` with no flags. A single process without
torchrun is a world of one (DeepSpeed still wants a process group: :func:`train` creates a
one-rank gloo/NCCL group on a free loopback port and tears it down afterwards).

What happens (see DESIGN.md, "Training"):

* tokenisation (:func:`tokenize_example`): the loss covers the completion tokens and the EOS the
  trainer appends; the prompt tokens (BOS included) are masked with -100. Examples longer than
  ``maxSeqLength`` are cut from the right; one whose prompt alone fills the window is dropped and
  counted (``examples_dropped``).
* HF ``Trainer`` with DeepSpeed ZeRO (``zeroStage`` 1-3; 0 = plain DDP / one process), AdamW (torch
  implementation, the spec's weight decay), a learning rate going linearly from ``learningRate`` at
  the first optimizer step to ``finalLearningRate`` at the last one (:func:`learning_rate_at`),
  ``batchSize`` sequences per optimizer step made up by gradient accumulation
  (:func:`gradient_accumulation_steps`), ``steps_for(len(examples))`` steps, bf16 on CUDA (or when
  asked for), fp32 on CPU, gradient checkpointing per the spec.
* checkpoints: every ``checkpointEvery`` steps a full resumable checkpoint (weights, optimizer,
  scheduler, RNG, trainer state; DeepSpeed's own format under ZeRO) is uploaded to
  ``{prefix}/checkpoints/step-N/``, with ``_COMPLETE`` written last; the latest two are kept. A new
  attempt with the same request (same base model, settings, data and card fingerprint) resumes from
  the latest complete one; checkpoints of another request are deleted.
* output: ``{prefix}/model/`` (safetensors, tokenizer, generation config, README.md model card),
  ``{prefix}/train_metrics.json``, then ``{prefix}/model/_COMPLETE`` last; then the checkpoints are
  deleted (``TrainRequest.keep_checkpoints`` keeps them). A request whose model is already complete
  returns the stored metrics without training again.
* only global rank 0 writes to the store and logs at INFO. One exception across nodes: ZeRO
  partitions and RNG states live on the node of the rank that wrote them, so with several nodes the
  first process of each node uploads its node's files into the checkpoint folder before rank 0
  writes ``_COMPLETE``; to resume, the first process of each node downloads the whole checkpoint.
* ``s3://`` base models are downloaded once per node into ``$HUMPBACK_CACHE/models/`` (default
  ``~/.cache/humpback``); scratch files go to ``TrainRequest.work_dir`` (default: under the system
  temp directory) and are removed at the end, crash or not.

DeepSpeed on CPU: the processes talk over gloo. DeepSpeed 0.19 would JIT-compile its shared-memory
all-reduce op (``deepspeed_shm_comm``) on the first CPU process group (~20 s, and a compiler in the
image); that op only serves inference all-reduce, so it is switched off here on CPU. The torch
AdamW is used (no ``cpu_adam`` build, no offload). Any op DeepSpeed still builds goes to
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/humpback/torch_extensions``), never the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from humpback_runtime.prompts import TEMPLATE_VERSION, TrainingExample
from humpback_runtime.spec import Model, S3Spec, StorageSpec, TrainingSpec, format_validation_error
from humpback_runtime.storage import ObjectNotFound, Store, iter_shard_records, list_shards, open_store

__all__ = [
    "COMPLETE",
    "IGNORE_INDEX",
    "TrainJobRequest",
    "TrainRequest",
    "TrainingError",
    "deepspeed_config",
    "gradient_accumulation_steps",
    "learning_rate_at",
    "learning_rate_factor",
    "load_request",
    "main",
    "resolve_bf16",
    "tokenize_example",
    "train",
]

log = logging.getLogger("humpback_runtime.training")  # also when run as __main__

IGNORE_INDEX = -100  # label of tokens without loss (the prompt); what HF models ignore
COMPLETE = "_COMPLETE"  # marker written last into a checkpoint folder and into model/
KEEP_CHECKPOINTS = 2
MAX_GRAD_NORM = 1.0
# Collectives wait this long (seconds) at most: rank 0 uploading a 7B checkpoint (~80 GB with the
# optimizer) to S3 keeps the others at a barrier for many minutes; torch's default is 30 min.
DIST_TIMEOUT_S = 2 * 3600
_INSTALL_HINT = "pip install 'humpback[train]'"


class TrainingError(RuntimeError):
    """Training cannot start or finish; the message names the setting or input at fault."""


# --- requests -------------------------------------------------------------------------------------


@dataclass
class TrainRequest:
    """One fine-tuning job.

    ``base_model``: local directory, hub id or ``s3://`` URI (downloaded to a local cache first;
    ``s3_endpoint`` / ``s3_region`` as in the run's ``storage.s3``). ``examples``: built by the caller
    with :mod:`humpback_runtime.prompts`. Outputs go to ``store`` under ``prefix``. ``card``: lineage
    for the model card and the resume key (run, stage, role, base model, data counts, fingerprint).
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (run after the checkpoint upload).
    ``work_dir``: local scratch space; by default a folder under the system temp directory derived
    from the output location, the same for every process of one node. ``keep_checkpoints``: leave
    the last two checkpoints in the store after the model is complete (by default they are deleted
    then: they only serve to resume an unfinished run, and for a 7B model each is ~100 GB).
    """

    base_model: str
    examples: Iterable[TrainingExample]
    settings: TrainingSpec
    store: Store
    prefix: str
    card: dict[str, Any] = field(default_factory=dict)
    s3_endpoint: str | None = None
    s3_region: str | None = None
    callbacks: list[Any] = field(default_factory=list)
    work_dir: str | os.PathLike | None = None
    keep_checkpoints: bool = False


class TrainJobRequest(Model):
    """The JSON file of ``python -m humpback_runtime.training --request FILE``."""

    base_model: str = Field(min_length=1, description="Local directory, hub id or s3:// URI.")
    examples_uri: str = Field(
        min_length=1,
        description="Store key of a JSONL file, or of a folder of part-* shards, with prompt/completion records.",
    )
    settings: TrainingSpec = Field(default_factory=TrainingSpec)
    storage: StorageSpec
    prefix: str = Field(min_length=1, description="Outputs go under this store key.")
    card: dict[str, Any] = Field(default_factory=dict)
    work_dir: str | None = None
    keep_checkpoints: bool = Field(
        False, description="Leave the last checkpoints in the store after the model is complete.")

    @field_validator("storage", mode="before")
    @classmethod
    def _storage_uri(cls, v: Any) -> Any:
        return {"uri": v} if isinstance(v, str) else v


def load_request(path: str | os.PathLike) -> TrainJobRequest:
    """Read and validate a worker request file; errors name the field."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"Cannot read training request {path}: {e}") from e
    try:
        return TrainJobRequest.model_validate(data)
    except ValidationError as e:
        lines = "\n".join(f"  {line}" for line in format_validation_error(e))
        raise TrainingError(f"{path}: invalid training request:\n{lines}") from None


def _read_examples(store: Store, uri: str) -> Iterator[TrainingExample]:
    key = uri.rstrip("/")
    keys = [key] if store.exists(key) else list_shards(store, key)
    if not keys:
        raise TrainingError(f"No training examples at {store.url(key)} (expected a JSONL file or part-* shards)")
    for i, record in enumerate(iter_shard_records(store, keys)):
        try:
            yield TrainingExample(str(record["prompt"]), str(record["completion"]))
        except (KeyError, TypeError) as e:
            raise TrainingError(f"{store.url(key)}: record {i} lacks prompt/completion ({e})") from e


# --- pure builders (no torch) -----------------------------------------------------------------------


def gradient_accumulation_steps(settings: TrainingSpec, world_size: int) -> int:
    """batchSize / (perDeviceBatchSize * world size); an error naming the fields unless it divides."""
    per_step = settings.per_device_batch_size * world_size
    if world_size < 1 or settings.batch_size % per_step:
        raise TrainingError(
            f"batchSize ({settings.batch_size}) must be a multiple of perDeviceBatchSize "
            f"({settings.per_device_batch_size}) x world size ({world_size}) = {per_step}: the global "
            "batch is made of equal micro-batches on every process"
        )
    return settings.batch_size // per_step


def learning_rate_factor(step: int, total_steps: int, lr0: float, lr_final: float) -> float:
    """Multiplier of ``lr0`` for the update of optimizer step ``step`` (0-based)."""
    last = total_steps - 1
    if last <= 0:
        return 1.0
    t = min(max(step, 0), last)
    return 1.0 + (lr_final / lr0 - 1.0) * t / last


def learning_rate_at(settings: TrainingSpec, step: int, total_steps: int) -> float:
    """lr(t) = lr0 + (lrF - lr0) * t / T: ``learningRate`` at the first update (t = 0),
    ``finalLearningRate`` at the last one (t = T = total_steps - 1); not decayed to 0."""
    lr0 = settings.learning_rate
    return lr0 * learning_rate_factor(step, total_steps, lr0, settings.final_learning_rate)


def resolve_bf16(precision: str, cuda: bool) -> bool:
    """bf16 when asked for, or ``auto`` on a CUDA GPU; fp32 otherwise (``auto`` on CPU)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return cuda


def deepspeed_config(settings: TrainingSpec, *, world_size: int, bf16: bool, gpu: bool) -> dict[str, Any] | None:
    """The DeepSpeed config for ``settings.zero_stage`` (None for 0: no DeepSpeed).

    The HF optimizer (torch AdamW) and this module's scheduler are used, so the config has neither
    an ``optimizer`` nor a ``scheduler`` section (and no offload: nothing needs DeepSpeed's C++ ops).
    Batch sizes are explicit so that DeepSpeed checks them against the Trainer's arguments.
    """
    stage = settings.zero_stage
    if stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": gpu,  # overlapping needs CUDA streams; gloo on CPU gains nothing
        "reduce_bucket_size": "auto",  # the Trainer fills these in from the model's hidden size
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # Gather the 16-bit weights for save_model(), so model/ holds ordinary safetensors.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.per_device_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(settings, world_size),
        "gradient_clipping": MAX_GRAD_NORM,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW through the Trainer
        "steps_per_print": 10**9,  # the Trainer logs every step already
        "wall_clock_breakdown": False,
    }


def _examples_digest(examples: list[TrainingExample]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for part in (ex.prompt, ex.completion):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _training_key(request: TrainRequest, data_digest: str) -> str:
    """What makes two attempts the same job: a checkpoint of another key is never resumed."""
    payload = {
        "base_model": request.base_model,
        "settings": request.settings.model_dump(mode="json"),
        "data": data_digest,
        "fingerprint": request.card.get("fingerprint"),
        "templates": TEMPLATE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]


# --- tokenisation -----------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    # Text that spells a special token ("</s>") stays text: user data must not inject an EOS.
    try:
        return list(tokenizer(text, add_special_tokens=special, split_special_tokens=True)["input_ids"])
    except TypeError:  # pragma: no cover - tokenizers without split_special_tokens
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@functools.lru_cache(maxsize=8)
def _adds_eos(tokenizer: Any) -> bool:
    eos = tokenizer.eos_token_id
    ids = _encode(tokenizer, "a", True)
    return bool(ids) and ids[-1] == eos and _encode(tokenizer, "a", False)[-1:] != [eos]


def tokenize_example(tokenizer: Any, ex: TrainingExample, max_len: int) -> dict[str, list[int]] | None:
    """``input_ids``, ``attention_mask`` and ``labels`` of one example, or None when it is dropped.

    The ids are those of ``prompt + completion`` (BOS as the tokenizer adds it) followed by the EOS
    id; ``labels`` are -100 on the prompt tokens and the ids on the completion + EOS. When the
    prompt's tokens are not a prefix of the whole text's (a tokenizer merging across the seam), the
    prompt and the completion are tokenised apart and concatenated, which is what the model sees at
    inference. Longer than ``max_len``: cut from the right (the EOS goes first); when not even one
    completion token would remain, the example is dropped (None).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingError("the tokenizer has no EOS token; training needs one to teach the model to stop")
    prompt_ids = _encode(tokenizer, ex.prompt, True)
    full_ids = _encode(tokenizer, ex.prompt + ex.completion, True)
    if _adds_eos(tokenizer):  # a tokenizer that appends EOS itself: the trainer places it
        prompt_ids, full_ids = prompt_ids[:-1], full_ids[:-1]
    boundary = len(prompt_ids)
    if len(full_ids) > boundary and full_ids[:boundary] == prompt_ids:
        ids = full_ids
    else:
        ids = prompt_ids + _encode(tokenizer, ex.completion, False)
    ids = ids + [eos]
    if boundary >= max_len or len(ids) <= boundary:
        return None
    ids = ids[:max_len]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * boundary + ids[boundary:],
    }


@dataclass
class _Tokenized:
    features: list[dict[str, list[int]]]
    dropped: int
    truncated: int
    supervised_tokens: int
    tokens: int


def _tokenize_all(tokenizer: Any, examples: list[TrainingExample], max_len: int) -> _Tokenized:
    out = _Tokenized([], 0, 0, 0, 0)
    for ex in examples:
        feat = tokenize_example(tokenizer, ex, max_len)
        if feat is None:
            out.dropped += 1
            continue
        if feat["labels"][-1] != tokenizer.eos_token_id:
            out.truncated += 1
        out.features.append(feat)
        out.tokens += len(feat["input_ids"])
        out.supervised_tokens += sum(1 for label in feat["labels"] if label != IGNORE_INDEX)
    return out


# --- process group and environment ------------------------------------------------------------------


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - only without the extra
        raise ImportError(f"training needs {module!r}, which is not installed: {_INSTALL_HINT}") from e


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_env() -> Iterator[bool]:
    """Yields whether this call owns the process group (a single process, not under torchrun).

    A lone process becomes a world of one: RANK/WORLD_SIZE/LOCAL_RANK and MASTER_* on a free
    loopback port, so that DeepSpeed (which otherwise tries MPI discovery) and accelerate (which
    otherwise asks a process group that does not exist) take the same path as under torchrun; the
    group is torn down by :func:`_teardown`. The environment is restored afterwards: accelerate
    leaves ``ACCELERATE_USE_DEEPSPEED=true`` behind, which would put the next run in this process
    under DeepSpeed even with zeroStage 0.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "humpback" / "torch_extensions"))
    saved = dict(os.environ)
    owns = not ("WORLD_SIZE" in os.environ and "RANK" in os.environ)
    if owns:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        yield owns
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        for k, v in saved.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def _reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's module-level handles on the destroyed process group (its communication
    backend and cached clones of the world group); the next engine would otherwise use them."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    for name, value in list(vars(ds_groups).items()):
        if name.startswith("_") and name[1:2].isupper() and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(ds_groups, name, {} if isinstance(value, dict) else None)
    for name in ("mpu", "mesh_device"):
        if hasattr(ds_groups, name):
            setattr(ds_groups, name, None)


def _teardown(owns_group: bool) -> None:
    """Leave the process as we found it, so that a second train() in the same process works."""
    import torch

    if owns_group:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if "deepspeed" in sys.modules:
            _reset_deepspeed_groups()
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.suppress(Exception):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _DropGradAccumMismatch(logging.Filter):
    """accelerate warns "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,
    DeepSpeed config has N" under every DeepSpeed run: the Trainer accumulates itself and hands
    accelerate 1 on purpose (transformers ``create_accelerator_and_postprocess``). Not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Gradient accumulation steps mismatch" not in record.getMessage()


_GA_FILTER = _DropGradAccumMismatch()


def _disable_cpu_shm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op when it creates a process
    group. Only inference all-reduce (tensor parallel) uses it; training collectives go through
    torch.distributed. Marking it incompatible skips the build (and the need for a compiler)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if (dist := _dist()) is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- store helpers ------------------------------------------------------------------------------------


def _upload_dir(store: Store, local: Path, prefix: str, skip: tuple[str, ...] = ()) -> int:
    n = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel in skip:
            continue
        store.upload_file(path, f"{prefix}/{rel}")
        n += 1
    return n


def _download_prefix(store: Store, prefix: str, local: Path, skip: tuple[str, ...] = ()) -> int:
    n = 0
    cut = len(prefix) + 1 if prefix else 0
    for key in store.list(prefix):
        rel = key[cut:]
        if rel in skip:
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, dest)
        n += 1
    return n


def _read_marker(store: Store, key: str) -> dict | None:
    try:
        marker = store.read_json(key)
    except ObjectNotFound:
        return None
    except Exception as e:  # a corrupt marker counts as absent
        log.warning("Ignoring unreadable marker %s (%s)", store.url(key), e)
        return None
    return marker if isinstance(marker, dict) else None


def _checkpoint_steps(store: Store, prefix: str) -> dict[int, bool]:
    """step -> complete (``_COMPLETE`` present) for the folders under ``{prefix}/checkpoints``."""
    root = f"{prefix}/checkpoints"
    steps: dict[int, bool] = {}
    for key in store.list(root):
        parts = key[len(root) + 1:].split("/")
        if len(parts) >= 2 and parts[0].startswith("step-") and parts[0][5:].isdigit():
            step = int(parts[0][5:])
            steps[step] = steps.get(step, False) or parts[1:] == [COMPLETE]
    return steps


def _ckpt_prefix(prefix: str, step: int) -> str:
    return f"{prefix}/checkpoints/step-{step}"


def _choose_checkpoint(store: Store, prefix: str, key: str, world_size: int, zero: int) -> tuple[int | None, list[int]]:
    """(step to resume from or None, steps to delete) for the checkpoints in the store."""
    steps = _checkpoint_steps(store, prefix)
    usable: list[int] = []
    stale: list[int] = []
    for step, complete in sorted(steps.items()):
        if not complete:
            stale.append(step)  # a partial upload: an attempt died while uploading it
            continue
        marker = _read_marker(store, f"{_ckpt_prefix(prefix, step)}/{COMPLETE}") or {}
        if marker.get("training_key") != key:
            log.warning("Deleting checkpoint %s: it belongs to another training request (base model, "
                        "settings, data or fingerprint changed)", store.url(_ckpt_prefix(prefix, step)))
            stale.append(step)
        elif zero and marker.get("world_size") != world_size:
            log.warning("Deleting checkpoint %s: DeepSpeed ZeRO state of %s processes cannot be resumed "
                        "by %s processes; training starts over", store.url(_ckpt_prefix(prefix, step)),
                        marker.get("world_size"), world_size)
            stale.append(step)
        else:
            usable.append(step)
    latest = usable[-1] if usable else None
    stale += usable[:-KEEP_CHECKPOINTS]  # older than the two kept
    return latest, sorted(set(stale))


# --- model card ---------------------------------------------------------------------------------------


def _loss_summary(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most ~10 evenly spaced points of the loss curve, first and last included."""
    if len(history) <= 10:
        return history
    idx = sorted({round(i * (len(history) - 1) / 9) for i in range(10)})
    return [history[i] for i in idx]


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _looks_like_hub_id(ref: str) -> bool:
    return "://" not in ref and not ref.startswith((".", "/", "~")) and ref.count("/") == 1


def _model_card(request: TrainRequest, metrics: dict[str, Any], grad_accum: int) -> str:
    s = request.settings
    card = request.card
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- humpback",
        "- instruction-backtranslation",
        *([f"base_model: {request.base_model}"] if _looks_like_hub_id(request.base_model) else []),
        "---",
        "",
        f"# {card.get('stage', 'humpback')} ({card.get('role', 'fine-tuned')}) of {card.get('run', 'a humpback run')}",
        "",
        "Fine-tuned with humpback's instruction backtranslation pipeline (Li et al. 2023, "
        "\"Self-Alignment with Instruction Backtranslation\", arXiv:2308.06259). The loss covers the "
        "response tokens only; prompts follow `humpback_runtime.prompts` "
        f"(template version {TEMPLATE_VERSION}): use the same module at inference.",
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{request.base_model}` |",
    ]
    for k, v in card.items():
        if k == "data":
            continue
        lines.append(f"| {_cell(k)} | `{_cell(v)}` |")
    lines += [
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| examples given | {metrics['examples_in']} |",
        f"| examples trained on | {metrics['examples']} |",
        f"| dropped (prompt longer than maxSeqLength) | {metrics['examples_dropped']} |",
        f"| truncated | {metrics['examples_truncated']} |",
        f"| tokens seen in training | {metrics['tokens']} |",
    ]
    data = card.get("data")
    if isinstance(data, dict):
        for k, v in data.items():
            lines.append(f"| {_cell(k)} | {_cell(v)} |")
    elif data is not None:
        lines.append(f"| data | {_cell(data)} |")
    lines += [
        "",
        "## Hyperparameters",
        "",
        "| | |",
        "|---|---|",
        f"| learning rate | {s.learning_rate:g} → {s.final_learning_rate:g} (linear) |",
        f"| weight decay | {s.weight_decay:g} (AdamW) |",
        f"| global batch | {s.batch_size} ({s.per_device_batch_size} per device x {metrics['world_size']} "
        f"processes x {grad_accum} accumulation) |",
        f"| steps | {metrics['steps']} |",
        f"| max sequence length | {s.max_seq_length} |",
        f"| precision | {metrics['precision']} |",
        f"| DeepSpeed ZeRO stage | {s.zero_stage or 'off'} |",
        f"| gradient checkpointing | {s.gradient_checkpointing} |",
        f"| seed | {s.seed} |",
        "",
        "## Training loss",
        "",
    ]
    history = metrics["train_loss"]
    if history:
        losses = [v for _, v in history]
        lines += [
            f"First {losses[0]:.4f}, last {losses[-1]:.4f}, min {min(losses):.4f} over {len(history)} logged steps"
            + (f" (resumed from step {metrics['resumed_from']})." if metrics["resumed_from"] else "."),
            "",
            "| step | loss |",
            "|---|---|",
            *(f"| {step} | {loss:.4f} |" for step, loss in _loss_summary(history)),
        ]
    else:
        lines.append("No loss was logged.")
    return "\n".join(lines) + "\n"


# --- Trainer plumbing (torch / transformers imported lazily) -------------------------------------------


class _Collator:
    """Right-pads a list of features to the longest; labels padded with -100."""

    def __init__(self, pad_id: int, multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:
            n = -(-n // self.multiple_of) * self.multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = n - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_id] * pad)
            batch["attention_mask"].append(f["attention_mask"] + [0] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


class _ListDataset:
    def __init__(self, features: list[dict[str, list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]


@functools.cache
def _trainer_classes() -> tuple[type, type]:
    import torch
    from transformers import Trainer, TrainerCallback

    class HumpbackTrainer(Trainer):
        """Trainer with the linear lr0 -> lrF schedule (Trainer's "linear" decays to 0)."""

        humpback_settings: TrainingSpec

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                s = self.humpback_settings
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer,
                    functools.partial(learning_rate_factor, total_steps=num_training_steps,
                                      lr0=s.learning_rate, lr_final=s.final_learning_rate),
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class StoreCheckpoints(TrainerCallback):
        """Uploads each Trainer checkpoint to the store; ``_COMPLETE`` last; keeps the latest two.

        Every rank calls on_save after the Trainer (and DeepSpeed) wrote its part. After a barrier
        the first process of each node uploads what its node holds (one node: everything; several
        nodes: each node's ZeRO partitions and RNG states), then global rank 0 writes the marker.
        """

        def __init__(self, store: Store, prefix: str, key: str, every: int, world_size: int,
                     is_main: bool, is_local_main: bool):
            self.store, self.prefix, self.key, self.every = store, prefix, key, every
            self.world_size, self.is_main, self.is_local_main = world_size, is_main, is_local_main
            self.seconds = 0.0
            self.uploaded: list[int] = []
            self._save_started: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            # Trainer saves at the last step too; only multiples of checkpointEvery are kept (the
            # final model is the output; a last checkpoint would double the upload).
            if control.should_save and state.global_step % self.every:
                control.should_save = False
            if control.should_save:
                self._save_started = time.perf_counter()
            return control

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            local = Path(args.output_dir) / f"checkpoint-{step}"
            key_prefix = _ckpt_prefix(self.prefix, step)
            _barrier()  # every rank's shards and RNG state are on disk
            if self.is_local_main:
                n = _upload_dir(self.store, local, key_prefix)
                if self.is_main:
                    log.info("Uploaded checkpoint step %d (%d files) to %s", step, n, self.store.url(key_prefix))
            _barrier()
            if self.is_main:
                self.store.write_json(f"{key_prefix}/{COMPLETE}", {
                    "step": step, "training_key": self.key, "world_size": self.world_size,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                })
                steps = _checkpoint_steps(self.store, self.prefix)
                complete = sorted(s for s, ok in steps.items() if ok)
                for old in complete[:-KEEP_CHECKPOINTS]:
                    self.store.delete_prefix(_ckpt_prefix(self.prefix, old))
                    log.info("Deleted old checkpoint %s", self.store.url(_ckpt_prefix(self.prefix, old)))
            if self.is_local_main:  # the store has it now; keep only this one locally
                for old in Path(args.output_dir).glob("checkpoint-*"):
                    if old != local:
                        shutil.rmtree(old, ignore_errors=True)
            self.uploaded.append(step)
            if self._save_started is not None:
                self.seconds += time.perf_counter() - self._save_started
                self._save_started = None
            return control

    return HumpbackTrainer, StoreCheckpoints


def _checkpointing_args(args_cls: type, enabled: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing flags: transformers 5 renamed them, 4.x has the old names."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {flag: enabled, f"{flag}_kwargs": {"use_reentrant": False} if enabled else None}


def _resolve_base_model(request: TrainRequest, cache_root: Path, is_local_main: bool) -> str:
    """A local directory for s3:// base models (downloaded once per node); other refs unchanged."""
    ref = request.base_model
    if not ref.startswith("s3://"):
        return ref
    digest = hashlib.sha256(ref.rstrip("/").encode("utf-8")).hexdigest()[:16]
    local = cache_root / "models" / digest
    marker = local / ".humpback-download-complete"
    if is_local_main and not marker.is_file():
        src = open_store(ref.rstrip("/"), endpoint_url=request.s3_endpoint, region=request.s3_region)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        t0 = time.perf_counter()
        n = _download_prefix(src, "", local)
        if n == 0:
            raise TrainingError(f"base model {ref} is empty (no objects under it)")
        marker.write_text(ref + "\n", encoding="utf-8")
        log.info("Downloaded base model %s (%d files) to %s in %.1fs", ref, n, local, time.perf_counter() - t0)
    return str(local)


def _default_work_dir(store: Store, prefix: str) -> Path:
    digest = hashlib.sha256(store.url(prefix).encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "humpback-train" / digest


def _stored_metrics(store: Store, prefix: str, key: str) -> dict | None:
    marker = _read_marker(store, f"{prefix}/model/{COMPLETE}")
    if not marker or marker.get("training_key") != key:
        return None
    metrics = _read_marker(store, f"{prefix}/train_metrics.json")
    return metrics


# --- the entry point --------------------------------------------------------------------------------


def train(request: TrainRequest) -> dict[str, Any]:
    """Fine-tune ``request.base_model`` on ``request.examples``; returns metrics for the manifest.

    Metrics: ``steps`` (optimizer steps done) and ``max_steps``, ``examples`` (trained on),
    ``examples_in``, ``examples_dropped``, ``examples_truncated``, ``tokens`` (non-padding input
    tokens over the whole run, all ranks), ``supervised_tokens`` (completion + EOS tokens of the data
    set), ``train_loss`` ([step, loss] per step, across attempts), ``tokens_per_second`` (this
    attempt, checkpoint uploads excluded), ``train_seconds``, ``checkpoint_seconds``, ``seconds``
    (this call up to the final upload), ``world_size``, ``precision`` ("bf16"/"fp32"),
    ``zero_stage``, ``gradient_accumulation_steps``, ``resumed_from`` (step or None),
    ``checkpoints`` (steps uploaded by this attempt), ``model_uri``, ``training_key``. They are also
    written to ``{prefix}/train_metrics.json``. Every rank returns them; only rank 0 writes.
    """
    started = time.perf_counter()
    settings = request.settings
    prefix = request.prefix.strip("/")
    world_size = _env_int("WORLD_SIZE", 1)
    grad_accum = gradient_accumulation_steps(settings, world_size)  # fail before any heavy work
    examples = list(request.examples)
    if not examples:
        raise TrainingError(f"no training examples for {request.store.url(prefix)}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, TrainingExample):
            raise TrainingError(f"examples[{i}] is a {type(ex).__name__}, expected prompts.TrainingExample")
    key = _training_key(request, _examples_digest(examples))
    done = _stored_metrics(request.store, prefix, key)
    if done is not None:
        if _env_int("RANK", 0) == 0:
            log.info("Model %s is already complete for this request; returning its metrics",
                     request.store.url(f"{prefix}/model"))
        return done

    torch = _require("torch")
    _require("transformers")
    work = Path(request.work_dir) if request.work_dir else _default_work_dir(request.store, prefix)
    with _process_env() as owns_group:
        try:
            return _train(request, prefix, examples, key, grad_accum, torch, started, work)
        finally:
            _teardown(owns_group)
            if _env_int("LOCAL_RANK", 0) == 0:  # the store holds what matters; crash or not
                shutil.rmtree(work, ignore_errors=True)


def _train(request: TrainRequest, prefix: str, examples: list[TrainingExample], key: str,
           grad_accum: int, torch: Any, started: float, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    settings, store = request.settings, request.store
    cuda = torch.cuda.is_available()
    bf16 = resolve_bf16(settings.precision, cuda)
    world_size = _env_int("WORLD_SIZE", 1)
    if settings.zero_stage and not cuda:
        _disable_cpu_shm_op()
    if settings.zero_stage:
        logging.getLogger("accelerate.accelerator").addFilter(_GA_FILTER)  # idempotent
    ds_config = deepspeed_config(settings, world_size=world_size, bf16=bf16, gpu=cuda)
    out_dir = work / "trainer"
    n_in = len(examples)
    max_steps = settings.steps_for(n_in)

    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        max_grad_norm=MAX_GRAD_NORM,
        warmup_steps=0,
        optim="adamw_torch",
        bf16=bf16,
        fp16=False,
        **_checkpointing_args(TrainingArguments, settings.gradient_checkpointing),
        deepspeed=ds_config,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.checkpoint_every,
        save_total_limit=None,  # the callback prunes, after uploading
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        include_num_input_tokens_seen="non_padding",
        # CPU: gloo. use_cpu also makes accelerate create the gloo group itself; without it, under
        # DeepSpeed on CPU, accelerate sees no backend and every process thinks it is alone.
        use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo",
        ddp_find_unused_parameters=False,
        ddp_timeout=DIST_TIMEOUT_S,
        disable_tqdm=not sys.stderr.isatty(),
    )  # from here on the process group exists (torchrun or the one-rank group of _process_env)
    rank, local_rank = args.process_index, args.local_process_index
    is_main, is_local_main = rank == 0, local_rank == 0
    if args.world_size != world_size:
        raise TrainingError(f"WORLD_SIZE says {world_size} processes, the process group has {args.world_size}")

    if is_main:
        log.info("Training %s -> %s: %d examples, %d steps, batch %d = %d per device x %d processes x %d "
                 "accumulation, lr %g -> %g, weight decay %g, %s, ZeRO %s, gradient checkpointing %s, seq %d",
                 request.base_model, store.url(f"{prefix}/model"), n_in, max_steps, settings.batch_size,
                 settings.per_device_batch_size, world_size, grad_accum, settings.learning_rate,
                 settings.final_learning_rate, settings.weight_decay, "bf16" if bf16 else "fp32",
                 settings.zero_stage or "off",
                 settings.gradient_checkpointing, settings.max_seq_length)
    if is_local_main:
        shutil.rmtree(work, ignore_errors=True)  # leftovers of an earlier attempt on this node
        work.mkdir(parents=True, exist_ok=True)
    _barrier()

    cache_root = Path(os.environ.get("HUMPBACK_CACHE", Path.home() / ".cache" / "humpback"))
    with args.main_process_first(local=True, desc="base model download"):
        base = _resolve_base_model(request, cache_root, is_local_main)

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no loss and no attention
    data = _tokenize_all(tokenizer, examples, settings.max_seq_length)
    if not data.features:
        raise TrainingError(f"all {n_in} examples were dropped: their prompts alone fill maxSeqLength "
                            f"({settings.max_seq_length} tokens)")
    if data.dropped and is_main:
        log.warning("Dropped %d of %d examples whose prompt fills maxSeqLength (%d tokens)",
                    data.dropped, n_in, settings.max_seq_length)

    # Resume: rank 0 decides from the store, every node fetches the checkpoint before training.
    choice = None
    if is_main:
        choice = _choose_checkpoint(store, prefix, key, world_size, settings.zero_stage)
    resume_step, stale = _broadcast(choice)
    resume_dir = out_dir / f"checkpoint-{resume_step}" if resume_step is not None else None
    if resume_dir is not None and is_local_main:
        t0 = time.perf_counter()
        n = _download_prefix(store, _ckpt_prefix(prefix, resume_step), resume_dir, skip=(COMPLETE,))
        if is_main:
            log.info("Resuming from checkpoint step %d (%d files from %s, %.1fs)", resume_step, n,
                     store.url(_ckpt_prefix(prefix, resume_step)), time.perf_counter() - t0)
    _barrier()
    if is_main:
        for step in stale:
            if step != resume_step:
                store.delete_prefix(_ckpt_prefix(prefix, step))
        if store.list(f"{prefix}/model"):  # a model of another request, or a half-finished upload
            store.delete_prefix(f"{prefix}/model")
            store.delete(f"{prefix}/train_metrics.json")

    # bf16 under DeepSpeed: load in bf16 (DeepSpeed keeps fp32 master weights in the optimizer).
    # Otherwise fp32 weights (autocast does bf16 compute without DeepSpeed).
    dtype = torch.bfloat16 if (bf16 and ds_config is not None) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if settings.gradient_checkpointing:
        model.config.use_cache = False

    trainer_cls, ckpt_cls = _trainer_classes()
    uploader = ckpt_cls(store, prefix, key, settings.checkpoint_every, world_size, is_main, is_local_main)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=_ListDataset(data.features),
        data_collator=_Collator(tokenizer.pad_token_id, 8 if cuda else None),
        processing_class=tokenizer,
        callbacks=[uploader, *request.callbacks],
    )
    trainer.humpback_settings = settings
    tokens_before = 0
    if resume_dir is not None:
        state = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8")) \
            if (resume_dir / "trainer_state.json").is_file() else {}
        tokens_before = int(state.get("num_input_tokens_seen", 0) or 0)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)
    train_seconds = time.perf_counter() - t0
    state = trainer.state

    # Final model: save_model is collective under ZeRO-3 (gathers the 16-bit weights).
    final = work / "final"
    model.config.use_cache = True
    trainer.save_model(str(final))
    history = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e and "step" in e]
    tokens = int(state.num_input_tokens_seen or 0)
    loop_seconds = max(train_seconds - uploader.seconds, 1e-9)
    metrics: dict[str, Any] = {
        "steps": int(state.global_step),
        "max_steps": max_steps,
        "examples": len(data.features),
        "examples_in": n_in,
        "examples_dropped": data.dropped,
        "examples_truncated": data.truncated,
        "tokens": tokens,
        "supervised_tokens": data.supervised_tokens,
        "train_loss": history,
        "tokens_per_second": round((tokens - tokens_before) / loop_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "checkpoint_seconds": round(uploader.seconds, 3),
        "world_size": world_size,
        "precision": "bf16" if bf16 else "fp32",
        "zero_stage": settings.zero_stage,
        "gradient_accumulation_steps": grad_accum,
        "resumed_from": resume_step,
        "checkpoints": uploader.uploaded,
        "model_uri": store.url(f"{prefix}/model"),
        "training_key": key,
        "seconds": round(time.perf_counter() - started, 3),  # this call, up to the upload
    }
    if is_main:
        t1 = time.perf_counter()
        (final / "README.md").write_text(_model_card(request, metrics, grad_accum), encoding="utf-8")
        n = _upload_dir(store, final, f"{prefix}/model", skip=("training_args.bin",))
        store.write_json(f"{prefix}/train_metrics.json", metrics)
        store.write_json(f"{prefix}/model/{COMPLETE}", {"training_key": key, "steps": metrics["steps"],
                                                       "files": n})
        if not request.keep_checkpoints:  # the model is complete: nothing left to resume
            store.delete_prefix(f"{prefix}/checkpoints")
        log.info("Trained %s in %d steps (loss %s -> %s, %.0f tokens/s); uploaded %d files to %s in %.1fs",
                 request.base_model, metrics["steps"], f"{history[0][1]:.4f}" if history else "-",
                 f"{history[-1][1]:.4f}" if history else "-", metrics["tokens_per_second"], n,
                 metrics["model_uri"], time.perf_counter() - t1)
    _barrier()
    del trainer, model
    return metrics


# --- worker CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m humpback_runtime.training --request REQUEST.json [--metrics-out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="python -m humpback_runtime.training",
        description="Fine-tune a causal LM on prompt/completion pairs (one process, or under torchrun).",
    )
    parser.add_argument("--request", required=True,
                        help="JSON file: base_model, examples_uri, settings, storage, prefix, card")
    parser.add_argument("--metrics-out", help="also write the metrics JSON to this local file (rank 0)")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args(argv)

    from humpback_runtime.cli import setup_logging

    setup_logging(ns.verbose)
    try:
        req = load_request(ns.request)
        s3: S3Spec = req.storage.s3
        store = open_store(req.storage.uri, endpoint_url=s3.endpoint, region=s3.region)
        metrics = train(TrainRequest(
            base_model=req.base_model,
            examples=_read_examples(store, req.examples_uri),
            settings=req.settings,
            store=store,
            prefix=req.prefix,
            card=req.card,
            s3_endpoint=s3.endpoint,
            s3_region=s3.region,
            work_dir=req.work_dir,
            keep_checkpoints=req.keep_checkpoints,
        ))
    except TrainingError as e:
        log.error("%s", e)
        return 1
    finally:
        with contextlib.suppress(Exception):  # under torchrun the group is ours to close
            if (dist := _dist()) is not None:
                dist.destroy_process_group()
    if ns.metrics_out and _env_int("RANK", 0) == 0:
        Path(ns.metrics_out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: one set of classes per process.
    from humpback_runtime.training import main as _main

    raise SystemExit(_main())
