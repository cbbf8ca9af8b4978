"""Supervised fine-tuning for train-myx, train-m0 and train-mk: one entry point, one process or many.

The stage builds the examples with :mod:`humpback_runtime.prompts` (the only source of templates)
and calls :func:`train`; on a cluster the same code runs under ``torchrun`` inside a PyTorchJob::

    from humpback_runtime.training import TrainRequest, train
    metrics = train(TrainRequest(base_model="meta-llama/Llama-2-7b-hf", examples=examples,
                                 settings=run.spec.training.seed, store=store,
                                 prefix="default/run/train-m0", card={...}))

On a cluster the same stage command runs under ``torchrun`` (``torchrun -m humpback_runtime stage
train-m0 --spec ...``): one entry point, the same locally and in a PyTorchJob.

Distributed runs. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` for each process it starts; this module only reads those. In a Kubeflow PyTorchJob
the training operator sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` on every pod, and ``torchrun`` reads every ``PET_<ARG>``
variable as the default of its ``--<arg>`` flag, so the container command is simply
``torchrun -m humpback_runtime stage STAGE --spec ...`` with no torchrun flags. A single process without
torchrun is a world of one (DeepSpeed still wants a process group: :func:`train` creates a
one-rank gloo/NCCL group on a free loopback port and tears it down afterwards).

What happens:

* tokenisation (:func:`recipe.tokenize_example`): the loss covers the completion tokens and the EOS the
  trainer appends; the prompt tokens (BOS included) are masked with -100. Examples longer than
  ``maxSeqLength`` are cut from the right; one whose prompt alone fills the window is dropped and
  counted (``examples_dropped``).
* HF ``Trainer`` with DeepSpeed ZeRO (``zeroStage`` 1-3; 0 = plain DDP / one process), AdamW (torch
  implementation, the spec's weight decay), a learning rate going linearly from ``learningRate`` at
  the first optimizer step to ``finalLearningRate`` at the last one (:func:`recipe.learning_rate_at`),
  ``batchSize`` sequences per optimizer step made up by gradient accumulation
  (:func:`recipe.gradient_accumulation_steps`), ``steps_for(len(examples))`` steps, bf16 on CUDA (or when
  asked for), fp32 on CPU, gradient checkpointing per the spec.
* batches: padding-free packing by default (``packing``; the micro-batch's examples flattened into
  one row with position ids restarting per example, which transformers turns into a block-diagonal
  causal mask for SDPA/eager or varlen boundaries for FlashAttention-2), else right-padding; the
  attention kernel per ``attention`` (auto: FlashAttention-2 on a GPU in bf16 where installed, SDPA
  otherwise); Liger kernels with ``liger`` on CUDA; ``lora`` trains PEFT adapters (4-bit base with
  ``quantizeBase``) and exports the merged weights, so ``model/`` is always a plain model; on a GPU a
  configuration whose weights, gradients and AdamW state cannot fit is refused with the arithmetic
  (:func:`recipe.check_fits`). ``evalFraction`` holds out examples for an eval loss every
  ``evalEvery`` steps; tokens/s (and MFU on a known GPU) are logged with every step's loss.
* checkpoints: every ``checkpointEvery`` steps and every ``checkpointEveryMinutes`` a full resumable
  checkpoint (weights, optimizer, scheduler, RNG, trainer state; DeepSpeed's own format under ZeRO)
  is written to local disk and uploaded to ``{prefix}/checkpoints/step-N/`` in the background while
  training continues, with ``_COMPLETE`` written last; once it is complete the older one is deleted
  (the store keeps the last one). Each checkpoint's stall of the training loop and its upload time go
  to the metrics (``checkpoint_stalls``). A new
  attempt with the same request (same base model, settings, data and card fingerprint) resumes from
  the latest complete one; checkpoints of another request are deleted.
* output: ``{prefix}/model/`` (safetensors, tokenizer, generation config, README.md model card),
  ``{prefix}/train_metrics.json``, then ``{prefix}/model/_COMPLETE`` last; then the checkpoints are
  deleted (``TrainRequest.keep_checkpoints`` keeps them). A request whose model is already complete
  returns the stored metrics without training again, and deletes the checkpoints an attempt killed
  between ``model/_COMPLETE`` and their deletion left behind.
* only global rank 0 writes to the store and logs at INFO. One exception across nodes: ZeRO
  partitions and RNG states live on the node of the rank that wrote them, so with several nodes the
  first process of each node uploads its node's files into the checkpoint folder before rank 0
  writes ``_COMPLETE``; to resume, the first process of each node downloads the whole checkpoint.
* ``s3://`` base models are downloaded once per node into ``$HUMPBACK_CACHE/models/`` (default
  ``~/.cache/humpback``); scratch files (local checkpoints) go to ``TrainRequest.work_dir`` (default:
  under ``$HUMPBACK_WORK_DIR``, a checkpoint volume on a cluster, else the system temp directory)
  and are removed at the end, crash or not.

DeepSpeed on CPU: the processes talk over gloo. DeepSpeed 0.19 would JIT-compile its shared-memory
all-reduce op (``deepspeed_shm_comm``) on the first CPU process group (~20 s, and a compiler in the
image); that op only serves inference all-reduce, so it is switched off here on CPU. The torch
AdamW is used (no ``cpu_adam`` build, no offload). Any op DeepSpeed still builds goes to
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/humpback/torch_extensions``), never the repository.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from humpback_runtime.errors import TrainingError
from humpback_runtime.prompts import TrainingExample
from humpback_runtime.spec import TrainingSpec
from humpback_runtime.storage import Store
from humpback_runtime.training.checkpoints import COMPLETE, examples_digest, stored_metrics, training_key
from humpback_runtime.training.distributed import env_int, process_env, require, teardown
from humpback_runtime.training.recipe import IGNORE_INDEX, gradient_accumulation_steps
from humpback_runtime.training.trainer import default_work_dir, run_training

__all__ = ["COMPLETE", "IGNORE_INDEX", "TrainRequest", "TrainingError", "train"]

log = logging.getLogger("humpback_runtime.training")


@dataclass
class TrainRequest:
    """One fine-tuning job.

    ``base_model``: local directory, hub id or ``s3://`` URI (downloaded to a local cache first;
    ``s3_endpoint`` / ``s3_region`` as in the run's ``storage.s3``). ``examples``: built by the caller
    with :mod:`humpback_runtime.prompts`. Outputs go to ``store`` under ``prefix``. ``card``: lineage
    for the model card and the resume key (run, stage, role, base model, data counts, fingerprint).
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (run after the checkpoint upload and
    the tokens/s logging; a stage passes its trackers' here, :func:`humpback_runtime.tracking.trainer_callbacks`).
    ``work_dir``: local scratch space; by default a folder under ``$HUMPBACK_WORK_DIR`` or the system temp directory derived
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



def train(request: TrainRequest) -> dict[str, Any]:
    """Fine-tune ``request.base_model`` on ``request.examples``; returns metrics for the manifest.

    Metrics: ``steps`` (optimizer steps done) and ``max_steps``, ``examples`` (trained on),
    ``examples_in``, ``examples_dropped``, ``examples_truncated``, ``eval_examples``, ``eval_loss``
    ([step, loss]), ``parameters``, ``packing``, ``attention``, ``liger``, ``lora``, ``mfu`` (GPU
    with a known peak, else None), ``checkpoint_stalls`` ([{step, stall_seconds, upload_seconds}]),
    ``tokens`` (non-padding input
    tokens over the whole run, all ranks), ``supervised_tokens`` (completion + EOS tokens of the data
    set), ``train_loss`` ([step, loss] per step, across attempts), ``tokens_per_second`` (this
    attempt, checkpoint uploads excluded), ``train_seconds``, ``checkpoint_seconds`` (the stalls, summed), ``seconds``
    (this call up to the final upload), ``world_size``, ``precision`` ("bf16"/"fp32"),
    ``strategy``, ``zero_stage`` (None under fsdp), ``gradient_accumulation_steps``, ``resumed_from`` (step or None),
    ``checkpoints`` (steps uploaded by this attempt), ``model_uri``, ``training_key``. They are also
    written to ``{prefix}/train_metrics.json``. Every rank returns them; only rank 0 writes.
    """
    started = time.perf_counter()
    prefix = request.prefix.strip("/")
    examples = list(request.examples)
    if not examples:
        raise TrainingError(f"no training examples for {request.store.url(prefix)}")
    # Steps and batch size by data size (the paper's table: batch 8 under 3,200 examples).
    request = dataclasses.replace(request, settings=request.settings.for_size(len(examples)))
    settings = request.settings
    world_size = env_int("WORLD_SIZE", 1)
    grad_accum = gradient_accumulation_steps(settings, world_size)  # fail before any heavy work
    for i, ex in enumerate(examples):
        if not isinstance(ex, TrainingExample):
            raise TrainingError(f"examples[{i}] is a {type(ex).__name__}, expected prompts.TrainingExample")
    key = training_key(request, examples_digest(examples))
    done = stored_metrics(request.store, prefix, key)
    if done is not None:
        if env_int("RANK", 0) == 0:
            log.info("Model %s is already complete for this request; returning its metrics",
                     request.store.url(f"{prefix}/model"))
            # An attempt killed between model/_COMPLETE and deleting its checkpoints left them.
            if not request.keep_checkpoints and request.store.delete_prefix(f"{prefix}/checkpoints"):
                log.info("Deleted the checkpoints the published model no longer needs")
        return done

    torch = require("torch")
    require("transformers")
    work = Path(request.work_dir) if request.work_dir else default_work_dir(request.store, prefix)
    with process_env() as owns_group:
        try:
            return run_training(request, prefix, examples, key, grad_accum, torch, started, work)
        finally:
            teardown(owns_group)
            if env_int("LOCAL_RANK", 0) == 0:  # the store holds what matters; crash or not
                shutil.rmtree(work, ignore_errors=True)
