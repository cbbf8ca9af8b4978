"""The HF Trainer run behind :func:`humpback_runtime.training.train` (torch and transformers are
imported lazily, inside the functions)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from humpback_runtime.errors import TrainingError
from humpback_runtime.pod_contract import WORK_DIR_ENV
from humpback_runtime.prompts import TrainingExample
from humpback_runtime.spec import TrainingSpec
from humpback_runtime.storage import Store, open_store
from humpback_runtime.training.card import model_card
from humpback_runtime.training.checkpoints import (COMPLETE, checkpoint_prefix, checkpoint_steps,
                                                   choose_checkpoint, download_prefix, upload_dir)
from humpback_runtime.training.varlen import VARLEN, register_varlen
from humpback_runtime.training.lora import add_lora, qlora_config, save_merged
from humpback_runtime.training.distributed import (DIST_TIMEOUT_S, GRAD_ACCUM_FILTER, barrier, broadcast,
                                                   disable_cpu_shm_op, env_int)
from humpback_runtime.training.recipe import (IGNORE_INDEX, MAX_GRAD_NORM, check_fits, check_training_yield,
                                              deepspeed_config, learning_rate_factor, mfu, peak_bf16_flops,
                                              resolve_attention, resolve_bf16, tokenize_all)

if TYPE_CHECKING:
    from humpback_runtime.training import TrainRequest

log = logging.getLogger("humpback_runtime.training")


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


def make_collator(packing: bool, pad_id: int, *, cuda: bool, attention: str) -> Any:
    """Padding-free flattening (one row per micro-batch, position ids restarting at every example;
    transformers turns them into a block-diagonal causal mask for SDPA, and the boundaries go to
    FlashAttention's varlen kernels or to "sdpa_varlen") or right-padding."""
    if packing:
        from transformers import DataCollatorWithFlattening

        # The example boundaries (cu_seq_lens_*) for the kernels that attend example by example.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=attention in ("flash_attention_2", VARLEN))
    return _Collator(pad_id, 8 if cuda else None)


class _ListDataset:
    def __init__(self, features: list[dict[str, list[int]]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]


@functools.cache
def _trainer_classes() -> tuple[type, type, type]:
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
        """Checkpoints every ``checkpointEvery`` steps and every ``checkpointEveryMinutes``, uploaded
        to the store in the background while training goes on; only the last complete one is kept.

        Every rank calls on_save after the Trainer (and DeepSpeed) wrote its part to local disk.
        After a barrier the first process of each node starts a thread that uploads what its node
        holds (one node: everything; several nodes: each node's ZeRO partitions and RNG states),
        and training continues. With one node that thread writes ``_COMPLETE`` and deletes the
        older checkpoint itself; with several, rank 0 does it at the next save (or the end), after
        every node joined its upload at a barrier. The stall per checkpoint (what the training loop
        waited: the local write, the barrier, an unfinished previous upload) is recorded beside the
        upload time, which overlaps training.
        """

        def __init__(self, store: Store, prefix: str, key: str, every: int, every_minutes: float | None,
                     world_size: int, single_node: bool, is_main: bool, is_local_main: bool):
            self.store, self.prefix, self.key, self.every = store, prefix, key, every
            self.every_s = every_minutes * 60 if every_minutes else None
            self.world_size, self.single_node = world_size, single_node
            self.is_main, self.is_local_main = is_main, is_local_main
            self.seconds = 0.0  # the stalls, summed
            self.uploaded: list[int] = []
            self.stalls: list[dict[str, Any]] = []
            self._save_started: float | None = None
            self._last_save = time.perf_counter()
            self._thread: threading.Thread | None = None
            self._pending: tuple[int, Path] | None = None  # uploading, or uploaded without its marker yet
            self._upload_seconds: dict[int, float] = {}
            self._error: BaseException | None = None

        def on_step_end(self, args, state, control, **kwargs):
            # Trainer saves at the last step too; only multiples of checkpointEvery are kept there
            # (the final model is the output; a last checkpoint would double the upload).
            by_steps = state.global_step % self.every == 0
            by_time = False
            if self.every_s is not None and state.global_step < state.max_steps:
                by_time = broadcast(time.perf_counter() - self._last_save >= self.every_s)  # ranks agree
            control.should_save = by_steps or by_time
            if control.should_save:
                self._save_started = time.perf_counter()
            return control

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            local = Path(args.output_dir) / f"checkpoint-{step}"
            barrier()  # every rank's shards and RNG state are on disk
            self.finish()  # the previous upload: normally long done
            if self.is_local_main:
                self._thread = threading.Thread(target=self._upload, args=(step, local),
                                                name=f"checkpoint-upload-{step}", daemon=True)
                self._thread.start()
            self._pending = (step, local)
            self.uploaded.append(step)
            now = time.perf_counter()
            stall = now - (self._save_started if self._save_started is not None else now)
            self._save_started, self._last_save = None, now
            self.seconds += stall
            self.stalls.append({"step": step, "stall_seconds": round(stall, 3)})
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.finish()
            for entry in self.stalls:
                entry["upload_seconds"] = round(self._upload_seconds.get(entry["step"], 0.0), 3)
            return control

        def _upload(self, step: int, local: Path) -> None:
            try:
                t0 = time.perf_counter()
                n = upload_dir(self.store, local, checkpoint_prefix(self.prefix, step))
                if n == 0:  # never mark an empty checkpoint complete
                    raise TrainingError(f"checkpoint folder {local} is empty")
                self._upload_seconds[step] = time.perf_counter() - t0
                if self.is_main:
                    log.info("Uploaded checkpoint step %d (%d files) to %s in %.1fs (in the background)", step,
                             n, self.store.url(checkpoint_prefix(self.prefix, step)), self._upload_seconds[step])
                if self.single_node and self.is_main:
                    self._complete(step)
            except BaseException as e:  # re-raised in the training thread by finish()
                self._error = e

        def _complete(self, step: int) -> None:
            key_prefix = checkpoint_prefix(self.prefix, step)
            self.store.write_json(f"{key_prefix}/{COMPLETE}", {
                "step": step, "training_key": self.key, "world_size": self.world_size,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            for old, _ in checkpoint_steps(self.store, self.prefix).items():
                if old != step:  # only the newest complete checkpoint stays in the store
                    self.store.delete_prefix(checkpoint_prefix(self.prefix, old))
                    log.info("Deleted old checkpoint %s", self.store.url(checkpoint_prefix(self.prefix, old)))

        def wait(self) -> None:
            """Join this process's upload (also after a crash, before the work folder goes)."""
            if self._thread is not None:
                self._thread.join()
                self._thread = None

        def finish(self) -> None:
            """Collective: the pending checkpoint is complete in the store when this returns."""
            if self._pending is None:
                return
            step, local = self._pending
            self.wait()
            error, self._error = self._error, None
            if error is not None:
                raise TrainingError(f"uploading checkpoint step {step} failed: {error}") from error
            if not self.single_node:
                barrier()  # every node's part is in the store
                if self.is_main:
                    self._complete(step)
            if self.is_local_main:  # the store has it; the older local ones can go (never a newer one)
                for old in Path(local).parent.glob("checkpoint-*"):
                    if old.name.rsplit("-", 1)[-1].isdigit() and int(old.name.rsplit("-", 1)[-1]) < step:
                        shutil.rmtree(old, ignore_errors=True)
            self._pending = None
    class ThroughputLog(TrainerCallback):
        """Adds tokens/s (all ranks, since the previous log) and MFU to every logged step."""

        def __init__(self, n_params: int, peak_flops: float | None, world_size: int):
            self.n_params, self.peak, self.world_size = n_params, peak_flops, world_size
            self._last: tuple[float, int] | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last is None:
                self._last = (time.perf_counter(), int(state.num_input_tokens_seen or 0))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs or self._last is None:
                return
            now, seen = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            rate = (seen - self._last[1]) / max(now - self._last[0], 1e-9)
            self._last = (now, seen)
            logs["tokens_per_second"] = round(rate, 2)
            util = mfu(self.n_params, rate, self.peak, self.world_size)
            if util is not None:
                logs["mfu"] = round(util, 4)


    class TrainingProgress(TrainerCallback):
        """Steps done of max_steps, input tokens, the latest loss and checkpoint age, for the stage's
        `_PROGRESS.json`, its metrics and a bar on a terminal (the Trainer's own bar is off)."""

        def __init__(self) -> None:
            self.tracker = None

        def on_train_begin(self, args, state, control, **kwargs):
            from humpback_runtime import progress

            self.tracker = progress.track("training", total=state.max_steps, unit="steps", done=state.global_step)
            self._tokens0 = int(state.num_input_tokens_seen or 0)

        def on_step_end(self, args, state, control, **kwargs):
            if self.tracker is not None:
                self.tracker.set_done(state.global_step)
                self.tracker.tokens = int(state.num_input_tokens_seen or 0) - self._tokens0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.tracker is not None and logs and "loss" in logs:
                self.tracker.extra["loss"] = round(float(logs["loss"]), 5)

        def on_save(self, args, state, control, **kwargs):
            if self.tracker is not None:
                self.tracker.checkpoint()

        def on_train_end(self, args, state, control, **kwargs):
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None


    return HumpbackTrainer, StoreCheckpoints, ThroughputLog, TrainingProgress


def _checkpointing_args(args_cls: type, enabled: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing flags: transformers 5 renamed them, 4.x has the old names."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {flag: enabled, f"{flag}_kwargs": {"use_reentrant": False} if enabled else None}


def _fsdp_args(settings: TrainingSpec) -> dict[str, Any]:
    """TrainingArguments for strategy fsdp: FSDP2 (fully_shard) of every decoder layer (accelerate
    wraps the model's _no_split_modules), resharded after forward (ZeRO-3's memory), a full state
    dict for save_model (model/ holds ordinary safetensors). Gradient checkpointing is FSDP's own
    activation checkpointing there. The parameters stay fp32 (the master weights); with bf16 the
    forward and backward run in bf16 (accelerate's mixed-precision policy)."""
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                            "state_dict_type": "FULL_STATE_DICT",
                            "activation_checkpointing": settings.gradient_checkpointing}}


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
        n = download_prefix(src, "", local)
        if n == 0:
            raise TrainingError(f"base model {ref} is empty (no objects under it)")
        marker.write_text(ref + "\n", encoding="utf-8")
        log.info("Downloaded base model %s (%d files) to %s in %.1fs", ref, n, local, time.perf_counter() - t0)
    return str(local)


def split_eval(examples: list[TrainingExample], fraction: float, seed: int
               ) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, eval): ``fraction`` of the examples (at least one, never all) drawn with ``seed``."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = min(max(1, round(fraction * len(examples))), len(examples) - 1)
    held = set(random.Random(seed).sample(range(len(examples)), n_eval))
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def default_work_dir(store: Store, prefix: str) -> Path:
    """A folder for this output location under $HUMPBACK_WORK_DIR (a checkpoint volume), else the
    system temp directory: the same for every process of one node."""
    digest = hashlib.sha256(store.url(prefix).encode("utf-8")).hexdigest()[:16]
    return Path(os.environ.get(WORK_DIR_ENV) or tempfile.gettempdir()) / "humpback-train" / digest



# Config fields that hold a dropout probability used in training, across common architectures.
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob")


def apply_dropout(config: Any, p: float) -> list[str]:
    """Set every dropout field `config` has to `p` (before the model is built); returns their names.

    The paper fine-tunes with dropout 0.1 without saying where; Hugging Face's Llama has attention
    dropout only, so that is where it goes for Llama (docs/method.md).
    """
    fields = [f for f in DROPOUT_FIELDS if isinstance(getattr(config, f, None), (int, float))]
    for f in fields:
        setattr(config, f, p)
    return fields


def run_training(request: TrainRequest, prefix: str, examples: list[TrainingExample], key: str,
           grad_accum: int, torch: Any, started: float, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    settings, store = request.settings, request.store
    cuda = torch.cuda.is_available()
    bf16 = resolve_bf16(settings.precision, cuda)
    world_size = env_int("WORLD_SIZE", 1)
    fsdp = settings.strategy == "fsdp"
    zero = 0 if fsdp else settings.zero_stage  # the DeepSpeed ZeRO stage in use
    if zero and not cuda:
        disable_cpu_shm_op()
    if zero:
        logging.getLogger("accelerate.accelerator").addFilter(GRAD_ACCUM_FILTER)  # idempotent
    ds_config = None if fsdp else deepspeed_config(settings, world_size=world_size, bf16=bf16, gpu=cuda)
    attention = resolve_attention(settings.attention, cuda=cuda, bf16=bf16, packing=settings.packing,
                                  flash_installed=importlib.util.find_spec("flash_attn") is not None)
    if attention == VARLEN:
        register_varlen()
    liger = settings.liger and cuda
    if settings.liger and importlib.util.find_spec("liger_kernel") is None:
        raise TrainingError("training.liger is true but the liger-kernel package is not installed")
    evaluate = settings.eval_fraction > 0
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
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        max_grad_norm=MAX_GRAD_NORM,
        warmup_steps=0,
        optim="adamw_torch",
        bf16=bf16,
        fp16=False,
        **(_fsdp_args(settings) if fsdp else _checkpointing_args(TrainingArguments, settings.gradient_checkpointing)),
        deepspeed=ds_config,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.checkpoint_every,
        save_total_limit=None,  # the callback prunes, after uploading
        # The trackers' callbacks come in request.callbacks (tracking.trainer_callbacks), after
        # ThroughputLog, so that they log tokens/s too, and into the runs the stage opened.
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
        disable_tqdm=True,  # TrainingProgress shows the bar (and writes _PROGRESS.json)
        use_liger_kernel=liger,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=settings.eval_every if evaluate else None,
        per_device_eval_batch_size=settings.per_device_batch_size,
    )  # from here on the process group exists (torchrun or the one-rank group of process_env)
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
                 "FSDP" if fsdp else (zero or "off"),
                 settings.gradient_checkpointing, settings.max_seq_length)
    if is_local_main:
        shutil.rmtree(work, ignore_errors=True)  # leftovers of an earlier attempt on this node
        work.mkdir(parents=True, exist_ok=True)
    barrier()

    cache_root = Path(os.environ.get("HUMPBACK_CACHE", Path.home() / ".cache" / "humpback"))
    with args.main_process_first(local=True, desc="base model download"):
        base = _resolve_base_model(request, cache_root, is_local_main)

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no loss and no attention
    train_examples, eval_examples = split_eval(examples, settings.eval_fraction, settings.seed)
    data = tokenize_all(tokenizer, train_examples, settings.max_seq_length)
    eval_data = tokenize_all(tokenizer, eval_examples, settings.max_seq_length) if eval_examples else None
    check_training_yield(data, len(train_examples), settings.max_seq_length, settings.min_yield)
    if data.dropped and is_main:
        log.warning("Dropped %d of %d examples whose prompt fills maxSeqLength (%d tokens)",
                    data.dropped, n_in, settings.max_seq_length)

    # Resume: rank 0 decides from the store, every node fetches the checkpoint before training.
    choice = None
    if is_main:
        # FSDP's checkpoint is sharded by rank, as ZeRO's: only the same world size can resume it.
        choice = choose_checkpoint(store, prefix, key, world_size, 3 if fsdp else zero)
    resume_step, stale = broadcast(choice)
    resume_dir = out_dir / f"checkpoint-{resume_step}" if resume_step is not None else None
    if resume_dir is not None and is_local_main:
        t0 = time.perf_counter()
        n = download_prefix(store, checkpoint_prefix(prefix, resume_step), resume_dir, skip=(COMPLETE,))
        if is_main:
            log.info("Resuming from checkpoint step %d (%d files from %s, %.1fs)", resume_step, n,
                     store.url(checkpoint_prefix(prefix, resume_step)), time.perf_counter() - t0)
    barrier()
    if is_main:
        for step in stale:
            if step != resume_step:
                store.delete_prefix(checkpoint_prefix(prefix, step))
        if store.list(f"{prefix}/model"):  # a model of another request, or a half-finished upload
            store.delete_prefix(f"{prefix}/model")
            store.delete(f"{prefix}/train_metrics.json")

    # bf16 under DeepSpeed: load in bf16 (DeepSpeed keeps fp32 master weights in the optimizer).
    # Otherwise fp32 weights (autocast does bf16 compute without DeepSpeed).
    dtype = torch.bfloat16 if (bf16 and ds_config is not None) else torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    dropout_fields = apply_dropout(config, settings.dropout)
    load_kwargs: dict[str, Any] = {}
    if settings.lora is not None and settings.lora.quantize_base:
        load_kwargs["quantization_config"] = qlora_config(cuda, torch)
        dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, config=config, attn_implementation=attention,
                                                 **load_kwargs)
    n_params = sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters())
    # No KV cache while training: it is useless there, and with a cache transformers ignores the
    # packed position ids (no block-diagonal mask: packed examples would attend to each other).
    model.config.use_cache = False
    if settings.lora is not None:
        model = add_lora(model, settings.lora, settings.gradient_checkpointing)
    if cuda and not load_kwargs:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        check_fits(n_params, zero_stage=3 if fsdp else zero, world_size=world_size,
                   gpu_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
                   bf16=dtype == torch.bfloat16, trainable_params=trainable)
    if is_main:
        log.info("Model %s: %.1fM parameters, attention %s, %s batches%s%s", request.base_model, n_params / 1e6,
                 attention, "packed" if settings.packing else "padded", ", Liger kernels" if liger else "",
                 f", LoRA r={settings.lora.rank}" if settings.lora else "")

    trainer_cls, ckpt_cls, throughput_cls, progress_cls = _trainer_classes()
    uploader = ckpt_cls(store, prefix, key, settings.checkpoint_every, settings.checkpoint_every_minutes, world_size,
                        env_int("LOCAL_WORLD_SIZE", world_size) == world_size, is_main, is_local_main)
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if cuda and bf16 else None
    on_main = [progress_cls()] if is_main else []
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=_ListDataset(data.features),
        eval_dataset=_ListDataset(eval_data.features) if eval_data and eval_data.features else None,
        data_collator=make_collator(settings.packing, tokenizer.pad_token_id, cuda=cuda, attention=attention),
        processing_class=tokenizer,
        callbacks=[uploader, throughput_cls(n_params, peak, world_size), *on_main, *request.callbacks],
    )
    trainer.humpback_settings = settings
    # Without its bar the Trainer prints every log dict to stdout; TrainingProgress reports instead.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    tokens_before = 0
    if resume_dir is not None:
        state = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8")) \
            if (resume_dir / "trainer_state.json").is_file() else {}
        tokens_before = int(state.get("num_input_tokens_seen", 0) or 0)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir is not None else None)
    finally:
        uploader.wait()  # an upload in flight finishes before the work folder is removed
    train_seconds = time.perf_counter() - t0
    state = trainer.state
    if evaluate and trainer.eval_dataset is not None:
        trainer.evaluate()  # the final eval loss, logged at the last step

    # Final model: save_model is collective under ZeRO-3 (gathers the 16-bit weights).
    final = work / "final"
    model.config.use_cache = True
    if settings.lora is not None:
        save_merged(trainer, final, tokenizer, base, is_main)  # a plain model for every later stage
    else:
        trainer.save_model(str(final))
    history = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e and "step" in e]
    tokens = int(state.num_input_tokens_seen or 0)
    loop_seconds = max(train_seconds - uploader.seconds, 1e-9)
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in state.log_history if "eval_loss" in e]
    rate = (tokens - tokens_before) / loop_seconds
    metrics: dict[str, Any] = {
        "steps": int(state.global_step),
        "max_steps": max_steps,
        "examples": len(data.features),
        "examples_in": n_in,
        "examples_dropped": data.dropped,
        "examples_truncated": data.truncated,
        "examples_prompt_cut": data.prompt_cut,
        "tokens": tokens,
        "supervised_tokens": data.supervised_tokens,
        "train_loss": history,
        "tokens_per_second": round(rate, 3),
        "mfu": None if peak is None else round(mfu(n_params, rate, peak, world_size), 4),
        "parameters": n_params,
        "packing": settings.packing,
        "attention": attention,
        "liger": liger,
        "lora": settings.lora.model_dump(mode="json", by_alias=True) if settings.lora else None,
        "eval_examples": len(eval_data.features) if eval_data else 0,
        "eval_loss": evals,
        "train_seconds": round(train_seconds, 3),
        "checkpoint_seconds": round(uploader.seconds, 3),  # training stalled by checkpoints
        "checkpoint_stalls": uploader.stalls,
        "world_size": world_size,
        "precision": "bf16" if bf16 else "fp32",
        "strategy": settings.strategy,
        "zero_stage": None if fsdp else zero,
        "batch_size": settings.batch_size,
        "dropout": {"p": settings.dropout, "fields": dropout_fields},
        "gradient_accumulation_steps": grad_accum,
        "resumed_from": resume_step,
        "checkpoints": uploader.uploaded,
        "model_uri": store.url(f"{prefix}/model"),
        "training_key": key,
        "seconds": round(time.perf_counter() - started, 3),  # this call, up to the upload
    }
    if is_main:
        t1 = time.perf_counter()
        (final / "README.md").write_text(model_card(request, metrics, grad_accum), encoding="utf-8")
        n = upload_dir(store, final, f"{prefix}/model", skip=("training_args.bin",))
        store.write_json(f"{prefix}/train_metrics.json", metrics)
        store.write_json(f"{prefix}/model/{COMPLETE}", {"training_key": key, "steps": metrics["steps"],
                                                       "files": n})
        if not request.keep_checkpoints:  # the model is complete: nothing left to resume
            store.delete_prefix(f"{prefix}/checkpoints")
        log.info("Trained %s in %d steps (loss %s -> %s, %.0f tokens/s); uploaded %d files to %s in %.1fs",
                 request.base_model, metrics["steps"], f"{history[0][1]:.4f}" if history else "-",
                 f"{history[-1][1]:.4f}" if history else "-", metrics["tokens_per_second"], n,
                 metrics["model_uri"], time.perf_counter() - t1)
    barrier()
    del trainer, model
    return metrics
