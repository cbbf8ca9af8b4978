"""In-process engines: a transformers causal LM (CPU by default) and vLLM where it is installed.

The only inference module that imports torch, transformers or vLLM (lazily, when an engine loads).
Both gather the concurrent requests of `run_completions` into batches (`_BatchingClient`) and run
each batch in one call to the model; see :mod:`humpback_runtime.inference.engines` for the interface.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from humpback_runtime.inference.engines import Engine

__all__ = ["TransformersEngine", "VLLMEngine", "vllm_available"]

log = logging.getLogger(__name__)

_TRAIN_HINT = "pip install 'humpback[train]'"
_NO_VLLM = ("vLLM is not installed (import vllm failed), so inference engine 'vllm' cannot run in this "
            "process: install vLLM (a GPU image), or set inference.engine to 'transformers' (CPU, "
            "in-process) or 'vllm-server' with inference.endpoint pointing at a running `vllm serve`")



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

